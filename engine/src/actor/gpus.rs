//! GPU render nodes: the part of the actor that leases them to VMs.
//!
//! The inventory and the lease logic live in `kiln-gpu`; here the actor
//! decides *when*: a VM that asks for GPUs gets its lease right before its
//! QEMU is launched (all or nothing, persisted before the launch, so a VM is
//! never half-started), the QEMU user is granted access to exactly the
//! leased node, and the lease goes when the process is gone. At start-up
//! and whenever `/dev/dri` changes, the table is reconciled with the VMs
//! that run and the nodes that exist.

use std::collections::HashSet;

use kiln_gpu::{GpuDevice, GpuError, Inventory, LeaseTable, VirglOptions};
use tracing::{info, warn};

use super::Engine;
use crate::api::{EngineEvent, GpuInfo};
use crate::error::EngineError;
use crate::spec::{Display, ResolvedSpec};

/// The actor's GPU state.
#[derive(Debug, Default)]
pub(super) struct Gpus {
    inventory: Inventory,
    leases: LeaseTable,
}

/// The uid QEMU runs as (kilnd's own: QEMU is its child).
fn qemu_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl Engine {
    /// Scan the nodes, load the lease table and drop leases of VMs that no
    /// longer run or nodes that are gone; re-grant the rest.
    pub(super) fn load_gpus(&mut self) {
        self.gpus.leases = match LeaseTable::load(&self.config.gpu_leases_file()) {
            Ok(table) => table.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "GPU lease table unreadable, starting empty");
                LeaseTable::default()
            }
        };
        self.gpus
            .leases
            .set_max_vms_per_gpu(self.config.max_vms_per_gpu);
        self.rescan_gpus();
    }

    /// Re-read the inventory and reconcile (the watcher saw a change).
    pub(super) fn rescan_gpus(&mut self) {
        self.gpus.inventory =
            match Inventory::scan(&self.config.gpu_sysfs_root, &self.config.gpu_dev_root) {
                Ok(inventory) => inventory,
                Err(e) => {
                    warn!(error = %e, "cannot list GPU render nodes");
                    Inventory::default()
                }
            };
        let live: HashSet<String> = self
            .vms
            .iter()
            .filter(|(_, e)| e.runtime.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let dropped = self.gpus.leases.reconcile(&live, &self.gpus.inventory);
        for d in &dropped {
            info!(vm = %d.lease.vm_id, node = %d.lease.node, reason = ?d.reason, "GPU lease dropped");
            self.revoke_if_unused(&d.lease.path, &d.lease.node);
        }
        let kept: Vec<_> = self.gpus.leases.leases().to_vec();
        for lease in kept {
            if let Err(e) = kiln_gpu::grant(&lease.path, qemu_uid()) {
                warn!(node = %lease.node, error = %e, "cannot grant GPU access");
            }
        }
        self.save_gpu_leases();
        info!(
            nodes = self.gpus.inventory.len(),
            leases = self.gpus.leases.leases().len(),
            "GPUs scanned"
        );
        self.publish_gpus();
    }

    /// Lease what `spec` asks for to VM `id` and return QEMU's GPU options
    /// (empty for a VM without GPU or display). Nothing stays leased on error.
    pub(super) fn lease_gpus(
        &mut self,
        id: &str,
        spec: &ResolvedSpec,
    ) -> Result<Vec<(String, String)>, EngineError> {
        let device = match (&spec.gpus, spec.display) {
            (None, Display::None) => return Ok(Vec::new()),
            (None, Display::VirtioGpu) => GpuDevice::Virtio2d,
            (Some(request), _) => {
                let leases = self
                    .gpus
                    .leases
                    .acquire(id, request, &self.gpus.inventory)
                    .map_err(gpu_error)?;
                if let Err(e) = self.gpus.leases.save(&self.config.gpu_leases_file()) {
                    self.gpus.leases.release(id);
                    return Err(gpu_error(e));
                }
                for lease in &leases {
                    if let Err(e) = kiln_gpu::grant(&lease.path, qemu_uid()) {
                        self.release_gpus(id);
                        return Err(EngineError::NoGpuAvailable(format!(
                            "cannot grant access to {}: {e}",
                            lease.path.display()
                        )));
                    }
                }
                info!(vm = %id, nodes = ?leases.iter().map(|l| &l.node).collect::<Vec<_>>(), "GPU leased");
                self.publish_gpus();
                GpuDevice::virgl(&leases, VirglOptions::default()).map_err(|e| {
                    EngineError::InvalidSpec(crate::spec::SpecError::Gpus(e.to_string()))
                })?
            }
        };
        kiln_gpu::qemu_args(&device)
            .map_err(|e| EngineError::InvalidSpec(crate::spec::SpecError::Gpus(e.to_string())))
    }

    /// Give back a VM's leases (its process is gone).
    pub(super) fn release_gpus(&mut self, id: &str) {
        let released = self.gpus.leases.release(id);
        if released.is_empty() {
            return;
        }
        for lease in &released {
            self.revoke_if_unused(&lease.path, &lease.node);
        }
        self.save_gpu_leases();
        info!(vm = %id, "GPU released");
        self.publish_gpus();
    }

    /// Every render node with its holders.
    pub(super) fn list_gpus(&self) -> Vec<GpuInfo> {
        let usage = self.gpus.leases.usage(&self.gpus.inventory);
        self.gpus
            .inventory
            .nodes
            .iter()
            .zip(usage)
            .map(|(node, usage)| GpuInfo {
                node: node.clone(),
                usage,
            })
            .collect()
    }

    /// Node names a VM holds.
    pub(super) fn gpus_of(&self, id: &str) -> Vec<String> {
        self.gpus
            .leases
            .leases_of(id)
            .map(|l| l.node.clone())
            .collect()
    }

    /// Every QEMU runs as one user: take access back only when no lease on
    /// the node is left.
    fn revoke_if_unused(&self, path: &std::path::Path, node: &str) {
        if self.gpus.leases.holders(node).next().is_none() {
            if let Err(e) = kiln_gpu::revoke(path, qemu_uid()) {
                warn!(node = %node, error = %e, "cannot revoke GPU access");
            }
        }
    }

    fn save_gpu_leases(&self) {
        if let Err(e) = self.gpus.leases.save(&self.config.gpu_leases_file()) {
            warn!(error = %e, "cannot persist GPU leases");
        }
    }

    fn publish_gpus(&self) {
        let _ = self.events.send(EngineEvent::GpusChanged {
            gpus: self.list_gpus(),
        });
    }
}

fn gpu_error(e: GpuError) -> EngineError {
    match e {
        GpuError::InvalidRequest { .. } => {
            EngineError::InvalidSpec(crate::spec::SpecError::Gpus(e.to_string()))
        }
        GpuError::Io { .. } => EngineError::StorageFailed(crate::store::StoreError::Io {
            path: "gpu-leases.json".into(),
            source: std::io::Error::other(e.to_string()),
        }),
        other => EngineError::NoGpuAvailable(other.to_string()),
    }
}
