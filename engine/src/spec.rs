//! What a caller may ask for when creating a VM, and the limits it is held to.
//!
//! [`VmSpec`] is the one serde type for pool files, varlink bodies and D-Bus
//! `a{sv}` (camelCase fields, unknown fields rejected). [`VmSpec::resolve`]
//! validates it against [`Limits`] and fills defaults, giving the
//! [`ResolvedSpec`] that is persisted and launched.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use kiln_gpu::GpuRequest;
use kiln_net::Protocol;

use crate::accel::Accel;
use crate::container::{ContainerSpec, ContainerSpecError, RestartPolicy, MAIN_CONTAINER};

/// A VM as requested: everything optional has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// Virtual CPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Guest RAM in MiB (default 128).
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Kernel image; defaults to the built-in guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initramfs; defaults to the built-in guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to Kiln's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Accelerator for this VM; defaults to the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// Host GPU render nodes to lease: a count, or `{count, vendor?, node?,
    /// mode?}`. Such VMs use the `q35` machine and the GPU guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuRequest>,
    /// Display device without a host GPU: `none` (default) or `virtio-gpu`
    /// (2D; the guest gets a DRM device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<Display>,
    /// Networking: `{mode: "none"|"bridge", address?, forwards?}`
    /// (default none: no NIC at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// An OCI image (a stored reference or digest) the VM runs as its
    /// container `main` (docs/images.md). The fields below need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Replaces the image's `Cmd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's `Entrypoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` entries merged over the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// The container's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The container's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// MiB of writable root (a guest tmpfs).
    #[serde(
        default,
        rename = "storageMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub storage_mib: Option<u64>,
    /// The writable root is an ext4 disk of `storageMiB` kept with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_disk: Option<bool>,
    /// What happens when the container exits: `no` (default: the VM
    /// stops), `on-failure`, `always` (it is started again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// What the VM's QEMU may use of the host (its cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceLimits>,
    /// What the VM boots: `kiln` (default: Kiln's guest, which runs
    /// `image` as a container) or `image` (the image is a whole OS: its
    /// own kernel, its layers as the root, its `/sbin/init` as PID 1, with
    /// Kiln's agent beside it; cold boots only, see docs/images.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSource>,
}

/// What a VM boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BootSource {
    /// Kiln's guest kernel and initramfs (the agent is PID 1).
    #[default]
    Kiln,
    /// The image's own kernel and init (an "OS image").
    Image,
}

impl BootSource {
    /// Whether this is the default.
    pub fn is_kiln(&self) -> bool {
        *self == Self::Kiln
    }
}

/// The smallest memory cap: QEMU itself needs about this much to boot.
pub const MIN_MEMORY_CAP_MIB: u32 = 128;

/// A VM's share of the host: enforced on its QEMU's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceLimits {
    /// Memory cap of the whole QEMU process in MiB: guest RAM plus QEMU's
    /// own (default: `memoryMiB` + the daemon's `memory_overhead_mib`), at
    /// least 128. Below the guest's RAM + QEMU's own it overcommits: a
    /// guest that uses all its RAM gets its QEMU OOM-killed.
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// CPU quota in thousandths of a core (500: half a core), 10 to
    /// `vcpus` × 1000; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milli_cpus: Option<u32>,
    /// CPU weight against other VMs, 1 to 10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// IO weight, 1 to 10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
}

impl ResourceLimits {
    fn check(&self, vcpus: u32) -> Result<(), SpecError> {
        let bad = |what: String| Err(SpecError::Limits(what));
        if self.memory_mib.is_some_and(|m| m < MIN_MEMORY_CAP_MIB) {
            return bad(format!("memoryMiB must be at least {MIN_MEMORY_CAP_MIB}"));
        }
        if self
            .milli_cpus
            .is_some_and(|m| m < 10 || m > vcpus.saturating_mul(1000))
        {
            return bad(format!("milliCpus must be 10 to {}", vcpus * 1000));
        }
        for (name, weight) in [("cpuWeight", self.cpu_weight), ("ioWeight", self.io_weight)] {
            if weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
                return bad(format!("{name} must be 1 to 10000"));
            }
        }
        Ok(())
    }
}

/// Most port forwards one VM may have.
pub const MAX_FORWARDS: usize = 64;

/// Most PCIe slots for NICs attached at runtime. Each is a
/// `pcie-root-port` on q35 (a slot of its own, so a NIC can be unplugged
/// alone); eight keeps the boot cost small and the NIC index one digit.
pub const MAX_HOTPLUG_SLOTS: u8 = 8;

/// A VM's network as requested (and, for `bridge`, as persisted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// `none` (no NIC), `bridge` (one NIC on the daemon's bridge) or
    /// `netns` (one NIC whose TAP lives in a caller's namespace).
    #[serde(default)]
    pub mode: NetMode,
    /// `bridge`: a fixed address in the daemon's subnet (default: the next
    /// free one). `netns`: the guest's address, if the caller gives one.
    /// Not for pool VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// `bridge`: which of kilnd's bridges (a `[[networks]]` entry's
    /// `bridge`); default: the `[network]` table's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// `netns`: the network namespace (a name under `/run/netns`, as `ip
    /// netns add` makes) to create the VM's TAP in. Its owner wires the
    /// TAP; Kiln adds no bridge, address or rules there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// `netns`: prefix length of `address` (required with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<u8>,
    /// `netns`: the guest's default gateway (needs `address`, in its
    /// subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Host ports forwarded to the VM. Not for pool VMs (a host port can
    /// reach one VM only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<ForwardSpec>,
    /// Empty PCIe slots for NICs attached while the VM runs (`AttachNIC`),
    /// 0 to [`MAX_HOTPLUG_SLOTS`]. More than 0 puts the VM on `q35`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hotplug_slots: u8,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Network mode of a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// No NIC.
    #[default]
    None,
    /// One virtio-net NIC whose TAP is on the daemon's bridge.
    Bridge,
    /// One virtio-net NIC whose TAP is created in a network namespace the
    /// caller names (CNI-style: an orchestrator owns the namespace).
    Netns,
}

/// Where the namespaces of `netns` mode are (`ip netns` keeps them here).
pub const NETNS_DIR: &str = "/run/netns";

/// One port forward: `hostPort` on the host → `vmPort` in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardSpec {
    /// Port on the host (every local address of kilnd's namespace).
    pub host_port: u16,
    /// Port in the VM.
    pub vm_port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

impl NetworkSpec {
    /// Checks what can be checked without the daemon's network: ports and
    /// duplicates. Returns the spec to persist (`None` for mode `none`).
    fn resolve(&self) -> Result<Option<NetworkSpec>, SpecError> {
        let bad = |m: &str| Err(SpecError::Network(m.to_owned()));
        let netns_fields =
            self.netns.is_some() || self.prefix_length.is_some() || self.gateway.is_some();
        if self.bridge.is_some() && self.mode != NetMode::Bridge {
            return bad("bridge needs mode \"bridge\"");
        }
        match self.mode {
            NetMode::None => {
                if self.address.is_some()
                    || !self.forwards.is_empty()
                    || self.hotplug_slots > 0
                    || netns_fields
                {
                    return bad("mode \"none\" takes no other network fields");
                }
                return Ok(None);
            }
            NetMode::Netns => return self.resolve_netns().map(Some),
            NetMode::Bridge if netns_fields => {
                return bad("netns, prefixLength and gateway need mode \"netns\"");
            }
            NetMode::Bridge => {}
        }
        if self.hotplug_slots > MAX_HOTPLUG_SLOTS {
            return Err(SpecError::Network(format!(
                "hotplugSlots must be 0 to {MAX_HOTPLUG_SLOTS}"
            )));
        }
        if self.forwards.len() > MAX_FORWARDS {
            return Err(SpecError::Network(format!(
                "at most {MAX_FORWARDS} forwards"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.forwards {
            if f.host_port == 0 || f.vm_port == 0 {
                return bad("forward ports must be 1 to 65535");
            }
            if !seen.insert((f.protocol, f.host_port)) {
                return Err(SpecError::Network(format!(
                    "host port {}/{} is forwarded twice",
                    f.host_port, f.protocol
                )));
            }
        }
        Ok(Some(self.clone()))
    }

    fn resolve_netns(&self) -> Result<NetworkSpec, SpecError> {
        let bad = |m: String| Err(SpecError::Network(m));
        if !self.forwards.is_empty() || self.hotplug_slots > 0 {
            return bad("forwards and hotplugSlots need mode \"bridge\"".into());
        }
        let Some(name) = &self.netns else {
            return bad("mode \"netns\" needs netns: the name of a namespace in /run/netns".into());
        };
        if validate_name(name).is_err() {
            return bad(format!(
                "netns {name:?} is not a namespace name (1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -)"
            ));
        }
        match (self.address, self.prefix_length) {
            (Some(_), Some(1..=32)) | (None, None) => {}
            (Some(_), _) => return bad("address needs prefixLength 1 to 32".into()),
            (None, Some(_)) => return bad("prefixLength needs address".into()),
        }
        if let Some(gateway) = self.gateway {
            let (Some(address), Some(prefix)) = (self.address, self.prefix_length) else {
                return bad("gateway needs address".into());
            };
            let mask = u32::MAX << (32 - u32::from(prefix));
            if gateway == address || u32::from(gateway) & mask != u32::from(address) & mask {
                return bad(format!(
                    "gateway {gateway} must be another address of {address}/{prefix}"
                ));
            }
        }
        Ok(self.clone())
    }

    /// The namespace file of `netns` mode.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_ref().map(|n| Path::new(NETNS_DIR).join(n))
    }
}

/// A display device that needs no host GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Display {
    /// No display device.
    #[default]
    None,
    /// 2D `virtio-gpu-pci`.
    VirtioGpu,
}

/// A validated spec with every default filled in: what is persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSpec {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Extra kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Accelerator.
    pub accel: Accel,
    /// GPU render nodes leased at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuRequest>,
    /// Display device.
    #[serde(default)]
    pub display: Display,
    /// Bridge networking (`None`: no NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// The container the VM runs (from `image` and the process fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Its cgroup's limits as asked (defaults are the daemon's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceLimits>,
    /// What it boots. For `image`, `kernel` and `initrd` are the image's
    /// kernel and an initramfs made for this VM once the image is
    /// resolved.
    #[serde(default, skip_serializing_if = "BootSource::is_kiln")]
    pub boot: BootSource,
}

impl ResolvedSpec {
    /// Whether the VM needs the GPU guest image (and a PCI machine).
    pub fn needs_gpu_machine(&self) -> bool {
        self.gpus.is_some() || self.display != Display::None
    }

    /// Empty PCIe slots for runtime NICs.
    pub fn hotplug_slots(&self) -> u8 {
        self.network.as_ref().map_or(0, |n| n.hotplug_slots)
    }

    /// Whether the VM needs `q35` rather than `microvm`: GPUs and displays
    /// are PCI devices, and hot-plug needs PCIe root ports (microvm has
    /// neither ACPI nor native PCIe hot-plug).
    pub fn needs_pci_machine(&self) -> bool {
        self.needs_gpu_machine() || self.hotplug_slots() > 0
    }
}

/// Bounds every request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// Smallest guest RAM that boots the built-in image.
    pub min_memory_mib: u32,
    /// Most guest RAM one VM may have (default: host RAM).
    pub max_memory_mib: u32,
}

pub use crate::name::MAX_NAME_LEN;
/// Longest extra kernel command line (the kernel's own limit is 2048 with
/// Kiln's part included).
pub const MAX_CMDLINE_LEN: usize = 1024;
/// Longest path accepted for kernel/initrd.
pub const MAX_PATH_LEN: usize = 1024;

/// Why a spec or a name was refused. Every variant maps to the wire error
/// `InvalidSpec` (or `InvalidName`), with this text as its message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// Name empty, too long or with characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid name {0:?}: 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -, not starting with . or -")]
    InvalidName(String),
    /// vCPU count outside `1..=max`.
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u32, max: u32 },
    /// Memory outside `min..=max`.
    #[error("memoryMiB must be between {min} and {max}, got {got}")]
    Memory { got: u32, min: u32, max: u32 },
    /// Kernel or initrd missing or not a regular file.
    #[error("{what} {path:?} is not a readable file")]
    MissingFile { what: &'static str, path: PathBuf },
    /// Path too long, not absolute or with `..`.
    #[error("{what} path must be absolute, without .., and at most {MAX_PATH_LEN} bytes")]
    BadPath { what: &'static str },
    /// Command line too long or with control characters.
    #[error("cmdline must be at most {MAX_CMDLINE_LEN} printable characters")]
    Cmdline,
    /// The resource limits are not acceptable.
    #[error("limits: {0}")]
    Limits(String),
    /// The GPU request is not acceptable.
    #[error("gpus: {0}")]
    Gpus(String),
    /// The network request is not acceptable.
    #[error("network: {0}")]
    Network(String),
    /// The container (image and process fields) is not acceptable.
    #[error("container: {0}")]
    Container(String),
    /// `boot` asks for something that cannot be.
    #[error("{0}")]
    Boot(String),
}

impl From<ContainerSpecError> for SpecError {
    fn from(e: ContainerSpecError) -> Self {
        Self::Container(e.0)
    }
}

/// Check a VM or pool name.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    if crate::name::is_valid_name(name) {
        Ok(())
    } else {
        Err(SpecError::InvalidName(
            name.chars().take(MAX_NAME_LEN + 8).collect(),
        ))
    }
}

/// Defaults that come from the daemon rather than the caller.
#[derive(Debug, Clone)]
pub struct SpecDefaults {
    /// Built-in guest kernel.
    pub kernel: PathBuf,
    /// Built-in guest initramfs.
    pub initrd: PathBuf,
    /// Daemon accelerator (already auto-detected).
    pub accel: Accel,
    /// Kernel of GPU and display VMs (the generic kernel has DRM; the
    /// cloud kernel has none).
    pub gpu_kernel: PathBuf,
    /// Initramfs of GPU and display VMs.
    pub gpu_initrd: PathBuf,
}

impl VmSpec {
    /// Validate against `limits` and fill defaults.
    pub fn resolve(
        &self,
        defaults: &SpecDefaults,
        limits: &Limits,
    ) -> Result<ResolvedSpec, SpecError> {
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > limits.max_vcpus {
            return Err(SpecError::Vcpus {
                got: vcpus,
                max: limits.max_vcpus,
            });
        }
        let memory_mib = self.memory_mib.unwrap_or(128);
        if memory_mib < limits.min_memory_mib || memory_mib > limits.max_memory_mib {
            return Err(SpecError::Memory {
                got: memory_mib,
                min: limits.min_memory_mib,
                max: limits.max_memory_mib,
            });
        }
        if let Some(gpus) = &self.gpus {
            gpus.validate()
                .map_err(|e| SpecError::Gpus(e.to_string()))?;
            // QEMU takes one render node per VM (one egl-headless display).
            if gpus.count > kiln_gpu::qemu::QEMU_MAX_RENDER_NODES as u32 {
                return Err(SpecError::Gpus(format!(
                    "at most {} render node per VM",
                    kiln_gpu::qemu::QEMU_MAX_RENDER_NODES
                )));
            }
        }
        let gpu_machine = self.gpus.is_some() || self.display.unwrap_or_default() != Display::None;
        let (default_kernel, default_initrd) = if gpu_machine {
            (&defaults.gpu_kernel, &defaults.gpu_initrd)
        } else {
            (&defaults.kernel, &defaults.initrd)
        };
        let kernel = match &self.kernel {
            Some(path) => checked_file("kernel", callers_path("kernel", path)?)?,
            None => checked_file("kernel", default_kernel)?,
        };
        let initrd = match &self.initrd {
            Some(path) => checked_file("initrd", callers_path("initrd", path)?)?,
            None => checked_file("initrd", default_initrd)?,
        };
        let cmdline = self.cmdline.clone().unwrap_or_default();
        if cmdline.len() > MAX_CMDLINE_LEN || cmdline.chars().any(char::is_control) {
            return Err(SpecError::Cmdline);
        }
        let boot = self.boot.unwrap_or_default();
        if boot == BootSource::Image {
            self.check_os_boot()?;
        }
        let container = self.container()?;
        if let Some(limits) = &self.limits {
            limits.check(vcpus)?;
        }
        Ok(ResolvedSpec {
            vcpus,
            memory_mib,
            kernel,
            initrd,
            cmdline,
            accel: self.accel.unwrap_or(defaults.accel),
            gpus: self.gpus.clone(),
            display: self.display.unwrap_or_default(),
            network: match &self.network {
                Some(n) => n.resolve()?,
                None => None,
            },
            container,
            limits: self.limits,
            boot,
        })
    }

    /// What `boot: image` rules out: the kernel and initramfs are the
    /// image's, GPUs need Kiln's GPU guest, and the OS's init is the VM
    /// (it has no restart policy, user or working directory of its own).
    fn check_os_boot(&self) -> Result<(), SpecError> {
        let refuse = |what: &str| Err(SpecError::Boot(what.to_owned()));
        if self.image.is_none() {
            return refuse("boot: image needs image");
        }
        if self.kernel.is_some() || self.initrd.is_some() {
            return refuse(
                "boot: image boots the image's own kernel: kernel and initrd cannot be given",
            );
        }
        if self.gpus.is_some() || self.display.is_some_and(|d| d != Display::None) {
            return refuse("boot: image cannot have gpus or a display");
        }
        if self.restart_policy.is_some() || self.workdir.is_some() || self.user.is_some() {
            return refuse("boot: image runs the image's init as root in /: restartPolicy, workdir and user do not apply");
        }
        Ok(())
    }

    /// The container `image` and the process fields ask for.
    fn container(&self) -> Result<Option<ContainerSpec>, SpecError> {
        let Some(image) = &self.image else {
            let process_fields = self.command.is_some()
                || self.entrypoint.is_some()
                || self.env.is_some()
                || self.workdir.is_some()
                || self.user.is_some()
                || self.storage_mib.is_some()
                || self.storage_disk.is_some()
                || self.restart_policy.is_some();
            return match process_fields {
                true => Err(SpecError::Container(
                    "command, entrypoint, env, workdir, user, storageMiB, storageDisk and restartPolicy need image"
                        .into(),
                )),
                false => Ok(None),
            };
        };
        let spec = ContainerSpec {
            name: MAIN_CONTAINER.to_owned(),
            image: image.clone(),
            command: self.command.clone(),
            entrypoint: self.entrypoint.clone(),
            env: self.env.clone().unwrap_or_default(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            storage_mib: self.storage_mib,
            storage_disk: self.storage_disk.unwrap_or(false),
            restart_policy: self.restart_policy.unwrap_or_default(),
            terminal: None,
            stdin: false,
        };
        spec.validate()?;
        Ok(Some(spec))
    }
}

/// A path a caller gave: no `..` (what it names is what it looks like).
fn callers_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a Path, SpecError> {
    match path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        true => Err(SpecError::BadPath { what }),
        false => Ok(path),
    }
}

fn checked_file(what: &'static str, path: &Path) -> Result<PathBuf, SpecError> {
    if !path.is_absolute() || path.as_os_str().len() > MAX_PATH_LEN {
        return Err(SpecError::BadPath { what });
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(path.to_path_buf()),
        _ => Err(SpecError::MissingFile {
            what,
            path: path.to_path_buf(),
        }),
    }
}

/// Total host RAM in MiB, from `/proc/meminfo` (None if unreadable).
pub fn host_memory_mib() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    u32::try_from(kib / 1024).ok()
}

impl Limits {
    /// Limits for this host: at most the host's RAM per VM, 64 vCPUs.
    pub fn for_host() -> Self {
        Self {
            max_vcpus: 64,
            min_memory_mib: 32,
            max_memory_mib: host_memory_mib().unwrap_or(4096),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(dir: &Path) -> SpecDefaults {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs");
        std::fs::write(&kernel, b"k").expect("write");
        std::fs::write(&initrd, b"i").expect("write");
        SpecDefaults {
            gpu_kernel: kernel.clone(),
            gpu_initrd: initrd.clone(),
            kernel,
            initrd,
            accel: Accel::Tcg,
        }
    }

    fn limits() -> Limits {
        Limits {
            max_vcpus: 8,
            min_memory_mib: 32,
            max_memory_mib: 1024,
        }
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = defaults(dir.path());
        let spec = VmSpec::default().resolve(&d, &limits()).expect("valid");
        assert_eq!((spec.vcpus, spec.memory_mib), (1, 128));
        assert_eq!(spec.kernel, d.kernel);
        assert_eq!(spec.accel, Accel::Tcg);
    }

    #[test]
    fn boot_image_needs_an_image_and_rules_out_kiln_only_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = defaults(dir.path());
        let os = VmSpec {
            image: Some("os".into()),
            boot: Some(BootSource::Image),
            env: Some(vec!["A=1".into()]),
            ..VmSpec::default()
        };
        let resolved = os.resolve(&d, &limits()).expect("valid");
        assert_eq!(resolved.boot, BootSource::Image);
        assert!(resolved.container.is_some());
        let json = serde_json::to_value(&resolved).expect("json");
        assert_eq!(json["boot"], "image");
        let kiln = VmSpec::default().resolve(&d, &limits()).expect("valid");
        let json = serde_json::to_value(&kiln).expect("json");
        assert!(
            json.get("boot").is_none(),
            "the default is not written: {json}"
        );

        for bad in [
            VmSpec {
                image: None,
                ..os.clone()
            },
            VmSpec {
                kernel: Some(d.kernel.clone()),
                ..os.clone()
            },
            VmSpec {
                display: Some(Display::VirtioGpu),
                ..os.clone()
            },
            VmSpec {
                restart_policy: Some(RestartPolicy::Always),
                ..os.clone()
            },
            VmSpec {
                user: Some("app".into()),
                ..os.clone()
            },
        ] {
            assert!(
                matches!(bad.resolve(&d, &limits()), Err(SpecError::Boot(_))),
                "{bad:?}"
            );
        }
        assert!(serde_json::from_str::<VmSpec>(r#"{"boot":"floppy"}"#).is_err());
    }

    #[test]
    fn out_of_range_values_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = defaults(dir.path());
        let zero_cpus = VmSpec {
            vcpus: Some(0),
            ..VmSpec::default()
        };
        assert_eq!(
            zero_cpus.resolve(&d, &limits()),
            Err(SpecError::Vcpus { got: 0, max: 8 })
        );
        let huge = VmSpec {
            memory_mib: Some(1 << 30),
            ..VmSpec::default()
        };
        assert!(matches!(
            huge.resolve(&d, &limits()),
            Err(SpecError::Memory { .. })
        ));
        let missing = VmSpec {
            kernel: Some("/nonexistent/vmlinuz".into()),
            ..VmSpec::default()
        };
        assert!(matches!(
            missing.resolve(&d, &limits()),
            Err(SpecError::MissingFile { what: "kernel", .. })
        ));
        let relative = VmSpec {
            initrd: Some("initramfs".into()),
            ..VmSpec::default()
        };
        assert!(matches!(
            relative.resolve(&d, &limits()),
            Err(SpecError::BadPath { .. })
        ));
        let control = VmSpec {
            cmdline: Some("a\nb".into()),
            ..VmSpec::default()
        };
        assert_eq!(control.resolve(&d, &limits()), Err(SpecError::Cmdline));
    }

    #[test]
    fn hotplug_slots_need_bridge_mode_and_a_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = defaults(dir.path());
        let with = |mode: NetMode, slots: u8| VmSpec {
            network: Some(NetworkSpec {
                mode,
                hotplug_slots: slots,
                ..NetworkSpec::default()
            }),
            ..VmSpec::default()
        };
        let ok = with(NetMode::Bridge, 2)
            .resolve(&d, &limits())
            .expect("valid");
        assert!(ok.needs_pci_machine() && !ok.needs_gpu_machine());
        assert_eq!(ok.hotplug_slots(), 2);
        assert!(matches!(
            with(NetMode::Bridge, MAX_HOTPLUG_SLOTS + 1).resolve(&d, &limits()),
            Err(SpecError::Network(_))
        ));
        assert!(matches!(
            with(NetMode::None, 1).resolve(&d, &limits()),
            Err(SpecError::Network(_))
        ));
        // Zero is not written, so specs from before the field hash alike.
        let plain = with(NetMode::Bridge, 0);
        assert!(!serde_json::to_string(&plain)
            .expect("json")
            .contains("hotplug"));
        let parsed: VmSpec =
            serde_json::from_str(r#"{"network": {"mode": "bridge", "hotplugSlots": 3}}"#)
                .expect("parse");
        assert_eq!(parsed.network.map(|n| n.hotplug_slots), Some(3));
    }

    #[test]
    fn netns_mode_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = defaults(dir.path());
        let resolve = |json: &str| {
            let network: NetworkSpec = serde_json::from_str(json).expect("parse");
            VmSpec {
                network: Some(network),
                ..VmSpec::default()
            }
            .resolve(&d, &limits())
        };
        let ok = resolve(
            r#"{"mode": "netns", "netns": "pod-1", "address": "10.1.0.5",
                "prefixLength": 24, "gateway": "10.1.0.1"}"#,
        )
        .expect("valid");
        let network = ok.network.clone().expect("network");
        assert_eq!(
            network.netns_path(),
            Some(PathBuf::from("/run/netns/pod-1"))
        );
        assert!(!ok.needs_pci_machine());
        resolve(r#"{"mode": "netns", "netns": "pod-1"}"#).expect("no address is fine");
        for bad in [
            r#"{"mode": "netns"}"#,
            r#"{"mode": "netns", "netns": "../etc"}"#,
            r#"{"mode": "netns", "netns": "a/b"}"#,
            r#"{"mode": "netns", "netns": "p", "address": "10.1.0.5"}"#,
            r#"{"mode": "netns", "netns": "p", "prefixLength": 24}"#,
            r#"{"mode": "netns", "netns": "p", "address": "10.1.0.5", "prefixLength": 33}"#,
            r#"{"mode": "netns", "netns": "p", "gateway": "10.1.0.1"}"#,
            r#"{"mode": "netns", "netns": "p", "address": "10.1.0.5", "prefixLength": 24, "gateway": "10.2.0.1"}"#,
            r#"{"mode": "netns", "netns": "p", "address": "10.1.0.5", "prefixLength": 24, "gateway": "10.1.0.5"}"#,
            r#"{"mode": "netns", "netns": "p", "forwards": [{"hostPort": 1, "vmPort": 1}]}"#,
            r#"{"mode": "netns", "netns": "p", "hotplugSlots": 1}"#,
            r#"{"mode": "bridge", "netns": "p"}"#,
            r#"{"mode": "none", "gateway": "10.1.0.1"}"#,
        ] {
            assert!(matches!(resolve(bad), Err(SpecError::Network(_))), "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "web-1", "A.b_c", &"x".repeat(MAX_NAME_LEN)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_and_names_are_camel_case() {
        let err = serde_json::from_str::<VmSpec>(r#"{"vcpu": 1}"#);
        assert!(err.is_err());
        let spec: VmSpec =
            serde_json::from_str(r#"{"vcpus": 2, "memoryMiB": 256}"#).expect("parse");
        assert_eq!((spec.vcpus, spec.memory_mib), (Some(2), Some(256)));
        let toml_spec: VmSpec = toml::from_str("vcpus = 1\nmemoryMiB = 64\n").expect("toml");
        assert_eq!(toml_spec.memory_mib, Some(64));
    }
}
