//! A full disk under the real kilnd: its state directory is a small tmpfs
//! that the test fills. Every write kilnd must make fails with a named
//! `StorageFailed`, nothing is half-written or lost, and kilnd carries on
//! by itself once there is room again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_testkit::{require_root, wait_until, Daemon};
use serde_json::{json, Value};

/// A tmpfs mounted for the test, lazily unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Self(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system at `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    filler
}

fn vms(d: &Daemon) -> Vec<Value> {
    d.ok("ListVMs", json!({}))["vms"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_full_state_disk_fails_writes_by_name_and_kilnd_recovers() {
    if !require_root("a tmpfs for the state directory") {
        return;
    }
    let mut d = Daemon::new("");
    let state = d.kilnd.dir.path().join("state");
    let _mount = Mount::tmpfs(&state, "16m");
    d.spawn();
    d.ok(
        "CreatePool",
        json!({ "name": "cold", "spec": { "mode": "cold", "warm": 1, "max": 2 } }),
    );
    wait_until(Duration::from_secs(180), "a hot pool VM", || {
        let pool = d.ok("DescribePool", json!({ "name": "cold" }))["pool"].clone();
        (pool["hot"] == 1).then_some(()).ok_or(pool.to_string())
    });
    let before = vms(&d);

    let filler = fill(&state);
    // A new VM: refused by name, nothing written.
    let (name, error) = d
        .call("io.kiln.Manager.CreateVM", json!({ "name": "late" }))
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.StorageFailed", "{error}");
    // A lease: refused, the VM stays hot and unleased.
    let (name, _) = d
        .call(
            "io.kiln.Manager.Acquire",
            json!({ "pool": "cold", "timeoutMs": 0 }),
        )
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.StorageFailed");
    assert_eq!(vms(&d), before, "nothing changed");
    let pool = d.ok("DescribePool", json!({ "name": "cold" }))["pool"].clone();
    assert_eq!(pool["hot"], 1, "{pool}");
    // A pool definition cannot be written either.
    let (name, _) = d
        .call(
            "io.kiln.Manager.CreatePool",
            json!({ "name": "more", "spec": { "mode": "cold", "warm": 0, "max": 1 } }),
        )
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.StorageFailed");

    // Room again: everything works, nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    let vm = d.ok("Acquire", json!({ "pool": "cold", "timeoutMs": 0 }))["vm"].clone();
    assert_eq!(vm["id"], before[0]["id"]);
    assert_eq!(vm["state"], "leased");
    d.ok("CreateVM", json!({ "name": "late" }));
    // The pool refills to warm again by itself.
    wait_until(Duration::from_secs(180), "the pool refilled", || {
        let pool = d.ok("DescribePool", json!({ "name": "cold" }))["pool"].clone();
        (pool["hot"] == 1).then_some(()).ok_or(pool.to_string())
    });
    // And a restart finds the lease and both records.
    d.sigkill();
    d.spawn();
    let after = vms(&d);
    assert_eq!(after.len(), 3, "{after:?}");
    let leased = after.iter().find(|v| v["id"] == vm["id"]).unwrap();
    assert_eq!(leased["state"], "leased");
}

/// Files under `dir` (recursively), as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            found.push(path.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    found.sort();
    found
}

/// An image import and a template build on a state disk without room for
/// them: `StorageFailed` (the template's because its RAM file would not
/// fit: QEMU would die of SIGBUS half-way), nothing half-made in the store
/// or the templates; with room again (the tmpfs grown) both work, without
/// a restart.
#[test]
fn imports_and_template_builds_without_room_fail_by_name_and_recover() {
    if !require_root("a tmpfs for the state directory") {
        return;
    }
    let mut d = Daemon::new("");
    let state = d.kilnd.dir.path().join("state");
    let _mount = Mount::tmpfs(&state, "64m");
    d.spawn();

    let (layout, _) = kiln_testkit::oci::two_layers();
    let filler = fill(&state);
    let (name, error) = d
        .call(
            "io.kiln.Manager.ImportImage",
            json!({ "path": layout.path(), "reference": "kiln.test/full:v1" }),
        )
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.StorageFailed", "{error}");
    let images = state.join("images");
    let stored: Vec<String> = files_under(&images)
        .into_iter()
        .filter(|f| f.starts_with("tmp/") || f.ends_with(".erofs") || f.ends_with(".json"))
        .collect();
    assert_eq!(stored, Vec::<String>::new(), "nothing half-stored");
    std::fs::remove_file(&filler).unwrap();

    // 64 MiB cannot hold a 128 MiB guest's RAM: refused before QEMU runs.
    d.ok(
        "CreatePool",
        json!({ "name": "tpl", "spec": { "mode": "template", "warm": 1, "max": 1,
            "vm": { "memoryMiB": 128 } } }),
    );
    let pool = wait_until(Duration::from_secs(60), "the template refused", || {
        let pool = d.ok("DescribePool", json!({ "name": "tpl" }))["pool"].clone();
        let error = pool["lastError"].as_str().unwrap_or_default().to_owned();
        error
            .contains("RAM needs")
            .then_some(pool.clone())
            .ok_or(pool.to_string())
    });
    assert!(
        pool["lastError"].as_str().unwrap().contains("MiB are free"),
        "{pool}"
    );
    let templates = files_under(&state.join("templates"));
    assert!(
        !templates.iter().any(|f| f.ends_with(".tmp")),
        "no unfinished template left: {templates:?}"
    );
    // The import fits now.
    d.ok(
        "ImportImage",
        json!({ "path": layout.path(), "reference": "kiln.test/full:v1" }),
    );

    // Room again: the pool builds its template and fills by itself.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=1g"])
        .arg(&state)
        .status()
        .unwrap()
        .success();
    assert!(grown, "grow the tmpfs");
    wait_until(Duration::from_secs(300), "the template pool filled", || {
        let pool = d.ok("DescribePool", json!({ "name": "tpl" }))["pool"].clone();
        (pool["hot"] == 1).then_some(()).ok_or(pool.to_string())
    });
}
