//! `containerd-shim-kiln-v1` when things fail, under a real containerd and
//! a real kilnd (the fixture of `ctr.rs`, `common/`):
//!
//! - `an_image_the_guest_cannot_run_fails_its_task`: a program that is no
//!   executable for the guest (64 bytes of junk, mode 0755) ends `ctr run
//!   --rm` within seconds with the guest's reason (exec format error) on
//!   ctr's stderr; no task is left hanging, no VM leased.
//! - `kilnd_killed_mid_run_loses_no_output`: kilnd SIGKILLed while a
//!   container prints a counter, then started again with the same config:
//!   kilnd re-adopts the VM (same id), the shim's log pump resumes from its
//!   cursor, `ctr run` prints every line once and ends with the exit code.
//! - `a_dead_containerd_and_shim_leave_the_vm_to_the_lease`: containerd
//!   and the shim both SIGKILLed (nobody runs the shim's `delete`): the
//!   lease the shim no longer renews runs out and kilnd reclaims the VM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Setup, IMAGE, LEASE_TTL_SEC, SLEEPER};
use kiln_testkit::containerd::KILN_SHIM;
use kiln_testkit::oci::{busybox_layer, Entry, Layer};
use kiln_testkit::try_wait_until;

const BAD_IMAGE: &str = "localhost/kiln-bad:v1";

/// Wait for `child` to end within `within` (killed, and the test failed,
/// when it does not); how it ended and its stderr.
fn wait_child(child: &mut Child, within: Duration, what: &str) -> (ExitStatus, String) {
    let ended = try_wait_until(within, || child.try_wait().unwrap());
    let status = ended.unwrap_or_else(|_| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} still running after {within:?}");
    });
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).unwrap();
    }
    (status, stderr)
}

#[test]
fn an_image_the_guest_cannot_run_fails_its_task() {
    let Some(s) = Setup::new() else { return };
    let c = &s.containerd;
    // Neither ELF nor `#!`: execve says ENOEXEC.
    let junk: Vec<u8> = (0..64u8).map(|i| 0xde ^ i.wrapping_mul(37)).collect();
    s.import(
        BAD_IMAGE,
        &[
            busybox_layer(),
            Layer::gzip(&[Entry::Dir("bin/"), Entry::File("bin/app", junk, 0o755)]),
        ],
    );
    s.wait_hot();

    let started = Instant::now();
    let mut ctr = c
        .ctr(&s.run_args(&["--rm", BAD_IMAGE, "t6", "/bin/app"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait_child(&mut ctr, Duration::from_secs(30), "ctr run of a bad image");
    let took = started.elapsed();
    eprintln!("ctr run of the bad image: {status} after {took:?}: {stderr}");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("exec format error") && stderr.contains("/bin/app"),
        "ctr's message names neither the reason nor the program: {stderr}\n{}",
        c.log_tail()
    );
    // Nothing hangs: no task, no container (`--rm`), no VM.
    let tasks = c.ctr_ok(&["task", "ls", "-q"]);
    assert!(!tasks.lines().any(|l| l == "t6"), "{tasks}");
    let containers = c.ctr_ok(&["container", "ls", "-q"]);
    assert!(!containers.lines().any(|l| l == "t6"), "{containers}");
    s.wait_released_within("t6", Duration::from_secs(10));
    // The image's rootfs is no longer held by a VM either: the next run of
    // a good image in the same shim config works.
    let out = c.ctr_ok(&s.run_args(&["--rm", IMAGE, "t6b", "/bin/cat", "/etc/hello"]));
    assert_eq!(out, "hello from the base layer\n");
}

#[test]
fn kilnd_killed_mid_run_loses_no_output() {
    let Some(mut s) = Setup::new() else { return };
    s.wait_hot();
    // 50 lines, one every 0.2 s, then exit 7.
    let script = "i=0; while [ $i -lt 50 ]; do echo $i; i=$((i+1)); /bin/busybox sleep 0.2; done; \
                  exit 7";
    let mut ctr = s
        .containerd
        .ctr(&s.run_args(&["--rm", IMAGE, "t5", "/bin/sh", "-c", script]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = ctr.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line.clone()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}: only {seen:?}\n{}", s.containerd.log_tail()));
        seen.push(line);
    }
    let vms = s.vms_of("t5");
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = vms[0]["id"].as_str().unwrap().to_owned();

    // kilnd goes while the container keeps printing; it is away for a
    // second, then back with the same config.
    s.kilnd.sigkill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    s.kilnd.spawn();
    eprintln!("kilnd back after {:?}", killed.elapsed());
    let vms = s.vms_of("t5");
    assert_eq!(vms.len(), 1, "kilnd re-adopted the pod's VM: {vms:?}");
    assert_eq!(vms[0]["id"], vm.as_str());
    assert_eq!(vms[0]["state"], "leased");

    let (status, stderr) = wait_child(
        &mut ctr,
        Duration::from_secs(120),
        "ctr run across a kilnd restart",
    );
    reader.join().unwrap();
    seen.extend(lines.try_iter());
    let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(
        seen,
        want,
        "every line once, in order\n{stderr}\n{}",
        s.containerd.log_tail()
    );
    assert_eq!(
        status.code(),
        Some(7),
        "{stderr}\n{}",
        s.containerd.log_tail()
    );
    // It was the shim's pump that went on (containerd's log has the shim's).
    let log = s.containerd.log();
    assert!(
        log.lines().any(|l| (l.contains("following container t5:")
            || l.contains("following process "))
            && l.contains("trying again")),
        "{}",
        s.containerd.log_tail()
    );
    s.wait_released("t5");
}

#[test]
fn a_dead_containerd_and_shim_leave_the_vm_to_the_lease() {
    let Some(mut s) = Setup::new() else { return };
    let mut args = vec!["-d", IMAGE, "t7"];
    args.extend(SLEEPER);
    s.containerd.ctr_ok(&s.run_args(&args));
    let vms = s.vms_of("t7");
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(s.containerd.shims(KILN_SHIM).len(), 1);

    // containerd first, so that nobody runs the shim's `delete` action.
    s.containerd.sigkill();
    s.containerd.kill_shims(KILN_SHIM);
    let killed = Instant::now();
    assert_eq!(
        s.vms_of("t7").len(),
        1,
        "the VM outlives its shim until its lease runs out"
    );
    // Renewed every third of the TTL: it had 2/3 to all of it left.
    s.wait_released_within("t7", Duration::from_secs(LEASE_TTL_SEC + 10));
    let took = killed.elapsed();
    eprintln!("VM reclaimed {took:?} after the shim died (lease TTL {LEASE_TTL_SEC} s)");
    assert!(
        took >= Duration::from_secs(LEASE_TTL_SEC * 2 / 3 - 1),
        "reclaimed after {took:?}: before the lease could have run out"
    );
}
