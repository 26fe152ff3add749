//! Snapshots, restores and forks through the real kilnd on real QEMU (TCG
//! here): a VM with a process counting in memory and a file on its root
//! is saved; a VM restored from the snapshot and two forks of the running
//! VM (over D-Bus with real `busctl`) each continue the count on their
//! own, keep the file, have their own hostname and read different bytes
//! from `/dev/urandom`; the snapshot survives a kill -9 of kilnd and
//! restores again after it; refusals have their names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kiln_testkit::busctl::{DbusKilnd, MANAGER, MANAGER_IF, VM_IF};
use serde_json::json;

const M: &str = "io.kiln.Manager.";

fn sh(k: &DbusKilnd, id: &str, script: &str) -> String {
    let reply = k.varlinkctl(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", script] }),
    );
    reply["stdout"].as_str().unwrap().trim().to_owned()
}

/// The guest's counter, twice 1 s apart: it must have moved on.
fn counting(k: &DbusKilnd, id: &str) -> (u64, u64) {
    let first: u64 = sh(k, id, "cat /tmp/count").parse().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let second: u64 = sh(k, id, "cat /tmp/count").parse().unwrap();
    assert!(
        second > first,
        "VM {id}: the counter stood still at {first}"
    );
    (first, second)
}

#[test]
fn snapshots_restore_and_forks_continue_where_the_vm_was() {
    let mut k = DbusKilnd::start(false);
    let id = k.varlinkctl("CreateVM", json!({ "name": "origin" }))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    k.varlinkctl("StartVM", json!({ "id": id }));
    // State in memory (a shell counting) and on the root file system.
    sh(
        &k,
        &id,
        // The counter is renamed into place: a read never sees the file
        // between its truncation and its write (an empty count).
        "echo kept > /root/note; (i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(800));

    let started = Instant::now();
    let snapshot =
        k.varlinkctl("SnapshotVM", json!({ "id": id, "name": "counted" }))["snapshot"].clone();
    let took_snapshot = started.elapsed();
    assert_eq!(snapshot["sourceId"], id.as_str());
    assert!(snapshot["sizeBytes"].as_u64().unwrap() > 0);
    assert_eq!(
        k.varlinkctl("DescribeVM", json!({ "id": id }))["vm"]["state"],
        "ready",
        "the VM runs on after its snapshot"
    );
    let (at_origin, _) = counting(&k, &id);

    // A restore continues from the snapshot, with its own identity.
    let started = Instant::now();
    let restored = k.varlinkctl(
        "RestoreVM",
        json!({ "snapshot": "counted", "name": "again" }),
    )["vm"]
        .clone();
    let took_restore = started.elapsed();
    let rid = restored["id"].as_str().unwrap().to_owned();
    assert_eq!(restored["state"], "ready");
    assert_eq!(sh(&k, &rid, "cat /root/note"), "kept");
    let (restored_count, _) = counting(&k, &rid);
    assert!(
        restored_count < at_origin + 50,
        "the restore started from the snapshot's count, not the VM's later one"
    );
    assert_eq!(sh(&k, &rid, "hostname"), "again");

    // Two forks of the running VM over D-Bus: each counts on its own from
    // where the VM was, and their RNGs differ.
    let started = Instant::now();
    let forked = k.call(MANAGER, MANAGER_IF, "ForkVM", &["su", &id, "2"]);
    let took_fork = started.elapsed();
    let paths: Vec<String> = forked[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(paths.len(), 2, "{forked}");
    let fork_ids: Vec<String> = paths
        .iter()
        .map(|p| p.rsplit('/').next().unwrap().to_owned())
        .collect();
    let mut randoms = Vec::new();
    for fid in &fork_ids {
        assert_eq!(sh(&k, fid, "cat /root/note"), "kept");
        let (count, _) = counting(&k, fid);
        assert!(
            count >= at_origin,
            "fork {fid} went back in time: {count} < {at_origin}"
        );
        randoms.push(sh(&k, fid, "head -c 16 /dev/urandom | od -An -tx1"));
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two forks read the same random bytes"
    );
    sh(&k, &fork_ids[0], "echo mine > /root/note");
    assert_eq!(
        sh(&k, &fork_ids[1], "cat /root/note"),
        "kept",
        "forks share writes"
    );
    let listed = k.varlinkctl("ListSnapshots", json!({}))["snapshots"].clone();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "the fork's own snapshot was removed: {listed}"
    );
    println!("snapshot {took_snapshot:?}, restore {took_restore:?}, fork of 2 {took_fork:?}");

    // D-Bus: the same snapshot call on the VM object.
    let path = format!("/io/kiln/Kiln1/vm/{id}");
    let tuple = k.call(&path, VM_IF, "Snapshot", &["sb", "second", "false"]);
    assert_eq!(tuple[0], "second", "{tuple}");

    // kill -9 of kilnd: the snapshots stay and still restore.
    k.kilnd.sigkill();
    k.spawn_kilnd();
    let names: Vec<String> = k.varlinkctl("ListSnapshots", json!({}))["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["counted", "second"]);
    let late = k.varlinkctl("RestoreVM", json!({ "snapshot": "counted" }))["vm"].clone();
    assert_eq!(late["name"], "counted-1");
    counting(&k, late["id"].as_str().unwrap());

    // The docs/api.md examples, verbatim, on the running VM.
    let script = kiln_testkit::api_doc_script(
        "## Snapshots, restores and forks",
        &[
            (
                "SOCK=unix:/run/kiln/io.kiln.Manager",
                format!("SOCK={}", k.kilnd.varlink_address()),
            ),
            ("ID=0123456789ab", format!("ID={id}")),
        ],
    );
    let stdout = kiln_testkit::run_bash(&script, &k.log());
    assert_eq!(
        stdout,
        "before-tests\nready\norigin-fork-3\norigin-fork-4\nbefore-tests\ncounted\nsecond\n{}\n"
    );

    // The VM itself back to its snapshot (arktos' RestoreToSnapshot): the
    // note it wrote since is undone, its counter is the snapshot's again.
    let own_hostname = sh(&k, &id, "hostname");
    sh(&k, &id, "echo changed > /root/note");
    assert_eq!(
        k.varlink("RestoreVM", json!({ "snapshot": "counted", "into": id }))
            .unwrap_err()
            .0,
        format!("{M}InvalidState"),
        "a running VM is not restored in place"
    );
    k.varlinkctl("KillVM", json!({ "id": id }));
    let back =
        k.varlinkctl("RestoreVM", json!({ "snapshot": "counted", "into": id }))["vm"].clone();
    assert_eq!(
        (back["id"].as_str(), back["state"].as_str()),
        (Some(id.as_str()), Some("ready"))
    );
    assert_eq!(sh(&k, &id, "cat /root/note"), "kept");
    assert_eq!(
        sh(&k, &id, "hostname"),
        own_hostname,
        "it keeps its identity"
    );
    counting(&k, &id);

    // Refusals.
    for (method, params, want) in [
        (
            "RestoreVM",
            json!({ "snapshot": "missing" }),
            "NoSuchSnapshot",
        ),
        (
            "DeleteSnapshot",
            json!({ "name": "missing" }),
            "NoSuchSnapshot",
        ),
        (
            "SnapshotVM",
            json!({ "id": id, "name": "counted" }),
            "AlreadyExists",
        ),
        (
            "SnapshotVM",
            json!({ "id": id, "name": "a/b" }),
            "InvalidArgument",
        ),
        ("ForkVM", json!({ "id": id, "count": 0 }), "InvalidArgument"),
        (
            "RestoreVM",
            json!({ "snapshot": "counted", "into": rid }),
            "InvalidState",
        ),
        (
            "SnapshotVM",
            json!({ "id": "000000000000", "name": "x" }),
            "NoSuchVM",
        ),
    ] {
        match k.varlink(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded: {v}"),
            Err((name, _)) => assert_eq!(name, format!("{M}{want}"), "{method} {params}"),
        }
    }
    k.varlinkctl("DeleteSnapshot", json!({ "name": "second" }));
    k.varlinkctl("DeleteSnapshot", json!({ "name": "counted" }));
    assert_eq!(
        k.varlinkctl("ListSnapshots", json!({}))["snapshots"],
        json!([])
    );
    // The restored VMs run on without their snapshot files.
    counting(&k, &rid);
}
