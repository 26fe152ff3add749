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

mod containers;
mod gpus;
mod images;
mod network;
mod nics;
mod pod_network;
pub(crate) mod pools;
mod reconcile;
mod snapshots;
pub(crate) mod tasks;
mod vms;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::PingReply;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};

use crate::accel::HostVirt;
use crate::api::{Command, EngineEvent, EngineHandle, EngineStatus, Reply};
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::ids::new_vm_id;
use crate::qemu::QmpEvent;
use crate::spec::{Limits, SpecDefaults};
use crate::state::VmState;
use crate::store::{create_private_dir, BrokenRecord, Durability, RecordDir};
use crate::vm::{NicInfo, VmInfo, VmRecord};
use crate::vmm::qemu::QemuVmm;
use crate::vmm::{GuestAgent, Monitor, Process, Vmm};

use crate::pool::template::Template;

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
    process: Option<Arc<dyn Process>>,
    qmp: Option<Arc<dyn Monitor>>,
    agent: Arc<dyn GuestAgent>,
    stop_intent: Option<StopIntent>,
    /// QEMU reported `SHUTDOWN`: the exit that follows is clean.
    shutdown_seen: bool,
    /// The guest boot whose containers were started (a reboot starts
    /// them again).
    containers_boot: Option<String>,
    /// Stops the task that watches the containers for exits (dropped with
    /// the runtime).
    container_watch: Option<tokio::sync::oneshot::Sender<()>>,
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
    /// Containers (name, slot) being added or removed.
    container_ops: BTreeSet<(String, u8)>,
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
            container_ops: BTreeSet::new(),
        }
    }

    /// The VM's lease, or `InvalidState` naming `operation`.
    fn held_lease(&self, operation: &'static str) -> Result<&crate::vm::Lease, EngineError> {
        self.record
            .lease
            .as_ref()
            .ok_or_else(|| EngineError::InvalidState {
                id: self.record.id.clone(),
                state: self.record.state(),
                operation,
            })
    }

    /// The live runtime of a VM whose guest answers (`ready` or `leased`),
    /// or `InvalidState` naming `operation`.
    fn answering(&self, operation: &'static str) -> Result<&Runtime, EngineError> {
        let state = self.record.state();
        self.runtime
            .as_ref()
            .filter(|_| state.guest_answers())
            .ok_or_else(|| EngineError::InvalidState {
                id: self.record.id.clone(),
                state,
                operation,
            })
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

/// How a record change meets the disk.
#[derive(Debug, Clone, Copy)]
pub(super) enum Write {
    /// A caller's request: written first (with this durability) and applied
    /// only if the write worked, so a full disk fails the call and nothing
    /// is half-done.
    Request(Durability),
    /// A fact about the world (a process exited, the guest answered):
    /// applied even if the write fails, since it is true either way; the
    /// next reconcile agrees with it.
    Fact,
    /// A fact about a running process (its pid, its TAP's index, its
    /// guest's answer that makes it ready): as `Fact`, but not synced
    /// (`Durability::UntilHostCrash`): a host crash ends the process too,
    /// and a kilnd restart finds the file in the page cache. The first two
    /// are written while a clone restores, where two fsyncs in the actor
    /// cost the clone ~15 ms; the last is on every clone's path.
    RunningFact,
}

impl Write {
    /// How far the record must reach.
    fn durability(self) -> Durability {
        match self {
            Write::Request(durability) => durability,
            Write::Fact => Durability::Durable,
            Write::RunningFact => Durability::UntilHostCrash,
        }
    }
}

/// Reports from sub-tasks to the actor.
#[derive(Debug)]
enum Internal {
    Launched {
        id: String,
        generation: u64,
        process: Arc<dyn Process>,
        qmp: Arc<dyn Monitor>,
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
    /// A `JoinNetns` read the pod's interface (or could not).
    PodInspected {
        id: String,
        request: crate::api::PodNetworkRequest,
        inspected: Result<kiln_net::pod::PodInterface, EngineError>,
        reply: Reply<VmInfo>,
    },
    /// A `JoinNetns` finished (the TAP's index in the pod's namespace) or
    /// failed.
    NetnsJoined {
        id: String,
        generation: u64,
        result: Result<u32, EngineError>,
        reply: Reply<VmInfo>,
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
    /// A pull or import ended.
    ImageStored {
        result: Result<crate::images::ImageInfo, EngineError>,
        reply: Reply<crate::images::ImageInfo>,
    },
    /// A `RemoveImage` ended.
    ImageRemoved {
        result: Result<images::RemoveOutcome, EngineError>,
        reply: Reply<crate::api::ImageRemoved>,
    },
    /// A garbage collection of the image store ended.
    ImagesCollected {
        result: Result<kiln_image::GcReport, EngineError>,
    },
    /// A snapshot was saved (or not).
    SnapshotTaken {
        id: String,
        result: Result<crate::snapshot::SnapshotInfo, EngineError>,
        after: snapshots::AfterSnapshot,
    },
    /// A `CreateVm` with an image: the image is resolved (or not).
    VmImageResolved {
        id: String,
        name: String,
        spec: Box<crate::spec::ResolvedSpec>,
        result: Result<crate::container::ContainerRecord, EngineError>,
        reply: Reply<VmInfo>,
    },
    /// The containers of a new boot started (or the first failure).
    ContainersStarted {
        id: String,
        generation: u64,
        ping: PingReply,
        results: Vec<(String, Result<kiln_agent_proto::ContainerInfo, EngineError>)>,
    },
    /// An `AddContainer` ended (undone on failure).
    ContainerAdded {
        id: String,
        generation: u64,
        name: String,
        slot: u8,
        result: Result<crate::container::ContainerRecord, EngineError>,
        reply: Reply<crate::container::ContainerInfo>,
    },
    /// The guest side of a `RemoveContainer` ended.
    ContainerRemoved {
        id: String,
        container: Box<crate::container::ContainerRecord>,
        result: Result<(), EngineError>,
        reply: Reply<()>,
    },
    /// The agent listed a VM's containers.
    ContainersObserved {
        id: String,
        generation: u64,
        result: Result<Vec<kiln_agent_proto::ContainerInfo>, EngineError>,
        reply: Reply<Vec<crate::container::ContainerInfo>>,
    },
    /// A per-image pool's image was resolved (or not).
    PoolImageResolved {
        pool: String,
        result: Result<crate::container::ContainerRecord, EngineError>,
    },
    /// A watcher asked the agent about a VM's containers.
    ContainersPolled {
        id: String,
        generation: u64,
        containers: Vec<kiln_agent_proto::ContainerInfo>,
    },
    /// A container's restart ended.
    ContainerRestarted {
        id: String,
        generation: u64,
        name: String,
        result: Result<kiln_agent_proto::ContainerInfo, EngineError>,
    },
    /// The container of an `Acquire` started (or did not).
    LeasedContainerStarted {
        id: String,
        result: Result<(), EngineError>,
        reply: Reply<VmInfo>,
    },
    /// The image store's container users, for the start-up sweep.
    ImageUsersListed {
        users: Vec<(String, String)>,
    },
    /// A pool's back-off ended.
    PoolTick {
        pool: String,
    },
    /// The GPU watcher saw `/dev/dri` or `/sys/class/drm` change.
    GpusChanged,
    /// A lease's deadline (µs since the epoch) came.
    LeaseDue {
        id: String,
        deadline: u64,
    },
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
    /// How VMs are run (QEMU, or a fake in tests).
    vmm: Arc<dyn Vmm>,
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
    /// Pools, their definition errors and the pool VM changes not yet
    /// acted on.
    pools: pools::Pools,
    gpus: gpus::Gpus,
    /// kilnd's bridges (`[network]`, `[[networks]]`), each with the
    /// addresses and MACs of its VMs (rebuilt from the records on start:
    /// the records are the truth).
    bridges: network::Bridges,
    /// The image store, shared with the sub-tasks that use it.
    images: images::Images,
    /// VM creates waiting for their image (by id).
    creating: HashMap<String, containers::PendingCreate>,
    /// Where VM cgroups go (detected at start).
    cgroups: crate::cgroup::Layout,
    /// Whether kilnd makes VM cgroups itself: not where the hierarchy is
    /// read-only to it (systemd's `ProtectControlGroups=`), where each
    /// VM's limits go on its machined scope instead.
    own_cgroups: bool,
    /// The uids QEMUs run under; None: as kilnd's own user.
    qemu_users: Option<crate::qemu_user::QemuUsers>,
}

impl Engine {
    /// Open the state, reconcile it with the processes that are running,
    /// and start the actor. Returns once reconciliation is done, so the
    /// caller may announce readiness.
    pub async fn start(
        config: EngineConfig,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), EngineError> {
        Self::start_with(config, Arc::new(QemuVmm)).await
    }

    /// [`Engine::start`] with VMs run by `vmm`.
    pub async fn start_with(
        config: EngineConfig,
        vmm: Arc<dyn Vmm>,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), EngineError> {
        let accel = config.accel.resolve(HostVirt::probe());
        let (initrd, gpu_initrd) = (
            config.guest_dir.join("initramfs"),
            config.guest_dir.join("gpu/initramfs"),
        );
        // Both kernels at once: each is hashed (and unpacked the first
        // time) on a blocking thread.
        let (kernel, gpu_kernel) = tokio::join!(
            crate::guest_kernel::as_booted(
                config.guest_dir.join("vmlinuz"),
                &initrd,
                &config.state_dir
            ),
            crate::guest_kernel::as_booted(
                config.guest_dir.join("gpu/vmlinuz"),
                &gpu_initrd,
                &config.state_dir
            ),
        );
        let defaults = SpecDefaults {
            kernel,
            initrd,
            gpu_kernel,
            gpu_initrd,
            accel,
        };
        create_private_dir(&config.runtime_dir.join("vms"))?;
        let bridges =
            network::Bridges::open(config.network.clone(), config.networks.clone()).await?;
        let store = RecordDir::open(config.vm_records_dir())?;
        let images = images::Images::open(&config)?;
        let (records, broken) = store.load_all::<VmRecord>()?;
        reconcile::remove_unused_kernels(&config.state_dir, &defaults, &records);
        for b in &broken {
            error!(key = %b.key, path = %b.path.display(), reason = %b.reason, "VM record is broken, moved aside");
        }
        let cgroups = crate::cgroup::Layout::detect(&config.cgroup_root);
        let own_cgroups = match cgroups.prepare(&config.cgroup_parent) {
            Ok(()) => cgroups != crate::cgroup::Layout::Unavailable,
            Err(e) => {
                info!(error = %e, "cannot make VM cgroups here: limits are applied to machined scopes, where there are any");
                false
            }
        };
        let qemu_users = crate::qemu_user::QemuUsers::new(
            config.qemu_uid_base,
            config.qemu_uid_count,
            config.qemu_mount_namespace,
            &config.state_dir,
            &config.runtime_dir,
        );
        match &qemu_users {
            Some(_) => info!(
                first_uid = config.qemu_uid_base,
                count = config.qemu_uid_count,
                "QEMUs run unprivileged, one uid per VM"
            ),
            None => info!("QEMUs run as kilnd's own user"),
        }
        let (internal_tx, mut internal_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let mut engine = Engine {
            config,
            vmm,
            defaults,
            limits: Limits::for_host(),
            store,
            vms: HashMap::new(),
            broken,
            next_generation: 1,
            tcg_cmdline: crate::accel::tcg_kernel_args(),
            internal_tx,
            events: events.clone(),
            pools: pools::Pools::default(),
            gpus: gpus::Gpus::default(),
            bridges,
            images,
            creating: HashMap::new(),
            cgroups,
            own_cgroups,
            qemu_users,
        };
        engine.reconcile(records).await;
        engine.reconcile_network().await;
        engine.load_gpus();
        engine.watch_gpus();
        engine.load_pools();
        engine.resume_lease_deadlines();
        engine.settle_pools();
        engine.sweep_image_users();
        crate::snapshot::remove_unfinished(&engine.config.state_dir);
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
        Ok((EngineHandle::new(commands_tx, events), task))
    }

    // ----- commands -------------------------------------------------------

    fn handle(&mut self, command: Command) {
        match command {
            Command::CreateVm { name, spec, reply } => self.create_vm(name, spec, reply),
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
                let _ = reply.send(self.entry(&id).map(|e| VmInfo::from(&e.record)).map(
                    |mut info| {
                        info.usage = self.usage_of(&id);
                        info
                    },
                ));
            }
            Command::ExecVm { id, request, reply } => self.exec_vm(&id, request, reply),
            Command::AddContainer { id, spec, reply } => self.add_container(&id, spec, reply),
            Command::RemoveContainer { id, name, reply } => self.remove_container(&id, name, reply),
            Command::ListContainers { id, reply } => self.list_containers(&id, reply),
            Command::ContainerLogs { id, request, reply } => {
                self.container_logs(&id, request, reply)
            }
            Command::SnapshotVm {
                id,
                name,
                keep_paused,
                reply,
            } => self.snapshot_vm(&id, &name, keep_paused, reply),
            Command::ListSnapshots { reply } => {
                let _ = reply.send(Ok(self.list_snapshots()));
            }
            Command::DeleteSnapshot { name, reply } => {
                let _ = reply.send(self.delete_snapshot(&name));
            }
            Command::RestoreVm {
                snapshot,
                name,
                same_identity,
                reply,
            } => self.restore_vm(&snapshot, name, same_identity, reply),
            Command::RestoreInto {
                snapshot,
                id,
                reply,
            } => self.restore_into(&snapshot, &id, reply),
            Command::ForkVm { id, count, reply } => self.fork_vm(&id, count, reply),
            Command::GuestAgent {
                id,
                container,
                operation,
                reply,
            } => {
                let _ = reply.send(self.guest_agent(&id, container.as_deref(), operation));
            }
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
                options,
                reply,
            } => self.acquire(pool, options, reply),
            Command::Renew { id, ttl, reply } => self.renew(&id, ttl, reply),
            Command::Disconnected { who, reply } => {
                let _ = reply.send(Ok(self.disconnected(&who)));
            }
            Command::BoundBusNames { reply } => {
                let _ = reply.send(Ok(self.bound_bus_names()));
            }
            Command::Release { id, recycle, reply } => self.release(&id, recycle, reply),
            Command::AttachNic { id, address, reply } => self.attach_nic(&id, address, reply),
            Command::JoinNetns { id, request, reply } => self.join_netns(&id, request, reply),
            Command::DetachNic { id, index, reply } => self.detach_nic(&id, index, reply),
            Command::ListNics { id, reply } => {
                let nics = self.entry(&id).map(|e| e.record.network.clone());
                let _ = reply.send(nics);
            }
            Command::ListGpus { reply } => {
                let _ = reply.send(Ok(self.list_gpus()));
            }
            Command::PullImage {
                reference,
                progress,
                reply,
            } => self.pull_image(reference, progress, reply),
            Command::ImportImage {
                path,
                reference,
                progress,
                reply,
            } => self.import_image(path, reference, progress, reply),
            Command::ImportRootfs {
                layers,
                reference,
                progress,
                reply,
            } => self.import_rootfs(layers, reference, progress, reply),
            Command::ListImages { reply } => self.list_images(reply),
            Command::DescribeImage { image, reply } => self.describe_image(image, reply),
            Command::RemoveImage { image, reply } => self.remove_image(image, reply),
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
                .filter(|e| e.record.state().has_process())
                .count(),
            broken_records: self.broken.clone(),
            pool_errors: self.pools.errors.clone(),
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

    /// A fresh id no VM has.
    fn unused_vm_id(&self) -> String {
        loop {
            let id = new_vm_id();
            if !self.id_taken(&id) {
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
        self.note_pool_change(&record, record.state(), false);
        self.vms.insert(id, VmEntry::new(record));
        let _ = self.events.send(EngineEvent::VmAdded { vm: info.clone() });
        Ok(info)
    }

    // ----- the one writer of VM records ------------------------------------

    /// Change VM `id`'s state to `to` (checked by [`VmRecord::set_state`]:
    /// the state machine's table, and a leased VM is never `ready`), with
    /// `change` applied to the other fields in the same record write. This
    /// is the only path that changes a VM's state.
    pub(super) fn transition(
        &mut self,
        id: &str,
        to: VmState,
        write: Write,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmInfo, EngineError> {
        self.write_record(id, Some(to), write, change)
    }

    /// Apply a caller-requested change that keeps the state: persisted
    /// first, applied in memory only if the write succeeded.
    pub(super) fn update(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmInfo, EngineError> {
        self.write_record(id, None, Write::Request(Durability::Durable), change)
    }

    /// Record a fact that keeps the state (QEMU's pid, a TAP's index):
    /// applied even if the write fails.
    pub(super) fn record_fact(&mut self, id: &str, change: impl FnOnce(&mut VmRecord)) {
        let _ = self.write_record(id, None, Write::Fact, change);
    }

    /// Record a fact about VM `id`'s running process ([`Write::RunningFact`]).
    fn record_running_fact(&mut self, id: &str, change: impl FnOnce(&mut VmRecord)) {
        let _ = self.write_record(id, None, Write::RunningFact, change);
    }

    /// Apply `change` (and the state change, if any) to a copy of the
    /// record, write it as `write` says, then publish `VmChanged` and tell
    /// the pools.
    fn write_record(
        &mut self,
        id: &str,
        to: Option<VmState>,
        write: Write,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmInfo, EngineError> {
        let entry = self
            .vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NoSuchVM(truncate(id)))?;
        let from = entry.record.state();
        let mut record = entry.record.clone();
        change(&mut record);
        if let Some(to) = to {
            if let Err(refused) = record.set_state(to) {
                warn!(vm = %id, from = %refused.from, to = %refused.to, "state change refused");
                return Err(EngineError::InvalidState {
                    id: truncate(id),
                    state: from,
                    operation: "change the state of",
                });
            }
        }
        let written = self.store.write_with(id, &record, write.durability());
        match (write, written) {
            (Write::Request(_), written) => written?,
            (Write::Fact | Write::RunningFact, Err(e)) => {
                error!(vm = %id, error = %EngineError::from(e).message(), "cannot persist VM record");
            }
            (_, Ok(())) => {}
        }
        entry.record = record;
        let info = VmInfo::from(&entry.record);
        let record = entry.record.clone();
        self.note_pool_change(&record, from, false);
        let _ = self
            .events
            .send(EngineEvent::VmChanged { vm: info.clone() });
        Ok(info)
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
                    warn!(vm = %id, pid = process.pid(), "QEMU launched for a VM that moved on, killing it");
                    let _ = process.kill();
                    return;
                };
                let pid = process.pid();
                let kill_now = runtime.stop_intent.is_some();
                runtime.process = Some(process);
                runtime.qmp = Some(qmp);
                self.record_running_fact(&id, |r| {
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
                    self.record_running_fact(&id, |r| {
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
            Internal::PodInspected {
                id,
                request,
                inspected,
                reply,
            } => self.pod_inspected(&id, request, inspected, reply),
            Internal::NetnsJoined {
                id,
                generation,
                result,
                reply,
            } => self.netns_joined(&id, generation, result, reply),
            Internal::NicDetached {
                id,
                generation,
                index,
                result,
                reply,
            } => self.nic_detached(&id, generation, index, result, reply),
            Internal::ImageStored { result, reply } => self.image_stored(result, reply),
            Internal::ImageRemoved { result, reply } => self.image_removed(result, reply),
            Internal::ImagesCollected { result } => self.images_collected(result),
            Internal::SnapshotTaken { id, result, after } => {
                self.snapshot_taken(&id, result, after)
            }
            Internal::VmImageResolved {
                id,
                name,
                spec,
                result,
                reply,
            } => self.vm_image_resolved(id, name, *spec, result, reply),
            Internal::ContainersStarted {
                id,
                generation,
                ping,
                results,
            } => self.containers_started(&id, generation, ping, results),
            Internal::ContainerAdded {
                id,
                generation,
                name,
                slot,
                result,
                reply,
            } => self.container_added(&id, generation, name, slot, result, reply),
            Internal::ContainerRemoved {
                id,
                container,
                result,
                reply,
            } => self.container_removed(&id, *container, result, reply),
            Internal::ContainersObserved {
                id,
                generation,
                result,
                reply,
            } => self.containers_observed(&id, generation, result, reply),
            Internal::ImageUsersListed { users } => self.image_users_listed(users),
            Internal::ContainersPolled {
                id,
                generation,
                containers,
            } => self.observe_containers(&id, generation, &containers),
            Internal::ContainerRestarted {
                id,
                generation,
                name,
                result,
            } => self.container_restarted(&id, generation, &name, result),
            Internal::PoolImageResolved { pool, result } => self.pool_image_resolved(&pool, result),
            Internal::LeasedContainerStarted { id, result, reply } => {
                self.leased_container_started(&id, result, reply)
            }
            Internal::PoolTick { pool } => self.pool_tick(&pool),
            Internal::GpusChanged => self.rescan_gpus(),
            Internal::AcquireTimeout {
                pool,
                ticket,
                timeout,
            } => self.acquire_timed_out(&pool, ticket, timeout),
            Internal::LeaseDue { id, deadline } => self.lease_due(&id, deadline),
            Internal::OpDone {
                id,
                generation,
                op,
                result,
                reply,
            } => self.op_done(id, generation, op, result, reply),
        }
    }
}

fn truncate(id: &str) -> String {
    id.chars().take(64).collect()
}
