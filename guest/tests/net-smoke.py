#!/usr/bin/env python3
"""Network smoke test: kiln-net + the guest agent's ConfigureNetwork under
real QEMU (TCG), inside a network namespace the test creates.

  guest/tests/net-smoke.py [OUTDIR]      (default: target/guest; needs root)

In a fresh namespace `kiln-t-<random>` it runs kiln-net's `knet` example
(built with cargo if missing) to create the bridge (gateway 10.77.0.1/24,
masquerade, forwarding) and a persistent TAP per VM, whose descriptor knet
hands to QEMU (`-netdev tap,fd=N -device virtio-net-device,mac=...`), the
way kilnd will. QEMU itself runs in the caller's namespace: only the TAP
lives in the test namespace. Then, end to end:

  - ConfigureNetwork (MAC, address, gateway, DNS) through the agent;
  - host -> guest ping, guest -> gateway ping, TCP echo to a busybox nc
    started in the guest with Exec, a bulk TCP transfer (throughput);
  - a port forward reaching the guest from the namespace itself (output
    chain) and from a second namespace over a veth (prerouting + forwarding);
  - a template clone: snapshot, restore into a second QEMU with its own TAP
    and MAC, ConfigureNetwork with previousMac, both VMs reachable with
    different MACs and addresses;
  - removing a VM removes its TAP and its forward; reconcile keeps live ones.

Traffic only ever goes to addresses inside the test's own namespaces.
Everything (QEMUs, namespaces, work dir) is cleaned up, also on failure.
Environment: KILN_QEMU, KILN_SMOKE_APPEND, KILN_SMOKE_KEEP=1, CARGO,
CARGO_TARGET_DIR (see boot-smoke.py).
"""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/lib"))
from kiln_testlib import (REPO, Agent, Failure, Qmp, check, microvm_argv,  # noqa: E402
                          print_console_tails, remove_work, skip, step)

BOOT_TIMEOUT = 120.0

SUBNET_PREFIX = "10.77.0"
GATEWAY = f"{SUBNET_PREFIX}.1"
# The client namespace's link (TEST-NET-1, documentation addresses).
CLIENT_HOST, CLIENT_PEER = "192.0.2.1", "192.0.2.2"
ECHO_PORT, BULK_PORT, HOST_PORT = 7777, 7778, 8080
BULK_BYTES = 8 * 1024 * 1024


# --- helpers run inside a namespace (ip netns exec NS net-smoke.py --NAME ...) ---

def icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def helper_ping(addr, count=3, timeout=3.0):
    """ICMP echo with a raw socket (the host has no ping binary); prints
    the number of replies and the round-trip times."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(count):
        payload = b"kiln-net-smoke" + bytes(16)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, icmp_checksum(header + payload), ident, seq) + payload
        t0 = time.monotonic()
        sock.sendto(packet, (addr, 0))
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, src = sock.recvfrom(2048)
            except socket.timeout:
                break
            ihl = (data[0] & 0x0F) * 4
            typ, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src[0] == addr and typ == 0 and rid == ident and rseq == seq:
                rtts.append((time.monotonic() - t0) * 1000)
                break
        time.sleep(0.1)
    print(json.dumps({"received": len(rtts), "rttMs": [round(r, 2) for r in rtts]}))


def helper_echo(host, port, message, timeout=10.0):
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(message.encode())
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    print(json.dumps({"reply": got.decode(errors="replace")}))


def helper_bulk(host, port, nbytes, timeout=60.0):
    block = os.urandom(65536)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        sent = 0
        while sent < int(nbytes):
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the guest closes once it has read everything
    secs = time.monotonic() - t0
    print(json.dumps({"bytes": sent, "seconds": round(secs, 3), "mbitPerSec": round(sent * 8 / secs / 1e6, 1)}))


HELPERS = {"--ping": helper_ping, "--echo": helper_echo, "--bulk": helper_bulk}


# --- the test ---------------------------------------------------------------

class Env:
    def __init__(self, guest, work, knet):
        self.guest, self.work, self.knet_bin = guest, work, knet
        tag = os.urandom(3).hex()
        self.ns = f"kiln-t-{tag}"
        self.client = f"kiln-t-{tag}c"
        self.bridge = f"ks{tag}"
        self.procs = []
        self.namespaces = []

    def run(self, argv, ns=None, check_ok=True, timeout=60):
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check_ok and out.returncode != 0:
            raise Failure(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def knet(self, *args, check_ok=True):
        out = self.run([self.knet_bin, "--netns", f"/run/netns/{self.ns}", "--bridge", self.bridge,
                        "--masquerade", *map(str, args)], check_ok=check_ok)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else out

    def helper(self, ns, name, *args, timeout=90):
        out = self.run([sys.executable, os.path.abspath(__file__), name, *map(str, args)], ns=ns,
                       check_ok=False, timeout=timeout)
        if out.returncode != 0:
            return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
        return json.loads(out.stdout)

    def add_ns(self, name):
        self.run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.run(["ip", "link", "set", "lo", "up"], ns=name)

    def start_vm(self, name, vm_id, mac, incoming=None):
        """QEMU on the guest image with the agent port and one NIC whose
        TAP knet creates and passes as an inherited descriptor."""
        argv = microvm_argv(self.guest, self.work, name, no_reboot=True, incoming=incoming)
        argv += ["-netdev", "tap,id=net0,fd={fd}",
                 "-device", f"virtio-net-device,netdev=net0,mac={mac}"]
        cmd = [self.knet_bin, "--netns", f"/run/netns/{self.ns}", "--bridge", self.bridge,
               "tap", vm_id, "0", "--", *argv]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        info = json.loads(proc.stdout.readline() or "{}")
        check(info.get("tap") == f"kt{vm_id}0", f"knet tap: {info}")
        return proc, info, time.monotonic() - t0

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def configure(agent, mac, address, previous=None):
    iface = {"mac": mac, "address": address, "prefixLength": 24}
    if previous:
        iface["previousMac"] = previous
    t0 = time.monotonic()
    r = agent.call("io.kiln.Agent.ConfigureNetwork",
                   {"interfaces": [iface], "gateway": GATEWAY, "dns": [GATEWAY]})
    return r, (time.monotonic() - t0) * 1000


def echo_until_up(env, addr, message, timeout=20.0):
    """TCP echo to the guest's nc, retried while the server is starting."""
    deadline = time.monotonic() + timeout
    while True:
        r = env.helper(env.ns, "--echo", addr, ECHO_PORT, message)
        if r.get("reply") == message:
            return
        check(time.monotonic() < deadline, f"TCP echo to {addr}: {r}")
        time.sleep(0.3)


def ping_ok(env, addr):
    r = env.helper(env.ns, "--ping", addr)
    check(r.get("received", 0) >= 2, f"ping {addr} from the host namespace: {r}")
    return r


def run(env):
    # VM a boots with the "template" MAC, is snapshotted before it is
    # configured (the template state), then configured as a clone would be;
    # VM b is restored from that snapshot: both must get their own MAC.
    t_id, a_id, b_id = ("%s0%s" % (c, os.urandom(5).hex()) for c in "tab")
    mac_t = env.knet("lease", t_id, "0")["mac"]
    lease_a = env.knet("lease", a_id, "0", f"{SUBNET_PREFIX}.2")
    lease_b = env.knet("lease", b_id, "0", f"{SUBNET_PREFIX}.3")
    mac_a, mac_b = lease_a["mac"], lease_b["mac"]
    addr_a, addr_b = lease_a["address"], lease_b["address"]
    check(len({mac_t, mac_a, mac_b}) == 3, "IPAM gave two VMs one MAC")

    step("namespace, bridge, nft table (knet ensure)")
    env.add_ns(env.ns)
    r = env.knet("ensure")
    check(r["created"] and r["bridge"] == env.bridge, f"ensure: {r}")
    addrs = env.run(["ip", "-4", "-o", "addr", "show", "dev", env.bridge], ns=env.ns).stdout
    check(f"{GATEWAY}/24" in addrs, f"bridge address: {addrs}")

    step("VM a: TAP fd handed to QEMU, boot, snapshot (template state), ConfigureNetwork")
    vm_a, info, tap_s = env.start_vm("a", a_id, mac_t)
    print(f"    TAP create + attach + exec QEMU: {tap_s * 1000:.0f} ms (knet process included)")
    agent = Agent(f"{env.work}/a-agent.sock")
    t0 = time.monotonic()
    agent.sync_ping(BOOT_TIMEOUT)
    print(f"    first Ping after {time.monotonic() - t0:.1f} s")
    details = env.run(["ip", "-d", "link", "show", "dev", info["tap"]], ns=env.ns).stdout
    check("vnet_hdr on persist on" in details and f"master {env.bridge}" in details, details)
    r = agent.exec(["sh", "-c", "cat /sys/class/net/eth0/address /sys/class/net/eth0/operstate"])
    check(r["stdout"].split() == [mac_t, "down"], f"fresh guest NIC: {r['stdout']!r}, want {mac_t} down")
    qmp_a = Qmp(f"{env.work}/a-qmp.sock")
    qmp_a.cmd("stop")
    qmp_a.cmd("migrate", uri=f"file:{env.work}/state")
    deadline = time.monotonic() + 60
    while qmp_a.cmd("query-migrate").get("status") != "completed":
        check(time.monotonic() < deadline, "migration did not complete")
        time.sleep(0.05)
    qmp_a.cmd("cont")
    reply, ms = configure(agent, mac_a, addr_a, previous=mac_t)
    print(f"    ConfigureNetwork: {ms:.0f} ms -> {reply}")
    check(reply["interfaces"] == [{"name": "eth0", "mac": mac_a}], f"{reply}")
    r = agent.exec(["sh", "-c", "ip -4 addr show dev eth0; ip route; cat /etc/resolv.conf; ip link show lo"])
    out = r["stdout"]
    check(f"inet {addr_a}/24" in out and f"default via {GATEWAY} dev eth0" in out
          and f"nameserver {GATEWAY}" in out and "LOOPBACK,UP" in out, f"guest config: {out}")

    step("bad ConfigureNetwork calls are named errors")
    r = agent.request("io.kiln.Agent.ConfigureNetwork",
                      {"interfaces": [{"mac": "02:00:00:00:00:99", "address": "10.77.0.9", "prefixLength": 24}]},
                      timeout=30)
    check(r.get("error") == "io.kiln.Agent.NoSuchInterface"
          and r["parameters"] == {"mac": "02:00:00:00:00:99"}, f"{r}")
    r = agent.request("io.kiln.Agent.ConfigureNetwork",
                      {"interfaces": [{"mac": mac_a, "address": addr_a, "prefixLength": 24}], "gateway": "10.78.0.1"})
    check(r.get("error") == "org.varlink.service.InvalidParameter"
          and r["parameters"] == {"parameter": "gateway"}, f"{r}")

    step("host -> guest ping, guest -> gateway ping")
    r = ping_ok(env, addr_a)
    print(f"    host -> guest RTT {r['rttMs']} ms")
    r = agent.exec(["ping", "-c", "2", "-W", "3", GATEWAY])
    check(r["exitCode"] == 0, f"guest ping: {r}")

    step("TCP echo to a server the agent started in the guest")
    r = agent.exec(["sh", "-c", "printf '#!/bin/sh\\ncat >/dev/null\\n' >/tmp/sink && chmod +x /tmp/sink &&"
                                f" (nc -ll -p {ECHO_PORT} -e /bin/cat >/dev/null 2>&1 &) &&"
                                f" (nc -ll -p {BULK_PORT} -e /tmp/sink >/dev/null 2>&1 &)"])
    check(r["exitCode"] == 0, f"start nc: {r}")
    echo_until_up(env, addr_a, "hello kiln\n")
    r = env.helper(env.ns, "--bulk", addr_a, BULK_PORT, BULK_BYTES)
    check("mbitPerSec" in r, f"bulk: {r}")
    print(f"    host -> guest TCP: {r['bytes'] >> 20} MiB in {r['seconds']} s = {r['mbitPerSec']} Mbit/s (TCG)")

    step("port forward: from the namespace itself and from a client namespace")
    r = env.knet("forward", a_id, "tcp", HOST_PORT, addr_a, ECHO_PORT)
    check(r["outcome"] == "Added", f"forward: {r}")
    r = env.knet("forward", b_id, "tcp", HOST_PORT, addr_b, ECHO_PORT, check_ok=False)
    check(getattr(r, "returncode", 0) != 0 and "already forwarded" in r.stderr, f"duplicate forward: {r}")
    r = env.helper(env.ns, "--echo", GATEWAY, HOST_PORT, "via output chain\n")
    check(r.get("reply") == "via output chain\n", f"forward (local): {r}")
    env.add_ns(env.client)
    veth_host, veth_client = f"vh{env.bridge[2:]}", f"vc{env.bridge[2:]}"
    env.run(["ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_client], ns=env.ns)
    env.run(["ip", "link", "set", veth_client, "netns", env.client], ns=env.ns)
    env.run(["ip", "addr", "add", f"{CLIENT_HOST}/24", "dev", veth_host], ns=env.ns)
    env.run(["ip", "link", "set", veth_host, "up"], ns=env.ns)
    env.run(["ip", "addr", "add", f"{CLIENT_PEER}/24", "dev", veth_client], ns=env.client)
    env.run(["ip", "link", "set", veth_client, "up"], ns=env.client)
    r = env.helper(env.client, "--echo", CLIENT_HOST, HOST_PORT, "via prerouting\n")
    check(r.get("reply") == "via prerouting\n", f"forward (client namespace): {r}")

    step("template clone: restore the snapshot as b with its own TAP and MAC")
    t0 = time.monotonic()
    vm_b, _, _ = env.start_vm("b", b_id, mac_b, incoming=f"file:{env.work}/state")
    qmp_b = Qmp(f"{env.work}/b-qmp.sock")
    while qmp_b.cmd("query-status")["status"] == "inmigrate":
        time.sleep(0.01)
    qmp_b.cmd("cont")
    agent_b = Agent(f"{env.work}/b-agent.sock")
    agent_b.sync_ping()
    print(f"    clone answered Ping {time.monotonic() - t0:.2f} s after launch")
    migrated = qmp_b.cmd("query-rx-filter")[0]["main-mac"]
    r = agent_b.exec(["cat", "/sys/class/net/eth0/address"])
    print(f"    clone restored with -device mac={mac_b}: device MAC {migrated}, guest MAC {r['stdout'].strip()}")
    check(migrated == mac_t and r["stdout"].strip() == mac_t,
          "expected the clone to keep the template's MAC until told otherwise")
    fdb = env.run(["bridge", "fdb", "show", "dev", f"kt{b_id}0"], ns=env.ns).stdout
    print(f"    template MAC learned on the clone's port (QEMU's post-restore announce): {mac_t in fdb}")
    reply, ms = configure(agent_b, mac_b, addr_b, previous=mac_t)
    print(f"    ConfigureNetwork on the clone: {ms:.0f} ms")
    check(reply["interfaces"] == [{"name": "eth0", "mac": mac_b}], f"{reply}")
    check(qmp_b.cmd("query-rx-filter")[0]["main-mac"] == mac_b, "device MAC not updated")
    # Same call again: idempotent (the interface is found by its new MAC).
    configure(agent_b, mac_b, addr_b, previous=mac_t)
    check(agent.exec(["cat", "/sys/class/net/eth0/address"])["stdout"].strip() == mac_a, "a's MAC changed")
    ping_ok(env, addr_a)
    ping_ok(env, addr_b)
    agent_b.exec(["sh", "-c", f"(nc -ll -p {ECHO_PORT} -e /bin/cat >/dev/null 2>&1 &)"])
    echo_until_up(env, addr_b, "clone echo\n")
    neigh = env.run(["ip", "neigh", "show", "dev", env.bridge], ns=env.ns).stdout
    check(f"{addr_a} lladdr {mac_a}" in neigh and f"{addr_b} lladdr {mac_b}" in neigh, f"neighbours: {neigh}")

    step("clone reconfigured while QEMU announces it (config interrupts): the agent never deadlocks")
    # A restored virtio-net announces itself: QEMU raises a config
    # interrupt per round and the guest's config work takes the RTNL lock.
    # On this kernel (6.12) virtnet_close() waits for that work with the
    # RTNL lock held, so taking eth0 down at that moment hangs the guest's
    # networking for good: ConfigureNetwork must change a running NIC live.
    qmp_b.cmd("announce-self", initial=1, max=2, rounds=1000, step=1)
    macs = ["52:54:00:77:00:99", mac_b]
    for i in range(12):
        mac, previous = macs[i % 2], macs[(i + 1) % 2]
        reply, ms = configure(agent_b, mac, addr_b, previous=previous)
        check(reply["interfaces"] == [{"name": "eth0", "mac": mac}], f"round {i}: {reply}")
    print(f"    12 reconfigurations during the announcements, the last {ms:.0f} ms")
    ping_ok(env, addr_b)

    step("remove a: TAP and forward go; reconcile keeps b")
    vm_a.kill()
    vm_a.wait()
    r = env.knet("remove", a_id)
    check(r["taps"] == [f"kt{a_id}0"] and len(r["forwards"]) == 1, f"remove: {r}")
    check(env.run(["ip", "link", "show", "dev", f"kt{a_id}0"], ns=env.ns, check_ok=False).returncode != 0,
          "a's TAP still there")
    r = env.helper(env.ns, "--echo", GATEWAY, HOST_PORT, "x", timeout=30)
    check("reply" not in r, f"forward still answers: {r}")
    r = env.knet("reconcile", b_id)
    check(r == {"taps": [], "forwards": []}, f"reconcile: {r}")
    ping_ok(env, addr_b)
    agent_b.call("io.kiln.Agent.Shutdown")
    check(vm_b.wait(60) == 0, "clone QEMU did not exit cleanly")
    r = env.knet("reconcile")
    check(r["taps"] == [f"kt{b_id}0"], f"reconcile after b: {r}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] in HELPERS:
        HELPERS[sys.argv[1]](*sys.argv[2:])
        return
    if os.geteuid() != 0:
        try:
            skip("the network smoke test needs root (network namespaces, TAPs, nftables)")
        except Failure as e:
            sys.exit(f"net-smoke: FAIL: {e}")
        return
    guest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target", "guest"))
    for f in ("vmlinuz", "initramfs"):
        if not os.path.exists(os.path.join(guest, f)):
            sys.exit(f"net-smoke: {guest}/{f} missing; run make guest")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    subprocess.run([os.environ.get("CARGO", "cargo"), "build", "--quiet", "-p", "kiln-net", "--example", "knet"],
                   cwd=REPO, check=True, env={**os.environ, "CARGO_TARGET_DIR": target})
    knet = os.path.join(target, "debug", "examples", "knet")
    work = tempfile.mkdtemp(prefix="kiln-net-smoke-")
    env = Env(guest, work, knet)
    t0 = time.monotonic()
    try:
        run(env)
        print(f"net-smoke: PASS ({time.monotonic() - t0:.1f} s)")
    except (Failure, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
        ours = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == os.path.abspath(__file__)]
        where = f" (at net-smoke.py:{ours[-1].lineno}: {ours[-1].line})" if ours else ""
        print(f"net-smoke: FAIL: {e!r}{where}", file=sys.stderr)
        print_console_tails(work)
        sys.exit(1)
    finally:
        env.cleanup()
        remove_work("net-smoke", work)


if __name__ == "__main__":
    main()
