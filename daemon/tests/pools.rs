//! Warm pools with the real kilnd, real QEMU (TCG here) and `varlinkctl`:
//! hot acquire, template clones with their own identity, an acquire storm,
//! leases across `kill -9`, recycling, the pool API, and a broken pool that
//! backs off instead of spinning.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kiln_testkit::{api_doc_script, run_bash, try_wait_until, wait_until, Daemon};
use serde_json::{json, Value};

fn describe(d: &Daemon, pool: &str) -> Value {
    d.ok("DescribePool", json!({ "name": pool }))["pool"].clone()
}

/// Poll DescribePool until `done` holds (VM boots take seconds under TCG).
fn wait_pool(d: &Daemon, pool: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    try_wait_until(Duration::from_secs(240), || {
        let info = describe(d, pool);
        if done(&info) {
            Ok(info)
        } else {
            Err(info)
        }
    })
    .unwrap_or_else(|t| panic!("pool {pool} never got {what}: {t}\n{}", d.log()))
}

fn hot(n: u64) -> impl Fn(&Value) -> bool {
    move |p| p["hot"] == n && p["booting"] == 0
}

fn exec(d: &Daemon, id: &str, script: &str) -> String {
    let reply = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", script] }),
    );
    assert_eq!(reply["exitCode"], 0, "{script}: {reply}");
    reply["stdout"].as_str().unwrap().to_owned()
}

fn acquire(d: &Daemon, pool: &str) -> Value {
    d.ok("Acquire", json!({ "pool": pool, "timeoutMs": 120000 }))["vm"].clone()
}

const TEMPLATE_POOL: &str = "mode = \"template\"\nwarm = 2\nmax = 4\n[vm]\nmemoryMiB = 128\n";

#[test]
fn hot_acquire_gives_a_ready_vm_and_the_pool_refills() {
    let mut d = Daemon::new("");
    d.pool_file("web", TEMPLATE_POOL);
    d.spawn();
    let info = wait_pool(&d, "web", "2 hot VMs", hot(2));
    assert_eq!(info["templateReady"], true, "{info}");
    assert_eq!(info["state"], "ready");

    let vm = d.ok(
        "Acquire",
        json!({ "pool": "web", "timeoutMs": 0, "labels": { "job": "build-42" } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap();
    assert_eq!(vm["state"], "leased");
    assert_eq!(vm["pool"], "web");
    assert_eq!(vm["labels"]["job"], "build-42");
    assert!(vm["leasedBy"].as_str().unwrap().starts_with("uid:"), "{vm}");
    // The agent answers at once: no boot wait behind an acquire.
    assert_eq!(exec(&d, id, "echo hello"), "hello\n");
    // The hostname is the VM's name, set before it was handed out.
    assert_eq!(
        exec(&d, id, "hostname").trim(),
        vm["name"].as_str().unwrap()
    );

    let info = wait_pool(&d, "web", "refilled to 2 hot", hot(2));
    assert_eq!(info["leased"], 1, "{info}");

    d.ok("Release", json!({ "id": id }));
    assert_eq!(
        d.err("DescribeVM", json!({ "id": id })),
        "io.kiln.Manager.NoSuchVM"
    );
    let info = describe(&d, "web");
    assert_eq!(info["leased"], 0, "{info}");
    // Releasing twice, or a VM that is not leased, is refused by name.
    assert_eq!(
        d.err("Release", json!({ "id": id })),
        "io.kiln.Manager.NoSuchVM"
    );
    let listed = d.ok("ListVMs", json!({}));
    let hot_id = listed["vms"][0]["id"].as_str().unwrap();
    assert_eq!(
        d.err("Release", json!({ "id": hot_id })),
        "io.kiln.Manager.InvalidState"
    );
}

#[test]
fn template_clones_share_memory_but_not_identity() {
    let mut d = Daemon::new("");
    d.pool_file("ci", TEMPLATE_POOL);
    d.spawn();
    wait_pool(&d, "ci", "2 hot VMs", hot(2));
    let a = acquire(&d, "ci");
    let b = acquire(&d, "ci");
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_ne!(a_id, b_id);

    // Both are clones: their QEMU maps the pool template's RAM file.
    let templates = d.kilnd.dir.path().join("state/templates/ci");
    let template_dirs: Vec<_> = std::fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(template_dirs.len(), 1, "{template_dirs:?}");
    let memory = template_dirs[0].join("memory");
    for vm in [&a, &b] {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm["pid"])).unwrap();
        assert!(
            maps.contains(memory.to_str().unwrap()),
            "VM {} does not map {}",
            vm["id"],
            memory.display()
        );
    }

    // Same template, same boot — but each has its own identity and RNG.
    let read = |id: &str| {
        exec(
            &d,
            id,
            "cat /proc/sys/kernel/random/boot_id; hostname; cat /etc/machine-id; \
             head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        )
    };
    let (ra, rb) = (read(a_id), read(b_id));
    let (la, lb): (Vec<&str>, Vec<&str>) = (ra.lines().collect(), rb.lines().collect());
    assert_eq!(la.len(), 4, "{ra}");
    assert_eq!(la[0], lb[0], "clones of one template share the boot id");
    assert_ne!(la[1], lb[1], "hostnames differ");
    assert_ne!(la[2], lb[2], "machine ids differ");
    assert_eq!(la[3].len(), 64, "{ra}");
    assert_ne!(la[3], lb[3], "two clones read the same random bytes");
}

#[test]
fn acquire_storm_never_hands_a_vm_out_twice() {
    let mut d = Daemon::new("");
    d.pool_file("storm", TEMPLATE_POOL);
    d.spawn();
    wait_pool(&d, "storm", "2 hot VMs", hot(2));
    // 4 × warm acquirers against max = 2 × warm, all at once.
    let results: Vec<Result<Value, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    d.call(
                        "io.kiln.Manager.Acquire",
                        json!({ "pool": "storm", "timeoutMs": 60000 }),
                    )
                    .map(|v| v["vm"].clone())
                    .map_err(|(name, _)| name)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let ids: HashSet<&str> = won.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        won.len(),
        "a VM was handed out twice: {results:?}"
    );
    assert_eq!(won.len(), 4, "max VMs are handed out: {results:?}");
    for r in &results {
        if let Err(name) = r {
            assert!(
                name == "io.kiln.Manager.PoolExhausted" || name == "io.kiln.Manager.Timeout",
                "{results:?}"
            );
        }
    }
    for vm in &won {
        let id = vm["id"].as_str().unwrap();
        assert_eq!(
            d.ok("DescribeVM", json!({ "id": id }))["vm"]["state"],
            "leased"
        );
        assert_eq!(exec(&d, id, "echo ok"), "ok\n");
    }
    let info = describe(&d, "storm");
    assert_eq!(
        (
            info["leased"].as_u64(),
            info["hot"].as_u64(),
            info["waiting"].as_u64()
        ),
        (Some(4), Some(0), Some(0)),
        "{info}"
    );
    assert_eq!(
        d.ok("ListVMs", json!({}))["vms"].as_array().unwrap().len(),
        4
    );
    // Giving one back lets the pool make a new hot VM.
    d.ok("Release", json!({ "id": won[0]["id"] }));
    wait_pool(&d, "storm", "1 hot VM after a release", hot(1));
}

#[test]
fn leases_survive_kill_9_and_the_pool_comes_back() {
    let mut d = Daemon::new("");
    d.pool_file("keep", TEMPLATE_POOL);
    d.spawn();
    wait_pool(&d, "keep", "2 hot VMs", hot(2));
    let leased = d.ok(
        "Acquire",
        json!({ "pool": "keep", "labels": { "owner": "test" } }),
    )["vm"]
        .clone();
    let id = leased["id"].as_str().unwrap().to_owned();
    wait_pool(&d, "keep", "refilled", hot(2));
    let before = d.kilnd.live_qemus();
    assert_eq!(before.len(), 3, "2 hot + 1 leased");

    d.sigkill();
    d.spawn();
    let vm = d.ok("DescribeVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "leased", "{vm}");
    assert_eq!(vm["leasedBy"], leased["leasedBy"]);
    assert_eq!(vm["labels"]["owner"], "test");
    assert_eq!(vm["pid"], leased["pid"], "the same QEMU, re-adopted");
    assert_eq!(exec(&d, &id, "echo still"), "still\n");
    let info = wait_pool(&d, "keep", "2 hot after restart", hot(2));
    assert_eq!(info["leased"], 1, "{info}");
    assert_eq!(
        info["templateReady"], true,
        "the template on disk is re-used"
    );
    assert_eq!(
        d.log().matches("building template").count(),
        1,
        "the template was rebuilt after a restart:\n{}",
        d.log()
    );
    // No stray QEMU: exactly the hot and leased VMs run.
    let vms = d.ok("ListVMs", json!({}))["vms"].clone();
    let pids: HashSet<u32> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(d.kilnd.live_qemus(), pids);
    assert_eq!(pids.len(), 3);
}

#[test]
fn a_half_booted_pool_vm_is_cleaned_after_kill_9() {
    // A cold pool boots for seconds: kill kilnd while it does.
    let mut d = Daemon::new("");
    d.pool_file("slow", "mode = \"cold\"\nwarm = 1\nmax = 2\n");
    d.spawn();
    wait_pool(&d, "slow", "a boot under way", |p| p["booting"] == 1);
    let booting = d.ok("ListVMs", json!({}))["vms"][0].clone();
    wait_until(Duration::from_secs(30), "QEMU started", || {
        !d.kilnd.live_qemus().is_empty()
    });
    d.sigkill();
    d.spawn();
    // The half-booted VM goes (its QEMU is killed at start-up, the record
    // removed once the process is gone); a new one boots.
    wait_until(Duration::from_secs(30), "the half-booted VM gone", || {
        d.call("io.kiln.Manager.DescribeVM", json!({ "id": booting["id"] }))
            .is_err()
    });
    assert_eq!(
        d.err("DescribeVM", json!({ "id": booting["id"] })),
        "io.kiln.Manager.NoSuchVM"
    );
    wait_pool(&d, "slow", "1 hot VM", hot(1));
    assert_eq!(d.kilnd.live_qemus().len(), 1);
}

#[test]
fn recycle_puts_the_vm_back_hot() {
    let mut d = Daemon::new("");
    d.pool_file("re", "mode = \"template\"\nwarm = 1\nmax = 1\n");
    d.spawn();
    wait_pool(&d, "re", "1 hot VM", hot(1));
    let vm = acquire(&d, "re");
    let id = vm["id"].as_str().unwrap();
    exec(&d, id, "echo dirty > /tmp/state");
    // At max: a second acquire cannot be served.
    assert_eq!(
        d.err("Acquire", json!({ "pool": "re", "timeoutMs": 1000 })),
        "io.kiln.Manager.PoolExhausted"
    );
    d.ok("Release", json!({ "id": id, "recycle": true }));
    wait_pool(&d, "re", "the VM hot again", hot(1));
    let again = acquire(&d, "re");
    assert_eq!(again["id"], vm["id"], "the same VM came back");
    assert_ne!(again["pid"], vm["pid"], "reset into a fresh clone");
    let out = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["cat", "/tmp/state"] }),
    );
    assert_ne!(
        out["exitCode"], 0,
        "state from the last holder survived: {out}"
    );
}

#[test]
fn pools_are_created_resized_and_deleted_through_the_api() {
    let d = Daemon::new("");
    // A vendor-style pool file, to delete (mask) through the API later.
    d.pool_file("vendor", "mode = \"cold\"\nwarm = 0\nmax = 1\n");
    let mut d = d;
    d.spawn();
    let created = d.ok(
        "CreatePool",
        json!({ "name": "api", "spec": { "mode": "template", "warm": 1, "max": 3,
                "refillConcurrency": 1, "vm": { "memoryMiB": 128 } } }),
    )["pool"]
        .clone();
    assert_eq!(created["warm"], 1);
    assert!(created["source"]
        .as_str()
        .unwrap()
        .ends_with("state/pools.d/api.toml"));
    wait_pool(&d, "api", "1 hot VM", hot(1));
    let info = d.ok("ResizePool", json!({ "name": "api", "warm": 2 }))["pool"].clone();
    assert_eq!(
        (info["warm"].as_u64(), info["max"].as_u64()),
        (Some(2), Some(3))
    );
    wait_pool(&d, "api", "2 hot VMs", hot(2));
    // Shrink while clones are still booting: they must not stay hot.
    d.ok("ResizePool", json!({ "name": "api", "warm": 3 }));
    d.ok("ResizePool", json!({ "name": "api", "warm": 0 }));
    wait_pool(&d, "api", "no hot or booting VMs", |p| {
        p["hot"] == 0 && p["booting"] == 0
    });
    // The shrunk pool's VMs are destroyed behind the counts: wait until
    // none is listed, then check that none came back hot.
    wait_until(
        Duration::from_secs(30),
        "every VM of the pool destroyed",
        || {
            let vms = d.ok("ListVMs", json!({}))["vms"].clone();
            if vms.as_array().unwrap().is_empty() {
                Ok(())
            } else {
                Err(vms)
            }
        },
    );
    assert_eq!(describe(&d, "api")["hot"], 0);

    // Bad input: named errors, nothing created.
    for (params, error) in [
        (
            json!({ "name": "api", "spec": { "warm": 1, "max": 1 } }),
            "AlreadyExists",
        ),
        (
            json!({ "name": "x", "spec": { "warm": 5, "max": 2 } }),
            "InvalidSpec",
        ),
        (
            json!({ "name": "x", "spec": { "warm": 1, "max": 2, "vm": { "vcpus": 0 } } }),
            "InvalidSpec",
        ),
        (
            json!({ "name": "x", "spec": { "warm": 1, "max": 2, "vm": { "kernel": "/nonexistent" } } }),
            "InvalidSpec",
        ),
        (
            json!({ "name": "bad/name", "spec": { "warm": 1, "max": 2 } }),
            "InvalidSpec",
        ),
        (
            json!({ "name": "x", "spec": { "warm": 1, "max": 2, "wram": 3 } }),
            "org.varlink.service.InvalidParameter",
        ),
    ] {
        let name = d.err("CreatePool", params.clone());
        assert!(name.ends_with(error), "{params}: {name}");
    }
    for (method, params, error) in [
        ("Acquire", json!({ "pool": "nope" }), "NoSuchPool"),
        (
            "Acquire",
            json!({ "pool": "api", "timeoutMs": 100000000 }),
            "InvalidArgument",
        ),
        (
            "Acquire",
            json!({ "pool": "api", "labels": { "bad key": "v" } }),
            "InvalidArgument",
        ),
        (
            "ResizePool",
            json!({ "name": "api", "warm": 9 }),
            "InvalidSpec",
        ),
        ("DeletePool", json!({ "name": "nope" }), "NoSuchPool"),
    ] {
        let name = d.err(method, params.clone());
        assert!(name.ends_with(error), "{method} {params}: {name}");
    }
    let names = |d: &Daemon| -> Vec<String> {
        d.ok("ListPools", json!({}))["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&d), ["api", "vendor"]);

    // Changes persist across a restart; deleting a file pool masks it.
    d.ok("DeletePool", json!({ "name": "vendor" }));
    d.sigkill();
    d.spawn();
    assert_eq!(names(&d), ["api"]);
    assert_eq!(describe(&d, "api")["warm"], 0);
    d.ok("DeletePool", json!({ "name": "api" }));
    assert!(names(&d).is_empty());
    assert!(
        std::fs::read_dir(d.kilnd.dir.path().join("state/templates/api"))
            .map(|mut e| e.next().is_none())
            .unwrap_or(true)
    );
}

#[test]
fn a_pool_with_a_broken_kernel_fails_and_backs_off() {
    let mut d = Daemon::new("");
    let kernel = d.kilnd.dir.path().join("not-a-kernel");
    std::fs::write(&kernel, "this is not a bzImage").unwrap();
    d.pool_file(
        "broken",
        &format!(
            "mode = \"cold\"\nwarm = 2\nmax = 2\n[vm]\nkernel = \"{}\"\n",
            kernel.display()
        ),
    );
    d.spawn();
    let started = Instant::now();
    let info = wait_pool(&d, "broken", "a failure", |p| {
        p["failed"].as_u64() >= Some(2)
    });
    let message = info["lastError"].as_str().unwrap();
    assert!(
        message.contains("kernel") || message.contains("QEMU"),
        "{info}"
    );
    // Back-off doubles (1 s, 2 s, 4 s, ...): in 8 seconds a busy loop would
    // have made hundreds of attempts; back-off makes a handful. A fixed
    // window on purpose: the number of attempts in it is what is measured.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(started.elapsed()));
    let info = describe(&d, "broken");
    let failures = info["failed"].as_u64().unwrap();
    assert!(failures <= 8, "{failures} attempts in 8 s: {info}");
    assert!(
        info["state"] == "backoff" || info["state"] == "failed",
        "{info}"
    );
    // Waiting callers are not left hanging on a failing pool.
    let wait_started = Instant::now();
    let err = d.err("Acquire", json!({ "pool": "broken", "timeoutMs": 2000 }));
    assert!(
        ["BootFailed", "Timeout"].iter().any(|e| err.ends_with(e)),
        "{err}"
    );
    assert!(wait_started.elapsed() < Duration::from_secs(10));
    // Failed attempts do not pile up: at most the next retry is under way
    // (the back-off timer may have fired meanwhile), within `max`.
    let vms = d.ok("ListVMs", json!({}))["vms"].clone();
    let vms = vms.as_array().unwrap();
    assert!(
        vms.len() <= 2
            && vms
                .iter()
                .all(|v| v["state"] == "booting" || v["state"] == "failed"),
        "{vms:?}"
    );
}

#[test]
fn pool_doc_examples_run() {
    let d = Daemon::start();
    let script = api_doc_script(
        "## Pools",
        &[(
            "SOCK=unix:/run/kiln/io.kiln.Manager",
            format!("SOCK={}", d.address()),
        )],
    );
    let stdout = run_bash(&script, &d.log());
    assert!(
        stdout.contains("demo-"),
        "hostname is the VM name: {stdout}"
    );
    assert!(d.ok("ListPools", json!({}))["pools"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// Lease lifetimes with the real kilnd: a 3 s lease is reclaimed, a renewed
/// one outlives its first deadline, one that expires while kilnd is killed
/// is reclaimed at start, and a caller over its quota is refused.
#[test]
fn leases_expire_are_renewed_survive_kill_9_end_with_their_connection_and_have_a_quota() {
    let mut d = Daemon::new("max_leases_per_caller = 2\n");
    d.pool_file(
        "ttl",
        "mode = \"template\"\nwarm = 2\nmax = 4\n[vm]\nmemoryMiB = 128\n",
    );
    d.spawn();
    wait_pool(&d, "ttl", "2 hot VMs", hot(2));

    // A 3 s lease ends by itself; one renewed outlives its first deadline.
    let short = d.ok("Acquire", json!({ "pool": "ttl", "ttlSec": 3 }))["vm"].clone();
    let renewed = d.ok("Acquire", json!({ "pool": "ttl", "ttlSec": 3 }))["vm"].clone();
    let (short_id, renewed_id) = (
        short["id"].as_str().unwrap(),
        renewed["id"].as_str().unwrap(),
    );
    assert!(short["leaseExpiresAt"].as_u64().unwrap() > short["acquiredAt"].as_u64().unwrap());
    // Both leases are held: a third is over the quota of 2.
    assert_eq!(
        d.err("Acquire", json!({ "pool": "ttl" })),
        "io.kiln.Manager.QuotaExceeded"
    );
    let extended = d.ok("Renew", json!({ "id": renewed_id, "ttlSec": 60 }))["vm"].clone();
    assert!(extended["leaseExpiresAt"].as_u64() > renewed["leaseExpiresAt"].as_u64());
    wait_until(
        Duration::from_secs(30),
        "the 3 s lease to be reclaimed",
        || gone(&d, short_id),
    );
    let still = d.ok("DescribeVM", json!({ "id": renewed_id }))["vm"].clone();
    assert_eq!(still["state"], "leased", "the renewed lease holds: {still}");
    assert_eq!(
        d.err("Renew", json!({ "id": renewed_id, "ttlSec": 0 })),
        "io.kiln.Manager.InvalidArgument"
    );
    d.ok("Release", json!({ "id": renewed_id }));

    // A lease that expires while kilnd is down is reclaimed at start.
    wait_pool(&d, "ttl", "2 hot VMs again", hot(2));
    let doomed = d.ok("Acquire", json!({ "pool": "ttl", "ttlSec": 2 }))["vm"].clone();
    let doomed_id = doomed["id"].as_str().unwrap().to_owned();
    d.sigkill();
    let deadline = Duration::from_micros(doomed["leaseExpiresAt"].as_u64().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(deadline.saturating_sub(now) + Duration::from_millis(500));
    d.spawn();
    wait_until(
        Duration::from_secs(30),
        "the lease to be reclaimed at start",
        || gone(&d, &doomed_id),
    );
    let info = wait_pool(&d, "ttl", "2 hot after the restart", hot(2));
    assert_eq!(info["leased"], 0, "{info}");

    // releaseOnDisconnect: varlinkctl's connection closes when it exits,
    // and the lease ends with it.
    let bound = d.ok(
        "Acquire",
        json!({ "pool": "ttl", "releaseOnDisconnect": true }),
    )["vm"]
        .clone();
    assert_eq!(bound["releaseOnDisconnect"], true, "{bound}");
    let bound_id = bound["id"].as_str().unwrap().to_owned();
    wait_until(
        Duration::from_secs(30),
        "the lease to end with its connection",
        || gone(&d, &bound_id),
    );
}

/// Whether VM `id` is no longer listed.
fn gone(d: &Daemon, id: &str) -> bool {
    let vms = d.ok("ListVMs", json!({}))["vms"].clone();
    !vms.as_array().unwrap().iter().any(|v| v["id"] == id)
}
