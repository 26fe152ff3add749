#!/usr/bin/env python3
"""Regression guard: compare a report against tests/bench/baseline.json.

Every metric is lower-is-better. Latency scenarios that have a floor in the
same run (raw QEMU, the transport's no-op call) are compared by their ratio to
it, which survives a busy machine far better than milliseconds; the floors
themselves measure the machine, not Kiln, and are not compared, nor is a
scenario with a single sample. Also: per-VM
PSS at each density step and of a per-image pool's VMs (MiB), idle CPU per
VM from N = 10 (% of a core), the fill time
(s), kilnd's idle RSS after start and at the end of the run (MiB), a Kiln pod's PSS through containerd (MiB). A metric more than 2x worse than the baseline
(1.5x for memory; BENCH_WARN_RATIO overrides both) and worse by more than a
small absolute slack prints a WARNING. The guard never fails: the machine is
shared and noisy, so numbers are a warning, not a verdict.

    guard.py [REPORT]                  compare (default target/bench/report.json)
    guard.py --update-baseline REPORT  write baseline.json from REPORT
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "baseline.json")
# kind -> (ratio, absolute slack)
LIMITS = {"x": (2.0, 0.25), "ms": (2.0, 1.0), "s": (2.0, 1.0), "MiB": (1.5, 8.0), "%": (2.0, 0.25)}


def metrics(report):
    """The flat {name: (value, unit)} view of a report that the guard compares."""
    out = {}
    scenarios = report.get("scenarios", {})
    floors = {s["floor"] for s in scenarios.values() if "floor" in s}
    for name, s in scenarios.items():
        # One sample (a cold pool's single Acquire in a QUICK run) is a
        # moment of the machine, not a median: nothing to compare.
        if s.get("n", 0) < 2:
            continue
        if "vs_floor" in s:
            out[f"{name}: median vs {s['floor']}"] = (s["vs_floor"], "x")
        elif name not in floors:
            out[f"{name}: median"] = (s["median_ms"], "ms")
    for mode, ladder in report.get("density", {}).items():
        for step in ladder.get("steps", []):
            out[f"density {mode} N={step['n']}: PSS per VM"] = (step["pss_per_vm_mib"], "MiB")
            # Idle CPU per VM (% of a core): from N = 10 up, where one
            # 10 ms tick is a small part of what is measured.
            if step["n"] >= 10 and step.get("idle_cpu_per_vm_pct") is not None:
                out[f"density {mode} N={step['n']}: idle CPU per VM"] = (step["idle_cpu_per_vm_pct"], "%")
    for fill in report.get("fill", []):
        if fill.get("fill_s") is not None:
            out[f"fill {fill['n']} template VMs, refillConcurrency {fill['concurrency']}"] = (fill["fill_s"], "s")
    idle = report.get("daemon", {}).get("idle_no_vms")
    if idle:
        out["kilnd RSS, no VMs"] = (idle["rss_mib"], "MiB")
    end = report.get("daemon", {}).get("idle_end")
    if end:
        out["kilnd RSS, no VMs, end of the run"] = (end["rss_mib"], "MiB")
    pss = report.get("images", {}).get("pss")
    if pss:
        out[f"image: per-image pool N={pss['n']}: PSS per VM"] = (pss["per_image_mib"], "MiB")
    pods = report.get("containerd", {}).get("pss")
    if pods:
        out[f"containerd: Kiln pod N={pods['kiln']['n']}: PSS per pod"] = (pods["kiln"]["per_pod_mib"], "MiB")
    return out


def compare(report, baseline):
    """(warnings, compared) between a report and a baseline's metrics."""
    override = os.environ.get("BENCH_WARN_RATIO")
    now, base = metrics(report), baseline.get("metrics", {})
    warnings, compared = [], 0
    for name, (value, unit) in now.items():
        if name not in base:
            continue
        compared += 1
        ratio, slack = LIMITS[unit]
        if override:
            ratio = float(override)
        old = base[name][0]
        if old > 0 and value > old * ratio and value - old > slack:
            warnings.append(f"WARNING: bench regression? {name}: {value:g} {unit} vs baseline {old:g} {unit} "
                            f"({value / old:.2f}x, warn above {ratio:g}x)")
    return warnings, compared


def check(report):
    """Compare against the committed baseline; print and return the outcome."""
    if not os.path.exists(BASELINE):
        print(f"bench guard: no baseline at {BASELINE}")
        return {"compared": 0, "warnings": [], "note": "no baseline"}
    with open(BASELINE) as f:
        baseline = json.load(f)
    warnings, compared = compare(report, baseline)
    note = ""
    if baseline.get("quick") != report.get("meta", {}).get("quick"):
        note = "baseline is from a QUICK run and this run is not (or the other way round): expect differences"
    for w in warnings:
        print(w)
    print(f"bench guard: {compared} metrics compared with {os.path.relpath(BASELINE)} "
          f"(made {baseline.get('made', '?')}), {len(warnings)} warnings{'; ' + note if note else ''}")
    return {"compared": compared, "warnings": warnings, "note": note,
            "baseline_made": baseline.get("made"), "baseline_commit": baseline.get("commit")}


def update_baseline(report):
    meta = report.get("meta", {})
    baseline = {"made": meta.get("date"), "commit": meta.get("commit"), "quick": meta.get("quick"),
                "machine": meta.get("machine"),
                "metrics": {k: list(v) for k, v in sorted(metrics(report).items())}}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in baseline.pop("metrics").items()]
    head = json.dumps(baseline, indent=1)[:-2]
    with open(BASELINE, "w") as f:
        f.write(head + ',\n "metrics": {\n' + ",\n".join(lines) + "\n }\n}\n")
    print(f"wrote {BASELINE} ({len(lines)} metrics)")


def main(argv):
    update = "--update-baseline" in argv
    args = [a for a in argv if a != "--update-baseline"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(HERE)), "target"))
    path = args[0] if args else os.path.join(target, "bench", "report.json")
    with open(path) as f:
        report = json.load(f)
    if update:
        update_baseline(report)
    else:
        check(report)


if __name__ == "__main__":
    main(sys.argv[1:])
