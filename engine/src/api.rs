//! The engine's contract: every command, its preconditions and errors,
//! the events watchers see, and the limits callers' input is checked
//! against (Firecracker's `rpc_interface.rs` in spirit).
//!
//! Adapters (D-Bus, varlink, tests) hold an [`EngineHandle`]: each call sends
//! one [`Command`] and awaits its typed reply. Nothing here knows about the
//! actor's insides.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{
    self as proto, ContainerLogsReply, ContainerLogsRequest, ExecInRequest, ExecReply, ExecRequest,
    PingReply,
};

use crate::container::{ContainerInfo, ContainerSpec};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use kiln_gpu::{NodeUsage, RenderNode};

use crate::accel::Accel;
use crate::error::EngineError;
use crate::images::{ImageInfo, ImageProgress};
use crate::observe::{CallObserver, ImageJobKind};
use crate::pool::{PoolFileError, PoolInfo, PoolSpec};
use crate::snapshot::SnapshotInfo;
use crate::spec::{validate_name, VmSpec, MAX_NAME_LEN, MAX_PATH_LEN};
use crate::store::BrokenRecord;
use crate::vm::{NicInfo, VmInfo};
use crate::vmm::GuestAgent;

/// Consecutive boot failures after which a pool is `failed`.
pub const FAILED_AFTER: u32 = 5;
/// Longest wait between boot attempts of a failing pool.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest `Acquire` timeout.
pub const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(600);
/// `Acquire` timeout when the caller names none.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most labels one lease may carry.
pub const MAX_LABELS: usize = 32;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// Shortest lease lifetime (`ttlSec`).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Longest lease lifetime (`ttlSec`): a week.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a caller asks of a lease.
#[derive(Debug, Clone, Default)]
pub struct AcquireOptions {
    /// How long to wait for a VM to boot (default
    /// [`DEFAULT_ACQUIRE_TIMEOUT`]; zero: only a hot VM, at once).
    pub timeout: Option<Duration>,
    /// The caller as the adapter identified it (`uid:1000`, a D-Bus unique
    /// name with its uid, …).
    pub holder: String,
    /// The caller's uid when the transport tells it: leases are counted
    /// per uid for `max_leases_per_caller` (per holder when unknown).
    pub uid: Option<u32>,
    /// Caller-chosen labels (e.g. a job id).
    pub labels: BTreeMap<String, String>,
    /// The lease ends by itself this long after it is granted (or last
    /// renewed): the VM is destroyed, or recycled if its pool says
    /// `recycleOnExpiry`. Between [`MIN_LEASE_TTL`] and [`MAX_LEASE_TTL`].
    pub ttl: Option<Duration>,
    /// End the lease when this holder goes away (`releaseOnDisconnect`).
    pub release_on: Option<Disconnect>,
    /// Start this container in the VM before handing it out (a generic
    /// pool's clone given the caller's image): the reply comes once it
    /// runs; if it cannot start, the VM is destroyed and the error
    /// returned.
    pub container: Option<ContainerSpec>,
}

pub use crate::vm::Disconnect;

/// What [`Command::JoinNetns`] is given: where the orchestrator put the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNetworkRequest {
    /// A namespace name under `/run/netns` (what CNI runtimes make).
    pub netns: String,
    /// The pod's CNI interface there (default [`DEFAULT_POD_INTERFACE`]).
    pub interface: Option<String>,
    /// Name servers for the guest (at most [`MAX_POD_DNS`] addresses).
    pub dns: Vec<String>,
}

/// The interface CNI plugins give a pod unless told otherwise.
pub const DEFAULT_POD_INTERFACE: &str = "eth0";
/// Most name servers a `JoinNetns` may give.
pub const MAX_POD_DNS: usize = 8;

impl PodNetworkRequest {
    /// The interface name, checked; `InvalidArgument` for a bad name, a
    /// namespace name that is not one, or a name server that is not an
    /// address.
    pub fn validate(&self) -> Result<&str, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidArgument(m));
        if validate_name(&self.netns).is_err() {
            return bad(format!(
                "netns {:?} is not a namespace name in /run/netns (1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -)",
                self.netns
            ));
        }
        let interface = self.interface.as_deref().unwrap_or(DEFAULT_POD_INTERFACE);
        if kiln_net::names::validate_ifname(interface).is_err() {
            return bad(format!("interface {interface:?} is not an interface name"));
        }
        if self.dns.len() > MAX_POD_DNS {
            return bad(format!("at most {MAX_POD_DNS} name servers"));
        }
        if let Some(d) = self
            .dns
            .iter()
            .find(|d| d.parse::<std::net::IpAddr>().is_err())
        {
            return bad(format!("name server {d:?} is not an IP address"));
        }
        Ok(interface)
    }
}

/// Reply channel of a command.
pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Most arguments an `ExecVM` may carry.
pub const MAX_EXEC_ARGS: usize = 1024;
/// Most bytes of argv + env + stdin of one `ExecVM`.
pub const MAX_EXEC_INPUT_BYTES: usize = 1024 * 1024;
/// Longest `ExecVM` timeout.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
/// Timeout of an `ExecVM` that names none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Most VMs one `ForkVM` makes.
pub const MAX_FORKS: u32 = 32;

/// Longest image reference or digest a caller may name.
pub const MAX_IMAGE_REFERENCE_LEN: usize = 512;
/// Longest path `ImportImage` takes (the same bound as a kernel's).
pub const MAX_IMPORT_PATH_LEN: usize = MAX_PATH_LEN;
/// Progress reports of one pull or import kept for a slow reader; more are
/// dropped (the job's result never is).
pub const IMAGE_PROGRESS_BUFFER: usize = 64;

/// Every operation the engine does. Each variant says when it is valid;
/// all reply exactly once.
#[derive(Debug)]
pub enum Command {
    /// Define a VM in state `created`. `AlreadyExists` if the name is taken,
    /// `InvalidName`/`InvalidSpec` for bad input; nothing is written then.
    CreateVm {
        name: String,
        spec: VmSpec,
        reply: Reply<VmInfo>,
    },
    /// Boot a `created`, `stopped` or `failed` VM. Replies when the guest
    /// agent answers (`ready`) or the boot failed (`BootFailed`).
    StartVm { id: String, reply: Reply<VmInfo> },
    /// Stop gracefully: agent shutdown, then ACPI power button, then SIGKILL
    /// once `timeout` (default from config) has passed. Replies when the
    /// process is gone. Stopping a VM without a process is a no-op.
    StopVm {
        id: String,
        timeout: Option<Duration>,
        reply: Reply<VmInfo>,
    },
    /// SIGKILL the QEMU process; replies when it is gone (`stopped`).
    KillVm { id: String, reply: Reply<VmInfo> },
    /// Pause vCPUs; valid while `ready` or `leased`.
    PauseVm { id: String, reply: Reply<VmInfo> },
    /// Resume vCPUs; valid while `paused`.
    ResumeVm { id: String, reply: Reply<VmInfo> },
    /// Reboot the guest through its agent (hard reset if the agent fails);
    /// valid while `ready` or `leased`. Replies when the agent answers again
    /// with a new boot id.
    RebootVm { id: String, reply: Reply<VmInfo> },
    /// Delete a VM, killing its process first if it has one.
    DeleteVm { id: String, reply: Reply<()> },
    /// Every VM.
    ListVms { reply: Reply<Vec<VmInfo>> },
    /// One VM.
    DescribeVm { id: String, reply: Reply<VmInfo> },
    /// Run a command in the guest (or, with `request.container`, in that
    /// container's root and namespaces); valid while `ready` or `leased`.
    /// `NoSuchContainer`; `ExecFailed` for a container that is not running.
    ExecVm {
        id: String,
        request: ExecInRequest,
        reply: Reply<ExecReply>,
    },
    /// Run another container in a `ready` or `leased` VM: resolve its image
    /// (`ImageNotFound`), plug its layers, start its process, then record
    /// it. Nothing stays on failure. `ContainerExists`,
    /// `TooManyContainers` (more than 8), `ContainerStartFailed`,
    /// `InvalidSpec`, `InvalidState`.
    AddContainer {
        id: String,
        spec: ContainerSpec,
        reply: Reply<ContainerInfo>,
    },
    /// Stop (SIGTERM, then SIGKILL after 10 s) and remove a container,
    /// unplug its layers, release its image. `NoSuchContainer`.
    RemoveContainer {
        id: String,
        name: String,
        reply: Reply<()>,
    },
    /// A VM's containers (refreshed from the guest when it answers).
    ListContainers {
        id: String,
        reply: Reply<Vec<ContainerInfo>>,
    },
    /// One read of a container's output (stdout and stderr in the order
    /// written) from cursor `since`; `ended` once it exited and all was
    /// read. `NoSuchContainer`.
    ContainerLogs {
        id: String,
        request: ContainerLogsRequest,
        reply: Reply<ContainerLogsReply>,
    },
    /// Save a `ready`, `leased` or `paused` VM as snapshot `name` (RAM as
    /// a file, device state, what the VM was), pausing it while its RAM is
    /// written and resuming it after unless `keep_paused`. `AlreadyExists`,
    /// `NotSnapshottable` (GPUs, hot-plugged NICs, a writable container
    /// disk), `InvalidState`, `Busy`.
    SnapshotVm {
        id: String,
        name: String,
        keep_paused: bool,
        reply: Reply<SnapshotInfo>,
    },
    /// Every snapshot.
    ListSnapshots { reply: Reply<Vec<SnapshotInfo>> },
    /// Remove a snapshot (VMs restored from it keep running).
    /// `NoSuchSnapshot`.
    DeleteSnapshot { name: String, reply: Reply<()> },
    /// A new VM (named `name`, or after the snapshot) booted from a
    /// snapshot: its RAM copy-on-write, a fresh identity unless
    /// `same_identity`. Replies once its agent answers. `NoSuchSnapshot`,
    /// `AlreadyExists`, `InvalidName`.
    RestoreVm {
        snapshot: String,
        name: Option<String>,
        same_identity: bool,
        reply: Reply<VmInfo>,
    },
    /// Take the stopped VM `id` back to a snapshot of it (arktos'
    /// `RestoreToSnapshot`): booted from the snapshot with its own
    /// identity. `InvalidState` while it runs, `InvalidArgument` when its
    /// spec or containers are not the snapshot's.
    RestoreInto {
        snapshot: String,
        id: String,
        reply: Reply<VmInfo>,
    },
    /// `count` running copies of a running VM sharing its memory
    /// copy-on-write, each with its own identity, MAC and address:
    /// `SnapshotVm` to a hidden snapshot, `count` restores, the snapshot
    /// removed. Replies once all answer.
    ForkVm {
        id: String,
        count: u32,
        reply: Reply<Vec<VmInfo>>,
    },
    /// The agent of a VM whose guest answers (`ready` or `leased`), for
    /// the process and file calls (module `guest_io`); with `container`,
    /// that container must be one of the VM's (`NoSuchContainer`).
    GuestAgent {
        id: String,
        container: Option<String>,
        operation: &'static str,
        reply: Reply<Arc<dyn GuestAgent>>,
    },
    /// Ping the guest agent with a deadline, in any state with a process
    /// (a paused guest does not answer: `Timeout`).
    PingVm {
        id: String,
        timeout: Duration,
        reply: Reply<PingReply>,
    },
    /// Define a pool (persisted in the API layer of pool definitions) and
    /// start filling it. `AlreadyExists`, `InvalidSpec`.
    CreatePool {
        name: String,
        spec: PoolSpec,
        reply: Reply<PoolInfo>,
    },
    /// Change a pool's `warm` (and `max`); hot VMs beyond it are destroyed,
    /// leased ones are never touched. Persisted like `CreatePool`.
    ResizePool {
        name: String,
        warm: u32,
        max: Option<u32>,
        reply: Reply<PoolInfo>,
    },
    /// Remove a pool: its unleased VMs are destroyed, leased ones stay with
    /// their holders until released. A pool from a vendor or admin file is
    /// masked in the API layer.
    DeletePool { name: String, reply: Reply<()> },
    /// Every pool.
    ListPools { reply: Reply<Vec<PoolInfo>> },
    /// One pool.
    DescribePool {
        name: String,
        reply: Reply<PoolInfo>,
    },
    /// Lease the oldest hot VM of `pool` to `holder`, or wait up to
    /// `timeout` (default [`DEFAULT_ACQUIRE_TIMEOUT`]) for one to boot.
    /// `PoolExhausted` at once when the pool owns `max` VMs and none can
    /// come free for this caller; `Timeout` when the wait ran out.
    ///
    /// `QuotaExceeded` when the caller already holds
    /// `max_leases_per_caller` leases; `InvalidArgument` for a TTL out of
    /// bounds. With a `ttl` the lease's deadline is written with it and
    /// honoured across restarts (one that passed while kilnd was down is
    /// reclaimed at start); expiry sends [`EngineEvent::LeaseExpired`].
    Acquire {
        pool: String,
        options: AcquireOptions,
        reply: Reply<VmInfo>,
    },
    /// Extend a lease: its deadline becomes now + `ttl` (a lease without
    /// one gets one). Only the VM's lease holder's call makes sense, but
    /// authorization is the adapters' job. `InvalidState` when the VM holds
    /// no lease; `InvalidArgument` for a TTL out of bounds.
    Renew {
        id: String,
        ttl: Duration,
        reply: Reply<VmInfo>,
    },
    /// A holder went away (a varlink connection closed, a D-Bus name
    /// vanished): every lease acquired with `release_on` equal to it ends,
    /// as an expired one does. Replies how many ended.
    Disconnected { who: Disconnect, reply: Reply<u32> },
    /// The D-Bus names leases are bound to (the D-Bus adapter checks at
    /// start which of them still exist).
    BoundBusNames { reply: Reply<Vec<String>> },
    /// Give a leased VM back: destroyed, or with `recycle` reset from the
    /// pool's template (rebooted, in a cold pool) and put back hot.
    Release {
        id: String,
        recycle: bool,
        reply: Reply<()>,
    },
    /// Hot-plug a NIC into a running (`ready` or `leased`) bridge VM
    /// created with `network.hotplugSlots`: a TAP on the bridge, an
    /// address (`address`, or the next free one) and a configured guest
    /// interface. Replies once the guest has the address. The NIC goes
    /// with the process (stop, crash) or with [`Command::DetachNic`].
    /// `NoHotplugSlot`, `AddressInUse`, `InvalidSpec`, `InvalidState`.
    AttachNic {
        id: String,
        address: Option<Ipv4Addr>,
        reply: Reply<NicInfo>,
    },
    /// Move running bridge VM `id`'s boot NIC into a pod's network
    /// namespace: its TAP goes into the namespace, tc passes every frame
    /// between it and the pod's CNI interface, and the guest takes that
    /// interface's MAC, address, gateway and MTU (docs/networking.md, "A
    /// pool VM in a pod's network"). From then on the VM is the pod's: it
    /// is destroyed when released, never recycled, and cannot be started
    /// again once its process ends. On a failure part-way the VM may have
    /// left its bridge: release it. `InvalidArgument`, `InvalidSpec` (no
    /// bridge NIC), `InvalidState`, `NetworkFailed`, `AgentFailed`.
    JoinNetns {
        id: String,
        request: PodNetworkRequest,
        reply: Reply<VmInfo>,
    },
    /// Unplug NIC `index` (1 or more) of a running VM: the guest releases
    /// the device, then its TAP and address go. `NoSuchNIC`; the boot NIC
    /// (0) cannot be detached.
    DetachNic {
        id: String,
        index: u8,
        reply: Reply<()>,
    },
    /// A VM's NICs.
    ListNics {
        id: String,
        reply: Reply<Vec<NicInfo>>,
    },
    /// Every GPU render node and who holds it.
    ListGpus { reply: Reply<Vec<GpuInfo>> },
    /// Pull `reference` (`[registry/]repository[:tag|@digest]`, normalised
    /// as Docker does) from its registry into the image store, reporting
    /// on `progress` as it goes (best effort: reports that do not fit are
    /// dropped). An image already stored under the digest the registry
    /// names is not fetched again: its tag is recorded and it is returned
    /// at once. Runs beside the actor, which keeps serving; replies with
    /// the stored image and publishes [`EngineEvent::ImageAdded`].
    /// `InvalidArgument` for a reference that is too long, has characters
    /// no reference has or does not parse; `ImagePullFailed` (unreachable
    /// registry, unknown repository or tag, refused credentials: the
    /// registry's reason in the message); `InvalidImage` (a digest or size
    /// mismatch, a bad manifest or config, a media type or platform the
    /// store does not take, an unsafe layer, over `image_max_size_mib`);
    /// `StorageFailed`. Nothing of a refused image is stored.
    PullImage {
        reference: String,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    },
    /// Import an OCI image layout directory, an OCI archive or a docker
    /// archive at `path` (absolute), as [`Command::PullImage`] does a
    /// registry's: verified, converted, reported on `progress`. `reference`
    /// is recorded as the image's tag and picks the image when the source
    /// holds several. kilnd reads `path` with its own rights: the adapters
    /// check first that the caller could read it ([`crate::access`]).
    /// `InvalidArgument` for a path that is relative or too long;
    /// `ImageNotFound` when nothing is there (or no image in it by that
    /// reference); `InvalidImage`; `StorageFailed`.
    ImportImage {
        path: PathBuf,
        reference: Option<String>,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    },
    /// Store the image made of layer directories `layers` (absolute,
    /// lowest first: a containerd overlayfs snapshot's), each converted to
    /// erofs once and kept by the directory's identity; reported as an
    /// import. kilnd reads every file of them: the adapters allow root
    /// alone. `InvalidArgument` for a relative or too long path, or none
    /// or too many; `ImageNotFound` for a directory that is not there;
    /// `InvalidImage`; `StorageFailed`.
    ImportRootfs {
        layers: Vec<PathBuf>,
        reference: Option<String>,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    },
    /// Every stored image, by digest.
    ListImages { reply: Reply<Vec<ImageInfo>> },
    /// The stored image a reference (its tag) or a digest names.
    /// `ImageNotFound`; `InvalidArgument` for a malformed name.
    DescribeImage {
        image: String,
        reply: Reply<ImageInfo>,
    },
    /// Remove a tag, or an image with all its tags. By tag: when other tags
    /// still name the image only this one goes ([`ImageRemoved::Untagged`],
    /// published as [`EngineEvent::ImageAdded`] with the image's
    /// references now); otherwise the image goes. By digest: the image
    /// goes. An image goes only when nothing uses it (`ImageInUse`, naming
    /// the users, otherwise); its files are freed by a garbage collection
    /// that runs beside the actor afterwards (and waits for running
    /// pulls). `ImageNotFound`, `InvalidArgument`, `StorageFailed`.
    RemoveImage {
        image: String,
        reply: Reply<ImageRemoved>,
    },
    /// Engine facts: accelerator, counts, broken records.
    Status { reply: Reply<EngineStatus> },
    /// Stop serving. With `stop_vms`, stop every VM first; otherwise VMs keep
    /// running and are re-adopted by the next kilnd.
    Shutdown { stop_vms: bool, reply: Reply<()> },
}

/// Engine-wide facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// kilnd/engine version.
    pub version: String,
    /// Accelerator VMs get by default.
    pub accel: Accel,
    /// Number of VMs by state.
    pub vms: usize,
    /// VMs with a QEMU process.
    pub running: usize,
    /// Records that could not be read at start-up.
    pub broken_records: Vec<BrokenRecord>,
    /// Pool files that were refused.
    pub pool_errors: Vec<PoolFileError>,
}

/// A change published to watchers (varlink `Watch`, D-Bus signals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EngineEvent {
    /// A VM was created.
    VmAdded { vm: VmInfo },
    /// A VM's state or facts changed.
    VmChanged { vm: VmInfo },
    /// A VM was deleted.
    VmRemoved { id: String },
    /// A pool appeared or what callers see of it changed.
    PoolChanged { pool: PoolInfo },
    /// A pool was deleted.
    PoolRemoved { name: String },
    /// A lease reached its deadline; the VM is being destroyed or recycled
    /// (a `VmChanged`/`VmRemoved` follows).
    LeaseExpired {
        id: String,
        pool: Option<String>,
        holder: String,
    },
    /// A VM's QEMU was killed by the OOM killer at its cgroup's memory cap
    /// (a `VmChanged` to `failed` follows).
    Oom { id: String, limit_bytes: u64 },
    /// GPU nodes or their leases changed.
    GpusChanged { gpus: Vec<GpuInfo> },
    /// An image is stored, or what callers see of it changed: a pull or
    /// an import stored it or named it again (possibly with a new tag), or
    /// `RemoveImage` removed one of its several tags. Watchers treat it as
    /// an insert-or-update keyed by digest.
    ImageAdded { image: ImageInfo },
    /// An image was removed (by digest).
    ImageRemoved { digest: String },
}

/// What [`Command::RemoveImage`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum ImageRemoved {
    /// A tag was removed; other tags still name the image, which stays.
    Untagged { digest: String },
    /// The image and its tags are gone; its files are being freed.
    Deleted { digest: String },
}

/// A pull or import the engine is running: its progress reports, then
/// how it ended. Dropping it abandons the reports, not the job.
#[derive(Debug)]
pub struct ImageJob {
    progress: mpsc::Receiver<ImageProgress>,
    result: oneshot::Receiver<Result<ImageInfo, EngineError>>,
}

impl ImageJob {
    /// The next progress report; `None` once the job has ended, after
    /// which [`ImageJob::result`] answers at once.
    pub async fn progress(&mut self) -> Option<ImageProgress> {
        self.progress.recv().await
    }

    /// How the job ended: the stored image, or why not.
    pub async fn result(self) -> Result<ImageInfo, EngineError> {
        self.result.await.map_err(|_| EngineError::ShuttingDown)?
    }
}

/// Cloneable handle to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<EngineEvent>,
    /// Told of this handle's failed calls, acquires and image jobs
    /// ([`EngineHandle::observed`]).
    observer: Option<Arc<dyn CallObserver>>,
}

macro_rules! call {
    ($self:ident, $variant:ident { $($field:ident $(: $value:expr)?),* }) => {{
        let (reply, rx) = oneshot::channel();
        let sent = $self
            .commands
            .send(Command::$variant { $($field $(: $value)?,)* reply })
            .await;
        let result = match sent {
            Ok(()) => rx.await.unwrap_or(Err(EngineError::ShuttingDown)),
            Err(_) => Err(EngineError::ShuttingDown),
        };
        $self.seen(result)
    }};
}

impl EngineHandle {
    /// The handle of an actor fed by `commands` that publishes on `events`.
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        events: broadcast::Sender<EngineEvent>,
    ) -> Self {
        Self {
            commands,
            events,
            observer: None,
        }
    }

    /// A handle to the same engine whose calls (and its clones' calls)
    /// `observer` hears of: kilnd gives each adapter one, for its metrics.
    pub fn observed(&self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            observer: Some(observer),
            ..self.clone()
        }
    }

    /// Tell the observer of a failure; pass the result on.
    fn seen<T>(&self, result: Result<T, EngineError>) -> Result<T, EngineError> {
        if let (Some(observer), Err(e)) = (&self.observer, &result) {
            observer.failed(e.error_name());
        }
        result
    }

    /// Send a prepared command (adapters that build [`Command`]s themselves).
    pub async fn send(&self, command: Command) -> Result<(), EngineError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| EngineError::ShuttingDown)
    }
    /// Subscribe to [`EngineEvent`]s.
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.events.subscribe()
    }
    /// See [`Command::CreateVm`].
    pub async fn create_vm(&self, name: &str, spec: VmSpec) -> Result<VmInfo, EngineError> {
        let name = name.to_owned();
        call!(self, CreateVm { name, spec })
    }
    /// See [`Command::StartVm`].
    pub async fn start_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, StartVm { id })
    }
    /// See [`Command::StopVm`].
    pub async fn stop_vm(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, StopVm { id, timeout })
    }
    /// See [`Command::KillVm`].
    pub async fn kill_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, KillVm { id })
    }
    /// See [`Command::PauseVm`].
    pub async fn pause_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, PauseVm { id })
    }
    /// See [`Command::ResumeVm`].
    pub async fn resume_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, ResumeVm { id })
    }
    /// See [`Command::RebootVm`].
    pub async fn reboot_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, RebootVm { id })
    }
    /// See [`Command::DeleteVm`].
    pub async fn delete_vm(&self, id: &str) -> Result<(), EngineError> {
        let id = id.to_owned();
        call!(self, DeleteVm { id })
    }
    /// See [`Command::ListVms`].
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, EngineError> {
        call!(self, ListVms {})
    }
    /// See [`Command::DescribeVm`].
    pub async fn describe_vm(&self, id: &str) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, DescribeVm { id })
    }
    /// See [`Command::ExecVm`].
    pub async fn exec_vm(&self, id: &str, request: ExecRequest) -> Result<ExecReply, EngineError> {
        self.exec_in(id, None, request).await
    }
    /// [`Command::ExecVm`] in container `container` (`None`: the guest).
    pub async fn exec_in(
        &self,
        id: &str,
        container: Option<String>,
        request: ExecRequest,
    ) -> Result<ExecReply, EngineError> {
        let id = id.to_owned();
        let request = ExecInRequest {
            exec: request,
            container,
        };
        call!(self, ExecVm { id, request })
    }
    /// See [`Command::AddContainer`].
    pub async fn add_container(
        &self,
        id: &str,
        spec: ContainerSpec,
    ) -> Result<ContainerInfo, EngineError> {
        let id = id.to_owned();
        call!(self, AddContainer { id, spec })
    }
    /// See [`Command::RemoveContainer`].
    pub async fn remove_container(&self, id: &str, name: &str) -> Result<(), EngineError> {
        let (id, name) = (id.to_owned(), name.to_owned());
        call!(self, RemoveContainer { id, name })
    }
    /// See [`Command::ListContainers`].
    pub async fn list_containers(&self, id: &str) -> Result<Vec<ContainerInfo>, EngineError> {
        let id = id.to_owned();
        call!(self, ListContainers { id })
    }
    /// See [`Command::ContainerLogs`].
    pub async fn container_logs(
        &self,
        id: &str,
        request: ContainerLogsRequest,
    ) -> Result<ContainerLogsReply, EngineError> {
        let id = id.to_owned();
        call!(self, ContainerLogs { id, request })
    }
    /// See [`Command::SnapshotVm`].
    pub async fn snapshot_vm(
        &self,
        id: &str,
        name: &str,
        keep_paused: bool,
    ) -> Result<SnapshotInfo, EngineError> {
        let (id, name) = (id.to_owned(), name.to_owned());
        call!(
            self,
            SnapshotVm {
                id,
                name,
                keep_paused
            }
        )
    }
    /// See [`Command::ListSnapshots`].
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        call!(self, ListSnapshots {})
    }
    /// See [`Command::DeleteSnapshot`].
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let name = name.to_owned();
        call!(self, DeleteSnapshot { name })
    }
    /// See [`Command::RestoreVm`].
    pub async fn restore_vm(
        &self,
        snapshot: &str,
        name: Option<String>,
        same_identity: bool,
    ) -> Result<VmInfo, EngineError> {
        let snapshot = snapshot.to_owned();
        call!(
            self,
            RestoreVm {
                snapshot,
                name,
                same_identity
            }
        )
    }
    /// See [`Command::RestoreInto`].
    pub async fn restore_into(&self, snapshot: &str, id: &str) -> Result<VmInfo, EngineError> {
        let (snapshot, id) = (snapshot.to_owned(), id.to_owned());
        call!(self, RestoreInto { snapshot, id })
    }
    /// See [`Command::ForkVm`].
    pub async fn fork_vm(&self, id: &str, count: u32) -> Result<Vec<VmInfo>, EngineError> {
        let id = id.to_owned();
        call!(self, ForkVm { id, count })
    }
    /// See [`Command::GuestAgent`].
    pub(crate) async fn guest_agent(
        &self,
        id: &str,
        container: Option<&str>,
        operation: &'static str,
    ) -> Result<Arc<dyn GuestAgent>, EngineError> {
        let id = id.to_owned();
        let container = container.map(str::to_owned);
        call!(
            self,
            GuestAgent {
                id,
                container,
                operation
            }
        )
    }
    /// See [`Command::PingVm`].
    pub async fn ping_vm(&self, id: &str, timeout: Duration) -> Result<PingReply, EngineError> {
        let id = id.to_owned();
        call!(self, PingVm { id, timeout })
    }
    /// See [`Command::CreatePool`].
    pub async fn create_pool(&self, name: &str, spec: PoolSpec) -> Result<PoolInfo, EngineError> {
        let name = name.to_owned();
        call!(self, CreatePool { name, spec })
    }
    /// See [`Command::ResizePool`].
    pub async fn resize_pool(
        &self,
        name: &str,
        warm: u32,
        max: Option<u32>,
    ) -> Result<PoolInfo, EngineError> {
        let name = name.to_owned();
        call!(self, ResizePool { name, warm, max })
    }
    /// See [`Command::DeletePool`].
    pub async fn delete_pool(&self, name: &str) -> Result<(), EngineError> {
        let name = name.to_owned();
        call!(self, DeletePool { name })
    }
    /// See [`Command::ListPools`].
    pub async fn list_pools(&self) -> Result<Vec<PoolInfo>, EngineError> {
        call!(self, ListPools {})
    }
    /// See [`Command::DescribePool`].
    pub async fn describe_pool(&self, name: &str) -> Result<PoolInfo, EngineError> {
        let name = name.to_owned();
        call!(self, DescribePool { name })
    }
    /// See [`Command::Acquire`].
    pub async fn acquire(
        &self,
        pool: &str,
        options: AcquireOptions,
    ) -> Result<VmInfo, EngineError> {
        let started = std::time::Instant::now();
        let name = pool.to_owned();
        let result = call!(
            self,
            Acquire {
                pool: name,
                options
            }
        );
        if let Some(observer) = &self.observer {
            let outcome = result.as_ref().map(|_| ()).map_err(EngineError::error_name);
            observer.acquired(pool, started.elapsed(), outcome);
        }
        result
    }
    /// See [`Command::Disconnected`].
    pub async fn disconnected(&self, who: Disconnect) -> Result<u32, EngineError> {
        call!(self, Disconnected { who })
    }
    /// See [`Command::BoundBusNames`].
    pub async fn bound_bus_names(&self) -> Result<Vec<String>, EngineError> {
        call!(self, BoundBusNames {})
    }
    /// See [`Command::Renew`].
    pub async fn renew(&self, id: &str, ttl: Duration) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, Renew { id, ttl })
    }
    /// See [`Command::Release`].
    pub async fn release(&self, id: &str, recycle: bool) -> Result<(), EngineError> {
        let id = id.to_owned();
        call!(self, Release { id, recycle })
    }
    /// See [`Command::AttachNic`].
    pub async fn attach_nic(
        &self,
        id: &str,
        address: Option<Ipv4Addr>,
    ) -> Result<NicInfo, EngineError> {
        let id = id.to_owned();
        call!(self, AttachNic { id, address })
    }

    /// See [`Command::JoinNetns`].
    pub async fn join_netns(
        &self,
        id: &str,
        request: PodNetworkRequest,
    ) -> Result<VmInfo, EngineError> {
        let id = id.to_owned();
        call!(self, JoinNetns { id, request })
    }

    /// See [`Command::DetachNic`].
    pub async fn detach_nic(&self, id: &str, index: u8) -> Result<(), EngineError> {
        let id = id.to_owned();
        call!(self, DetachNic { id, index })
    }

    /// See [`Command::ListNics`].
    pub async fn list_nics(&self, id: &str) -> Result<Vec<NicInfo>, EngineError> {
        let id = id.to_owned();
        call!(self, ListNics { id })
    }

    /// See [`Command::ListGpus`].
    pub async fn list_gpus(&self) -> Result<Vec<GpuInfo>, EngineError> {
        call!(self, ListGpus {})
    }
    /// Start a [`Command::PullImage`]; its reports and result come through
    /// the returned job.
    pub async fn pull_image(&self, reference: &str) -> Result<ImageJob, EngineError> {
        let reference = reference.to_owned();
        self.image_job(ImageJobKind::Pull, |progress, reply| Command::PullImage {
            reference,
            progress,
            reply,
        })
        .await
    }
    /// Start a [`Command::ImportImage`].
    pub async fn import_image(
        &self,
        path: &Path,
        reference: Option<&str>,
    ) -> Result<ImageJob, EngineError> {
        let (path, reference) = (path.to_owned(), reference.map(str::to_owned));
        self.image_job(ImageJobKind::Import, |progress, reply| {
            Command::ImportImage {
                path,
                reference,
                progress,
                reply,
            }
        })
        .await
    }
    /// Start a [`Command::ImportRootfs`].
    pub async fn import_rootfs(
        &self,
        layers: &[PathBuf],
        reference: Option<&str>,
    ) -> Result<ImageJob, EngineError> {
        let (layers, reference) = (layers.to_vec(), reference.map(str::to_owned));
        self.image_job(ImageJobKind::Import, |progress, reply| {
            Command::ImportRootfs {
                layers,
                reference,
                progress,
                reply,
            }
        })
        .await
    }
    async fn image_job(
        &self,
        kind: ImageJobKind,
        command: impl FnOnce(mpsc::Sender<ImageProgress>, Reply<ImageInfo>) -> Command,
    ) -> Result<ImageJob, EngineError> {
        let (progress_tx, progress) = mpsc::channel(IMAGE_PROGRESS_BUFFER);
        let (reply, result) = oneshot::channel();
        self.seen(self.send(command(progress_tx, reply)).await)?;
        let result = match self.observer.clone() {
            None => result,
            // The job's end is told even when its caller has gone: a task
            // of its own passes the reply on.
            Some(observer) => {
                let (forward, passed) = oneshot::channel();
                tokio::spawn(async move {
                    let ended = result.await.unwrap_or(Err(EngineError::ShuttingDown));
                    let outcome = ended.as_ref().map(|_| ()).map_err(EngineError::error_name);
                    if let Err(name) = outcome {
                        observer.failed(name);
                    }
                    observer.image_job(kind, outcome);
                    let _ = forward.send(ended);
                });
                passed
            }
        };
        Ok(ImageJob { progress, result })
    }
    /// See [`Command::ListImages`].
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, EngineError> {
        call!(self, ListImages {})
    }
    /// See [`Command::DescribeImage`].
    pub async fn describe_image(&self, image: &str) -> Result<ImageInfo, EngineError> {
        let image = image.to_owned();
        call!(self, DescribeImage { image })
    }
    /// See [`Command::RemoveImage`].
    pub async fn remove_image(&self, image: &str) -> Result<ImageRemoved, EngineError> {
        let image = image.to_owned();
        call!(self, RemoveImage { image })
    }
    /// See [`Command::Status`].
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        call!(self, Status {})
    }
    /// See [`Command::Shutdown`].
    pub async fn shutdown(&self, stop_vms: bool) -> Result<(), EngineError> {
        call!(self, Shutdown { stop_vms })
    }
}

/// Check an `ExecVM` request against the limits.
pub(crate) fn validate_exec(request: &ExecRequest) -> Result<(), EngineError> {
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(exec_error("command must not be empty"));
    }
    if request.argv.len() + request.env.len() > MAX_EXEC_ARGS {
        return Err(exec_error("too many arguments"));
    }
    let bytes: usize = request
        .argv
        .iter()
        .chain(&request.env)
        .map(String::len)
        .sum::<usize>()
        + request.stdin.as_ref().map_or(0, String::len);
    if bytes > MAX_EXEC_INPUT_BYTES {
        return Err(exec_error("command, environment and stdin exceed 1 MiB"));
    }
    if request.env.iter().any(|e| !e.contains('=')) {
        return Err(exec_error("env entries must be KEY=VALUE"));
    }
    if request
        .timeout_ms
        .is_some_and(|t| t == 0 || Duration::from_millis(t) > MAX_EXEC_TIMEOUT)
    {
        return Err(exec_error("timeout must be between 1 ms and 1 hour"));
    }
    if request
        .max_output_bytes
        .is_some_and(|m| m > proto::LIMIT_MAX_OUTPUT_BYTES)
    {
        return Err(exec_error("maxOutputBytes is above the limit"));
    }
    Ok(())
}

fn exec_error(message: &str) -> EngineError {
    EngineError::InvalidArgument(message.to_owned())
}

/// Check an `Acquire`'s timeout and labels against the limits.
pub(crate) fn validate_acquire(
    timeout: Duration,
    labels: &BTreeMap<String, String>,
    ttl: Option<Duration>,
) -> Result<(), EngineError> {
    if let Some(ttl) = ttl {
        validate_ttl(ttl)?;
    }
    if timeout > MAX_ACQUIRE_TIMEOUT {
        return Err(EngineError::InvalidArgument(format!(
            "timeout must be at most {} ms",
            MAX_ACQUIRE_TIMEOUT.as_millis()
        )));
    }
    if labels.len() > MAX_LABELS {
        return Err(EngineError::InvalidArgument(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (key, value) in labels {
        if validate_name(key).is_err() {
            return Err(EngineError::InvalidArgument(format!(
                "label key {:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -",
                key.chars().take(MAX_NAME_LEN + 8).collect::<String>()
            )));
        }
        if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(EngineError::InvalidArgument(format!(
                "label {key:?}: value must be at most {MAX_LABEL_VALUE_LEN} printable characters"
            )));
        }
    }
    Ok(())
}

/// Check an image reference or digest a caller names: 1 to
/// [`MAX_IMAGE_REFERENCE_LEN`] characters of those references and digests
/// are made of, and a digest (alone or after `@`) is `sha256:` and 64
/// lowercase hex digits, the only kind the store keeps. The reference
/// grammar itself is the image store's to check (a reference it cannot
/// parse is `InvalidArgument` too).
pub(crate) fn validate_image_name(what: &str) -> Result<(), EngineError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/@+".contains(c);
    let shown = || what.chars().take(64).collect::<String>();
    if what.is_empty() || what.len() > MAX_IMAGE_REFERENCE_LEN || !what.chars().all(allowed) {
        return Err(EngineError::InvalidArgument(format!(
            "an image reference or digest is 1 to {MAX_IMAGE_REFERENCE_LEN} characters of \
             A-Z a-z 0-9 . _ - : / @ +, not {:?}",
            shown()
        )));
    }
    let digest = match what.rsplit_once('@') {
        Some((_, digest)) => Some(digest),
        None => what.starts_with("sha256:").then_some(what),
    };
    let hex = |h: &str| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if let Some(digest) = digest {
        if !digest.strip_prefix("sha256:").is_some_and(hex) {
            return Err(EngineError::InvalidArgument(format!(
                "an image digest is sha256: and 64 lowercase hex digits, not {:?}",
                shown()
            )));
        }
    }
    Ok(())
}

/// Check a path `ImportImage` is given: absolute, at most
/// [`MAX_IMPORT_PATH_LEN`] bytes, no control characters.
pub(crate) fn validate_import_path(path: &Path) -> Result<(), EngineError> {
    let text = path.to_string_lossy();
    if !path.is_absolute() || text.len() > MAX_IMPORT_PATH_LEN || text.chars().any(char::is_control)
    {
        return Err(EngineError::InvalidArgument(format!(
            "the path to import must be absolute, at most {MAX_IMPORT_PATH_LEN} bytes, \
             without control characters"
        )));
    }
    Ok(())
}

/// A render node as the APIs show it: what it is and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// Inventory facts (name, path, ids, driver, PCI address, NUMA node).
    #[serde(flatten)]
    pub node: RenderNode,
    /// Holders and free slots.
    #[serde(flatten)]
    pub usage: NodeUsage,
}

/// Check a lease lifetime against [`MIN_LEASE_TTL`] and [`MAX_LEASE_TTL`].
pub(crate) fn validate_ttl(ttl: Duration) -> Result<(), EngineError> {
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(EngineError::InvalidArgument(format!(
            "ttlSec must be between {} and {}",
            MIN_LEASE_TTL.as_secs(),
            MAX_LEASE_TTL.as_secs()
        )));
    }
    Ok(())
}
