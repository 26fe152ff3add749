"""What the benchmarks read from /proc: memory and CPU of processes and host.

PSS (proportional set size, /proc/PID/smaps_rollup) splits each shared page
between the processes mapping it, so the PSS of N clones adds up to what they
really cost together. CPU time comes from /proc/PID/stat (utime + stime, in
clock ticks) and, for the whole host, from the `cpu` line of /proc/stat.
"""
import os
import time

TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def pss_mib(pid):
    """Proportional set size of one process, MiB (smaps_rollup `Pss:`)."""
    return _rollup_kib(pid, "Pss:") / 1024


def _rollup_kib(pid, key):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise ValueError(f"no {key} in /proc/{pid}/smaps_rollup")


def rss_mib(pid):
    """Resident set size of one process, MiB (`VmRSS:` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def cpu_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def host_ticks():
    """(busy, total) ticks of the host's `cpu` line; idle and iowait are not busy."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - values[3] - values[4], total


def mem_available_mib():
    """MemAvailable of /proc/meminfo, MiB."""
    return _meminfo("MemAvailable:") / 1024


def mem_total_mib():
    return _meminfo("MemTotal:") / 1024


def _meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise ValueError(key)


def cpu_use(groups, seconds):
    """CPU used over `seconds` by groups of processes and by the whole host.

    `groups` maps a name to pids. For each group: cores used together
    (1.0 = one core busy) and the average share of one of its processes, in
    percent of a core. Also the host's busy share of all its cores.
    Processes that exit during the interval are left out.
    """
    pids = [p for group in groups.values() for p in group]
    before, host_before = _ticks_of(pids), host_ticks()
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after, host_after = _ticks_of(pids), host_ticks()
    out = {"interval_s": round(elapsed, 2)}
    for name, group in groups.items():
        alive = [p for p in group if p in before and p in after]
        used = sum(after[p] - before[p] for p in alive) / TICKS / elapsed
        out[name] = {"cores": round(used, 3), "per_pid_pct": round(100 * used / max(1, len(alive)), 2)}
    total = host_after[1] - host_before[1]
    out["host_busy_pct"] = round(100 * (host_after[0] - host_before[0]) / total, 1) if total else None
    return out


def _ticks_of(pids):
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_ticks(pid)
        except (OSError, ValueError, IndexError):
            pass
    return out
