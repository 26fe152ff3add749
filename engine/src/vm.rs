//! A VM as persisted ([`VmRecord`]) and as shown to callers ([`VmInfo`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::container::{ContainerInfo, ContainerRecord};
use crate::spec::ResolvedSpec;
use crate::state::{InvalidTransition, VmState};

/// Schema version of [`VmRecord`]; bumped on incompatible changes.
pub const RECORD_VERSION: u32 = 1;

/// Facts the guest agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    /// Agent version.
    pub agent_version: String,
    /// Guest kernel release.
    pub kernel_release: String,
    /// Guest boot id (changes on reboot).
    pub boot_id: String,
}

/// Who holds a pool VM handed out by `Acquire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The caller that acquired it, as the adapter identified it
    /// (`uid:1000`, a D-Bus unique name with its uid, …).
    pub holder: String,
    /// Caller-chosen labels (e.g. a job id).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it was acquired (µs since epoch).
    pub acquired_at: u64,
    /// When it ends by itself (µs since epoch; wall clock, so it holds
    /// across restarts), if it has a lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The holder's uid when the transport told it (for quotas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The lease ends when this holder goes away (`releaseOnDisconnect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_on: Option<Disconnect>,
}

/// A holder whose going away ends its leases (`releaseOnDisconnect`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Disconnect {
    /// A connection to this kilnd (varlink), numbered by the adapter. It
    /// cannot outlive kilnd: after a restart such leases end at start.
    Connection(u64),
    /// A D-Bus unique name. It outlives a kilnd restart: the D-Bus adapter
    /// reports when it vanishes, and checks at start which still exist.
    BusName(String),
}

/// One VM's persisted record (`<state_dir>/vms/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Opaque id.
    pub id: String,
    /// Caller-chosen unique name.
    pub name: String,
    /// What it runs with.
    pub spec: ResolvedSpec,
    /// Lifecycle state: read with [`VmRecord::state`], changed only by
    /// [`VmRecord::set_state`], which checks the transition.
    state: VmState,
    /// QEMU pid while a process exists.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Creation time (µs since epoch).
    pub created_at: u64,
    /// Last start (µs since epoch).
    #[serde(default)]
    pub started_at: Option<u64>,
    /// When the agent last became ready (µs since epoch).
    #[serde(default)]
    pub ready_at: Option<u64>,
    /// QEMU version of the running process.
    #[serde(default)]
    pub qemu_version: Option<String>,
    /// What the guest agent reported.
    #[serde(default)]
    pub guest: Option<GuestInfo>,
    /// Last failure, for operators.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The pool that owns the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Its holder while acquired from a pool. Written atomically with the
    /// `leased` state, so a VM never has two holders, even across crashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// Template directory whose RAM file this VM's process maps (a clone):
    /// the template is kept on disk while such a VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<std::path::PathBuf>,
    /// The MAC the saved machine's boot NIC device had, when this VM was
    /// restored from a snapshot: its QEMU device keeps it (migrated
    /// state) and the guest is told its own. `None`: a pool template's
    /// fixed MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_mac: Option<kiln_net::MacAddr>,
    /// The limits its running QEMU was given (set at each start): applied
    /// by the engine to a cgroup of its own, or, under systemd, by the
    /// machined follower to the VM's scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_limits: Option<crate::cgroup::CgroupLimits>,
    /// The unprivileged uid its QEMU runs under (`crate::qemu_user`),
    /// given at its first start and kept until it is deleted, so a
    /// re-adopted QEMU keeps it and no other VM gets it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_uid: Option<u32>,
    /// Render nodes leased to the running process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// The VM's NICs: address and MAC leased when the VM is defined (kept
    /// until it is deleted), the TAP's index while a process runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NicInfo>,
    /// Its containers (docs/images.md), in the order they start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerRecord>,
    /// The pod network its boot NIC took over (`JoinNetns`): from the
    /// first record write of the join on, its TAP is looked for (and
    /// removed) in that namespace, and the VM is destroyed, never
    /// recycled, when it is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_network: Option<PodNetwork>,
}

/// A pod's network that a VM took over (docs/networking.md, "A pool VM
/// in a pod's network"): what the guest is configured with, again after a
/// reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetwork {
    /// The namespace's name under `/run/netns`.
    pub netns: String,
    /// The pod's CNI interface in it (`eth0`).
    pub interface: String,
    /// The interface's prefix length (once the join has read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<u8>,
    /// The namespace's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The interface's MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Name servers for the guest's `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// One NIC of a VM, as persisted and as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicInfo {
    /// The NIC's number in the VM: 0 for the one it boots with, 1 to
    /// `hotplugSlots` for NICs attached at runtime (which go with the
    /// process).
    #[serde(default)]
    pub index: u8,
    /// Its TAP's name (`kt<id><nic>`).
    pub tap: String,
    /// The TAP's interface index while the VM runs (0 otherwise).
    #[serde(default)]
    pub ifindex: u32,
    /// The MAC the guest's interface has.
    pub mac: kiln_net::MacAddr,
    /// The guest's IPv4 address (always, on the bridge; in `netns` mode
    /// when the caller gave one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// The namespace its TAP lives in (`netns` mode; none: kilnd's
    /// network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

impl VmRecord {
    /// Lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Move to `to` if the state machine allows it ([`VmState::check_transition`];
    /// staying put is always allowed). A VM that holds a lease runs as
    /// `leased`, never `ready`: asked for `ready` while a lease is held (a
    /// leased VM resumed, rebooted or reset), it becomes `leased`, and
    /// `leased` without a lease is refused. Returns the state it moved to.
    ///
    /// Only the actor's one writer calls this (`Engine::transition`).
    pub(crate) fn set_state(&mut self, to: VmState) -> Result<VmState, InvalidTransition> {
        let to = match to {
            VmState::Ready if self.lease.is_some() => VmState::Leased,
            other => other,
        };
        if to == VmState::Leased && self.lease.is_none() {
            return Err(InvalidTransition {
                from: self.state,
                to,
            });
        }
        if to != self.state {
            self.state.check_transition(to)?;
        }
        self.state = to;
        Ok(to)
    }

    /// A new record in state `created` (`pool` set for pool members).
    pub fn new(id: String, name: String, spec: ResolvedSpec, pool: Option<String>) -> Self {
        Self {
            version: RECORD_VERSION,
            id,
            name,
            spec,
            state: VmState::Created,
            pid: None,
            created_at: crate::ids::now_usec(),
            started_at: None,
            ready_at: None,
            qemu_version: None,
            guest: None,
            last_error: None,
            pool,
            lease: None,
            template: None,
            saved_mac: None,
            qemu_uid: None,
            cgroup_limits: None,
            gpus: Vec::new(),
            network: Vec::new(),
            containers: Vec::new(),
            pod_network: None,
        }
    }
}

/// A VM as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    /// Opaque id.
    pub id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
    /// Accelerator.
    pub accel: Accel,
    /// QEMU pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Creation time (µs since epoch).
    pub created_at: u64,
    /// Last start (µs since epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Last time the guest became ready (µs since epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<u64>,
    /// QEMU version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// Guest agent version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Guest kernel release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// Guest boot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Owning pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Holder of the lease, while acquired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leased_by: Option<String>,
    /// When it was acquired (µs since epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acquired_at: Option<u64>,
    /// When the lease ends by itself (µs since epoch), if it has a TTL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<u64>,
    /// The lease ends when its holder's connection goes away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release_on_disconnect: bool,
    /// Labels given to `Acquire`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Render nodes leased while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// Display device (`none`, `virtio-gpu`).
    #[serde(default)]
    pub display: crate::spec::Display,
    /// NICs (bridge mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NicInfo>,
    /// Containers it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerInfo>,
    /// What it boots (`image`: its image is a whole OS, its container
    /// `main` that OS's root).
    #[serde(default, skip_serializing_if = "crate::spec::BootSource::is_kiln")]
    pub boot: crate::spec::BootSource,
    /// What its QEMU uses now (`DescribeVM` of a running VM only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<VmUsage>,
    /// The limits its QEMU runs under, for the machined follower (which
    /// puts them on the VM's scope); not on the wire: `usage` shows what
    /// is in force.
    #[serde(skip)]
    pub cgroup_limits: Option<crate::cgroup::CgroupLimits>,
}

/// A running VM's use of the host, read when asked: its QEMU's cgroup,
/// `/proc/<pid>` and its TAPs' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmUsage {
    /// CPU time of its QEMU (all vCPUs and QEMU's own threads), µs.
    pub cpu_usec: u64,
    /// Memory its cgroup is charged now, bytes (0: no cgroup).
    pub memory_bytes: u64,
    /// The cgroup's memory cap, bytes (0: none).
    pub memory_limit_bytes: u64,
    /// Resident set of its QEMU, bytes.
    pub rss_bytes: u64,
    /// Proportional set (shared pages split among their users), bytes.
    pub pss_bytes: u64,
    /// Bytes QEMU read from and wrote to storage (its disks, logs).
    pub disk_read_bytes: u64,
    /// See `disk_read_bytes`.
    pub disk_write_bytes: u64,
    /// Bytes the guest received over its NICs.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent over its NICs.
    pub net_tx_bytes: u64,
    /// Processes of its cgroup the OOM killer ended (QEMU, at its cap).
    pub oom_kills: u64,
}

impl From<&VmRecord> for VmInfo {
    fn from(r: &VmRecord) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            state: r.state(),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            accel: r.spec.accel,
            pid: r.pid,
            created_at: r.created_at,
            started_at: r.started_at,
            ready_at: r.ready_at,
            qemu_version: r.qemu_version.clone(),
            agent_version: r.guest.as_ref().map(|g| g.agent_version.clone()),
            kernel_release: r.guest.as_ref().map(|g| g.kernel_release.clone()),
            boot_id: r.guest.as_ref().map(|g| g.boot_id.clone()),
            last_error: r.last_error.clone(),
            pool: r.pool.clone(),
            leased_by: r.lease.as_ref().map(|l| l.holder.clone()),
            acquired_at: r.lease.as_ref().map(|l| l.acquired_at),
            lease_expires_at: r.lease.as_ref().and_then(|l| l.expires_at),
            release_on_disconnect: r.lease.as_ref().is_some_and(|l| l.release_on.is_some()),
            labels: r
                .lease
                .as_ref()
                .map(|l| l.labels.clone())
                .unwrap_or_default(),
            gpus: r.gpus.clone(),
            display: r.spec.display,
            network: r.network.clone(),
            containers: r.containers.iter().map(ContainerInfo::from).collect(),
            boot: r.spec.boot,
            usage: None,
            cgroup_limits: r.cgroup_limits,
        }
    }
}
