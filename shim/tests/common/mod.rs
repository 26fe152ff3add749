//! The fixture the shim's integration tests share: a kilnd with a small
//! template pool, a containerd (Debian's) whose shims find that kilnd, the
//! test image imported; `ctr` helpers and what kilnd says of a pod's VM.
//! [`Setup::with_cri`] is the same with containerd's CRI plugin on, for
//! tests that speak CRI as the kubelet does.
// Each test binary uses part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_testkit::containerd::{Containerd, CriConfig};
use kiln_testkit::oci::{busybox_layer, file, Entry, Layer, LayoutBuilder};
use kiln_testkit::{random_hex, require_root, run, wait_until, Daemon, Netns};
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

/// CRI's pause image (`sandbox_image`): one file nothing runs (a pod
/// sandbox runs nothing in its VM).
pub const PAUSE_IMAGE: &str = "localhost/kiln-pause:v1";

/// The pool the pods' VMs come from.
pub const POOL: &str = "containerd";

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

/// Where cargo put the shim (containerd finds it on its `PATH`).
fn shim_dir() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_containerd-shim-kiln-v1"))
        .parent()
        .unwrap()
}

/// kilnd with `extra_config` lines, running, with the template pool
/// [`POOL`] whose `[vm]` table gets `vm_lines` too.
fn kilnd_with_pool(extra_config: &str, vm_lines: &str) -> Daemon {
    let mut kilnd = Daemon::new(extra_config);
    // Small, one hot clone, container modules loaded in the template
    // (docs/pools.md): the quickest first output under TCG.
    kilnd.pool_file(
        POOL,
        &format!(
            "mode = \"template\"\nwarm = 1\nmax = 4\n[vm]\nvcpus = 1\nmemoryMiB = 256\n\
             cmdline = \"kiln.container_modules=boot\"\n{vm_lines}"
        ),
    );
    kilnd.spawn();
    kilnd
}

/// The app image's layers: busybox, then `/srv/app.txt`.
fn app_layers() -> [Layer; 2] {
    let app = Layer::gzip(&[Entry::Dir("srv/"), file("srv/app.txt", b"app layer\n")]);
    [busybox_layer(), app]
}

impl Setup {
    pub fn new() -> Option<Self> {
        if !require_root("containerd and kilnd run as root") {
            return None;
        }
        let kilnd = kilnd_with_pool("", "");
        let address = kilnd.address();
        let containerd = Containerd::start(&[shim_dir()], &[("KILN_ADDRESS", &address)]);
        let config = containerd.dir.path().join("kiln-shim.toml");
        // The lease backstop short enough to be seen working; the first
        // Acquire may wait for the template to be built.
        std::fs::write(
            &config,
            format!(
                "pool = \"{POOL}\"\nlease_ttl_sec = {LEASE_TTL_SEC}\n\
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
        setup.import(IMAGE, &app_layers());
        Some(setup)
    }

    /// The same with containerd's CRI plugin on (testkit
    /// `Containerd::start_cri`): containerd and its pod network inside a
    /// network namespace of the test's own, where kilnd also puts its
    /// bridge (`kk<random>`, `10.77.N.0/24`) and the pool's VMs their
    /// NICs. The shim's config names no pool: pods pick [`POOL`] with the
    /// annotation `io.kiln.pool` (CRI passes it on: `pod_annotations`).
    /// The app image and [`PAUSE_IMAGE`] are imported into `k8s.io`.
    pub fn with_cri() -> Option<Self> {
        if !require_root("containerd, CNI and kilnd run as root") {
            return None;
        }
        let netns = Netns::new();
        let third = u8::from_str_radix(&random_hex(1), 16).unwrap();
        let network = format!(
            "[network]\nbridge = \"kk{}\"\nsubnet = \"10.77.{third}.0/24\"\nnetns = \"{}\"\n",
            random_hex(4),
            netns.path().display()
        );
        let kilnd = kilnd_with_pool(&network, "network = { mode = \"bridge\" }\n");
        let address = kilnd.address();
        // Written before containerd starts: CRI's runtime options name it.
        let config = kilnd.kilnd.dir.path().join("kiln-shim.toml");
        std::fs::write(
            &config,
            format!("lease_ttl_sec = {LEASE_TTL_SEC}\nacquire_timeout_ms = 240000\n"),
        )
        .unwrap();
        let containerd = Containerd::start_cri(
            &[shim_dir()],
            &[("KILN_ADDRESS", &address)],
            netns,
            CriConfig {
                sandbox_image: PAUSE_IMAGE,
                shim_config: &config,
            },
        );
        let fifo_dir = containerd.dir.path().join("fifo");
        let setup = Self {
            kilnd,
            containerd,
            config,
            fifo_dir,
        };
        let pause = Layer::gzip(&[file("pause", b"a Kiln pod sandbox runs nothing\n")]);
        let layout = tempfile::tempdir().unwrap();
        let mut builder = LayoutBuilder::new(layout.path());
        let desc = builder.image_with_config("amd64", &[pause], json!({"Entrypoint": ["/pause"]}));
        builder.tag(desc, "v1");
        setup.import_layout(PAUSE_IMAGE, layout.path());
        setup.import(IMAGE, &app_layers());
        Some(setup)
    }

    /// Build an image of `layers`, tagged `reference`, and import it into
    /// containerd.
    pub fn import(&self, reference: &str, layers: &[Layer]) {
        let layout = kiln_testkit::oci::one_image(layers, "v1");
        self.import_layout(reference, layout.path());
    }

    /// Import image `v1` of the OCI layout at `layout` into containerd as
    /// `reference` (skopeo writes the docker archive `ctr` imports).
    pub fn import_layout(&self, reference: &str, layout: &Path) {
        let archive = self.containerd.dir.path().join("image.tar");
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker-archive:{}:{reference}", archive.display())));
        self.containerd.import(&archive);
        std::fs::remove_file(&archive).unwrap();
    }

    /// Wait until the pool has a hot VM: its template is built, so what
    /// follows is timed without that.
    pub fn wait_hot(&self) {
        wait_until(Duration::from_secs(300), "a hot VM in the pool", || {
            let pool = self.kilnd.ok("DescribePool", json!({ "name": POOL }))["pool"].clone();
            (pool["hot"].as_u64() >= Some(1)).then_some(()).ok_or(pool)
        });
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
