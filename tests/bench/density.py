"""Density, fill rate and daemon cost, all through the varlink API.

density  One pool per mode (template first, then cold) is resized up a
         ladder of N (ResizePool warm=N, max=N+k). At each N, once N VMs are
         hot and nothing boots, after a short settle:
           - PSS of every member QEMU (/proc/PID/smaps_rollup), total and
             per VM;
           - CPU of the N idle VMs together (utime+stime of their QEMUs over
             an interval, in cores) and the host's busy share of all cores
             (/proc/stat; includes everybody else on the machine);
           - kilnd's RSS and CPU over the same interval;
           - k Acquires in a row (timeoutMs 0; the pool refills behind,
             max = N + k keeps room for it), p50/p99.
         The ladder stops early, with the reason in the report, when memory
         would run short (MemAvailable minus the projected need below a
         reserve), when the projected fill time passes the mode's time
         budget, when the idle VMs alone keep most of the cores busy, or when
         the pool fails or does not fill in time.
fill     Time to fill a 50-VM template pool from empty (its template already
         built), for each refillConcurrency tried: ResizePool warm=50, then
         DescribePool every 50 ms until 50 are hot (the curve hot(t)).
daemon   kilnd's RSS and PSS with no VM, with 40 hot VMs (a density step)
         and at the end; its CPU while idle (utime+stime over an interval).
"""
import contextlib
import time

import procfs
from kiln import VarlinkConnection, delete_pool, drain, describe_pool, log, pool_vms, wait_pool

# Projected per-VM memory before anything was measured, MiB.
FIRST_GUESS_MIB = {"template": 80, "cold": 220}
# Memory left for everyone else on the machine.
RESERVE_MIB = max(4096, 0.2 * procfs.mem_total_mib())
# Idle VMs using more than this share of all cores: the machine cannot keep up.
SATURATED = 0.85


class Stop(Exception):
    """The ladder cannot go on; the message is the reason for the report."""


def daemon_snapshot(kilnd, seconds):
    """kilnd's RSS, PSS and CPU (over `seconds`) as it is now."""
    cpu = procfs.cpu_use({"kilnd": [kilnd.pid]}, seconds)
    return {"rss_mib": round(procfs.rss_mib(kilnd.pid), 1), "pss_mib": round(procfs.pss_mib(kilnd.pid), 1),
            "cpu_pct": round(100 * cpu["kilnd"]["cores"], 2), "interval_s": cpu["interval_s"]}


def check_memory(mode, adding, per_vm_mib):
    """Raise Stop if `adding` more VMs would eat into the reserve."""
    need = adding * per_vm_mib
    avail = procfs.mem_available_mib()
    if avail - need < RESERVE_MIB:
        raise Stop(f"memory: {adding} more {mode} VMs need ~{need:.0f} MiB "
                   f"(~{per_vm_mib:.0f} MiB each), {avail:.0f} MiB available, "
                   f"{RESERVE_MIB:.0f} MiB kept for the rest of the machine")


def check_time(adding, rate, deadline, budget):
    """Raise Stop if filling `adding` VMs at `rate` VMs/s passes the deadline."""
    if rate is None:
        return
    projected = adding / rate
    left = deadline - time.monotonic()
    if projected > left:
        raise Stop(f"time: {adding} more VMs at the measured {rate:.2f} VMs/s would take "
                   f"~{projected:.0f} s, {max(0, left):.0f} s left of the {budget} s budget")


def fill_to(conn, pool, n, k, deadline):
    """Resize to warm=n and wait until n are hot and nothing boots; seconds taken."""
    t0 = time.monotonic()
    conn.call("ResizePool", {"name": pool, "warm": n, "max": n + k})
    while True:
        p = describe_pool(conn, pool)
        if p["state"] == "failed":
            raise Stop(f"pool failed at {p['hot']}/{n} hot: {p.get('lastError')}")
        if p["hot"] >= n and p["booting"] == 0:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise Stop(f"could not keep up: {p['hot']}/{n} hot ({p['booting']} booting) "
                       f"after {time.monotonic() - t0:.0f} s, at the time budget")
        time.sleep(0.05)


def acquire_burst(conn, pool, k, deadline, ready=lambda p: p["hot"] >= 1):
    """k Acquires in a row, each once `ready(pool)` holds (default: one VM
    hot, the pool refilling behind); ms each. The VMs stay leased until
    the end."""
    samples, leased = [], []
    try:
        for _ in range(k):
            wait_pool(conn, pool, ready, timeout=max(5, deadline - time.monotonic()))
            t0 = time.perf_counter()
            vm = conn.call("Acquire", {"pool": pool, "timeoutMs": 0})["vm"]
            samples.append((time.perf_counter() - t0) * 1000)
            leased.append(vm["id"])
    finally:
        for vm_id in leased:
            conn.call("Release", {"id": vm_id})
    return samples


def quiet_acquires(conn, pool, n, k, deadline):
    """k Acquires, each from a full pool with nothing booting (the hot
    Acquire of a node holding n idle VMs, not one racing the refill); ms
    each (max is n + k, so the pool refills to n behind the leases)."""
    return acquire_burst(conn, pool, k, deadline, ready=lambda p: p["hot"] >= n and p["booting"] == 0)


def measure_step(conn, kilnd, pool, n, settle, interval):
    """PSS and idle CPU of a pool holding n hot VMs, and kilnd's cost."""
    time.sleep(settle)
    pids = [v["pid"] for v in pool_vms(conn, pool) if v.get("pid") and v["state"] == "ready"]
    cpu = procfs.cpu_use({"vms": pids, "kilnd": [kilnd.pid]}, interval)
    pss = [procfs.pss_mib(pid) for pid in pids]
    return {"n": n, "vms_measured": len(pids), "pss_total_mib": round(sum(pss), 1),
            "pss_per_vm_mib": round(sum(pss) / len(pss), 1), "pss_min_mib": round(min(pss), 1),
            "pss_max_mib": round(max(pss), 1),
            "idle_vms_cpu_cores": cpu["vms"]["cores"], "idle_cpu_per_vm_pct": cpu["vms"]["per_pid_pct"],
            "host_busy_pct": cpu["host_busy_pct"], "cpu_interval_s": cpu["interval_s"],
            "kilnd_rss_mib": round(procfs.rss_mib(kilnd.pid), 1), "kilnd_pss_mib": round(procfs.pss_mib(kilnd.pid), 1),
            "kilnd_cpu_pct": round(100 * cpu["kilnd"]["cores"], 2)}


@contextlib.contextmanager
def pool_for(conn, pool, name, spec):
    """`pool` if given (kept, drained at the end), else a new pool `name`
    made from `spec` (deleted at the end)."""
    if pool is None:
        conn.call("CreatePool", {"name": name, "spec": spec})
    try:
        yield pool or name
    finally:
        if pool is None:
            delete_pool(conn, name)
        else:
            drain(conn, pool)


def ladder(kilnd, mode, plan, pool=None):
    """Hold N idle hot VMs for each N of plan["ns"]; returns the steps and why it stopped.

    Uses `pool` if given (its template already built), else a new one.
    """
    conn = VarlinkConnection(kilnd.sock)
    out = {"mode": mode, "refillConcurrency": plan["concurrency"], "acquires_per_step": plan["acquires"],
           "planned_ns": plan["ns"], "budget_s": plan["budget_s"], "steps": [], "stopped": None}
    if plan.get("cap_reason"):
        out["cap"] = plan["cap_reason"]
    spec = {"mode": mode, "warm": 0, "max": 1, "refillConcurrency": plan["concurrency"]}
    with pool_for(conn, pool, f"density-{mode}", spec) as name:
        try:
            climb(conn, kilnd, mode, plan, name, out, template_built=pool is not None)
        except Stop as e:
            out["stopped"] = str(e)
            log(f"density {mode}: stopped: {e}")
    conn.close()
    return out


def climb(conn, kilnd, mode, plan, pool, out, template_built):
    """The steps of `ladder`, appended to out["steps"]; raises Stop."""
    k, budget = plan["acquires"], plan["budget_s"]
    deadline = time.monotonic() + budget
    per_vm, rate = FIRST_GUESS_MIB[mode], None
    for n in plan["ns"]:
        current = describe_pool(conn, pool)["hot"]
        check_memory(mode, n - current + k, per_vm)
        check_time(n - current, rate, deadline, budget)
        fill_s = fill_to(conn, pool, n, k, deadline)
        if not template_built and not out["steps"] and mode == "template":
            out["first_fill_s_with_template_build"] = round(fill_s, 2)
        elif n - current >= 2 * plan["concurrency"]:
            rate = (n - current) / fill_s
        step = measure_step(conn, kilnd, pool, n, plan["settle_s"], plan["cpu_interval_s"])
        step["fill_s"], step["filled_from"] = round(fill_s, 2), current
        # A cold refill is a full boot: take at most n acquires there.
        step["acquire_ms"] = acquire_burst(conn, pool, k if mode == "template" else min(k, n), deadline + 120)
        if mode == "template" and n >= plan.get("quiet_from_n", 100):
            step["quiet_acquire_ms"] = quiet_acquires(conn, pool, n, plan.get("quiet_acquires", 10),
                                                      deadline + 120)
        out["steps"].append(step)
        per_vm = max(step["pss_max_mib"] * 1.5, 48)
        log(f"density {mode} N={n}: PSS {step['pss_per_vm_mib']} MiB/VM, idle VMs "
            f"{step['idle_vms_cpu_cores']:.2f} cores, host {step['host_busy_pct']}% busy, "
            f"filled {current}->{n} in {fill_s:.1f} s")
        if step["idle_vms_cpu_cores"] > SATURATED * procfs.CORES:
            raise Stop(f"saturated: {n} idle {mode} VMs alone keep {step['idle_vms_cpu_cores']:.2f} "
                       f"of {procfs.CORES} cores busy")


def fill_curve(kilnd, concurrency, n, timeout, pool=None):
    """Fill an n-VM template pool from empty at `concurrency`; the hot(t) curve.

    Uses `pool` if given (a template pool with that refillConcurrency),
    else a new one (its template built first, not timed).
    """
    conn = VarlinkConnection(kilnd.sock)
    spec = {"mode": "template", "warm": 1, "max": n, "refillConcurrency": concurrency}
    with pool_for(conn, pool, f"fill-c{concurrency}", spec) as name:
        if pool is None:
            wait_pool(conn, name, lambda p: p["hot"] == 1, timeout=300)
        drain(conn, name, max_vms=n)
        time.sleep(1)
        result = {"concurrency": concurrency, "n": n, **timed_fill(conn, name, n, timeout)}
    conn.close()
    if result.get("fill_s"):
        log(f"fill {n} template VMs at refillConcurrency {concurrency}: {result['fill_s']:.1f} s")
    return result


def timed_fill(conn, pool, n, timeout):
    """ResizePool warm=n on an empty pool; poll until n are hot (or timeout)."""
    t0 = time.monotonic()
    conn.call("ResizePool", {"name": pool, "warm": n, "max": n})
    curve, hot = [(0.0, 0)], 0
    while hot < n:
        p = describe_pool(conn, pool)
        hot, t = p["hot"], time.monotonic() - t0
        if hot != curve[-1][1]:
            curve.append((round(t, 3), hot))
        if p["state"] == "failed" or t > timeout:
            return {"filled": hot, "fill_s": None, "curve": curve,
                    "error": f"{hot}/{n} hot after {t:.0f} s ({p['state']}: {p.get('lastError')})"}
        time.sleep(0.05)
    fill_s = curve[-1][0]
    return {"filled": n, "fill_s": fill_s, "first_s": next(t for t, h in curve if h >= 1),
            "half_s": next(t for t, h in curve if h >= n / 2), "vms_per_s": round(n / fill_s, 2),
            "vms_per_s_per_core": round(n / fill_s / procfs.CORES, 2), "curve": curve}


def fill_rates(kilnd, concurrencies, n, timeout, shared=None):
    """fill_curve for each refillConcurrency, in order.

    `shared` = (pool, its refillConcurrency): that concurrency reuses it.
    """
    return [fill_curve(kilnd, c, n, timeout, shared[0] if shared and shared[1] == c else None)
            for c in concurrencies]

