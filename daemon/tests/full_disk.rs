//! A full disk and broken state under the real kilnd. The state directory
//! is a small tmpfs that the test fills: every write kilnd must make fails
//! with a named `StorageFailed`, nothing is half-written or lost, and kilnd
//! carries on by itself once there is room again. A read-only runtime
//! directory, a missing QEMU binary and a damaged template get named
//! errors and back-off, never a busy loop, and kilnd recovers from what
//! can be recovered from.
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
        Self::tmpfs_with(at, &format!("size={size},mode=0700"))
    }

    fn tmpfs_with(at: &Path, options: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Self(at.to_owned())
    }

    /// Make it read-only (`false`) or writable again.
    fn set_writable(&self, writable: bool) {
        let options = if writable { "remount,rw" } else { "remount,ro" };
        let ok = Command::new("mount")
            .args(["-o", options])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -o {options} {}", self.0.display());
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

/// kilnd's CPU time so far, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A QEMU binary that is not there: `BootFailed` naming it for a VM, and a
/// pool that backs off to `failed` instead of retrying in a loop.
#[test]
fn a_missing_qemu_binary_fails_boots_by_name_and_backs_off() {
    let mut d = Daemon::new("qemu_binary = \"/nonexistent/qemu-system-x86_64\"\n");
    d.pool_file(
        "p",
        "mode = \"template\"\nwarm = 2\nmax = 4\n[vm]\nmemoryMiB = 128\n",
    );
    d.spawn();
    let id = d.ok("CreateVM", json!({ "name": "a" }))["vm"]["id"].clone();
    let (name, error) = d
        .call("io.kiln.Manager.StartVM", json!({ "id": id }))
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.BootFailed", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/nonexistent/qemu-system-x86_64"),
        "{error}"
    );
    let vm = d.ok("DescribeVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "failed", "{vm}");
    // The pool's template cannot be built: it backs off to `failed`, and
    // a caller waiting on it gets the error instead of a hang.
    wait_until(Duration::from_secs(60), "the pool failing", || {
        let pool = d.ok("DescribePool", json!({ "name": "p" }))["pool"].clone();
        (pool["state"] == "failed")
            .then_some(())
            .ok_or(pool.to_string())
    });
    let (name, _) = d
        .call(
            "io.kiln.Manager.Acquire",
            json!({ "pool": "p", "timeoutMs": 1000 }),
        )
        .unwrap_err();
    assert!(
        ["io.kiln.Manager.BootFailed", "io.kiln.Manager.Timeout"].contains(&name.as_str()),
        "{name}"
    );
    // No busy loop: over 5 s, at most one more attempt (the back-off is
    // 16 s by now) and a few ticks of CPU.
    let pid = d.kilnd.pid().unwrap();
    let failed_before = d.ok("DescribePool", json!({ "name": "p" }))["pool"]["failed"]
        .as_u64()
        .unwrap();
    let ticks_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let failed_after = d.ok("DescribePool", json!({ "name": "p" }))["pool"]["failed"]
        .as_u64()
        .unwrap();
    let ticks = cpu_ticks(pid) - ticks_before;
    println!("missing QEMU: {failed_before} → {failed_after} failed builds and {ticks} ticks of kilnd CPU in 5 s");
    assert!(
        failed_after <= failed_before + 1,
        "{failed_before} → {failed_after}"
    );
    assert!(ticks < 100, "{ticks} ticks of CPU in 5 s: a busy loop");
}

/// A runtime directory kilnd cannot write: it does not start (saying which
/// directory), and one that turns read-only under it fails boots by name
/// until it is writable again.
#[test]
fn an_unwritable_runtime_dir_fails_by_name_and_kilnd_recovers() {
    if !require_root("a read-only tmpfs for the runtime directory") {
        return;
    }
    let mut d = Daemon::new("");
    let run = d.kilnd.dir.path().join("run");
    // Searchable by the VMs' own uids, as the real runtime dir is.
    let mount = Mount::tmpfs_with(&run, "size=16m,mode=0711");
    mount.set_writable(false);
    let out = Command::new(kiln_testkit::kilnd_exe())
        .arg("--config")
        .arg(d.kilnd.dir.path().join("kilnd.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kilnd started on a read-only runtime dir"
    );
    assert!(
        stderr.contains(&run.display().to_string()) && stderr.contains("Read-only"),
        "{stderr}"
    );

    mount.set_writable(true);
    d.spawn();
    let id = d.ok("CreateVM", json!({ "name": "a" }))["vm"]["id"].clone();
    mount.set_writable(false);
    let (name, error) = d
        .call("io.kiln.Manager.StartVM", json!({ "id": id }))
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.BootFailed", "{error}");
    assert!(error.to_string().contains("Read-only"), "{error}");
    mount.set_writable(true);
    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "ready", "{vm}");
}

/// A template damaged on disk while kilnd was down (its device state
/// overwritten): its clones fail, kilnd takes it for broken after three
/// failures in a row, builds it again, and the waiting `Acquire` gets a
/// clone of the new one.
#[test]
fn a_damaged_template_is_built_again() {
    let mut d = Daemon::new("");
    d.pool_file(
        "p",
        "mode = \"template\"\nwarm = 1\nmax = 2\n[vm]\nmemoryMiB = 128\n",
    );
    d.spawn();
    wait_until(Duration::from_secs(240), "a hot clone", || {
        let pool = d.ok("DescribePool", json!({ "name": "p" }))["pool"].clone();
        (pool["hot"] == 1).then_some(()).ok_or(pool.to_string())
    });
    d.sigkill();
    kiln_testkit::kill_qemus_under(d.kilnd.dir.path());
    let templates = d.kilnd.dir.path().join("state/templates/p");
    let template = std::fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("the pool's template on disk");
    let state = template.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    for (i, b) in bytes.iter_mut().take(4096).enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    std::fs::write(&state, bytes).unwrap();

    d.spawn();
    let vm = d.ok("Acquire", json!({ "pool": "p", "timeoutMs": 240_000 }))["vm"].clone();
    assert_eq!(vm["state"], "leased", "{vm}");
    let out = d.ok(
        "ExecVM",
        json!({ "id": vm["id"], "command": ["echo", "cloned"] }),
    );
    assert_eq!(out["stdout"], "cloned\n");
    let log = d.log();
    assert!(log.contains("clones of the template keep failing"), "{log}");
    assert!(log.contains("template saved"), "{log}");
}
