"""containerd: pods through containerd-shim-kiln-v1 against runc, in one run.

A containerd of this phase's own (Debian's; config, root, state and
sockets in a temp dir, CRI off, as testkit/src/containerd.rs starts it)
with the release shim first on its PATH, and a release kilnd (`Kilnd`)
with a template pool of 1-vCPU, 256 MiB VMs whose template loads the
container modules at boot (as the shim's tests and docs/kubernetes.md
use). The image: busybox-static in one layer, built here as an OCI layout,
turned into a docker archive by skopeo and loaded with `ctr images
import`. Both runtimes run the same image in the same containerd.

first output   `ctr run --rm IMAGE ID /bin/busybox echo hi`, from the exec
               of ctr to "hi" on its stdout, with Kiln's shim (a VM leased
               from the hot pool, the rootfs image cached after one untimed
               run) and with containerd's default runc runtime, alternating;
               before each Kiln round the pool is back at one hot VM and
               nothing is cloning. ctr's exit (the VM given back, the
               container removed) is kept as well.
pods per s     N `ctr run -d` in a row (a process that sleeps), each timed,
               with Kiln's shim from a pool holding N hot (max N: no refill
               clone competes), then with runc; pods/s = N / the whole run.
idle PSS       of those N pods once started, per pod: the VM's QEMU plus
               its shim for Kiln; the shim plus the container's processes
               for runc (smaps_rollup, procfs.py).
"""
import contextlib
import datetime
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import procfs
from images import TAG, tar_layer, write_layout
from kiln import TARGET, Kilnd, VarlinkConnection, log, wait_pool

SHIM = os.path.join(TARGET, "release", "containerd-shim-kiln-v1")
RUNTIME = "io.containerd.kiln.v1"
RUNC_SHIM = "containerd-shim-runc-v2"
NAMESPACE = "kiln-bench"
IMAGE = "localhost/kiln-bench-busybox:v1"
POOL = "containerd"
VM = {"vcpus": 1, "memoryMiB": 256, "cmdline": "kiln.container_modules=boot"}
ECHO = ["/bin/busybox", "echo", "hi"]
# PID 1 of a container ignores SIGTERM unless it traps it: this one ends at
# once when the pod is removed.
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 600 & wait"]
SHIM_SOCKETS = "/run/containerd/s"
# Where containerd's runc shim keeps runc's state for a namespace.
RUNC_ROOT = f"/run/containerd/runc/{NAMESPACE}"

KILN_FIRST = "containerd: ctr run --rm with Kiln's shim (hot pool), to first output"
RUNC_FIRST = "containerd: ctr run --rm with runc, to first output"
KILN_DETACHED = "containerd: ctr run -d with Kiln's shim, each of N in a row"
RUNC_DETACHED = "containerd: ctr run -d with runc, each of N in a row"


def median(values):
    return round(statistics.median(values), 1) if values else None


def proc_args(pid):
    """A process's argv, or [] when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def shim_sockets():
    try:
        return {os.path.join(SHIM_SOCKETS, n) for n in os.listdir(SHIM_SOCKETS)}
    except OSError:
        return set()


class Containerd:
    """Debian's containerd on a temp dir of its own, CRI off, the release
    shim first on its PATH and kilnd's address in its environment (its
    shims inherit it). Used as a context manager; on exit, also after a
    failure: its tasks and containers removed, containerd stopped, the shims
    serving it killed and their sockets removed, runc state of the bench's
    namespace deleted, every mount below the dir unmounted, the dir
    removed."""

    def __init__(self, kiln_address):
        # Short (socket paths are limited to 108 bytes); kc-* is what
        # scripts/test.sh sweeps after a crashed run.
        self.dir = tempfile.mkdtemp(prefix="kc-bench-", dir="/tmp")
        self.sock = os.path.join(self.dir, "c.sock")
        self.kiln_address = kiln_address
        self.proc = None
        self.sockets_before = shim_sockets()
        self.shim_config = os.path.join(self.dir, "kiln-shim.toml")

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self):
        d = self.dir
        with open(os.path.join(d, "containerd.toml"), "w") as f:
            f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", '
                    '"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", '
                    '"io.containerd.snapshotter.v1.aufs"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                    f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{d}/opt"\n')
        with open(self.shim_config, "w") as f:
            f.write(f'pool = "{POOL}"\nacquire_timeout_ms = 240000\n')
        env = dict(os.environ, PATH=f"{os.path.dirname(SHIM)}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                   KILN_ADDRESS=self.kiln_address)
        self.log = open(os.path.join(d, "containerd.log"), "w")
        self.proc = subprocess.Popen(["containerd", "--config", os.path.join(d, "containerd.toml")],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 30
        while self.ctr(["version"]).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not serve:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def argv(self, args):
        return ["ctr", "--address", self.sock, "--namespace", NAMESPACE] + args

    def ctr(self, args, check=False):
        out = subprocess.run(self.argv(args), stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {out.stderr.strip()}\n{self.log_tail()}")
        return out

    def run_args(self, args):
        """`ctr run` arguments with runc (containerd's default), the task's
        FIFOs in the dir (the default is the shared /run/containerd/fifo)."""
        return ["run", "--fifo-dir", os.path.join(self.dir, "fifo")] + args

    def kiln_run(self, args):
        """`ctr run` arguments for Kiln's runtime and the shim's config."""
        return self.run_args(["--runtime", RUNTIME, "--runtime-config-path", self.shim_config] + args)

    def log_tail(self, chars=3000):
        try:
            with open(os.path.join(self.dir, "containerd.log"), errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def shims(self, binary):
        """Pids of `binary` serving this containerd (its address is in their argv)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                args = proc_args(entry)
                if args and os.path.basename(args[0]) == binary and self.sock in args:
                    pids.append(int(entry))
        return pids

    def remove_all(self):
        """Every task (killed) and container of the namespace."""
        for task in self.ctr(["task", "ls", "-q"]).stdout.split():
            self.ctr(["task", "delete", "--force", task])
        for container in self.ctr(["container", "ls", "-q"]).stdout.split():
            self.ctr(["container", "delete", container])

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.remove_all()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for binary in (os.path.basename(SHIM), RUNC_SHIM):
            for pid in self.shims(binary):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        # runc containers whose shim was killed: runc removes them.
        listed = subprocess.run(["runc", "--root", RUNC_ROOT, "list", "-q"], capture_output=True, text=True)
        for name in listed.stdout.split():
            subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", name], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(RUNC_ROOT)
        # Sockets of shims that were killed and nobody serves now.
        for path in shim_sockets() - self.sockets_before:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        self.unmount_below()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def unmount_below(self):
        """Lazily unmount every mount at or below the dir, deepest first."""
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        mine = [p for p in points if p == self.dir or p.startswith(self.dir + "/")]
        for point in sorted(mine, key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


def import_image(c, work):
    """Build the busybox image, import it; its description."""
    with open(shutil.which("busybox") or "/bin/busybox", "rb") as f:
        busybox = f.read()
    layer = tar_layer([("dir", "bin", None), ("file", "bin/busybox", busybox), ("link", "bin/sh", "busybox")])
    layout = os.path.join(work, "layout")
    described = write_layout(layout, [layer])
    archive = os.path.join(work, "image.tar")
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:{TAG}",
                    f"docker-archive:{archive}:{IMAGE}"], check=True, capture_output=True)
    c.ctr(["images", "import", archive], check=True)
    os.unlink(archive)
    shutil.rmtree(layout)
    return dict(described, reference=IMAGE)


def pool_settled(conn, hot):
    """Wait until the pool holds `hot` hot VMs and clones none."""
    wait_pool(conn, POOL, lambda p: p["hot"] >= hot and p["booting"] == 0, timeout=300)


def run_to_exit(c, args, name):
    """`ctr run --rm` of ECHO: (ms to "hi" on ctr's stdout, ms to ctr's exit,
    the wall clock at ctr's exec)."""
    wall = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(c.argv(args + [IMAGE, name] + ECHO), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    first = (time.monotonic() - t0) * 1000
    _, err = proc.communicate(timeout=120)
    done = (time.monotonic() - t0) * 1000
    if line != b"hi\n" or proc.returncode != 0:
        raise RuntimeError(f"ctr run {name}: {line!r}, exit {proc.returncode}: {err.decode()[-1500:]}\n"
                           f"{c.log_tail()}")
    return first, done, wall


# The shim's log lines (in containerd's log) that mark a Kiln pod's steps.
SHIM_STEPS = {"acquired": r"pod {name}: VM \w+ from pool", "rootfs": r"{name}: rootfs of \d+ layers",
              "started": r"{name}: started in VM"}
LOG_TIME = re.compile(r'^time="([^"]+)"')


def log_times(c, name):
    """Wall clock of each of SHIM_STEPS for pod `name` in containerd's log."""
    with open(os.path.join(c.dir, "containerd.log"), errors="replace") as f:
        lines = f.read().splitlines()
    out = {}
    for step, pattern in SHIM_STEPS.items():
        found = re.compile(pattern.format(name=re.escape(name)))
        for line in lines:
            stamp = LOG_TIME.match(line)
            if stamp and found.search(line):
                text = stamp.group(1).replace("Z", "+00:00")
                out[step] = datetime.datetime.fromisoformat(text).timestamp()
                break
    return out


def breakdown(c, rounds):
    """Where a Kiln pod's first output goes (medians, ms), from ctr's exec:
    to the VM leased (ctr, containerd, the shim started, Create's Acquire),
    ImportRootfs (cached), to the container started (ctr's Start call,
    AddContainer), to the output at ctr (the log pump, the FIFO, ctr)."""
    parts = {"ctr to VM leased": [], "ImportRootfs": [], "to container started": [], "to output at ctr": []}
    for name, wall, first_ms in rounds:
        t = log_times(c, name)
        if len(t) != len(SHIM_STEPS):
            continue
        parts["ctr to VM leased"].append((t["acquired"] - wall) * 1000)
        parts["ImportRootfs"].append((t["rootfs"] - t["acquired"]) * 1000)
        parts["to container started"].append((t["started"] - t["rootfs"]) * 1000)
        parts["to output at ctr"].append(wall * 1000 + first_ms - t["started"] * 1000)
    return {k: median(v) for k, v in parts.items()}


def first_output_rows(c, conn, rounds, out, extra):
    """Alternating runc and Kiln rounds after one untimed run of each."""
    exits = {KILN_FIRST: [], RUNC_FIRST: []}
    kiln_rounds = []
    pool_settled(conn, 1)
    run_to_exit(c, c.kiln_run(["--rm"]), "kwarm")  # converts the rootfs once
    run_to_exit(c, c.run_args(["--rm"]), "rwarm")
    for i in range(rounds):
        pair = [(RUNC_FIRST, c.run_args(["--rm"]), f"r{i}"), (KILN_FIRST, c.kiln_run(["--rm"]), f"k{i}")]
        for row, args, name in pair[i % 2:] + pair[:i % 2]:
            if row == KILN_FIRST:
                pool_settled(conn, 1)
            first, done, wall = run_to_exit(c, args, name)
            out[row].append(first)
            exits[row].append(done)
            if row == KILN_FIRST:
                kiln_rounds.append((name, wall, first))
        log(f"containerd first output {i + 1}/{rounds}: Kiln {out[KILN_FIRST][-1]:.0f} ms "
            f"(exit {exits[KILN_FIRST][-1]:.0f}), runc {out[RUNC_FIRST][-1]:.0f} ms "
            f"(exit {exits[RUNC_FIRST][-1]:.0f})")
    extra["ctr_exit_median_ms"] = {"kiln": median(exits[KILN_FIRST]), "runc": median(exits[RUNC_FIRST])}
    extra["kiln_breakdown_median_ms"] = breakdown(c, kiln_rounds)


def start_pods(c, args, prefix, n):
    """n `ctr run -d` in a row: each one's ms, pods per second."""
    each = []
    t0 = time.monotonic()
    for i in range(n):
        t = time.monotonic()
        c.ctr(args + [IMAGE, f"{prefix}{i}"] + SLEEPER, check=True)
        each.append((time.monotonic() - t) * 1000)
    return each, round(n / (time.monotonic() - t0), 2)


def pss_sum(pids):
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += procfs.pss_mib(pid)
    return total


def descendants(pid):
    """pid's processes below it (the container's, under runc's shim)."""
    children, out = {}, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kiln_pss(c, conn, n, settle_s):
    """Per pod: its VM's QEMU and its shim."""
    time.sleep(settle_s)
    vms = [v for v in conn.call("ListVMs")["vms"] if (v.get("labels") or {}).get("io.kiln.shim") == "containerd"]
    shims = c.shims(os.path.basename(SHIM))
    if len(vms) != n or len(shims) != n:
        raise RuntimeError(f"{n} Kiln pods, but {len(vms)} VMs and {len(shims)} shims")
    qemu, shim = pss_sum(v["pid"] for v in vms) / n, pss_sum(shims) / n
    return {"n": n, "per_pod_mib": round(qemu + shim, 1), "qemu_mib": round(qemu, 1), "shim_mib": round(shim, 1)}


def runc_pss(c, n, settle_s):
    """Per pod: its runc shim and the container's processes."""
    time.sleep(settle_s)
    shims = c.shims(RUNC_SHIM)
    if len(shims) != n:
        raise RuntimeError(f"{n} runc pods, but {len(shims)} shims")
    shim = pss_sum(shims) / n
    procs = pss_sum(p for s in shims for p in descendants(s)) / n
    return {"n": n, "per_pod_mib": round(shim + procs, 1), "shim_mib": round(shim, 1),
            "processes_mib": round(procs, 1)}


def pod_rows(c, conn, plan, out, extra):
    n = plan["pods"]
    conn.call("ResizePool", {"name": POOL, "warm": n, "max": n})
    pool_settled(conn, n)
    out[KILN_DETACHED], kiln_rate = start_pods(c, c.kiln_run(["-d"]), "kp", n)
    extra["pss"] = {"kiln": kiln_pss(c, conn, n, plan["settle_s"])}
    # No refill clones while runc runs.
    conn.call("ResizePool", {"name": POOL, "warm": 0, "max": n})
    c.remove_all()
    out[RUNC_DETACHED], runc_rate = start_pods(c, c.run_args(["-d"]), "rp", n)
    extra["pss"]["runc"] = runc_pss(c, n, plan["settle_s"])
    c.remove_all()
    extra["pods_per_s"] = {"n": n, "kiln": kiln_rate, "runc": runc_rate}
    log(f"containerd: {n} pods in a row: Kiln {kiln_rate}/s, runc {runc_rate}/s; idle PSS per pod: "
        f"Kiln {extra['pss']['kiln']['per_pod_mib']} MiB, runc {extra['pss']['runc']['per_pod_mib']} MiB")


def version(argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout.split("\n")[0].strip()


def run(plan):
    """(samples, report section)."""
    if not os.path.exists(SHIM):
        raise RuntimeError(f"no release shim at {SHIM}: cargo build --release -p kiln-shim")
    out = {KILN_FIRST: [], RUNC_FIRST: []}
    extra = {"containerd": version(["containerd", "--version"]), "runc": version(["runc", "--version"]),
             "pool": {"mode": "template", "vm": VM}}
    work = tempfile.mkdtemp(prefix="kiln-bench-ctrd-", dir="/tmp")
    try:
        with Kilnd() as k, Containerd(f"unix:{k.sock}") as c:
            conn = VarlinkConnection(k.sock)
            conn.call("CreatePool", {"name": POOL, "spec": {"mode": "template", "warm": 1,
                                                            "max": max(2, plan["pods"]), "vm": VM}})
            extra["image"] = import_image(c, work)
            first_output_rows(c, conn, plan["first_output"], out, extra)
            pod_rows(c, conn, plan, out, extra)
            conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, extra
