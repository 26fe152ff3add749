//! NIC hot-plug: `AttachNIC`, `DetachNIC` (docs/networking.md).
//!
//! A VM created with `network.hotplugSlots = N` runs on q35 with N empty
//! `pcie-root-port`s (`hp1`…`hpN`). NIC `i` always goes into port `hpi`,
//! with netdev `net<i>`, device `nic<i>` and TAP `kt<id><i>`, so every
//! QEMU object of a NIC can be found from its index after a crash.
//!
//! The actor leases the address and writes the NIC into the VM record
//! *before* anything is created; a sub-task then makes the TAP, hands its
//! descriptor to QEMU (`getfd` over SCM_RIGHTS), adds the netdev and the
//! device, and has the agent configure the interface. A failure undoes
//! what was done and drops the NIC from the record. After a kill -9 the
//! record is checked against QEMU's devices when the VM is re-adopted
//! ([`Engine::reconcile_hotplugged_nics`]). Hot-plugged NICs go with the
//! process: a VM that stops or crashes comes back with its boot NIC only.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto as proto;
use serde_json::json;
use tracing::{info, warn};

use super::{Engine, Internal};
use crate::api::Reply;
use crate::error::EngineError;
use crate::qemu::{HotplugIds, QmpError};
use crate::vm::NicInfo;
use crate::vmm::{GuestAgent, Monitor};

/// How long the guest may take to see a new NIC or to release one. Native
/// PCIe hot-plug waits 5 s after the attention button before powering a
/// slot off, and TCG guests are slow.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(60);

impl Engine {
    pub(super) fn attach_nic(
        &mut self,
        id: &str,
        address: Option<Ipv4Addr>,
        reply: Reply<NicInfo>,
    ) {
        match self.begin_attach(id, address) {
            Ok(plan) => {
                let tx = self.internal_tx.clone();
                let id = id.to_owned();
                tokio::spawn(async move {
                    let (generation, index) = (plan.generation, plan.nic.index);
                    let result = plan.run(&id).await;
                    let _ = tx.send(Internal::NicAttached {
                        id,
                        generation,
                        index,
                        result,
                        reply,
                    });
                });
            }
            Err(e) => drop(reply.send(Err(e))),
        }
    }

    /// Checks, the lease and the record write of an attach.
    fn begin_attach(
        &mut self,
        id: &str,
        address: Option<Ipv4Addr>,
    ) -> Result<AttachPlan, EngineError> {
        let entry = self.entry(id)?;
        let slots = entry.record.spec.hotplug_slots();
        if slots == 0 {
            return Err(EngineError::NoHotplugSlot(format!(
                "VM {id} was created without network.hotplugSlots"
            )));
        }
        let runtime = entry.answering("attach a NIC to")?;
        let Some(qmp) = runtime.qmp.clone() else {
            return Err(invalid_state(id, entry.record.state(), "attach a NIC to"));
        };
        let taken =
            |i: u8| entry.nic_ops.contains(&i) || entry.record.network.iter().any(|n| n.index == i);
        let Some(index) = (1..=slots).find(|i| !taken(*i)) else {
            return Err(EngineError::NoHotplugSlot(format!(
                "all {slots} hot-plug slots of VM {id} are in use"
            )));
        };
        let (generation, agent) = (runtime.generation, runtime.agent.clone());
        let spec = entry.record.spec.clone();
        let Some(bridge) = self.bridges.of_spec_mut(&spec) else {
            return Err(self.bridges.missing(&spec));
        };
        let net = bridge.net.clone();
        let lease = bridge
            .ipam
            .allocate(id, index, address)
            .map_err(kiln_net::NetError::from)?;
        let nic = NicInfo {
            index,
            tap: kiln_net::names::tap_name(id, index).map_err(kiln_net::NetError::from)?,
            ifindex: 0,
            mac: lease.mac,
            address: Some(lease.address),
            netns: None,
        };
        let config = net.config();
        let guest = proto::ConfigureNetworkRequest {
            interfaces: vec![super::network::guest_interface(
                &nic,
                None,
                Some(config.subnet.prefix_len()),
                config.mtu,
            )],
            // The boot NIC keeps the default route and DNS.
            gateway: None,
            dns: None,
        };
        let added = nic.clone();
        if let Err(e) = self.update(id, |r| r.network.push(added)) {
            if let Some(bridge) = self.bridges.of_spec_mut(&spec) {
                bridge.ipam.release_nic(id, index);
            }
            return Err(e);
        }
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.insert(index);
        }
        info!(vm = %id, nic = index, address = %lease.address, "attaching NIC");
        Ok(AttachPlan {
            generation,
            nic,
            net,
            qmp,
            agent,
            guest,
        })
    }

    pub(super) fn nic_attached(
        &mut self,
        id: &str,
        generation: u64,
        index: u8,
        result: Result<u32, EngineError>,
        reply: Reply<NicInfo>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.remove(&index);
        }
        let current = self.runtime_of(id, generation).is_some();
        match result {
            Ok(ifindex) if current => {
                self.record_fact(id, |r| {
                    if let Some(n) = r.network.iter_mut().find(|n| n.index == index) {
                        n.ifindex = ifindex;
                    }
                });
                let nic = self
                    .vms
                    .get(id)
                    .and_then(|e| e.record.network.iter().find(|n| n.index == index).cloned());
                info!(vm = %id, nic = index, ifindex, "NIC attached");
                let _ = reply.send(nic.ok_or_else(|| EngineError::NoSuchVM(id.to_owned())));
            }
            result => {
                // Failed, or the process went meanwhile (its exit already
                // dropped the NIC from the record; the TAP may be newer).
                let error = match result {
                    Err(e) => e,
                    Ok(_) => {
                        let state = self
                            .vms
                            .get(id)
                            .map_or(crate::state::VmState::Stopped, |e| e.record.state());
                        invalid_state(id, state, "attach a NIC to")
                    }
                };
                warn!(vm = %id, nic = index, error = %error.message(), "NIC not attached");
                self.forget_nic(id, index);
                let _ = reply.send(Err(error));
            }
        }
    }

    pub(super) fn detach_nic(&mut self, id: &str, index: u8, reply: Reply<()>) {
        let plan = match self.begin_detach(id, index) {
            Ok(plan) => plan,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let tx = self.internal_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let generation = plan.generation;
            let result = unplug(plan.qmp.as_ref(), index).await;
            let _ = tx.send(Internal::NicDetached {
                id,
                generation,
                index,
                result,
                reply,
            });
        });
    }

    fn begin_detach(&mut self, id: &str, index: u8) -> Result<DetachPlan, EngineError> {
        let entry = self.entry(id)?;
        if index == 0 {
            return Err(EngineError::InvalidArgument(
                "NIC 0 is the VM's boot NIC; only hot-plugged NICs (1 or more) can be detached"
                    .into(),
            ));
        }
        if !entry.record.network.iter().any(|n| n.index == index) {
            return Err(EngineError::NoSuchNIC(format!(
                "VM {id} has no NIC {index}"
            )));
        }
        if entry.nic_ops.contains(&index) {
            return Err(EngineError::Busy { id: id.to_owned() });
        }
        let state = entry.record.state();
        let Some((generation, Some(qmp))) = entry
            .runtime
            .as_ref()
            .map(|r| (r.generation, r.qmp.clone()))
        else {
            return Err(invalid_state(id, state, "detach a NIC from"));
        };
        // A paused guest cannot release the device.
        if !state.guest_answers() {
            return Err(invalid_state(id, state, "detach a NIC from"));
        }
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.insert(index);
        }
        info!(vm = %id, nic = index, "detaching NIC");
        Ok(DetachPlan { generation, qmp })
    }

    pub(super) fn nic_detached(
        &mut self,
        id: &str,
        generation: u64,
        index: u8,
        result: Result<(), EngineError>,
        reply: Reply<()>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.remove(&index);
        }
        let current = self.runtime_of(id, generation).is_some();
        match result {
            // Unplugged, or the process is gone (and the NIC with it).
            Ok(()) => {
                info!(vm = %id, nic = index, "NIC detached");
                self.forget_nic(id, index);
                let _ = reply.send(Ok(()));
            }
            Err(_) if !current => {
                self.forget_nic(id, index);
                let _ = reply.send(Ok(()));
            }
            // The guest kept it: it stays attached and recorded.
            Err(e) => {
                warn!(vm = %id, nic = index, error = %e.message(), "NIC not detached");
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Drop NIC `index` of VM `id`: out of the record, its address
    /// released, its TAP removed in a sub-task.
    fn forget_nic(&mut self, id: &str, index: u8) {
        self.record_fact(id, |r| r.network.retain(|n| n.index != index));
        self.release_nics(id, &[index]);
        if let Some(net) = self.vm_net(id) {
            let id = id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = net.delete_tap(&id, index).await {
                    warn!(vm = %id, nic = index, error = %EngineError::from(e).message(), "cannot remove TAP");
                }
            });
        }
    }

    /// Release the addresses of NICs `indices` of VM `id`.
    fn release_nics(&mut self, id: &str, indices: &[u8]) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        if let Some(bridge) = self.bridges.of_spec_mut(&entry.record.spec) {
            for index in indices {
                bridge.ipam.release_nic(id, *index);
            }
        }
    }

    /// Indices of VM `id`'s hot-plugged NICs.
    fn hotplugged_nics(&self, id: &str) -> Vec<u8> {
        self.vms.get(id).map_or_else(Vec::new, |e| {
            e.record
                .network
                .iter()
                .map(|n| n.index)
                .filter(|i| *i > 0)
                .collect()
        })
    }

    /// Hot-plugged NICs end with their process: out of the record and
    /// their addresses released (the TAPs go with the VM's others).
    pub(super) fn drop_hotplugged_nics(&mut self, id: &str) {
        let indices = self.hotplugged_nics(id);
        if indices.is_empty() {
            return;
        }
        self.release_nics(id, &indices);
        self.record_fact(id, |r| r.network.retain(|n| n.index == 0));
    }

    /// After a restart: keep the recorded hot-plugged NICs QEMU still has,
    /// drop the others (kilnd died mid-attach or mid-detach) and remove
    /// what is left of them in QEMU. Runs before the leases are rebuilt.
    pub(super) async fn reconcile_hotplugged_nics(&mut self, id: &str, qmp: &dyn Monitor) {
        let recorded = self.hotplugged_nics(id);
        if recorded.is_empty() {
            return;
        }
        let devices = match qmp.peripheral_ids().await {
            Ok(d) => d,
            Err(e) => {
                return warn!(vm = %id, error = %e, "cannot list QEMU devices, keeping the recorded NICs")
            }
        };
        let gone: Vec<u8> = recorded
            .into_iter()
            .filter(|i| !devices.contains(&HotplugIds::of(*i).device))
            .collect();
        for index in &gone {
            let ids = HotplugIds::of(*index);
            // Whatever the interrupted attach left behind.
            let _ = qmp.netdev_del(&ids.netdev).await;
            let _ = qmp.closefd(&ids.fd).await;
            warn!(vm = %id, nic = index, "hot-plugged NIC is not in QEMU, dropping it");
        }
        if !gone.is_empty() {
            self.record_fact(id, |r| r.network.retain(|n| !gone.contains(&n.index)));
        }
    }
}

fn invalid_state(id: &str, state: crate::state::VmState, operation: &'static str) -> EngineError {
    EngineError::InvalidState {
        id: id.to_owned(),
        state,
        operation,
    }
}

/// What an attach sub-task needs.
struct AttachPlan {
    generation: u64,
    nic: NicInfo,
    net: Arc<kiln_net::Network>,
    qmp: Arc<dyn Monitor>,
    agent: Arc<dyn GuestAgent>,
    guest: proto::ConfigureNetworkRequest,
}

impl AttachPlan {
    /// TAP, descriptor, netdev, device, guest configuration; on failure
    /// the QEMU side is undone (the actor removes the TAP). Returns the
    /// TAP's ifindex.
    async fn run(&self, id: &str) -> Result<u32, EngineError> {
        let ids = HotplugIds::of(self.nic.index);
        let tap = self.net.create_tap(id, self.nic.index).await?;
        let ifindex = tap.index;
        self.qmp.getfd(&ids.fd, tap.fd).await?;
        let netdev = json!({"type": "tap", "id": ids.netdev, "fd": ids.fd});
        if let Err(e) = self.qmp.netdev_add(netdev).await {
            let _ = self.qmp.closefd(&ids.fd).await;
            return Err(e.into());
        }
        let device = json!({
            "driver": "virtio-net-pci",
            "id": ids.device,
            "netdev": ids.netdev,
            "mac": self.nic.mac.to_string(),
            "bus": ids.port,
        });
        if let Err(e) = self.qmp.device_add(device).await {
            let _ = self.qmp.netdev_del(&ids.netdev).await;
            return Err(e.into());
        }
        if let Err(e) = configure_when_present(self.agent.as_ref(), &self.guest).await {
            // Never half-attached: take the device out again.
            if let Err(u) = unplug(self.qmp.as_ref(), self.nic.index).await {
                warn!(vm = %id, nic = self.nic.index, error = %u.message(), "cannot unplug the NIC the guest did not configure");
            }
            return Err(e);
        }
        Ok(ifindex)
    }
}

/// What a detach sub-task needs.
struct DetachPlan {
    generation: u64,
    qmp: Arc<dyn Monitor>,
}

/// `ConfigureNetwork` for a NIC just plugged in, again while the guest
/// has not created its interface yet (PCIe enumeration and the driver
/// probe take a while under TCG).
async fn configure_when_present(
    agent: &dyn GuestAgent,
    request: &proto::ConfigureNetworkRequest,
) -> Result<(), EngineError> {
    let deadline = tokio::time::Instant::now() + HOTPLUG_TIMEOUT;
    loop {
        match agent
            .configure_network(request, Duration::from_secs(15))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e)
                if e.is_call(proto::error::NO_SUCH_INTERFACE)
                    && tokio::time::Instant::now() < deadline => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Ask the guest to release NIC `index`, wait until QEMU has removed the
/// device, then remove its netdev. Polls `qom-list` rather than waiting
/// for `DEVICE_DELETED`: the answer is the same and a missed event cannot
/// hang the caller.
async fn unplug(qmp: &dyn Monitor, index: u8) -> Result<(), EngineError> {
    let ids = HotplugIds::of(index);
    match qmp.device_del(&ids.device).await {
        // Already gone (an earlier request completed).
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
        Err(e) => return Err(e.into()),
        Ok(()) => {}
    }
    let deadline = tokio::time::Instant::now() + HOTPLUG_TIMEOUT;
    while qmp.peripheral_ids().await?.contains(&ids.device) {
        if tokio::time::Instant::now() > deadline {
            return Err(EngineError::Timeout(format!(
                "the guest did not release NIC {index} within {}s",
                HOTPLUG_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match qmp.netdev_del(&ids.netdev).await {
        Ok(()) => Ok(()),
        Err(QmpError::Command { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
