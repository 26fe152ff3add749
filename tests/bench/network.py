"""Network: what a bridge NIC costs a pool VM, and host <-> guest throughput.

One kilnd with a `[network]` table runs inside a fresh network namespace
(`ip netns exec`), so its bridge, TAPs and nft table never touch the host.
Two template pools of the same shape, one with a bridge NIC and one
without, are measured alternately:

net: kilnd-clone ...   Acquire with nothing hot: the clone's boot includes
                       its TAP and the agent's ConfigureNetwork;
net: kilnd-hot ...     Acquire with a VM hot: the NIC was made while the VM
                       warmed, so nothing network-related is on this path;
net: raw-qemu-clone ...  plain QEMU restoring the NIC pool's template with the
                       argv of a kilnd clone and a TAP of its own on the same
                       bridge (made before the clock starts; kilnd's is in
                       its `prepare` step, ~1 ms), timed to the agent's Ping:
                       the floor for NIC clones; and the same, then the guest
                       work kilnd's clone does, sent as kilnd sends it (Ping,
                       SetIdentity and ConfigureNetwork in one write), which
                       under TCG is mostly kernel code a fresh clone
                       translates afresh.

Throughput: host -> guest and guest -> host TCP to/from a busybox `nc` in
the guest, and the guest's own loopback as its ceiling under TCG (iperf3
is not in the guest image: it is busybox plus the agent). The host side
runs in a thread that entered the namespace with setns(2).
"""
import ctypes
import fcntl
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time

from kiln import Kilnd, VarlinkConnection, argv_of, delete_pool, log, wait_pool
from pools import identity_call, raw_clone_argv, raw_restore, step_medians, template_dir_of

CLONE_NIC = "net: kilnd-clone with a bridge NIC (Acquire, nothing hot)"
CLONE_PLAIN = "net: kilnd-clone without a NIC (Acquire, nothing hot)"
HOT_NIC = "net: kilnd-hot Acquire with a bridge NIC (varlink)"
HOT_PLAIN = "net: kilnd-hot Acquire without a NIC (varlink)"
RAW_NIC = "net: raw-qemu-clone with a bridge NIC (template restore)"
RAW_NIC_WORK = "net: raw-qemu-clone with a bridge NIC + identity + network (one write)"
TUNSETIFF = 0x400454CA
TAP_FLAGS = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as kilnd's TAPs
RAW_TAP = "kbraw0"
# kilnd's IPAM hands addresses out round-robin from the bottom of the
# subnet; the clone phase uses a few dozen at most.
RAW_ADDRESS = "10.77.0.254"
GATEWAY = "10.77.0.1"
# A receiver in the guest that counts what arrives into a file. busybox nc
# in listen mode hangs up when its own stdin ends (exec gives it none), so
# the counting runs as its -e program, which reads the socket to the end.
GUEST_COUNTER = "nc -l -p {port} -e sh -c 'wc -c > {out}.tmp && mv {out}.tmp {out}' </dev/null >/dev/null 2>&1"
WAIT_FOR_COUNT = "for i in $(seq 600); do [ -s {out} ] && break; sleep 0.02; done"
CLONE_NEWNET = 0x40000000


def in_netns(ns, fn, *args):
    """Run fn(*args) on a thread inside network namespace `ns`; its result."""
    out = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            out["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def open_tap(name):
    """A TAP named `name` in the calling thread's network namespace; its fd
    (the TAP goes when the last fd on it closes)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
    except OSError:
        os.close(fd)
        raise
    return fd


def raw_nic_clone(ns, clone, raw_dir, calls):
    """raw_restore of the NIC template, the clone's argv given a TAP of its
    own on the namespace's bridge as its NIC's fd."""
    argv, vm, vm_dir, template_dir = clone
    os.makedirs(raw_dir)
    fd = in_netns(ns, open_tap, RAW_TAP)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", RAW_TAP, "master", "kb0", "up"], check=True)
        raw_argv = [a.replace("fd=3", f"fd={fd}") if a.startswith("tap,") else a
                    for a in raw_clone_argv(argv, vm, vm_dir, raw_dir)]
        return raw_restore(raw_argv, raw_dir, template_dir, calls, pass_fds=(fd,))
    finally:
        os.close(fd)
        shutil.rmtree(raw_dir, ignore_errors=True)


def network_call(template_mac):
    """The ConfigureNetwork kilnd sends a NIC clone (a MAC of its own, the
    template's as the previous one, an address, the gateway, IPv6 on), as a
    raw_restore call."""
    mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    interface = {"mac": mac, "previousMac": template_mac, "address": RAW_ADDRESS, "prefixLength": 24, "ipv6": True}
    return ("network", "io.kiln.Agent.ConfigureNetwork", {"interfaces": [interface], "gateway": GATEWAY})


def exec_vm(conn, vm_id, script, timeout_s=120):
    return conn.call("ExecVM", {"id": vm_id, "command": ["sh", "-c", script], "timeoutSec": timeout_s})


def send_to_guest(address, port, nbytes, deadline_s=120):
    """Connect (retrying until the guest listens), send nbytes, wait for the
    guest to close: seconds of the transfer."""
    end = time.monotonic() + 30
    while True:
        try:
            s = socket.create_connection((address, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
    s.settimeout(deadline_s)
    chunk = b"\0" * (256 * 1024)
    t0 = time.monotonic()
    sent = 0
    while sent < nbytes:
        sent += s.send(chunk[: min(len(chunk), nbytes - sent)])
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    elapsed = time.monotonic() - t0
    s.close()
    return elapsed


def receive_from_guest(listener, nbytes, deadline_s=120):
    """Accept one connection and read until EOF: (seconds, bytes)."""
    listener.settimeout(deadline_s)
    c, _ = listener.accept()
    c.settimeout(deadline_s)
    t0 = time.monotonic()
    got = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        got += len(b)
    elapsed = time.monotonic() - t0
    c.close()
    return elapsed, got


def throughput(ns, conn, vm, mib):
    """Host -> guest, guest -> host, and guest loopback, each `mib` MiB."""
    vm_id, address = vm["id"], vm["network"][0]["address"]
    nbytes = mib << 20
    rows = []

    def row(what, seconds):
        rows.append({"what": what, "mib": mib, "s": round(seconds, 3),
                     "mbit_s": round(nbytes * 8 / seconds / 1e6, 1)})

    exec_vm(conn, vm_id, f"rm -f /tmp/in.n; ({GUEST_COUNTER.format(port=5001, out='/tmp/in.n')} &)")
    seconds = in_netns(ns, send_to_guest, address, 5001, nbytes)
    got = exec_vm(conn, vm_id, f"{WAIT_FOR_COUNT.format(out='/tmp/in.n')}; cat /tmp/in.n")["stdout"].strip()
    if got != str(nbytes):
        raise RuntimeError(f"host -> guest: {got!r} of {nbytes} bytes arrived")
    row("host -> guest", seconds)

    def guest_to_host():
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((GATEWAY, 5002))
        listener.listen(1)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=receive_from_guest(listener, nbytes)))
        t.start()
        return listener, t, result

    listener, t, result = in_netns(ns, guest_to_host)
    exec_vm(conn, vm_id, f"dd if=/dev/zero bs=64k count={nbytes // 65536} 2>/dev/null | nc {GATEWAY} 5002")
    t.join()
    listener.close()
    seconds, got = result["r"]
    if got != nbytes:
        raise RuntimeError(f"guest -> host: {got} of {nbytes} bytes")
    row("guest -> host", seconds)

    # /proc/uptime: busybox date has no sub-second format; 10 ms resolution.
    # Timed until the receiver has counted everything.
    r = exec_vm(conn, vm_id, f"rm -f /tmp/lo.n; ({GUEST_COUNTER.format(port=5003, out='/tmp/lo.n')} &); "
                             "sleep 0.5; s=$(cut -d' ' -f1 /proc/uptime); "
                             f"dd if=/dev/zero bs=64k count={nbytes // 65536} 2>/dev/null | nc 127.0.0.1 5003; "
                             f"{WAIT_FOR_COUNT.format(out='/tmp/lo.n')}; "
                             "e=$(cut -d' ' -f1 /proc/uptime); echo $s $e $(cat /tmp/lo.n)")
    try:
        start, end, got = r["stdout"].split()
        start, end, got = float(start), float(end), int(got)
    except ValueError as e:
        raise RuntimeError(f"guest loopback: {r}") from e
    if got != nbytes:
        raise RuntimeError(f"guest loopback: {got} of {nbytes} bytes arrived: {r}")
    row("guest loopback (the guest's ceiling)", max(end - start, 0.01))
    return rows


def run(plan):
    """(samples, report section)."""
    ns = f"kiln-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    samples = {CLONE_NIC: [], CLONE_PLAIN: [], HOT_NIC: [], HOT_PLAIN: [], RAW_NIC: [], RAW_NIC_WORK: []}
    steps = {RAW_NIC: [], RAW_NIC_WORK: []}
    try:
        config = '[network]\nbridge = "kb0"\nsubnet = "10.77.0.0/24"\n'
        with Kilnd(extra_config=config, wrap=["ip", "netns", "exec", ns]) as k:
            conn = VarlinkConnection(k.sock)
            shapes = {"net": {"network": {"mode": "bridge"}}, "plain": {}}
            for pool, extra in shapes.items():
                conn.call("CreatePool", {"name": pool, "spec": {"mode": "template", "warm": 0, "max": 1,
                                                                "vm": dict({"memoryMiB": 128}, **extra)}})
            # Warm-up: each pool's template is built by its first Acquire;
            # the NIC clone's argv becomes the raw peer's.
            for pool in shapes:
                vm = conn.call("Acquire", {"pool": pool, "timeoutMs": 300000})["vm"]
                if pool == "net":
                    argv = argv_of(vm["pid"])
                    clone = (argv, vm, k.vm_dir(vm["id"]), template_dir_of(argv))
                conn.call("Release", {"id": vm["id"]})
            # The template's MAC, which a raw clone's NIC starts with.
            probe = ("mac", "io.kiln.Agent.Exec", {"argv": ["sh", "-c", "cat /sys/class/net/e*/address"]})
            _, _, [probed] = raw_nic_clone(ns, clone, os.path.join(k.work, "rawnic"), [probe])
            template_mac = probed["stdout"].strip()
            kilnd_steps_before = len(k.boot_steps())
            for i in range(plan["clones"]):
                for pool, name in (("net", CLONE_NIC), ("plain", CLONE_PLAIN))[:: 1 if i % 2 == 0 else -1]:
                    wait_pool(conn, pool, lambda p: p["leased"] == 0 and p["booting"] == 0)
                    t0 = time.monotonic()
                    vm = conn.call("Acquire", {"pool": pool, "timeoutMs": 60000})["vm"]
                    samples[name].append((time.monotonic() - t0) * 1000)
                    conn.call("Release", {"id": vm["id"]})
                for name, calls in ((RAW_NIC, []), (RAW_NIC_WORK, [identity_call(), network_call(template_mac)])):
                    total, raw_steps, _ = raw_nic_clone(ns, clone, os.path.join(k.work, f"rawnic{i}"), calls)
                    samples[name].append(total)
                    steps[name].append(raw_steps)
            # The NIC clones' own steps (kilnd's debug log): with a NIC,
            # the only clones carrying a `network` step.
            kilnd_nic_steps = [s for s in k.boot_steps()[kilnd_steps_before:]
                               if s.pop("clone") and "network" in s]
            for pool in shapes:
                conn.call("ResizePool", {"name": pool, "warm": 1, "max": 2})
            for i in range(plan["hot"]):
                for pool, name in (("net", HOT_NIC), ("plain", HOT_PLAIN))[:: 1 if i % 2 == 0 else -1]:
                    wait_pool(conn, pool, lambda p: p["hot"] == 1, timeout=300)
                    t0 = time.perf_counter()
                    vm = conn.call("Acquire", {"pool": pool, "timeoutMs": 0})["vm"]
                    samples[name].append((time.perf_counter() - t0) * 1000)
                    conn.call("Release", {"id": vm["id"]})
            wait_pool(conn, "net", lambda p: p["hot"] == 1, timeout=300)
            vm = conn.call("Acquire", {"pool": "net", "timeoutMs": 60000})["vm"]
            rows = throughput(ns, conn, vm, plan["mib"])
            for r in rows:
                log(f"throughput {r['what']}: {r['mbit_s']} Mbit/s")
            conn.call("Release", {"id": vm["id"]})
            for pool in shapes:
                delete_pool(conn, pool)
            conn.close()
        note = ("TAP create + enslave + up alone: ~3 ms per NIC (`cargo test -p kiln-net --test netns "
                "tap_create_attach_delete_cost -- --nocapture`), done in the boot sub-task before QEMU starts.")
        clone_steps = {"raw": step_medians(steps[RAW_NIC]), "raw_work": step_medians(steps[RAW_NIC_WORK]),
                       "kilnd": step_medians(kilnd_nic_steps), "n": len(kilnd_nic_steps)}
        return samples, {"throughput": rows, "note": note, "clone_steps": clone_steps}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
