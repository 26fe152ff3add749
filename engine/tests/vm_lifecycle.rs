//! VM lifecycle against real QEMU (TCG here, KVM where usable) and the real
//! guest image from `make guest`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use kiln_engine::accel::AccelChoice;
use kiln_engine::{Engine, EngineConfig, EngineError, EngineHandle, VmSpec, VmState};
use kiln_testkit::{guest_dir, pid_alive, wait_until_async, Sandbox};

/// Engine config rooted in `root` (a sandbox, or the helper process's dir).
fn config_in(root: &Path) -> EngineConfig {
    EngineConfig {
        state_dir: root.join("state"),
        runtime_dir: root.join("run"),
        guest_dir: guest_dir(),
        accel: AccelChoice::Auto,
        // Generous: TCG on 2 shared cores with other tests booting too.
        boot_timeout_sec: 180,
        stop_timeout_sec: 10,
        ..EngineConfig::default()
    }
}

/// An engine on `sandbox`; its QEMUs die with the sandbox.
async fn engine_in(sandbox: &Sandbox) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    Engine::start(config_in(sandbox.path()))
        .await
        .expect("engine starts")
}

/// An exec request for `args`.
fn argv(args: &[&str]) -> kiln_agent_proto::ExecRequest {
    kiln_agent_proto::ExecRequest {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_exec_and_failing_command() {
    let sandbox = Sandbox::new();
    let (engine, _task) = engine_in(&sandbox).await;
    let vm = engine
        .create_vm("exec-test", VmSpec::default())
        .await
        .expect("create");
    assert_eq!(vm.state, VmState::Created);
    let vm = engine.start_vm(&vm.id).await.expect("boots to ready");
    assert_eq!(vm.state, VmState::Ready);
    assert!(vm.pid.is_some() && vm.qemu_version.is_some() && vm.agent_version.is_some());
    let boot_ms = (vm.ready_at.unwrap() - vm.started_at.unwrap()) / 1000;
    eprintln!("boot to agent ready: {boot_ms} ms");

    let expected_release = std::fs::read_to_string(guest_dir().join("kernel-release"))
        .expect("kernel-release written by make guest");
    let uname = engine
        .exec_vm(&vm.id, argv(&["uname", "-r"]))
        .await
        .expect("exec");
    assert_eq!(uname.exit_code, 0, "{uname:?}");
    assert_eq!(uname.stdout.trim(), expected_release.trim());
    assert_eq!(vm.kernel_release.as_deref(), Some(expected_release.trim()));

    let failing = engine
        .exec_vm(&vm.id, argv(&["sh", "-c", "echo oops >&2; exit 7"]))
        .await
        .expect("exec");
    assert_eq!(failing.exit_code, 7);
    assert_eq!(failing.stderr.trim(), "oops");

    let missing = engine
        .exec_vm(&vm.id, argv(&["/no/such/program"]))
        .await
        .expect_err("exec failure");
    assert_eq!(missing.name(), "ExecFailed", "{missing:?}");

    let empty = engine
        .exec_vm(&vm.id, argv(&[]))
        .await
        .expect_err("empty argv");
    assert_eq!(empty.name(), "InvalidArgument");

    engine.delete_vm(&vm.id).await.expect("delete");
    assert!(!pid_alive(vm.pid.unwrap()), "QEMU gone after delete");
    assert!(engine.list_vms().await.unwrap().is_empty());
    assert!(!sandbox.path().join("run/vms").join(&vm.id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_pause_resume_reboot_kill() {
    let sandbox = Sandbox::new();
    let (engine, _task) = engine_in(&sandbox).await;
    let vm = engine.create_vm("ops", VmSpec::default()).await.unwrap();
    let id = vm.id.clone();
    let vm = engine.start_vm(&id).await.expect("boot");

    // Pause: vCPUs stop, the agent cannot answer; resume: it answers again.
    let paused = engine.pause_vm(&id).await.expect("pause");
    assert_eq!(paused.state, VmState::Paused);
    let silent = engine
        .ping_vm(&id, Duration::from_millis(500))
        .await
        .expect_err("paused guest is silent");
    assert_eq!(silent.name(), "Timeout");
    let refused = engine
        .exec_vm(&id, argv(&["true"]))
        .await
        .expect_err("no exec while paused");
    assert_eq!(refused.name(), "InvalidState");
    assert_eq!(
        engine.pause_vm(&id).await.expect_err("pause twice").name(),
        "InvalidState"
    );
    let resumed = engine.resume_vm(&id).await.expect("resume");
    assert_eq!(resumed.state, VmState::Ready);
    engine
        .ping_vm(&id, Duration::from_secs(10))
        .await
        .expect("answers after resume");
    let echo = engine
        .exec_vm(&id, argv(&["echo", "back"]))
        .await
        .expect("exec after resume");
    assert_eq!(echo.stdout, "back\n");

    // Reboot: the agent comes back from a new boot.
    let before = vm.boot_id.clone().expect("boot id");
    let rebooted = engine.reboot_vm(&id).await.expect("reboot");
    assert_eq!(rebooted.state, VmState::Ready);
    assert_ne!(
        rebooted.boot_id.as_deref(),
        Some(before.as_str()),
        "boot id changes on reboot"
    );
    assert_eq!(
        rebooted.pid, vm.pid,
        "same QEMU process across a guest reboot"
    );

    // Graceful stop: the guest powers off through its agent.
    let stopped = engine
        .stop_vm(&id, Some(Duration::from_secs(20)))
        .await
        .expect("stop");
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(!pid_alive(vm.pid.unwrap()));
    assert!(stopped.last_error.is_none(), "{stopped:?}");
    assert_eq!(
        engine
            .stop_vm(&id, None)
            .await
            .expect("stop again is a no-op")
            .state,
        VmState::Stopped
    );

    // Start again, then kill.
    let again = engine.start_vm(&id).await.expect("restart");
    assert_eq!(again.state, VmState::Ready);
    let killed = engine.kill_vm(&id).await.expect("kill");
    assert_eq!(killed.state, VmState::Stopped);
    assert!(!pid_alive(again.pid.unwrap()));
    assert_eq!(
        engine
            .resume_vm(&id)
            .await
            .expect_err("resume a stopped VM")
            .name(),
        "InvalidState"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_named_errors_and_create_nothing() {
    let sandbox = Sandbox::new();
    let (engine, _task) = engine_in(&sandbox).await;
    engine
        .create_vm("taken", VmSpec::default())
        .await
        .expect("first");
    let cases: Vec<(&str, VmSpec, &str)> = vec![
        (
            "zero-cpus",
            VmSpec {
                vcpus: Some(0),
                ..VmSpec::default()
            },
            "InvalidSpec",
        ),
        (
            "huge",
            VmSpec {
                memory_mib: Some(u32::MAX),
                ..VmSpec::default()
            },
            "InvalidSpec",
        ),
        (
            "no-kernel",
            VmSpec {
                kernel: Some("/nonexistent/vmlinuz".into()),
                ..VmSpec::default()
            },
            "InvalidSpec",
        ),
        ("taken", VmSpec::default(), "AlreadyExists"),
        ("bad/name", VmSpec::default(), "InvalidName"),
    ];
    for (name, spec, error) in cases {
        let err = engine.create_vm(name, spec).await.expect_err(name);
        assert_eq!(err.name(), error, "{name}: {}", err.message());
    }
    assert_eq!(engine.list_vms().await.unwrap().len(), 1);
    let records = std::fs::read_dir(sandbox.path().join("state/vms"))
        .unwrap()
        .count();
    assert_eq!(records, 1, "no record written for refused specs");
    let err = engine
        .start_vm("000000000000")
        .await
        .expect_err("unknown id");
    assert!(matches!(err, EngineError::NoSuchVM(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_reported_and_isolated() {
    let sandbox = Sandbox::new();
    {
        let (engine, task) = engine_in(&sandbox).await;
        engine
            .create_vm("survivor", VmSpec::default())
            .await
            .unwrap();
        engine.shutdown(false).await.unwrap();
        task.await.unwrap();
    }
    std::fs::write(
        sandbox.path().join("state/vms/abcdefabcdef.json"),
        b"{\"version\": 1, \"id\": ",
    )
    .unwrap();
    let (engine, _task) = engine_in(&sandbox).await;
    let status = engine.status().await.unwrap();
    assert_eq!(status.broken_records.len(), 1, "{status:?}");
    assert_eq!(status.broken_records[0].key, "abcdefabcdef");
    assert!(sandbox
        .path()
        .join("state/vms/abcdefabcdef.json.broken")
        .exists());
    let vms = engine.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].name, "survivor");
}

/// Not a test on its own: the process `daemon_sigkill_readopts_vms` runs
/// and SIGKILLs. It starts an engine on `KILN_HELPER_DIR`, boots two VMs,
/// prints their ids and waits to be killed.
#[test]
#[ignore = "helper process for daemon_sigkill_readopts_vms"]
fn helper_engine_process() {
    let Some(root) = std::env::var_os("KILN_HELPER_DIR") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = config_in(Path::new(&root));
        let (engine, _task) = kiln_engine::Engine::start(config).await.unwrap();
        let mut ids = Vec::new();
        for name in ["keep-a", "keep-b"] {
            let vm = engine.create_vm(name, VmSpec::default()).await.unwrap();
            ids.push(vm.id.clone());
        }
        let (a, b) = tokio::join!(engine.start_vm(&ids[0]), engine.start_vm(&ids[1]));
        a.unwrap();
        b.unwrap();
        println!("READY {} {}", ids[0], ids[1]);
        std::future::pending::<()>().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_readopts_vms() {
    let sandbox = Sandbox::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_engine_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_HELPER_DIR", sandbox.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ids = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split_once("READY ").map(|(_, rest)| {
                    rest.split_whitespace()
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
            })
    })
    .await
    .unwrap()
    .expect("helper booted two VMs");
    child.kill().unwrap(); // SIGKILL: no cleanup runs in the helper.
    child.wait().unwrap();

    let (engine, _task) = engine_in(&sandbox).await;
    let vms = engine.list_vms().await.unwrap();
    assert_eq!(vms.len(), 2);
    for id in &ids {
        let vm = engine.describe_vm(id).await.unwrap();
        assert_eq!(vm.state, VmState::Ready, "{vm:?}");
        assert!(pid_alive(vm.pid.unwrap()));
        let out = engine
            .exec_vm(id, argv(&["echo", id]))
            .await
            .expect("re-adopted VM answers");
        assert_eq!(out.stdout.trim(), id);
    }

    // Kill one QEMU behind the engine's back: noticed, failed, cleaned.
    let victim = engine.describe_vm(&ids[0]).await.unwrap();
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(victim.pid.unwrap() as i32, libc::SIGKILL) };
    let failed = wait_until_async(Duration::from_secs(1), "the crash noticed", async || {
        let vm = engine.describe_vm(&ids[0]).await.ok()?;
        (vm.state == VmState::Failed).then_some(vm)
    })
    .await;
    assert!(failed.pid.is_none());
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("unexpectedly"),
        "{failed:?}"
    );
    assert!(
        !sandbox.path().join("run/vms").join(&ids[0]).exists(),
        "runtime files cleaned"
    );

    let other = engine.describe_vm(&ids[1]).await.unwrap();
    assert_eq!(other.state, VmState::Ready);
    engine.pause_vm(&ids[1]).await.expect("still controllable");
    engine.resume_vm(&ids[1]).await.expect("still controllable");
    let out = engine.exec_vm(&ids[1], argv(&["true"])).await.unwrap();
    assert_eq!(out.exit_code, 0);

    // And a failed VM can be started again.
    let restarted = engine.start_vm(&ids[0]).await.expect("restart after crash");
    assert_eq!(restarted.state, VmState::Ready);
}
