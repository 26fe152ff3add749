//! The fixture every daemon test shares: the real kilnd binary on a temp
//! dir, SIGKILLed with its QEMU processes on drop (also when a test fails).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod varlink;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Where `make guest` put the guest image (override with `KILN_GUEST_DIR`).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("KILN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// `program` run as `uid` (and its group, no supplementary groups), or as
/// ourselves when `uid` is None.
pub fn command_as(uid: Option<u32>, program: &str) -> Command {
    match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
            c.arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A kilnd process and its temp dir.
pub struct Kilnd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Kilnd {
    /// A temp dir (reachable by other users, for the permission tests) with
    /// a kilnd.toml: state, runtime and varlink socket inside it, the
    /// built-in guest image, plus `extra_config` lines. Not started yet.
    pub fn new(extra_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-t")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\nguest_dir = \"{1}\"\nvarlink_socket = \"{0}/varlink\"\nboot_timeout_sec = 180\n{2}{3}",
            dir.path().display(),
            guest_dir().display(),
            // Never the host's /usr/lib, /etc or /run pools.
            if extra_config.contains("pool_dirs") {
                String::new()
            } else {
                format!("pool_dirs = [\"{}/pools.d\"]\n", dir.path().display())
            },
            extra_config
        );
        std::fs::write(dir.path().join("kilnd.toml"), config).unwrap();
        Self { dir, child: None }
    }

    /// Add lines to kilnd.toml (before [`Kilnd::spawn`]).
    pub fn append_config(&self, lines: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("kilnd.toml"))
            .unwrap();
        file.write_all(lines.as_bytes()).unwrap();
    }

    /// Start kilnd and wait until `ready` says it serves.
    pub fn spawn(&mut self, ready: impl Fn(&Self) -> bool) {
        self.spawn_with(Command::new(env!("CARGO_BIN_EXE_kilnd")), ready);
    }

    /// Like [`Kilnd::spawn`], with kilnd started by `command` (e.g. under
    /// `systemd-socket-activate`); `--config FILE` is appended.
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "kilnd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// The varlink address.
    pub fn varlink_address(&self) -> String {
        format!("unix:{}/varlink", self.dir.path().display())
    }

    /// kilnd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default()
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.sigkill();
        for entry in std::fs::read_dir(self.dir.path().join("run/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(entry.path().join("qemu.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill(2) with a pid and a signal number.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// The ```sh blocks of the `heading` section of docs/api.md, joined into
/// one bash script that stops at the first failure.
pub fn api_doc_script(heading: &str) -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md"))
        .unwrap();
    let section = doc
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/api.md has no section {heading:?}"))
        .split("\n## ")
        .next()
        .unwrap();
    let mut script = String::from("set -euo pipefail\n");
    for block in section.split("```sh\n").skip(1) {
        script.push_str(block.split("```").next().unwrap());
    }
    script
}

/// Run a bash script; panic with its output (and `context`) if it fails.
pub fn run_bash(script: &str, context: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "docs/api.md examples failed:\n{}\n{}\n{context}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `<root>/sys` and `<root>/dev` with render nodes 128 (vendor 0x10de) and
/// 129 (0x1002), as sysfs lays them out.
pub fn fake_gpu_tree(root: &Path) {
    for (index, pci, vendor, driver) in [
        (128, "0000:01:00.0", "0x10de", "nvidia"),
        (129, "0000:02:00.0", "0x1002", "amdgpu"),
    ] {
        let sys = root.join("sys");
        let pci_dir = sys.join("devices/pci0000:00").join(pci);
        let name = format!("renderD{index}");
        let drm = pci_dir.join("drm").join(&name);
        std::fs::create_dir_all(&drm).unwrap();
        std::fs::write(drm.join("dev"), format!("226:{index}\n")).unwrap();
        std::os::unix::fs::symlink(format!("../../../{pci}"), drm.join("device")).unwrap();
        std::fs::write(pci_dir.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(pci_dir.join("device"), "0x1234\n").unwrap();
        std::fs::write(pci_dir.join("numa_node"), "0\n").unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/drivers").join(driver)).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            pci_dir.join("driver"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../bus/pci", pci_dir.join("subsystem")).unwrap();
        std::fs::create_dir_all(sys.join("class/drm")).unwrap();
        std::os::unix::fs::symlink(
            format!("../../devices/pci0000:00/{pci}/drm/{name}"),
            sys.join("class/drm").join(&name),
        )
        .unwrap();
        let dri = root.join("dev/dri");
        std::fs::create_dir_all(&dri).unwrap();
        let node = std::ffi::CString::new(dri.join(&name).to_str().unwrap()).unwrap();
        // SAFETY: mknod with a valid C string; the test runs as root.
        let rc = unsafe {
            libc::mknod(
                node.as_ptr(),
                libc::S_IFCHR | 0o660,
                libc::makedev(226, index),
            )
        };
        assert_eq!(rc, 0, "mknod needs root");
    }
}
