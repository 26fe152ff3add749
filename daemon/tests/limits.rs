//! Resource limits on real QEMU: a VM's QEMU in its own cgroup with the
//! memory cap, CPU quota and weight its spec asks for (read back from the
//! cgroup files), its usage in `DescribeVM` and D-Bus `Usage`, and a guest
//! that fills its RAM past the cap: its QEMU is OOM-killed, the VM is
//! `failed` with the reason, watchers get an `oom` event, kilnd serves on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use kiln_testkit::busctl::{DbusKilnd, VM_IF};
use kiln_testkit::{wait_until, VarlinkStream, TEST_CGROUP_PARENT};
use serde_json::json;

/// The memory directory of VM `id`'s cgroup, v2 or v1; `None` when this
/// host has no memory controller (the test then says so and stops).
fn memory_cgroup(id: &str) -> Option<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        return Some(root.join(TEST_CGROUP_PARENT).join(id));
    }
    let v1 = root.join("memory");
    v1.join("tasks")
        .exists()
        .then(|| v1.join(TEST_CGROUP_PARENT).join(id))
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn limits_are_enforced_and_usage_is_reported() {
    let k = DbusKilnd::start(false);
    let id = k.varlinkctl(
        "CreateVM",
        json!({ "name": "capped", "spec": { "memoryMiB": 512,
            "limits": { "memoryMiB": 320, "milliCpus": 500, "cpuWeight": 50 } } }),
    )["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = k.varlinkctl("StartVM", json!({ "id": id }))["vm"]["pid"]
        .as_u64()
        .unwrap();
    let Some(memory) = memory_cgroup(&id) else {
        eprintln!("SKIP: no memory cgroup controller on this host");
        return;
    };
    let v2 = memory.starts_with(PathBuf::from("/sys/fs/cgroup").join(TEST_CGROUP_PARENT));
    if v2 {
        assert_eq!(read(memory.join("memory.max")), (320u64 << 20).to_string());
        assert_eq!(read(memory.join("cpu.max")), "50000 100000");
        assert_eq!(read(memory.join("cpu.weight")), "50");
    } else {
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            (320u64 << 20).to_string()
        );
        let cpu = PathBuf::from("/sys/fs/cgroup/cpu")
            .join(TEST_CGROUP_PARENT)
            .join(&id);
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join("cpu.shares")), "512");
    }
    assert!(
        read(memory.join("cgroup.procs"))
            .lines()
            .any(|p| p == pid.to_string()),
        "QEMU {pid} is not in its cgroup"
    );

    // Usage: over varlink in DescribeVM, over D-Bus from Usage.
    k.varlinkctl(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=50"] }),
    );
    let usage = k.varlinkctl("DescribeVM", json!({ "id": id }))["vm"]["usage"].clone();
    assert!(usage["cpuUsec"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["rssBytes"].as_u64().unwrap() > 10 << 20, "{usage}");
    assert!(usage["pssBytes"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["memoryBytes"].as_u64().unwrap() > 10 << 20, "{usage}");
    assert_eq!(usage["memoryLimitBytes"], 320u64 << 20);
    assert_eq!(usage["oomKills"], 0);
    let path = format!("/io/kiln/Kiln1/vm/{id}");
    let dbus = k.call(&path, VM_IF, "Usage", &[]);
    assert_eq!(dbus[2], 320u64 << 20, "{dbus}");
    // Not in ListVMs: usage is read when asked for one VM.
    let listed = k.varlinkctl("ListVMs", json!({}))["vms"][0].clone();
    assert!(listed.get("usage").is_none(), "{listed}");

    // The cap (320 MiB) is below the guest's RAM (512 MiB): an overcommit.
    // The guest fills a tmpfs past what QEMU may use: the OOM killer ends
    // QEMU at the cap; the VM is failed with the reason and watchers hear
    // of it.
    let watch = VarlinkStream::start(&k.kilnd.varlink_address(), "io.kiln.Manager.Watch", "{}");
    watch
        .next(Duration::from_secs(10))
        .expect("the watch is ready");
    let _ = k.varlink(
        "ExecVM",
        json!({ "id": id, "timeoutSec": 120, "command": ["sh", "-c",
            "mkdir -p /fill && mount -t tmpfs -o size=400m tmpfs /fill && dd if=/dev/zero of=/fill/x bs=1M count=380"] }),
    );
    wait_until(Duration::from_secs(120), "the VM failed", || {
        let vm = k.varlinkctl("DescribeVM", json!({ "id": id }))["vm"].clone();
        if vm["state"] == "failed" {
            Ok(vm)
        } else {
            Err(vm["state"].clone())
        }
    });
    let vm = k.varlinkctl("DescribeVM", json!({ "id": id }))["vm"].clone();
    let error = vm["lastError"].as_str().unwrap();
    assert!(
        error.contains("OOM killer") && error.contains("320 MiB"),
        "{error}"
    );
    let mut saw_oom = false;
    while let Some(event) = watch.next(Duration::from_secs(5)) {
        if event["event"]["type"] == "oom" {
            assert_eq!(event["event"]["id"], id.as_str());
            assert_eq!(event["event"]["memoryLimitBytes"], 320u64 << 20);
            saw_oom = true;
            break;
        }
    }
    assert!(saw_oom, "no oom event");
    // The cgroup went with the process; kilnd serves on.
    assert!(!memory.exists(), "{} is left", memory.display());
    k.varlinkctl("GetStatus", json!({}));
    // Bad limits are refused with their name.
    let refused = k
        .varlink(
            "CreateVM",
            json!({ "name": "bad", "spec": { "memoryMiB": 256, "limits": { "memoryMiB": 100 } } }),
        )
        .unwrap_err();
    assert_eq!(refused.0, "io.kiln.Manager.InvalidSpec");
}
