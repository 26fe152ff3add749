#!/usr/bin/env python3
"""Smoke test of the GPU guest image (guest/build-image.sh -> OUTDIR/gpu)
under real QEMU (q35, TCG).

1. virtio-gpu 2D (needs no host GPU): boots OUTDIR/vmlinuz + initramfs on
   q35 with `-device virtio-gpu-pci`, and through the agent's Exec checks
   that the guest has a DRM device: /sys/class/drm/card0 bound to
   virtio_gpu, /dev/dri/renderD128, the driver reporting "-virgl" (2D).
   Then it runs kiln-gpu's own code on that real sysfs and render node
   (the `gpu-probe` example, built static and copied in): the inventory,
   grant/revoke with an open() as another uid, and the watcher seeing the
   render node go and come back when the driver is unbound and rebound.
2. virgl (needs a host render node): when /dev/dri/renderD* exists on this
   machine, boots with `-device virtio-gpu-gl-pci -display
   egl-headless,rendernode=...` and checks that the guest driver reports
   "+virgl". Otherwise prints "SKIPPED: no /dev/dri/renderD* on this host".

  guest/tests/gpu-smoke.py [OUTDIR]      (default: target/guest/gpu)

Environment: KILN_QEMU, KILN_SMOKE_APPEND (as boot-smoke.py), KILN_SMOKE_KEEP=1
keeps the work directory, KILN_GPU_PROBE=PATH uses a prebuilt static
gpu-probe instead of building it with cargo. Exits non-zero on the first
failure; QEMU processes and the work directory are always cleaned up.
"""

import base64
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/lib"))
from kiln_testlib import (APPEND, QEMU, REPO, Agent, Failure, check, kill_all,  # noqa: E402
                          print_console_tails, remove_work, step)

BOOT_TIMEOUT = 180.0
PROBE_IN_GUEST = "/tmp/gpu-probe"
TRIPLE = "x86_64-unknown-linux-gnu"


def qemu_argv(guest, work, name, gpu_args):
    """A GPU VM as kilnd will start it: q35, PCI virtio devices."""
    return [
        QEMU,
        "-M", "q35",
        "-accel", "tcg,tb-size=64",
        "-cpu", "max",
        "-m", "256",
        "-smp", "1",
        "-nodefaults", "-no-user-config",
        "-kernel", os.path.join(guest, "vmlinuz"),
        "-initrd", os.path.join(guest, "initramfs"),
        "-append", APPEND,
        "-serial", f"file:{work}/{name}-console.log",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={work}/{name}-agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=io.kiln.agent.0",
        "-qmp", f"unix:{work}/{name}-qmp.sock,server=on,wait=off",
        "-no-reboot",
    ] + gpu_args


def build_probe():
    """The gpu-probe example, static (the guest has no libc)."""
    prebuilt = os.environ.get("KILN_GPU_PROBE")
    if prebuilt:
        return prebuilt
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    env = dict(os.environ, RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols")
    t = time.monotonic()
    subprocess.run(
        [os.environ.get("CARGO", "cargo"), "build", "--quiet", "--release", "--target", TRIPLE,
         "-p", "kiln-gpu", "--example", "gpu-probe"],
        cwd=REPO, env=env, check=True)
    path = os.path.join(target, TRIPLE, "release", "examples", "gpu-probe")
    print(f"    gpu-probe built in {time.monotonic() - t:.1f} s")
    return path


def upload(agent, local, remote):
    """Copies a binary into the guest through Exec stdin (base64, in chunks
    well under the agent's 8 MiB message cap)."""
    data = base64.b64encode(open(local, "rb").read()).decode()
    agent.exec(["sh", "-c", f"rm -f {remote}.b64"])
    chunk = 1 << 20
    for i in range(0, len(data), chunk):
        r = agent.exec(["sh", "-c", f"cat >> {remote}.b64"], stdin=data[i:i + chunk])
        check(r["exitCode"] == 0, f"upload: {r}")
    r = agent.exec(["sh", "-c", f"base64 -d {remote}.b64 > {remote} && chmod 755 {remote} && rm {remote}.b64"])
    check(r["exitCode"] == 0, f"upload: {r}")


def sh(agent, script, ok=True):
    r = agent.exec(["sh", "-c", script])
    if ok:
        check(r["exitCode"] == 0, f"{script!r} failed: {r}")
    return r


def boot(guest, work, procs, name, gpu_args):
    t0 = time.monotonic()
    vm = subprocess.Popen(qemu_argv(guest, work, name, gpu_args), stdin=subprocess.DEVNULL)
    procs.append(vm)
    agent = Agent(f"{work}/{name}-agent.sock")
    ping = agent.sync_ping(BOOT_TIMEOUT)
    print(f"    first Ping after {time.monotonic() - t0:.2f} s (guest uptime {ping['uptimeMs']} ms)")
    release = open(os.path.join(guest, "kernel-release")).read().strip()
    check(ping["kernelRelease"] == release, f"kernel {ping['kernelRelease']} != {release}")
    return vm, agent


def shutdown(vm, agent):
    agent.call("io.kiln.Agent.Shutdown")
    agent.close()
    check(vm.wait(60) == 0, f"QEMU exit status {vm.returncode}")


def driver_features(agent):
    """The virtio-gpu driver's feature line, e.g. "-virgl +edid ..."."""
    out = sh(agent, "dmesg | grep -m1 '\\[drm\\] features:'", ok=False)["stdout"]
    check("features:" in out, f"no virtio-gpu feature line in dmesg: {out!r}")
    return out.split("features:", 1)[1].strip()


def probe_scan(agent):
    r = agent.exec([PROBE_IN_GUEST, "scan"])
    check(r["exitCode"] == 0, f"gpu-probe scan: {r}")
    return json.loads(r["stdout"])["nodes"]


def run_2d(guest, work, procs, probe):
    step("virtio-gpu 2D on q35: boot")
    vm, agent = boot(guest, work, procs, "vm2d", ["-device", "virtio-gpu-pci", "-display", "none"])

    step("the guest sees a DRM device: /sys/class/drm/card0, bound to virtio_gpu")
    sh(agent, "test -e /sys/class/drm/card0")
    r = sh(agent, "ls /sys/class/drm; ls -l /dev/dri; readlink /sys/class/drm/card0/device/virtio*/driver")
    print("    " + r["stdout"].strip().replace("\n", "\n    "))
    check(r["stdout"].rstrip().endswith("/virtio_gpu"), f"card0 not driven by virtio_gpu: {r}")
    check("renderD128" in r["stdout"], f"no render node in the guest: {r}")
    features = driver_features(agent)
    print(f"    driver features: {features}")
    check("-virgl" in features.split(), f"2D device should not offer virgl: {features}")

    step("kiln-gpu inventory on the guest's real sysfs")
    upload(agent, probe, PROBE_IN_GUEST)
    nodes = probe_scan(agent)
    check(len(nodes) == 1, f"expected one render node: {nodes}")
    n = nodes[0]
    pci = sh(agent, "basename $(readlink -f /sys/class/drm/renderD128/device)")["stdout"].strip()
    want = {"name": "renderD128", "path": "/dev/dri/renderD128", "dev": "226:128",
            "vendorId": "0x1af4", "deviceId": "0x1050", "bus": "pci",
            "pciAddress": pci, "usable": True}
    for key, value in want.items():
        check(n.get(key) == value, f"inventory {key}: {n.get(key)!r} != {value!r} in {n}")
    check(n.get("driver") == "virtio-pci", f"driver: {n}")
    print(f"    {json.dumps(n)}")

    step("grant/revoke on the real render node: open() as uid 4242")
    node = "/dev/dri/renderD128"
    r = agent.exec([PROBE_IN_GUEST, "open-as", "4242", node])
    check(r["exitCode"] != 0 and "Permission denied" in r["stderr"], f"open before grant: {r}")
    check(sh(agent, f"{PROBE_IN_GUEST} grant {node} 4242")["stdout"].strip() == "Added", "grant")
    r = agent.exec([PROBE_IN_GUEST, "open-as", "4242", node])
    check(r["exitCode"] == 0 and r["stdout"].strip() == "opened", f"open after grant: {r}")
    r = agent.exec([PROBE_IN_GUEST, "open-as", "4243", node])
    check(r["exitCode"] != 0, f"another uid must not gain access: {r}")
    check(sh(agent, f"{PROBE_IN_GUEST} revoke {node} 4242")["stdout"].strip() == "Removed", "revoke")
    r = agent.exec([PROBE_IN_GUEST, "open-as", "4242", node])
    check(r["exitCode"] != 0 and "Permission denied" in r["stderr"], f"open after revoke: {r}")

    step("unbind and rebind the DRM driver: the watcher sees the node go and come")
    # virtio-gpu-pci cannot be hot-plugged in QEMU; unbinding the virtio
    # device from virtio_gpu makes the kernel remove card0/renderD128 and
    # binding creates them again, as an unplug and a plug would.
    vdev = sh(agent, "basename /sys/class/drm/card0/device/virtio*")["stdout"].strip()
    drv = "/sys/bus/virtio/drivers/virtio_gpu"

    def start_watchers(sys_seconds):
        # One watcher on /dev/dri only, one on /sys/class/drm only: what
        # does a real kernel report to each?
        sh(agent, f"{PROBE_IN_GUEST} watch 60 /nonexistent /dev > /tmp/w-dev 2>&1 &"
                  f" {PROBE_IN_GUEST} watch {sys_seconds} /sys /nonexistent > /tmp/w-sys 2>&1 &")
        deadline = time.monotonic() + 30
        while sh(agent, "cat /tmp/w-dev /tmp/w-sys", ok=False)["stdout"].count("watching") < 2:
            check(time.monotonic() < deadline, "watchers did not start")
            time.sleep(0.1)

    def wait_dev_watcher(what):
        t = time.monotonic()
        while "changed" not in sh(agent, "cat /tmp/w-dev", ok=False)["stdout"]:
            check(time.monotonic() - t < 60, f"the /dev/dri watcher saw no change after {what}: "
                  + sh(agent, "cat /tmp/w-dev; ls /dev/dri", ok=False)["stdout"])
            time.sleep(0.1)
        print(f"    {what}: /dev/dri watcher woke after {time.monotonic() - t:.2f} s")

    def sysfs_verdict():
        t = time.monotonic()
        while True:
            out = sh(agent, "cat /tmp/w-sys", ok=False)["stdout"]
            if "changed" in out or "timeout" in out:
                return "changed" if "changed" in out else "no event (timeout)"
            check(time.monotonic() - t < 60, f"sysfs watcher never finished: {out}")
            time.sleep(0.5)

    start_watchers(3)
    sh(agent, f"echo {vdev} > {drv}/unbind")
    wait_dev_watcher("unbind")
    nodes = probe_scan(agent)
    check(nodes == [], f"after unbind: {nodes}")
    unbind_sysfs = sysfs_verdict()
    start_watchers(3)
    sh(agent, f"echo {vdev} > {drv}/bind")
    wait_dev_watcher("bind")
    nodes = probe_scan(agent)
    check([x["name"] for x in nodes] == ["renderD128"] and nodes[0]["usable"], f"after bind: {nodes}")
    print(f"    /sys/class/drm watcher on a real kernel: unbind {unbind_sysfs}, bind {sysfs_verdict()}")

    step("shutdown")
    shutdown(vm, agent)


def host_render_nodes():
    return sorted(glob.glob("/dev/dri/renderD*"))


def run_virgl(guest, work, procs, probe):
    step("virgl: virtio-gpu-gl-pci + egl-headless on a host render node")
    nodes = host_render_nodes()
    if not nodes:
        print("    SKIPPED: no /dev/dri/renderD* on this host")
        return "skipped"
    devices = subprocess.run([QEMU, "-device", "help"], capture_output=True, text=True).stdout
    check("virtio-gpu-gl-pci" in devices,
          f"{nodes[0]} exists but {QEMU} has no virtio-gpu-gl-pci "
          "(Debian: install qemu-system-modules-opengl)")
    node = nodes[0]
    print(f"    using {node}")
    vm, agent = boot(guest, work, procs, "vmgl", [
        "-device", "virtio-gpu-gl-pci",
        "-display", f"egl-headless,rendernode={node}",
    ])
    sh(agent, "test -e /sys/class/drm/card0")
    features = driver_features(agent)
    print(f"    driver features: {features}")
    check("+virgl" in features.split(), f"guest does not see a virgl-capable device: {features}")
    upload(agent, probe, PROBE_IN_GUEST)
    nodes = probe_scan(agent)
    check(any(x["name"] == "renderD128" and x["usable"] for x in nodes), f"{nodes}")
    shutdown(vm, agent)
    return "passed"


def main():
    guest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1
                            else os.path.join(REPO, "target", "guest", "gpu"))
    for f in ("vmlinuz", "initramfs", "kernel-release"):
        if not os.path.exists(os.path.join(guest, f)):
            sys.exit(f"gpu-smoke: {guest}/{f} missing; run guest/build-image.sh")
    work = tempfile.mkdtemp(prefix="kiln-gpu-smoke-")
    procs = []
    t0 = time.monotonic()
    try:
        print(f"    kernel command line: {APPEND}")
        probe = build_probe()
        run_2d(guest, work, procs, probe)
        virgl = run_virgl(guest, work, procs, probe)
        print(f"gpu-smoke: PASS (virtio-gpu 2D passed, virgl {virgl}) in {time.monotonic() - t0:.1f} s")
    except (Failure, subprocess.CalledProcessError) as e:
        print(f"gpu-smoke: FAIL: {e}", file=sys.stderr)
        print_console_tails(work)
        sys.exit(1)
    finally:
        kill_all(procs)
        remove_work("gpu-smoke", work)


if __name__ == "__main__":
    main()
