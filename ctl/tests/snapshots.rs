//! `kilnctl snapshot`, `restore`, `fork`, the limits options of `create`
//! and the usage `show` prints, against a real kilnd and one real VM (TCG
//! here): the VM capped and saved, the snapshot listed as a table and as
//! JSON, restored as a new VM that has the VM's file, forked twice, the
//! VM itself taken back to the snapshot after a kill (a file written after
//! the snapshot is gone), the snapshot removed, and NoSuchSnapshot as
//! exit 3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Instant;

use common::{fails, json, ok, row};
use kiln_testkit::Daemon;
use serde_json::Value;

/// `kilnctl exec VM -- sh -c SCRIPT`'s stdout.
fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    ok(d, &["exec", vm, "--", "sh", "-c", script])
}

fn state(d: &Daemon, vm: &str) -> Value {
    json(d, &["show", vm])["vm"]["state"].clone()
}

/// One VM for all of it; its restores and forks boot from its snapshot.
#[test]
fn snapshot_restore_fork_and_usage_in_one_vm() {
    let started = Instant::now();
    let d = Daemon::start();
    let id = ok(
        &d,
        &[
            "create",
            "box",
            "--memory",
            "128",
            "--memory-cap",
            "300M",
            "--cpus",
            "0.5",
            "--cpu-weight",
            "50",
            "--start",
        ],
    )
    .trim()
    .to_owned();
    println!("booted in {:?}", started.elapsed());

    // Usage: in `show` as readable lines, and as kilnd sent it with --json.
    let usage = json(&d, &["show", "box"])["vm"]["usage"].clone();
    assert!(usage["cpuUsec"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["rssBytes"].as_u64().unwrap() > 10 << 20, "{usage}");
    let shown = ok(&d, &["show", "box"]);
    for label in [
        "CPU time: ",
        "Memory used: ",
        "Memory cap: ",
        "RSS: ",
        "PSS: ",
        "Disk read: ",
        "Net sent: ",
        "OOM kills: 0\n",
    ] {
        assert!(shown.contains(label), "{label:?} missing:\n{shown}");
    }
    // The cap as --memory-cap set it, where this host gives VMs a cgroup.
    match usage["memoryLimitBytes"].as_u64().unwrap() {
        0 => println!("SKIP: the VM has no memory cgroup here"),
        cap => {
            assert_eq!(cap, 300 << 20, "{usage}");
            assert!(shown.contains("Memory cap: 300.0 MiB\n"), "{shown}");
        }
    }

    // A snapshot: printed as a row; the VM runs on.
    sh(&d, "box", "echo before > /tmp/mark");
    let saved = ok(&d, &["snapshot", "create", "box", "s1"]);
    assert!(saved.starts_with("NAME "), "{saved}");
    let cells = row(&saved, "s1").unwrap_or_else(|| panic!("{saved}"));
    assert_eq!((cells[1], cells[2]), ("box", id.as_str()), "{saved}");
    assert_eq!(state(&d, "box"), "ready");
    println!("snapshot after {:?}", started.elapsed());

    let listed = ok(&d, &["snapshot", "ls"]);
    let cells = row(&listed, "s1").unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        (cells[1], cells[2], cells[6]),
        ("box", id.as_str(), "128M"),
        "{listed}"
    );
    let snapshots = json(&d, &["snapshot", "ls"])["snapshots"].clone();
    assert_eq!(snapshots.as_array().unwrap().len(), 1, "{snapshots}");
    let s1 = &snapshots[0];
    assert_eq!(
        (
            &s1["name"],
            &s1["sourceId"],
            &s1["sourceName"],
            &s1["memoryMiB"]
        ),
        (
            &Value::from("s1"),
            &Value::from(id.as_str()),
            &Value::from("box"),
            &Value::from(128)
        ),
        "{s1}"
    );
    assert!(s1["sizeBytes"].as_u64().unwrap() > 0, "{s1}");
    assert_eq!(ok(&d, &["snapshot", "ls", "-q"]), "s1\n");

    // A new VM from it, ready, with the VM's file.
    let copy = ok(&d, &["restore", "s1", "--name", "copy"])
        .trim()
        .to_owned();
    assert_eq!(copy.len(), id.len(), "an id: {copy:?}");
    assert_ne!(copy, id);
    assert_eq!(state(&d, &copy), "ready");
    assert_eq!(json(&d, &["show", &copy])["vm"]["name"], "copy");
    assert_eq!(sh(&d, "copy", "cat /tmp/mark"), "before\n");
    println!("restore after {:?}", started.elapsed());

    // Two running copies of the VM, their ids a line each.
    let forked = ok(&d, &["fork", "box", "-n", "2"]);
    let forks: Vec<&str> = forked.lines().collect();
    assert_eq!(forks.len(), 2, "{forked}");
    for fork in &forks {
        assert_ne!(*fork, id);
        assert_eq!(state(&d, fork), "ready", "fork {fork}");
    }
    assert_eq!(sh(&d, forks[1], "cat /tmp/mark"), "before\n");
    println!("fork after {:?}", started.elapsed());

    // The VM itself back to the snapshot: what it wrote since is undone.
    sh(&d, "box", "echo after > /tmp/mark");
    ok(&d, &["kill", "box"]);
    assert_eq!(ok(&d, &["restore", "s1", "--into", "box"]), "");
    assert_eq!(state(&d, "box"), "ready");
    assert_eq!(json(&d, &["show", "box"])["vm"]["id"], id.as_str());
    assert_eq!(sh(&d, "box", "cat /tmp/mark"), "before\n");

    // Removed; then it is not found (exit 3).
    assert_eq!(json(&d, &["snapshot", "rm", "s1"]), serde_json::json!({}));
    assert_eq!(ok(&d, &["snapshot", "ls", "-q"]), "");
    for args in [&["snapshot", "rm", "s1"][..], &["restore", "s1"][..]] {
        fails(&d, None, args, 3, "io.kiln.Manager.NoSuchSnapshot");
    }
    // The restored VM runs on without it.
    assert_eq!(sh(&d, "copy", "cat /tmp/mark"), "before\n");
    println!("all in {:?}", started.elapsed());
}
