"""What Kiln's Python tests share, once: the clients of the three wire
protocols the tests speak, waits on a condition, CI-aware skips, and the
guest smoke tests' QEMU command line and clean-up.

  VarlinkConnection  varlink on a unix socket (NUL-framed JSON, calls in
                     order): kilnd's io.kiln.Manager, any varlink service;
  Agent              the guest agent's io.kiln.Agent on a VM's chardev
                     socket (a varlink service, with the nonce resync kilnd
                     uses); agent_ping for one timed Ping;
  Qmp                QEMU's monitor: greeting, capabilities, commands,
                     events skipped; read-only disks hot-plugged into a
                     virtio-scsi controller and unplugged again.

Used by guest/tests/*.py, tests/bench/*.py and tests/system/run.py, which
put this directory on sys.path relative to their own file:

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../lib"))
    from kiln_testlib import Agent, Failure, check
"""

import glob
import json
import os
import shutil
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QEMU = os.environ.get("KILN_QEMU", "qemu-system-x86_64")
# How long an agent call may take by default (a guest under TCG on a
# loaded 2-core machine is slow).
AGENT_CALL_TIMEOUT = 60.0


class Failure(Exception):
    """A check that failed, or a peer that did not answer as it must."""


def check(cond, what):
    """Raise Failure(what) unless `cond`."""
    if not cond:
        raise Failure(what)


# ----- waiting and skipping ---------------------------------------------------


def wait_until(condition, timeout, interval=0.05):
    """Call `condition()` until it returns something truthy or `timeout`
    seconds pass; return its last result (falsy on a timeout), so the
    caller checks it with its own message. Waits on the evidence instead of
    sleeping a fixed time (Cloud Hypervisor's test_infra wait_until)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def in_ci():
    """Whether the suite runs in CI: `CI` set and not empty (.ci/run)."""
    return bool(os.environ.get("CI"))


def skip(why):
    """Something cannot run here, for `why`: print SKIPPED locally; in CI,
    which runs as root with every tool `make deps` installs, raise Failure
    instead. Missing hardware (a host render node) is no reason to fail:
    print that skip without this."""
    check(not in_ci(), f"{why} (CI is set, and CI must run every test)")
    print(f"    SKIPPED: {why}", flush=True)


# ----- sockets and protocols ---------------------------------------------------


def connect_unix(path, timeout=10.0, pause=0.005):
    """Connect to a socket a process is about to create (it may not listen
    yet), retrying every `pause` seconds for `timeout` seconds."""
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
            time.sleep(pause)


class VarlinkError(Failure):
    """A varlink error reply; `name` is the error's name, `parameters` its
    parameters."""

    def __init__(self, method, reply):
        super().__init__(f"{method}: {reply}")
        self.name = reply.get("error", "")
        self.parameters = reply.get("parameters", {})


class VarlinkConnection:
    """A varlink client on one unix socket: NUL-framed JSON, one call at a
    time. A method without an interface is kilnd's (`io.kiln.Manager.`).

    `timeout` (seconds, None = none) bounds each reply unless a call says
    otherwise; `connect_timeout` and `pause` how the socket is waited for.
    """

    def __init__(self, path, timeout=None, connect_timeout=10.0, pause=0.005):
        self.sock = connect_unix(path, connect_timeout, pause)
        self.buf = b""
        self.timeout = timeout

    def close(self):
        self.sock.close()

    def send(self, method, parameters=None, **extra):
        """Send a call without waiting for its reply (`extra`: e.g. more=True)."""
        msg = {"method": method}
        if parameters is not None:
            msg["parameters"] = parameters
        msg.update(extra)
        self.sock.sendall(json.dumps(msg).encode() + b"\0")

    def recv(self, timeout=None):
        """The next reply as sent, error replies included."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\0" not in self.buf:
            if deadline is None:
                self.sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure("timed out waiting for a varlink reply")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise Failure("the varlink peer closed the connection")
            self.buf += chunk
        frame, self.buf = self.buf.split(b"\0", 1)
        return json.loads(frame)

    def request(self, method, parameters=None, timeout=None):
        """Call `method` and return its reply as sent (errors included)."""
        self.send(method, parameters)
        return self.recv(timeout)

    def call(self, method, parameters=None, timeout=None):
        """Call `method`; its reply's parameters, or VarlinkError."""
        if "." not in method:
            method = f"io.kiln.Manager.{method}"
        reply = self.request(method, {} if parameters is None else parameters, timeout)
        if "error" in reply:
            raise VarlinkError(method, reply)
        return reply.get("parameters", {})


class Agent(VarlinkConnection):
    """The guest agent (io.kiln.Agent) on a VM's chardev socket."""

    def __init__(self, path, timeout=AGENT_CALL_TIMEOUT, connect_timeout=10.0, pause=0.005):
        super().__init__(path, timeout, connect_timeout, pause)
        self.nonce = int(time.time() * 1000) % 1_000_000 * 1000

    def sync_ping(self, timeout=AGENT_CALL_TIMEOUT):
        """Ping with a fresh nonce, skipping stale replies (how kilnd syncs)."""
        return self.sync_ping_then([], timeout)[0]

    def sync_ping_then(self, calls, timeout=AGENT_CALL_TIMEOUT):
        """sync_ping with `calls` ((method, parameters), ...) in the same
        write, behind the Ping, as kilnd sends a clone's SetIdentity and
        ConfigureNetwork. Returns the Ping's parameters, the monotonic time
        its reply came, and each call's (parameters, time its reply came);
        VarlinkError for the first that fails."""
        self.nonce += 1
        nonce = self.nonce
        frames = [{"method": "io.kiln.Agent.Ping", "parameters": {"nonce": nonce}}]
        frames += [{"method": m, "parameters": p} for m, p in calls]
        # A lone NUL first ends any partial frame left by an earlier client.
        self.sock.sendall(b"\0" + b"".join(json.dumps(f).encode() + b"\0" for f in frames))
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.1, deadline - time.monotonic()))
            if reply.get("parameters", {}).get("nonce") == nonce:
                ping, ping_time = reply["parameters"], time.monotonic()
                break
        replies = []
        for method, _ in calls:
            reply = self.recv(max(0.1, deadline - time.monotonic()))
            if "error" in reply:
                raise VarlinkError(method, reply)
            replies.append((reply.get("parameters", {}), time.monotonic()))
        return ping, ping_time, replies

    def exec(self, argv, **kw):
        """io.kiln.Agent.Exec of `argv` (`kw`: stdin, env, timeoutMs, ...)."""
        return self.call("io.kiln.Agent.Exec", {"argv": argv, **kw})


def agent_ping(path, deadline, pause=0.002):
    """Connect to a VM's agent socket as soon as it exists and return the
    first Ping reply; Failure if that takes past `deadline` (monotonic)."""
    agent = Agent(path, connect_timeout=max(0.0, deadline - time.monotonic()), pause=pause)
    try:
        return agent.request("io.kiln.Agent.Ping", {"nonce": 1},
                             timeout=max(0.1, deadline - time.monotonic()))
    finally:
        agent.close()


class Qmp:
    """QMP on a unix socket: capabilities negotiated, events skipped."""

    def __init__(self, path, timeout=10.0, pause=0.005):
        self.sock = connect_unix(path, timeout, pause)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise Failure("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, name, **args):
        """Execute `name` with `args`; the reply as sent (errors included)."""
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        return self._read()

    def cmd(self, name, **args):
        """Execute `name` with `args`; its return value, or Failure."""
        reply = self.execute(name, **args)
        check("error" not in reply, f"QMP {name}: {reply}")
        return reply.get("return")

    def add_disk(self, path, serial, lun, bus="scsi0.0"):
        """Hot-plug the file `path` read-only as a scsi-hd with `serial` at
        `lun` (target 0) of the virtio-scsi controller `bus` (see
        SCSI_DEVICE); the device and node are both named after `serial`."""
        self.cmd("blockdev-add", **{"driver": "raw", "node-name": f"node-{serial}", "read-only": True,
                                    "file": {"driver": "file", "filename": path, "read-only": True}})
        self.cmd("device_add", **{"driver": "scsi-hd", "bus": bus, "scsi-id": 0, "lun": lun,
                                  "serial": serial, "drive": f"node-{serial}", "id": f"disk-{serial}"})

    def add_writable_disk(self, path, serial, lun, bus="scsi0.0"):
        """Like add_disk, but the guest may write to it."""
        self.cmd("blockdev-add", **{"driver": "raw", "node-name": f"node-{serial}",
                                    "file": {"driver": "file", "filename": path}})
        self.cmd("device_add", **{"driver": "scsi-hd", "bus": bus, "scsi-id": 0, "lun": lun,
                                  "serial": serial, "drive": f"node-{serial}", "id": f"disk-{serial}"})

    def remove_disk(self, serial, timeout=30.0):
        """Unplug a disk add_disk plugged: device_del, then blockdev-del
        once QEMU has let go of the node (device_del completes
        asynchronously)."""
        self.cmd("device_del", id=f"disk-{serial}")
        done = wait_until(lambda: "error" not in self.execute("blockdev-del", **{"node-name": f"node-{serial}"}),
                          timeout)
        check(done, f"QEMU kept the block node of disk {serial}")

    def close(self):
        self.sock.close()


# ----- processes ----------------------------------------------------------------


def find_child(pid, comm):
    """The first child of `pid` whose command name is `comm`, or None (how
    the nspawn tests find a container's systemd)."""
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/comm") as f:
                    if f.read().strip() == comm:
                        return child
            except OSError:
                pass
    return None


# ----- guest smoke tests ----------------------------------------------------------


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
    # tsc=reliable keeps the guest's clocksource watchdog from dropping the
    # (host's, invariant) TSC for jiffies on a loaded host (engine/src/
    # accel.rs has the measurement).
    append = "console=ttyS0 quiet panic=-1"
    khz = host_tsc_khz()
    return f"{append} tsc_early_khz={khz} tsc=reliable" if khz else append


def microvm_machine(append):
    """kilnd's -M for a microvm under TCG: with a TSC hint on the command
    line the guest needs no PIT or PIC, and without them QEMU's main loop
    stays asleep in an idle guest (engine/src/qemu/argv.rs)."""
    if "tsc_early_khz=" in append:
        return "microvm,acpi=on,pit=off,pic=off"
    return "microvm,acpi=on"


# The guest kernel command line (KILN_SMOKE_APPEND overrides it).
APPEND = os.environ.get("KILN_SMOKE_APPEND") or default_append()


# The controller disks are hot-plugged into on microvm (virtio-mmio); on
# q35 it is virtio-scsi-pci. Its bus is "scsi0.0".
SCSI_DEVICE = ["-device", "virtio-scsi-device,id=scsi0"]


def microvm_argv(guest, work, name, no_reboot=True, incoming=None, scsi=False):
    """The command line kilnd uses for a plain microvm pool VM, with its
    console, agent and QMP sockets as WORK/NAME-*; `scsi` adds the
    virtio-scsi controller (SCSI_DEVICE) for image disks."""
    argv = [
        QEMU,
        "-M", microvm_machine(APPEND),
        "-accel", "tcg,tb-size=64",
        "-cpu", "max",
        "-m", "128",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic",
        "-kernel", os.path.join(guest, "vmlinuz"),
        "-initrd", os.path.join(guest, "initramfs"),
        "-append", APPEND,
        "-serial", f"file:{work}/{name}-console.log",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={work}/{name}-agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=io.kiln.agent.0",
        "-qmp", f"unix:{work}/{name}-qmp.sock,server=on,wait=off",
    ]
    if scsi:
        argv += SCSI_DEVICE
    if no_reboot:
        argv.append("-no-reboot")
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def step(name):
    print(f"--- {name}", flush=True)


def print_console_tails(work, lines=30):
    """After a failure: the end of every VM console log in `work`, to stderr."""
    for log in sorted(os.listdir(work)):
        if log.endswith("console.log"):
            print(f"--- {log} (last {lines} lines)", file=sys.stderr)
            with open(os.path.join(work, log), errors="replace") as f:
                print("".join(f.readlines()[-lines:]), file=sys.stderr)


def kill_all(procs):
    """SIGKILL and reap every process a smoke test started that still runs."""
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
