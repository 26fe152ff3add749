//! A real containerd (Debian's) of the test's own: its config, root, state
//! and sockets in a short temp dir, shims found on the `PATH` it is given.
//! [`Containerd::start`] turns the CRI plugin off (tests drive it with
//! `ctr`); [`Containerd::start_cri`] turns it on, with the Kiln runtime,
//! CNI pod networking (Debian's `bridge` and `host-local` plugins) and
//! containerd itself inside a network namespace of the test's own, so the
//! pods' bridge and veths never touch the host's links.
//!
//! On drop containerd is stopped, the shims it started killed (their
//! sockets under `/run/containerd/s` removed), every mount under the dir
//! unmounted and the dir removed; with CRI also the pod network
//! namespaces it left under `/run/netns`, its CNI result cache entries and
//! its network namespace. Also when the test panics.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use crate::{random_hex, wait_until, Netns};

/// The containerd namespace the fixture's `ctr` works in.
pub const NAMESPACE: &str = "kiln-test";

/// The namespace CRI keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The shim binary's name (containerd finds `io.containerd.kiln.v1` so).
pub const KILN_SHIM: &str = "containerd-shim-kiln-v1";

/// The Kiln runtime's name in the CRI config: a pod's `runtime_handler`
/// (a `RuntimeClass`'s `handler`).
pub const CRI_HANDLER: &str = "kiln";

/// Where containerd's shims serve their sockets (a fixed path in
/// containerd-shim).
const SHIM_SOCKETS: &str = "/run/containerd/s";

/// Where CRI bind-mounts the pods' network namespaces
/// (`netns_mounts_under_state_dir = false`, the default).
const POD_NETNS_DIR: &str = "/run/netns";

/// Where libcni caches each attachment's result (containerd 1.6 does not
/// let CRI move it): `<network>-<sandbox id>-<ifname>`, also for the
/// `cni-loopback` network CRI adds itself.
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// Debian's CNI plugins (containernetworking-plugins).
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// What [`Containerd::start_cri`] needs besides the namespace.
#[derive(Debug, Clone, Copy)]
pub struct CriConfig<'a> {
    /// The pause image (`sandbox_image`); the test imports it into
    /// [`CRI_NAMESPACE`] before the first pod.
    pub sandbox_image: &'a str,
    /// The shim's config file (`ConfigPath` of the Kiln runtime's options).
    pub shim_config: &'a Path,
}

/// The pod network of a CRI containerd and the namespace it runs in.
#[derive(Debug)]
struct PodNetwork {
    /// Dropped last: deleting it takes the bridge and veths with it.
    netns: Netns,
    /// The CNI network's name (unique per fixture).
    name: String,
    /// The bridge the `bridge` plugin makes in `netns`.
    bridge: String,
    /// The pods' /24 (its first host is the bridge's address).
    subnet: String,
    /// `/run/netns/cni-*` before containerd started.
    netns_before: Vec<PathBuf>,
}

/// A containerd process and its directory.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// containerd.toml, containerd.log, root/, state/, c.sock (and with
    /// CRI: cni/ for the network config, cni-ipam/ for host-local).
    pub dir: tempfile::TempDir,
    /// The shim sockets there were before it started.
    sockets_before: Vec<PathBuf>,
    /// The namespace `ctr` works in.
    namespace: &'static str,
    /// With CRI: its pod network.
    network: Option<PodNetwork>,
}

/// The shim sockets now.
fn shim_sockets() -> Vec<PathBuf> {
    entries(Path::new(SHIM_SOCKETS))
}

/// The paths in `dir` (none when it cannot be read).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// CRI's pod network namespaces now (`/run/netns/cni-*`).
pub fn pod_netns() -> Vec<PathBuf> {
    entries(Path::new(POD_NETNS_DIR))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cni-"))
        })
        .collect()
}

/// libcni's cached results of CNI network `name` and of the loopback
/// network CRI adds to each of the pods whose sandbox dirs are under
/// CRI root `cri_root` (`<network>-<sandbox id>-<ifname>`).
fn cni_results(name: &str, cri_root: &Path) -> Vec<PathBuf> {
    let mut prefixes = vec![format!("{name}-")];
    for sandbox in entries(&cri_root.join("sandboxes")) {
        if let Some(id) = sandbox.file_name() {
            prefixes.push(format!("cni-loopback-{}-", id.to_string_lossy()));
        }
    }
    entries(Path::new(CNI_RESULTS))
        .into_iter()
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                prefixes.iter().any(|prefix| n.starts_with(prefix))
            })
        })
        .collect()
}

/// A short temp dir `/tmp/kc-*` (unix socket paths inside it are limited
/// to 108 bytes; `scripts/test.sh` cleans what a killed test left there).
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kc-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// The config lines both kinds share: root, state, sockets and the
/// managed `opt` dir in `dir`, debug logging, `disabled` plugins off.
fn base_config(dir: &Path, disabled: &[&str]) -> String {
    let d = dir.display();
    let disabled: Vec<String> = disabled.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
         disabled_plugins = [{}]\n\
         [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
         [debug]\n  level = \"debug\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n",
        disabled.join(", ")
    )
}

/// Snapshotters that cannot work here (or are not wanted).
const UNUSED_SNAPSHOTTERS: [&str; 4] = [
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
];

impl Containerd {
    /// Start containerd with `path_dirs` ahead of `PATH` (where its shims
    /// are) and `env` added to its environment (which its shims inherit),
    /// the CRI plugin off; returns once `ctr version` answers.
    /// Needs root (check with [`crate::require_root`] first).
    pub fn start(path_dirs: &[&Path], env: &[(&str, &str)]) -> Self {
        let dir = temp_dir();
        let mut disabled = vec!["io.containerd.grpc.v1.cri"];
        disabled.extend(UNUSED_SNAPSHOTTERS);
        let config = base_config(dir.path(), &disabled);
        Self::spawn(dir, &config, path_dirs, env, NAMESPACE, None)
    }

    /// Like [`Containerd::start`], with the CRI plugin on and containerd
    /// running inside `netns` (which the fixture owns from now on and
    /// deletes last). CRI's config: the Kiln runtime as handler
    /// [`CRI_HANDLER`] (`io.containerd.kiln.v1`, `ConfigPath` =
    /// `cri.shim_config`, pod annotations `io.kiln.*` passed on, as
    /// docs/kubernetes.md gives it), `cri.sandbox_image` as the pause
    /// image, overlayfs, no AppArmor profile (the host's is not ours to
    /// load). Its CNI network (`bridge` + `host-local` from
    /// `/usr/lib/cni`, conf and IPAM data in the dir) makes bridge
    /// `kcni<random>` with a /24 of `10.88.0.0/16` inside `netns`; CRI adds
    /// `loopback` itself. `ctr` works in [`CRI_NAMESPACE`]. Returns once
    /// CRI's plugin is loaded.
    pub fn start_cri(
        path_dirs: &[&Path],
        env: &[(&str, &str)],
        netns: Netns,
        cri: CriConfig<'_>,
    ) -> Self {
        let dir = temp_dir();
        let d = dir.path().display();
        let id = random_hex(4);
        let third = u8::from_str_radix(&random_hex(1), 16).unwrap();
        let network = PodNetwork {
            netns,
            name: format!("kiln-test-{id}"),
            bridge: format!("kcni{id}"),
            subnet: format!("10.88.{third}.0/24"),
            netns_before: pod_netns(),
        };
        let mut config = base_config(dir.path(), &UNUSED_SNAPSHOTTERS);
        // runc is listed too: a `runtimes` table replaces the built-in one,
        // and CRI refuses to load when its default runtime (runc) is
        // missing.
        let cri_table = "plugins.\"io.containerd.grpc.v1.cri\"";
        let runtime = format!("{cri_table}.containerd.runtimes.{CRI_HANDLER}");
        config.push_str(&format!(
            "[{cri_table}]\n  sandbox_image = \"{}\"\n  disable_apparmor = true\n\
             [{cri_table}.containerd]\n  snapshotter = \"overlayfs\"\n\
             [{cri_table}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [{runtime}]\n  runtime_type = \"io.containerd.kiln.v1\"\n\
               pod_annotations = [\"io.kiln.*\"]\n\
             [{runtime}.options]\n  ConfigPath = \"{}\"\n\
             [{cri_table}.cni]\n  bin_dir = \"{CNI_BIN_DIR}\"\n  conf_dir = \"{d}/cni\"\n",
            cri.sandbox_image,
            cri.shim_config.display(),
        ));
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network.name,
            "plugins": [{
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": network.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": format!("{d}/cni-ipam"),
                },
            }],
        });
        std::fs::create_dir(dir.path().join("cni")).unwrap();
        std::fs::write(
            dir.path().join("cni/10-kiln-test.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let containerd = Self::spawn(dir, &config, path_dirs, env, CRI_NAMESPACE, Some(network));
        let plugins = containerd.ctr_ok(&["plugins", "ls"]);
        let cri_ok = plugins.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.first() == Some(&"io.containerd.grpc.v1")
                && fields.get(1) == Some(&"cri")
                && fields.last() == Some(&"ok")
        });
        assert!(
            cri_ok,
            "CRI did not load:\n{plugins}\n{}",
            containerd.log_tail()
        );
        containerd
    }

    /// Start containerd with `config` in `dir` (in `network`'s namespace if
    /// given); returns once `ctr version` answers.
    fn spawn(
        dir: tempfile::TempDir,
        config: &str,
        path_dirs: &[&Path],
        env: &[(&str, &str)],
        namespace: &'static str,
        network: Option<PodNetwork>,
    ) -> Self {
        std::fs::write(dir.path().join("containerd.toml"), config).unwrap();
        let mut path: Vec<PathBuf> = path_dirs.iter().map(|p| p.to_path_buf()).collect();
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(dir.path().join("containerd.toml"))
            .env("PATH", std::env::join_paths(path).unwrap())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Open in the parent, entered in the child: setns, not `ip netns
        // exec`, which would also give containerd a mount namespace of its
        // own, and the pods' netns bind mounts (and the shims' rootfs
        // mounts) would not be seen by kilnd.
        let netns_file = network
            .as_ref()
            .map(|n| std::fs::File::open(n.netns.path()).unwrap());
        if let Some(file) = &netns_file {
            let fd = std::os::fd::AsRawFd::as_raw_fd(file);
            // SAFETY: between fork and exec the closure only calls
            // setns(2), which is async-signal-safe, on an fd the parent
            // keeps open until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .spawn()
            .expect("containerd is not installed: run scripts/setup-host.sh");
        drop(netns_file);
        let mut containerd = Self {
            child: Some(child),
            dir,
            sockets_before: shim_sockets(),
            namespace,
            network,
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

    /// Stop containerd with SIGTERM as its service manager would; how it
    /// exited (SIGKILLed, and the test failed, if not within 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("containerd is running");
        // SAFETY: kill(2) with our child's pid and a signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        match crate::try_wait_until(Duration::from_secs(10), || child.try_wait().unwrap()) {
            Ok(status) => status,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("containerd ignored SIGTERM for 10 s:\n{}", self.log_tail());
            }
        }
    }

    /// With CRI: the network namespace containerd runs in.
    pub fn netns(&self) -> Option<&Netns> {
        self.network.as_ref().map(|n| &n.netns)
    }

    /// With CRI: the pods' bridge (in [`Containerd::netns`]).
    pub fn pod_bridge(&self) -> Option<&str> {
        self.network.as_ref().map(|n| n.bridge.as_str())
    }

    /// With CRI: the pods' subnet (`10.88.N.0/24`).
    pub fn pod_subnet(&self) -> Option<&str> {
        self.network.as_ref().map(|n| n.subnet.as_str())
    }

    /// With CRI: libcni's cached results of this fixture's pods (their
    /// network's and their loopback's), while CRI has their sandboxes.
    pub fn cni_results(&self) -> Vec<PathBuf> {
        self.network
            .as_ref()
            .map(|n| cni_results(&n.name, &self.cri_root()))
            .unwrap_or_default()
    }

    /// CRI's own dir (its pods' `sandboxes/<id>`, `containers/<id>`).
    fn cri_root(&self) -> PathBuf {
        self.dir.path().join("root/io.containerd.grpc.v1.cri")
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

    /// `ctr` against this containerd, in [`NAMESPACE`] (with CRI:
    /// [`CRI_NAMESPACE`]), with `args`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.address())
            .args(["--namespace", self.namespace])
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
        unmount(&point);
    }
}

/// Unmount `point` lazily (whatever is mounted there).
fn unmount(point: &Path) {
    let c = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: umount2 with a valid NUL-terminated path and a flag.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
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
        if let Some(network) = self.network.take() {
            // What CRI did not undo (a pod never stopped): the pods'
            // namespaces made since the start, libcni's cache entries.
            for netns in pod_netns() {
                if !network.netns_before.contains(&netns) {
                    unmount(&netns);
                    let _ = std::fs::remove_file(&netns);
                }
            }
            for result in cni_results(&network.name, &self.cri_root()) {
                let _ = std::fs::remove_file(result);
            }
            // Last: the namespace, with the bridge and the veths in it.
            drop(network);
        }
    }
}
