#!/usr/bin/env python3
"""Boot smoke test of the Kiln guest image under real QEMU (TCG).

Boots OUTDIR/vmlinuz + OUTDIR/initramfs on `-M microvm,acpi=on` with the
agent's virtio-serial port on a unix socket, exactly as kilnd does, and
checks io.kiln.Agent end to end: Ping, Exec (exit codes, stderr, stdin,
env, timeout, output cap, background processes, zombie reaping), error
replies, varlink introspection, SetIdentity (hostname, machine id,
entropy), host disconnect/reconnect (also mid-frame), a snapshot restored
into a second QEMU (clone), Reboot (boot id changes) and Shutdown (QEMU
exits).

  guest/tests/boot-smoke.py [OUTDIR]      (default: target/guest)

Options via environment: KILN_QEMU (qemu-system-x86_64), KILN_SMOKE_APPEND
(kernel command line; default "console=ttyS0 quiet panic=-1" plus
tsc_early_khz=<host TSC kHz>, see tests/lib/kiln_testlib.py), KILN_SMOKE_KEEP=1 keeps
the work directory. Exits non-zero on the first failure; QEMU
processes and the work directory are always cleaned up.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/lib"))
from kiln_testlib import (APPEND, REPO, Agent, Failure, Qmp, check, kill_all, microvm_argv,  # noqa: E402
                          print_console_tails, remove_work, skip, step, wait_until)

BOOT_TIMEOUT = 120.0


def run(guest, work, procs):
    release = open(os.path.join(guest, "kernel-release")).read().strip()

    print(f"    kernel command line: {APPEND}")
    step("boot: QEMU launch to first Ping reply")
    t0 = time.monotonic()
    vm = subprocess.Popen(microvm_argv(guest, work, "vm", no_reboot=False), stdin=subprocess.DEVNULL)
    procs.append(vm)
    agent = Agent(f"{work}/vm-agent.sock")
    ping = agent.sync_ping(BOOT_TIMEOUT)
    boot_s = time.monotonic() - t0
    print(f"    first Ping reply after {boot_s:.2f} s (guest uptime {ping['uptimeMs']} ms)")
    check(ping["kernelRelease"] == release, f"kernel release {ping['kernelRelease']} != {release}")
    check(ping["hostname"] == "kiln", f"hostname {ping['hostname']}")
    check(len(ping["bootId"]) == 36, f"boot id {ping['bootId']}")
    boot_id = ping["bootId"]

    step("Exec: uname -r, exit code, stderr, stdin, env")
    r = agent.exec(["uname", "-r"])
    check(r["exitCode"] == 0 and r["stdout"].strip() == release, f"uname: {r}")
    r = agent.exec(["sh", "-c", "echo err >&2; exit 3"])
    check(r["exitCode"] == 3 and r["stderr"] == "err\n" and r["stdout"] == "", f"exit 3: {r}")
    check(not r["timedOut"] and "signal" not in r, f"exit 3: {r}")
    r = agent.exec(["sh", "-c", "cat; echo \"$GREETING $HOME $PATH\""], stdin="in\n", env=["GREETING=hi"])
    check(r["stdout"] == "in\nhi /root /bin:/sbin:/usr/bin:/usr/sbin\n", f"stdin/env: {r}")
    r = agent.exec(["sh", "-c", "ls -l /proc/$$/fd"])
    check("vport" not in r["stdout"] and "kmsg" not in r["stdout"], f"fd leaked into command: {r}")
    r = agent.exec(["sh", "-c", "head -c 4 /dev/urandom | od -An -tx1; hostname; nc --help 2>&1 | head -n1"])
    check(r["exitCode"] == 0 and "kiln" in r["stdout"], f"busybox applets: {r}")

    step("Exec: timeout, signal, output cap")
    t = time.monotonic()
    r = agent.exec(["sh", "-c", "sleep 30"], timeoutMs=300)
    check(r["timedOut"] and r["signal"] == 9 and r["exitCode"] == 137, f"timeout: {r}")
    check(time.monotonic() - t < 10, "timeout took too long")
    r = agent.exec(["sh", "-c", "kill -TERM $$"])
    check(r["signal"] == 15 and r["exitCode"] == 143, f"signal: {r}")
    r = agent.exec(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo tail >&2"], maxOutputBytes=1000)
    check(len(r["stdout"]) == 1000 and r["stdoutTruncated"] and r["stderr"] == "tail\n", f"cap: {r}")

    step("Exec: background process survives, orphans are reaped")
    r = agent.exec(["sh", "-c", "sleep 1000 & echo started"])
    check(r["stdout"] == "started\n", f"background: {r}")
    agent.exec(["sh", "-c", "sleep 0.2 & exit 0"])

    def processes():
        return agent.exec(["ps", "-o", "pid,stat,args"])["stdout"]

    def zombies(ps):
        return [l for l in ps.splitlines()[1:] if l.split()[1].startswith("Z")]

    def reaped():
        """The process list once the orphaned `sleep 0.2` has exited and
        been reaped (as a zombie it shows as "[sleep]") and no zombie is
        left, else None."""
        ps = processes()
        return ps if "sleep 0.2" not in ps and not zombies(ps) else None

    ps = wait_until(reaped, timeout=10) or processes()
    check("sleep 1000" in ps, f"background process gone: {ps}")
    check(not zombies(ps), f"zombies: {zombies(ps)}")

    step("errors: ExecFailed, MethodNotFound, InvalidParameter")
    r = agent.request("io.kiln.Agent.Exec", {"argv": ["/no/such/program"]})
    check(r.get("error") == "io.kiln.Agent.ExecFailed" and r["parameters"]["message"], f"{r}")
    r = agent.request("io.kiln.Agent.Fly", {})
    check(r == {"error": "org.varlink.service.MethodNotFound",
                "parameters": {"method": "io.kiln.Agent.Fly"}}, f"{r}")
    r = agent.request("io.kiln.Agent.Exec", {"argv": "uname"})
    check(r == {"error": "org.varlink.service.InvalidParameter",
                "parameters": {"parameter": "argv"}}, f"{r}")
    r = agent.request("io.kiln.Agent.Exec", {"argv": ["true"], "timeoutMs": "x"})
    check(r.get("parameters") == {"parameter": "timeoutMs"}, f"{r}")

    step("introspection: GetInfo, GetInterfaceDescription")
    info = agent.call("org.varlink.service.GetInfo")
    check("io.kiln.Agent" in info["interfaces"], f"{info}")
    desc = agent.call("org.varlink.service.GetInterfaceDescription", {"interface": "io.kiln.Agent"})
    idl = open(os.path.join(REPO, "guest", "io.kiln.Agent.varlink")).read()
    check(desc["description"] == idl, "served IDL differs from guest/io.kiln.Agent.varlink")
    if not shutil.which("varlinkctl"):
        skip("varlinkctl against the agent: varlinkctl is missing (make deps)")
    else:
        agent.close()
        out = subprocess.run(["varlinkctl", "call", f"{work}/vm-agent.sock", "io.kiln.Agent.Exec",
                              json.dumps({"argv": ["echo", "via varlinkctl"]})],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode == 0 and "via varlinkctl" in out.stdout, f"varlinkctl: {out}")
        out = subprocess.run(["varlinkctl", "introspect", f"{work}/vm-agent.sock", "io.kiln.Agent"],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode == 0 and "method SetIdentity" in out.stdout, f"varlinkctl: {out}")
        agent = Agent(f"{work}/vm-agent.sock")
        agent.sync_ping()

    step("SetIdentity")
    r = agent.request("io.kiln.Agent.SetIdentity", {"machineId": "NOT-HEX"})
    check(r.get("parameters") == {"parameter": "machineId"}, f"{r}")
    before = agent.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])["stdout"]
    agent.call("io.kiln.Agent.SetIdentity", {
        "hostname": "vm-7",
        "machineId": "0123456789abcdef0123456789abcdef",
        "entropyHex": os.urandom(32).hex(),
    })
    check(agent.sync_ping()["hostname"] == "vm-7", "hostname not set")
    r = agent.exec(["sh", "-c", "hostname; cat /etc/machine-id; cat /etc/hostname"])
    check(r["stdout"] == "vm-7\n0123456789abcdef0123456789abcdef\nvm-7\n", f"{r}")
    after = agent.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])["stdout"]
    check(before != after, "urandom")

    step("host disconnect / reconnect (also in the middle of a frame)")
    agent.close()
    for _ in range(3):
        agent = Agent(f"{work}/vm-agent.sock")
        check(agent.sync_ping()["bootId"] == boot_id, "boot id changed")
        agent.close()
    # Quick reconnects, each sending its call right away: the guest driver
    # may see the data before it learns the host is connected again.
    for i in range(20):
        agent = Agent(f"{work}/vm-agent.sock")
        r = agent.request("io.kiln.Agent.Ping", {"nonce": i}, timeout=10)
        check(r.get("parameters", {}).get("nonce") == i, f"quick reconnect {i}: {r}")
        agent.close()
        # Pacing, not a wait: reconnects at varied short intervals are the test.
        time.sleep((i % 4) * 0.005)
    # A large call (several virtio buffers) on a fresh connection.
    agent = Agent(f"{work}/vm-agent.sock")
    big = "x" * 200_000
    r = agent.exec(["wc", "-c"], stdin=big)
    check(r["stdout"].strip() == str(len(big)), f"large call: {r}")
    agent.close()
    # A host that leaves in the middle of a frame: the agent drops the
    # partial frame once the host stayed away for a second.
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sock.sendall(b'{"method":"io.kiln.Agent.Pi')   # cut short
    # Pacing, not waits: the fragment reaches the guest, then the host
    # stays away past the agent's 1 s limit, which is what is tested.
    time.sleep(0.3)
    agent.close()
    time.sleep(1.5)
    agent = Agent(f"{work}/vm-agent.sock")
    agent.send("io.kiln.Agent.Ping", {"nonce": 77})        # no resync NUL
    r = agent.recv()
    check(r.get("parameters", {}).get("nonce") == 77, f"after a cut frame: {r}")
    # Same, reconnecting at once: the leading NUL of sync_ping ends the
    # stale fragment, whose error reply sync_ping skips.
    agent.sock.sendall(b'{"method":"io.kiln.Agent.Pi')
    agent.close()
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sync_ping()
    # A disconnect while a command runs: its reply is dropped, the agent lives on.
    agent.send("io.kiln.Agent.Exec", {"argv": ["sleep", "1"]})
    agent.close()
    # Pacing: the command must end while no host is connected.
    time.sleep(2)
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sync_ping()

    step("snapshot, restore into a second QEMU (clone), Ping there")
    qmp = Qmp(f"{work}/vm-qmp.sock")
    qmp.cmd("stop")
    qmp.cmd("migrate", uri=f"file:{work}/state")
    deadline = time.monotonic() + 60
    while qmp.cmd("query-migrate").get("status") != "completed":
        check(time.monotonic() < deadline, "migration did not complete")
        time.sleep(0.05)
    t = time.monotonic()
    clone = subprocess.Popen(microvm_argv(guest, work, "clone", incoming=f"file:{work}/state"),
                             stdin=subprocess.DEVNULL)
    procs.append(clone)
    # The source was paused when saved, so the clone comes up paused too.
    cqmp = Qmp(f"{work}/clone-qmp.sock")
    while cqmp.cmd("query-status")["status"] == "inmigrate":
        check(time.monotonic() - t < 60, "clone restore did not complete")
        time.sleep(0.01)
    cqmp.cmd("cont")
    cagent = Agent(f"{work}/clone-agent.sock")
    cping = cagent.sync_ping()
    print(f"    clone answered Ping {time.monotonic() - t:.2f} s after QEMU launch")
    check(cping["bootId"] == boot_id, "clone has another boot id")
    r = cagent.exec(["hostname"])
    check(r["stdout"] == "vm-7\n", f"clone exec: {r}")
    cagent.call("io.kiln.Agent.Shutdown")
    cagent.close()
    check(clone.wait(60) == 0, "clone QEMU did not exit cleanly")
    qmp.cmd("cont")
    agent.close()
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sync_ping()

    step("Reboot: boot id changes")
    agent.call("io.kiln.Agent.Reboot")
    agent.close()
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        check(time.monotonic() < deadline, "no new boot after Reboot")
        agent = Agent(f"{work}/vm-agent.sock")
        try:
            ping = agent.sync_ping(5)
        except Failure:
            agent.close()
            continue
        if ping["bootId"] != boot_id:
            break
        agent.close()
        time.sleep(0.2)
    check(ping["hostname"] == "kiln", "hostname after reboot")

    step("Shutdown: QEMU exits")
    agent.call("io.kiln.Agent.Shutdown")
    agent.close()
    check(vm.wait(60) == 0, f"QEMU exit status {vm.returncode}")
    return boot_s


def main():
    guest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target", "guest"))
    for f in ("vmlinuz", "initramfs", "kernel-release"):
        if not os.path.exists(os.path.join(guest, f)):
            sys.exit(f"boot-smoke: {guest}/{f} missing; run guest/build-image.sh {guest}")
    work = tempfile.mkdtemp(prefix="kiln-smoke-")
    procs = []
    try:
        boot_s = run(guest, work, procs)
        print(f"boot-smoke: PASS (boot to first Ping {boot_s:.2f} s)")
    except Failure as e:
        print(f"boot-smoke: FAIL: {e}", file=sys.stderr)
        print_console_tails(work)
        sys.exit(1)
    finally:
        kill_all(procs)
        remove_work("boot-smoke", work)


if __name__ == "__main__":
    main()
