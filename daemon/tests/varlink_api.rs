//! The real kilnd binary driven with the real `varlinkctl`, booting real
//! QEMU VMs (TCG here).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_testkit::{api_doc_script, run_bash, varlinkctl_ok, Daemon, Kilnd, VarlinkStream};
use serde_json::json;

#[test]
fn lifecycle_over_varlinkctl() {
    let d = Daemon::start();
    let vm = d.ok(
        "CreateVM",
        json!({"name": "web", "spec": {"vcpus": 1, "memoryMiB": 128}}),
    )["vm"]
        .clone();
    assert_eq!(vm["state"], "created");
    let id = vm["id"].as_str().unwrap().to_owned();
    let vm = d.ok("StartVM", json!({"id": id}))["vm"].clone();
    assert_eq!(vm["state"], "ready", "{vm}");
    let exec = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c", "echo hi; echo err >&2; exit 3"]}),
    );
    assert_eq!(
        (
            exec["exitCode"].as_i64(),
            exec["stdout"].as_str(),
            exec["stderr"].as_str()
        ),
        (Some(3), Some("hi\n"), Some("err\n"))
    );
    assert_eq!(d.ok("PauseVM", json!({"id": id}))["vm"]["state"], "paused");
    assert_eq!(
        d.err("ExecVM", json!({"id": id, "command": ["true"]})),
        "io.kiln.Manager.InvalidState"
    );
    assert_eq!(d.ok("ResumeVM", json!({"id": id}))["vm"]["state"], "ready");
    assert_eq!(
        d.ok("ExecVM", json!({"id": id, "command": ["true"]}))["exitCode"],
        0
    );
    let stopped = d.ok("StopVM", json!({"id": id, "timeoutSec": 20}))["vm"].clone();
    assert_eq!(stopped["state"], "stopped");
    d.ok("DeleteVM", json!({"id": id}));
    assert_eq!(
        d.err("DescribeVM", json!({"id": id})),
        "io.kiln.Manager.NoSuchVM"
    );
    assert_eq!(d.ok("ListVMs", json!({}))["vms"], json!([]));
}

#[test]
fn kilnd_sigkill_then_restart_readopts_the_vm() {
    let mut d = Daemon::start();
    let id = d.ok("CreateVM", json!({"name": "survivor"}))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = d.ok("StartVM", json!({"id": id}))["vm"].clone();
    d.sigkill();
    d.spawn();
    let after = d.ok("DescribeVM", json!({"id": id}))["vm"].clone();
    assert_eq!(after["state"], "ready", "{after}");
    assert_eq!(after["pid"], before["pid"], "same QEMU process");
    assert_eq!(after["bootId"], before["bootId"], "same guest boot");
    let out = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["cat", "/proc/sys/kernel/random/boot_id"]}),
    );
    assert_eq!(
        out["stdout"].as_str().unwrap().trim(),
        before["bootId"].as_str().unwrap()
    );
}

#[test]
fn watch_streams_events_while_another_client_acts() {
    let d = Daemon::start();
    let mut watcher = VarlinkStream::start(&d.address(), "io.kiln.Manager.Watch", "{}");
    let next = |want: &str| loop {
        let event = watcher
            .next(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no {want} event"))["event"]
            .clone();
        eprintln!("watch: {event}");
        if event["type"] == want {
            return event;
        }
    };
    next("ready");
    let id = d.ok("CreateVM", json!({"name": "watched"}))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let added = next("vmAdded");
    assert_eq!(
        (added["id"].as_str(), added["vm"]["name"].as_str()),
        (Some(id.as_str()), Some("watched"))
    );
    d.ok("DeleteVM", json!({"id": id}));
    assert_eq!(next("vmRemoved")["id"], id.as_str());
    assert_eq!(
        d.err("Watch", json!({})),
        "org.varlink.service.ExpectedMore"
    );
    watcher.kill();
}

#[test]
fn bad_input_gets_named_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    assert_eq!(
        d.err("CreateVM", json!({"name": 5})),
        "org.varlink.service.InvalidParameter"
    );
    assert_eq!(
        d.err("CreateVM", json!({"name": "x", "spec": {"vcpus": "two"}})),
        "org.varlink.service.InvalidParameter"
    );
    assert_eq!(
        d.err("CreateVM", json!({"name": "x", "spec": {"bogus": 1}})),
        "org.varlink.service.InvalidParameter"
    );
    assert_eq!(
        d.err("CreateVM", json!({"name": "x".repeat(100_000)})),
        "io.kiln.Manager.InvalidName"
    );
    assert_eq!(
        d.err("CreateVM", json!({"name": "x", "spec": {"vcpus": 0}})),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        d.err(
            "CreateVM",
            json!({"name": "x", "spec": {"memoryMiB": 100_000_000}})
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        d.err(
            "CreateVM",
            json!({"name": "x", "spec": {"kernel": "/nope"}})
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        d.err("NoSuchMethod", json!({})),
        "org.varlink.service.MethodNotFound"
    );
    assert_eq!(
        d.err("StartVM", json!({"id": "000000000000"})),
        "io.kiln.Manager.NoSuchVM"
    );
    assert_eq!(
        d.err("StartVM", json!({})),
        "org.varlink.service.InvalidParameter"
    );
    assert_eq!(
        d.err("ExecVM", json!({"id": "000000000000", "command": []})),
        "io.kiln.Manager.InvalidArgument"
    );

    // Malformed JSON on a raw connection: that connection is closed, nothing else.
    let path = d.kilnd.dir.path().join("varlink");
    let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
    raw.write_all(b"{not json\0").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut raw, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection closed on malformed JSON");

    d.ok("CreateVM", json!({"name": "after-abuse"}));
    assert_eq!(
        d.ok("ListVMs", json!({}))["vms"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn unprivileged_callers_may_read_but_not_change() {
    let d = Daemon::start();
    d.ok("CreateVM", json!({"name": "owned"}));
    let nobody = Some(65534);
    let listed = d
        .call_as(nobody, "io.kiln.Manager.ListVMs", "{}")
        .expect("read-only call allowed");
    assert_eq!(listed["vms"].as_array().unwrap().len(), 1);
    let refused = d
        .call_as(nobody, "io.kiln.Manager.CreateVM", r#"{"name":"intruder"}"#)
        .expect_err("refused");
    assert_eq!(refused.0, "io.kiln.Manager.PermissionDenied");
    assert_eq!(
        d.ok("ListVMs", json!({}))["vms"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn introspection_serves_the_committed_idl() {
    let d = Daemon::start();
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../varlink/io.kiln.Manager.varlink"),
    )
    .unwrap();
    let live = d
        .call(
            "org.varlink.service.GetInterfaceDescription",
            json!({"interface": "io.kiln.Manager"}),
        )
        .unwrap();
    assert_eq!(live["description"].as_str(), Some(committed.as_str()));
    // That it is valid varlink is checked by systemd's validator in
    // schema.rs (`varlinkctl introspect` exits 0 even on an IDL it cannot
    // parse: it prints the text as it came).
    // Every method the IDL declares is served (none is MethodNotFound).
    for line in committed.lines().filter_map(|l| l.strip_prefix("method ")) {
        let name = line.split('(').next().unwrap().trim();
        if let Err((error, _)) = d.call(&format!("io.kiln.Manager.{name}"), json!({})) {
            assert_ne!(
                error, "org.varlink.service.MethodNotFound",
                "{name} is declared but not served"
            );
        }
    }
    let info = Command::new("varlinkctl")
        .args(["info", &d.address()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("io.kiln.Manager"));
}

/// The varlink examples of docs/api.md run verbatim against this daemon.
#[test]
fn api_doc_examples_run() {
    let d = Daemon::start();
    let script = api_doc_script(
        "## varlink examples",
        &[(
            "SOCK=unix:/run/kiln/io.kiln.Manager",
            format!("SOCK={}", d.address()),
        )],
    );
    let stdout = run_bash(&script, &d.log());
    assert!(
        stdout.contains("demo ready"),
        "ListVMs example output: {stdout}"
    );
}

/// SIGTERM stops kilnd, not its VMs (`stop_vms_on_exit = false`).
#[test]
fn sigterm_leaves_vms_running() {
    let mut d = Daemon::start();
    let id = d.ok("CreateVM", json!({"name": "outlives"}))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = d.ok("StartVM", json!({"id": id}))["vm"]["pid"]
        .as_i64()
        .unwrap();
    let mut child = d.kilnd.take_child().unwrap();
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "kilnd exits cleanly on SIGTERM: {status}\n{}",
        d.log()
    );
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(alive, "QEMU still running");
    d.spawn();
    assert_eq!(
        d.ok("DescribeVM", json!({"id": id}))["vm"]["state"],
        "ready"
    );
}

/// Under systemd's socket activation kilnd serves the listening socket it is
/// given (`FileDescriptorName=varlink`), not one of its own.
#[test]
fn serves_the_socket_systemd_passes() {
    let mut kilnd = Kilnd::new("dbus = \"none\"\n");
    let activated = kilnd.dir.path().join("activated.sock");
    let mut command = Command::new("systemd-socket-activate");
    command
        .arg(format!("--listen={}", activated.display()))
        .arg("--fdname=varlink");
    command.arg(env!("CARGO_BIN_EXE_kilnd"));
    let address = format!("unix:{}", activated.display());
    kilnd.spawn_with(command, |_| {
        varlinkctl_ok(&address, "io.kiln.Manager.ListVMs")
    });
    assert!(
        kilnd.log().contains("serving the socket passed by systemd"),
        "{}",
        kilnd.log()
    );
    // The configured socket path was never bound.
    assert!(!kilnd.dir.path().join("varlink").exists());
}
