//! GPUs through the real kilnd: inventory of a sysfs + /dev tree the test
//! builds (two render nodes made with mknod), leases that never leave a VM
//! half-started, and a real VM with the 2D virtio-gpu device whose guest
//! sees a DRM device. A real render node is used when the host has one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kiln_testkit::{wait_until, Daemon};
use serde_json::{json, Value};

fn gpu_daemon() -> Daemon {
    let mut d = Daemon::new("");
    d.kilnd.add_fake_gpus();
    d.spawn();
    d
}

fn gpus(d: &Daemon) -> Vec<Value> {
    d.ok("ListGPUs", json!({}))["gpus"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn inventory_and_leases_never_leave_a_vm_half_started() {
    let d = gpu_daemon();
    let list = gpus(&d);
    let names: Vec<&str> = list.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["renderD128", "renderD129"], "{list:?}");
    assert_eq!(list[0]["vendorId"], "0x10de");
    assert_eq!(list[0]["driver"], "nvidia");
    assert_eq!(list[0]["pciAddress"], "0000:01:00.0");
    assert_eq!(list[1]["dev"], "226:129");
    assert_eq!(list[0]["usable"], true);

    // No node of that vendor: refused before anything starts.
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "intel", "spec": { "gpus": { "count": 1, "vendor": "0x8086" } } }),
    )["vm"]
        .clone();
    assert_eq!(
        d.err("StartVM", json!({ "id": vm["id"] })),
        "io.kiln.Manager.NoGpuAvailable"
    );
    let after = d.ok("DescribeVM", json!({ "id": vm["id"] }))["vm"].clone();
    assert_eq!(after["state"], "created", "not half-started: {after}");
    assert!(after.get("pid").is_none());

    // Bad requests are refused when the VM is defined.
    for spec in [
        json!({ "gpus": { "count": 2 } }),
        json!({ "gpus": { "count": 0 } }),
        json!({ "gpus": { "count": 1, "bogus": 1 } }),
    ] {
        let name = d.err("CreateVM", json!({ "name": "bad", "spec": spec.clone() }));
        assert!(
            name.ends_with("InvalidSpec") || name.ends_with("InvalidParameter"),
            "{spec}: {name}"
        );
    }

    // A fake node cannot render: QEMU refuses it, the start fails with a
    // named error, and the lease is given back.
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "nv", "spec": { "gpus": { "count": 1, "node": "renderD128" }, "memoryMiB": 256 } }),
    )["vm"]
        .clone();
    let err = d.err("StartVM", json!({ "id": vm["id"] }));
    assert!(
        err.ends_with("BootFailed") || err.ends_with("LaunchFailed"),
        "{err}"
    );
    wait_until(Duration::from_secs(30), "the lease given back", || {
        let list = gpus(&d);
        if list
            .iter()
            .all(|g| g["vmIds"].as_array().unwrap().is_empty())
        {
            Ok(())
        } else {
            Err(format!("lease kept: {list:?}"))
        }
    });
    let leases = std::fs::read_to_string(d.kilnd.dir.path().join("state/gpu-leases.json")).unwrap();
    assert!(!leases.contains("renderD128"), "{leases}");
}

#[test]
fn a_virtio_gpu_vm_has_a_drm_device() {
    let d = Daemon::start();
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "desk", "spec": { "display": "virtio-gpu", "memoryMiB": 256 } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap();
    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["display"], "virtio-gpu");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("-machine q35"), "{cmdline}");
    assert!(cmdline.contains("virtio-gpu-pci"), "{cmdline}");
    let out = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", "ls /sys/class/drm; cat /sys/class/drm/card0/device/vendor"] }),
    );
    assert_eq!(out["exitCode"], 0, "{out}");
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.contains("card0"), "{stdout}");
    assert!(stdout.contains("0x1af4"), "a virtio device: {stdout}");
}

#[test]
fn a_real_render_node_when_the_host_has_one() {
    let nodes: Vec<_> = std::fs::read_dir("/dev/dri")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("renderD"))
                .collect()
        })
        .unwrap_or_default();
    if nodes.is_empty() {
        println!(
            "SKIPPED: no /dev/dri/renderD* on this host (no DRM devices), so no virgl VM here"
        );
        return;
    }
    let d = Daemon::start();
    assert!(!gpus(&d).is_empty());
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "virgl", "spec": { "gpus": 1, "memoryMiB": 512 } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap();
    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["gpus"].as_array().unwrap().len(), 1, "{vm}");
    let out = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", "ls /sys/class/drm && cat /sys/kernel/debug/dri/0/virtio-gpu-features 2>/dev/null || true"] }),
    );
    assert!(
        out["stdout"].as_str().unwrap().contains("renderD128"),
        "{out}"
    );
}
