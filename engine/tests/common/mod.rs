//! Fixtures for engine tests that boot real QEMU VMs (TCG here).
//!
//! Every fixture kills the QEMU processes it started and removes its temp
//! dir when dropped, also when the test panics.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_engine::accel::AccelChoice;
use kiln_engine::{Engine, EngineConfig, EngineHandle};

/// Where `make guest` put the guest image (override with `KILN_GUEST_DIR`).
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_GUEST_DIR") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("guest");
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initramfs").is_file(),
        "guest image missing in {}: run `make guest` first",
        dir.display()
    );
    dir
}

/// Engine config rooted in `root`.
pub fn config_in(root: &Path) -> EngineConfig {
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

/// A temp dir whose QEMU processes are killed on drop.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("kiln-t")
            .tempdir_in("/tmp")
            .unwrap();
        Self { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn config(&self) -> EngineConfig {
        config_in(self.path())
    }
    pub async fn engine(&self) -> (EngineHandle, tokio::task::JoinHandle<()>) {
        Engine::start(self.config()).await.expect("engine starts")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        kill_qemus_under(self.path());
    }
}

/// SIGKILL every QEMU whose pid file or record lives under `root`.
pub fn kill_qemus_under(root: &Path) {
    let vms = root.join("run/vms");
    for dir in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
        if let Ok(pid) = std::fs::read_to_string(dir.path().join("qemu.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Poll `check` until it returns `Some` or `timeout` passes.
pub async fn wait_until<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Is `pid` alive?
pub fn pid_alive(pid: u32) -> bool {
    // A zombie still answers kill(0); check /proc state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Exec a command and return the reply.
pub fn argv(args: &[&str]) -> kiln_agent_proto::ExecRequest {
    kiln_agent_proto::ExecRequest {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
