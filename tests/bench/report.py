"""The report: statistics, report.json, report.md and the SVG plots.

Every latency scenario is summarised as n, median, p99, min and max, and set
against its floor measured in the same run (raw QEMU for boots and clones,
the transport's no-op call for API round trips and hot acquires, skopeo +
mkfs.erofs for image pulls, runc for an image's first output).
"""
import json
import os
import statistics

import svg

# scenario -> the scenario it is compared against
FLOORS = {
    "kilnd-cold (varlink StartVM)": "raw-qemu-cold",
    "kilnd-cold (engine readyAt-startedAt)": "raw-qemu-cold",
    "kilnd-clone (Acquire, nothing hot)": "raw-qemu-clone (template restore)",
    "kilnd-hot Acquire (varlink)": "api: GetInfo floor (varlink)",
    "kilnd-hot Acquire (D-Bus)": "api: Peer.Ping floor (D-Bus)",
    "api: ListVMs, 100 VMs (varlink)": "api: GetInfo floor (varlink)",
    "api: ListVMs, 100 VMs (D-Bus, paths)": "api: Peer.Ping floor (D-Bus)",
    "api: GetManagedObjects, 100 VMs (D-Bus)": "api: Peer.Ping floor (D-Bus)",
    "api: GetManagedObjects, 100 VMs (D-Bus, jeepney-decoded)": "api: Peer.Ping floor (D-Bus)",
    "libvirt virsh create": "raw-qemu-cold (in container)",
    "libvirt virsh restore": "raw-qemu-clone (template restore)",
    "net: kilnd-clone with a bridge NIC (Acquire, nothing hot)": "net: raw-qemu-clone with a bridge NIC (template restore)",
    "net: kilnd-hot Acquire with a bridge NIC (varlink)": "net: kilnd-hot Acquire without a NIC (varlink)",
    "image: kilnd PullImage, empty store": "image: skopeo copy + mkfs.erofs per layer (pull floor)",
    "image: kilnd PullImage again (cache hit)": "image: registry manifest GET (cache-hit floor)",
    "image: hot VM + AddContainer to first output (modules loaded at boot)":
        "image: runc run on the host to first output",
    "image: hot VM + AddContainer to first output (modules on demand)":
        "image: runc run on the host to first output",
    "image: per-image pool, Acquire to first output (started in the template)":
        "image: runc run on the host to first output",
    "image: kilnd CreateVM+StartVM with the image to first output":
        "image: raw QEMU with the layers + StartContainer to first output",
    "sandbox: first output, streamed StartProcess (echo; sleep 1; echo)":
        "sandbox: buffered ExecVM reply (echo; sleep 1; echo)",
    "sandbox: first output, streamed StartProcess (echo)": "sandbox: buffered ExecVM reply (echo)",
    "sandbox: kilnd SnapshotVM": "sandbox: raw QEMU migrate to a file",
    "sandbox: kilnd RestoreVM to agent": "sandbox: raw QEMU -incoming from the file to agent",
    "sandbox: kilnd ForkVM count=1": "sandbox: raw QEMU -incoming from the file to agent",
    "containerd: ctr run --rm with Kiln's shim (hot pool), to first output":
        "containerd: ctr run --rm with runc, to first output",
    "containerd: ctr run -d with Kiln's shim, each of N in a row": "containerd: ctr run -d with runc, each of N in a row",
}

ANCHORS = [
    "containerd + Cloud Hypervisor on KVM: cold start ~74 ms, warm restore ~25 ms, ~24 MB per VM",
    "Kata Containers: ~500 ms - 1 s per pod start, ~330 MB per pod",
    "fill rate: 150 pods ready in 11 s on 24 KVM vCPUs (13.6 pods/s, 0.57 pods/s per vCPU)",
    "issue 4 targets: hot Acquire p50 <= 1 ms, p99 <= 5 ms; clone <= 1.5x raw restore; "
    "template PSS <= 60 % of cold",
]


def stats(samples):
    """n, median, p99 (nearest rank), min and max of a list of ms."""
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"n": len(s), "median_ms": round(statistics.median(s), 3), "p99_ms": round(p99, 3),
            "min_ms": round(s[0], 3), "max_ms": round(s[-1], 3)}


def with_floors(table):
    """Each scenario's ratio of medians against its floor, where both exist."""
    for name, s in table.items():
        floor = FLOORS.get(name) or ("api: GetInfo floor (varlink)" if "Acquire (varlink)" in name else None)
        if floor in table and table[floor]["median_ms"] > 0:
            s["floor"] = floor
            s["vs_floor"] = round(s["median_ms"] / table[floor]["median_ms"], 2)
    return table


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def ms(v):
    """A latency for a table: 3 significant-ish digits."""
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def density_rows(ladder):
    """Markdown rows of one mode's density ladder."""
    rows = []
    for s in ladder["steps"]:
        a = s.get("acquire") or {}
        rows.append(f"| {ladder['mode']} | {s['n']} | {s.get('filled_from', '?')}→{s['n']} in {fmt(s.get('fill_s'))} | "
                    f"{fmt(s['pss_total_mib'])} | "
                    f"{fmt(s['pss_per_vm_mib'])} | {s['idle_vms_cpu_cores']:.2f} | {s['idle_cpu_per_vm_pct']:.1f} | "
                    f"{fmt(s['host_busy_pct'])} | {fmt(s['kilnd_rss_mib'])} | {s['kilnd_cpu_pct']:.2f} | "
                    f"{ms(a.get('median_ms'))} | {ms(a.get('p99_ms'))} | {a.get('n', 0)} |")
    return rows


def summary(report):
    """The headline table (the one for the issue note)."""
    sc = report["scenarios"]
    rows = ["| what | here | floor / peer, same run | ratio | anchor elsewhere |",
            "| --- | --- | --- | --- | --- |"]

    def line(label, name, anchor=""):
        if name not in sc:
            return
        s = sc[name]
        floor = s.get("floor")
        fl = f"{floor}: {ms(sc[floor]['median_ms'])} ms" if floor else ""
        ratio = f"{s['vs_floor']:.2f}x" if "vs_floor" in s else ""
        rows.append(f"| {label} | {ms(s['median_ms'])} ms (p99 {ms(s['p99_ms'])}, n={s['n']}) | {fl} | {ratio} | {anchor} |")

    def against(label, name, other, anchor=""):
        """`name`'s median against a scenario other than its floor."""
        if name not in sc or other not in sc:
            return
        k, o = sc[name]["median_ms"], sc[other]["median_ms"]
        rows.append(f"| {label} | {ms(k)} ms | {other}: {ms(o)} ms | {k / o:.2f}x | {anchor} |")

    line("cold boot to agent, kilnd StartVM", "kilnd-cold (varlink StartVM)", "CH/KVM ~74 ms; Kata 0.5–1 s")
    line("cold boot to agent, libvirt virsh create", "libvirt virsh create", "")
    if "libvirt virsh create" in sc and "kilnd-cold (varlink StartVM)" in sc:
        k, v = sc["kilnd-cold (varlink StartVM)"], sc["libvirt virsh create"]
        rows.append(f"| kilnd cold vs libvirt, each over its own raw QEMU | "
                    f"{k.get('vs_floor', 0):.2f}x vs {v.get('vs_floor', 0):.2f}x | | "
                    f"{k.get('vs_floor', 0) / max(v.get('vs_floor', 1), 1e-9):.2f}x | |")
    elif report.get("libvirt", {}).get("skipped"):
        rows.append(f"| libvirt virsh create | skipped: {report['libvirt']['skipped']} | | | |")
    line("template clone to agent, Acquire with nothing hot", "kilnd-clone (Acquire, nothing hot)",
         "CH/KVM warm restore ~25 ms; target ≤ 1.5x raw")
    against("template clone, against raw QEMU doing the same guest work", "kilnd-clone (Acquire, nothing hot)",
            "raw-qemu-clone + identity (restore, synced Ping, SetIdentity)",
            "the identity (fresh entropy first) is guest code TCG translates afresh in every clone")
    nic_clone = "net: kilnd-clone with a bridge NIC (Acquire, nothing hot)"
    line("template clone with a bridge NIC, Acquire with nothing hot", nic_clone, "target ≤ 1.15x raw")
    against("template clone with a bridge NIC, against raw QEMU doing the same guest work", nic_clone,
            "net: raw-qemu-clone with a bridge NIC + identity + network (one write)",
            "the guest's network set-up is kernel code TCG translates afresh in every clone")
    against("template clone, with a bridge NIC against without (one kilnd)", nic_clone,
            "net: kilnd-clone without a NIC (Acquire, nothing hot)")
    line("libvirt's clone: virsh restore of a saved domain to agent", "libvirt virsh restore",
         "in a systemd container; Firecracker snapshot restore ~5–10 ms on KVM (published)")
    line("hot Acquire, varlink", "kilnd-hot Acquire (varlink)", "")
    line("hot Acquire, the engine's share", "kilnd-hot Acquire, engine share (actor, from kilnd's log)",
         "target p50 ≤ 1 ms, p99 ≤ 5 ms")
    line("hot Acquire with a bridge NIC, varlink", "net: kilnd-hot Acquire with a bridge NIC (varlink)", "")
    line("hot Acquire, D-Bus", "kilnd-hot Acquire (D-Bus)", "")
    rows += images_summary(report, line)
    rows += sandbox_summary(report, line)
    rows += containerd_summary(report, line)
    dens = report.get("density", {})
    t, c = dens.get("template", {}).get("steps", []), dens.get("cold", {}).get("steps", [])
    if t and c:
        common = max(set(s["n"] for s in t) & set(s["n"] for s in c), default=None)
        if common:
            ts = next(s for s in t if s["n"] == common)
            cs = next(s for s in c if s["n"] == common)
            rows.append(f"| PSS per idle hot VM (128 MiB) at N={common} | template {fmt(ts['pss_per_vm_mib'])} MiB | "
                        f"cold {fmt(cs['pss_per_vm_mib'])} MiB | {ts['pss_per_vm_mib'] / cs['pss_per_vm_mib']:.0%} | "
                        f"CH ~24 MB, Kata ~330 MB; target ≤ 60 % |")
    for mode, steps in (("template", t), ("cold", c)):
        if steps:
            last = steps[-1]
            why = dens[mode].get("stopped") or dens[mode].get("cap") or "ladder done"
            rows.append(f"| most idle {mode} VMs held | {last['n']}: {fmt(last['pss_total_mib'] / 1024, 2)} GiB PSS, "
                        f"idle VMs {last['idle_vms_cpu_cores']:.2f} cores | | | {why} |")
    fills = [f for f in report.get("fill", []) if f.get("fill_s")]
    if fills:
        best = min(fills, key=lambda f: f["fill_s"])
        rows.append(f"| fill {best['n']}-VM template pool from empty | {best['fill_s']:.1f} s at refillConcurrency "
                    f"{best['concurrency']} ({best['vms_per_s']:.1f} VMs/s, {best['vms_per_s_per_core']:.2f}/s per core) | "
                    f"| | 150 pods in 11 s on 24 KVM vCPUs (0.57/s per vCPU); aim ≤ 10 s |")
    d = report.get("daemon", {})
    if d.get("idle_no_vms"):
        at40 = d.get("with_40_vms") or {}
        rows.append(f"| kilnd RSS: no VMs / 40 hot VMs | {fmt(d['idle_no_vms']['rss_mib'])} / "
                    f"{fmt(at40.get('kilnd_rss_mib'))} MiB | | | |")
        rows.append(f"| kilnd CPU while idle: no VMs / 40 hot VMs | {d['idle_no_vms']['cpu_pct']:.2f} % / "
                    f"{fmt(at40.get('kilnd_cpu_pct'), 2)} % of a core | | | resolution: one 10 ms tick per "
                    f"interval ({d['idle_no_vms']['interval_s']:.0f} s / {fmt(at40.get('cpu_interval_s'), 0)} s) |")
    return rows


def images_summary(report, line):
    """The image rows of the summary; `line` adds a scenario's row."""
    img = report.get("images", {})
    if not img:
        return []
    if img.get("error"):
        return [f"| images | failed: {img['error']} | | | |"]
    size = img.get("image", {})
    line(f"image pull, {size.get('layers')} gzip layers ({size.get('uncompressed_mib')} MiB), empty store",
         "image: kilnd PullImage, empty store", "target ≤ 1.3x the floor")
    line("image pull again (cache hit)", "image: kilnd PullImage again (cache hit)", "should be milliseconds")
    line("image to first output: per-image pool, Acquire",
         "image: per-image pool, Acquire to first output (started in the template)", "")
    line("image to first output: hot VM + AddContainer (modules at boot)",
         "image: hot VM + AddContainer to first output (modules loaded at boot)", "target ≤ 0.5 s under TCG")
    line("image to first output: hot VM + AddContainer (modules on demand)",
         "image: hot VM + AddContainer to first output (modules on demand)", "")
    line("image to first output: cold CreateVM + StartVM",
         "image: kilnd CreateVM+StartVM with the image to first output", "")
    pss = img.get("pss")
    if not pss:
        return []
    return [f"| PSS per idle hot VM at N={pss['n']}: per-image pool vs generic | {fmt(pss['per_image_mib'])} MiB | "
            f"generic template clone: {fmt(pss['generic_mib'])} MiB | "
            f"{pss['per_image_mib'] / pss['generic_mib']:.2f}x | |"]


def sandbox_summary(report, line):
    """The sandbox rows of the summary; `line` adds a scenario's row."""
    sb = report.get("sandbox", {})
    if not sb:
        return []
    if sb.get("error"):
        return [f"| sandbox calls | failed: {sb['error']} | | | |"]
    line("streamed exec, first output of `echo; sleep 1; echo`",
         "sandbox: first output, streamed StartProcess (echo; sleep 1; echo)", "vs the buffered reply")
    line("SnapshotVM of a running VM", "sandbox: kilnd SnapshotVM", "raw: stop + migrate to a file")
    line("RestoreVM to agent", "sandbox: kilnd RestoreVM to agent", "raw: -incoming, full RAM load")
    line("ForkVM, 1 copy", "sandbox: kilnd ForkVM count=1", "")
    rates = [f"{k.split(', MiB/s')[0].split(': ', 1)[1]} {v} MiB/s" for k, v in sb.items() if "MiB/s" in k]
    return [f"| file copies (tar over a passed fd) | {'; '.join(rates)} | | | the TCP path: Network below |"]


def containerd_summary(report, line):
    """The containerd rows of the summary; `line` adds a scenario's row."""
    ct = report.get("containerd", {})
    if not ct:
        return []
    if ct.get("error"):
        return [f"| pods through containerd | failed: {ct['error']} | | | |"]
    line("pod to first output, `ctr run --rm` with Kiln's shim (hot pool)",
         "containerd: ctr run --rm with Kiln's shim (hot pool), to first output",
         "containerd-cloudhypervisor ~168 ms warm; Kata 0.5–1 s")
    rows = []
    rate = ct.get("pods_per_s")
    if rate:
        rows.append(f"| pods per second, {rate['n']} `ctr run -d` in a row | {fmt(rate['kiln'], 2)}/s | "
                    f"runc: {fmt(rate['runc'], 2)}/s | {rate['kiln'] / rate['runc']:.2f}x | |")
    pss = ct.get("pss")
    if pss:
        k, r = pss["kiln"], pss["runc"]
        rows.append(f"| idle PSS per pod at N={k['n']} (QEMU + shim) | {fmt(k['per_pod_mib'])} MiB | "
                    f"runc (shim + processes): {fmt(r['per_pod_mib'])} MiB | {k['per_pod_mib'] / r['per_pod_mib']:.1f}x | "
                    f"Kata ~330 MB per pod |")
    return rows


def markdown(report):
    """report.md: summary, latency table, density, fill, daemon, libvirt, guard."""
    m = report["meta"]
    out = [f"# Kiln benchmark ({m['accel']}, {'QUICK' if m['quick'] else 'full'} run)", "",
           f"{m['date']}, commit {m['commit']}, {m['machine']}; load average {m['load_start']} at the start, "
           f"{m['load_end']} at the end; the run took {m['duration_s']:.0f} s. The machine is shared: "
           "compare ratios against the floors measured in the same run, not absolute numbers.", "",
           "## Summary", ""] + summary(report)
    out += ["", "## Latencies", "",
            "Boots and clones: time until the guest agent answers Ping. API: one round trip on a "
            "persistent connection. `image:` rows: see Images and containers below. `vs floor` is the ratio "
            "of medians against the floor named.", "",
            "| scenario | n | median ms | p99 ms | min ms | max ms | floor | vs floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in report["scenarios"].items():
        out.append(f"| {name} | {s['n']} | {ms(s['median_ms'])} | {ms(s['p99_ms'])} | {ms(s['min_ms'])} | "
                   f"{ms(s['max_ms'])} | {s.get('floor', '')} | {str(s['vs_floor']) + 'x' if 'vs_floor' in s else ''} |")
    out += clone_steps_md(report)
    out += density_md(report)
    out += fill_md(report)
    out += daemon_md(report)
    out += network_md(report)
    out += images_md(report)
    out += containerd_md(report)
    out += libvirt_md(report)
    out += ["", "## Plots", "", "- `latency.svg`: distribution of every latency scenario (log scale)",
            "- `pss.svg`: total PSS of N idle hot VMs, cold and template",
            "- `idle-cpu.svg`: CPU used by N idle hot VMs", "- `fill.svg`: hot VMs over time while a "
            "template pool fills from empty", "", "## Numbers to compare against (elsewhere)", ""]
    out += [f"- {a}" for a in ANCHORS]
    g = report.get("guard", {})
    out += ["", "## Regression guard", "",
            f"{g.get('compared', 0)} metrics compared with tests/bench/baseline.json "
            f"(made {g.get('baseline_made', '?')}); {len(g.get('warnings', []))} warnings. {g.get('note', '')}"]
    out += [f"- {w}" for w in g.get("warnings", [])]
    return "\n".join(out) + "\n"


def clone_steps_md(report):
    steps = report.get("clone_steps")
    if not steps or not steps.get("n"):
        return []
    raw, kilnd = steps["raw"], steps["kilnd"]
    raw_identity = steps.get("raw_identity", {})
    out = ["", "## Template clone, step by step (median ms)", "",
           f"Acquire with nothing hot (n = {steps['n']}) against the raw restore, alone and with the same "
           "guest work (synced Ping, SetIdentity). kilnd's steps are its "
           "boot sub-task's (`boot steps` in its debug log): prepare (runtime dir, disks, TAP), launch "
           "(exec to QMP connected, cgroup), restore (`migrate-set-capabilities` and `migrate-incoming` "
           "sent; the clone runs once loaded), agent (to the Ping reply, the load included), identity "
           "(SetIdentity), network (ConfigureNetwork); the rest of the Acquire is outside the boot task.", "",
           ]
    return out + steps_table([("raw QEMU", raw), ("raw QEMU + identity", raw_identity), ("kilnd", kilnd)])


def steps_table(columns):
    """A step-by-step table, one column per (title, {step: ms}); the rows
    are every step any column has, the last column's order first."""
    names = list(dict.fromkeys(name for _, steps in reversed(columns) for name in steps))
    out = ["| step | " + " | ".join(title for title, _ in columns) + " |",
           "| --- |" + " --- |" * len(columns)]
    for name in names:
        out.append(f"| {name} | " + " | ".join(fmt(steps.get(name)) for _, steps in columns) + " |")
    return out


def density_md(report):
    out = ["", "## Density: N idle hot VMs of 128 MiB", "",
           "PSS from /proc/PID/smaps_rollup of every member QEMU; idle CPU from their utime+stime over "
           "the interval (cores; % of one core per VM); host busy from /proc/stat (everything on the "
           "machine); acquires: k in a row with the pool refilling behind.", "",
           "| mode | N | filled (hot before → N) in s | PSS total MiB | PSS/VM MiB | idle VMs cores | idle %/VM | host busy % | "
           "kilnd RSS MiB | kilnd CPU % | acquire p50 ms | p99 ms | acquires |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for mode, ladder in report.get("density", {}).items():
        out += density_rows(ladder)
        conc = f"refillConcurrency {ladder['refillConcurrency']}, ladder {ladder['planned_ns']}, " \
               f"budget {ladder['budget_s']} s"
        notes.append(f"- {mode}: {conc}. " + (f"Capped: {ladder['cap']}. " if ladder.get("cap") else "")
                     + (f"**Stopped: {ladder['stopped']}**" if ladder.get("stopped") else "Ladder completed."))
        if ladder.get("first_fill_s_with_template_build"):
            notes.append(f"  The first VM of the new template pool took {ladder['first_fill_s_with_template_build']} s "
                         "(template boot + save + first clone).")
    return out + [""] + notes


def fill_md(report):
    fills = report.get("fill", [])
    if not fills:
        return []
    out = ["", "## Fill rate: a template pool from empty to 50 hot", "",
           "ResizePool warm=50 on a pool whose template is built; time until 50 are hot. "
           "Anchor: 150 pods in 11 s on 24 KVM vCPUs.", "",
           "| refillConcurrency | filled | fill s | first hot s | half s | VMs/s | VMs/s per core |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in fills:
        out.append(f"| {f['concurrency']} | {f['filled']}/{f['n']} | {fmt(f.get('fill_s'))} | {fmt(f.get('first_s'), 2)} | "
                   f"{fmt(f.get('half_s'))} | {fmt(f.get('vms_per_s'), 2)} | {fmt(f.get('vms_per_s_per_core'), 2)} |")
        if f.get("error"):
            out.append(f"|  | {f['error']} | | | | | |")
    return out


def daemon_md(report):
    d = report.get("daemon", {})
    if not d:
        return []
    out = ["", "## Daemon cost (kilnd)", "", "| when | RSS MiB | PSS MiB | CPU % of a core | interval s |",
           "| --- | --- | --- | --- | --- |"]
    for label, key in (("no VMs, after start", "idle_no_vms"), ("40 hot VMs (density step)", "with_40_vms"),
                       ("no VMs, end of the run", "idle_end")):
        s = d.get(key)
        if s:
            out.append(f"| {label} | {fmt(s.get('rss_mib', s.get('kilnd_rss_mib')))} | "
                       f"{fmt(s.get('pss_mib', s.get('kilnd_pss_mib')))} | "
                       f"{fmt(s.get('cpu_pct', s.get('kilnd_cpu_pct')), 2)} | "
                       f"{fmt(s.get('interval_s', s.get('cpu_interval_s')))} |")
    return out


def network_md(report):
    n = report.get("network", {})
    if not n:
        return []
    out = ["", "## Network (bridge, TAP, guest configuration)", ""]
    if n.get("error"):
        return out + [f"Failed: {n['error']}"]
    out += ["The `net:` rows above: the same template pool shape with and without a bridge NIC, in one kilnd "
            "inside a fresh network namespace. The NIC's work (TAP, `ConfigureNetwork`) is done while a VM "
            "warms, so the hot Acquire should not differ; a clone acquired with nothing hot pays it.", "",
            "| transfer (busybox nc in the guest, TCG) | MiB | s | Mbit/s |", "| --- | --- | --- | --- |"]
    for t in n.get("throughput", []):
        out.append(f"| {t['what']} | {t['mib']} | {fmt(t['s'], 2)} | {fmt(t['mbit_s'], 0)} |")
    steps = n.get("clone_steps", {})
    if steps.get("n"):
        raw, work, kilnd = steps["raw"], steps["raw_work"], steps["kilnd"]
        out += ["", f"A clone with a bridge NIC, step by step (median ms; kilnd n = {steps['n']}): raw QEMU "
                "restoring the same template with a TAP of its own, alone and with the guest work kilnd's "
                "clone does (Ping, SetIdentity, ConfigureNetwork in one write).", ""]
        out += steps_table([("raw QEMU", raw), ("raw QEMU + identity + network", work), ("kilnd", kilnd)])
    if n.get("note"):
        out += ["", n["note"]]
    return out


def images_md(report):
    img = report.get("images", {})
    if not img:
        return []
    out = ["", "## Images and containers", ""]
    if img.get("error"):
        return out + [f"Failed: {img['error']}"]
    i = img["image"]
    out += [f"The `image:` rows above. The image, built by the bench: {i['layers']} gzip layers of "
            f"{' + '.join(fmt(m) for m in i['layer_mib'])} = {i['uncompressed_mib']} MiB uncompressed "
            f"({i['compressed_mib']} MiB as pushed, {i['erofs_mib']} MiB of erofs once converted), pushed to "
            f"docker-registry on 127.0.0.1 in {i['built_and_pushed_s']} s. Its container runs "
            f"`echo ready; exec sleep`; \"first output\" is when `ready` can be read. Host floor: {img['runc']}.", "",
            "Where a hot VM's first output comes from (medians, ms from the Acquire call; for AddContainer, "
            "the agent's StartContainer as the guest logs it: module loading, waiting for the layer disks, "
            "mounts, total):", "",
            "| pool | Acquire replied | AddContainer replied | agent: modules | disks | mounts | StartContainer |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, b in img.get("hot_breakdown_median_ms", {}).items():
        pool = name.split(": ", 1)[-1]
        out.append(f"| {pool} | {ms(b.get('acquire'))} | {ms(b.get('add_container'))} | "
                   f"{ms(b.get('agent_modules'))} | {ms(b.get('agent_disks'))} | {ms(b.get('agent_mounts'))} | "
                   f"{ms(b.get('agent_total'))} |")
    pss = img.get("pss")
    if pss:
        out += ["", f"PSS per VM of {pss['n']} idle hot VMs (member QEMUs' smaps_rollup): per-image pool "
                    f"{fmt(pss['per_image_mib'])} MiB, generic template pool {fmt(pss['generic_mib'])} MiB."]
    return out


def containerd_md(report):
    ct = report.get("containerd", {})
    if not ct:
        return []
    out = ["", "## Pods through containerd", ""]
    if ct.get("error"):
        return out + [f"Failed: {ct['error']}"]
    exits, pss = ct.get("ctr_exit_median_ms", {}), ct.get("pss", {})
    out += [f"The `containerd:` rows above: {ct['containerd']}, the same image ({ct['image']['reference']}, "
            f"busybox-static, {ct['image']['uncompressed_mib']} MiB) with Kiln's shim (a template pool of "
            f"{ct['pool']['vm']['memoryMiB']} MiB, {ct['pool']['vm']['vcpus']}-vCPU VMs, container modules loaded "
            f"at boot) and with {ct['runc']}. `ctr run --rm` to its exit (the pod removed, the VM given back): "
            f"Kiln {ms(exits.get('kiln'))} ms, runc {ms(exits.get('runc'))} ms (medians)."]
    parts = ct.get("kiln_breakdown_median_ms") or {}
    if any(v is not None for v in parts.values()):
        out += ["", "Where a Kiln pod's first output goes (medians from ctr's exec, from the shim's lines in "
                    "containerd's log): " + ", ".join(f"{k} {ms(v)} ms" for k, v in parts.items()) + "."]
    if pss:
        k, r = pss["kiln"], pss["runc"]
        out += ["", f"Idle PSS per pod at N={k['n']}: Kiln {fmt(k['per_pod_mib'])} MiB (QEMU {fmt(k['qemu_mib'])}, "
                    f"shim {fmt(k['shim_mib'])}); runc {fmt(r['per_pod_mib'])} MiB (shim {fmt(r['shim_mib'])}, "
                    f"container processes {fmt(r['processes_mib'])})."]
    return out


def libvirt_md(report):
    lv = report.get("libvirt", {})
    out = ["", "## libvirt", ""]
    if lv.get("skipped"):
        return out + [f"Skipped: {lv['skipped']}"]
    if lv.get("error"):
        return out + [f"Failed: {lv['error']}"]
    out.append(f"{lv.get('libvirt_version', '?')} with {lv.get('qemu_in_container', '?')}, in a trixie container "
               f"booted with systemd-nspawn (container up in {lv.get('container_boot_s')} s"
               f"{', root filesystem built this run' if lv.get('rootfs_built_this_run') else ''}). "
               f"Idle PSS of one VM: raw QEMU {lv.get('raw_idle_pss_mib')} MiB, libvirt's QEMU "
               f"{lv.get('libvirt_idle_pss_mib')} MiB. libvirt's QEMU command line:")
    out += ["", "```", str(lv.get("libvirt_qemu_argv")), "```", "", "Domain XML:", "", "```xml",
            lv.get("domain_xml", "").strip(), "```"]
    return out


def plots(report, samples, out_dir):
    """Write latency.svg, pss.svg, idle-cpu.svg and fill.svg."""
    order = list(report["scenarios"])
    with open(os.path.join(out_dir, "latency.svg"), "w") as f:
        f.write(svg.distributions([(n, samples[n]) for n in order if samples.get(n)],
                                  "Time to ready / round trip per scenario"))
    dens = report.get("density", {})
    series = [(mode, [(s["n"], s["pss_total_mib"]) for s in d["steps"]]) for mode, d in dens.items()]
    with open(os.path.join(out_dir, "pss.svg"), "w") as f:
        f.write(svg.lines(series, "PSS of N idle hot VMs (128 MiB each)", "N hot VMs", "total PSS, MiB",
                          notes=[f"{m}: {d['steps'][-1]['pss_per_vm_mib']} MiB/VM at N={d['steps'][-1]['n']}"
                                 for m, d in dens.items() if d["steps"]]))
    series = [(mode, [(s["n"], s["idle_vms_cpu_cores"]) for s in d["steps"]]) for mode, d in dens.items()]
    with open(os.path.join(out_dir, "idle-cpu.svg"), "w") as f:
        f.write(svg.lines(series, "CPU used by N idle hot VMs", "N hot VMs", "cores busy (of the host's)"))
    series = [(f"refillConcurrency {f['concurrency']}", [tuple(p) for p in f["curve"]])
              for f in report.get("fill", [])]
    with open(os.path.join(out_dir, "fill.svg"), "w") as f:
        f.write(svg.lines(series, "Template pool filling from empty", "seconds since ResizePool",
                          "hot VMs", steps=True))


def write(report, samples, out_dir):
    """report.json (with the raw samples), report.md and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(dict(report, samples={k: [round(v, 3) for v in s] for k, s in samples.items()}), f, indent=1)
    text = markdown(report)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    plots(report, samples, out_dir)
    return text
