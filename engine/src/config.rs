//! Engine configuration: the `[engine]`-level keys of `kilnd.toml`.
//!
//! Every path is a key so kilnd runs unprivileged in a temp dir for tests.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::accel::AccelChoice;

/// Engine settings. Strict: unknown keys are an error, not a silent typo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Persistent state (VM records): `/var/lib/kiln`.
    pub state_dir: PathBuf,
    /// Runtime files (QMP/agent sockets, pid files): `/run/kiln`.
    pub runtime_dir: PathBuf,
    /// Directory holding the built-in guest image (`vmlinuz`, `initramfs`).
    pub guest_dir: PathBuf,
    /// QEMU binary, looked up in `PATH` unless absolute.
    pub qemu_binary: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// How long a boot may take until the agent answers.
    pub boot_timeout_sec: u64,
    /// Default grace period of a stop before QEMU is killed.
    pub stop_timeout_sec: u64,
    /// Deadline of every QMP command.
    pub qmp_timeout_ms: u64,
    /// TCG translation cache per VM in MiB (bounds TCG memory use).
    pub tcg_tb_size_mib: u32,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// The cgroup (relative to each hierarchy) VM cgroups go under, one
    /// per VM named by its id.
    pub cgroup_parent: String,
    /// A VM's default memory cap on top of its guest RAM, in MiB: QEMU's
    /// own memory (devices, TCG's translation cache, I/O buffers).
    pub memory_overhead_mib: u32,
    /// Pool definition directories, lowest precedence first (a later
    /// directory's `NAME.toml` replaces an earlier one's). Pools created or
    /// changed through the API are kept in `<state_dir>/pools.d`, which
    /// comes after all of these.
    pub pool_dirs: Vec<PathBuf>,
    /// Where GPU render nodes are looked up: `<root>/class/drm/renderD*`
    /// (tests point it at a tree they build).
    pub gpu_sysfs_root: PathBuf,
    /// Where render node device files are: `<root>/dri/renderD*`.
    pub gpu_dev_root: PathBuf,
    /// How many VMs may share one render node in `shared` mode.
    pub max_vms_per_gpu: u32,
    /// Most leases one caller (a uid, or a holder when the uid is not
    /// known) may hold at once; more is `QuotaExceeded`. 0: no limit.
    pub max_leases_per_caller: u32,
    /// A `containers-auth.json`-style file with registry credentials
    /// (`{"auths": {"host:port": {"auth": base64(user:password)}}}`), read
    /// at every pull; unset or missing: anonymous pulls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_auth_file: Option<PathBuf>,
    /// Registries (`host[:port]`) pulled from over plain HTTP; every other
    /// one over HTTPS.
    pub image_insecure_registries: Vec<String>,
    /// The largest image accepted, in MiB: the compressed layers as the
    /// manifest declares them, and the uncompressed tars as they are
    /// scanned (a tar bomb stops there).
    pub image_max_size_mib: u64,
    /// The mkfs.erofs binary (erofs-utils >= 1.7) that converts layers,
    /// looked up in `PATH` unless absolute.
    pub mkfs_erofs: PathBuf,
    /// The first of the uids (and gids) QEMUs run under when kilnd is root:
    /// the template builders get this one and every VM its own above it
    /// (`qemu_uid_count` in all). `0` runs QEMU as kilnd's own user. The
    /// gid of the same number is the group that may read templates,
    /// snapshots and image layers. The default sits in a range no
    /// distribution or systemd allocates from (docs/security.md).
    pub qemu_uid_base: u32,
    /// How many uids from `qemu_uid_base` are Kiln's (the most VMs at once
    /// plus one).
    pub qemu_uid_count: u32,
    /// With QEMUs under their own uids: each also sees a filesystem of its
    /// own (a mount namespace with `/usr`, its kernel, a few devices and
    /// kilnd's directories; docs/security.md). Needs `CAP_SYS_ADMIN`.
    pub qemu_mount_namespace: bool,
    /// Bridge networking (`[network]` table); without it, VMs with
    /// `network.mode = "bridge"` are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<kiln_net::NetConfig>,
    /// More bridges (`[[networks]]`, each a table like `[network]` with a
    /// bridge name and subnet of its own), chosen per VM or pool with
    /// `network.bridge`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<kiln_net::NetConfig>,
}

/// 0x7B000000: inside 1879048192–2147352575, which systemd's uid ranges
/// leave unused.
pub const DEFAULT_QEMU_UID_BASE: u32 = 0x7B00_0000;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/kiln".into(),
            runtime_dir: "/run/kiln".into(),
            guest_dir: "/usr/lib/kiln/guest".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            accel: AccelChoice::Auto,
            boot_timeout_sec: 60,
            stop_timeout_sec: 10,
            qmp_timeout_ms: 5_000,
            tcg_tb_size_mib: 32,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_parent: "kiln".into(),
            memory_overhead_mib: 256,
            pool_dirs: vec![
                "/usr/lib/kiln/pools.d".into(),
                "/etc/kiln/pools.d".into(),
                "/run/kiln/pools.d".into(),
            ],
            gpu_sysfs_root: "/sys".into(),
            gpu_dev_root: "/dev".into(),
            max_vms_per_gpu: 4,
            max_leases_per_caller: 0,
            image_auth_file: None,
            image_insecure_registries: Vec::new(),
            image_max_size_mib: 8192,
            mkfs_erofs: "mkfs.erofs".into(),
            qemu_uid_base: DEFAULT_QEMU_UID_BASE,
            qemu_uid_count: 65_536,
            qemu_mount_namespace: true,
            network: None,
            networks: Vec::new(),
        }
    }
}

impl EngineConfig {
    /// Boot deadline.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_sec)
    }
    /// QMP command deadline.
    pub fn qmp_timeout(&self) -> Duration {
        Duration::from_millis(self.qmp_timeout_ms)
    }
    /// Where VM records live.
    pub fn vm_records_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    /// Pools created or changed through the API (the top layer).
    pub fn api_pools_dir(&self) -> PathBuf {
        self.state_dir.join("pools.d")
    }
    /// Every pool definition layer, lowest precedence first.
    pub fn pool_layers(&self) -> Vec<PathBuf> {
        let mut layers = self.pool_dirs.clone();
        layers.push(self.api_pools_dir());
        layers
    }
    /// The GPU lease table.
    pub fn gpu_leases_file(&self) -> PathBuf {
        self.state_dir.join("gpu-leases.json")
    }
    /// Where templates of pool `pool` live.
    pub fn templates_dir(&self, pool: &str) -> PathBuf {
        self.state_dir.join("templates").join(pool)
    }
    /// Writable container disks of VM `id` (`storageDisk`).
    pub fn vm_disks_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("disks").join(id)
    }
    /// The image store's root (docs/images.md).
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    /// The image store's settings.
    pub fn image_store_config(&self) -> kiln_image::StoreConfig {
        kiln_image::StoreConfig {
            platform: kiln_image::Platform::host(),
            max_image_bytes: self.image_max_size_mib.saturating_mul(1 << 20),
            auth_file: self.image_auth_file.clone(),
            insecure_registries: self.image_insecure_registries.clone(),
            mkfs_erofs: self.mkfs_erofs.clone(),
        }
    }
    /// Runtime directory of one VM.
    pub fn vm_runtime_dir(&self, id: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(id)
    }
}
