"""Fixtures the benchmark scenarios share.

A release kilnd in a temp dir with a private dbus-daemon (`Kilnd`) and pool
polling helpers. The protocol clients (varlink on one persistent
connection, the guest agent and its Ping, QMP) and `find_child` are
tests/lib/kiln_testlib.py's, re-exported here: this module is the
benchmark's one import of that library. Nothing here measures; the
scenario modules do.
"""
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../lib"))
from kiln_testlib import Agent, Qmp, VarlinkConnection, agent_ping, find_child  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
GUEST = os.environ.get("KILN_GUEST_DIR", os.path.join(TARGET, "guest"))
KILND = os.path.join(TARGET, "release", "kilnd")


def log(msg):
    """Progress on stderr, flushed (the report goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def varlinkctl(sock, method, params):
    """One call through the real `varlinkctl` client (a process per call)."""
    out = subprocess.run(["varlinkctl", "call", "--json=short", f"unix:{sock}",
                          f"io.kiln.Manager.{method}", json.dumps(params)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method}: {out.stderr.strip()} {out.stdout.strip()}")
    return json.loads(out.stdout)


def describe_pool(conn, name):
    return conn.call("DescribePool", {"name": name})["pool"]


def wait_pool(conn, name, want, timeout=300, poll=0.02):
    """Poll DescribePool until `want(pool)`; TimeoutError names the state."""
    deadline = time.monotonic() + timeout
    while True:
        pool = describe_pool(conn, name)
        if want(pool):
            return pool
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} after {timeout:.0f} s: {pool}")
        time.sleep(poll)


def pool_vms(conn, name):
    return [v for v in conn.call("ListVMs")["vms"] if v.get("pool") == name]


def wait_pool_gone(conn, name, timeout=120):
    """Wait until no VM of pool `name` is left (after DeletePool)."""
    deadline = time.monotonic() + timeout
    while pool_vms(conn, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} VMs never went away")
        time.sleep(0.05)


def drain(conn, name, max_vms=1, timeout=120):
    """Resize a pool to warm 0 and wait until it owns no VM.

    A shrink destroys the hot VMs but lets boots in flight finish, and they
    stay hot; so resize again until nothing is left.
    """
    deadline = time.monotonic() + timeout
    while True:
        conn.call("ResizePool", {"name": name, "warm": 0, "max": max_vms})
        pool = wait_pool(conn, name, lambda p: p["booting"] == 0, timeout=max(1, deadline - time.monotonic()))
        if pool["hot"] == 0 and pool["leased"] == 0 and not pool_vms(conn, name):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} never drained: {pool}")
        time.sleep(0.05)


def delete_pool(conn, name):
    conn.call("DeletePool", {"name": name})
    wait_pool_gone(conn, name)


def argv_of(pid):
    """A process's argv from /proc/PID/cmdline."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "units", "kilnd.service")


def unit_environment():
    """The `Environment=` of kilnd.service: the bench measures kilnd as it
    ships (its malloc tuning is there)."""
    env = {}
    with open(UNIT) as f:
        for line in f:
            if line.startswith("Environment="):
                name, _, value = line.strip().removeprefix("Environment=").partition("=")
                env[name] = value
    return env


# Not kilnd's default ("kiln"): a benchmark's VMs never share a cgroup
# parent with a kilnd of the host's own.
CGROUP_PARENT = "kiln-bench"


def remove_vm_cgroups(vm_ids):
    """Remove the cgroups of VMs whose QEMUs were just killed.

    kilnd leaves a running VM's cgroup for the next kilnd to re-adopt; the
    bench killed those QEMUs itself, so nothing else would remove them."""
    hierarchies = ["/sys/fs/cgroup"] + glob.glob("/sys/fs/cgroup/*/")
    for vm_id in vm_ids:
        for hierarchy in hierarchies:
            path = os.path.join(hierarchy, CGROUP_PARENT, vm_id)
            deadline = time.monotonic() + 2
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)


class Kilnd:
    """A release kilnd on a temp dir and a private dbus-daemon.

    Used as a context manager; on exit kilnd and the bus are stopped, any
    QEMU it left is killed and the temp dir removed.
    """

    def __init__(self, extra_config="", wrap=()):
        """`extra_config` is appended to kilnd.toml; `wrap` prefixes the
        command (e.g. `ip netns exec NS`)."""
        self.extra_config = extra_config
        self.wrap = list(wrap)
        self.work = tempfile.mkdtemp(prefix="kiln-bench-", dir="/tmp")
        os.chmod(self.work, 0o755)
        self.sock = os.path.join(self.work, "varlink")
        self.bus = None
        self.bus_address = None
        self.proc = None

    def __enter__(self):
        self.bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                    stdout=subprocess.PIPE, text=True)
        self.bus_address = self.bus.stdout.readline().strip()
        config = os.path.join(self.work, "kilnd.toml")
        with open(config, "w") as f:
            f.write(f'state_dir = "{self.work}/state"\nruntime_dir = "{self.work}/run"\n'
                    f'guest_dir = "{GUEST}"\nvarlink_socket = "{self.sock}"\n'
                    f'boot_timeout_sec = 180\npool_dirs = []\n'
                    f'dbus = "{self.bus_address}"\npolkit = false\ncgroup_parent = "{CGROUP_PARENT}"\n'
                    # The engine logs its share of each hot acquire at debug.
                    f'log_level = "info,kiln_engine::actor::pools=debug,kiln_engine::actor::tasks=debug"\n'
                    f'{self.extra_config}')
        self.log = open(os.path.join(self.work, "kilnd.log"), "w")
        self.proc = subprocess.Popen(self.wrap + [KILND, "--config", config], stdout=self.log,
                                     stderr=self.log, env={**os.environ, **unit_environment()})
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.__exit__()  # the bus and the temp dir go too
                raise RuntimeError(f"kilnd did not start:\n{tail}")
            time.sleep(0.01)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def vm_dir(self, vm_id):
        return os.path.join(self.work, "run", "vms", vm_id)

    def engine_acquire_ms(self):
        """The engine's share of every hot acquire so far (`engine_us` in
        kilnd's log: pick, lease record write, events), in ms."""
        with open(os.path.join(self.work, "kilnd.log"), errors="replace") as f:
            return [int(m.group(1)) / 1000 for m in re.finditer(r"engine_us=(\d+)", f.read())]

    def boot_steps(self):
        """Every boot sub-task's steps so far (`boot steps` in kilnd's log):
        [{"clone": bool, step: ms, ...}] in order."""
        with open(os.path.join(self.work, "kilnd.log"), errors="replace") as f:
            lines = [line for line in f if "boot steps" in line]
        out = []
        for line in lines:
            steps = {"clone": "clone=true" in line}
            steps.update({m.group(1): int(m.group(2)) / 1000 for m in re.finditer(r"(\w+)_us=(\d+)", line)})
            out.append(steps)
        return out

    def log_tail(self, chars=4000):
        try:
            with open(os.path.join(self.work, "kilnd.log"), errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.bus:
            self.bus.kill()
            self.bus.wait()
        vm_ids = [os.path.basename(d) for d in glob.glob(f"{self.work}/run/vms/*")]
        for pidfile in glob.glob(f"{self.work}/run/vms/*/qemu.pid"):
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read()), 9)
            except (OSError, ValueError):
                pass
        remove_vm_cgroups(vm_ids)
        shutil.rmtree(self.work, ignore_errors=True)
        return False
