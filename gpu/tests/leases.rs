//! Leasing against a scanned fabricated host: exclusive and shared modes,
//! exhaustion, release, persistence, and reconcile after a real `kill -9`
//! of a process that held leases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_gpu::{DropReason, GpuError, GpuRequest, Inventory, LeaseMode, LeaseTable, PciId};
use kiln_testkit::{require_root, wait_until, FakeGpu, FakeHost};

/// Why these tests need root.
const NEEDS_ROOT: &str = "mknod";

fn two_gpu_host() -> FakeHost {
    let host = FakeHost::new();
    host.add(&FakeGpu::nvidia(128, "0000:03:00.0"));
    host.add(&FakeGpu::amd(129, "0000:41:00.0"));
    host
}

fn scan(host: &FakeHost) -> Inventory {
    Inventory::scan(&host.sysfs(), &host.dev()).expect("scan")
}

fn shared() -> GpuRequest {
    GpuRequest {
        mode: LeaseMode::Shared,
        ..GpuRequest::count(1)
    }
}

#[test]
fn exclusive_leasing_exhaustion_and_release() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = two_gpu_host();
    let inv = scan(&host);
    let mut t = LeaseTable::default();

    let a = t.acquire("vm-a", &GpuRequest::count(1), &inv).expect("a");
    assert_eq!(a[0].node, "renderD128");
    assert_eq!(a[0].path, host.node_path(128));
    assert_eq!(a[0].pci_address.as_deref(), Some("0000:03:00.0"));
    let b = t.acquire("vm-b", &GpuRequest::count(1), &inv).expect("b");
    assert_eq!(b[0].node, "renderD129");

    let err = t
        .acquire("vm-c", &GpuRequest::count(1), &inv)
        .expect_err("exhausted");
    assert!(
        matches!(
            err,
            GpuError::NoGpuAvailable {
                requested: 1,
                matching: 2,
                available: 0,
                usable: 2,
                mode: LeaseMode::Exclusive
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "no GPU available: 1 exclusive render node(s) wanted, 0 free of 2 matching (2 usable on this host)"
    );

    assert_eq!(t.release("vm-a").len(), 1);
    let c = t
        .acquire("vm-c", &GpuRequest::count(1), &inv)
        .expect("freed");
    assert_eq!(c[0].node, "renderD128");

    // Two at once: all or nothing.
    t.release("vm-b");
    t.release("vm-c");
    let both = t
        .acquire("vm-d", &GpuRequest::count(2), &inv)
        .expect("both");
    assert_eq!(both.len(), 2);
    assert!(t.acquire("vm-e", &GpuRequest::count(1), &inv).is_err());
    t.check().unwrap();
}

#[test]
fn shared_leasing_and_vendor_filter() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = two_gpu_host();
    let inv = scan(&host);
    let mut t = LeaseTable::new(2);
    let nvidia_shared = GpuRequest {
        vendor: Some(PciId(0x10de)),
        ..shared()
    };
    assert_eq!(
        t.acquire("a", &nvidia_shared, &inv).unwrap()[0].node,
        "renderD128"
    );
    assert_eq!(
        t.acquire("b", &nvidia_shared, &inv).unwrap()[0].node,
        "renderD128"
    );
    let err = t
        .acquire("c", &nvidia_shared, &inv)
        .expect_err("two per GPU");
    assert!(
        matches!(
            err,
            GpuError::NoGpuAvailable {
                matching: 1,
                available: 0,
                ..
            }
        ),
        "{err:?}"
    );
    // Any vendor: the AMD node still has room.
    assert_eq!(
        t.acquire("c", &shared(), &inv).unwrap()[0].node,
        "renderD129"
    );
    // An exclusive request finds no free node.
    assert!(t.acquire("d", &GpuRequest::count(1), &inv).is_err());
    let usage = t.usage(&inv);
    assert_eq!(usage[0].vm_ids, ["a", "b"]);
    assert_eq!(usage[0].mode, Some(LeaseMode::Shared));
    assert_eq!(usage[1].free_slots, 1);
    t.check().unwrap();
}

#[test]
fn persistence_round_trip() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = two_gpu_host();
    let inv = scan(&host);
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("gpu-leases.json");
    assert!(LeaseTable::load(&path).unwrap().is_none(), "no file yet");

    let mut t = LeaseTable::new(3);
    t.acquire("a", &shared(), &inv).unwrap();
    t.acquire("b", &GpuRequest::count(1), &inv).unwrap();
    t.save(&path).unwrap();
    let back = LeaseTable::load(&path).unwrap().expect("saved");
    assert_eq!(back, t);
    assert_eq!(back.max_vms_per_gpu(), 3);
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["gpu-leases.json"]);

    // A file that breaks the rules is refused, not half-used.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["leases"][1]["node"] = json["leases"][0]["node"].clone();
    json["leases"][1]["mode"] = "exclusive".into();
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(matches!(
        LeaseTable::load(&path),
        Err(GpuError::Inconsistent { .. })
    ));
    std::fs::write(&path, b"{\"version\": 1, ").unwrap();
    assert!(matches!(
        LeaseTable::load(&path),
        Err(GpuError::Parse { .. })
    ));
}

/// The child half of `reconcile_after_kill_9`: lease, persist, report, hang.
fn child_main(sysfs: &Path, dev: &Path, table: &Path) {
    let inv = Inventory::scan(sysfs, dev).expect("scan");
    let mut t = LeaseTable::default();
    t.acquire("vm-dead", &GpuRequest::count(1), &inv)
        .expect("lease");
    t.acquire("vm-live", &GpuRequest::count(1), &inv)
        .expect("lease");
    t.save(table).expect("save");
    println!("leased");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn reconcile_after_kill_9() {
    if let Ok(dirs) = std::env::var("KILN_GPU_TEST_CHILD") {
        let parts: Vec<&str> = dirs.split('\n').collect();
        child_main(parts[0].as_ref(), parts[1].as_ref(), parts[2].as_ref());
        return;
    }
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = two_gpu_host();
    let state = tempfile::tempdir().unwrap();
    let table_path = state.path().join("gpu-leases.json");

    // A process (this test binary again) takes leases, persists them and
    // is killed with SIGKILL: nothing of it runs after that.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "reconcile_after_kill_9",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "KILN_GPU_TEST_CHILD",
            format!(
                "{}\n{}\n{}",
                host.sysfs().display(),
                host.dev().display(),
                table_path.display()
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the child to save its table",
        || LeaseTable::load(&table_path).ok().flatten().is_some(),
    );
    // SAFETY: plain syscall on our own child.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    // The next kilnd: load, rescan, reconcile with the VMs still alive.
    // Meanwhile renderD129 was unplugged.
    let mut t = LeaseTable::load(&table_path)
        .unwrap()
        .expect("persisted before the kill");
    assert_eq!(t.leases().len(), 2);
    let inv_before = scan(&host);
    let dropped = t.reconcile(["vm-live"], &inv_before);
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].lease.vm_id, "vm-dead");
    assert_eq!(dropped[0].reason, DropReason::VmGone);
    assert_eq!(t.leases()[0].node, "renderD129");

    // Then renderD129 is unplugged, and renderD128 is replugged as the
    // same device.
    host.remove(129);
    host.remove(128);
    host.add(&FakeGpu::nvidia(128, "0000:03:00.0"));
    let inv_after = scan(&host);
    let dropped = t.reconcile(["vm-live"], &inv_after);
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].reason, DropReason::NodeGone);
    assert!(t.leases().is_empty());
    t.save(&table_path).unwrap();
    // The freed node can be leased again.
    let mut t = LeaseTable::load(&table_path).unwrap().unwrap();
    t.acquire("vm-new", &GpuRequest::count(1), &inv_after)
        .expect("lease after reconcile");
}
