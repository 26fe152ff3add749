//! A guest that misbehaves on purpose, against the real kilnd and QEMU:
//! its console log, which the guest alone decides the size of and which
//! lives in RAM (the runtime directory), stays bounded while the VM and
//! the API keep working; an agent that speaks garbage, oversize or
//! unfinished frames, drips, or floods replies to nothing fails its own VM
//! by name while kilnd's memory stays bounded and its other VMs and both
//! APIs keep serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_testkit::busctl::{self, DbusKilnd};
use kiln_testkit::{guest_dir, rss_kib, wait_until, Daemon};
use serde_json::{json, Value};

/// Run instead of the agent (`rdinit=/hostile`): finds the agent's port
/// and misbehaves on it as `kiln.hostile=` on the kernel command line says,
/// again after every reconnection of the host.
const HOSTILE_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
# The agent loads this one at boot (microvm's devices are virtio-mmio).
insmod /lib/modules/*/kernel/drivers/virtio/virtio_mmio.ko
# Ports are announced by QEMU after the driver is up: wait for ours.
while [ -z "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = io.kiln.agent.0 ] && port=/dev/${p##*/}
    done
    sleep 0.1
done
case=$(sed -n 's/.*kiln.hostile=\([a-z-]*\).*/\1/p' /proc/cmdline)
echo "hostile agent: $case on $port"
while :; do
    case "$case" in
    garbage) cat /dev/urandom ;;
    oversize) tr '\000' x < /dev/zero ;;
    unfinished) printf '{"parameters":{"agentVersion":"'; while :; do printf 'aaaaaaaa'; done ;;
    drip) while :; do printf '{'; sleep 1; done ;;
    wrong-replies) while :; do printf '{"parameters":{"nonce":7,"exitCode":0}}\000'; done ;;
    esac > "$port" 2>/dev/null
    sleep 0.1
done
"#;

/// The misbehaviours, one VM each, and what kilnd's error says of each:
/// bytes that are no JSON and a frame over the 8 MiB bound are protocol
/// errors at once; a frame that never ends, one byte a second and replies
/// to no request run each 2 s ping attempt out until the boot deadline.
const CASES: [(&str, &str); 5] = [
    ("garbage", "protocol error"),
    ("oversize", "message too long"),
    ("unfinished", "timed out"),
    ("drip", "timed out"),
    ("wrong-replies", "timed out"),
];

/// The suite's guest initramfs with a second cpio archive appended that
/// adds `/hostile` (the kernel unpacks concatenated archives in order).
fn hostile_initramfs(out: &Path) {
    let mut image = std::fs::read(guest_dir().join("initramfs")).unwrap();
    image.resize(image.len().div_ceil(512) * 512, 0);
    image.extend(newc_entry("hostile", 0o100_755, HOSTILE_INIT.as_bytes()));
    image.extend(newc_entry("TRAILER!!!", 0, b""));
    image.resize(image.len().div_ceil(512) * 512, 0);
    std::fs::write(out, image).unwrap();
}

/// One `newc` cpio entry (header, NUL-terminated name and data, each
/// padded to 4 bytes).
fn newc_entry(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
    let fields = [
        1,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    let mut entry = b"070701".to_vec();
    for field in fields {
        entry.extend(format!("{field:08x}").as_bytes());
    }
    entry.extend(name.as_bytes());
    entry.push(0);
    entry.resize(entry.len().div_ceil(4) * 4, 0);
    entry.extend(data);
    entry.resize(entry.len().div_ceil(4) * 4, 0);
    entry
}

#[test]
fn hostile_agents_fail_their_own_vm_by_name_and_harm_nothing_else() {
    // Six VMs boot at once here, next to other tests on 2 cores under TCG:
    // the deadline must leave a slow boot time to reach the hostile script
    // (whose console line each error must quote), and is still what the
    // `unfinished` and `drip` cases take.
    let kiln = DbusKilnd::start_with(false, "boot_timeout_sec = 60\n");
    let initrd = kiln.kilnd.dir.path().join("hostile-initramfs");
    hostile_initramfs(&initrd);
    let good = kiln.varlinkctl("CreateVM", json!({"name": "good"}))["vm"]["id"].clone();
    kiln.varlinkctl("StartVM", json!({"id": good}));
    let pid = kiln.kilnd.pid().unwrap();
    let rss_before = rss_kib(pid);

    let address = kiln.kilnd.varlink_address();
    let started = Instant::now();
    let boots: Vec<_> = CASES
        .iter()
        .map(|(case, expected)| {
            let spec = json!({"memoryMiB": 128, "initrd": initrd,
                "cmdline": format!("rdinit=/hostile kiln.hostile={case}")});
            let id = kiln.varlinkctl("CreateVM", json!({"name": case, "spec": spec}))["vm"]["id"]
                .clone();
            let address = address.clone();
            let thread = std::thread::spawn(move || {
                kiln_testkit::varlinkctl_call(
                    None,
                    &address,
                    "io.kiln.Manager.StartVM",
                    &json!({"id": id}).to_string(),
                )
            });
            (case, expected, thread)
        })
        .collect();

    // While the hostile guests boot and misbehave, the good VM and both
    // APIs answer, and kilnd's memory stays put.
    let mut rounds = 0;
    let mut rss_peak = rss_before;
    while boots.iter().any(|(_, _, t)| !t.is_finished()) {
        let r = kiln.varlinkctl("ExecVM", json!({"id": good, "command": ["echo", "fine"]}));
        assert_eq!(r["stdout"], "fine\n", "{r}");
        let objects = kiln.call(
            "/io/kiln/Kiln1",
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
            &[],
        );
        assert!(objects.to_string().contains("good"), "{objects}");
        rss_peak = rss_peak.max(rss_kib(pid));
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed();

    let vms = kiln.varlinkctl("ListVMs", json!({}))["vms"].clone();
    let vm = |name: &str| -> Value {
        vms.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    for (case, expected, thread) in boots {
        let error = match thread.join().unwrap() {
            Ok(reply) => panic!("{case}: the hostile VM started: {reply}"),
            Err((name, _)) => name,
        };
        let failed = vm(case);
        println!(
            "{case}: StartVM {error}; state {}; {}",
            failed["state"], failed["lastError"]
        );
        assert!(
            [
                "io.kiln.Manager.BootFailed",
                "io.kiln.Manager.AgentFailed",
                "io.kiln.Manager.Timeout"
            ]
            .contains(&error.as_str()),
            "{case}: {error}"
        );
        assert_eq!(failed["state"], "failed", "{case}: {failed}");

        // It did misbehave on the agent's port (its script says so on the
        // console, whose tail the error quotes), and the error says how.
        let last_error = failed["lastError"].as_str().unwrap_or_default();
        assert!(
            last_error.contains(&format!("hostile agent: {case} on /dev/vport")),
            "{case}: {last_error}"
        );
        assert!(last_error.contains(expected), "{case}: {last_error}");
    }
    println!(
        "{} hostile guests failed in {elapsed:.1?}; {rounds} rounds of exec + GetManagedObjects \
         meanwhile; kilnd RSS {rss_before} KiB before, {rss_peak} KiB at most",
        CASES.len()
    );
    // Bounded: one agent frame (8 MiB) per VM at most, not the floods.
    assert!(
        rss_peak < rss_before + 48 * 1024,
        "kilnd grew from {rss_before} to {rss_peak} KiB"
    );
    assert_eq!(vm("good")["state"], "ready");
    let state = kiln.prop(
        &format!("/io/kiln/Kiln1/vm/{}", good.as_str().unwrap()),
        busctl::VM_IF,
        "State",
    );
    assert_eq!(state, "ready");
}

#[test]
fn a_guest_flooding_its_console_keeps_the_log_bounded() {
    let d = Daemon::start();
    let id = d.ok("CreateVM", json!({ "name": "noisy" }))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok("StartVM", json!({ "id": id }));
    let log = d
        .kilnd
        .dir
        .path()
        .join("run/vms")
        .join(&id)
        .join("console.log");
    // 3 MiB through the emulated UART, three times kilnd's bound.
    let flood = d.ok(
        "ExecVM",
        json!({ "id": id, "timeoutSec": 300, "command": ["sh", "-c",
                "head -c 3145728 /dev/zero | tr '\\000' x > /dev/ttyS0; echo flooded"] }),
    );
    assert_eq!(flood["stdout"], "flooded\n", "{flood}");
    // The shell is done once the tty has the bytes; the UART may still be
    // draining them into the log, and the check runs once a second: wait
    // for a cut (marked) and a log back under the bound.
    wait_until(Duration::from_secs(60), "the console log cut back", || {
        let len = std::fs::metadata(&log).unwrap().len();
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
        (len <= 1024 * 1024 && text.contains("[kiln: console log over 1 MiB"))
            .then_some(())
            .ok_or(format!("{len} bytes, marked: {}", text.contains("[kiln:")))
    });
    assert!(
        d.log().contains("the guest floods its console"),
        "and logged"
    );
    // The VM and the API carry on.
    let r = d.ok("ExecVM", json!({ "id": id, "command": ["echo", "still"] }));
    assert_eq!(r["stdout"], "still\n");
}
