#!/usr/bin/env python3
"""Kiln benchmarks (`make bench`): what a caller waits for and what VMs cost.

Starts a release kilnd on a temp dir with a private dbus-daemon and runs, on
the same guest kernel and initramfs, with peers measured in the same run
(alternating where possible) so ratios hold on a noisy machine:

  boots.py    raw QEMU cold boot (kilnd's own argv) vs kilnd StartVM;
  pools.py    raw QEMU template restore vs kilnd Acquire with nothing hot;
              hot Acquire over varlink and D-Bus; API round trips and their
              floors (varlink GetInfo, D-Bus Peer.Ping);
  density.py  N idle hot VMs (template, then cold): PSS, idle CPU, acquire
              latency at each N; the time to fill a 50-VM template pool;
              kilnd's own RSS and CPU;
  network.py  a bridge NIC's cost on clone and hot Acquire (pools with and
              without one, in a kilnd inside a fresh network namespace);
              host <-> guest TCP throughput;
  images.py   an image pulled from a local registry vs skopeo + mkfs.erofs,
              and a cache hit; an image's first output from a per-image
              pool, a generic hot VM + AddContainer (runc on the host as
              their floor) and a cold boot (vs raw QEMU with the same
              disks); PSS of idle VMs running the image;
  sandbox.py  streamed exec's first output vs a buffered ExecVM, CopyIn and
              CopyOut throughput, SnapshotVM/RestoreVM/ForkVM vs plain QEMU
              migrate to a file and -incoming from it;
  containerd.py  pods through containerd: `ctr run --rm` to first output
              with Kiln's shim (hot pool) vs runc, pods per second, idle
              PSS per pod;
  virt.py     libvirt `virsh create` of an equivalent domain vs raw QEMU, in
              a systemd container (full runs only).

Writes target/bench/report.json, report.md and SVG plots, then compares with
tests/bench/baseline.json (warnings only). QUICK=1 runs a short version
(about 3 minutes here); BENCH_SKIP_LIBVIRT=1 skips the libvirt peer.
See docs/benchmarks.md.
"""
import datetime
import os
import platform
import subprocess
import sys
import time

import boots
import containerd
import density
import guard
import images
import network
import pools
import procfs
import report
import sandbox
import virt
from kiln import GUEST, ROOT, TARGET, Kilnd, VarlinkConnection, delete_pool, log

OUT = os.path.join(TARGET, "bench")
QUICK = os.environ.get("QUICK") == "1"

# Everything a run does, by mode. Template density first: it is cheap.
PLAN = {
    False: {
        "boot_rounds": 10, "boot_min_rounds": 3, "boot_budget_s": 180,
        "clone_rounds": 10,
        "hot_acquires": 400, "hot_min_acquires": 200, "hot_budget_s": 150,
        "api_calls": 1000,
        "template": {"ns": [1, 10, 25, 40, 50, 100, 200], "acquires": 20, "concurrency": 4, "budget_s": 200,
                     "settle_s": 3, "cpu_interval_s": 5},
        "fill_n": 50, "fill_concurrency": [2, 4, 8], "fill_timeout_s": 75,
        "cold": {"ns": [1, 10, 25], "acquires": 4, "concurrency": 2, "budget_s": 150, "settle_s": 3,
                 "cpu_interval_s": 5,
                 "cap_reason": "cold ladder capped at N=25: every cold VM is a full TCG boot (seconds of "
                               "both cores each), so 50 or 100 of them do not fit in a 20-minute run here"},
        "libvirt_rounds": 5, "libvirt_min_rounds": 3, "libvirt_budget_s": 120,
        "daemon_interval_s": 10,
        "network": {"clones": 8, "hot": 100, "mib": 64},
        "images": {"pulls": 5, "cached_pulls": 50, "first_output": 10, "cold": 5, "cold_min": 3,
                   "cold_budget_s": 150, "pss_n": 10},
        "sandbox": {"exec": 10, "copy": 3, "copy_mib": 16, "snapshots": 3, "fork_n": 10, "raw_snapshots": 3},
        "containerd": {"first_output": 10, "pods": 20, "settle_s": 3},
    },
    True: {
        "boot_rounds": 3, "boot_min_rounds": 2, "boot_budget_s": 45,
        "clone_rounds": 3,
        "hot_acquires": 40, "hot_min_acquires": 20, "hot_budget_s": 20,
        "api_calls": 100,
        "template": {"ns": [1, 10], "acquires": 6, "concurrency": 4, "budget_s": 40,
                     "settle_s": 1, "cpu_interval_s": 2},
        "fill_n": 20, "fill_concurrency": [4], "fill_timeout_s": 40,
        "cold": {"ns": [1], "acquires": 1, "concurrency": 2, "budget_s": 40, "settle_s": 1,
                 "cpu_interval_s": 2, "cap_reason": "QUICK: one cold VM only"},
        "libvirt_rounds": 0,
        "daemon_interval_s": 3,
        "network": {"clones": 2, "hot": 20, "mib": 16},
        "images": {"pulls": 2, "cached_pulls": 10, "first_output": 3, "cold": 2, "cold_min": 2,
                   "cold_budget_s": 45, "pss_n": 5},
        "sandbox": {"exec": 3, "copy": 1, "copy_mib": 16, "snapshots": 1, "fork_n": 3, "raw_snapshots": 1},
        "containerd": {"first_output": 3, "pods": 5, "settle_s": 1},
    },
}[QUICK]


def meta():
    """Where and when: commit, machine, QEMU, load."""
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "quick": QUICK, "qemu": qemu, "guest": GUEST,
            "machine": f"{procfs.CORES} cores, {procfs.mem_total_mib() / 1024:.0f} GiB, {platform.release()}",
            "load_start": os.getloadavg()[0]}


class Phases:
    """Wall time of each phase, for the report and the progress log."""

    def __init__(self):
        self.times = {}

    def run(self, name, fn, *args):
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.times[name] = round(time.monotonic() - t0, 1)
            log(f"== {name}: {self.times[name]} s")


def kilnd_phases(ph, samples, rep):
    """Everything that needs kilnd; returns kilnd's cold VM (argv, dir, id) for the libvirt peer."""
    with Kilnd() as k:
        rep["daemon"] = {"idle_no_vms": density.daemon_snapshot(k, PLAN["daemon_interval_s"])}
        boot_samples, kiln_vm = ph.run("cold boots", boots.cold_boots, k, PLAN["boot_rounds"],
                                       PLAN["boot_budget_s"], PLAN["boot_min_rounds"])
        samples.update(boot_samples)
        # The libvirt peer runs after kilnd is gone, with the files it booted.
        kiln_vm = (virt.keep_boot_files(kiln_vm[0], os.path.join(OUT, "boot")),) + tuple(kiln_vm[1:])
        # One template pool serves clones, hot acquires, the template density
        # ladder and one fill: its template is built once.
        shared, conc = "bench", PLAN["template"]["concurrency"]
        clone_samples, extra, rep["clone_steps"] = ph.run("template clones", pools.clones, k, PLAN["clone_rounds"],
                                                          shared, conc)
        samples.update(clone_samples)
        rep["extra"] = extra
        samples.update(ph.run("hot acquires", pools.hot_acquires, k, shared, PLAN["hot_acquires"],
                              PLAN["hot_budget_s"], PLAN["hot_min_acquires"]))
        samples.update(ph.run("API round trips (varlink)", pools.varlink_round_trips, k, PLAN["api_calls"]))
        samples.update(ph.run("API round trips (D-Bus)", pools.dbus_round_trips, k, PLAN["api_calls"]))
        pools.delete_records(k)
        rep["density"] = {}
        rep["density"]["template"] = ph.run("density, template", density.ladder, k, "template", PLAN["template"],
                                            shared)
        rep["fill"] = ph.run("fill rate", density.fill_rates, k, PLAN["fill_concurrency"], PLAN["fill_n"],
                             PLAN["fill_timeout_s"], (shared, conc))
        k_conn = VarlinkConnection(k.sock)
        delete_pool(k_conn, shared)
        k_conn.close()
        rep["density"]["cold"] = ph.run("density, cold", density.ladder, k, "cold", PLAN["cold"])
        time.sleep(5)  # the last pool's QEMUs are reaped
        rep["daemon"]["idle_end"] = density.daemon_snapshot(k, PLAN["daemon_interval_s"])
        at40 = [s for s in rep["density"]["template"]["steps"] if s["n"] == 40]
        if at40:
            rep["daemon"]["with_40_vms"] = at40[0]
    return kiln_vm


def guarded_phase(ph, samples, rep, key, title, run):
    """A phase with a kilnd of its own: its samples, or its error in the
    report (the rest of the report stands)."""
    try:
        phase_samples, rep[key] = ph.run(title, run, PLAN[key])
        samples.update(phase_samples)
    except Exception as e:  # noqa: BLE001 - reported, the rest of the report stands
        rep[key] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{title} phase failed: {e}")


def libvirt_phase(ph, samples, rep, kiln_vm):
    """The libvirt peer, or the reason it did not run."""
    if QUICK:
        rep["libvirt"] = {"skipped": "QUICK run (the container boot and cold TCG boots take ~2 min; `make bench` runs it)"}
    elif os.environ.get("BENCH_SKIP_LIBVIRT") == "1":
        rep["libvirt"] = {"skipped": "BENCH_SKIP_LIBVIRT=1"}
    else:
        try:
            lv_samples, extra = ph.run("libvirt", virt.libvirt_boots, *kiln_vm, PLAN["libvirt_rounds"],
                                       PLAN["libvirt_budget_s"], PLAN["libvirt_min_rounds"])
            samples.update(lv_samples)
            rep["libvirt"] = extra
        except Exception as e:  # noqa: BLE001 - reported, the rest of the report stands
            rep["libvirt"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"libvirt peer failed: {e}")
    if "skipped" in rep["libvirt"]:
        log(f"libvirt: skipped: {rep['libvirt']['skipped']}")


def finish(rep, samples):
    """Statistics, acquire summaries, the files, the guard."""
    for ladder in rep["density"].values():
        for step in ladder["steps"]:
            acq = step.pop("acquire_ms")
            if acq:
                step["acquire"] = report.stats(acq)
                samples[f"density {ladder['mode']} N={step['n']}: Acquire (varlink)"] = acq
            quiet = step.pop("quiet_acquire_ms", None)
            if quiet:
                step["quiet_acquire"] = report.stats(quiet)
                samples[f"density {ladder['mode']} N={step['n']}: hot Acquire, pool full (varlink)"] = quiet
    rep["scenarios"] = report.with_floors({name: report.stats(s) for name, s in samples.items() if s})
    rep["guard"] = guard.check(rep)
    return report.write(rep, samples, OUT)


def main():
    t0 = time.monotonic()
    rep, samples, ph = {"meta": meta(), "plan": PLAN}, {}, Phases()
    kiln_vm = kilnd_phases(ph, samples, rep)
    rep["meta"]["accel"] = "tcg" if "tcg" in " ".join(kiln_vm[0]) else "kvm"
    # The bridge NIC's cost and throughput, in a namespace of its own.
    guarded_phase(ph, samples, rep, "network", "network", network.run)
    # Image pulls and containers' first output, with a registry of its own.
    guarded_phase(ph, samples, rep, "images", "images", images.run)
    # Streamed exec, copies, snapshots and forks.
    guarded_phase(ph, samples, rep, "sandbox", "sandbox", sandbox.run)
    # Pods through containerd: Kiln's shim against runc.
    guarded_phase(ph, samples, rep, "containerd", "containerd", containerd.run)
    libvirt_phase(ph, samples, rep, kiln_vm)
    rep["meta"]["phases_s"] = ph.times
    rep["meta"]["load_end"] = os.getloadavg()[0]
    rep["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    text = finish(rep, samples)
    print(text)
    log(f"wrote {OUT}/report.md, report.json, latency.svg, pss.svg, idle-cpu.svg, fill.svg "
        f"in {rep['meta']['duration_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
