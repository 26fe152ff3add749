//! `containerd-shim-kiln-v1` under a real containerd (Debian's), driven
//! with `ctr` as a user would: an image the test builds (busybox and an app
//! layer) imported with `ctr images import`, run in Kiln VMs leased from a
//! template pool of a real kilnd (real QEMU). Each test has its own kilnd
//! and containerd; everything is torn down on drop.
//!
//! - `ctr_runs_execs_and_caches`: `ctr run --rm` prints the command's
//!   output and ends with its exit code, the VM given back after; a second
//!   run converts no layer (the rootfs image is cached); `ctr run -d`,
//!   the VM visible with the container, `ctr task exec` with and without a
//!   terminal, the lease renewed, `ps` and `metrics`, `kill` and `delete`
//!   giving the VM back.
//! - `pods_share_a_vm_and_a_dead_shim_gives_it_back`: a sandbox and two
//!   containers grouped by `io.kubernetes.cri.sandbox-id` run in one VM
//!   under one shim; a shim killed with SIGKILL leaves no VM behind
//!   (containerd runs the shim's `delete` action).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Setup, IMAGE, SLEEPER};
use kiln_testkit::containerd::KILN_SHIM;
use kiln_testkit::wait_until;
use serde_json::{json, Value};

#[test]
fn ctr_runs_execs_and_caches() {
    let Some(s) = Setup::new() else { return };
    let c = &s.containerd;

    // Run to the end: the output, the exit code, the VM given back.
    let started = Instant::now();
    let out = c.ctr_output(&s.run_args(&[
        "--rm",
        IMAGE,
        "t1",
        "/bin/sh",
        "-c",
        "cat /etc/hello; echo to-stderr >&2; exit 3",
    ]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{stderr}\n{}",
        c.log_tail()
    );
    assert_eq!(stdout, "hello from the base layer\n");
    assert!(stderr.contains("to-stderr"), "{stderr}");
    eprintln!(
        "first ctr run (template build included): {:?}",
        started.elapsed()
    );
    s.wait_released("t1");

    // Again: the rootfs image is the one converted before.
    let started = Instant::now();
    let out = c.ctr_ok(&s.run_args(&["--rm", IMAGE, "t1b", "/bin/cat", "/srv/app.txt"]));
    assert_eq!(out, "app layer\n");
    eprintln!("second ctr run: {:?}", started.elapsed());
    let images = s.kilnd.ok("ListImages", json!({}))["images"].clone();
    let rootfs: Vec<&Value> = images
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            i["source"]
                .as_str()
                .unwrap_or_default()
                .starts_with("rootfs:")
        })
        .collect();
    assert_eq!(rootfs.len(), 1, "{images}");
    assert_eq!(rootfs[0]["layers"].as_array().unwrap().len(), 2);
    assert!(
        c.log().contains("(0 converted, 2 cached)"),
        "{}",
        c.log_tail()
    );
    s.wait_released("t1b");

    // The main process on a terminal (`ctr run -t`; script gives ctr the
    // terminal it wants), typed into through it.
    let ctr = format!(
        "ctr --address {} --namespace kiln-test {} {IMAGE} t1t \
         /bin/sh -c 'test -t 0 && test -t 1 && echo on-a-tty; read x; echo got:$x; exit 6'",
        c.address().display(),
        s.run_args(&["-t", "--rm"]).join(" "),
    );
    let mut script = Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut typing = script.stdin.take().unwrap();
    std::thread::spawn(move || {
        // Typed once the process reads (a terminal's input before that
        // would be echoed and read all the same, but not before ctr runs).
        std::thread::sleep(Duration::from_secs(3));
        let _ = std::io::Write::write_all(&mut typing, b"typed\n");
        std::thread::sleep(Duration::from_secs(60));
    });
    let out = script.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("on-a-tty") && text.contains("got:typed"),
        "{}: {text:?} {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        c.log_tail()
    );
    assert_eq!(out.status.code(), Some(6), "{text:?}");
    s.wait_released("t1t");

    // Its stdin on a pipe (`ctr run` passes its own): every byte, then
    // end of file.
    let mut run = c.ctr(&s.run_args(&["--rm", IMAGE, "t1i", "/bin/sh", "-c", "wc -c; exit 2"]));
    let mut child = run
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &[b'k'; 70_000]).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "70000");
    assert_eq!(out.status.code(), Some(2));
    s.wait_released("t1i");

    // Detached: the VM runs the container; execs in it.
    let mut args = vec!["-d", IMAGE, "t2"];
    args.extend(SLEEPER);
    c.ctr_ok(&s.run_args(&args));
    let vms = s.vms_of("t2");
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["state"], "leased");
    assert_eq!(vms[0]["labels"]["io.containerd.namespace"], "kiln-test");
    assert_eq!(s.containers(&vms[0]), ["t2"]);
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t2",
        "/bin/cat",
        "/srv/app.txt",
    ]);
    assert_eq!(out, "app layer\n");
    let out = c.ctr_output(&[
        "task",
        "exec",
        "--exec-id",
        "e1b",
        "t2",
        "/bin/sh",
        "-c",
        "exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    // With a terminal (ctr -t wants one itself: script gives it a pty).
    // (`tty` would say "not a tty": the guest's pty is not in the
    // container's /dev/pts, so it has no name there; it is a terminal.)
    let ctr = format!(
        "ctr --address {} --namespace kiln-test task exec -t --exec-id e2 t2 \
         /bin/sh -c 'test -t 0 && test -t 1 && echo on-a-terminal'",
        c.address().display()
    );
    let out = Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("on-a-terminal"),
        "{}: {text:?} {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        c.log_tail()
    );
    let ps = c.ctr_ok(&["task", "ps", "t2"]);
    assert!(ps.lines().count() >= 2, "{ps}");
    // The shim renews the 10 s lease (every third of it).
    let granted = vms[0]["leaseExpiresAt"].as_u64().unwrap();
    wait_until(Duration::from_secs(10), "the lease to be renewed", || {
        let now = s.vms_of("t2")[0]["leaseExpiresAt"].as_u64();
        (now > Some(granted))
            .then_some(())
            .ok_or(format!("{now:?}"))
    });
    let metrics = c.ctr_ok(&["task", "metrics", "t2"]);
    assert!(
        metrics.contains("memory") || metrics.contains("METRIC"),
        "{metrics}"
    );
    s.remove("t2");
    s.wait_released("t2");
    // Its last task deleted, the shim exits (containerd's Shutdown).
    wait_until(Duration::from_secs(10), "the shim to exit", || {
        let left = c.shims(KILN_SHIM);
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    });
}

#[test]
fn pods_share_a_vm_and_a_dead_shim_gives_it_back() {
    let Some(s) = Setup::new() else { return };
    let c = &s.containerd;

    // A pod without CRI: the annotations CRI would set.
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let mut args = vec!["-d"];
    args.extend(sandbox);
    args.extend([IMAGE, "pod1", "/bin/busybox", "sleep", "1d"]);
    c.ctr_ok(&s.run_args(&args));
    for name in ["c1", "c2"] {
        let mut args = vec!["-d"];
        args.extend(member);
        args.extend([IMAGE, name]);
        args.extend(SLEEPER);
        c.ctr_ok(&s.run_args(&args));
    }
    let vms = s.vms_of("pod1");
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    assert_eq!(s.containers(&vms[0]), ["c1", "c2"]);
    assert_eq!(c.shims(KILN_SHIM).len(), 1, "one shim for the pod");
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "x",
        "c2",
        "/bin/cat",
        "/srv/app.txt",
    ]);
    assert_eq!(out, "app layer\n");
    // Containers go, then the sandbox, which gives the VM back.
    s.remove("c1");
    s.remove("c2");
    assert_eq!(
        s.vms_of("pod1").len(),
        1,
        "the pod's VM outlives its containers"
    );
    s.remove("pod1");
    s.wait_released("pod1");

    // The shim killed: containerd's `delete` action gives the VM back.
    let mut args = vec!["-d", IMAGE, "t4"];
    args.extend(SLEEPER);
    c.ctr_ok(&s.run_args(&args));
    assert_eq!(s.vms_of("t4").len(), 1);
    c.kill_shims(KILN_SHIM);
    s.wait_released("t4");
    // containerd saw the task die.
    wait_until(Duration::from_secs(30), "t4 to be stopped", || {
        let listed = c.ctr_ok(&["task", "ls"]);
        (!listed.contains("RUNNING")).then_some(()).ok_or(listed)
    });
}
