//! The actor's snapshot half: `SnapshotVM`, `RestoreVM`, `ForkVM`,
//! `ListSnapshots`, `DeleteSnapshot`.
//!
//! A snapshot is saved in the form of a pool template (see
//! `crate::snapshot`), so restoring is cloning: a restored or forked VM
//! maps the snapshot's RAM file copy-on-write and loads its small device
//! state, as a pool clone does from its template. Getting there from a
//! running VM takes two steps, because its RAM is its own (anonymous, or a
//! clone's private copy of a template): the VM is paused and saved whole
//! (device state and all RAM) to a stream file; a loader QEMU with the same
//! devices and its RAM in a shared file loads that stream and saves its
//! device state with `x-ignore-shared`, leaving the RAM in the file. The
//! VM runs on meanwhile only if it was paused by the caller already;
//! otherwise it is resumed once its RAM is on disk (unless `keepPaused`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::network::{carried_mac, TAP_FD};
use super::pools::BootSource;
use super::{Engine, Internal};
use crate::api::{Reply, MAX_FORKS};
use crate::error::EngineError;
use crate::ids::now_usec;
use crate::qemu::{GuestMemory, NicArgs, NicBackend, QemuLaunch};
use crate::snapshot::{self, Build, SnapshotInfo, SnapshotMeta};
use crate::state::VmState;
use crate::store::{create_private_dir, remove_tree};
use crate::vm::{VmInfo, VmRecord};
use crate::vmm::{GuestAgent, Monitor, Vmm};

/// Longest a save or a load of a snapshot may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// What to do once a snapshot is on disk.
#[derive(Debug)]
pub(super) enum AfterSnapshot {
    /// `SnapshotVM`: tell the caller.
    Reply(Reply<SnapshotInfo>),
    /// `ForkVM`: restore `count` VMs from it, then remove it.
    Fork {
        count: u32,
        reply: Reply<Vec<VmInfo>>,
    },
}

/// Everything the snapshot sub-task needs.
struct SnapshotJob {
    qmp: Arc<dyn Monitor>,
    agent: Arc<dyn GuestAgent>,
    vmm: Arc<dyn Vmm>,
    loader: QemuLaunch,
    loader_dir: PathBuf,
    build: Build,
    meta: SnapshotMeta,
    was_paused: bool,
    keep_paused: bool,
    qmp_timeout: Duration,
}

impl SnapshotJob {
    async fn run(self) -> Result<SnapshotInfo, EngineError> {
        // No host connection may be half-open in the saved state: the
        // restored guest would wait on it.
        self.agent.disconnect().await;
        if !self.was_paused {
            self.qmp.stop().await?;
        }
        let saved = self.save().await;
        if !self.was_paused && !self.keep_paused {
            if let Err(e) = self.qmp.cont().await {
                warn!(error = %e, "cannot resume the VM after its snapshot");
            }
        }
        remove_tree(&self.loader_dir);
        match saved {
            Ok(()) => {
                let dir = self.build.final_dir().to_owned();
                let info = self.build.finish(&self.meta)?;
                // Read-only from here on, for the VM that wrote it too.
                if let Some(user) = &self.loader.user {
                    if let Err(e) = user.share(&dir) {
                        warn!(snapshot = %info.name, error = %e, "cannot share a snapshot read-only");
                    }
                }
                Ok(info)
            }
            Err(e) => {
                self.build.discard();
                Err(e)
            }
        }
    }

    /// The whole VM to a stream, then the stream into a RAM file through a
    /// loader VMM that saves its device state without the RAM.
    async fn save(&self) -> Result<(), EngineError> {
        let stream = self.build.stream();
        if let Some(user) = &self.loader.user {
            // The VM's QEMU writes the stream into the build directory.
            crate::qemu_user::give_to(&self.build.template().dir, user).map_err(|e| {
                EngineError::StorageFailed(crate::store::StoreError::Io {
                    path: self.build.template().dir.clone(),
                    source: e,
                })
            })?;
        }
        self.qmp.save_state(&stream, false, SAVE_TIMEOUT).await?;
        create_private_dir(&self.loader_dir)?;
        let log = self.loader_dir.join("qemu.log");
        // The VM's NIC ran on a TAP, whose virtio-net header its saved
        // device state requires of the loader's backend too.
        let inherit = match self.loader.nics.is_empty() {
            true => Vec::new(),
            false => vec![(
                kiln_net::tap::transient().map_err(kiln_net::NetError::from)?,
                TAP_FD,
            )],
        };
        let started = self
            .vmm
            .launch(self.loader.clone(), inherit, log, self.qmp_timeout)
            .await?;
        let monitor = started.monitor.clone();
        let loaded = async {
            monitor.load_state(&stream, SAVE_TIMEOUT).await?;
            let state = self.build.template().state();
            monitor.save_state(&state, true, SAVE_TIMEOUT).await?;
            monitor.quit().await
        }
        .await;
        if tokio::time::timeout(Duration::from_secs(10), started.process.exited())
            .await
            .is_err()
        {
            let _ = started.process.kill();
        }
        loaded.map_err(|e| {
            // The loader's own words say more than a closed monitor.
            let said =
                std::fs::read_to_string(self.loader_dir.join("qemu.log")).unwrap_or_default();
            match said.trim() {
                "" => EngineError::from(e),
                said => EngineError::FileFailed(format!("loading the snapshot: {e}: {said}")),
            }
        })
    }
}

impl Engine {
    /// `SnapshotVM`.
    pub(super) fn snapshot_vm(
        &mut self,
        id: &str,
        name: &str,
        keep_paused: bool,
        reply: Reply<SnapshotInfo>,
    ) {
        self.start_snapshot(id, name, keep_paused, AfterSnapshot::Reply(reply));
    }

    /// `ForkVM`: a hidden snapshot, `count` restores of it, then it goes.
    pub(super) fn fork_vm(&mut self, id: &str, count: u32, reply: Reply<Vec<VmInfo>>) {
        if count == 0 || count > MAX_FORKS {
            return drop(reply.send(Err(EngineError::InvalidArgument(format!(
                "count must be 1 to {MAX_FORKS}"
            )))));
        }
        // Hidden and unique: a random suffix of the VM-id kind.
        let name = format!("fork-{id}-{}", crate::ids::new_vm_id());
        self.start_snapshot(id, &name, false, AfterSnapshot::Fork { count, reply });
    }

    fn start_snapshot(&mut self, id: &str, name: &str, keep_paused: bool, after: AfterSnapshot) {
        let job = match self.snapshot_job(id, name, keep_paused) {
            Ok(job) => job,
            Err(e) => {
                return match after {
                    AfterSnapshot::Reply(reply) => drop(reply.send(Err(e))),
                    AfterSnapshot::Fork { reply, .. } => drop(reply.send(Err(e))),
                }
            }
        };
        if let Some(entry) = self.vms.get_mut(id) {
            entry.busy = true;
        }
        info!(vm = %id, snapshot = %name, "saving a snapshot");
        let (tx, id) = (self.internal_tx.clone(), id.to_owned());
        tokio::spawn(async move {
            let result = job.run().await;
            let _ = tx.send(Internal::SnapshotTaken { id, result, after });
        });
    }

    /// Checks that VM `id` can be saved now and plans the save.
    fn snapshot_job(
        &self,
        id: &str,
        name: &str,
        keep_paused: bool,
    ) -> Result<SnapshotJob, EngineError> {
        let entry = self.entry(id)?;
        let record = &entry.record;
        let state = record.state();
        let runtime = entry
            .runtime
            .as_ref()
            .filter(|_| matches!(state, VmState::Ready | VmState::Leased | VmState::Paused));
        let (Some(runtime), Some(qmp)) = (runtime, runtime.and_then(|r| r.qmp.clone())) else {
            return Err(EngineError::InvalidState {
                id: id.to_owned(),
                state,
                operation: "snapshot",
            });
        };
        if entry.busy {
            return Err(EngineError::Busy { id: id.to_owned() });
        }
        refuse_unsavable(record)?;
        let build = Build::begin(&self.config.state_dir, name)?;
        let ram = u64::from(record.spec.memory_mib) << 20;
        if let Err(e) = crate::store::ensure_room(&self.config.state_dir, ram) {
            build.discard();
            return Err(e.into());
        }
        let loader_dir = self.config.runtime_dir.join(format!("snapshot-{id}"));
        // Its own name: never taken for the VM by a re-adoption.
        let mut loader = self.launch_for_spec(
            &format!("{id}.snapshot"),
            &record.spec,
            &loader_dir,
            GuestMemory::TemplateSource(build.template().memory()),
            &record.containers,
        );
        loader.incoming = true;
        // The VM's own uid: its QEMU writes the stream, the loader reads it.
        loader.user = self.qemu_user(record.qemu_uid, &record.spec, &record.gpus);
        // The loader's NIC is on a TAP of its own that is on no bridge
        // (`tap::transient`), with the MAC the VM's device has, which is
        // part of what gets loaded.
        let device_mac = record.network.iter().find(|n| n.index == 0).map(|nic| {
            if record.template.is_some() {
                carried_mac(record)
            } else {
                nic.mac
            }
        });
        loader.nics = device_mac
            .iter()
            .map(|mac| NicArgs {
                backend: NicBackend::TapFd(TAP_FD),
                mac: mac.to_string(),
            })
            .collect();
        let meta = SnapshotMeta {
            name: name.to_owned(),
            source_id: id.to_owned(),
            source_name: record.name.clone(),
            created_at: now_usec(),
            spec: record.spec.clone(),
            containers: record.containers.clone(),
            mac: device_mac,
        };
        Ok(SnapshotJob {
            qmp,
            agent: runtime.agent.clone(),
            vmm: self.vmm.clone(),
            loader,
            loader_dir,
            build,
            meta,
            was_paused: state == VmState::Paused,
            keep_paused,
            qmp_timeout: self.config.qmp_timeout(),
        })
    }

    /// The snapshot sub-task ended.
    pub(super) fn snapshot_taken(
        &mut self,
        id: &str,
        result: Result<SnapshotInfo, EngineError>,
        after: AfterSnapshot,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.busy = false;
        }
        match (&result, &after) {
            (Ok(info), _) => {
                info!(vm = %id, snapshot = %info.name, bytes = info.size_bytes, "snapshot saved")
            }
            (Err(e), _) => warn!(vm = %id, error = %e.message(), "snapshot failed"),
        }
        match after {
            AfterSnapshot::Reply(reply) => drop(reply.send(result)),
            AfterSnapshot::Fork { count, reply } => match result {
                Ok(info) => self.restore_forks(id, &info.name, count, reply),
                Err(e) => drop(reply.send(Err(e))),
            },
        }
    }

    /// `count` VMs from the fork snapshot `snapshot`, named after VM
    /// `source`; the snapshot is removed once all are up (their QEMUs keep
    /// its RAM file mapped).
    fn restore_forks(
        &mut self,
        source: &str,
        snapshot: &str,
        count: u32,
        reply: Reply<Vec<VmInfo>>,
    ) {
        let base = self
            .vms
            .get(source)
            .map_or_else(|| source.to_owned(), |e| e.record.name.clone());
        let mut waits = Vec::new();
        for _ in 0..count {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let name = self.unused_name(&format!("{base}-fork"));
            self.restore_vm(snapshot, Some(name), false, tx);
            waits.push(rx);
        }
        let state_dir = self.config.state_dir.clone();
        let snapshot = snapshot.to_owned();
        tokio::spawn(async move {
            let mut vms = Vec::new();
            let mut failure = None;
            for rx in waits {
                match rx.await {
                    Ok(Ok(vm)) => vms.push(vm),
                    Ok(Err(e)) => failure = failure.or(Some(e)),
                    Err(_) => failure = failure.or(Some(EngineError::ShuttingDown)),
                }
            }
            if let Err(e) = snapshot::remove(&state_dir, &snapshot) {
                warn!(snapshot = %snapshot, error = %e.message(), "cannot remove a fork snapshot");
            }
            let _ = reply.send(match failure {
                // The forks that did start are the caller's to delete.
                Some(e) => Err(e),
                None => Ok(vms),
            });
        });
    }

    /// `base-N` for the smallest N ≥ 1 no VM is named.
    fn unused_name(&self, base: &str) -> String {
        (1..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !self.name_taken(name))
            .unwrap_or_else(|| base.to_owned())
    }

    /// `RestoreVM`: a new VM from snapshot `snapshot`, booted from it: its
    /// RAM mapped copy-on-write, its device state loaded, a new identity
    /// and its own MAC and address unless `same_identity`. Replies once
    /// its agent answers.
    pub(super) fn restore_vm(
        &mut self,
        snapshot: &str,
        name: Option<String>,
        same_identity: bool,
        reply: Reply<VmInfo>,
    ) {
        let (saved, meta) = match snapshot::load(&self.config.state_dir, snapshot) {
            Ok(loaded) => loaded,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let name = name.unwrap_or_else(|| self.unused_name(snapshot));
        if let Err(e) = crate::spec::validate_name(&name) {
            return drop(reply.send(Err(EngineError::InvalidName(e))));
        }
        if self.name_taken(&name) {
            return drop(reply.send(Err(EngineError::AlreadyExists(name))));
        }
        let id = self.unused_vm_id();
        let mut record = VmRecord::new(id.clone(), name, meta.spec.clone(), None);
        record.containers = meta.containers.clone();
        record.saved_mac = meta.mac;
        let users: Vec<(String, String)> = record
            .containers
            .iter()
            .map(|c| (c.digest.clone(), c.image_user(&id)))
            .collect();
        if let Err(e) = self.insert_vm(record) {
            return drop(reply.send(Err(e)));
        }
        // Its containers hold their images, as any VM's do.
        let store = self.images.store().clone();
        tokio::spawn(async move {
            for (digest, user) in users {
                if let Err(e) = store.acquire(&digest, &user).await {
                    warn!(image = %digest, error = %EngineError::from(e).message(), "a restored container's image is gone");
                }
            }
        });
        info!(vm = %id, snapshot = %snapshot, "restoring a snapshot");
        let source = BootSource::Snapshot {
            saved,
            fresh_identity: !same_identity,
        };
        self.begin_boot(&id, source, Some(reply));
    }

    /// `RestoreVM` with `into`: VM `id`, not running, goes back to
    /// snapshot `snapshot` (arktos' `RestoreToSnapshot`): booted from it
    /// with its own identity. Its spec and containers must be the
    /// snapshot's (the same machine).
    pub(super) fn restore_into(&mut self, snapshot: &str, id: &str, reply: Reply<VmInfo>) {
        let (saved, meta) = match snapshot::load(&self.config.state_dir, snapshot) {
            Ok(loaded) => loaded,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state();
        if entry.runtime.is_some() || state.check_transition(VmState::Booting).is_err() {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.to_owned(),
                state,
                operation: "restore into (stop it first)",
            })));
        }
        let same = |a: &[crate::container::ContainerRecord],
                    b: &[crate::container::ContainerRecord]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.name == y.name && x.digest == y.digest)
        };
        if entry.record.spec != meta.spec || !same(&entry.record.containers, &meta.containers) {
            return drop(reply.send(Err(EngineError::InvalidArgument(format!(
                "VM {id} is not the machine snapshot {snapshot} was taken of (its spec or containers differ)"
            )))));
        }
        let mac = meta.mac;
        self.record_fact(id, |r| r.saved_mac = mac);
        info!(vm = %id, snapshot = %snapshot, "restoring a VM to a snapshot");
        let source = BootSource::Snapshot {
            saved,
            fresh_identity: false,
        };
        self.begin_boot(id, source, Some(reply));
    }

    /// `ListSnapshots`.
    pub(super) fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        snapshot::list(&self.config.state_dir)
    }

    /// `DeleteSnapshot`.
    pub(super) fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        snapshot::remove(&self.config.state_dir, name)
    }
}

/// What a snapshot cannot hold: devices that are the host's (GPUs), NICs
/// plugged at run time (a restored VM's command line would not have
/// them), writable container disks (not copied yet).
fn refuse_unsavable(record: &VmRecord) -> Result<(), EngineError> {
    let refuse = |why: &str| {
        Err(EngineError::NotSnapshottable(format!(
            "VM {} {why}",
            record.id
        )))
    };
    if !record.gpus.is_empty() || record.spec.gpus.is_some() {
        return refuse("has GPUs, which are the host's devices");
    }
    if record.network.iter().any(|n| n.index > 0) {
        return refuse("has hot-plugged NICs");
    }
    if record.spec.boot == crate::spec::BootSource::Image {
        // Its initramfs is its own; a copy would boot the original's.
        return refuse("boots its image as an OS (boot: image), which boots cold only");
    }
    if record.containers.iter().any(|c| c.upper_disk.is_some()) {
        return refuse("has a container with storageDisk (writable disks are not saved yet)");
    }
    Ok(())
}
