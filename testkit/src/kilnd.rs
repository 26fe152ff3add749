//! The real kilnd binary on a sandbox of its own.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::{wait_until, FakeGpu, FakeHost, Sandbox};

/// The kilnd binary under test: `CARGO_BIN_EXE_kilnd` (cargo and nextest
/// set it for kilnd's integration tests), else the one next to the test
/// binary's `deps/` directory.
pub fn kilnd_exe() -> PathBuf {
    if let Some(exe) = std::env::var_os("CARGO_BIN_EXE_kilnd") {
        return exe.into();
    }
    let test = std::env::current_exe().unwrap();
    let beside = test
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("kilnd"));
    match beside {
        Some(exe) if exe.is_file() => exe,
        _ => panic!("no kilnd binary: run kilnd's tests with cargo (CARGO_BIN_EXE_kilnd)"),
    }
}

/// A kilnd process and its sandbox (state, runtime dir, varlink socket,
/// config and log inside it). On drop kilnd is SIGKILLed, then every QEMU
/// it started, then the sandbox is removed; also when the test panics.
#[derive(Debug)]
pub struct Kilnd {
    child: Option<Child>,
    /// kilnd.toml, kilnd.log, state/, run/, varlink.
    pub dir: Sandbox,
}

impl Kilnd {
    /// A sandbox (reachable by other users, for the permission tests) with
    /// a kilnd.toml: state, runtime and varlink socket inside it, the guest
    /// image of [`crate::guest_dir`], never the host's pool directories,
    /// plus `extra_config` lines. Not started yet.
    pub fn new(extra_config: &str) -> Self {
        let sandbox = Sandbox::new();
        let dir = sandbox.path();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pool_dirs = if extra_config.contains("pool_dirs") {
            String::new()
        } else {
            format!("pool_dirs = [\"{}/pools.d\"]\n", dir.display())
        };
        // The suite's generous boot deadline, unless the test sets its own.
        let boot_timeout = if extra_config.contains("boot_timeout_sec") {
            ""
        } else {
            "boot_timeout_sec = 180\n"
        };
        let config = format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\nguest_dir = \"{1}\"\n\
             varlink_socket = \"{0}/varlink\"\n{boot_timeout}\
             cgroup_parent = \"{2}\"\n{pool_dirs}{extra_config}",
            dir.display(),
            crate::guest_dir().display(),
            crate::process::TEST_CGROUP_PARENT,
        );
        std::fs::write(dir.join("kilnd.toml"), config).unwrap();
        Self {
            child: None,
            dir: sandbox,
        }
    }

    /// Add lines to kilnd.toml (before [`Kilnd::spawn`]).
    pub fn append_config(&self, lines: &str) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("kilnd.toml"))
            .unwrap();
        file.write_all(lines.as_bytes()).unwrap();
    }

    /// Two GPUs for kilnd's inventory (before [`Kilnd::spawn`]): a sysfs
    /// and /dev tree in `gpu-tree/` with render nodes renderD128 (NVIDIA,
    /// 0000:01:00.0) and renderD129 (AMD, 0000:02:00.0), made with mknod.
    pub fn add_fake_gpus(&self) {
        let host = FakeHost::in_dir(&self.dir.path().join("gpu-tree"));
        host.add(&FakeGpu::nvidia(128, "0000:01:00.0"));
        host.add(&FakeGpu::amd(129, "0000:02:00.0"));
        self.append_config(&format!(
            "gpu_sysfs_root = \"{}\"\ngpu_dev_root = \"{}\"\n",
            host.sysfs().display(),
            host.dev().display()
        ));
    }

    /// Start kilnd and wait until `ready` says it serves.
    pub fn spawn(&mut self, ready: impl Fn(&Self) -> bool) {
        self.spawn_with(Command::new(kilnd_exe()), ready);
    }

    /// Like [`Kilnd::spawn`], with kilnd started by `command` (e.g. under
    /// `systemd-socket-activate` or `ip netns exec`, which exec it);
    /// `--config FILE` is appended.
    pub fn spawn_with(&mut self, mut command: Command, ready: impl Fn(&Self) -> bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kilnd.log"))
            .unwrap();
        let child = command
            .arg("--config")
            .arg(self.dir.path().join("kilnd.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until(Duration::from_secs(30), "kilnd to come up", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("kilnd exited ({status}) before it served:\n{}", self.log());
            }
            ready(self).then_some(()).ok_or_else(|| self.log())
        });
    }

    /// The running kilnd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Take the running kilnd out of the fixture (to signal it yourself).
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// SIGKILL kilnd (its VMs keep running).
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// The varlink address (`unix:<sandbox>/varlink`).
    pub fn varlink_address(&self) -> String {
        format!("unix:{}/varlink", self.dir.path().display())
    }

    /// Live QEMU processes whose pid files are under this kilnd's runtime
    /// dir.
    pub fn live_qemus(&self) -> std::collections::HashSet<u32> {
        self.live_qemus_by_vm().into_values().collect()
    }

    /// The same, by the VM id their runtime dir (`run/vms/<id>`) is named
    /// after: id -> pid.
    pub fn live_qemus_by_vm(&self) -> std::collections::BTreeMap<String, u32> {
        let mut pids = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(self.dir.path().join("run/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(entry.path().join("qemu.pid")) else {
                continue;
            };
            let Ok(pid) = text.trim().parse::<u32>() else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                pids.insert(entry.file_name().to_string_lossy().into_owned(), pid);
            }
        }
        pids
    }

    /// kilnd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default()
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        // kilnd first, so it does not see its VMs die; then the sandbox
        // kills the QEMUs and goes.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
