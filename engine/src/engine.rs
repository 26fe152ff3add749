//! The engine actor: one task owns every VM record.
//!
//! Adapters send a [`Command`] through an [`EngineHandle`] and await its
//! typed reply. The actor validates, checks the state transition, persists,
//! and hands slow work (launching QEMU, waiting for the agent, stopping) to
//! sub-tasks. Those report back as [`Internal`] events tagged with the
//! *generation* of the process they were started for, so a late report about
//! an old process can never change a newer one's state. Facts (a process
//! exited, QEMU sent `SHUTDOWN`) always update the in-memory state even if
//! the disk write fails: the next reconcile will agree with them anyway.

mod gpus;
mod network;
mod nics;
mod pools;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{self as proto, ExecReply, ExecRequest, PingReply};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::accel::{Accel, HostVirt};
use crate::agent::AgentClient;
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::ids::{fill_random, is_vm_id, new_vm_id, now_usec};
use crate::pool::{PoolFileError, PoolInfo, PoolSpec};
use crate::process::{is_qemu_of, read_pid_file, VmProcess};
use crate::qemu::{GuestMemory, Machine, NicArgs, NicBackend, QemuLaunch, Qmp, QmpEvent};
use crate::spec::{validate_name, Limits, ResolvedSpec, SpecDefaults, VmSpec};
use crate::state::VmState;
use crate::store::{create_private_dir, remove_tree, BrokenRecord, Durability, RecordDir};
use crate::template::Template;
use crate::vm::{GuestInfo, NicInfo, VmInfo, VmRecord};

pub use self::gpus::GpuInfo;
use self::pools::{BootSource, PoolChange};
pub use self::pools::{
    DEFAULT_ACQUIRE_TIMEOUT, FAILED_AFTER, MAX_ACQUIRE_TIMEOUT, MAX_BACKOFF, MAX_LABELS,
    MAX_LABEL_VALUE_LEN,
};

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
    /// Run a command in the guest; valid while `ready` or `leased`.
    ExecVm {
        id: String,
        request: ExecRequest,
        reply: Reply<ExecReply>,
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
    Acquire {
        pool: String,
        timeout: Option<Duration>,
        holder: String,
        labels: BTreeMap<String, String>,
        reply: Reply<VmInfo>,
    },
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
    /// GPU nodes or their leases changed.
    GpusChanged { gpus: Vec<GpuInfo> },
}

/// Cloneable handle to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<EngineEvent>,
}

macro_rules! call {
    ($self:ident, $variant:ident { $($field:ident $(: $value:expr)?),* }) => {{
        let (reply, rx) = oneshot::channel();
        $self
            .commands
            .send(Command::$variant { $($field $(: $value)?,)* reply })
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }};
}

impl EngineHandle {
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
        let id = id.to_owned();
        call!(self, ExecVm { id, request })
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
        timeout: Option<Duration>,
        holder: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VmInfo, EngineError> {
        let (pool, holder) = (pool.to_owned(), holder.to_owned());
        call!(
            self,
            Acquire {
                pool,
                timeout,
                holder,
                labels
            }
        )
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
    /// See [`Command::Status`].
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        call!(self, Status {})
    }
    /// See [`Command::Shutdown`].
    pub async fn shutdown(&self, stop_vms: bool) -> Result<(), EngineError> {
        call!(self, Shutdown { stop_vms })
    }
}

/// How a process is being ended on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopIntent {
    Stop,
    Kill,
}

/// A VM's live process and connections.
#[derive(Debug)]
struct Runtime {
    generation: u64,
    process: Option<VmProcess>,
    qmp: Option<Qmp>,
    agent: Arc<AgentClient>,
    stop_intent: Option<StopIntent>,
    /// QEMU reported `SHUTDOWN`: the exit that follows is clean.
    shutdown_seen: bool,
}

#[derive(Debug)]
struct VmEntry {
    record: VmRecord,
    runtime: Option<Runtime>,
    /// A pause/resume/reboot is in flight.
    busy: bool,
    /// Waiting for `ready` (start, reboot).
    ready_waiters: Vec<Reply<VmInfo>>,
    /// Waiting for the process to be gone (stop, kill).
    exit_waiters: Vec<Reply<VmInfo>>,
    /// Delete once the process is gone.
    delete_waiters: Vec<Reply<()>>,
    /// Removal of the VM's TAP and forwards after its process exited; the
    /// next boot waits for it, so it cannot delete the new TAP.
    net_cleanup: Option<tokio::task::JoinHandle<()>>,
    /// A released pool VM: boot it again once its process is gone.
    recycle: bool,
    /// NICs with an attach or detach in flight.
    nic_ops: BTreeSet<u8>,
}

impl VmEntry {
    /// An entry with no process and nobody waiting.
    fn new(record: VmRecord) -> Self {
        Self {
            record,
            runtime: None,
            busy: false,
            ready_waiters: Vec::new(),
            exit_waiters: Vec::new(),
            delete_waiters: Vec::new(),
            net_cleanup: None,
            recycle: false,
            nic_ops: BTreeSet::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Pause,
    Resume,
}

impl Op {
    /// The operation's name in errors, and the state it leads to.
    fn name_and_target(self) -> (&'static str, VmState) {
        match self {
            Op::Pause => ("pause", VmState::Paused),
            Op::Resume => ("resume", VmState::Ready),
        }
    }
}

/// Reports from sub-tasks to the actor.
#[derive(Debug)]
enum Internal {
    Launched {
        id: String,
        generation: u64,
        process: VmProcess,
        qmp: Qmp,
        qemu_version: String,
    },
    BootDone {
        id: String,
        generation: u64,
        result: Result<PingReply, EngineError>,
    },
    Exited {
        id: String,
        generation: u64,
    },
    /// The boot sub-task made the VM's TAP.
    NicUp {
        id: String,
        generation: u64,
        ifindex: u32,
    },
    Qmp {
        id: String,
        generation: u64,
        event: QmpEvent,
    },
    OpDone {
        id: String,
        generation: u64,
        op: Op,
        result: Result<(), EngineError>,
        reply: Reply<VmInfo>,
    },
    TemplateBuilt {
        pool: String,
        generation: u64,
        key: String,
        result: Result<Template, EngineError>,
    },
    /// A NIC hot-plug finished (or failed, everything undone).
    NicAttached {
        id: String,
        generation: u64,
        index: u8,
        result: Result<u32, EngineError>,
        reply: Reply<NicInfo>,
    },
    /// A NIC unplug finished (the guest released it) or failed.
    NicDetached {
        id: String,
        generation: u64,
        index: u8,
        result: Result<(), EngineError>,
        reply: Reply<()>,
    },
    /// A pool's back-off ended.
    PoolTick {
        pool: String,
    },
    /// The GPU watcher saw `/dev/dri` or `/sys/class/drm` change.
    GpusChanged,
    AcquireTimeout {
        pool: String,
        ticket: u64,
        timeout: Duration,
    },
}

/// The engine actor.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    defaults: SpecDefaults,
    limits: Limits,
    store: RecordDir,
    vms: HashMap<String, VmEntry>,
    broken: Vec<BrokenRecord>,
    next_generation: u64,
    /// Extra kernel arguments for TCG guests (measured once).
    tcg_cmdline: String,
    internal_tx: mpsc::UnboundedSender<Internal>,
    events: broadcast::Sender<EngineEvent>,
    pools: BTreeMap<String, pools::Pool>,
    pool_errors: Vec<PoolFileError>,
    /// Pool VM changes not yet acted on ([`Engine::settle_pools`]).
    pool_changes: Vec<PoolChange>,
    gpus: gpus::Gpus,
    /// kilnd's bridges (`[network]`, `[[networks]]`), each with the
    /// addresses and MACs of its VMs (rebuilt from the records on start:
    /// the records are the truth).
    bridges: network::Bridges,
}

/// Descriptor number of a VM's TAP in QEMU (`-netdev tap,fd=3`).
const TAP_FD: i32 = 3;

/// The MAC of a template VM's NIC. Clones start with it (it is part of the
/// saved device state) until the agent gives them their own.
fn template_mac() -> kiln_net::MacAddr {
    kiln_net::MacAddr::for_vm("000000000000", 0, 0)
}

impl Engine {
    /// Open the state, reconcile it with the processes that are running,
    /// and start the actor. Returns once reconciliation is done, so the
    /// caller may announce readiness.
    pub async fn start(
        config: EngineConfig,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), EngineError> {
        let accel = config.accel.resolve(HostVirt::probe());
        let defaults = SpecDefaults {
            kernel: config.guest_dir.join("vmlinuz"),
            initrd: config.guest_dir.join("initramfs"),
            gpu_kernel: config.guest_dir.join("gpu/vmlinuz"),
            gpu_initrd: config.guest_dir.join("gpu/initramfs"),
            accel,
        };
        create_private_dir(&config.runtime_dir.join("vms"))?;
        let bridges =
            network::Bridges::open(config.network.clone(), config.networks.clone()).await?;
        let store = RecordDir::open(config.vm_records_dir())?;
        let (records, broken) = store.load_all::<VmRecord>()?;
        for b in &broken {
            error!(key = %b.key, path = %b.path.display(), reason = %b.reason, "VM record is broken, moved aside");
        }
        let (internal_tx, mut internal_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let mut engine = Engine {
            config,
            defaults,
            limits: Limits::for_host(),
            store,
            vms: HashMap::new(),
            broken,
            next_generation: 1,
            tcg_cmdline: crate::accel::tcg_kernel_args(),
            internal_tx,
            events: events.clone(),
            pools: BTreeMap::new(),
            pool_errors: Vec::new(),
            pool_changes: Vec::new(),
            gpus: gpus::Gpus::default(),
            bridges,
        };
        engine.reconcile(records).await;
        engine.reconcile_network().await;
        engine.load_gpus();
        engine.watch_gpus();
        engine.load_pools();
        engine.settle_pools();
        info!(accel = %accel, vms = engine.vms.len(), "engine ready");

        let (commands_tx, mut commands) = mpsc::channel::<Command>(256);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    command = commands.recv() => match command {
                        Some(Command::Shutdown { stop_vms, reply }) => {
                            engine.shutdown(stop_vms, &mut internal_rx).await;
                            let _ = reply.send(Ok(()));
                            break;
                        }
                        Some(command) => engine.handle(command),
                        None => break,
                    },
                    Some(internal) = internal_rx.recv() => engine.handle_internal(internal),
                }
                engine.settle_pools();
            }
        });
        Ok((
            EngineHandle {
                commands: commands_tx,
                events,
            },
            task,
        ))
    }

    // ----- commands -------------------------------------------------------

    fn handle(&mut self, command: Command) {
        match command {
            Command::CreateVm { name, spec, reply } => {
                let _ = reply.send(self.create_vm(name, spec));
            }
            Command::StartVm { id, reply } => self.start_vm(&id, reply),
            Command::StopVm { id, timeout, reply } => self.stop_vm(&id, timeout, reply),
            Command::KillVm { id, reply } => self.kill_vm(&id, reply),
            Command::PauseVm { id, reply } => self.pause_or_resume(&id, Op::Pause, reply),
            Command::ResumeVm { id, reply } => self.pause_or_resume(&id, Op::Resume, reply),
            Command::RebootVm { id, reply } => self.reboot_vm(&id, reply),
            Command::DeleteVm { id, reply } => self.delete_vm(&id, reply),
            Command::ListVms { reply } => {
                let mut vms: Vec<VmInfo> =
                    self.vms.values().map(|e| VmInfo::from(&e.record)).collect();
                vms.sort_by_key(|v| (v.created_at, v.id.clone()));
                let _ = reply.send(Ok(vms));
            }
            Command::DescribeVm { id, reply } => {
                let _ = reply.send(self.entry(&id).map(|e| VmInfo::from(&e.record)));
            }
            Command::ExecVm { id, request, reply } => self.exec_vm(&id, request, reply),
            Command::PingVm { id, timeout, reply } => self.ping_vm(&id, timeout, reply),
            Command::CreatePool { name, spec, reply } => {
                let _ = reply.send(self.create_pool(name, spec));
            }
            Command::ResizePool {
                name,
                warm,
                max,
                reply,
            } => {
                let _ = reply.send(self.resize_pool(&name, warm, max));
            }
            Command::DeletePool { name, reply } => {
                let _ = reply.send(self.delete_pool(&name));
            }
            Command::ListPools { reply } => {
                let _ = reply.send(Ok(self.list_pools()));
            }
            Command::DescribePool { name, reply } => {
                let _ = reply.send(self.pool_info(&name));
            }
            Command::Acquire {
                pool,
                timeout,
                holder,
                labels,
                reply,
            } => self.acquire(pool, timeout, holder, labels, reply),
            Command::Release { id, recycle, reply } => self.release(&id, recycle, reply),
            Command::AttachNic { id, address, reply } => self.attach_nic(&id, address, reply),
            Command::DetachNic { id, index, reply } => self.detach_nic(&id, index, reply),
            Command::ListNics { id, reply } => {
                let nics = self.entry(&id).map(|e| e.record.network.clone());
                let _ = reply.send(nics);
            }
            Command::ListGpus { reply } => {
                let _ = reply.send(Ok(self.list_gpus()));
            }
            Command::Status { reply } => {
                let _ = reply.send(Ok(self.status()));
            }
            Command::Shutdown { reply, .. } => {
                // Handled by the loop; unreachable in practice.
                let _ = reply.send(Err(EngineError::ShuttingDown));
            }
        }
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            accel: self.defaults.accel,
            vms: self.vms.len(),
            running: self
                .vms
                .values()
                .filter(|e| e.record.state.has_process())
                .count(),
            broken_records: self.broken.clone(),
            pool_errors: self.pool_errors.clone(),
        }
    }

    fn entry(&self, id: &str) -> Result<&VmEntry, EngineError> {
        self.vms
            .get(id)
            .ok_or_else(|| EngineError::NoSuchVM(truncate(id)))
    }

    fn entry_mut(&mut self, id: &str) -> Result<&mut VmEntry, EngineError> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NoSuchVM(truncate(id)))
    }

    fn create_vm(&mut self, name: String, spec: VmSpec) -> Result<VmInfo, EngineError> {
        validate_name(&name).map_err(EngineError::InvalidName)?;
        if self.vms.values().any(|e| e.record.name == name) {
            return Err(EngineError::AlreadyExists(name));
        }
        let spec = spec
            .resolve(&self.defaults, &self.limits)
            .map_err(EngineError::InvalidSpec)?;
        let record = VmRecord::new(self.unused_vm_id(), name, spec, None);
        self.insert_vm(record)
    }

    /// A fresh id no VM has.
    fn unused_vm_id(&self) -> String {
        loop {
            let id = new_vm_id();
            if !self.vms.contains_key(&id) {
                return id;
            }
        }
    }

    /// Persist a new record and start tracking it. A bridge VM gets its
    /// address and MAC here, in the record before anything is created.
    fn insert_vm(&mut self, mut record: VmRecord) -> Result<VmInfo, EngineError> {
        self.allocate_network(&mut record)?;
        if let Err(e) = self.store.write(&record.id, &record) {
            if let Some(bridge) = self.bridges.of_spec_mut(&record.spec) {
                bridge.ipam.release(&record.id);
            }
            return Err(e.into());
        }
        let info = VmInfo::from(&record);
        info!(vm = %record.id, name = %record.name, "VM created");
        let id = record.id.clone();
        self.note_pool_change(&record, record.state, false);
        self.vms.insert(id, VmEntry::new(record));
        let _ = self.events.send(EngineEvent::VmAdded { vm: info.clone() });
        Ok(info)
    }

    /// Apply a caller-requested change: persisted first, applied in memory
    /// only if the write succeeded.
    fn update(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmInfo, EngineError> {
        self.update_with(id, Durability::Durable, change)
    }

    /// [`Engine::update`] with a chosen durability (see [`Durability`]).
    fn update_with(
        &mut self,
        id: &str,
        durability: Durability,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmInfo, EngineError> {
        let entry = self
            .vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NoSuchVM(truncate(id)))?;
        let mut record = entry.record.clone();
        change(&mut record);
        self.store.write_with(id, &record, durability)?;
        let from = std::mem::replace(&mut entry.record, record).state;
        let record = entry.record.clone();
        let info = VmInfo::from(&record);
        self.note_pool_change(&record, from, false);
        let _ = self
            .events
            .send(EngineEvent::VmChanged { vm: info.clone() });
        Ok(info)
    }

    /// Record a fact (the process exited, the guest answered): applied in
    /// memory even if the write fails, since it is true either way.
    fn record_fact(&mut self, id: &str, change: impl FnOnce(&mut VmRecord)) {
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        let from = entry.record.state;
        change(&mut entry.record);
        if let Err(e) = self.store.write(id, &entry.record) {
            error!(vm = %id, error = %EngineError::from(e).message(), "cannot persist VM record");
        }
        let record = entry.record.clone();
        let _ = self.events.send(EngineEvent::VmChanged {
            vm: VmInfo::from(&record),
        });
        self.note_pool_change(&record, from, false);
    }

    fn start_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        if state.check_transition(VmState::Booting).is_err() || entry.runtime.is_some() {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "start",
            })));
        }
        self.begin_boot(id, BootSource::Cold, Some(reply));
    }

    /// Launch a VM's process (cold, or restored from a template) and hand
    /// the wait for its agent to a sub-task. The caller checked that the VM
    /// may boot. Pool VMs also get their own identity before they count as
    /// ready.
    fn begin_boot(&mut self, id: &str, source: BootSource, reply: Option<Reply<VmInfo>>) {
        let template = match &source {
            BootSource::Cold => None,
            BootSource::Clone(t) => Some(t.dir.clone()),
        };
        // GPUs first: without them the VM does not start at all.
        let Some(spec) = self.vms.get(id).map(|e| e.record.spec.clone()) else {
            return;
        };
        if let Err(e) = self.check_network(id) {
            match reply {
                Some(reply) => drop(reply.send(Err(e))),
                None => self.pool_vm_not_started(id, e),
            }
            return;
        }
        let gpu_args = match self.lease_gpus(id, &spec) {
            Ok(args) => args,
            Err(e) => {
                warn!(vm = %id, error = %e.message(), "cannot start VM");
                match reply {
                    Some(reply) => drop(reply.send(Err(e))),
                    None => self.pool_vm_not_started(id, e),
                }
                return;
            }
        };
        let gpu_nodes = self.gpus_of(id);
        let result = self.update(id, |r| {
            r.state = VmState::Booting;
            r.started_at = Some(now_usec());
            r.ready_at = None;
            r.pid = None;
            r.guest = None;
            r.last_error = None;
            r.template = template;
            r.gpus = gpu_nodes;
        });
        if let Err(e) = result {
            self.release_gpus(id);
            if let Some(reply) = reply {
                let _ = reply.send(Err(e));
            }
            return;
        }
        let generation = self.next_generation();
        let runtime_dir = self.config.vm_runtime_dir(id);
        let agent = Arc::new(AgentClient::new(runtime_dir.join("agent.sock")));
        let Some(record) = self.vms.get(id).map(|e| &e.record) else {
            return;
        };
        let (memory, restore) = match &source {
            BootSource::Cold => (GuestMemory::Anonymous, None),
            BootSource::Clone(t) => (GuestMemory::TemplateClone(t.memory()), Some(t.state())),
        };
        let mut launch = self.launch_for_spec(id, &record.spec, &runtime_dir, memory);
        launch.incoming = restore.is_some();
        launch.gpu = gpu_args;
        let net = self.net_plan(id, restore.is_some());
        if let Some(n) = &net {
            launch.nics = vec![NicArgs {
                backend: NicBackend::TapFd(TAP_FD),
                mac: n.device_mac.to_string(),
            }];
        }
        let Some(record) = self.vms.get(id).map(|e| &e.record) else {
            return;
        };
        let identity = record.pool.is_some().then(|| fresh_identity(&record.name));
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        entry.runtime = Some(Runtime {
            generation,
            process: None,
            qmp: None,
            agent: agent.clone(),
            stop_intent: None,
            shutdown_seen: false,
        });
        entry.ready_waiters.extend(reply);
        let tx = self.internal_tx.clone();
        let mut plan = BootPlan {
            launch,
            runtime_dir,
            restore,
            net,
            identity,
            qmp_timeout: self.config.qmp_timeout(),
            boot_timeout: self.config.boot_timeout(),
        };
        let id = id.to_owned();
        info!(vm = %id, generation, clone = plan.restore.is_some(), "starting VM");
        tokio::spawn(async move {
            if let Some(cleanup) = plan.net.as_mut().and_then(|n| n.cleanup.take()) {
                let _ = cleanup.await;
            }
            let result = boot(&id, generation, &plan, agent, &tx).await;
            let _ = tx.send(Internal::BootDone {
                id,
                generation,
                result,
            });
        });
    }

    /// The QEMU launch of VM `id` with `spec`, its runtime files in
    /// `runtime_dir` and its RAM in `memory`.
    fn launch_for_spec(
        &self,
        id: &str,
        spec: &ResolvedSpec,
        runtime_dir: &Path,
        memory: GuestMemory,
    ) -> QemuLaunch {
        let mut cmdline = QemuLaunch::BASE_CMDLINE.to_owned();
        for extra in [
            if spec.accel == Accel::Tcg {
                self.tcg_cmdline.as_str()
            } else {
                ""
            },
            &spec.cmdline,
        ] {
            if !extra.is_empty() {
                cmdline.push(' ');
                cmdline.push_str(extra);
            }
        }
        QemuLaunch {
            binary: self.config.qemu_binary.clone(),
            vm_id: id.to_owned(),
            machine: if spec.needs_pci_machine() {
                Machine::Q35
            } else {
                Machine::Microvm
            },
            accel: spec.accel,
            tcg_tb_size_mib: self.config.tcg_tb_size_mib,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline,
            qmp_socket: runtime_dir.join("qmp.sock"),
            agent_socket: runtime_dir.join("agent.sock"),
            console_log: runtime_dir.join("console.log"),
            pid_file: runtime_dir.join("qemu.pid"),
            memory,
            incoming: false,
            gpu: Vec::new(),
            // Isolated until the boot gives it a TAP: the template VM's NIC.
            nics: spec
                .network
                .iter()
                .map(|_| NicArgs {
                    backend: NicBackend::Isolated,
                    mac: template_mac().to_string(),
                })
                .collect(),
            hotplug_slots: spec.hotplug_slots(),
        }
    }

    /// Follow `/dev/dri` and `/sys/class/drm` for GPU hot-plug.
    fn watch_gpus(&self) {
        let watcher =
            kiln_gpu::GpuWatcher::new(&self.config.gpu_sysfs_root, &self.config.gpu_dev_root);
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => return debug!(error = %e, "not watching GPU render nodes"),
        };
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            while watcher.changed().await.is_ok() {
                if tx.send(Internal::GpusChanged).is_err() {
                    return;
                }
            }
        });
    }

    fn next_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    fn stop_vm(&mut self, id: &str, timeout: Option<Duration>, reply: Reply<VmInfo>) {
        let timeout = timeout.unwrap_or(Duration::from_secs(self.config.stop_timeout_sec));
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        if !state.has_process() || entry.runtime.is_none() {
            // Already stopped: stopping again is a no-op.
            return drop(reply.send(Ok(VmInfo::from(&entry.record))));
        }
        entry.exit_waiters.push(reply);
        if state == VmState::Stopping {
            return;
        }
        let graceful = state.guest_answers();
        let Some(runtime) = entry.runtime.as_mut() else {
            return;
        };
        runtime.stop_intent = Some(StopIntent::Stop);
        let (process, qmp, agent) = (
            runtime.process.clone(),
            runtime.qmp.clone(),
            runtime.agent.clone(),
        );
        self.record_fact(id, |r| r.state = VmState::Stopping);
        let Some(process) = process else {
            // Still launching: `Launched` will see the intent and kill it.
            if let Some(rt) = self.vms.get_mut(id).and_then(|e| e.runtime.as_mut()) {
                rt.stop_intent = Some(StopIntent::Kill);
            }
            return;
        };
        info!(vm = %id, ?timeout, "stopping VM");
        tokio::spawn(stop_gracefully(process, qmp, agent, graceful, timeout));
    }

    fn kill_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.runtime.is_none() {
            return drop(reply.send(Ok(VmInfo::from(&entry.record))));
        }
        entry.exit_waiters.push(reply);
        self.kill_process(id);
    }

    /// SIGKILL a VM's process now, or as soon as it is launched.
    fn kill_process(&mut self, id: &str) {
        let Some(runtime) = self.vms.get_mut(id).and_then(|e| e.runtime.as_mut()) else {
            return;
        };
        runtime.stop_intent = Some(StopIntent::Kill);
        if let Some(process) = &runtime.process {
            info!(vm = %id, pid = process.pid, "killing VM");
            if let Err(e) = process.kill() {
                error!(vm = %id, error = %e, "cannot kill QEMU");
            }
        }
    }

    fn pause_or_resume(&mut self, id: &str, op: Op, reply: Reply<VmInfo>) {
        let (operation, target) = op.name_and_target();
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        let allowed = match op {
            Op::Pause => state.guest_answers(),
            Op::Resume => state == VmState::Paused,
        } && state.check_transition(target).is_ok();
        let qmp = entry
            .runtime
            .as_ref()
            .and_then(|r| r.qmp.clone().map(|q| (q, r.generation)));
        let Some((qmp, generation)) = qmp.filter(|_| allowed) else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation,
            })));
        };
        if entry.busy {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        }
        entry.busy = true;
        let tx = self.internal_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let result = match op {
                Op::Pause => qmp.stop().await,
                Op::Resume => qmp.cont().await,
            }
            .map_err(EngineError::from);
            let _ = tx.send(Internal::OpDone {
                id,
                generation,
                op,
                result,
                reply,
            });
        });
    }

    fn reboot_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        let Some(runtime) = entry.runtime.as_ref().filter(|_| state.guest_answers()) else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "reboot",
            })));
        };
        if entry.busy {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        }
        let (agent, qmp, generation, qemu) = (
            runtime.agent.clone(),
            runtime.qmp.clone(),
            runtime.generation,
            runtime.process.clone(),
        );
        let old_boot_id = entry.record.guest.as_ref().map(|g| g.boot_id.clone());
        entry.busy = true;
        entry.ready_waiters.push(reply);
        self.record_fact(id, |r| {
            r.state = VmState::Booting;
            r.ready_at = None;
        });
        let tx = self.internal_tx.clone();
        let boot_timeout = self.config.boot_timeout();
        let guest_net = self.guest_net(id);
        let id = id.to_owned();
        info!(vm = %id, "rebooting VM");
        tokio::spawn(async move {
            let asked: Result<serde_json::Value, _> = agent
                .call(
                    proto::method::REBOOT,
                    &serde_json::json!({}),
                    Duration::from_secs(5),
                )
                .await;
            if asked.is_err() {
                if let Some(qmp) = &qmp {
                    let _ = qmp.system_reset().await;
                }
            }
            let next = NextBoot {
                id,
                generation,
                agent,
                qemu,
                old_boot_id,
                guest_net,
                timeout: boot_timeout,
            };
            next.report(&tx).await;
        });
    }

    fn delete_vm(&mut self, id: &str, reply: Reply<()>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.runtime.is_some() {
            entry.delete_waiters.push(reply);
            self.kill_process(id);
            return;
        }
        let _ = reply.send(self.remove_vm(id));
    }

    fn remove_vm(&mut self, id: &str) -> Result<(), EngineError> {
        self.store.remove(id)?;
        remove_tree(&self.config.vm_runtime_dir(id));
        self.release_gpus(id);
        self.release_network(id);
        if let Some(entry) = self.vms.remove(id) {
            self.note_pool_change(&entry.record, entry.record.state, true);
            for waiter in entry.ready_waiters {
                let _ = waiter.send(Err(EngineError::NoSuchVM(id.to_owned())));
            }
        }
        info!(vm = %id, "VM deleted");
        let _ = self
            .events
            .send(EngineEvent::VmRemoved { id: id.to_owned() });
        Ok(())
    }

    fn exec_vm(&mut self, id: &str, request: ExecRequest, reply: Reply<ExecReply>) {
        // Input first: a malformed request is refused whatever the id.
        if let Err(e) = validate_exec(&request) {
            return drop(reply.send(Err(e)));
        }
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        let Some(runtime) = entry.runtime.as_ref().filter(|_| state.guest_answers()) else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "exec",
            })));
        };
        let agent = runtime.agent.clone();
        let timeout = request
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_EXEC_TIMEOUT);
        let mut request = request;
        request.timeout_ms = Some(timeout.as_millis() as u64);
        tokio::spawn(async move {
            // The agent enforces the timeout; ours covers a guest that hangs.
            let result = agent
                .call(
                    proto::method::EXEC,
                    &request,
                    timeout + Duration::from_secs(5),
                )
                .await
                .map_err(EngineError::from);
            let _ = reply.send(result);
        });
    }

    fn ping_vm(&mut self, id: &str, timeout: Duration, reply: Reply<PingReply>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state;
        let Some(runtime) = entry.runtime.as_ref() else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "ping",
            })));
        };
        let agent = runtime.agent.clone();
        let timeout = timeout.min(Duration::from_secs(60));
        tokio::spawn(async move {
            let _ = reply.send(agent.ping(timeout).await.map_err(EngineError::from));
        });
    }

    // ----- internal events -------------------------------------------------

    fn runtime_of(&mut self, id: &str, generation: u64) -> Option<&mut Runtime> {
        self.vms
            .get_mut(id)?
            .runtime
            .as_mut()
            .filter(|r| r.generation == generation)
    }

    fn handle_internal(&mut self, event: Internal) {
        match event {
            Internal::Launched {
                id,
                generation,
                process,
                qmp,
                qemu_version,
            } => {
                let Some(runtime) = self.runtime_of(&id, generation) else {
                    warn!(vm = %id, pid = process.pid, "QEMU launched for a VM that moved on, killing it");
                    let _ = process.kill();
                    return;
                };
                let pid = process.pid;
                let kill_now = runtime.stop_intent.is_some();
                runtime.process = Some(process);
                runtime.qmp = Some(qmp);
                self.record_fact(&id, |r| {
                    r.pid = Some(pid);
                    r.qemu_version = Some(qemu_version);
                });
                if kill_now {
                    self.kill_process(&id);
                }
            }
            Internal::BootDone {
                id,
                generation,
                result,
            } => self.boot_done(&id, generation, result),
            Internal::Exited { id, generation } => self.exited(&id, generation),
            Internal::NicUp {
                id,
                generation,
                ifindex,
            } => {
                if self.runtime_of(&id, generation).is_some() {
                    self.record_fact(&id, |r| {
                        if let Some(nic) = r.network.iter_mut().find(|n| n.index == 0) {
                            nic.ifindex = ifindex;
                        }
                    });
                }
            }
            Internal::Qmp {
                id,
                generation,
                event,
            } => self.qmp_event(&id, generation, event),
            Internal::TemplateBuilt {
                pool,
                generation,
                key,
                result,
            } => self.template_built(&pool, generation, key, result),
            Internal::NicAttached {
                id,
                generation,
                index,
                result,
                reply,
            } => self.nic_attached(&id, generation, index, result, reply),
            Internal::NicDetached {
                id,
                generation,
                index,
                result,
                reply,
            } => self.nic_detached(&id, generation, index, result, reply),
            Internal::PoolTick { pool } => self.pool_tick(&pool),
            Internal::GpusChanged => self.rescan_gpus(),
            Internal::AcquireTimeout {
                pool,
                ticket,
                timeout,
            } => self.acquire_timed_out(&pool, ticket, timeout),
            Internal::OpDone {
                id,
                generation,
                op,
                result,
                reply,
            } => {
                let Some(entry) = self.vms.get_mut(&id) else {
                    return drop(reply.send(Err(EngineError::NoSuchVM(id))));
                };
                entry.busy = false;
                let current = entry.runtime.as_ref().map(|r| r.generation) == Some(generation);
                if let Err(e) = result {
                    return drop(reply.send(Err(e)));
                }
                let (operation, target) = op.name_and_target();
                if !current {
                    let state = entry.record.state;
                    return drop(reply.send(Err(EngineError::InvalidState {
                        id,
                        state,
                        operation,
                    })));
                }
                // The STOP/RESUME event may have applied it already.
                if entry.record.state != target
                    && entry.record.state.check_transition(target).is_ok()
                {
                    self.record_fact(&id, |r| r.state = target);
                }
                let info = self.vms.get(&id).map(|e| VmInfo::from(&e.record));
                let _ = reply.send(info.ok_or(EngineError::NoSuchVM(id)));
            }
        }
    }

    fn boot_done(&mut self, id: &str, generation: u64, result: Result<PingReply, EngineError>) {
        if self.runtime_of(id, generation).is_none() {
            // The process is already gone and `exited` settled the waiters.
            return;
        }
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        entry.busy = false;
        let state = entry.record.state;
        match result {
            Ok(ping) if state == VmState::Booting => {
                let guest = GuestInfo {
                    agent_version: ping.agent_version,
                    kernel_release: ping.kernel_release,
                    boot_id: ping.boot_id,
                };
                self.record_fact(id, |r| {
                    r.state = VmState::Ready;
                    r.ready_at = Some(now_usec());
                    r.guest = Some(guest);
                });
                let Some(entry) = self.vms.get_mut(id) else {
                    return;
                };
                let info = VmInfo::from(&entry.record);
                if let (Some(started), Some(ready)) = (info.started_at, info.ready_at) {
                    info!(vm = %id, boot_ms = (ready.saturating_sub(started)) / 1000, "VM ready");
                }
                for waiter in entry.ready_waiters.drain(..) {
                    let _ = waiter.send(Ok(info.clone()));
                }
            }
            Ok(_) => {
                // Stopped or killed while booting: `exited` will settle waiters.
            }
            Err(e) => {
                let console = console_tail(&self.config.vm_runtime_dir(id).join("console.log"));
                let message = match console {
                    Some(tail) => format!("{}; console: {tail}", e.message()),
                    None => e.message(),
                };
                warn!(vm = %id, error = %message, "boot failed");
                if state.check_transition(VmState::Failed).is_ok() {
                    let m = message.clone();
                    self.record_fact(id, |r| {
                        r.state = VmState::Failed;
                        r.last_error = Some(m);
                    });
                }
                let Some(entry) = self.vms.get_mut(id) else {
                    return;
                };
                for waiter in entry.ready_waiters.drain(..) {
                    let _ = waiter.send(Err(EngineError::BootFailed(message.clone())));
                }
                let has_process = entry.runtime.as_ref().is_some_and(|r| r.process.is_some());
                if has_process {
                    self.kill_process(id);
                } else {
                    // Never launched: nothing will exit, settle now.
                    self.exited(id, generation);
                }
            }
        }
    }

    fn exited(&mut self, id: &str, generation: u64) {
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        if entry.runtime.as_ref().map(|r| r.generation) != Some(generation) {
            return;
        }
        let Some(runtime) = entry.runtime.take() else {
            return;
        };
        entry.busy = false;
        let state = entry.record.state;
        let clean =
            runtime.stop_intent.is_some() || runtime.shutdown_seen || state == VmState::Stopping;
        let runtime_dir = self.config.vm_runtime_dir(id);
        let (next, error) = match state {
            VmState::Failed => (VmState::Failed, None),
            _ if clean => (VmState::Stopped, None),
            _ => {
                let tail = console_tail(&runtime_dir.join("console.log"));
                let msg = match tail {
                    Some(t) => format!("QEMU exited unexpectedly; console: {t}"),
                    None => "QEMU exited unexpectedly".to_owned(),
                };
                (VmState::Failed, Some(msg))
            }
        };
        if next == VmState::Failed && state != VmState::Failed {
            warn!(vm = %id, "QEMU exited unexpectedly, VM failed");
        } else {
            info!(vm = %id, state = %next, "QEMU exited");
        }
        remove_tree(&runtime_dir);
        if state != next && state.check_transition(next).is_err() {
            warn!(vm = %id, from = %state, to = %next, "unexpected transition on exit");
        }
        self.release_gpus(id);
        self.remove_taps(id);
        self.drop_hotplugged_nics(id);
        self.record_fact(id, |r| {
            r.state = next;
            r.pid = None;
            r.template = None;
            r.gpus.clear();
            for nic in &mut r.network {
                nic.ifindex = 0;
            }
            if error.is_some() {
                r.last_error = error;
            }
        });
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        let info = VmInfo::from(&entry.record);
        for waiter in entry.exit_waiters.drain(..) {
            let _ = waiter.send(Ok(info.clone()));
        }
        for waiter in entry.ready_waiters.drain(..) {
            let _ = waiter.send(Err(EngineError::BootFailed(format!("VM is {next}"))));
        }
        let deletes: Vec<_> = entry.delete_waiters.drain(..).collect();
        if !deletes.is_empty() {
            let result = self.remove_vm(id);
            let failure = result.err().map(|e| e.message());
            for waiter in deletes {
                let _ = waiter.send(match &failure {
                    None => Ok(()),
                    Some(message) => {
                        Err(EngineError::StorageFailed(crate::store::StoreError::Io {
                            path: self.config.vm_records_dir(),
                            source: std::io::Error::other(message.clone()),
                        }))
                    }
                });
            }
        }
    }

    fn qmp_event(&mut self, id: &str, generation: u64, event: QmpEvent) {
        let Some(runtime) = self.runtime_of(id, generation) else {
            return;
        };
        debug!(vm = %id, event = %event.event, "QMP event");
        match event.event.as_str() {
            "SHUTDOWN" => runtime.shutdown_seen = true,
            "STOP" | "RESUME" | "RESET" => {
                let agent = runtime.agent.clone();
                let qemu = runtime.process.clone();
                let Some(entry) = self.vms.get(id) else {
                    return;
                };
                let state = entry.record.state;
                let busy = entry.busy;
                match event.event.as_str() {
                    "STOP" if state.guest_answers() => {
                        self.record_fact(id, |r| r.state = VmState::Paused)
                    }
                    "RESUME" if state == VmState::Paused => {
                        self.record_fact(id, |r| r.state = VmState::Ready)
                    }
                    "RESET" if state.guest_answers() && !busy => {
                        // The guest rebooted on its own: wait for it again.
                        info!(vm = %id, "guest reset, waiting for the agent");
                        self.record_fact(id, |r| {
                            r.state = VmState::Booting;
                            r.ready_at = None;
                        });
                        if let Some(e) = self.vms.get_mut(id) {
                            e.busy = true;
                        }
                        let old = self
                            .vms
                            .get(id)
                            .and_then(|e| e.record.guest.as_ref())
                            .map(|g| g.boot_id.clone());
                        let tx = self.internal_tx.clone();
                        let next = NextBoot {
                            id: id.to_owned(),
                            generation,
                            agent,
                            qemu,
                            old_boot_id: old,
                            guest_net: self.guest_net(id),
                            timeout: self.config.boot_timeout(),
                        };
                        tokio::spawn(async move { next.report(&tx).await });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    // ----- start-up and shutdown -----------------------------------------

    /// Match records with reality: re-adopt live QEMUs, fail the dead, and
    /// remove runtime leftovers no record owns.
    async fn reconcile(&mut self, records: Vec<(String, VmRecord)>) {
        let mut known = std::collections::HashSet::new();
        for (key, record) in records {
            if key != record.id || !is_vm_id(&record.id) {
                error!(key = %key, "VM record id does not match its file name, ignoring it");
                continue;
            }
            known.insert(record.id.clone());
            let id = record.id.clone();
            self.vms.insert(id.clone(), VmEntry::new(record));
            self.readopt(&id).await;
        }
        self.remove_orphan_runtime_dirs(&known);
    }

    async fn readopt(&mut self, id: &str) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        let state = entry.record.state;
        if !state.has_process() {
            return;
        }
        let runtime_dir = self.config.vm_runtime_dir(id);
        let pid = entry
            .record
            .pid
            .or_else(|| read_pid_file(&runtime_dir.join("qemu.pid")));
        let process = pid
            .filter(|pid| is_qemu_of(*pid, id))
            .and_then(|pid| VmProcess::attach(pid).ok());
        let Some(process) = process else {
            warn!(vm = %id, was = %state, "QEMU is gone, marking the VM failed");
            remove_tree(&runtime_dir);
            self.record_fact(id, |r| {
                r.state = VmState::Failed;
                r.pid = None;
                r.last_error = Some("QEMU exited while kilnd was not running".into());
            });
            return;
        };
        let connected =
            Qmp::connect(&runtime_dir.join("qmp.sock"), self.config.qmp_timeout()).await;
        let (qmp, version, events) = match connected {
            Ok(c) => c,
            Err(e) => {
                warn!(vm = %id, error = %e, "cannot reach QMP of a live QEMU, killing it");
                let _ = process.kill();
                tokio::time::timeout(Duration::from_secs(5), process.exited())
                    .await
                    .ok();
                remove_tree(&runtime_dir);
                self.record_fact(id, |r| {
                    r.state = VmState::Failed;
                    r.pid = None;
                    r.last_error = Some(format!("re-adoption failed: {e}"));
                });
                return;
            }
        };
        self.reconcile_hotplugged_nics(id, &qmp).await;
        let generation = self.next_generation();
        let paused = qmp
            .query_status()
            .await
            .map(|s| !s.running)
            .unwrap_or(false);
        let agent = Arc::new(AgentClient::new(runtime_dir.join("agent.sock")));
        tokio::spawn(monitor(
            id.to_owned(),
            generation,
            process.clone(),
            events,
            self.internal_tx.clone(),
        ));
        let pid = process.pid;
        let qemu = process.clone();
        if let Some(entry) = self.vms.get_mut(id) {
            entry.runtime = Some(Runtime {
                generation,
                process: Some(process),
                qmp: Some(qmp),
                agent: agent.clone(),
                stop_intent: None,
                shutdown_seen: false,
            });
        }
        info!(vm = %id, pid, state = %state, "re-adopted running VM");
        let next = match state {
            VmState::Ready | VmState::Leased if paused => VmState::Paused,
            VmState::Paused if !paused => VmState::Ready,
            other => other,
        };
        self.record_fact(id, |r| {
            r.state = next;
            r.pid = Some(pid);
            r.qemu_version = Some(version.0);
        });
        match next {
            VmState::Stopping => self.kill_process(id),
            VmState::Booting => {
                let tx = self.internal_tx.clone();
                let next = NextBoot {
                    id: id.to_owned(),
                    generation,
                    agent,
                    qemu: Some(qemu),
                    old_boot_id: None,
                    guest_net: self.guest_net(id),
                    timeout: self.config.boot_timeout(),
                };
                tokio::spawn(async move { next.report(&tx).await });
            }
            _ => {}
        }
    }

    fn remove_orphan_runtime_dirs(&self, known: &std::collections::HashSet<String>) {
        let Ok(dirs) = std::fs::read_dir(self.config.runtime_dir.join("vms")) else {
            return;
        };
        for dir in dirs.filter_map(Result::ok) {
            let name = dir.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            if let Some(pid) = read_pid_file(&dir.path().join("qemu.pid")) {
                if is_qemu_of(pid, &name) {
                    warn!(vm = %name, pid, "killing a QEMU no record owns");
                    if let Ok(p) = VmProcess::attach(pid) {
                        let _ = p.kill();
                    }
                }
            }
            remove_tree(&dir.path());
        }
    }

    async fn shutdown(&mut self, stop_vms: bool, internal: &mut mpsc::UnboundedReceiver<Internal>) {
        if !stop_vms {
            info!("shutting down, VMs keep running");
            return;
        }
        let ids: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| e.runtime.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        info!(count = ids.len(), "shutting down, stopping VMs");
        let mut waits = Vec::new();
        for id in ids {
            let (reply, rx) = oneshot::channel();
            self.stop_vm(&id, None, reply);
            waits.push(rx);
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.config.stop_timeout_sec + 5);
        while self.vms.values().any(|e| e.runtime.is_some()) {
            match tokio::time::timeout_at(deadline, internal.recv()).await {
                Ok(Some(event)) => self.handle_internal(event),
                _ => break,
            }
        }
    }
}

fn truncate(id: &str) -> String {
    id.chars().take(64).collect()
}

fn validate_exec(request: &ExecRequest) -> Result<(), EngineError> {
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

/// How a boot sub-task launches a VM.
#[derive(Debug)]
struct BootPlan {
    launch: QemuLaunch,
    runtime_dir: PathBuf,
    /// Template state to load (a clone).
    restore: Option<PathBuf>,
    /// The VM's NIC (bridge mode).
    net: Option<NetPlan>,
    /// Identity the agent sets before the VM counts as ready (pool VMs).
    identity: Option<proto::SetIdentityRequest>,
    qmp_timeout: Duration,
    boot_timeout: Duration,
}

/// Launch QEMU, connect QMP, start the monitor, restore a template's state
/// if cloning, wait for the agent and give the guest its identity.
async fn boot(
    id: &str,
    generation: u64,
    plan: &BootPlan,
    agent: Arc<AgentClient>,
    tx: &mpsc::UnboundedSender<Internal>,
) -> Result<PingReply, EngineError> {
    remove_tree(&plan.runtime_dir);
    create_private_dir(&plan.runtime_dir)?;
    let log = plan.runtime_dir.join("qemu.log");
    // The TAP first (about 3 ms): QEMU inherits it as fd 3.
    let tap = match &plan.net {
        Some(n) => {
            let tap = n.home.create_tap(id).await?;
            let _ = tx.send(Internal::NicUp {
                id: id.to_owned(),
                generation,
                ifindex: tap.index,
            });
            Some(tap)
        }
        None => None,
    };
    let inherit: Vec<_> = tap.iter().map(|t| (t.fd.as_fd(), TAP_FD)).collect();
    let process =
        VmProcess::launch(&plan.launch, &log, &inherit).map_err(EngineError::LaunchFailed)?;
    // QEMU holds the TAP now; the persistent TAP outlives kilnd's copy.
    drop(inherit);
    drop(tap);
    let (qmp, version, events) =
        match connect_when_up(&process, &plan.launch.qmp_socket, &log, plan.qmp_timeout).await {
            Ok(c) => c,
            Err(e) => {
                let _ = process.kill();
                return Err(e);
            }
        };
    tokio::spawn(monitor(
        id.to_owned(),
        generation,
        process.clone(),
        events,
        tx.clone(),
    ));
    let qemu = process.clone();
    let _ = tx.send(Internal::Launched {
        id: id.to_owned(),
        generation,
        process,
        qmp: qmp.clone(),
        qemu_version: version.0,
    });
    if let Some(state) = &plan.restore {
        // The template was saved paused, so the clone loads paused.
        qmp.enable_ignore_shared().await?;
        qmp.restore_from_file(state, plan.boot_timeout).await?;
        qmp.cont().await?;
    }
    let ping = until_qemu_exits(Some(&qemu), async {
        Ok(agent.wait_ready(plan.boot_timeout).await?)
    })
    .await?;
    if let Some(identity) = &plan.identity {
        let _: serde_json::Value = agent
            .call(proto::method::SET_IDENTITY, identity, plan.qmp_timeout)
            .await?;
    }
    if let Some(n) = &plan.net {
        agent.configure_network(&n.guest, plan.qmp_timeout).await?;
        // Forwards only once the guest has its address.
        if let network::TapHome::Bridge(net) = &n.home {
            for forward in &n.forwards {
                net.add_forward(forward.clone()).await?;
            }
        }
    }
    Ok(ping)
}

/// What the boot sub-task needs for a bridge VM's NIC.
#[derive(Debug)]
struct NetPlan {
    /// Where its TAP is made.
    home: network::TapHome,
    /// The MAC of QEMU's device: the VM's own, or a clone's template's.
    device_mac: kiln_net::MacAddr,
    /// What the agent is told.
    guest: proto::ConfigureNetworkRequest,
    forwards: Vec<kiln_net::PortForward>,
    /// The previous process's TAP removal, awaited before the new TAP.
    cleanup: Option<tokio::task::JoinHandle<()>>,
}

/// A hostname, a machine id and fresh host entropy: what makes a pool VM
/// (above all a clone, which starts with its template's RNG state) its own.
fn fresh_identity(name: &str) -> proto::SetIdentityRequest {
    let mut machine_id = [0u8; 16];
    fill_random(&mut machine_id);
    let mut entropy = [0u8; 32];
    fill_random(&mut entropy);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    proto::SetIdentityRequest {
        hostname: Some(name.to_owned()),
        machine_id: Some(hex(&machine_id)),
        entropy_hex: Some(hex(&entropy)),
    }
}

/// Connect to QMP as soon as QEMU listens; fail with QEMU's own message if
/// it exits first.
pub(crate) async fn connect_when_up(
    process: &VmProcess,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(Qmp, crate::qemu::qmp::QemuVersion, mpsc::Receiver<QmpEvent>), EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match Qmp::connect(socket, timeout).await {
            Ok(connected) => return Ok(connected),
            Err(crate::qemu::QmpError::Connect(_)) if process.is_alive() => {
                if tokio::time::Instant::now() > deadline {
                    return Err(EngineError::Timeout(
                        "QEMU did not open its QMP socket".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) if process.is_alive() => return Err(e.into()),
            Err(_) => {
                let message = std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let message = if message.is_empty() {
                    "QEMU exited at start".to_owned()
                } else {
                    message
                };
                return Err(EngineError::LaunchFailed(
                    crate::process::ProcessError::QemuRefused { message },
                ));
            }
        }
    }
}

/// A wait for the guest's next boot: used by reboot, a guest-initiated
/// reset and a re-adopted VM that was booting.
struct NextBoot {
    id: String,
    generation: u64,
    agent: Arc<AgentClient>,
    /// The VM's QEMU: its exit ends the wait at once (rather than polling
    /// the agent socket until the deadline).
    qemu: Option<VmProcess>,
    /// Wait for a boot other than this one (any boot when None).
    old_boot_id: Option<String>,
    /// Configure the network again once it answers.
    guest_net: Option<proto::ConfigureNetworkRequest>,
    timeout: Duration,
}

impl NextBoot {
    /// Start afresh with the agent, wait until it answers from a new boot,
    /// configure its network, and report that as `BootDone`.
    async fn report(self, tx: &mpsc::UnboundedSender<Internal>) {
        let agent = &self.agent;
        agent.disconnect().await;
        let waited = wait_for_new_boot(agent, self.old_boot_id.as_deref(), self.timeout);
        let mut result = until_qemu_exits(self.qemu.as_ref(), waited).await;
        // A new boot starts with the NIC unconfigured (and a clone's NIC
        // with the template's MAC again: QEMU resets the device to its own
        // MAC).
        if let (Ok(_), Some(request)) = (&result, &self.guest_net) {
            if let Err(e) = agent
                .configure_network(request, Duration::from_secs(10))
                .await
            {
                result = Err(e.into());
            }
        }
        let _ = tx.send(Internal::BootDone {
            id: self.id,
            generation: self.generation,
            result,
        });
    }
}

/// `wait` for the guest agent, cut short when `qemu` (if known) exits: a
/// QEMU killed or crashed mid-boot ends the wait at once, rather than
/// leaving a task polling the agent socket until the boot deadline.
async fn until_qemu_exits<T>(
    qemu: Option<&VmProcess>,
    wait: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    let Some(qemu) = qemu else {
        return wait.await;
    };
    tokio::select! {
        result = wait => result,
        () = qemu.exited() => Err(EngineError::BootFailed(
            "QEMU exited before the guest agent answered".into(),
        )),
    }
}

/// Wait until the agent answers from a boot other than `old_boot_id`.
async fn wait_for_new_boot(
    agent: &AgentClient,
    old_boot_id: Option<&str>,
    timeout: Duration,
) -> Result<PingReply, EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ping = agent.wait_ready(left).await?;
        if old_boot_id != Some(ping.boot_id.as_str()) {
            return Ok(ping);
        }
        // Still the old boot (the reboot has not happened yet).
        agent.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watch one QEMU: its exit and its QMP events.
async fn monitor(
    id: String,
    generation: u64,
    process: VmProcess,
    mut events: mpsc::Receiver<QmpEvent>,
    tx: mpsc::UnboundedSender<Internal>,
) {
    let mut events_open = true;
    loop {
        tokio::select! {
            () = process.exited() => {
                let _ = tx.send(Internal::Exited { id, generation });
                return;
            }
            event = events.recv(), if events_open => match event {
                Some(event) => {
                    let _ = tx.send(Internal::Qmp { id: id.clone(), generation, event });
                }
                None => events_open = false,
            },
        }
    }
}

/// Agent shutdown, then ACPI power button, then SIGKILL.
async fn stop_gracefully(
    process: VmProcess,
    qmp: Option<Qmp>,
    agent: Arc<AgentClient>,
    guest_answers: bool,
    timeout: Duration,
) {
    let exited_within = |d: Duration| {
        let p = process.clone();
        async move { tokio::time::timeout(d, p.exited()).await.is_ok() }
    };
    if guest_answers {
        let asked: Result<serde_json::Value, _> = agent
            .call(proto::method::SHUTDOWN, &serde_json::json!({}), timeout / 2)
            .await;
        if asked.is_ok() && exited_within(timeout / 2).await {
            return;
        }
    }
    if let Some(qmp) = qmp {
        if qmp.system_powerdown().await.is_ok() && exited_within(timeout / 4).await {
            return;
        }
    }
    let _ = process.kill();
}

/// Last lines of a console log, for error messages.
pub(crate) fn console_tail(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let start = bytes.len().saturating_sub(1024);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    (!tail.is_empty()).then_some(tail)
}
