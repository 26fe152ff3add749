//! The fixture the shim's integration tests share: a kilnd with a small
//! template pool, a containerd (Debian's) whose shims find that kilnd, the
//! test image imported; `ctr` helpers and what kilnd says of a pod's VM.
// Each test binary uses part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_testkit::containerd::Containerd;
use kiln_testkit::oci::{busybox_layer, file, one_image, Entry, Layer};
use kiln_testkit::{require_root, run, wait_until, Daemon};
use serde_json::{json, Value};

pub const RUNTIME: &str = "io.containerd.kiln.v1";

/// A long-running main process that ends at once on SIGTERM (a container's
/// PID 1 has no default action for it: `sleep` alone would wait for the
/// SIGKILL that follows 10 s later).
pub const SLEEPER: [&str; 3] = [
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do /bin/busybox sleep 1; done",
];
pub const IMAGE: &str = "localhost/kiln-app:v1";

/// The shim's lease lifetime in these tests: short enough to see the
/// backstop work.
pub const LEASE_TTL_SEC: u64 = 10;

/// A kilnd with a small template pool, a containerd whose shim finds it,
/// the test image imported.
pub struct Setup {
    pub kilnd: Daemon,
    pub containerd: Containerd,
    /// The shim's config file.
    pub config: PathBuf,
    /// Where `ctr run` makes the task's FIFOs.
    pub fifo_dir: PathBuf,
}

impl Setup {
    pub fn new() -> Option<Self> {
        if !require_root("containerd and kilnd run as root") {
            return None;
        }
        let kilnd = Daemon::new("");
        let pools = kilnd.kilnd.dir.path().join("pools.d");
        std::fs::create_dir_all(&pools).unwrap();
        // Small, one hot clone, container modules loaded in the template
        // (docs/pools.md): the quickest first output under TCG.
        std::fs::write(
            pools.join("containerd.toml"),
            "mode = \"template\"\nwarm = 1\nmax = 4\n[vm]\nvcpus = 1\nmemoryMiB = 256\n\
             cmdline = \"kiln.container_modules=boot\"\n",
        )
        .unwrap();
        let mut kilnd = kilnd;
        kilnd.spawn();
        let shim_dir = Path::new(env!("CARGO_BIN_EXE_containerd-shim-kiln-v1"))
            .parent()
            .unwrap();
        let address = kilnd.address();
        let containerd = Containerd::start(&[shim_dir], &[("KILN_ADDRESS", &address)]);
        let app = Layer::gzip(&[Entry::Dir("srv/"), file("srv/app.txt", b"app layer\n")]);
        let config = containerd.dir.path().join("kiln-shim.toml");
        // The lease backstop short enough to be seen working; the first
        // Acquire may wait for the template to be built.
        std::fs::write(
            &config,
            format!(
                "pool = \"containerd\"\nlease_ttl_sec = {LEASE_TTL_SEC}\n\
                 acquire_timeout_ms = 240000\n"
            ),
        )
        .unwrap();
        let fifo_dir = containerd.dir.path().join("fifo");
        let setup = Self {
            kilnd,
            containerd,
            config,
            fifo_dir,
        };
        setup.import(IMAGE, &[busybox_layer(), app]);
        Some(setup)
    }

    /// Build an image of `layers`, tagged `reference`, and import it into
    /// containerd (skopeo writes the docker archive `ctr` imports).
    pub fn import(&self, reference: &str, layers: &[Layer]) {
        let layout = one_image(layers, "v1");
        let archive = self.containerd.dir.path().join("image.tar");
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("oci:{}:v1", layout.path().display()))
            .arg(format!("docker-archive:{}:{reference}", archive.display())));
        self.containerd.import(&archive);
        std::fs::remove_file(&archive).unwrap();
    }

    /// `ctr run` with the Kiln runtime and the shim config, then `args`.
    /// Its FIFOs in the fixture's dir: ctr leaves them behind when a shim
    /// or containerd is killed, and the default is the shared
    /// `/run/containerd/fifo`.
    pub fn run_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![
            "run",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            self.config.to_str().unwrap(),
            "--fifo-dir",
            self.fifo_dir.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        all
    }

    /// kilnd's VMs leased for pod `pod`.
    pub fn vms_of(&self, pod: &str) -> Vec<Value> {
        let vms = self.kilnd.ok("ListVMs", json!({}))["vms"].clone();
        vms.as_array()
            .unwrap()
            .iter()
            .filter(|vm| vm["labels"]["io.containerd.pod"] == pod)
            .cloned()
            .collect()
    }

    /// Wait until pod `pod` holds no VM; how long that took.
    pub fn wait_released(&self, pod: &str) -> Duration {
        self.wait_released_within(pod, Duration::from_secs(30))
    }

    /// [`Setup::wait_released`] with a deadline of `within`.
    pub fn wait_released_within(&self, pod: &str, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        wait_until(within, &format!("the VM of {pod} to go"), || {
            let vms = self.vms_of(pod);
            vms.is_empty().then_some(()).ok_or_else(|| {
                format!(
                    "{vms:?}\n{}\n{}",
                    self.containerd.log_tail(),
                    self.kilnd.log()
                )
            })
        });
        started.elapsed()
    }

    /// The names of the containers in VM `vm`.
    pub fn containers(&self, vm: &Value) -> Vec<String> {
        let id = vm["id"].as_str().unwrap();
        let listed = self.kilnd.ok("ListContainers", json!({ "id": id }))["containers"].clone();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Kill task `id` with SIGKILL and remove it and its container.
    pub fn remove(&self, id: &str) {
        let c = &self.containerd;
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(30), &format!("{id} to stop"), || {
            let listed = c.ctr_ok(&["task", "ls"]);
            let line = listed
                .lines()
                .find(|l| l.starts_with(&format!("{id} ")))
                .map(str::to_owned);
            line.filter(|l| l.contains("STOPPED")).ok_or(listed)
        });
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
}
