#!/usr/bin/env python3
"""Kiln benchmarks: time until the guest agent answers.

Peers are measured in the same run, alternating, so ratios hold on a noisy
machine:
  raw-qemu-cold   plain qemu-system-x86_64 with exactly the argv kilnd uses
                  (copied from a kilnd-launched QEMU's /proc/PID/cmdline),
                  timed from exec to the agent's first Ping reply;
  kilnd-cold      StartVM through varlink (varlinkctl), timed around the call;
                  also kilnd's own readyAt - startedAt.
  raw-qemu-clone  plain QEMU restoring a kilnd pool template (same argv as a
                  kilnd clone: RAM file mapped share=off, -incoming defer,
                  x-ignore-shared, migrate-incoming, cont), timed to Ping;
  kilnd-clone     Acquire from a template pool with nothing hot (warm 0), so
                  the call waits for a fresh clone (identity included);
  kilnd-hot       Acquire with a VM hot (the pool refills behind), on one
                  persistent connection, varlink and D-Bus alternating;
  pss             PSS of idle hot VMs (/proc/PID/smaps_rollup) in a cold
                  pool against a template pool;
  api-*           round trips on one persistent connection per transport,
                  with 100 VM records: varlink ListVMs against
                  org.varlink.service.GetInfo (its floor); D-Bus ListVMs (paths
                  only) and ObjectManager.GetManagedObjects (every property)
                  against org.freedesktop.DBus.Peer.Ping (its floor). kilnd sits
                  on a private dbus-daemon; the D-Bus client is jeepney.

Writes target/bench/report.json and report.md. QUICK=1 runs fewer rounds.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
GUEST = os.environ.get("KILN_GUEST_DIR", os.path.join(TARGET, "guest"))
KILND = os.path.join(TARGET, "release", "kilnd")
OUT = os.path.join(TARGET, "bench")
QUICK = os.environ.get("QUICK") == "1"
ROUNDS = 3 if QUICK else 10


def varlink(sock, method, params):
    out = subprocess.run(["varlinkctl", "call", "--json=short", f"unix:{sock}",
                          f"io.kiln.Manager.{method}", json.dumps(params)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method}: {out.stderr.strip()} {out.stdout.strip()}")
    return json.loads(out.stdout)


def agent_ping(path, deadline):
    """Connect to a QEMU agent socket and wait for the first Ping reply."""
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError("agent socket never appeared")
            time.sleep(0.002)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    s.sendall(json.dumps({"method": "io.kiln.Agent.Ping", "parameters": {"nonce": 1}}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("agent closed the connection")
        buf += chunk
    s.close()
    return json.loads(buf[:-1])


class VarlinkConnection:
    """A minimal varlink client: one socket, NUL-framed JSON, in order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""

    def call(self, method, params):
        self.sock.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
        while b"\0" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("kilnd closed the connection")
            self.buf += chunk
        frame, self.buf = self.buf.split(b"\0", 1)
        reply = json.loads(frame)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply}")
        return reply.get("parameters", {})


def api_round_trips(sock, calls):
    """ListVMs with 100 records vs GetInfo, alternating in blocks."""
    conn = VarlinkConnection(sock)
    existing = len(conn.call("io.kiln.Manager.ListVMs", {})["vms"])
    for i in range(existing, 100):
        conn.call("io.kiln.Manager.CreateVM", {"name": f"record{i}"})
    assert len(conn.call("io.kiln.Manager.ListVMs", {})["vms"]) == 100
    samples = {"api: ListVMs, 100 VMs (varlink)": [], "api: GetInfo floor (varlink)": []}
    methods = [("api: ListVMs, 100 VMs (varlink)", "io.kiln.Manager.ListVMs"),
               ("api: GetInfo floor (varlink)", "org.varlink.service.GetInfo")]
    for _ in range(calls // 50):
        for name, method in methods:
            for _ in range(50):
                t0 = time.perf_counter()
                conn.call(method, {})
                samples[name].append((time.perf_counter() - t0) * 1000)
    return samples


def dbus_round_trips(address, calls):
    """D-Bus calls against the same 100 VMs, alternating in blocks."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=address)
    manager = DBusAddress("/io/kiln/Kiln1/Manager", bus_name="io.kiln.Kiln1", interface="io.kiln.Kiln1.Manager")
    root = DBusAddress("/io/kiln/Kiln1", bus_name="io.kiln.Kiln1", interface="org.freedesktop.DBus.ObjectManager")
    peer = DBusAddress("/io/kiln/Kiln1/Manager", bus_name="io.kiln.Kiln1", interface="org.freedesktop.DBus.Peer")
    listed = conn.send_and_get_reply(new_method_call(manager, "ListVMs")).body[0]
    assert len(listed) == 100, len(listed)
    methods = [("api: ListVMs, 100 VMs (D-Bus, paths)", manager, "ListVMs"),
               ("api: GetManagedObjects, 100 VMs (D-Bus)", root, "GetManagedObjects"),
               ("api: Peer.Ping floor (D-Bus)", peer, "Ping")]
    samples = {name: [] for name, _, _ in methods}
    for _ in range(calls // 50):
        for name, address_, method in methods:
            for _ in range(50):
                t0 = time.perf_counter()
                conn.send_and_get_reply(new_method_call(address_, method))
                samples[name].append((time.perf_counter() - t0) * 1000)
    conn.close()
    return samples


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("QMP socket never appeared")
                time.sleep(0.001)
        self.file = self.sock.makefile("rwb")
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply}")
        return reply.get("return")


def wait_pool(conn, name, want, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        pool = conn.call("io.kiln.Manager.DescribePool", {"name": name})["pool"]
        if want(pool):
            return pool
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name}: {pool}")
        time.sleep(0.02)


def pool_scenarios(sock, bus_address, work, rounds, acquires, pss_vms):
    """Clone-to-ready against a raw template restore, hot acquires, PSS."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    conn = VarlinkConnection(sock)
    results = {"raw-qemu-clone (template restore)": [], "kilnd-clone (Acquire, nothing hot)": [],
               "kilnd-hot Acquire (varlink)": [], "kilnd-hot Acquire (D-Bus)": []}
    conn.call("io.kiln.Manager.CreatePool", {"name": "clone", "spec": {"mode": "template", "warm": 0, "max": 1}})
    # Warm-up: builds the template; its clone's argv becomes the raw peer's.
    vm = conn.call("io.kiln.Manager.Acquire", {"pool": "clone", "timeoutMs": 300000})["vm"]
    with open(f"/proc/{vm['pid']}/cmdline", "rb") as f:
        clone_argv = [a.decode() for a in f.read().split(b"\0") if a]
    template_dir = os.path.dirname(next(a for a in clone_argv if "mem-path=" in a).split("mem-path=")[1])
    conn.call("io.kiln.Manager.Release", {"id": vm["id"]})
    vm_dir = os.path.join(work, "run", "vms", vm["id"])
    for i in range(rounds):
        raw_dir = os.path.join(work, f"rawclone{i}")
        os.makedirs(raw_dir)
        argv = [a.replace(vm_dir, raw_dir).replace(f"kiln-{vm['id']}", "kiln-bench-raw") for a in clone_argv]
        t0 = time.monotonic()
        qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            qmp = Qmp(os.path.join(raw_dir, "qmp.sock"), t0 + 30)
            qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.cmd("migrate-incoming", uri=f"file:{template_dir}/state")
            while qmp.cmd("query-status")["status"] == "inmigrate":
                time.sleep(0.001)
            qmp.cmd("cont")
            agent_ping(os.path.join(raw_dir, "agent.sock"), t0 + 60)
            results["raw-qemu-clone (template restore)"].append((time.monotonic() - t0) * 1000)
        finally:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(raw_dir, ignore_errors=True)
        t0 = time.monotonic()
        vm = conn.call("io.kiln.Manager.Acquire", {"pool": "clone", "timeoutMs": 60000})["vm"]
        results["kilnd-clone (Acquire, nothing hot)"].append((time.monotonic() - t0) * 1000)
        conn.call("io.kiln.Manager.Release", {"id": vm["id"]})
        wait_pool(conn, "clone", lambda p: p["leased"] == 0 and p["booting"] == 0)
    conn.call("io.kiln.Manager.DeletePool", {"name": "clone"})

    # Hot acquires: wait until the pool is full again before each, so every
    # acquire finds a hot VM; varlink and D-Bus alternate.
    conn.call("io.kiln.Manager.CreatePool", {"name": "hot", "spec": {"mode": "template", "warm": 2, "max": 4}})
    wait_pool(conn, "hot", lambda p: p["hot"] == 2)
    bus = open_dbus_connection(bus=bus_address)
    manager = DBusAddress("/io/kiln/Kiln1/Manager", bus_name="io.kiln.Kiln1", interface="io.kiln.Kiln1.Manager")
    for i in range(acquires):
        wait_pool(conn, "hot", lambda p: p["hot"] == 2)
        if i % 2 == 0:
            t0 = time.perf_counter()
            vm_id = conn.call("io.kiln.Manager.Acquire", {"pool": "hot", "timeoutMs": 0})["vm"]["id"]
            results["kilnd-hot Acquire (varlink)"].append((time.perf_counter() - t0) * 1000)
        else:
            t0 = time.perf_counter()
            reply = bus.send_and_get_reply(new_method_call(manager, "Acquire", "sa{sv}", ("hot", {"timeoutMs": ("t", 0)})))
            results["kilnd-hot Acquire (D-Bus)"].append((time.perf_counter() - t0) * 1000)
            vm_id = reply.body[0].rsplit("/", 1)[1]
        conn.call("io.kiln.Manager.Release", {"id": vm_id})
    bus.close()
    conn.call("io.kiln.Manager.DeletePool", {"name": "hot"})

    # Memory: idle hot VMs of a cold pool and of a template pool.
    pss = {}
    for mode in ("cold", "template"):
        name = f"pss-{mode}"
        conn.call("io.kiln.Manager.CreatePool", {"name": name, "spec": {"mode": mode, "warm": pss_vms, "max": pss_vms, "refillConcurrency": 2}})
        wait_pool(conn, name, lambda p: p["hot"] == pss_vms, timeout=600)
        time.sleep(2)  # let the guests go idle
        vms = [v for v in conn.call("io.kiln.Manager.ListVMs", {})["vms"] if v.get("pool") == name]
        per_vm = []
        for v in vms:
            with open(f"/proc/{v['pid']}/smaps_rollup") as f:
                kb = next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
            per_vm.append(kb / 1024)
        pss[mode] = per_vm
        conn.call("io.kiln.Manager.DeletePool", {"name": name})
        wait_pool_gone(conn, name)
    return results, pss


def wait_pool_gone(conn, name):
    deadline = time.monotonic() + 60
    while any(v.get("pool") == name for v in conn.call("io.kiln.Manager.ListVMs", {})["vms"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} VMs never went away")
        time.sleep(0.05)


def stats(samples):
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"n": len(s), "median_ms": round(statistics.median(s), 3), "p99_ms": round(p99, 3),
            "min_ms": round(s[0], 3), "max_ms": round(s[-1], 3)}


def main():
    work = tempfile.mkdtemp(prefix="kiln-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    sock = os.path.join(work, "varlink")
    with open(os.path.join(work, "kilnd.toml"), "w") as f:
        f.write(f'state_dir = "{work}/state"\nruntime_dir = "{work}/run"\nguest_dir = "{GUEST}"\n'
                f'varlink_socket = "{sock}"\nboot_timeout_sec = 180\npool_dirs = []\n')
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                           stdout=subprocess.PIPE, text=True)
    bus_address = bus.stdout.readline().strip()
    with open(os.path.join(work, "kilnd.toml"), "a") as f:
        f.write(f'dbus = "{bus_address}"\npolkit = false\n')
    log = open(os.path.join(work, "kilnd.log"), "w")
    kilnd = subprocess.Popen([KILND, "--config", os.path.join(work, "kilnd.toml")], stdout=log, stderr=log)
    results = {"raw-qemu-cold": [], "kilnd-cold (varlink StartVM)": [], "kilnd-cold (engine readyAt-startedAt)": []}
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise RuntimeError("kilnd did not start")
            time.sleep(0.01)
        # Warm-up boot; its QEMU argv becomes the raw peer's argv.
        vm = varlink(sock, "CreateVM", {"name": "warmup"})["vm"]
        vm = varlink(sock, "StartVM", {"id": vm["id"]})["vm"]
        with open(f"/proc/{vm['pid']}/cmdline", "rb") as f:
            kiln_argv = [a.decode() for a in f.read().split(b"\0") if a]
        varlink(sock, "DeleteVM", {"id": vm["id"]})
        vm_dir = os.path.join(work, "run", "vms", vm["id"])

        for i in range(ROUNDS):
            # Plain QEMU, same argv, its own files.
            raw_dir = os.path.join(work, f"raw{i}")
            os.makedirs(raw_dir)
            argv = [a.replace(vm_dir, raw_dir).replace(f"kiln-{vm['id']}", "kiln-bench-raw") for a in kiln_argv]
            t0 = time.monotonic()
            qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                agent_ping(os.path.join(raw_dir, "agent.sock"), t0 + 180)
                results["raw-qemu-cold"].append((time.monotonic() - t0) * 1000)
            finally:
                qemu.kill()
                qemu.wait()
            shutil.rmtree(raw_dir, ignore_errors=True)

            # kilnd, through its API.
            vm = varlink(sock, "CreateVM", {"name": f"bench{i}"})["vm"]
            t0 = time.monotonic()
            ready = varlink(sock, "StartVM", {"id": vm["id"]})["vm"]
            results["kilnd-cold (varlink StartVM)"].append((time.monotonic() - t0) * 1000)
            results["kilnd-cold (engine readyAt-startedAt)"].append((ready["readyAt"] - ready["startedAt"]) / 1000)
            varlink(sock, "DeleteVM", {"id": vm["id"]})
            print(f"round {i + 1}/{ROUNDS}: raw {results['raw-qemu-cold'][-1]:.0f} ms, "
                  f"kilnd {results['kilnd-cold (varlink StartVM)'][-1]:.0f} ms", file=sys.stderr)
        pool_results, pss = pool_scenarios(sock, bus_address, work, ROUNDS, 60 if QUICK else 220,
                                           3 if QUICK else 6)
        results.update(pool_results)
        results.update(api_round_trips(sock, 200 if QUICK else 1000))
        results.update(dbus_round_trips(bus_address, 200 if QUICK else 1000))
    finally:
        kilnd.terminate()
        kilnd.wait()
        bus.kill()
        bus.wait()
        for pidfile in subprocess.run(["sh", "-c", f"ls {work}/run/vms/*/qemu.pid 2>/dev/null"],
                                      capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(open(pidfile).read()), 9)
            except (OSError, ValueError):
                pass
        shutil.rmtree(work, ignore_errors=True)

    accel = "tcg" if "tcg" in " ".join(kiln_argv) else "kvm"
    table = {name: stats(samples) for name, samples in results.items()}
    boot_floor = table["raw-qemu-cold"]["median_ms"]
    clone_floor = table["raw-qemu-clone (template restore)"]["median_ms"]
    api_floors = {"(varlink)": table["api: GetInfo floor (varlink)"]["median_ms"],
                  "(D-Bus": table["api: Peer.Ping floor (D-Bus)"]["median_ms"]}
    os.makedirs(OUT, exist_ok=True)
    pss_table = {mode: {"n": len(v), "median_mib": round(statistics.median(v), 1),
                        "min_mib": round(min(v), 1), "max_mib": round(max(v), 1),
                        "total_mib": round(sum(v), 1)} for mode, v in pss.items()}
    report = {"accel": accel, "rounds": ROUNDS, "guest": GUEST, "scenarios": table, "pss": pss_table}
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# Kiln benchmark ({accel}, {ROUNDS} rounds, alternating)", "",
             "Boots: time until the guest agent answers (floor: raw QEMU). "
             "API: one round trip (floors: varlink GetInfo, D-Bus Peer.Ping).", "",
             "| scenario | n | median ms | p99 ms | min ms | max ms | vs floor | calls/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in table.items():
        floor = next((f for tag, f in api_floors.items() if tag in name), boot_floor)
        if "clone" in name:
            floor = clone_floor
        rate = f"{1000 / s['median_ms']:.0f}" if name.startswith("api:") else ""
        lines.append(f"| {name} | {s['n']} | {s['median_ms']} | {s['p99_ms']} | {s['min_ms']} | {s['max_ms']} | "
                     f"{s['median_ms'] / floor:.2f}x | {rate} |")
    lines += ["", "Floors: boots against raw-qemu-cold, clones against raw-qemu-clone, "
              "hot acquires and API calls against their transport's floor.", "",
              "| idle hot VM, 128 MiB | n | PSS median MiB | min | max | total MiB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for mode, p in pss_table.items():
        lines.append(f"| {mode} pool | {p['n']} | {p['median_mib']} | {p['min_mib']} | {p['max_mib']} | {p['total_mib']} |")
    ratio = pss_table["template"]["median_mib"] / pss_table["cold"]["median_mib"]
    lines.append(f"\nTemplate clone PSS is {ratio:.0%} of a cold-booted VM's.")
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
