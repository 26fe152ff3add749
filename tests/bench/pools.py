"""Pool latencies and API round trips.

raw-qemu-clone  plain QEMU restoring a kilnd pool template with the argv of a
                kilnd clone (RAM file mapped share=off, -incoming defer,
                x-ignore-shared, migrate-incoming; the template was saved
                without its run state, so the clone runs once loaded),
                timed to the agent's Ping: the floor for clones;
raw-qemu-clone + identity  the same, then the guest work kilnd's clone does
                too, sent as kilnd sends it: the synced Ping (a lone NUL
                first) and SetIdentity (hostname, machine id, entropy) in
                one write. Under
                TCG a clone's first SetIdentity is guest code translated
                afresh (~5–10 ms; a second one ~1 ms), so this is the
                floor for the same work;
kilnd-clone     Acquire from a template pool with nothing hot (warm 0), so the
                call waits for a fresh clone (identity set-up included);
kilnd-hot       Acquire with a VM hot, on one persistent connection, varlink
                and D-Bus alternating; before each, the pool is back to warm
                (the refill runs behind the previous acquire); and the
                engine's own share of each (`engine_us` from kilnd's debug
                log: pick, lease record write, events), the issue-4 target;
api-*           round trips on one persistent connection per transport with
                100 VM records: varlink ListVMs against
                org.varlink.service.GetInfo (its floor); D-Bus ListVMs (paths)
                and ObjectManager.GetManagedObjects (every property) against
                org.freedesktop.DBus.Peer.Ping (its floor). kilnd sits on a
                private dbus-daemon; the D-Bus client is jeepney.
                GetManagedObjects is timed twice: with the reply read off
                the socket whole but not decoded (kilnd + the bus), and
                decoded by jeepney (pure Python, which takes most of the
                time for 100 objects' properties).
"""
import os
import secrets
import shutil
import subprocess
import statistics
import time

from kiln import Agent, Qmp, VarlinkConnection, agent_ping, argv_of, log, wait_pool

RAW_CLONE = "raw-qemu-clone (template restore)"
RAW_CLONE_IDENTITY = "raw-qemu-clone + identity (restore, synced Ping, SetIdentity)"
KILND_CLONE = "kilnd-clone (Acquire, nothing hot)"
HOT_VARLINK = "kilnd-hot Acquire (varlink)"
HOT_DBUS = "kilnd-hot Acquire (D-Bus)"
HOT_ENGINE = "kilnd-hot Acquire, engine share (actor, from kilnd's log)"


def dbus_manager():
    from jeepney import DBusAddress
    return DBusAddress("/io/kiln/Kiln1/Manager", bus_name="io.kiln.Kiln1", interface="io.kiln.Kiln1.Manager")


def raw_restore(argv, run_dir, template_dir, calls=(), pass_fds=()):
    """Exec a clone's argv, restore the template over QMP, time to agent Ping.

    The template was saved without its run state, so the clone runs by
    itself once loaded, as in kilnd: no polling, no `cont`. `calls`
    ((step, method, parameters), ...) are sent behind a synced Ping in one
    write, as kilnd sends a clone's SetIdentity and ConfigureNetwork, and
    timed to their replies. Returns the total in ms and the steps kilnd's
    `boot steps` log names (launch: exec to QMP connected; restore: the
    load started; agent: to the Ping reply, the load included; then one
    per call), and the calls' replies."""
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            pass_fds=pass_fds)
    try:
        qmp = Qmp(os.path.join(run_dir, "qmp.sock"), timeout=30, pause=0.001)
        t_launch = time.monotonic()
        qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate-incoming", uri=f"file:{template_dir}/state")
        t_restore = time.monotonic()
        steps = {"launch": t_launch - t0, "restore": t_restore - t_launch}
        if not calls:
            agent_ping(os.path.join(run_dir, "agent.sock"), t0 + 60)
            t_agent, replies = time.monotonic(), []
        else:
            agent = Agent(os.path.join(run_dir, "agent.sock"), connect_timeout=60, pause=0.002)
            try:
                _, t_agent, replies = agent.sync_ping_then([(method, params) for _, method, params in calls])
            finally:
                agent.close()
        steps["agent"] = t_agent - t_restore
        t_end = t_agent
        for (step, _, _), (_, t_reply) in zip(calls, replies):
            steps[step], t_end = t_reply - t_end, t_reply
        return (t_end - t0) * 1000, {k: v * 1000 for k, v in steps.items()}, [r for r, _ in replies]
    finally:
        qemu.kill()
        qemu.wait()


def identity_call():
    """The SetIdentity kilnd sends a clone, as a raw_restore call."""
    return ("identity", "io.kiln.Agent.SetIdentity",
            {"hostname": "raw-clone", "machineId": secrets.token_hex(16), "entropyHex": secrets.token_hex(32)})


def raw_clone_argv(argv, vm, vm_dir, raw_dir):
    """A kilnd clone's argv with its run dir and name swapped for `raw_dir`'s."""
    return [a.replace(vm_dir, raw_dir).replace(f"kiln-{vm['id']}", "kiln-bench-raw") for a in argv]


def template_dir_of(argv):
    """The template a clone's argv maps its RAM from."""
    return os.path.dirname(next(a for a in argv if "mem-path=" in a).split("mem-path=")[1])


def step_medians(runs):
    """{step: median ms} over a list of {step: ms}."""
    names = [n for n in runs[0]] if runs else []
    return {n: round(statistics.median(r[n] for r in runs if n in r), 1) for n in names}


def clones(kilnd, rounds, pool, concurrency):
    """Raw template restore against Acquire from a pool with nothing hot.

    Creates the template pool `pool` (warm 0); later scenarios reuse it and
    its template.
    """
    conn = VarlinkConnection(kilnd.sock)
    results = {RAW_CLONE: [], RAW_CLONE_IDENTITY: [], KILND_CLONE: []}
    conn.call("CreatePool", {"name": pool, "spec": {"mode": "template", "warm": 0, "max": 1,
                                                    "refillConcurrency": concurrency}})
    # Warm-up: builds the template; its clone's argv becomes the raw peer's.
    t0 = time.monotonic()
    vm = conn.call("Acquire", {"pool": pool, "timeoutMs": 300000})["vm"]
    template_build_ms = (time.monotonic() - t0) * 1000
    argv = argv_of(vm["pid"])
    template_dir = template_dir_of(argv)
    conn.call("Release", {"id": vm["id"]})
    vm_dir = kilnd.vm_dir(vm["id"])
    raw_steps, raw_identity_steps = [], []
    kilnd_steps_before = len(kilnd.boot_steps())
    for i in range(rounds):
        for name, identity, step_list in ((RAW_CLONE, False, raw_steps),
                                          (RAW_CLONE_IDENTITY, True, raw_identity_steps)):
            raw_dir = os.path.join(kilnd.work, f"rawclone{i}")
            os.makedirs(raw_dir)
            calls = [identity_call()] if identity else []
            total, steps, _ = raw_restore(raw_clone_argv(argv, vm, vm_dir, raw_dir), raw_dir, template_dir, calls)
            results[name].append(total)
            step_list.append(steps)
            shutil.rmtree(raw_dir, ignore_errors=True)
        t0 = time.monotonic()
        got = conn.call("Acquire", {"pool": pool, "timeoutMs": 60000})["vm"]
        results[KILND_CLONE].append((time.monotonic() - t0) * 1000)
        conn.call("Release", {"id": got["id"]})
        wait_pool(conn, pool, lambda p: p["leased"] == 0 and p["booting"] == 0)
    log(f"clones: raw {sorted(results[RAW_CLONE])[rounds // 2]:.0f} ms, "
        f"kilnd {sorted(results[KILND_CLONE])[rounds // 2]:.0f} ms (median)")
    conn.close()
    # Each Acquire's clone (the pool has max 1 and waits for the release,
    # so there is no refill clone in between).
    kilnd_steps = [s for s in kilnd.boot_steps()[kilnd_steps_before:] if s.pop("clone")]
    total = statistics.median(results[KILND_CLONE])
    kilnd_medians = step_medians(kilnd_steps)
    # What the boot sub-task does not cover: the Acquire call, the records
    # written before and after, the actor's hand-offs.
    kilnd_medians["outside the boot task"] = round(total - sum(kilnd_medians.values()), 1)
    steps = {"raw": step_medians(raw_steps), "raw_identity": step_medians(raw_identity_steps),
             "kilnd": kilnd_medians, "n": len(kilnd_steps)}
    return results, {"template build, first Acquire of a new pool (ms)": round(template_build_ms, 1)}, steps


def hot_acquires(kilnd, pool, acquires, budget_s, min_acquires):
    """Acquire from a template pool kept at 2 hot, varlink and D-Bus alternating.

    Stops after `budget_s` once `min_acquires` were made.
    """
    from jeepney import new_method_call
    from jeepney.io.blocking import open_dbus_connection

    conn = VarlinkConnection(kilnd.sock)
    results = {HOT_VARLINK: [], HOT_DBUS: []}
    conn.call("ResizePool", {"name": pool, "warm": 2, "max": 4})
    bus = open_dbus_connection(bus=kilnd.bus_address)
    manager = dbus_manager()
    deadline = time.monotonic() + budget_s
    for i in range(acquires):
        if i >= min_acquires and time.monotonic() > deadline:
            log(f"hot acquires: {i} in the {budget_s} s budget")
            break
        wait_pool(conn, pool, lambda p: p["hot"] == 2, timeout=300)
        t0 = time.perf_counter()
        if i % 2 == 0:
            vm_id = conn.call("Acquire", {"pool": pool, "timeoutMs": 0})["vm"]["id"]
            results[HOT_VARLINK].append((time.perf_counter() - t0) * 1000)
        else:
            reply = bus.send_and_get_reply(new_method_call(manager, "Acquire", "sa{sv}",
                                                           (pool, {"timeoutMs": ("t", 0)})))
            results[HOT_DBUS].append((time.perf_counter() - t0) * 1000)
            vm_id = reply.body[0].rsplit("/", 1)[1]
        conn.call("Release", {"id": vm_id})
    bus.close()
    conn.close()
    results[HOT_ENGINE] = kilnd.engine_acquire_ms()
    return results


def varlink_round_trips(kilnd, calls):
    """ListVMs with 100 records vs GetInfo, alternating in blocks of 50."""
    conn = VarlinkConnection(kilnd.sock)
    existing = len(conn.call("ListVMs")["vms"])
    for i in range(existing, 100):
        conn.call("CreateVM", {"name": f"record{i}"})
    assert len(conn.call("ListVMs")["vms"]) == 100
    methods = [("api: ListVMs, 100 VMs (varlink)", "io.kiln.Manager.ListVMs"),
               ("api: GetInfo floor (varlink)", "org.varlink.service.GetInfo")]
    samples = {name: [] for name, _ in methods}
    for _ in range(calls // 50):
        for name, method in methods:
            for _ in range(50):
                t0 = time.perf_counter()
                conn.call(method, {})
                samples[name].append((time.perf_counter() - t0) * 1000)
    conn.close()
    return samples


def dbus_round_trips(kilnd, calls):
    """D-Bus calls against the same 100 VMs, alternating in blocks of 50."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=kilnd.bus_address)
    manager = dbus_manager()
    root = DBusAddress("/io/kiln/Kiln1", bus_name="io.kiln.Kiln1", interface="org.freedesktop.DBus.ObjectManager")
    peer = DBusAddress("/io/kiln/Kiln1/Manager", bus_name="io.kiln.Kiln1", interface="org.freedesktop.DBus.Peer")
    listed = conn.send_and_get_reply(new_method_call(manager, "ListVMs")).body[0]
    assert len(listed) == 100, len(listed)
    methods = [("api: ListVMs, 100 VMs (D-Bus, paths)", manager, "ListVMs", False),
               ("api: GetManagedObjects, 100 VMs (D-Bus)", root, "GetManagedObjects", True),
               ("api: GetManagedObjects, 100 VMs (D-Bus, jeepney-decoded)", root, "GetManagedObjects",
                False),
               ("api: Peer.Ping floor (D-Bus)", peer, "Ping", False)]
    samples = {name: [] for name, _, _, _ in methods}
    for _ in range(calls // 50):
        for name, address, method, undecoded in methods:
            for _ in range(50):
                t0 = time.perf_counter()
                if undecoded:
                    call_undecoded(conn, new_method_call(address, method))
                else:
                    conn.send_and_get_reply(new_method_call(address, method))
                samples[name].append((time.perf_counter() - t0) * 1000)
    conn.close()
    return samples


def call_undecoded(conn, message):
    """Send `message` on jeepney connection `conn` and read its reply frame
    whole without decoding the body; returns its size in bytes. Frames of
    other types (the bus's NameAcquired signal) are skipped: the connection
    has no match rules, so nothing else comes to it."""
    import struct

    conn.send(message)
    while True:
        head = _read_exactly(conn.sock, 16)
        order = "<" if head[:1] == b"l" else ">"
        body_len, _serial, fields_len = struct.unpack(order + "III", head[4:16])
        rest = (fields_len + 7) // 8 * 8 + body_len
        _read_exactly(conn.sock, rest)
        if head[1] in (2, 3):  # METHOD_RETURN, ERROR
            return 16 + rest


def _read_exactly(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the bus closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def delete_records(kilnd):
    """Remove the idle VM records the API round trips created."""
    conn = VarlinkConnection(kilnd.sock)
    for vm in conn.call("ListVMs")["vms"]:
        if vm["name"].startswith("record"):
            conn.call("DeleteVM", {"id": vm["id"]})
    conn.close()
