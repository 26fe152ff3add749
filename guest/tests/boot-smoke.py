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
tsc_early_khz=<host TSC kHz>, see default_append), KILN_SMOKE_KEEP=1 keeps
the work directory. Exits non-zero on the first failure; QEMU
processes and the work directory are always cleaned up.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QEMU = os.environ.get("KILN_QEMU", "qemu-system-x86_64")
BOOT_TIMEOUT = 120.0
CALL_TIMEOUT = 60.0


def host_tsc_khz():
    """Host TSC frequency, which is also the guest's under TCG, from
    /proc/cpuinfo (good enough where the CPU has a constant, known TSC)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
    mhz = next((l.split(":")[1] for l in info.splitlines() if l.startswith("cpu MHz")), None)
    if mhz is None or "constant_tsc" not in flags.split():
        return None
    return round(float(mhz) * 1000)


def default_append():
    # Without tsc_early_khz a loaded host often makes the guest's PIT-based
    # TSC calibration fail under TCG; the kernel then spins forever in
    # calibrate_delay() (microvm has no HPET/PM timer to fall back on).
    append = "console=ttyS0 quiet panic=-1"
    khz = host_tsc_khz()
    return f"{append} tsc_early_khz={khz}" if khz else append


APPEND = os.environ.get("KILN_SMOKE_APPEND") or default_append()


def qemu_argv(guest, work, name, no_reboot=True, incoming=None):
    """The command line kilnd uses for a plain microvm pool VM."""
    argv = [
        QEMU,
        "-M", "microvm,acpi=on",
        "-accel", "tcg,tb-size=64",
        "-cpu", "max",
        "-m", "128",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic",
        "-kernel", os.path.join(guest, "vmlinuz"),
        "-initrd", os.path.join(guest, "initramfs"),
        "-append", APPEND,
        "-serial", f"file:{work}/{name}-console.log",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={work}/{name}-agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=io.kiln.agent.0",
        "-qmp", f"unix:{work}/{name}-qmp.sock,server=on,wait=off",
    ]
    if no_reboot:
        argv.append("-no-reboot")
    if incoming:
        argv += ["-incoming", incoming]
    return argv


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def connect_unix(path, timeout=10.0):
    """Connects to a socket QEMU is about to create (it may not listen yet)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise Failure(f"cannot connect to {path}")
            time.sleep(0.005)


class Agent:
    """A varlink client on the agent's chardev socket."""

    def __init__(self, path):
        self.sock = connect_unix(path)
        self.buf = b""
        self.nonce = int(time.time() * 1000) % 1_000_000 * 1000

    def close(self):
        self.sock.close()

    def send(self, method, parameters=None, **extra):
        msg = {"method": method}
        if parameters is not None:
            msg["parameters"] = parameters
        msg.update(extra)
        self.sock.sendall(json.dumps(msg).encode() + b"\0")

    def recv(self, timeout=CALL_TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure("timed out waiting for a reply")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise Failure("agent socket closed")
            self.buf += chunk
        frame, self.buf = self.buf.split(b"\0", 1)
        return json.loads(frame)

    def call(self, method, parameters=None, timeout=CALL_TIMEOUT):
        self.send(method, parameters)
        return self.recv(timeout)

    def ok(self, method, parameters=None, timeout=CALL_TIMEOUT):
        reply = self.call(method, parameters, timeout)
        check("error" not in reply, f"{method} failed: {reply}")
        return reply.get("parameters", {})

    def sync_ping(self, timeout=CALL_TIMEOUT):
        """Ping with a fresh nonce, skipping stale replies (how kilnd syncs)."""
        self.nonce += 1
        nonce = self.nonce
        # A lone NUL first ends any partial frame left by an earlier client.
        self.sock.sendall(b"\0")
        self.send("io.kiln.Agent.Ping", {"nonce": nonce})
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.1, deadline - time.monotonic()))
            if reply.get("parameters", {}).get("nonce") == nonce:
                return reply["parameters"]

    def exec(self, argv, **kw):
        return self.ok("io.kiln.Agent.Exec", {"argv": argv, **kw})


class Qmp:
    def __init__(self, path):
        self.sock = connect_unix(path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise Failure("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        check("error" not in reply, f"QMP {name}: {reply}")
        return reply.get("return")

    def close(self):
        self.sock.close()


def print_console_tails(work, lines=30):
    """After a failure: the end of every VM console log in `work`, to stderr."""
    for log in sorted(os.listdir(work)):
        if log.endswith("console.log"):
            print(f"--- {log} (last {lines} lines)", file=sys.stderr)
            with open(os.path.join(work, log), errors="replace") as f:
                print("".join(f.readlines()[-lines:]), file=sys.stderr)


def kill_all(procs):
    """SIGKILL and reap every QEMU a smoke test started that still runs."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def remove_work(test, work):
    """Remove a smoke test's work dir, unless KILN_SMOKE_KEEP asks to keep it."""
    if os.environ.get("KILN_SMOKE_KEEP"):
        print(f"{test}: kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def step(name):
    print(f"--- {name}", flush=True)


def run(guest, work, procs):
    release = open(os.path.join(guest, "kernel-release")).read().strip()

    print(f"    kernel command line: {APPEND}")
    step("boot: QEMU launch to first Ping reply")
    t0 = time.monotonic()
    vm = subprocess.Popen(qemu_argv(guest, work, "vm", no_reboot=False), stdin=subprocess.DEVNULL)
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
    time.sleep(0.5)
    agent.ok("io.kiln.Agent.Ping", {})
    r = agent.exec(["ps", "-o", "pid,stat,args"])
    check("sleep 1000" in r["stdout"], f"background process gone: {r['stdout']}")
    zombies = [l for l in r["stdout"].splitlines()[1:] if l.split()[1].startswith("Z")]
    check(not zombies, f"zombies: {zombies}")

    step("errors: ExecFailed, MethodNotFound, InvalidParameter")
    r = agent.call("io.kiln.Agent.Exec", {"argv": ["/no/such/program"]})
    check(r.get("error") == "io.kiln.Agent.ExecFailed" and r["parameters"]["message"], f"{r}")
    r = agent.call("io.kiln.Agent.Fly", {})
    check(r == {"error": "org.varlink.service.MethodNotFound",
                "parameters": {"method": "io.kiln.Agent.Fly"}}, f"{r}")
    r = agent.call("io.kiln.Agent.Exec", {"argv": "uname"})
    check(r == {"error": "org.varlink.service.InvalidParameter",
                "parameters": {"parameter": "argv"}}, f"{r}")
    r = agent.call("io.kiln.Agent.Exec", {"argv": ["true"], "timeoutMs": "x"})
    check(r.get("parameters") == {"parameter": "timeoutMs"}, f"{r}")

    step("introspection: GetInfo, GetInterfaceDescription")
    info = agent.ok("org.varlink.service.GetInfo")
    check("io.kiln.Agent" in info["interfaces"], f"{info}")
    desc = agent.ok("org.varlink.service.GetInterfaceDescription", {"interface": "io.kiln.Agent"})
    idl = open(os.path.join(REPO, "guest", "io.kiln.Agent.varlink")).read()
    check(desc["description"] == idl, "served IDL differs from guest/io.kiln.Agent.varlink")
    if shutil.which("varlinkctl"):
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
    r = agent.call("io.kiln.Agent.SetIdentity", {"machineId": "NOT-HEX"})
    check(r.get("parameters") == {"parameter": "machineId"}, f"{r}")
    before = agent.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])["stdout"]
    agent.ok("io.kiln.Agent.SetIdentity", {
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
        r = agent.call("io.kiln.Agent.Ping", {"nonce": i}, timeout=10)
        check(r.get("parameters", {}).get("nonce") == i, f"quick reconnect {i}: {r}")
        agent.close()
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
    clone = subprocess.Popen(qemu_argv(guest, work, "clone", incoming=f"file:{work}/state"),
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
    cagent.ok("io.kiln.Agent.Shutdown")
    cagent.close()
    check(clone.wait(60) == 0, "clone QEMU did not exit cleanly")
    qmp.cmd("cont")
    agent.close()
    agent = Agent(f"{work}/vm-agent.sock")
    agent.sync_ping()

    step("Reboot: boot id changes")
    agent.ok("io.kiln.Agent.Reboot")
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
    agent.ok("io.kiln.Agent.Shutdown")
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
