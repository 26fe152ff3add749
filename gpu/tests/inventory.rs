//! Inventory and change detection against a fabricated sysfs + /dev tree
//! with real character device nodes (mknod).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::time::{Duration, Instant};

use kiln_gpu::{DevNum, GpuWatcher, Inventory, NodeFact, NodeProblem, PciId};
use kiln_testkit::{require_root, FakeGpu, FakeHost};

/// Why these tests need root.
const NEEDS_ROOT: &str = "mknod";

#[test]
fn two_gpus_with_every_fact() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    host.add(&FakeGpu::amd(129, "0000:41:00.0"));
    host.add(&FakeGpu::nvidia(128, "0000:03:00.0"));
    // Entries that are not render nodes are ignored.
    fs::create_dir(host.sysfs().join("class/drm/card0")).unwrap();
    fs::write(host.sysfs().join("class/drm/version"), "drm 1.1.0\n").unwrap();

    let inv = Inventory::scan(&host.sysfs(), &host.dev()).expect("scan");
    assert_eq!(inv.len(), 2, "{inv:#?}");
    let n = &inv.nodes[0];
    assert_eq!(n.name, "renderD128");
    assert_eq!(n.path, host.node_path(128));
    assert_eq!(
        n.dev,
        Some(DevNum {
            major: 226,
            minor: 128
        })
    );
    assert_eq!(n.vendor_id, Some(PciId(0x10de)));
    assert_eq!(n.device_id, Some(PciId(0x2204)));
    assert_eq!(n.driver.as_deref(), Some("nvidia"));
    assert_eq!(n.bus.as_deref(), Some("pci"));
    assert_eq!(n.pci_address.as_deref(), Some("0000:03:00.0"));
    assert_eq!(n.numa_node, Some(0));
    assert!(n.usable);
    assert!(n.problems.is_empty(), "{:?}", n.problems);
    let a = &inv.nodes[1];
    assert_eq!(a.name, "renderD129");
    assert_eq!(a.vendor_id, Some(PciId(0x1002)));
    assert_eq!(a.driver.as_deref(), Some("amdgpu"));
    assert_eq!(a.pci_address.as_deref(), Some("0000:41:00.0"));
    assert_eq!(a.numa_node, None, "-1 means no NUMA affinity");
    assert!(a.usable && a.problems.is_empty(), "{a:?}");

    // The API shape (ListGPUs): camelCase, ids as hex strings.
    let json = serde_json::to_value(n).unwrap();
    assert_eq!(json["vendorId"], "0x10de");
    assert_eq!(json["pciAddress"], "0000:03:00.0");
    assert_eq!(json["dev"], "226:128");
    assert!(json.get("problems").is_none());
}

#[test]
fn missing_facts_are_named_and_the_node_is_still_listed() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    // No vendor, no driver, no NUMA file.
    host.add(&FakeGpu {
        index: 128,
        pci: "0000:03:00.0",
        vendor: None,
        device: Some("0x2204"),
        driver: None,
        numa: None,
    });
    let inv = Inventory::scan(&host.sysfs(), &host.dev()).expect("scan");
    let n = &inv.nodes[0];
    assert!(n.usable, "missing descriptive facts do not stop leasing");
    assert_eq!(n.vendor_id, None);
    assert_eq!(n.device_id, Some(PciId(0x2204)));
    let facts: Vec<NodeFact> = n
        .problems
        .iter()
        .map(|p| match p {
            NodeProblem::Unreadable { fact, .. } => *fact,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        facts,
        [NodeFact::Vendor, NodeFact::Driver, NodeFact::NumaNode]
    );
    assert!(n.problems[0]
        .to_string()
        .starts_with("vendor id unknown: cannot read"));
}

#[test]
fn malformed_sysfs_files_are_named() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    host.add(&FakeGpu {
        vendor: Some("nvidia"),
        numa: Some("zero"),
        ..FakeGpu::nvidia(128, "0000:03:00.0")
    });
    let dev_file = host
        .sysfs()
        .join("devices/pci0000:00/0000:03:00.0/drm/renderD128/dev");
    fs::write(&dev_file, "garbage\n").unwrap();
    let n = Inventory::scan(&host.sysfs(), &host.dev())
        .expect("scan")
        .nodes[0]
        .clone();
    assert!(
        !n.usable,
        "without a device number the node cannot be checked"
    );
    assert_eq!(n.dev, None);
    let malformed: Vec<(NodeFact, String)> = n
        .problems
        .iter()
        .filter_map(|p| match p {
            NodeProblem::Malformed { fact, value, .. } => Some((*fact, value.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        malformed,
        [
            (NodeFact::Dev, "garbage".to_string()),
            (NodeFact::Vendor, "nvidia".to_string()),
            (NodeFact::NumaNode, "zero".to_string())
        ]
    );
}

#[test]
fn device_node_missing_wrong_type_or_wrong_number() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    host.add_sysfs(&FakeGpu::nvidia(128, "0000:03:00.0"));
    host.add_sysfs(&FakeGpu::nvidia(129, "0000:04:00.0"));
    host.add_sysfs(&FakeGpu::nvidia(130, "0000:05:00.0"));
    // 128: no node. 129: a regular file. 130: a node with another number.
    fs::write(host.node_path(129), "").unwrap();
    host.mknod(&host.node_path(130), 226, 131, 0o660);

    let inv = Inventory::scan(&host.sysfs(), &host.dev()).expect("scan");
    assert_eq!(inv.usable().count(), 0);
    assert!(matches!(
        inv.nodes[0].problems[..],
        [NodeProblem::NodeMissing { .. }]
    ));
    assert!(matches!(
        inv.nodes[1].problems[..],
        [NodeProblem::NotCharDevice { .. }]
    ));
    match &inv.nodes[2].problems[..] {
        [NodeProblem::DevMismatch {
            expected, found, ..
        }] => {
            assert_eq!(expected.to_string(), "226:130");
            assert_eq!(found.to_string(), "226:131");
        }
        other => panic!("{other:?}"),
    }
    // Everything else is still known.
    assert_eq!(inv.nodes[2].pci_address.as_deref(), Some("0000:05:00.0"));
}

#[test]
fn a_host_without_drm_has_no_gpus() {
    let host = FakeHost::bare();
    let inv = Inventory::scan(&host.sysfs(), &host.dev()).expect("scan");
    assert!(inv.is_empty());
    // And the machine running the tests, whatever it has, scans cleanly.
    let real = Inventory::scan("/sys".as_ref(), "/dev".as_ref()).expect("scan /sys");
    eprintln!("this host has {} render node(s): {real:?}", real.len());
}

/// Waits up to 5 s for the watcher to report a change.
fn expect_change(w: &mut GpuWatcher, what: &str) {
    let t = Instant::now();
    assert!(
        w.wait(Some(Duration::from_secs(5))).expect("wait"),
        "no change seen after {what}"
    );
    eprintln!("{what}: seen after {:?}", t.elapsed());
}

fn expect_quiet(w: &mut GpuWatcher, what: &str) {
    assert!(
        !w.wait(Some(Duration::from_millis(200))).expect("wait"),
        "spurious change after {what}"
    );
}

#[test]
fn watcher_sees_nodes_come_and_go() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    host.add(&FakeGpu::nvidia(128, "0000:03:00.0"));
    let mut w = GpuWatcher::new(&host.sysfs(), &host.dev()).expect("watcher");
    assert_eq!(w.watched().len(), 2);
    expect_quiet(&mut w, "start");

    host.add_node(129);
    expect_change(&mut w, "mknod /dev/dri/renderD129");
    host.add_sysfs(&FakeGpu::amd(129, "0000:41:00.0"));
    expect_change(&mut w, "class/drm/renderD129 link");
    assert_eq!(
        Inventory::scan(&host.sysfs(), &host.dev())
            .unwrap()
            .usable()
            .count(),
        2
    );
    expect_quiet(&mut w, "rescan");

    // Unrelated entries do not wake the engine.
    host.mknod(&host.dev().join("dri/card1"), 226, 1, 0o660);
    fs::create_dir(host.sysfs().join("class/drm/card1")).unwrap();
    expect_quiet(&mut w, "card1");

    // An access change (what udev, logind or grant do) is a change.
    kiln_gpu::grant(&host.node_path(128), 4242).expect("grant");
    expect_change(&mut w, "ACL edit on renderD128");

    host.remove(129);
    expect_change(&mut w, "removal of renderD129");
    assert_eq!(
        Inventory::scan(&host.sysfs(), &host.dev()).unwrap().len(),
        1
    );
}

#[test]
fn watcher_picks_up_directories_created_later() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    // The first GPU driver loading creates /dev/dri and class/drm.
    let host = FakeHost::bare();
    let mut w = GpuWatcher::new(&host.sysfs(), &host.dev()).expect("watcher");
    assert!(w.watched().is_empty());
    fs::create_dir(host.dev().join("dri")).unwrap();
    expect_change(&mut w, "mkdir /dev/dri");
    assert_eq!(w.watched(), [host.dev().join("dri")]);
    host.add_node(128);
    expect_change(&mut w, "first node in the new /dev/dri");
    fs::remove_file(host.node_path(128)).unwrap();
    fs::remove_dir(host.dev().join("dri")).unwrap();
    expect_change(&mut w, "rmdir /dev/dri");
    fs::create_dir(host.dev().join("dri")).unwrap();
    expect_change(&mut w, "mkdir /dev/dri again");
    host.add_node(129);
    expect_change(&mut w, "node in the re-created /dev/dri");
}

#[test]
fn watcher_works_from_tokio() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    let mut w = GpuWatcher::new(&host.sysfs(), &host.dev()).expect("watcher");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let early = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
        assert!(early.is_err(), "no change yet");
        let node = host.node_path(128);
        let maker = tokio::task::spawn_blocking({
            let host_dev = host.dev();
            move || {
                // Pacing, not a wait for a condition: the node must appear
                // while `changed()` is pending, which is what is tested.
                std::thread::sleep(Duration::from_millis(50));
                common_mknod(&host_dev.join("dri/renderD128"));
            }
        });
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("change within 5 s")
            .expect("changed");
        maker.await.unwrap();
        assert!(node.exists());
    });
    // Outside a runtime it is an error, not a panic.
    let mut w2 = GpuWatcher::new(&host.sysfs(), &host.dev()).expect("watcher");
    let fut = w2.changed();
    let err = futures_lite_block_on(fut).expect_err("no runtime");
    assert!(matches!(err, kiln_gpu::WatchError::Register(_)), "{err:?}");
}

fn common_mknod(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o660, libc::makedev(226, 128)) };
    assert_eq!(rc, 0);
}

/// Polls a future once on this thread without any runtime.
fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("future did not finish on first poll"),
    }
}
