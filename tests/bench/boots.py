"""Cold boots: plain QEMU against kilnd's StartVM, alternating.

raw-qemu-cold   plain qemu-system-x86_64 with exactly the argv kilnd uses
                (copied from a kilnd-launched QEMU's /proc/PID/cmdline, with
                its own socket paths), timed from exec to the agent's first
                Ping reply: the floor for cold boots;
kilnd-cold      CreateVM, then StartVM through `varlinkctl`, timed around
                the StartVM call (returns once the agent answers); also
                kilnd's own readyAt - startedAt.
"""
import os
import shutil
import subprocess
import time

from kiln import agent_ping, argv_of, log, varlinkctl

RAW = "raw-qemu-cold"
KILND = "kilnd-cold (varlink StartVM)"
ENGINE = "kilnd-cold (engine readyAt-startedAt)"


def kilnd_cold_argv(kilnd):
    """Boot one VM through kilnd (warm-up) and return its QEMU argv and VM dir."""
    vm = varlinkctl(kilnd.sock, "CreateVM", {"name": "warmup"})["vm"]
    vm = varlinkctl(kilnd.sock, "StartVM", {"id": vm["id"]})["vm"]
    argv = argv_of(vm["pid"])
    varlinkctl(kilnd.sock, "DeleteVM", {"id": vm["id"]})
    return argv, kilnd.vm_dir(vm["id"]), vm["id"]


def retarget(argv, vm_dir, vm_id, new_dir, new_name="kiln-bench-raw"):
    """The same argv with a kilnd VM's paths and name swapped for new ones."""
    return [a.replace(vm_dir, new_dir).replace(f"kiln-{vm_id}", new_name) for a in argv]


def raw_boot(argv, run_dir, timeout=180):
    """Exec QEMU with `argv` and time until its agent (run_dir/agent.sock) answers."""
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        agent_ping(os.path.join(run_dir, "agent.sock"), t0 + timeout)
        return (time.monotonic() - t0) * 1000
    finally:
        qemu.kill()
        qemu.wait()


def kilnd_boot(sock, name):
    """CreateVM + StartVM; returns (API ms, engine readyAt-startedAt ms)."""
    vm = varlinkctl(sock, "CreateVM", {"name": name})["vm"]
    t0 = time.monotonic()
    ready = varlinkctl(sock, "StartVM", {"id": vm["id"]})["vm"]
    api_ms = (time.monotonic() - t0) * 1000
    varlinkctl(sock, "DeleteVM", {"id": vm["id"]})
    return api_ms, (ready["readyAt"] - ready["startedAt"]) / 1000


def cold_boots(kilnd, rounds, budget_s, min_rounds):
    """Alternate raw QEMU and kilnd cold boots.

    Returns the samples and (argv, VM dir, VM id) of kilnd's warm-up VM, the
    argv the raw peers copy.
    """
    argv, vm_dir, vm_id = kilnd_cold_argv(kilnd)
    results = {RAW: [], KILND: [], ENGINE: []}
    deadline = time.monotonic() + budget_s
    for i in range(rounds):
        if i >= min_rounds and time.monotonic() > deadline:
            log(f"cold boots: {i} rounds in the {budget_s} s budget")
            break
        raw_dir = os.path.join(kilnd.work, f"raw{i}")
        os.makedirs(raw_dir)
        results[RAW].append(raw_boot(retarget(argv, vm_dir, vm_id, raw_dir), raw_dir))
        shutil.rmtree(raw_dir, ignore_errors=True)
        api_ms, engine_ms = kilnd_boot(kilnd.sock, f"bench{i}")
        results[KILND].append(api_ms)
        results[ENGINE].append(engine_ms)
        log(f"cold boot {i + 1}/{rounds}: raw {results[RAW][-1]:.0f} ms, kilnd {api_ms:.0f} ms")
    return results, (argv, vm_dir, vm_id)
