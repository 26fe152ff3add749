//! Crash storm (issue 16, item 4): kilnd is killed with SIGKILL at random
//! moments and restarted, again and again, while clients acquire and
//! release VMs from a template pool that keeps refilling. Afterwards every
//! acknowledged lease is intact, no VM has two holders, every QEMU belongs
//! to a record and the pool is back at `warm`. The counts are printed.
//!
//! `KILN_STORM_KILLS` sets the number of kills (default 30); the random
//! moments come from a printed seed (`KILN_STORM_SEED` replays a run).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kiln_testkit::{try_wait_until, varlinkctl_call, Daemon};
use serde_json::{json, Value};

const POOL: &str = "mode = \"template\"\nwarm = 3\nmax = 12\n[vm]\nmemoryMiB = 128\n";

/// What the clients were told.
#[derive(Debug, Default)]
struct Ledger {
    /// Acknowledged leases still held: token -> VM id.
    held: BTreeMap<String, String>,
    /// Tokens whose release was sent but not acknowledged: unknown fate.
    uncertain: HashSet<String>,
    acquired: usize,
    released: usize,
    refused: usize,
    unanswered: usize,
    /// Acknowledged leases whose release was refused: lost leases.
    lost: Vec<String>,
}

/// A call that may meet a dead kilnd: Some(reply or named error), None when
/// no answer came.
fn call(address: &str, method: &str, params: Value) -> Option<Result<Value, String>> {
    match varlinkctl_call(
        None,
        address,
        &format!("io.kiln.Manager.{method}"),
        &params.to_string(),
    ) {
        Ok(v) => Some(Ok(v)),
        Err((name, _)) if name.starts_with("io.kiln.Manager.") => Some(Err(name)),
        Err(_) => None,
    }
}

fn client(address: &str, ledger: &Mutex<Ledger>, stop: &AtomicBool, client: usize) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = format!("c{client}-{n}");
        let params = json!({ "pool": "storm", "timeoutMs": 3000, "labels": { "token": token } });
        match call(address, "Acquire", params) {
            Some(Ok(reply)) => {
                let id = reply["vm"]["id"].as_str().unwrap().to_owned();
                let mut l = ledger.lock().unwrap();
                l.acquired += 1;
                assert!(
                    !l.held.values().any(|held| *held == id),
                    "VM {id} handed to two holders"
                );
                l.held.insert(token.clone(), id);
            }
            Some(Err(_)) => ledger.lock().unwrap().refused += 1,
            None => {
                ledger.lock().unwrap().unanswered += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Beyond 4 held, give back the oldest (taken out of the ledger
        // under its lock: no two clients release one VM), so leases are
        // both held across kills and released during them.
        let oldest = {
            let mut l = ledger.lock().unwrap();
            (l.held.len() > 4).then(|| l.held.pop_first()).flatten()
        };
        if let Some((token, id)) = oldest {
            match call(address, "Release", json!({ "id": id })) {
                Some(Ok(_)) => ledger.lock().unwrap().released += 1,
                Some(Err(name)) => {
                    ledger
                        .lock()
                        .unwrap()
                        .lost
                        .push(format!("{token} on {id}: {name}"));
                }
                None => {
                    ledger.lock().unwrap().uncertain.insert(token);
                }
            }
        }
    }
}

#[test]
fn sigkill_storm_loses_no_lease_and_leaks_nothing() {
    let kills: usize = std::env::var("KILN_STORM_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("KILN_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 1);
    println!("storm seed {seed} (KILN_STORM_SEED={seed} replays it), {kills} kills");
    let mut rng = seed;
    let mut next_delay = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_millis(150 + rng % 700)
    };

    let mut d = Daemon::new("");
    let pools = d.kilnd.dir.path().join("pools.d");
    std::fs::create_dir_all(&pools).unwrap();
    std::fs::write(pools.join("storm.toml"), POOL).unwrap();
    d.spawn();
    let address = d.address();
    let hot = |d: &Daemon| {
        let pool = d.call("io.kiln.Manager.DescribePool", json!({ "name": "storm" }));
        pool.map(|p| p["pool"]["hot"].as_u64().unwrap_or(0) >= 3)
            .unwrap_or(false)
    };
    try_wait_until(Duration::from_secs(240), || hot(&d))
        .unwrap_or_else(|t| panic!("the pool never filled: {t}\n{}", d.log()));

    let ledger = Mutex::new(Ledger::default());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for c in 0..3 {
            let (address, ledger, stop) = (&address, &ledger, &stop);
            scope.spawn(move || client(address, ledger, stop, c));
        }
        for _ in 0..kills {
            std::thread::sleep(next_delay());
            d.sigkill();
            d.spawn();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let ledger = ledger.into_inner().unwrap();
    // A lost lease fails the test with what kilnd logged about its VM.
    if let Some(lost) = ledger.lost.first() {
        let id = lost
            .split(" on ")
            .nth(1)
            .unwrap()
            .split(':')
            .next()
            .unwrap();
        let history: Vec<String> = d
            .log()
            .lines()
            .filter(|l| l.contains(id))
            .map(String::from)
            .collect();
        panic!(
            "an acknowledged lease was lost: {lost}\n{}",
            history.join("\n")
        );
    }

    // Every acknowledged lease is intact: same VM, same holder's token.
    for (token, id) in &ledger.held {
        let vm = d.ok("DescribeVM", json!({ "id": id }))["vm"].clone();
        assert_eq!(
            vm["state"],
            "leased",
            "lease {token} on {id}: {vm}\n{}",
            d.log()
        );
        assert_eq!(vm["labels"]["token"], token.as_str(), "{vm}");
    }
    // No VM with two holders, and no lease nobody was told about beyond
    // those whose answer was lost.
    let vms = d.ok("ListVMs", json!({}))["vms"]
        .as_array()
        .unwrap()
        .clone();
    let tokens: Vec<&str> = vms
        .iter()
        .filter_map(|v| v["labels"]["token"].as_str())
        .collect();
    let unique: HashSet<&&str> = tokens.iter().collect();
    assert_eq!(unique.len(), tokens.len(), "a token on two VMs");
    // Leases granted whose answer was lost with a killed kilnd are real
    // leases nobody was told about (a real client would have given them a
    // ttlSec): count them, then give everything back.
    let leaked = vms
        .iter()
        .filter(|v| v["state"] == "leased")
        .filter_map(|v| v["labels"]["token"].as_str())
        .filter(|t| !ledger.held.contains_key(*t) && !ledger.uncertain.contains(*t))
        .count();
    for vm in vms.iter().filter(|v| v["leasedBy"].is_string()) {
        d.ok("Release", json!({ "id": vm["id"] }));
    }
    // The pool comes back to warm, and every QEMU belongs to a VM record.
    try_wait_until(Duration::from_secs(240), || hot(&d))
        .unwrap_or_else(|t| panic!("the pool never refilled: {t}\n{}", d.log()));
    let settled = try_wait_until(Duration::from_secs(60), || {
        let vms = d.ok("ListVMs", json!({}))["vms"]
            .as_array()
            .unwrap()
            .clone();
        let recorded: HashSet<u32> = vms
            .iter()
            .filter_map(|v| v["pid"].as_u64())
            .map(|p| p as u32)
            .collect();
        let live = d.kilnd.live_qemus();
        if live == recorded {
            Ok(live.len())
        } else {
            Err(format!("live {live:?} vs recorded {recorded:?}"))
        }
    });
    let qemus = settled.unwrap_or_else(|t| panic!("QEMU without a record: {t}"));
    println!(
        "storm: {kills} kills of kilnd; {} leases acknowledged, {} releases acknowledged, {} held at the end and intact, {} releases and {leaked} acquires whose answer was lost, {} refused (named errors), {} calls unanswered while kilnd was down; {qemus} QEMUs, each with a record",
        ledger.acquired,
        ledger.released,
        ledger.held.len(),
        ledger.uncertain.len(),
        ledger.refused,
        ledger.unanswered,
    );
    // Under load fewer calls get through; a third of the kills is still
    // a storm worth the name.
    assert!(
        ledger.acquired >= kills / 3,
        "too few acquires to mean anything"
    );
    assert!(
        !ledger.held.is_empty(),
        "no lease was held across the kills"
    );
}
