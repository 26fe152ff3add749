"""libvirt peer: `virsh create` against raw QEMU, inside a booted systemd.

libvirtd outside systemd stalls for ~50 s on missing systemd services, which
is not a fair number, so both peers run in a Debian trixie container booted
with systemd-nspawn (systemd as PID 1, the system bus, machined, libvirtd
socket-activated as trixie ships it). The root filesystem (mmdebstrap
minbase + systemd + libvirt-daemon-system + qemu-system-x86) is built once
and cached under target/bench/cache/.

Alternating, in the same container:
  raw-qemu-cold (in container)  kilnd's own cold-boot argv (paths moved into
                the container), exec'd through nsenter, timed to the agent's
                Ping;
  libvirt virsh create          a transient domain equivalent to kilnd's VM:
                the same machine type (microvm, acpi), -cpu max, TCG with the
                same translation cache, 1 vCPU, 128 MiB, direct kernel boot of
                the same vmlinuz + initramfs with the same kernel command line,
                the agent's virtio-serial port io.kiln.agent.0 as a unix
                socket, a virtio RNG and a serial log file; `virsh create`
                (through nsenter) timed until the agent answers Ping;
  libvirt virsh restore         libvirt's fastest equivalent of a clone: the
                same domain booted once and `virsh save`d to a file, then
                `virsh restore` of that file per round, timed until the
                agent answers Ping again (next to kilnd's clone and the raw
                QEMU template restore, which run on the host).
Every clock includes one nsenter exec. The agent socket is reached from the
host through /proc/<container PID 1>/root.
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import procfs
from kiln import TARGET, agent_ping, argv_of, find_child, log

CACHE = os.path.join(TARGET, "bench", "cache")
SUITE = "trixie"
MIRROR = os.environ.get("KILN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ["systemd", "systemd-sysv", "dbus", "libvirt-daemon-system", "libvirt-daemon-driver-qemu",
            "libvirt-clients", "qemu-system-x86"]
ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]
IN_GUEST = "/var/lib/kiln-bench"  # kernel, initramfs, domain XML, sockets (container path)

RAW = "raw-qemu-cold (in container)"
VIRSH = "libvirt virsh create"
VIRSH_RESTORE = "libvirt virsh restore"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initramfs</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><tcg><tb-cache unit='MiB'>{tb_mib}</tb-cache></tcg></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0' ports='2'><address type='virtio-mmio'/></controller>
    <serial type='file'><source path='{run}/console.log'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{run}/agent.sock'/>
      <target type='virtio' name='io.kiln.agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend><address type='virtio-mmio'/></rng>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def rootfs():
    """The cached container root (built with mmdebstrap the first time)."""
    key = hashlib.sha256(json.dumps([SUITE, MIRROR, PACKAGES, 1]).encode()).hexdigest()[:12]
    root = os.path.join(CACHE, f"virt-root-{key}")
    if os.path.exists(os.path.join(root, ".kiln-bench-complete")):
        return root, False
    for old in glob.glob(os.path.join(CACHE, "virt-root-*")):
        subprocess.run(["rm", "-rf", "--one-file-system", old], check=True)
    tmp = root + ".tmp"
    os.makedirs(CACHE, exist_ok=True)
    log(f"libvirt: building the container root ({', '.join(PACKAGES)}) with mmdebstrap")
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", "--include=" + ",".join(PACKAGES),
                    SUITE, tmp, MIRROR], check=True, timeout=900, stdin=subprocess.DEVNULL)
    open(os.path.join(tmp, ".kiln-bench-complete"), "w").close()
    os.rename(tmp, root)
    return root, True


class Container:
    """The root booted with systemd as PID 1; commands run through nsenter."""

    def __init__(self, root):
        self.root = root
        self.proc = None
        self.leader = None
        self.console = None

    def __enter__(self):
        try:
            self._boot()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _boot(self):
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(k, None)
        self.console = open(os.path.join(TARGET, "bench", "virt-console.log"), "w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "-D", self.root, "--machine=kiln-bench-virt",
             "--console=passive", "-b"],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=self.console, start_new_session=True, env=env)
        deadline = time.monotonic() + 60
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not start (see {self.console.name})")
            self.leader = find_child(self.proc.pid, "systemd")
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline + 60:
                raise RuntimeError(f"systemd in the container is {state!r} (see {self.console.name})")
            time.sleep(0.2)
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=120)
            state = r.stdout.strip()

    def nsenter(self, argv):
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *ENV, *argv]

    def run(self, argv, check=True, timeout=120):
        r = subprocess.run(self.nsenter(argv), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def host_path(self, path):
        """A container path as the host reaches it (through /proc/PID/root)."""
        return f"/proc/{self.leader}/root{path}"

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            if self.leader:
                subprocess.run(self.nsenter(["systemctl", "poweroff", "--no-block"]), capture_output=True, timeout=30)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.console:
            self.console.close()
        return False


def argv_value(argv, flag):
    """The argument after `flag` in `argv`."""
    return argv[argv.index(flag) + 1]


def guest_argv_facts(kiln_argv):
    """The kernel command line, memory, vCPUs and tb-size of kilnd's own argv."""
    def after(flag):
        return argv_value(kiln_argv, flag)
    accel = after("-accel")
    tb = next((p.split("=")[1] for p in accel.split(",") if p.startswith("tb-size=")), "32")
    return {"cmdline": after("-append"), "memory": int(after("-m").rstrip("M")),
            "vcpus": int(after("-smp").split(",")[0]), "tb_mib": int(tb)}


def boot_files(kiln_argv):
    """The kernel and initramfs kilnd's QEMU boots (the kernel may be the
    guest's bzImage unpacked for direct boot under kilnd's state dir)."""
    return {"vmlinuz": argv_value(kiln_argv, "-kernel"), "initramfs": argv_value(kiln_argv, "-initrd")}


def keep_boot_files(kiln_argv, into):
    """kilnd's argv with its kernel and initramfs copied to `into`: the
    kernel may live in kilnd's state dir (unpacked for direct boot), which
    is gone once kilnd stops, before this phase runs."""
    os.makedirs(into, exist_ok=True)
    argv = list(kiln_argv)
    for name, path in boot_files(kiln_argv).items():
        kept = os.path.join(into, name)
        shutil.copy(path, kept)
        argv = [a.replace(path, kept) for a in argv]
    return argv


def container_argv(kiln_argv, vm_dir, vm_id, run_dir):
    """kilnd's argv with its paths moved to the container's copies."""
    files = boot_files(kiln_argv)
    return [a.replace(vm_dir, run_dir).replace(f"kiln-{vm_id}", "kiln-bench-raw")
            .replace(files["vmlinuz"], f"{IN_GUEST}/vmlinuz")
            .replace(files["initramfs"], f"{IN_GUEST}/initramfs") for a in kiln_argv]


def raw_in_container(c, argv, run_dir, idle_pss=False):
    """Exec QEMU in the container; ms until its agent answers (and its idle PSS)."""
    os.makedirs(c.host_path(run_dir), exist_ok=True)
    t0 = time.monotonic()
    qemu = subprocess.Popen(c.nsenter(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        agent_ping(c.host_path(f"{run_dir}/agent.sock"), t0 + 180)
        ms = (time.monotonic() - t0) * 1000
        return ms, idle_pss_of(child_of(qemu.pid)) if idle_pss else None
    finally:
        os.killpg(qemu.pid, signal.SIGKILL)  # nsenter forks: QEMU is its child
        qemu.wait()


def child_of(pid):
    """The only child of a process (nsenter's forked command)."""
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(task) as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
    raise RuntimeError(f"process {pid} has no child")


def idle_pss_of(pid):
    """PSS of a VM's QEMU after 2 s of idling, MiB."""
    time.sleep(2)
    return round(procfs.pss_mib(pid), 1)


def domain_xml(c, name, facts):
    """The equivalent domain's XML written into the container; its path
    there and the domain's run dir (agent socket, console)."""
    run_dir = f"{IN_GUEST}/run/{name}"
    os.makedirs(c.host_path(run_dir), exist_ok=True)
    os.chmod(c.host_path(run_dir), 0o1777)
    xml = f"{IN_GUEST}/{name}.xml"
    with open(c.host_path(xml), "w") as f:
        f.write(DOMAIN.format(name=name, dir=IN_GUEST, run=run_dir, **facts))
    return xml, run_dir


def virsh_create(c, name, facts, details=None):
    """`virsh create` of the equivalent domain; ms until its agent answers.

    With `details` (a dict), also records libvirt's QEMU argv and idle PSS.
    """
    xml, run_dir = domain_xml(c, name, facts)
    t0 = time.monotonic()
    try:
        c.run(["virsh", "--quiet", "create", xml], timeout=180)
        agent_ping(c.host_path(f"{run_dir}/agent.sock"), t0 + 180)
        ms = (time.monotonic() - t0) * 1000
        if details is not None:
            pid = domain_pid(name)
            details["libvirt_qemu_argv"] = " ".join(argv_of(pid))
            details["libvirt_idle_pss_mib"] = idle_pss_of(pid)
        return ms
    finally:
        c.run(["virsh", "--quiet", "destroy", name], check=False)


def virsh_restores(c, facts, rounds):
    """The domain booted and `virsh save`d once, then `virsh restore`d
    `rounds` times (destroyed after each); ms until the agent answers."""
    name = "kiln-bench-saved"
    xml, run_dir = domain_xml(c, name, facts)
    saved = f"{IN_GUEST}/run/{name}.save"
    c.run(["virsh", "--quiet", "create", xml], timeout=180)
    try:
        agent_ping(c.host_path(f"{run_dir}/agent.sock"), time.monotonic() + 180)
        c.run(["virsh", "--quiet", "save", name, saved], timeout=180)
    except BaseException:
        c.run(["virsh", "--quiet", "destroy", name], check=False)
        raise
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        try:
            c.run(["virsh", "--quiet", "restore", saved], timeout=180)
            agent_ping(c.host_path(f"{run_dir}/agent.sock"), t0 + 60)
            times.append((time.monotonic() - t0) * 1000)
        finally:
            c.run(["virsh", "--quiet", "destroy", name], check=False)
    os.unlink(c.host_path(saved))
    return times


def domain_pid(name):
    out = subprocess.run(["pgrep", "-f", f"guest={name},"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def libvirt_boots(kiln_argv, vm_dir, vm_id, rounds, budget_s, min_rounds):
    """Boot the container, then alternate raw QEMU and virsh create.

    Stops after `budget_s` (from the container's start) once `min_rounds` ran.
    """
    t_setup = time.monotonic()
    root, built = rootfs()
    os.makedirs(os.path.join(root, IN_GUEST.lstrip("/"), "run"), exist_ok=True)
    # The very files kilnd boots, so libvirt boots the same kernel form.
    for name, path in boot_files(kiln_argv).items():
        shutil.copy(path, os.path.join(root, IN_GUEST.lstrip("/"), name))
    facts = guest_argv_facts(kiln_argv)
    results = {RAW: [], VIRSH: [], VIRSH_RESTORE: []}
    extra = {"rootfs_built_this_run": built}
    with Container(root) as c:
        deadline = time.monotonic() + budget_s
        extra["container_boot_s"] = round(time.monotonic() - t_setup, 1)
        extra["libvirt_version"] = c.run(["virsh", "--version"]).stdout.strip()
        extra["qemu_in_container"] = c.run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0]
        # Round 0 warms both up (socket activation, page cache) and records
        # argv and idle PSS; it is not timed into the results.
        for i in range(rounds + 1):
            if i > min_rounds and time.monotonic() > deadline:
                log(f"libvirt: {i - 1} rounds in the {budget_s} s budget")
                break
            run_dir = f"{IN_GUEST}/run/raw{i}"
            argv = container_argv(kiln_argv, vm_dir, vm_id, run_dir)
            raw_ms, raw_pss = raw_in_container(c, argv, run_dir, idle_pss=i == 0)
            virsh_ms = virsh_create(c, f"kiln-bench-{i}", facts, details=extra if i == 0 else None)
            if i == 0:
                extra["raw_idle_pss_mib"] = raw_pss
                continue
            results[RAW].append(raw_ms)
            results[VIRSH].append(virsh_ms)
            log(f"libvirt round {i}/{rounds}: raw {raw_ms:.0f} ms, virsh create {virsh_ms:.0f} ms")
        # One more restore than rounds: the first warms the page cache.
        restores = virsh_restores(c, facts, rounds + 1)
        results[VIRSH_RESTORE] = restores[1:]
        log(f"libvirt: virsh restore {', '.join(f'{ms:.0f}' for ms in restores)} ms (the first untimed)")
        extra["domain_xml"] = DOMAIN.format(name="NAME", dir=IN_GUEST, run=f"{IN_GUEST}/run/NAME", **facts)
    extra["setup_and_run_s"] = round(time.monotonic() - t_setup, 1)
    return results, extra
