//! Start-up and shutdown: match the records on disk with the processes
//! that run. A live QEMU is re-adopted (QMP reconnected, status re-read,
//! agent reconnected lazily), a dead one's VM is marked `failed`, and runtime
//! directories no record owns are removed with their QEMU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::tasks::{monitor, NextBoot};
use super::{Engine, Internal, Runtime, VmEntry, Write};
use crate::ids::is_vm_id;
use crate::state::VmState;
use crate::store::remove_tree;
use crate::vm::VmRecord;

impl Engine {
    /// Match records with reality: re-adopt live QEMUs, fail the dead, and
    /// remove runtime leftovers no record owns.
    pub(super) async fn reconcile(&mut self, records: Vec<(String, VmRecord)>) {
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

    pub(super) async fn readopt(&mut self, id: &str) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        let state = entry.record.state();
        if !state.has_process() {
            return;
        }
        let runtime_dir = self.config.vm_runtime_dir(id);
        let process = self.vmm.find(id, entry.record.pid, &runtime_dir);
        let Some(process) = process else {
            warn!(vm = %id, was = %state, "QEMU is gone, marking the VM failed");
            remove_tree(&runtime_dir);
            let cgroup = self.cgroup_of(id);
            let oom = cgroup.usage().oom_kills > 0;
            cgroup.remove();
            let _ = self.transition(id, VmState::Failed, Write::Fact, |r| {
                r.pid = None;
                r.last_error = Some(if oom {
                    "QEMU was killed by the OOM killer at the VM's memory cap while kilnd was not running".into()
                } else {
                    "QEMU exited while kilnd was not running".into()
                });
            });
            return;
        };
        let connected = self
            .vmm
            .reconnect(runtime_dir.clone(), self.config.qmp_timeout())
            .await;
        let (qmp, events, version) = match connected {
            Ok(c) => (c.monitor, c.events, c.version),
            Err(e) => {
                warn!(vm = %id, error = %e, "cannot reach QMP of a live QEMU, killing it");
                let _ = process.kill();
                tokio::time::timeout(Duration::from_secs(5), process.exited())
                    .await
                    .ok();
                remove_tree(&runtime_dir);
                self.cgroup_of(id).remove();
                let _ = self.transition(id, VmState::Failed, Write::Fact, |r| {
                    r.pid = None;
                    r.last_error = Some(format!("re-adoption failed: {e}"));
                });
                return;
            }
        };
        self.reconcile_hotplugged_nics(id, qmp.as_ref()).await;
        let generation = self.next_generation();
        let paused = qmp
            .is_running()
            .await
            .map(|running| !running)
            .unwrap_or(false);
        let agent = self.vmm.agent(&runtime_dir);
        tokio::spawn(monitor(
            id.to_owned(),
            generation,
            process.clone(),
            events,
            self.internal_tx.clone(),
            self.config.vm_runtime_dir(id).join("console.log"),
        ));
        let pid = process.pid();
        let qemu = process.clone();
        if let Some(entry) = self.vms.get_mut(id) {
            entry.runtime = Some(Runtime {
                generation,
                process: Some(process),
                qmp: Some(qmp),
                agent: agent.clone(),
                stop_intent: None,
                shutdown_seen: false,
                containers_boot: None,
                container_watch: None,
            });
        }
        info!(vm = %id, pid, state = %state, "re-adopted running VM");
        let next = match state {
            VmState::Ready | VmState::Leased if paused => VmState::Paused,
            VmState::Paused if !paused => VmState::Ready,
            other => other,
        };
        let _ = self.transition(id, next, Write::Fact, |r| {
            r.pid = Some(pid);
            r.qemu_version = Some(version);
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
            // Its containers' exits are watched again.
            _ => self.watch_containers(id),
        }
    }

    pub(super) fn remove_orphan_runtime_dirs(&self, known: &std::collections::HashSet<String>) {
        let Ok(dirs) = std::fs::read_dir(self.config.runtime_dir.join("vms")) else {
            return;
        };
        for dir in dirs.filter_map(Result::ok) {
            let name = dir.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            if let Some(process) = self.vmm.find(&name, None, &dir.path()) {
                warn!(vm = %name, pid = process.pid(), "killing a QEMU no record owns");
                let _ = process.kill();
            }
            remove_tree(&dir.path());
        }
    }

    pub(super) async fn shutdown(
        &mut self,
        stop_vms: bool,
        internal: &mut mpsc::UnboundedReceiver<Internal>,
    ) {
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

/// Unpacked kernels neither in use now nor named by a VM record or a
/// snapshot (which restore with the kernel they were saved with) go.
pub(super) fn remove_unused_kernels(
    state_dir: &Path,
    defaults: &crate::spec::SpecDefaults,
    records: &[(String, crate::vm::VmRecord)],
) {
    let snapshots: Vec<PathBuf> = crate::snapshot::list(state_dir)
        .iter()
        .filter_map(|s| crate::snapshot::load(state_dir, &s.name).ok())
        .map(|(_, meta)| meta.spec.kernel)
        .collect();
    let mut keep: Vec<&Path> = vec![&defaults.kernel, &defaults.gpu_kernel];
    keep.extend(records.iter().map(|(_, r)| r.spec.kernel.as_path()));
    keep.extend(snapshots.iter().map(PathBuf::as_path));
    for removed in crate::guest_kernel::remove_unused(state_dir, &keep) {
        info!(kernel = %removed.display(), "removed an unpacked kernel no VM uses");
    }
}
