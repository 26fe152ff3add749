//! The actor's container half: a VM created with an image, `AddContainer`,
//! `RemoveContainer`, `ListContainers`, `ContainerLogs`, the containers a
//! VM starts at every boot, and the image users they hold
//! (docs/images.md, "Containers in VMs").
//!
//! Every container is an image-store user `vm:<id>:<name>`, acquired before
//! its record is written and released after the record is gone, so a crash
//! in between leaves at worst a user no record names; the start-up sweep
//! ([`Engine::sweep_image_users`]) releases those. The store is only ever
//! called from sub-tasks (it locks itself and does disk work), like the
//! QMP and agent calls that plug disks and start processes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_agent_proto::{self as proto, ContainerLogsReply, ContainerLogsRequest};
use kiln_image::{Acquired, ImageStore};
use tracing::{info, warn};

use super::{Engine, Internal};
use crate::agent::AgentError;
use crate::api::Reply;
use crate::container::{
    image_user, restart_delay, slot_of_device, vm_of_image_user, ContainerInfo, ContainerPhase,
    ContainerRecord, ContainerSpec, DiskAttachment, RestartPolicy, MAIN_CONTAINER,
    MAX_IMAGE_LAYERS,
};
use crate::error::EngineError;
use crate::os_boot;
use crate::qemu_user::QemuUser;
use crate::spec::{BootSource, ResolvedSpec, SpecError};
use crate::vm::{VmInfo, VmRecord};
use crate::vmm::{GuestAgent, Monitor};

/// How long a disk may take to leave QEMU on detach.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a container agent call beyond the agent's own disk wait.
const START_TIMEOUT: Duration = Duration::from_secs(proto::DEFAULT_DISK_TIMEOUT_MS / 1000 + 20);
/// Deadline of the quick container agent calls.
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a VM's containers are checked for exits.
const CONTAINER_POLL: Duration = Duration::from_secs(1);
/// Most containers one VM runs (the agent's own default limit).
pub(super) const MAX_CONTAINERS: usize = proto::DEFAULT_MAX_CONTAINERS;

/// A VM create that waits for its image to be resolved: its id and name
/// are taken meanwhile.
#[derive(Debug)]
pub(super) struct PendingCreate {
    pub(super) name: String,
}

/// Resolve `spec`'s image for container slot `slot` of VM `vm_id`: become
/// its user, read its record, build the process. Undone (the user
/// released) on any failure.
async fn resolve(
    store: ImageStore,
    vm_id: String,
    spec: ContainerSpec,
    slot: u8,
    disks_dir: PathBuf,
    boot: BootSource,
) -> Result<ContainerRecord, EngineError> {
    let user = image_user(&vm_id, &spec.name);
    let upper = spec
        .storage_disk
        .then(|| disks_dir.join(format!("{}.ext4", spec.name)));
    let mut record = resolve_as(store, user, spec, slot, boot).await?;
    record.upper_disk = upper;
    Ok(record)
}

/// [`resolve`] as image-store user `user`; `boot: image` takes the image's
/// init rather than its command.
async fn resolve_as(
    store: ImageStore,
    user: String,
    spec: ContainerSpec,
    slot: u8,
    boot: BootSource,
) -> Result<ContainerRecord, EngineError> {
    let digest = match store.acquire(&spec.image, &user).await? {
        Acquired::Acquired { digest } | Acquired::AlreadyHeld { digest } => digest,
    };
    let record = async {
        let image = store.describe(digest.as_str()).await?;
        if image.record.layers.len() > MAX_IMAGE_LAYERS {
            return Err(EngineError::InvalidSpec(SpecError::Container(format!(
                "image {} has {} layers, at most {MAX_IMAGE_LAYERS} can be attached",
                spec.image,
                image.record.layers.len()
            ))));
        }
        let process = match boot {
            BootSource::Kiln => spec
                .process(&image.record.process)
                .map_err(|e| EngineError::InvalidSpec(e.into()))?,
            BootSource::Image => os_boot::init_process(&spec, &image.record.process),
        };
        Ok(ContainerRecord {
            name: spec.name.clone(),
            image: spec.image.clone(),
            digest: digest.to_string(),
            slot,
            layers: image
                .record
                .layers
                .iter()
                .map(|l| store.erofs_path(l))
                .collect(),
            process,
            storage_mib: spec.storage_mib,
            upper_disk: None,
            restart_policy: spec.restart_policy,
            restarts: 0,
            phase: ContainerPhase::Created,
            pid: None,
            exit_code: None,
            error: None,
            handle: None,
        })
    }
    .await;
    if record.is_err() {
        let _ = store.release(digest.as_str(), &user).await;
    }
    record
}

/// Make what a `boot: image` VM boots: the image's kernel and modules
/// (kept by the store), and this VM's initramfs in its disks directory;
/// `spec` then names them. Undone (the image user released) on failure.
async fn prepare_os_boot(
    store: &ImageStore,
    vm_id: &str,
    main: ContainerRecord,
    spec: &mut ResolvedSpec,
    disks_dir: &Path,
) -> Result<ContainerRecord, EngineError> {
    let made = async {
        let boot = store.boot_files(&main.digest, os_boot::OS_MODULES).await?;
        let (kiln_initrd, modules, record) = (spec.initrd.clone(), boot.modules_cpio.clone(), main.clone());
        let out = disks_dir.join(os_boot::INITRAMFS_FILE);
        let written = out.clone();
        tokio::task::spawn_blocking(move || -> Result<(), EngineError> {
            let bytes = os_boot::initramfs(&kiln_initrd, &modules, &record).map_err(|e| {
                EngineError::StorageFailed(crate::store::StoreError::Io {
                    path: written.clone(),
                    source: e,
                })
            })?;
            if let Some(dir) = written.parent() {
                crate::store::create_private_dir(dir)?;
            }
            crate::store::write_atomic(&written, &bytes)?;
            Ok(())
        })
        .await
        .map_err(|e| {
            EngineError::StorageFailed(crate::store::StoreError::Io {
                path: out.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        })??;
        info!(vm = %vm_id, kernel = %boot.release, modules = boot.modules.len(), "OS image boot files ready");
        spec.kernel = boot.kernel;
        spec.initrd = out;
        Ok(())
    }
    .await;
    match made {
        Ok(()) => Ok(main),
        Err(e) => {
            crate::store::remove_tree(disks_dir);
            let _ = store.release(&main.digest, &main.image_user(vm_id)).await;
            Err(e)
        }
    }
}

/// `AddContainer`/`RemoveContainer` on a VM that boots its image as an OS.
fn os_has_no_containers() -> EngineError {
    EngineError::InvalidSpec(SpecError::Boot(
        "a VM that boots its image (boot: image) runs that OS, not containers: its root cannot be removed nor containers added".into(),
    ))
}

/// Release the image users of containers that are gone (logged, never
/// failing: the start-up sweep catches what is missed).
fn release_users(store: &ImageStore, users: Vec<(String, String)>) -> ImagesReleased {
    if users.is_empty() {
        return None;
    }
    let store = store.clone();
    Some(tokio::spawn(async move {
        for (digest, user) in users {
            if let Err(e) = store.release(&digest, &user).await {
                warn!(image = %digest, user = %user, error = %EngineError::from(e).message(), "cannot release image user");
            }
        }
    }))
}

/// A release of image users under way (none when there was nothing to
/// release).
pub(super) type ImagesReleased = Option<tokio::task::JoinHandle<()>>;

/// Answer `replies` with success once `released` (an image-user release)
/// is done, so a `RemoveImage` right after is not refused.
pub(super) fn reply_once_released(released: ImagesReleased, replies: Vec<Reply<()>>) {
    tokio::spawn(async move {
        if let Some(release) = released {
            let _ = release.await;
        }
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
    });
}

/// What to do when the guest already runs a container by that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// It is this one (a boot after kilnd restarted, a clone of a
    /// per-image template): take it as it is.
    Adopt,
    /// It is left from an add kilnd did not record (it died mid-way):
    /// remove it and start afresh.
    Replace,
}

/// Plug a container's disks (those not plugged yet) and start its process;
/// on failure, unplug what this call plugged.
/// `user` is who the VM's QEMU runs as: the disks are made openable by it
/// first.
async fn start_container(
    qmp: &dyn Monitor,
    agent: &dyn GuestAgent,
    container: &ContainerRecord,
    existing: Existing,
    user: Option<&QemuUser>,
) -> Result<proto::ContainerInfo, EngineError> {
    if let (Some(path), Some(mib)) = (&container.upper_disk, container.storage_mib) {
        make_upper_disk(path.clone(), mib).await?;
    }
    let present: BTreeSet<String> = qmp.peripheral_ids().await?.into_iter().collect();
    let mut plugged = Vec::new();
    let started = async {
        for disk in container.disks() {
            if !present.contains(&disk.device) {
                if let Some(user) = user {
                    user.open_disk(&disk.path, disk.writable).map_err(|e| {
                        EngineError::StorageFailed(crate::store::StoreError::Io {
                            path: disk.path.clone(),
                            source: e,
                        })
                    })?;
                }
                qmp.attach_disk(&disk).await?;
                plugged.push(disk);
            }
        }
        start_process(agent, container, existing).await
    }
    .await;
    if started.is_err() {
        detach_all(qmp, &plugged).await;
    }
    started
}

/// `StartContainer` for a container whose disks are plugged.
async fn start_process(
    agent: &dyn GuestAgent,
    container: &ContainerRecord,
    existing: Existing,
) -> Result<proto::ContainerInfo, EngineError> {
    let request = container.start_request();
    let start = || {
        agent.call::<_, proto::ContainerReply>(
            proto::method::START_CONTAINER,
            &request,
            START_TIMEOUT,
        )
    };
    let mut started = start().await;
    let exists = |r: &Result<_, AgentError>| {
        r.as_ref()
            .is_err_and(|e| e.is_call(proto::error::CONTAINER_EXISTS))
    };
    if existing == Existing::Replace && exists(&started) {
        warn!(container = %container.name, "the guest runs an unrecorded container by that name, replacing it");
        remove_in_guest(agent, &container.name, Stop::Kill).await?;
        started = start().await;
    }
    if exists(&started) {
        // Started before kilnd restarted (or in the template): it is the one.
        let id = proto::ContainerIdRequest {
            id: container.name.clone(),
        };
        started = agent
            .call(proto::method::CONTAINER_STATUS, &id, AGENT_CALL_TIMEOUT)
            .await;
        return started.map(|r| r.container).map_err(EngineError::from);
    }
    started.map(|r| r.container).map_err(container_error)
}

/// The containers the guest runs (`ListContainers`).
async fn list_in_guest(agent: &dyn GuestAgent) -> Result<Vec<proto::ContainerInfo>, AgentError> {
    let listed: proto::ListContainersReply = agent
        .call(
            proto::method::LIST_CONTAINERS,
            &serde_json::json!({}),
            AGENT_CALL_TIMEOUT,
        )
        .await?;
    Ok(listed.containers)
}

/// Make a container's writable disk if it is not there yet: a sparse file
/// of `mib` MiB with an ext4 file system, built under a temporary name and
/// renamed, so a crash never leaves half a disk under the real name.
pub(super) async fn make_upper_disk(path: PathBuf, mib: u64) -> Result<(), EngineError> {
    tokio::task::spawn_blocking(move || -> Result<(), EngineError> {
        if path.exists() {
            return Ok(());
        }
        let failed = |what: &str, e: std::io::Error| {
            EngineError::StorageFailed(crate::store::StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(e.kind(), format!("{what}: {e}")),
            })
        };
        if let Some(dir) = path.parent() {
            crate::store::create_private_dir(dir)?;
        }
        let tmp = path.with_extension("ext4.tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| failed("create", e))?;
        file.set_len(mib * 1024 * 1024)
            .map_err(|e| failed("size", e))?;
        drop(file);
        let out = std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg(&tmp)
            .output()
            .map_err(|e| failed("run mkfs.ext4", e))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(
                "mkfs.ext4",
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ));
        }
        std::fs::rename(&tmp, &path).map_err(|e| failed("rename", e))
    })
    .await
    .map_err(|e| {
        EngineError::StorageFailed(crate::store::StoreError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })?
}

/// Unplug `disks`, logging what stays.
async fn detach_all(qmp: &dyn Monitor, disks: &[DiskAttachment]) {
    for disk in disks {
        if let Err(e) = qmp.detach_disk(disk, DETACH_TIMEOUT).await {
            warn!(disk = %disk.device, error = %e, "cannot unplug a layer disk");
        }
    }
}

/// Unplug every disk of container slot `slot` QEMU has, known or not (what
/// a crash mid-attach may have left).
async fn clear_slot(qmp: &dyn Monitor, slot: u8) -> Result<(), EngineError> {
    let stale: Vec<DiskAttachment> = qmp
        .peripheral_ids()
        .await?
        .iter()
        .filter(|id| slot_of_device(id) == Some(slot))
        .filter_map(|id| {
            let lun = id.rsplit('-').next()?.parse().ok()?;
            Some(DiskAttachment::layer(slot, lun, Default::default()))
        })
        .collect();
    detach_all(qmp, &stale).await;
    Ok(())
}

/// How a container is stopped before it is removed.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM, SIGKILL after the agent's default wait (`RemoveContainer`).
    Graceful,
    /// SIGKILL at once: nobody wants it (an orphan, an undo).
    Kill,
}

/// How often a graceful stop asks whether the container has exited.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Stop and remove a container in the guest (gone already is fine). A
/// graceful stop signals and then waits here, asking the agent between
/// naps, so the agent goes on serving the VM's other calls (logs, execs,
/// other containers) during the grace period; SIGKILL after it.
async fn remove_in_guest(agent: &dyn GuestAgent, name: &str, how: Stop) -> Result<(), EngineError> {
    let id = proto::ContainerIdRequest {
        id: name.to_owned(),
    };
    let send = |signal: Option<i32>, wait: bool| proto::StopContainerRequest {
        id: name.to_owned(),
        signal,
        timeout_ms: None,
        wait: (!wait).then_some(false),
    };
    let stop = |request: proto::StopContainerRequest| async move {
        let stopped: Result<proto::StopContainerReply, _> = agent
            .call(
                proto::method::STOP_CONTAINER,
                &request,
                // An older agent waits the grace period itself.
                Duration::from_millis(proto::DEFAULT_STOP_TIMEOUT_MS) + AGENT_CALL_TIMEOUT,
            )
            .await;
        match stopped {
            Ok(reply) => Ok(Some(reply.container)),
            Err(e) if e.is_call(proto::error::NO_SUCH_CONTAINER) => Ok(None),
            Err(e) => Err(EngineError::from(e)),
        }
    };
    match how {
        Stop::Kill => {
            stop(send(Some(9), true)).await?;
        }
        Stop::Graceful => {
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(proto::DEFAULT_STOP_TIMEOUT_MS);
            let mut running = stop(send(None, false))
                .await?
                .is_some_and(|c| c.state == proto::ContainerState::Running);
            while running && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(STOP_POLL).await;
                let status: Result<proto::ContainerReply, _> = agent
                    .call(proto::method::CONTAINER_STATUS, &id, AGENT_CALL_TIMEOUT)
                    .await;
                running = match status {
                    Ok(reply) => reply.container.state == proto::ContainerState::Running,
                    Err(e) if e.is_call(proto::error::NO_SUCH_CONTAINER) => false,
                    Err(e) => return Err(e.into()),
                };
            }
            if running {
                stop(send(Some(9), true)).await?;
            }
        }
    }
    let _: proto::RemoveContainerReply = agent
        .call(proto::method::REMOVE_CONTAINER, &id, AGENT_CALL_TIMEOUT)
        .await?;
    Ok(())
}

/// An agent error from starting a container: the guest's reason, named
/// `ContainerStartFailed` (a missing disk, a program that is not there or
/// not for this machine, a bad user) or `TooManyContainers`.
/// An OS image's root as running with the init as PID 1.
fn os_init_running(name: &str) -> proto::ContainerInfo {
    proto::ContainerInfo {
        id: name.to_owned(),
        state: proto::ContainerState::Running,
        pid: 1,
        exit_code: None,
        signal: None,
        started_at_ms: 0,
        exited_at_ms: None,
        layers: Vec::new(),
        upper_disk: None,
        hostname: String::new(),
        handle: None,
    }
}

fn container_error(e: AgentError) -> EngineError {
    match &e {
        AgentError::Call { name, message } => {
            let short = name.rsplit('.').next().unwrap_or(name);
            if name == proto::error::TOO_MANY_CONTAINERS {
                EngineError::TooManyContainers(format!("the guest says: {message}"))
            } else if name.starts_with(proto::INTERFACE) {
                EngineError::ContainerStartFailed(format!("{short}: {message}"))
            } else {
                e.into()
            }
        }
        _ => e.into(),
    }
}

/// The image-store user of a per-image pool.
fn pool_image_user(pool: &str) -> String {
    format!("pool:{pool}")
}

impl Engine {
    /// `CreateVm`: a VM without an image is created at once; one with an
    /// image waits for the image to be resolved (a sub-task), its name and
    /// id taken meanwhile.
    pub(super) fn create_vm(
        &mut self,
        name: String,
        spec: crate::spec::VmSpec,
        reply: Reply<VmInfo>,
    ) {
        let resolved = match self.check_new_vm(&name, &spec) {
            Ok(r) => r,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let id = self.unused_vm_id();
        let Some(container) = resolved.container.clone() else {
            let record = VmRecord::new(id, name, resolved, None);
            return drop(reply.send(self.insert_vm(record)));
        };
        self.creating
            .insert(id.clone(), PendingCreate { name: name.clone() });
        let (store, tx) = (self.images.store().clone(), self.internal_tx.clone());
        let disks_dir = self.config.vm_disks_dir(&id);
        let mut resolved = resolved;
        tokio::spawn(async move {
            let boot = resolved.boot;
            let result = resolve(
                store.clone(),
                id.clone(),
                container,
                0,
                disks_dir.clone(),
                boot,
            )
            .await;
            let result = match result {
                Ok(main) if boot == BootSource::Image => {
                    prepare_os_boot(&store, &id, main, &mut resolved, &disks_dir).await
                }
                other => other,
            };
            let _ = tx.send(Internal::VmImageResolved {
                id,
                name,
                spec: Box::new(resolved),
                result,
                reply,
            });
        });
    }

    /// A VM's image is resolved: create it, or undo.
    pub(super) fn vm_image_resolved(
        &mut self,
        id: String,
        name: String,
        spec: ResolvedSpec,
        result: Result<ContainerRecord, EngineError>,
        reply: Reply<VmInfo>,
    ) {
        self.creating.remove(&id);
        let container = match result {
            Ok(c) => c,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let user = (container.digest.clone(), container.image_user(&id));
        let mut record = VmRecord::new(id, name, spec, None);
        record.containers.push(container);
        let result = self.insert_vm(record);
        if result.is_err() {
            release_users(self.images.store(), vec![user]);
        }
        let _ = reply.send(result);
    }

    /// Whether VM `id` (or a pending create) exists.
    pub(super) fn id_taken(&self, id: &str) -> bool {
        self.vms.contains_key(id) || self.creating.contains_key(id)
    }

    /// Whether a VM (or a pending create) is named `name`.
    pub(super) fn name_taken(&self, name: &str) -> bool {
        self.vms.values().any(|e| e.record.name == name)
            || self.creating.values().any(|p| p.name == name)
    }

    /// The image users of a deleted VM's containers go (sub-task).
    pub(super) fn release_container_images(&self, record: &VmRecord) -> ImagesReleased {
        let users = record
            .containers
            .iter()
            .map(|c| (c.digest.clone(), c.image_user(&record.id)))
            .collect();
        release_users(self.images.store(), users)
    }

    /// After the agent of a VM with containers answers from a new boot:
    /// plug their disks and start them, then report `ContainersStarted`.
    /// Returns false when there is nothing to start.
    pub(super) fn start_boot_containers(
        &mut self,
        id: &str,
        generation: u64,
        ping: &proto::PingReply,
    ) -> bool {
        let Some(entry) = self.vms.get_mut(id) else {
            return false;
        };
        let Some(runtime) = entry.runtime.as_mut() else {
            return false;
        };
        if entry.record.containers.is_empty()
            || runtime.containers_boot.as_deref() == Some(ping.boot_id.as_str())
        {
            return false;
        }
        if entry.record.spec.boot == BootSource::Image {
            // Nothing to start: the agent handed PID 1 to the image's init
            // before it served, and says whether that worked (a root that
            // could not be mounted, an init that could not run: the boot
            // fails with the guest's reason).
            runtime.containers_boot = Some(ping.boot_id.clone());
            let (agent, generation) = (runtime.agent.clone(), runtime.generation);
            let names: Vec<String> = entry
                .record
                .containers
                .iter()
                .map(|c| c.name.clone())
                .collect();
            let (tx, id, ping) = (self.internal_tx.clone(), id.to_owned(), ping.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                for name in names {
                    let asked = proto::ContainerIdRequest { id: name.clone() };
                    let status: Result<proto::ContainerReply, _> = agent
                        .call(proto::method::CONTAINER_STATUS, &asked, AGENT_CALL_TIMEOUT)
                        .await;
                    let result = match status {
                        Ok(reply) => Ok(reply.container),
                        // An agent older than the report (a VM re-adopted
                        // after an upgrade): it serves, so it handed over.
                        Err(e) if e.is_call(proto::error::NO_SUCH_CONTAINER) => {
                            Ok(os_init_running(&name))
                        }
                        Err(e) => Err(container_error(e)),
                    };
                    results.push((name, result));
                }
                let _ = tx.send(Internal::ContainersStarted {
                    id,
                    generation,
                    ping,
                    results,
                });
            });
            return true;
        }
        let Some(qmp) = runtime.qmp.clone() else {
            return false;
        };
        runtime.containers_boot = Some(ping.boot_id.clone());
        let agent = runtime.agent.clone();
        let containers = entry.record.containers.clone();
        // Through the one writer, like every other record change.
        self.record_fact(id, |r| {
            for c in &mut r.containers {
                c.phase = ContainerPhase::Starting;
            }
        });
        let user = self.running_qemu_user(id);
        let (tx, id, ping) = (self.internal_tx.clone(), id.to_owned(), ping.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            for container in &containers {
                let result = start_container(
                    qmp.as_ref(),
                    agent.as_ref(),
                    container,
                    Existing::Adopt,
                    user.as_ref(),
                )
                .await;
                let failed = result.is_err();
                results.push((container.name.clone(), result));
                if failed {
                    break;
                }
            }
            let _ = tx.send(Internal::ContainersStarted {
                id,
                generation,
                ping,
                results,
            });
        });
        true
    }

    /// The boot's containers started (or one failed: the boot fails).
    pub(super) fn containers_started(
        &mut self,
        id: &str,
        generation: u64,
        ping: proto::PingReply,
        results: Vec<(String, Result<proto::ContainerInfo, EngineError>)>,
    ) {
        if self.runtime_of(id, generation).is_none() {
            return;
        }
        let mut failure = None;
        self.record_fact(id, |r| {
            for (name, result) in &results {
                let Some(c) = r.containers.iter_mut().find(|c| &c.name == name) else {
                    continue;
                };
                match result {
                    Ok(info) => c.observe(info),
                    Err(e) => {
                        c.phase = ContainerPhase::Failed;
                        c.error = Some(e.message());
                    }
                }
            }
        });
        for (name, result) in results {
            if let Err(e) = result {
                failure = Some(EngineError::ContainerStartFailed(format!(
                    "container {name}: {}",
                    e.message()
                )));
            }
        }
        match failure {
            Some(e) => self.boot_done(id, generation, Err(e)),
            None => {
                self.boot_done(id, generation, Ok(ping));
                self.watch_containers(id);
            }
        }
    }

    /// `AddContainer`: resolve, plug, start, then record.
    pub(super) fn add_container(
        &mut self,
        id: &str,
        spec: ContainerSpec,
        reply: Reply<ContainerInfo>,
    ) {
        if let Err(e) = spec.validate() {
            return drop(reply.send(Err(EngineError::InvalidSpec(e.into()))));
        }
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.record.spec.boot == BootSource::Image {
            return drop(reply.send(Err(os_has_no_containers())));
        }
        let runtime = match entry.answering("add a container to") {
            Ok(r) => r,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (Some(qmp), agent, generation) = (
            runtime.qmp.clone(),
            runtime.agent.clone(),
            runtime.generation,
        ) else {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        };
        let names: BTreeSet<&str> = entry
            .record
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .chain(entry.container_ops.iter().map(|(n, _)| n.as_str()))
            .collect();
        if names.contains(spec.name.as_str()) {
            return drop(reply.send(Err(EngineError::ContainerExists(spec.name))));
        }
        if names.len() >= MAX_CONTAINERS {
            return drop(reply.send(Err(EngineError::TooManyContainers(format!(
                "VM {id} runs {} containers, the most allowed",
                names.len()
            )))));
        }
        let used: BTreeSet<u8> = entry
            .record
            .containers
            .iter()
            .map(|c| c.slot)
            .chain(entry.container_ops.iter().map(|(_, s)| *s))
            .collect();
        let Some(slot) = (0..=u8::MAX).find(|s| !used.contains(s)) else {
            return drop(reply.send(Err(EngineError::TooManyContainers(id.into()))));
        };
        entry.container_ops.insert((spec.name.clone(), slot));
        let (store, tx, id) = (
            self.images.store().clone(),
            self.internal_tx.clone(),
            id.to_owned(),
        );
        let disks_dir = self.config.vm_disks_dir(&id);
        let user = self.running_qemu_user(&id);
        info!(vm = %id, container = %spec.name, image = %spec.image, "adding container");
        tokio::spawn(async move {
            let name = spec.name.clone();
            let result = async {
                let mut record = resolve(
                    store.clone(),
                    id.clone(),
                    spec,
                    slot,
                    disks_dir,
                    BootSource::Kiln,
                )
                .await?;
                let started = async {
                    clear_slot(qmp.as_ref(), slot).await?;
                    start_container(
                        qmp.as_ref(),
                        agent.as_ref(),
                        &record,
                        Existing::Replace,
                        user.as_ref(),
                    )
                    .await
                }
                .await;
                match started {
                    Ok(info) => {
                        record.observe(&info);
                        Ok(record)
                    }
                    Err(e) => {
                        let _ = store.release(&record.digest, &record.image_user(&id)).await;
                        Err(e)
                    }
                }
            }
            .await;
            let _ = tx.send(Internal::ContainerAdded {
                id,
                generation,
                name,
                slot,
                result,
                reply,
            });
        });
    }

    /// An `AddContainer` sub-task ended: record the container, or (the VM
    /// moved on, the write failed) undo it.
    pub(super) fn container_added(
        &mut self,
        id: &str,
        generation: u64,
        name: String,
        slot: u8,
        result: Result<ContainerRecord, EngineError>,
        reply: Reply<ContainerInfo>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.container_ops.remove(&(name, slot));
        }
        let container = match result {
            Ok(c) => c,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let live = self
            .runtime_of(id, generation)
            .map(|r| (r.qmp.clone(), r.agent.clone()));
        let written = match live {
            Some(_) => {
                let c = container.clone();
                self.update(id, |r| r.containers.push(c))
            }
            None => Err(EngineError::InvalidState {
                id: id.to_owned(),
                state: self
                    .vms
                    .get(id)
                    .map_or(crate::state::VmState::Stopped, |e| e.record.state()),
                operation: "add a container to",
            }),
        };
        match written {
            Ok(_) => {
                info!(vm = %id, container = %container.name, "container running");
                self.watch_containers(id);
                let _ = reply.send(Ok(ContainerInfo::from(&container)));
            }
            Err(e) => {
                if let Some((Some(qmp), agent)) = live {
                    let c = container.clone();
                    tokio::spawn(async move {
                        let _ = remove_in_guest(agent.as_ref(), &c.name, Stop::Kill).await;
                        detach_all(qmp.as_ref(), &c.disks()).await;
                    });
                }
                release_users(
                    self.images.store(),
                    vec![(container.digest.clone(), container.image_user(id))],
                );
                let _ = reply.send(Err(e));
            }
        }
    }

    /// An `Acquire` with a container: start it in the freshly leased VM
    /// (as `AddContainer` does), then reply with the VM, or destroy the VM
    /// and reply the error: a caller never holds a VM without the
    /// workload it asked for.
    pub(super) fn start_leased_container(
        &mut self,
        id: &str,
        spec: ContainerSpec,
        reply: Reply<VmInfo>,
    ) {
        let (added_tx, added) = tokio::sync::oneshot::channel();
        self.add_container(id, spec, added_tx);
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        tokio::spawn(async move {
            let result = added.await.unwrap_or(Err(EngineError::ShuttingDown));
            let _ = tx.send(Internal::LeasedContainerStarted {
                id,
                result: result.map(drop),
                reply,
            });
        });
    }

    /// The container of an `Acquire` runs (or not).
    pub(super) fn leased_container_started(
        &mut self,
        id: &str,
        result: Result<(), EngineError>,
        reply: Reply<VmInfo>,
    ) {
        match result {
            Ok(()) => {
                let _ = reply.send(self.entry(id).map(|e| VmInfo::from(&e.record)));
            }
            Err(e) => {
                warn!(vm = %id, error = %e.message(), "the acquired VM's container did not start, destroying the VM");
                let (done, destroyed) = tokio::sync::oneshot::channel();
                if self.vms.contains_key(id) {
                    self.delete_vm(id, done);
                }
                // Reply once the VM is gone, so the caller never sees it
                // still leased to itself.
                tokio::spawn(async move {
                    let _ = destroyed.await;
                    let _ = reply.send(Err(e));
                });
            }
        }
    }

    /// Resolve a per-image pool's image as user `pool:<name>` (sub-task);
    /// reports `PoolImageResolved`.
    pub(super) fn resolve_pool_image(&self, name: &str, spec: ContainerSpec) {
        let (store, tx, pool) = (
            self.images.store().clone(),
            self.internal_tx.clone(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            let result = resolve_as(store, pool_image_user(&pool), spec, 0, BootSource::Kiln).await;
            let _ = tx.send(Internal::PoolImageResolved { pool, result });
        });
    }

    /// Let go of pool `name`'s hold on image `digest` (sub-task) once
    /// nothing needs it any more: the pool's current image is another (or
    /// the pool is gone) and no VM of the pool (a leased clone that
    /// outlives a tag move or `DeletePool`) runs it. Pool VMs hold no image
    /// user of their own; the pool's user covers them.
    pub(super) fn release_pool_image(&self, name: &str, digest: &str) {
        if self.pool_holds(name, digest) {
            return;
        }
        release_users(
            self.images.store(),
            vec![(digest.to_owned(), pool_image_user(name))],
        );
    }

    /// Whether pool `name` still needs image `digest`.
    fn pool_holds(&self, name: &str, digest: &str) -> bool {
        self.pool_image_digest(name).as_deref() == Some(digest)
            || self.vms.values().any(|e| {
                e.record.pool.as_deref() == Some(name)
                    && e.record.containers.iter().any(|c| c.digest == digest)
            })
    }

    /// `RemoveContainer`: stop and remove it in the guest, unplug its
    /// disks, forget it, release its image.
    pub(super) fn remove_container(&mut self, id: &str, name: String, reply: Reply<()>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let Some(container) = entry
            .record
            .containers
            .iter()
            .find(|c| c.name == name)
            .cloned()
        else {
            return drop(reply.send(Err(EngineError::NoSuchContainer(name))));
        };
        if entry.container_ops.iter().any(|(n, _)| *n == name) {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        }
        if entry.record.spec.boot == BootSource::Image {
            return drop(reply.send(Err(os_has_no_containers())));
        }
        let live = entry.runtime.as_ref().and_then(|r| {
            let qmp = r.qmp.clone()?;
            Some((qmp, r.agent.clone()))
        });
        let Some((qmp, agent)) = live else {
            // No process: nothing in the guest to undo.
            return self.forget_container(id, &container, reply);
        };
        entry.container_ops.insert((name.clone(), container.slot));
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        tokio::spawn(async move {
            let guest_answers = remove_in_guest(agent.as_ref(), &name, Stop::Graceful).await;
            detach_all(qmp.as_ref(), &container.disks()).await;
            let _ = tx.send(Internal::ContainerRemoved {
                id,
                container: Box::new(container),
                result: guest_answers,
                reply,
            });
        });
    }

    /// A `RemoveContainer` sub-task ended.
    pub(super) fn container_removed(
        &mut self,
        id: &str,
        container: ContainerRecord,
        result: Result<(), EngineError>,
        reply: Reply<()>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry
                .container_ops
                .remove(&(container.name.clone(), container.slot));
        }
        if let Err(e) = result {
            return drop(reply.send(Err(e)));
        }
        self.forget_container(id, &container, reply);
    }

    /// Drop a container's record, release its image, then reply (so a
    /// `RemoveImage` right after is not refused).
    fn forget_container(&mut self, id: &str, container: &ContainerRecord, reply: Reply<()>) {
        let name = container.name.clone();
        if let Err(e) = self.update(id, |r| r.containers.retain(|c| c.name != name)) {
            return drop(reply.send(Err(e)));
        }
        info!(vm = %id, container = %container.name, "container removed");
        if let Some(disk) = &container.upper_disk {
            let _ = std::fs::remove_file(disk);
        }
        let release = release_users(
            self.images.store(),
            vec![(container.digest.clone(), container.image_user(id))],
        );
        reply_once_released(release, vec![reply]);
    }

    /// `ListContainers`: the records, refreshed from the agent when the
    /// guest answers.
    pub(super) fn list_containers(&mut self, id: &str, reply: Reply<Vec<ContainerInfo>>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let live = entry
            .answering("list containers of")
            .ok()
            .map(|r| (r.agent.clone(), r.generation));
        // An OS image's root is no container the agent keeps: its record
        // is the truth.
        let guest_has_them =
            !entry.record.containers.is_empty() && entry.record.spec.boot == BootSource::Kiln;
        let Some((agent, generation)) = live.filter(|_| guest_has_them) else {
            let infos = entry
                .record
                .containers
                .iter()
                .map(ContainerInfo::from)
                .collect();
            return drop(reply.send(Ok(infos)));
        };
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        tokio::spawn(async move {
            let result = list_in_guest(agent.as_ref())
                .await
                .map_err(EngineError::from);
            let _ = tx.send(Internal::ContainersObserved {
                id,
                generation,
                result,
                reply,
            });
        });
    }

    /// What the agent said about a VM's containers.
    pub(super) fn containers_observed(
        &mut self,
        id: &str,
        generation: u64,
        result: Result<Vec<proto::ContainerInfo>, EngineError>,
        reply: Reply<Vec<ContainerInfo>>,
    ) {
        let observed = match result {
            Ok(o) => o,
            Err(e) => return drop(reply.send(Err(e))),
        };
        self.observe_containers(id, generation, &observed);
        let infos = self.entry(id).map(|e| {
            e.record
                .containers
                .iter()
                .map(ContainerInfo::from)
                .collect()
        });
        let _ = reply.send(infos);
    }

    /// Take what the agent says about a VM's containers into their records,
    /// and act on exits: a restart by the container's policy, or, for a
    /// VM's `main` container with policy `no`, a stop of the VM. Every
    /// observation goes through here (the watcher's polls and
    /// `ListContainers`), so no exit is seen without its policy applied.
    pub(super) fn observe_containers(
        &mut self,
        id: &str,
        generation: u64,
        observed: &[proto::ContainerInfo],
    ) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        let current = entry.runtime.as_ref().map(|r| r.generation) == Some(generation);
        if !current || !entry.record.state().guest_answers() {
            return;
        }
        let busy: BTreeSet<&str> = entry
            .container_ops
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        let mut exits = Vec::new();
        let mut updated = entry.record.containers.clone();
        for c in &mut updated {
            // A restart in flight, or an add/remove: theirs to report.
            if c.phase == ContainerPhase::Starting || busy.contains(c.name.as_str()) {
                continue;
            }
            let Some(info) = observed.iter().find(|i| i.id == c.name) else {
                continue;
            };
            let was_running = c.phase == ContainerPhase::Running;
            c.observe(info);
            if was_running && c.phase == ContainerPhase::Exited {
                exits.push((c.name.clone(), c.exit_code, c.restart_policy, c.restarts));
            }
        }
        let main_of_vm = entry.record.spec.container.is_some();
        if updated != entry.record.containers {
            self.record_fact(id, |r| r.containers = updated);
        }
        for (name, code, policy, restarts) in exits {
            info!(vm = %id, container = %name, exit_code = ?code, "container exited");
            if policy.restarts_after(code) {
                self.restart_container(id, generation, &name, restarts + 1);
            } else if main_of_vm && name == MAIN_CONTAINER && policy == RestartPolicy::No {
                info!(vm = %id, "the VM's main container exited, stopping the VM");
                let (done, _) = tokio::sync::oneshot::channel();
                self.stop_vm(id, None, done);
            }
        }
    }

    /// Start container `name` again (restart number `n`, after its back-off
    /// delay) in place: the exited process is removed, the layers stay.
    fn restart_container(&mut self, id: &str, generation: u64, name: &str, n: u32) {
        let Some(runtime) = self.vms.get(id).and_then(|e| e.runtime.as_ref()) else {
            return;
        };
        let (Some(qmp), agent) = (runtime.qmp.clone(), runtime.agent.clone()) else {
            return;
        };
        let mut container = None;
        self.record_fact(id, |r| {
            if let Some(c) = r.containers.iter_mut().find(|c| c.name == name) {
                c.phase = ContainerPhase::Starting;
                c.restarts = n;
                container = Some(c.clone());
            }
        });
        let Some(container) = container else {
            return;
        };
        let user = self.running_qemu_user(id);
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        let delay = restart_delay(n);
        info!(vm = %id, container = %container.name, restart = n, ?delay, "restarting container");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = async {
                remove_in_guest(agent.as_ref(), &container.name, Stop::Kill).await?;
                start_container(
                    qmp.as_ref(),
                    agent.as_ref(),
                    &container,
                    Existing::Replace,
                    user.as_ref(),
                )
                .await
            }
            .await;
            let _ = tx.send(Internal::ContainerRestarted {
                id,
                generation,
                name: container.name,
                result,
            });
        });
    }

    /// A restart ended.
    pub(super) fn container_restarted(
        &mut self,
        id: &str,
        generation: u64,
        name: &str,
        result: Result<proto::ContainerInfo, EngineError>,
    ) {
        if self.runtime_of(id, generation).is_none() {
            return;
        }
        self.record_fact(id, |r| {
            if let Some(c) = r.containers.iter_mut().find(|c| c.name == name) {
                match &result {
                    Ok(info) => c.observe(info),
                    Err(e) => {
                        c.phase = ContainerPhase::Failed;
                        c.error = Some(e.message());
                    }
                }
            }
        });
    }

    /// Watch the containers of VM `id`'s process for exits (once per
    /// process): the agent has no push channel, so a sub-task asks it every
    /// [`CONTAINER_POLL`] while the VM has containers. The task ends with
    /// the process (its stop handle lives in the runtime).
    pub(super) fn watch_containers(&mut self, id: &str) {
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        if entry.record.containers.is_empty() {
            return;
        }
        let Some(runtime) = entry.runtime.as_mut() else {
            return;
        };
        if runtime.container_watch.is_some() {
            return;
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.container_watch = Some(stop);
        let (agent, generation) = (runtime.agent.clone(), runtime.generation);
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(CONTAINER_POLL) => {}
                }
                if let Ok(containers) = list_in_guest(agent.as_ref()).await {
                    let polled = Internal::ContainersPolled {
                        id: id.clone(),
                        generation,
                        containers,
                    };
                    if tx.send(polled).is_err() {
                        return;
                    }
                }
            }
        });
    }

    /// `ContainerLogs`: one read of a container's output from the agent's
    /// buffer, from cursor `since`.
    pub(super) fn container_logs(
        &mut self,
        id: &str,
        request: ContainerLogsRequest,
        reply: Reply<ContainerLogsReply>,
    ) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if !entry.record.containers.iter().any(|c| c.name == request.id) {
            return drop(reply.send(Err(EngineError::NoSuchContainer(request.id))));
        }
        let agent = match entry.answering("read the logs of") {
            Ok(r) => r.agent.clone(),
            Err(e) => return drop(reply.send(Err(e))),
        };
        tokio::spawn(async move {
            let result = agent
                .call(proto::method::CONTAINER_LOGS, &request, AGENT_CALL_TIMEOUT)
                .await
                .map_err(EngineError::from);
            let _ = reply.send(result);
        });
    }

    /// At start: list the image store's users and release those that are
    /// containers no VM record has (a crash between acquire and record, or
    /// between record removal and release).
    pub(super) fn sweep_image_users(&self) {
        let (store, tx) = (self.images.store().clone(), self.internal_tx.clone());
        tokio::spawn(async move {
            let Ok(images) = store.list().await else {
                return;
            };
            let users = images
                .into_iter()
                .flat_map(|i| {
                    let digest = i.record.digest.to_string();
                    i.users.into_iter().map(move |u| (digest.clone(), u))
                })
                .filter(|(_, u)| vm_of_image_user(u).is_some() || u.starts_with("pool:"))
                .collect();
            let _ = tx.send(Internal::ImageUsersListed { users });
        });
    }

    /// Release the listed users no VM container (or pending create/add)
    /// or pool accounts for.
    pub(super) fn image_users_listed(&self, users: Vec<(String, String)>) {
        let held = |digest: &str, user: &str| {
            if let Some(pool) = user.strip_prefix("pool:") {
                return self.pool_holds(pool, digest);
            }
            let Some(vm) = vm_of_image_user(user) else {
                return true;
            };
            if self.creating.contains_key(vm) {
                return true;
            }
            self.vms.get(vm).is_some_and(|e| {
                e.record.containers.iter().any(|c| c.image_user(vm) == user)
                    || e.container_ops
                        .iter()
                        .any(|(n, _)| image_user(vm, n) == user)
            })
        };
        let stale: Vec<_> = users.into_iter().filter(|(d, u)| !held(d, u)).collect();
        for (digest, user) in &stale {
            info!(image = %digest, user = %user, "releasing an image user no VM accounts for");
        }
        release_users(self.images.store(), stale);
    }
}
