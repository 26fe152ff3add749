//! Bridge networking in the actor (DESIGN.md §5, docs/networking.md).
//!
//! The actor owns the [`kiln_net::Ipam`] and the VM records; `kiln-net`'s
//! [`kiln_net::Network`] does the system work in sub-tasks. A VM's address
//! and MAC are leased when it is defined and written in its record before
//! anything exists on the host; they stay with the VM until it is deleted
//! (stable across restarts). Its TAP exists while a process does: made by
//! the boot sub-task right before QEMU, removed with the VM's forwards
//! when the process exits. On start the leases are rebuilt from the
//! records and every TAP and forward of a VM without a live process is
//! removed.

use std::sync::Arc;

use kiln_agent_proto as proto;

use tracing::{debug, error, info, warn};

use super::{Engine, NetPlan};
use crate::error::EngineError;
use crate::spec::SpecError;
use crate::vm::{NicInfo, VmRecord};

impl Engine {
    /// Lease an address and MAC for a bridge VM being defined. Refuses,
    /// changing nothing, an address that is taken or outside the subnet
    /// and a host port another VM forwards.
    pub(super) fn allocate_network(&mut self, record: &mut VmRecord) -> Result<(), EngineError> {
        let Some(spec) = record.spec.network.clone() else {
            return Ok(());
        };
        if self.net.is_none() {
            return Err(EngineError::InvalidSpec(SpecError::Network(
                "bridge mode needs a [network] table in kilnd.toml".into(),
            )));
        }
        for f in &spec.forwards {
            let holder = self.vms.values().find(|e| {
                e.record.spec.network.as_ref().is_some_and(|n| {
                    n.forwards
                        .iter()
                        .any(|g| g.host_port == f.host_port && g.protocol == f.protocol)
                })
            });
            if let Some(holder) = holder {
                return Err(EngineError::PortInUse(format!(
                    "host port {}/{} is forwarded to VM {}",
                    f.host_port, f.protocol, holder.record.id
                )));
            }
        }
        let Some(ipam) = self.ipam.as_mut() else {
            return Ok(());
        };
        let lease = ipam
            .allocate(&record.id, 0, spec.address)
            .map_err(kiln_net::NetError::from)?;
        let tap = kiln_net::names::tap_name(&record.id, 0).map_err(kiln_net::NetError::from)?;
        record.network = vec![NicInfo {
            index: 0,
            tap,
            ifindex: 0,
            mac: lease.mac,
            address: lease.address,
        }];
        Ok(())
    }

    /// What the boot sub-task needs for VM `id`'s NIC (None: no NIC).
    pub(super) fn net_plan(&mut self, id: &str, clone: bool) -> Option<NetPlan> {
        let net = self.net.clone()?;
        let guest = self.guest_net_for(id, clone)?;
        let entry = self.vms.get_mut(id)?;
        let nic = entry.record.network.iter().find(|n| n.index == 0)?.clone();
        let spec = entry.record.spec.network.as_ref()?;
        Some(NetPlan {
            forwards: spec
                .forwards
                .iter()
                .map(|f| kiln_net::PortForward {
                    vm_id: id.to_owned(),
                    protocol: f.protocol,
                    host_port: f.host_port,
                    address: nic.address,
                    port: f.vm_port,
                })
                .collect(),
            // A clone's device keeps the template's MAC (migrated state).
            device_mac: if clone {
                super::template_mac()
            } else {
                nic.mac
            },
            guest,
            cleanup: entry.net_cleanup.take(),
            net,
        })
    }

    /// The agent's `ConfigureNetwork` for the running VM `id` (after a
    /// reboot or reset), if it has a NIC.
    pub(super) fn guest_net(&self, id: &str) -> Option<proto::ConfigureNetworkRequest> {
        let clone = self.vms.get(id)?.record.template.is_some();
        self.guest_net_for(id, clone)
    }

    /// Every NIC of the VM, the boot NIC first (the default route goes
    /// through it). Hot-plugged NICs have their own MAC in QEMU, so only
    /// a clone's boot NIC may still carry the template's.
    fn guest_net_for(&self, id: &str, clone: bool) -> Option<proto::ConfigureNetworkRequest> {
        let config = self.net.as_ref()?.config();
        let network = &self.vms.get(id)?.record.network;
        if network.is_empty() {
            return None;
        }
        let mut nics: Vec<&NicInfo> = network.iter().collect();
        nics.sort_by_key(|n| n.index);
        Some(proto::ConfigureNetworkRequest {
            interfaces: nics
                .into_iter()
                .map(|nic| proto::NetworkInterface {
                    mac: nic.mac.to_string(),
                    previous_mac: (clone && nic.index == 0)
                        .then(|| super::template_mac().to_string()),
                    address: Some(nic.address.to_string()),
                    prefix_length: Some(config.subnet.prefix_len()),
                    mtu: config.mtu,
                })
                .collect(),
            gateway: Some(config.gateway().to_string()),
            dns: (!config.dns.is_empty())
                .then(|| config.dns.iter().map(ToString::to_string).collect()),
        })
    }

    /// Remove VM `id`'s TAP and forwards in a sub-task (its process is
    /// gone); the next boot of the VM waits for it.
    pub(super) fn remove_taps(&mut self, id: &str) {
        let Some(net) = self.net.clone() else {
            return;
        };
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        if entry.record.network.is_empty() {
            return;
        }
        let previous = entry.net_cleanup.take();
        entry.net_cleanup = Some(spawn_removal(net, id.to_owned(), previous));
    }

    /// Release VM `id`'s address and remove what it has on the host (it is
    /// being deleted).
    pub(super) fn release_network(&mut self, id: &str) {
        let Some(ipam) = self.ipam.as_mut() else {
            return;
        };
        let released = ipam.release(id);
        let previous = self.vms.get_mut(id).and_then(|e| e.net_cleanup.take());
        if let Some(net) = self.net.clone() {
            if !released.is_empty() || previous.is_some() {
                drop(spawn_removal(net, id.to_owned(), previous));
            }
        }
    }

    /// On start: leases from the records, then every TAP and forward of a
    /// VM without a live process removed (orphans of VMs deleted or dead
    /// while kilnd was down).
    pub(super) async fn reconcile_network(&mut self) {
        let (Some(net), Some(ipam)) = (self.net.clone(), self.ipam.as_mut()) else {
            return;
        };
        for entry in self.vms.values() {
            for n in &entry.record.network {
                let lease = kiln_net::Lease {
                    vm_id: entry.record.id.clone(),
                    nic: n.index,
                    address: n.address,
                    mac: n.mac,
                };
                if let Err(e) = ipam.restore(lease) {
                    error!(vm = %entry.record.id, error = %e, "VM record's address conflicts, ignoring it");
                }
            }
        }
        let live: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| e.runtime.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let leases = ipam.leases().count();
        self.remove_unrecorded_taps(&net).await;
        match net.reconcile(&live).await {
            Ok(c) => info!(
                removed_taps = ?c.taps,
                removed_forwards = c.forwards.len(),
                leases,
                "network reconciled"
            ),
            Err(e) => {
                error!(error = %EngineError::from(e).message(), "cannot reconcile the network")
            }
        }
        let stale: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| e.runtime.is_none() && e.record.network.iter().any(|n| n.ifindex != 0))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.record_fact(&id, |r| r.network.iter_mut().for_each(|n| n.ifindex = 0));
        }
    }

    /// TAPs of live VMs whose NIC is not in the record: kilnd died while
    /// attaching or detaching it (the record is written first on attach,
    /// dropped last on detach).
    async fn remove_unrecorded_taps(&self, net: &kiln_net::Network) {
        let taps = match net.taps().await {
            Ok(t) => t,
            Err(e) => return warn!(error = %EngineError::from(e).message(), "cannot list TAPs"),
        };
        for tap in taps {
            let Some(entry) = self.vms.get(&tap.vm_id) else {
                continue;
            };
            if entry.runtime.is_none() || entry.record.network.iter().any(|n| n.index == tap.nic) {
                continue;
            }
            match net.delete_tap(&tap.vm_id, tap.nic).await {
                Ok(_) => {
                    info!(vm = %tap.vm_id, tap = %tap.name, "removed the TAP of a NIC not in the record")
                }
                Err(e) => {
                    warn!(vm = %tap.vm_id, tap = %tap.name, error = %EngineError::from(e).message(), "cannot remove TAP")
                }
            }
        }
    }
}

fn spawn_removal(
    net: Arc<kiln_net::Network>,
    id: String,
    previous: Option<tokio::task::JoinHandle<()>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        match net.remove_vm(&id).await {
            Ok(c) => {
                debug!(vm = %id, taps = ?c.taps, forwards = c.forwards.len(), "VM network removed")
            }
            Err(e) => {
                warn!(vm = %id, error = %EngineError::from(e).message(), "cannot remove VM network")
            }
        }
    })
}
