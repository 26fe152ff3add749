//! A real containerd (Debian's) of the test's own: its config, root, state
//! and sockets in a short temp dir, the CRI plugin off, shims found on the
//! `PATH` it is given. On drop containerd is stopped, the shims it started
//! killed (their sockets under `/run/containerd/s` removed), every mount
//! under the dir unmounted and the dir removed; also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::wait_until;

/// The containerd namespace the fixture's `ctr` works in.
pub const NAMESPACE: &str = "kiln-test";

/// The shim binary's name (containerd finds `io.containerd.kiln.v1` so).
pub const KILN_SHIM: &str = "containerd-shim-kiln-v1";

/// Where containerd's shims serve their sockets (a fixed path in
/// containerd-shim).
const SHIM_SOCKETS: &str = "/run/containerd/s";

/// A containerd process and its directory.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// containerd.toml, containerd.log, root/, state/, c.sock.
    pub dir: tempfile::TempDir,
    /// The shim sockets there were before it started.
    sockets_before: Vec<PathBuf>,
}

/// The shim sockets now.
fn shim_sockets() -> Vec<PathBuf> {
    std::fs::read_dir(SHIM_SOCKETS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

impl Containerd {
    /// Start containerd with `path_dirs` ahead of `PATH` (where its shims
    /// are) and `env` added to its environment (which its shims inherit);
    /// returns once `ctr version` answers.
    /// Needs root (check with [`crate::require_root`] first).
    pub fn start(path_dirs: &[&Path], env: &[(&str, &str)]) -> Self {
        // Short: unix socket paths inside it are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("kc-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \
             \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \
             \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        std::fs::write(dir.path().join("containerd.toml"), config).unwrap();
        let mut path: Vec<PathBuf> = path_dirs.iter().map(|p| p.to_path_buf()).collect();
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("containerd.toml"))
            .env("PATH", std::env::join_paths(path).unwrap())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is not installed: run scripts/setup-host.sh");
        let mut containerd = Self {
            child: Some(child),
            dir,
            sockets_before: shim_sockets(),
        };
        wait_until(Duration::from_secs(30), "containerd to serve", || {
            if let Some(status) = containerd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().unwrap())
            {
                panic!("containerd exited ({status}):\n{}", containerd.log());
            }
            let out = containerd.ctr(&["version"]).output().unwrap();
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        });
        containerd
    }

    /// SIGKILL containerd (its shims keep running; nothing runs their
    /// `delete` action). The drop still kills the shims and unmounts.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// `ctr` against this containerd, in [`NAMESPACE`], with `args`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.address())
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `ctr args` that must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args).output().unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr args` however it ends.
    pub fn ctr_output(&self, args: &[&str]) -> Output {
        self.ctr(args).output().unwrap()
    }

    /// containerd's log (with what its shims logged).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The last 60 lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Live processes of `binary` that serve this containerd (their
    /// command line names its address).
    pub fn shims(&self, binary: &str) -> Vec<u32> {
        let address = self.address().display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_binary = args
                .first()
                .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == binary));
            if is_binary && args.contains(&address) && crate::pid_alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGKILL the shims of this containerd, removing the sockets they
    /// served.
    pub fn kill_shims(&self, binary: &str) {
        for pid in self.shims(binary) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let socket = args
                .windows(2)
                .find(|w| w[0] == "-socket")
                .and_then(|w| w[1].strip_prefix("unix://").map(str::to_owned));
            if let Some(socket) = socket {
                let _ = std::fs::remove_file(socket);
            }
        }
    }

    /// Import the docker or OCI archive at `archive` (unpacked into the
    /// overlayfs snapshotter).
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }
}

/// Unmount every mount at or below `dir` (deepest first, lazily).
fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let c = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a valid NUL-terminated path and a flag.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with our child's pid and a signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let stopped = crate::try_wait_until(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().is_some()
            });
            if stopped.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_shims(KILN_SHIM);
        self.kill_shims("containerd-shim-runc-v2");
        // A shim killed while it shut down leaves its socket: remove the
        // new ones nobody serves any more.
        for socket in shim_sockets() {
            if !self.sockets_before.contains(&socket)
                && std::os::unix::net::UnixStream::connect(&socket).is_err()
            {
                let _ = std::fs::remove_file(&socket);
            }
        }
        unmount_below(self.dir.path());
    }
}
