//! QEMU without privilege (issue 16, item 1), against the real kilnd and
//! QEMU: every VM's QEMU runs under a uid of its own from the configured
//! range, with no capabilities, no new privileges and QEMU's seccomp
//! sandbox; a clone may read its template's RAM file but not write it; one
//! VM's uid cannot see another's files; a re-adopted QEMU keeps its uid;
//! a deleted VM's uid is free again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Command;

use kiln_testkit::Daemon;
use serde_json::{json, Value};

/// A small range, so the test also sees allocation order.
const BASE: u32 = 0x7C00_0000;
const CONFIG: &str = "qemu_uid_base = 2080374784\nqemu_uid_count = 16\n";

/// `Name:\tvalue` fields of `/proc/PID/status`.
fn status(pid: u64) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The uid a VM's QEMU runs under, after checking it is unprivileged.
fn unprivileged_uid(vm: &Value) -> u32 {
    let pid = vm["pid"].as_u64().unwrap();
    let s = status(pid);
    let uids: Vec<u32> = s["Uid"]
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    let uid = uids[0];
    assert!(
        uids.iter().all(|u| *u == uid),
        "real, effective, saved and fs uid differ: {uids:?}"
    );
    assert!(
        (BASE + 1..BASE + 16).contains(&uid),
        "uid {uid} not a VM uid of the range"
    );
    assert!(
        s["Gid"].split_whitespace().all(|g| g == uid.to_string()),
        "{:?}",
        s["Gid"]
    );
    assert!(
        s["Groups"]
            .split_whitespace()
            .any(|g| g == BASE.to_string()),
        "not in the shared read-only group: {:?}",
        s["Groups"]
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(s[caps], "0000000000000000", "{caps} of {pid}");
    }
    assert_eq!(s["NoNewPrivs"], "1");
    assert_eq!(s["Seccomp"], "2", "QEMU's -sandbox filter");
    uid
}

/// `sh -c script` as `uid` with the shared group: its exit status.
fn as_uid(uid: u32, script: &str) -> bool {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            &format!("--groups={BASE}"),
            "--",
            "sh",
            "-c",
            script,
        ])
        .status()
        .unwrap()
        .success()
}

fn vm(d: &Daemon, id: &Value) -> Value {
    d.ok("DescribeVM", json!({ "id": id }))["vm"].clone()
}

/// Start kilnd with the unit's `UMask=0077`, so that whatever it makes for
/// a QEMU must be opened up on purpose, as under systemd.
fn spawn_like_the_unit(d: &mut Daemon) {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(kiln_testkit::kilnd_exe());
    // SAFETY: umask(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    d.spawn_with(command);
}

#[test]
fn every_qemu_runs_under_its_own_unprivileged_uid() {
    let mut d = Daemon::new(CONFIG);
    spawn_like_the_unit(&mut d);
    let dir = d.kilnd.dir.path().to_owned();

    // A cold VM and two clones of a template pool.
    let cold = d.ok("CreateVM", json!({ "name": "cold" }))["vm"]["id"].clone();
    let cold = d.ok("StartVM", json!({ "id": cold }))["vm"].clone();
    d.ok(
        "CreatePool",
        json!({ "name": "p", "spec": { "mode": "template", "warm": 2, "max": 3 } }),
    );
    let clones: Vec<Value> = (0..2)
        .map(|_| d.ok("Acquire", json!({ "pool": "p", "timeoutMs": 240_000 }))["vm"].clone())
        .collect();
    let uids: Vec<u32> = [&cold, &clones[0], &clones[1]]
        .iter()
        .map(|v| unprivileged_uid(v))
        .collect();
    let mut distinct = uids.clone();
    distinct.dedup();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three VMs, three uids: {uids:?}");
    // They boot the guest's kernel unpacked for direct (PVH) boot, which
    // kilnd made under its state directory and shared with them.
    let unpacked = dir.join("state/guest-kernels");
    for vm in [&cold, &clones[0]] {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("-kernel {}/vmlinux-", unpacked.display())),
            "{cmdline}"
        );
        // With the arguments that skip the boot work a Kiln guest does
        // not use (kiln_engine::guest_kernel::BOOT_ARGS).
        assert!(
            cmdline.contains(kiln_engine::guest_kernel::BOOT_ARGS),
            "{cmdline}"
        );
    }
    // A clone's anonymous memory is QEMU's own: no huge pages for it
    // (QemuLaunch::transparent_huge_pages); the cold VM's RAM keeps them.
    assert_eq!(status(cold["pid"].as_u64().unwrap())["THP_enabled"], "1");
    for clone in &clones {
        assert_eq!(status(clone["pid"].as_u64().unwrap())["THP_enabled"], "0");
    }
    println!(
        "QEMU uids: cold {}, clones {} and {}",
        uids[0], uids[1], uids[2]
    );

    // The clones' template: readable by them, writable by no QEMU.
    let template = std::fs::read_dir(dir.join("state/templates/p"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("memory").exists())
        .unwrap();
    let memory = template.join("memory");
    let clone_uid = uids[1];
    assert!(
        as_uid(
            clone_uid,
            &format!("head -c 4096 {} >/dev/null", memory.display())
        ),
        "a clone's uid cannot read its template's RAM"
    );
    assert!(
        !as_uid(clone_uid, &format!(": >> {}", memory.display())),
        "a clone's uid may write its template's RAM"
    );
    assert!(
        !as_uid(clone_uid, &format!("touch {}/x", template.display())),
        "a clone's uid may add files to its template"
    );
    // Its view of the filesystem: its own, not the host's.
    let pid = clones[0]["pid"].as_u64().unwrap();
    let view = format!("/proc/{pid}/root");
    let mut top: Vec<String> = std::fs::read_dir(&view)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    for absent in ["home", "root", "var", "srv", "opt", "boot"] {
        assert!(
            !top.contains(&absent.to_owned()),
            "/{absent} in QEMU's view: {top:?}"
        );
    }
    let etc: Vec<String> = std::fs::read_dir(format!("{view}/etc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(etc, ["ld.so.cache"], "/etc in QEMU's view");
    let dev: Vec<String> = std::fs::read_dir(format!("{view}/dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        dev.len() <= 6
            && !dev
                .iter()
                .any(|d| d.starts_with("sd") || d.starts_with("vd")),
        "{dev:?}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        mounts.contains("hidepid=invisible") || mounts.contains("hidepid=2"),
        "{mounts}"
    );
    println!("QEMU's view: / = {top:?}, /dev = {dev:?}");

    // One VM's files are not another's.
    let cold_run = dir.join("run/vms").join(cold["id"].as_str().unwrap());
    assert!(
        !as_uid(clone_uid, &format!("ls {}", cold_run.display())),
        "one VM's uid can list another's run directory"
    );
    assert!(as_uid(
        uids[0],
        &format!("ls {} >/dev/null", cold_run.display())
    ));
    // Nor the records.
    assert!(!as_uid(
        clone_uid,
        &format!("ls {}/state/vms", dir.display())
    ));

    // kilnd dies and comes back: the same QEMUs, the same uids, working.
    let pids: Vec<u64> = [&cold, &clones[0]]
        .iter()
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    d.sigkill();
    spawn_like_the_unit(&mut d);
    for (old, pid) in [&cold, &clones[0]].iter().zip(&pids) {
        let again = vm(&d, &old["id"]);
        assert_eq!(again["pid"].as_u64(), Some(*pid), "re-adopted: {again}");
        assert_eq!(unprivileged_uid(&again), unprivileged_uid(old));
        let r = d.ok(
            "ExecVM",
            json!({ "id": old["id"], "command": ["echo", "ok"] }),
        );
        assert_eq!(r["stdout"], "ok\n");
    }

    // A deleted VM's uid is given again: the lowest free one. The cold VM
    // started first, so it had the range's first VM uid.
    assert_eq!(uids[0], BASE + 1);
    d.ok("DeleteVM", json!({ "id": cold["id"] }));
    let next = d.ok("CreateVM", json!({ "name": "next" }))["vm"]["id"].clone();
    let next = d.ok("StartVM", json!({ "id": next }))["vm"].clone();
    assert_eq!(unprivileged_uid(&next), BASE + 1);
}

/// A caller's `kernel` and `initrd` are used as they are: kilnd never
/// re-owns a file a request names, even one under its own state directory
/// (it shares with the QEMUs only boot files it made itself: before, a
/// request could make it chown and chmod any such file), and a path with
/// `..` is refused before anything looks at it.
#[test]
fn a_callers_kernel_and_initrd_are_never_re_owned() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut d = Daemon::new(CONFIG);
    spawn_like_the_unit(&mut d);
    let mine = d.kilnd.dir.path().join("state/mine");
    std::fs::create_dir_all(&mine).unwrap();
    let (kernel, initrd) = (mine.join("vmlinuz"), mine.join("initramfs"));
    std::fs::copy(kiln_testkit::guest_dir().join("vmlinuz"), &kernel).unwrap();
    std::fs::copy(kiln_testkit::guest_dir().join("initramfs"), &initrd).unwrap();
    for file in [&kernel, &initrd] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let before = |f: &std::path::Path| {
        let m = std::fs::metadata(f).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    let (k0, i0) = (before(&kernel), before(&initrd));
    let climbing = format!("{}/../../../../../../../etc/hostname", mine.display());
    assert!(d
        .err(
            "CreateVM",
            json!({ "name": "climb", "spec": { "kernel": climbing } })
        )
        .ends_with("InvalidSpec"));
    let id = d.ok(
        "CreateVM",
        json!({ "name": "own", "spec": { "kernel": kernel, "initrd": initrd } }),
    )["vm"]["id"]
        .clone();
    // Whether this QEMU may read them is the caller's business (here it
    // may not: kilnd's state directory is closed to the QEMUs' uids, so
    // the boot fails); that kilnd did not open them up is what counts.
    let _ = d.call("io.kiln.Manager.StartVM", json!({ "id": id }));
    assert_eq!((before(&kernel), before(&initrd)), (k0, i0));
}
