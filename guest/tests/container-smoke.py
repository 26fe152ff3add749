#!/usr/bin/env python3
"""Container smoke test of the Kiln guest agent under real QEMU (TCG).

Builds two erofs layers on the host from Debian's static busybox and small
files (the lower one from a directory with mkfs.erofs, the upper one from an
OCI-style layer tar with `mkfs.erofs --tar=f --aufs`, holding a whiteout and
an opaque directory), boots OUTDIR's guest on `-M microvm,acpi=on` with a
virtio-scsi controller, hot-plugs the layers with QMP (blockdev-add +
device_add scsi-hd) and checks io.kiln.Agent's container methods end to end:

  - modules loaded on the first StartContainer, not at boot;
  - the merged view (whiteout applied, opaque directory hides the lower
    one, upper file over lower file), PID 1 in its namespace, hostname,
    env, cwd, uid/gid/groups from the image's /etc/passwd and /etc/group,
    /proc, /dev and a read-only /sys, no view of the agent's mounts;
  - stdout and stderr in ContainerLogs, followed by cursor to the end;
  - Exec inside the container (its namespaces, root, user, env);
  - two containers from the same layer disks do not see each other's
    writes; an ext4 upper disk keeps a container's writes for the next;
  - StopContainer (a handled SIGTERM; an ignored one gets SIGKILL),
    RemoveContainer (unmounts; the disks then unplug), TooManyContainers;
  - a snapshot with a running container restored into a clone (the same
    disks on its command line): the container runs on, Exec works;
  - named errors in bounded time: a serial that never appears, a disk
    that is not erofs, a binary for another architecture and garbage
    (ExecFormatError, also for Exec), a missing program, bad process
    specs, unknown containers.

  guest/tests/container-smoke.py [OUTDIR]      (default: target/guest)

Environment: as boot-smoke.py (KILN_QEMU, KILN_SMOKE_APPEND,
KILN_SMOKE_KEEP=1). Prints the times it measures (boot to first Ping,
hot-plug to first container output, module loading). QEMU and the work
directory are always cleaned up.
"""

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/lib"))
from kiln_testlib import (REPO, Agent, Failure, Qmp, check, kill_all, microvm_argv,  # noqa: E402
                          print_console_tails, remove_work, skip, step, wait_until)

BOOT_TIMEOUT = 120.0
AGENT = "io.kiln.Agent."
APP_UID = 1000
STAFF_GID = 50


# ----- building the image on the host -------------------------------------------


def static_busybox(guest):
    """A static busybox from Debian's busybox-static: the host's, or the one
    the guest image build unpacked."""
    candidates = [shutil.which("busybox"), "/usr/bin/busybox", "/bin/busybox",
                  os.path.join(guest, "rootfs", "bin", "busybox")]
    for path in filter(None, candidates):
        if os.path.isfile(path) and subprocess.run(
                [sys.executable, os.path.join(REPO, "guest", "image-tool.py"), "check-static", path],
                capture_output=True).returncode == 0:
            return path
    return None


def foreign_elf():
    """A minimal ELF executable header for aarch64: a binary of another
    architecture, which execve refuses with ENOEXEC."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0, 0]) + b"\0" * 7
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 0x80, 0x80, 0x1000)
    return header + program + b"\0" * 8


def build_layers(work, busybox):
    """lower.erofs (a directory) and upper.erofs (a layer tar with aufs
    whiteouts); returns their paths."""
    lower = os.path.join(work, "lower")
    for d in ("bin", "etc", "data/keep", "opq/sub", "home/app", "srv"):
        os.makedirs(os.path.join(lower, d))
    shutil.copy(busybox, os.path.join(lower, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", os.path.join(lower, "bin", applet))
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
        "etc/group": "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
        "etc/motd": "lower\n",
        "data/gone": "lower\n",
        "data/keep/x": "kept\n",
        "opq/old": "hidden\n",
        "opq/sub/deep": "hidden\n",
    }
    for rel, text in files.items():
        with open(os.path.join(lower, rel), "w") as f:
            f.write(text)
    os.chown(os.path.join(lower, "home/app"), APP_UID, APP_UID)
    lower_img = os.path.join(work, "lower.erofs")
    subprocess.run(["mkfs.erofs", lower_img, lower], check=True, capture_output=True)

    tar_path = os.path.join(work, "upper.tar")
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data=b"", mode=0o644, kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.mtime = kind, mode, len(data), 1700000000
            tar.addfile(info, None if kind == tarfile.DIRTYPE else io.BytesIO(data))
        for d in ("bin", "data", "etc", "opq"):
            add(d, mode=0o755, kind=tarfile.DIRTYPE)
        add("data/.wh.gone")                      # whiteout: data/gone is deleted
        add("opq/.wh..wh..opq")                   # opaque: the lower opq/ is hidden
        add("opq/new", b"upper\n")
        add("etc/motd", b"upper\n")
        add("bin/armbin", foreign_elf(), 0o755)
        add("bin/garbage", b"\0GARBAGE" + os.urandom(4088), 0o755)
    upper_img = os.path.join(work, "upper.erofs")
    subprocess.run(["mkfs.erofs", "--tar=f", "--aufs", upper_img, tar_path], check=True, capture_output=True)
    return lower_img, upper_img


# ----- agent helpers -----------------------------------------------------------------


def expect_error(reply, name, what):
    check(reply.get("error") == AGENT + name or reply.get("error") == name, f"{what}: {reply}")
    return reply.get("parameters", {})


def start(agent, cid, layers, args, **kw):
    """StartContainer; its ContainerInfo (Failure on an error reply)."""
    process = {"args": args}
    for key in ("env", "cwd", "user"):
        if key in kw:
            process[key] = kw.pop(key)
    return agent.call(AGENT + "StartContainer", {"id": cid, "layers": layers, "process": process, **kw})["container"]


def read_logs(agent, cid, since=None, max_bytes=None):
    params = {"id": cid}
    if since is not None:
        params["since"] = since
    if max_bytes is not None:
        params["maxBytes"] = max_bytes
    return agent.call(AGENT + "ContainerLogs", params)


def text_of(logs, stream="stdout"):
    return "".join(e["text"] for e in logs["entries"] if e["stream"] == stream)


def wait_for_output(agent, cid, needle, timeout=30.0):
    """All of the container's output once `needle` is in its stdout."""
    def seen():
        logs = read_logs(agent, cid)
        return logs if needle in text_of(logs) else None
    logs = wait_until(seen, timeout, interval=0.02)
    check(logs, f"{cid}: {needle!r} never in its output: {read_logs(agent, cid)}")
    return logs


def in_container(agent, cid, script, **kw):
    return agent.call(AGENT + "Exec", {"argv": ["sh", "-c", script], "container": cid, **kw})


def guest_mounts(agent):
    return agent.exec(["cat", "/proc/mounts"])["stdout"]


# ----- the test ----------------------------------------------------------------------


def run(guest, work, procs):
    busybox = static_busybox(guest)
    if not busybox:
        skip("no static busybox (apt-get install busybox-static)")
        return None
    if not shutil.which("mkfs.erofs") or not shutil.which("mkfs.ext4"):
        skip("mkfs.erofs or mkfs.ext4 missing (make deps)")
        return None
    step("image: two erofs layers from busybox-static and a layer tar with whiteouts")
    lower_img, upper_img = build_layers(work, busybox)
    junk = os.path.join(work, "junk.img")
    with open(junk, "wb") as f:
        f.write(b"\0" * (1 << 20))
    upper_disk = os.path.join(work, "upper.ext4")
    with open(upper_disk, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", upper_disk], check=True)
    print(f"    lower.erofs {os.path.getsize(lower_img)} B, upper.erofs {os.path.getsize(upper_img)} B")

    step("boot with a virtio-scsi controller: QEMU launch to first Ping")
    t = time.monotonic()
    vm = subprocess.Popen(microvm_argv(guest, work, "vm", scsi=True), stdin=subprocess.DEVNULL)
    procs.append(vm)
    agent = Agent(f"{work}/vm-agent.sock")
    ping = agent.sync_ping(BOOT_TIMEOUT)
    boot_s = time.monotonic() - t
    print(f"    first Ping after {boot_s:.2f} s (guest uptime {ping['uptimeMs']} ms)")
    qmp = Qmp(f"{work}/vm-qmp.sock")
    r = agent.exec(["sh", "-c", "grep -cE '^(erofs|overlay|virtio_scsi) ' /proc/modules || true"])
    check(r["stdout"].strip() == "0", f"container modules loaded at boot: {r}")

    step("hot-plug both layers, StartContainer, first output (modules loaded on demand)")
    t0 = time.monotonic()
    qmp.add_disk(lower_img, "layer-lower", 0)
    qmp.add_disk(upper_img, "layer-upper", 1)
    script = ("echo pid=$$; id; pwd; echo greeting=$GREETING home=$HOME; hostname; "
              "echo data=$(ls /data) opq=$(ls /opq); cat /etc/motd; echo to-stderr >&2; "
              "grep -c ' /run/kiln\\| erofs ' /proc/self/mountinfo; "
              "grep ' /sys ' /proc/self/mountinfo | grep -q ' ro,' && echo sys-read-only; "
              "test -c /dev/null && echo dev-ok; "
              "echo mine > /home/app/mine; "
              "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.1; done")
    c1 = start(agent, "c1", ["layer-lower", "layer-upper"], ["sh", "-c", script],
               env=["GREETING=hello", "PATH=/bin"], cwd="/home/app", user="app", hostname="box1")
    started_s = time.monotonic() - t0
    check(c1["state"] == "running" and c1["hostname"] == "box1", f"c1: {c1}")
    wait_for_output(agent, "c1", "pid=1")
    first_output_s = time.monotonic() - t0
    logs = wait_for_output(agent, "c1", "ready")
    dmesg = agent.exec(["dmesg"])["stdout"]
    m = re.search(r"modules of /etc/kiln/modules.containers in (\d+) ms", dmesg)
    started = re.search(r"container c1 started .*\((.*)\)", dmesg)
    print(f"    StartContainer returned {started_s:.2f} s after the first blockdev-add, first output "
          f"at {first_output_s:.2f} s; module loading {m.group(1) if m else '?'} ms"
          f"{'; ' + started.group(1) if started else ''}")
    out = text_of(logs)
    check(re.search(rf"uid={APP_UID}\(app\) gid={APP_UID}\(app\) groups=(.*)\n", out) and
          set(re.search(r"groups=(.*)\n", out).group(1).split(",")) == {f"{APP_UID}(app)", f"{STAFF_GID}(staff)"},
          f"c1 user: {out!r}")
    for expected in ["pid=1\n",
                     "/home/app\n", "greeting=hello home=/home/app\n", "box1\n",
                     "data=keep opq=new\n", "upper\n", "\n0\n", "sys-read-only\n", "dev-ok\n"]:
        check(expected in out, f"c1 output lacks {expected!r}: {out!r}")
    check(text_of(logs, "stderr") == "to-stderr\n", f"c1 stderr: {logs}")
    r = agent.exec(["sh", "-c", "grep -cE '^(erofs|overlay|virtio_scsi) ' /proc/modules"])
    check(r["stdout"].strip() == "3", f"modules after StartContainer: {r}")

    step("Exec inside the container: its namespaces, root, cwd, user, env")
    r = in_container(agent, "c1", "echo $$; id -u; id -G; pwd; hostname; cat mine; echo $GREETING $EXTRA; "
                     "test -e /init && echo agent-root || echo own-root; ps -o pid | tail -n +2 | wc -l",
                     env=["EXTRA=more"])
    lines = r["stdout"].split("\n")
    check(r["exitCode"] == 0 and len(lines) == 10 and lines[0] != "1" and int(lines[0]) < 50, f"exec pid: {r}")
    check(lines[1] == str(APP_UID) and set(lines[2].split()) == {str(APP_UID), str(STAFF_GID)}, f"exec ids: {r}")
    check(lines[3:8] == ["/home/app", "box1", "mine", "hello more", "own-root"], f"exec: {r}")
    check(int(lines[8]) < 10, f"the container's ps sees more than its own processes: {r}")
    r = agent.request(AGENT + "Exec", {"argv": ["/bin/garbage"], "container": "c1"})
    check(expect_error(r, "ExecFormatError", "exec garbage")["program"] == "/bin/garbage", f"{r}")
    r = agent.request(AGENT + "Exec", {"argv": ["/bin/nope"], "container": "c1"})
    expect_error(r, "ExecFailed", "exec of a missing program")
    r = agent.request(AGENT + "Exec", {"argv": ["true"], "container": "nope"})
    expect_error(r, "NoSuchContainer", "exec in an unknown container")

    step("a second container from the same layer disks does not see the first one's writes")
    t = time.monotonic()
    start(agent, "c2", ["layer-lower", "layer-upper"],
          ["sh", "-c", "ls /home/app; echo c2 > /c2file; echo ready; exec sleep 1000"])
    wait_for_output(agent, "c2", "ready")
    print(f"    second container (disks present, modules loaded): output after {time.monotonic() - t:.2f} s")
    out = text_of(read_logs(agent, "c2"))
    check("mine" not in out, f"c2 sees c1's write: {out!r}")
    r = in_container(agent, "c1", "test -e /c2file && echo visible || echo invisible")
    check(r["stdout"] == "invisible\n", f"c1 sees c2's write: {r}")
    r = in_container(agent, "c2", "echo $(hostname) $(id -u)")
    check(r["stdout"] == "c2 0\n", f"c2 defaults: {r}")

    step("TooManyContainers at the default limit of 8")
    for i in range(3, 9):
        start(agent, f"c{i}", ["layer-lower"], ["sleep", "1000"])
    r = agent.request(AGENT + "StartContainer", {"id": "c9", "layers": ["layer-lower"],
                                                 "process": {"args": ["true"]}})
    check(expect_error(r, "TooManyContainers", "ninth container")["max"] == 8, f"{r}")
    r = agent.request(AGENT + "StartContainer", {"id": "c1", "layers": ["layer-lower"],
                                                 "process": {"args": ["true"]}})
    expect_error(r, "ContainerExists", "duplicate id")
    listed = agent.call(AGENT + "ListContainers")["containers"]
    check([c["id"] for c in listed] == [f"c{i}" for i in range(1, 9)], f"list: {listed}")
    t = time.monotonic()
    for i in range(3, 9):
        r = agent.call(AGENT + "StopContainer", {"id": f"c{i}", "timeoutMs": 200})
        check(r["killed"] and r["container"]["signal"] == 9, f"stop c{i} (PID 1 ignores SIGTERM): {r}")
        check(agent.call(AGENT + "RemoveContainer", {"id": f"c{i}"})["result"] == "removed", f"remove c{i}")
    print(f"    6 stops (SIGTERM ignored, SIGKILL after 200 ms) and removes in {time.monotonic() - t:.2f} s")

    step("ContainerLogs followed by cursor to the end")
    start(agent, "chatty", ["layer-lower"],
          ["sh", "-c", "for i in $(seq 1 300); do echo line $i; done; echo done >&2; echo é€"])
    expected = "".join(f"line {i}\n" for i in range(1, 301)) + "é€\n"
    cursor, stdout, stderr, polls = None, "", "", 0
    deadline = time.monotonic() + 60
    while True:
        check(time.monotonic() < deadline, f"logs never ended: {stdout[-200:]!r}")
        logs = read_logs(agent, "chatty", since=cursor, max_bytes=257)
        polls += 1
        check(logs["dropped"] == 0, f"dropped: {logs}")
        stdout += text_of(logs)
        stderr += text_of(logs, "stderr")
        cursor = logs["cursor"]
        if logs["ended"]:
            break
        if not logs["entries"]:
            time.sleep(0.02)
    check(stdout == expected and stderr == "done\n", f"followed logs: {stdout[-100:]!r} {stderr!r}")
    check("\ufffd" not in stdout, "a character was cut in two")
    status = agent.call(AGENT + "ContainerStatus", {"id": "chatty"})["container"]
    check(status["state"] == "exited" and status["exitCode"] == 0, f"chatty: {status}")
    print(f"    {cursor} bytes in {polls} polls of at most 257 bytes")
    agent.call(AGENT + "RemoveContainer", {"id": "chatty"})

    step("errors: ExecFormatError, missing program, bad process specs, unknown ids")
    for program in ("/bin/armbin", "/bin/garbage"):
        t = time.monotonic()
        r = agent.request(AGENT + "StartContainer", {"id": "bad", "layers": ["layer-lower", "layer-upper"],
                                                     "process": {"args": [program]}})
        check(expect_error(r, "ExecFormatError", program)["program"] == program, f"{r}")
        check(time.monotonic() - t < 30, f"{program} took {time.monotonic() - t:.1f} s")
    r = agent.request(AGENT + "StartContainer", {"id": "bad", "layers": ["layer-lower"],
                                                 "process": {"args": ["no-such-program"]}})
    check("no-such-program" in expect_error(r, "ContainerStartFailed", "missing program")["message"], f"{r}")
    for process, field in [({"args": []}, "args"), ({"args": ["sh"], "cwd": "tmp"}, "cwd"),
                           ({"args": ["sh"], "env": ["NOEQUALS"]}, "env"),
                           ({"args": ["sh"], "user": "ghost"}, "user")]:
        r = agent.request(AGENT + "StartContainer", {"id": "bad", "layers": ["layer-lower"], "process": process})
        check(expect_error(r, "InvalidProcessSpec", f"process {process}")["field"] == field, f"{r}")
    r = agent.request(AGENT + "StartContainer", {"id": "../x", "layers": ["layer-lower"],
                                                 "process": {"args": ["sh"]}})
    check(r.get("parameters") == {"parameter": "id"}, f"bad id: {r}")
    r = agent.request(AGENT + "ContainerStatus", {"id": "bad"})
    expect_error(r, "NoSuchContainer", "failed starts leave no container")
    mounts = guest_mounts(agent)
    check(mounts.count(" erofs ") == 4 and mounts.count(" overlay ") == 2,
          f"failed starts left mounts behind (c1 and c2 hold 2 erofs + 1 overlay each): {mounts}")

    step("a disk that never appears, a disk that is not erofs")
    t = time.monotonic()
    r = agent.request(AGENT + "StartContainer", {"id": "bad", "layers": ["layer-lower", "never-there"],
                                                 "process": {"args": ["sh"]}, "diskTimeoutMs": 1500})
    waited = time.monotonic() - t
    check(expect_error(r, "DiskNotFound", "missing disk")["serial"] == "never-there", f"{r}")
    check(1.4 < waited < 10, f"DiskNotFound after {waited:.2f} s")
    print(f"    DiskNotFound after {waited:.2f} s (diskTimeoutMs 1500)")
    qmp.add_disk(junk, "junk", 2)
    r = agent.request(AGENT + "StartContainer", {"id": "bad", "layers": ["junk"], "process": {"args": ["sh"]}})
    check(expect_error(r, "NotErofs", "zeros")["serial"] == "junk", f"{r}")
    qmp.remove_disk("junk")

    step("an ext4 upper disk keeps a container's writes for the next one")
    t = time.monotonic()
    qmp.add_writable_disk(upper_disk, "upper-disk", 3)
    start(agent, "w1", ["layer-lower", "layer-upper"], ["sh", "-c", "echo kept > /persist; echo ready"],
          upperDisk="upper-disk")
    wait_for_output(agent, "w1", "ready")
    print(f"    hot-plug of the upper disk to output: {time.monotonic() - t:.2f} s")
    check(agent.call(AGENT + "ContainerStatus", {"id": "w1"})["container"]["upperDisk"] == "upper-disk", "w1")
    agent.call(AGENT + "RemoveContainer", {"id": "w1"})
    start(agent, "w2", ["layer-lower", "layer-upper"], ["sh", "-c", "cat /persist; ls /data"],
          upperDisk="upper-disk")
    logs = wait_for_output(agent, "w2", "keep\n")
    check(text_of(logs) == "kept\nkeep\n", f"w2: {logs}")
    agent.call(AGENT + "RemoveContainer", {"id": "w2"})
    qmp.remove_disk("upper-disk")

    step("StopContainer: a handled SIGTERM; Exec into an exited container")
    t = time.monotonic()
    r = agent.call(AGENT + "StopContainer", {"id": "c1"})
    check(not r["killed"] and r["container"]["state"] == "exited" and r["container"]["exitCode"] == 7,
          f"stop c1: {r}")
    check(time.monotonic() - t < 10, "the handled SIGTERM took too long")
    logs = wait_until(lambda: (lambda l: l if l["ended"] else None)(read_logs(agent, "c1")), 10)
    check(logs and "bye\n" in text_of(logs), f"c1 logs after stop: {logs}")
    r = agent.request(AGENT + "Exec", {"argv": ["true"], "container": "c1"})
    expect_error(r, "ContainerNotRunning", "exec into an exited container")
    r = agent.call(AGENT + "StopContainer", {"id": "c1"})
    check(not r["killed"] and r["container"]["exitCode"] == 7, f"second stop: {r}")

    step("snapshot with a running container, restored into a clone with the same disks")
    qmp.cmd("stop")
    qmp.cmd("migrate", uri=f"file:{work}/state")
    check(wait_until(lambda: qmp.cmd("query-migrate").get("status") == "completed", 60), "migration")
    t = time.monotonic()
    clone_argv = microvm_argv(guest, work, "clone", scsi=True, incoming=f"file:{work}/state")
    for lun, (path, serial) in enumerate([(lower_img, "layer-lower"), (upper_img, "layer-upper")]):
        clone_argv += ["-blockdev", f"driver=raw,node-name=node-{serial},read-only=on,"
                                    f"file.driver=file,file.filename={path},file.read-only=on",
                       "-device", f"scsi-hd,bus=scsi0.0,scsi-id=0,lun={lun},serial={serial},"
                                  f"drive=node-{serial},id=disk-{serial}"]
    clone = subprocess.Popen(clone_argv, stdin=subprocess.DEVNULL)
    procs.append(clone)
    cqmp = Qmp(f"{work}/clone-qmp.sock")
    check(wait_until(lambda: cqmp.cmd("query-status")["status"] != "inmigrate", 60), "clone restore")
    cqmp.cmd("cont")
    cagent = Agent(f"{work}/clone-agent.sock")
    cagent.sync_ping()
    r = in_container(cagent, "c2", "cat /c2file; ls /data")
    check(r["stdout"] == "c2\nkeep\n", f"exec in the clone's container: {r}")
    status = cagent.call(AGENT + "ContainerStatus", {"id": "c2"})["container"]
    check(status["state"] == "running", f"c2 in the clone: {status}")
    print(f"    clone: Exec in its container answered {time.monotonic() - t:.2f} s after QEMU launch")
    cagent.call(AGENT + "Shutdown")
    cagent.close()
    check(clone.wait(60) == 0, "clone QEMU did not exit cleanly")
    qmp.cmd("cont")
    agent.close()
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sync_ping()

    step("RemoveContainer unmounts; the disks then unplug")
    for cid in ("c1", "c2"):
        check(agent.call(AGENT + "RemoveContainer", {"id": cid})["result"] == "removed", cid)
    check(agent.call(AGENT + "RemoveContainer", {"id": "c1"})["result"] == "alreadyGone", "second remove")
    mounts = guest_mounts(agent)
    check(" erofs " not in mounts and " overlay " not in mounts and "/run/kiln" not in mounts,
          f"mounts left: {mounts}")
    check(agent.call(AGENT + "ListContainers")["containers"] == [], "containers left")
    for serial in ("layer-lower", "layer-upper"):
        qmp.remove_disk(serial)
    gone = wait_until(lambda: agent.exec(["ls", "/sys/block"])["stdout"].strip() == "", 10)
    check(gone, f"disks still in the guest: {agent.exec(['ls', '/sys/block'])}")
    r = agent.exec(["sh", "-c", "ps -o stat | grep -c '^Z' || true"])
    check(r["stdout"].strip() == "0", f"zombies: {r}")
    check(agent.sync_ping()["bootId"] == ping["bootId"], "the guest rebooted")

    step("Shutdown")
    agent.call(AGENT + "Shutdown")
    agent.close()
    check(vm.wait(60) == 0, f"QEMU exit status {vm.returncode}")
    return boot_s, first_output_s


def main():
    guest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target", "guest"))
    for f in ("vmlinuz", "initramfs"):
        if not os.path.exists(os.path.join(guest, f)):
            sys.exit(f"container-smoke: {guest}/{f} missing; run guest/build-image.sh {guest}")
    work = tempfile.mkdtemp(prefix="kiln-containers-")
    procs = []
    try:
        result = run(guest, work, procs)
        if result:
            boot_s, first_output_s = result
            print(f"container-smoke: PASS (boot to first Ping {boot_s:.2f} s, "
                  f"hot-plug to first container output {first_output_s:.2f} s)")
    except Failure as e:
        print(f"container-smoke: FAIL: {e}", file=sys.stderr)
        print_console_tails(work)
        sys.exit(1)
    finally:
        kill_all(procs)
        remove_work("container-smoke", work)


if __name__ == "__main__":
    main()
