//! `JoinNetns`: a running bridge VM (a pool's clone, typically, handed to
//! a containerd shim) takes over a pod's network, the Kata and
//! containerd-cloudhypervisor way (docs/networking.md, "A pool VM in a
//! pod's network"; `kiln_net::pod`).
//!
//! A first sub-task reads the pod's CNI interface (changing nothing: a
//! wrong name or an interface without an address leaves the VM as it
//! was). Then the record: the NIC is marked as living in the pod's
//! namespace, with the pod's MAC and address (and its bridge address
//! released), before anything moves, so after a crash at any later step
//! the clean-up looks for the TAP there, and the bridge's clean-up still
//! covers a TAP that had not moved yet. A second sub-task moves the TAP
//! into the namespace, adds the tc redirect both ways and has the agent
//! give the guest's interface the pod's MAC, address, gateway and MTU.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto as proto;
use kiln_net::pod::PodInterface;
use tracing::{info, warn};

use super::network::guest_interface;
use super::Engine;
use crate::api::{PodNetworkRequest, Reply};
use crate::error::EngineError;
use crate::spec::{NetMode, SpecError, NETNS_DIR};
use crate::vm::{PodNetwork, VmInfo, VmRecord};
use crate::vmm::GuestAgent;

/// How long the guest may take to reconfigure its interface.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(15);

/// A join that passed the checks, and what they found.
struct JoinCheck {
    netns: PathBuf,
    interface: String,
    generation: u64,
    agent: Arc<dyn GuestAgent>,
    net: Arc<kiln_net::Network>,
    /// The boot NIC as it is before the join.
    nic: crate::vm::NicInfo,
}

/// What the join's second sub-task needs.
struct JoinPlan {
    generation: u64,
    net: Arc<kiln_net::Network>,
    agent: Arc<dyn GuestAgent>,
    netns: PathBuf,
    tap: String,
    pod: PodInterface,
    /// What the guest is told (`previousMac`: its MAC before the join).
    guest: proto::ConfigureNetworkRequest,
}

/// The guest's configuration for a pod network it took over.
fn pod_guest_config(
    nic: &crate::vm::NicInfo,
    previous_mac: Option<kiln_net::MacAddr>,
    pod: &PodNetwork,
) -> proto::ConfigureNetworkRequest {
    proto::ConfigureNetworkRequest {
        interfaces: vec![guest_interface(
            nic,
            previous_mac,
            pod.prefix_length,
            pod.mtu,
        )],
        gateway: pod.gateway.map(|g| g.to_string()),
        dns: (!pod.dns.is_empty()).then(|| pod.dns.clone()),
    }
}

impl Engine {
    pub(super) fn join_netns(
        &mut self,
        id: &str,
        request: PodNetworkRequest,
        reply: Reply<VmInfo>,
    ) {
        let check = match self.check_join(id, &request) {
            Ok(check) => check,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.insert(0);
        }
        let tx = self.internal_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let inspected = kiln_net::pod::inspect(&check.netns, &check.interface)
                .await
                .map_err(EngineError::from);
            let _ = tx.send(super::Internal::PodInspected {
                id,
                request,
                inspected,
                reply,
            });
        });
    }

    /// Whether VM `id` can join the pod network `request` names; changes
    /// nothing.
    fn check_join(&self, id: &str, request: &PodNetworkRequest) -> Result<JoinCheck, EngineError> {
        let interface = request.validate()?.to_owned();
        let entry = self.entry(id)?;
        if entry.record.pod_network.is_some() {
            return Err(EngineError::InvalidState {
                id: id.to_owned(),
                state: entry.record.state(),
                operation: "join a second pod network with",
            });
        }
        let bridged = entry
            .record
            .spec
            .network
            .as_ref()
            .is_some_and(|n| n.mode == NetMode::Bridge);
        let nic = entry.record.network.iter().find(|n| n.index == 0);
        let (Some(nic), Some(net), true) = (nic, self.vm_net(id), bridged) else {
            return Err(no_bridge_nic(id));
        };
        if entry.nic_ops.contains(&0) {
            return Err(EngineError::Busy { id: id.to_owned() });
        }
        let runtime = entry.answering("join a pod network with")?;
        let netns = super::network::netns_exists(Path::new(NETNS_DIR).join(&request.netns))?;
        Ok(JoinCheck {
            netns,
            interface,
            generation: runtime.generation,
            agent: runtime.agent.clone(),
            net,
            nic: nic.clone(),
        })
    }

    /// The pod's interface was read (or not): write the record that makes
    /// the NIC the pod's, then move it over in a sub-task.
    pub(super) fn pod_inspected(
        &mut self,
        id: &str,
        request: PodNetworkRequest,
        inspected: Result<PodInterface, EngineError>,
        reply: Reply<VmInfo>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.remove(&0);
        }
        match inspected.and_then(|pod| self.begin_join(id, request, pod)) {
            Ok(plan) => {
                let tx = self.internal_tx.clone();
                let id = id.to_owned();
                tokio::spawn(async move {
                    let generation = plan.generation;
                    let result = plan.run(&id).await;
                    let _ = tx.send(super::Internal::NetnsJoined {
                        id,
                        generation,
                        result,
                        reply,
                    });
                });
            }
            Err(e) => {
                warn!(vm = %id, error = %e.message(), "the VM did not join the pod network");
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Checked again (the VM may have changed while the interface was
    /// read), then the record write: NIC 0 in the pod's namespace with the
    /// pod's MAC and address, the bridge address released.
    fn begin_join(
        &mut self,
        id: &str,
        request: PodNetworkRequest,
        pod: PodInterface,
    ) -> Result<JoinPlan, EngineError> {
        let check = self.check_join(id, &request)?;
        let nic = check.nic;
        let pod_network = PodNetwork {
            netns: request.netns.clone(),
            interface: check.interface,
            prefix_length: Some(pod.prefix_length),
            gateway: pod.gateway,
            mtu: pod.mtu,
            dns: request.dns,
        };
        let written = pod_network.clone();
        let (name, mac, address) = (request.netns.clone(), pod.mac, pod.address);
        self.update(id, |r| {
            r.pod_network = Some(written);
            if let Some(n) = r.network.iter_mut().find(|n| n.index == 0) {
                n.netns = Some(name);
                n.mac = mac;
                n.address = Some(address);
            }
        })?;
        // The VM has left the bridge: its address is free for others.
        let spec = self.vms.get(id).map(|e| e.record.spec.clone());
        if let Some(bridge) = spec.as_ref().and_then(|s| self.bridges.of_spec_mut(s)) {
            bridge.ipam.release_nic(id, 0);
        }
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.insert(0);
        }
        info!(vm = %id, netns = %request.netns, address = %pod.address, "joining a pod network");
        let joined = crate::vm::NicInfo {
            mac,
            address: Some(address),
            ..nic.clone()
        };
        Ok(JoinPlan {
            generation: check.generation,
            net: check.net,
            agent: check.agent,
            netns: check.netns,
            tap: nic.tap,
            guest: pod_guest_config(&joined, Some(nic.mac), &pod_network),
            pod,
        })
    }

    pub(super) fn netns_joined(
        &mut self,
        id: &str,
        generation: u64,
        result: Result<u32, EngineError>,
        reply: Reply<VmInfo>,
    ) {
        if let Some(entry) = self.vms.get_mut(id) {
            entry.nic_ops.remove(&0);
        }
        let current = self.runtime_of(id, generation).is_some();
        match result {
            Ok(ifindex) if current => {
                self.record_fact(id, |r| {
                    if let Some(n) = r.network.iter_mut().find(|n| n.index == 0) {
                        n.ifindex = ifindex;
                    }
                });
                info!(vm = %id, ifindex, "joined the pod network");
                let _ = reply.send(self.entry(id).map(|e| VmInfo::from(&e.record)));
            }
            Ok(_) => {
                let state = self
                    .vms
                    .get(id)
                    .map_or(crate::state::VmState::Stopped, |e| e.record.state());
                let _ = reply.send(Err(EngineError::InvalidState {
                    id: id.to_owned(),
                    state,
                    operation: "join a pod network with",
                }));
            }
            Err(e) => {
                warn!(vm = %id, error = %e.message(), "the VM did not join the pod network");
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The guest's configuration of a VM in a pod network (after a
    /// reset), if it took one over.
    pub(super) fn pod_guest_net(
        &self,
        record: &VmRecord,
        clone: bool,
    ) -> Option<proto::ConfigureNetworkRequest> {
        let pod = record.pod_network.as_ref()?;
        let nic = record.network.iter().find(|n| n.index == 0)?;
        // A reset device has its command line's MAC again.
        let previous = clone.then(|| super::network::carried_mac(record));
        Some(pod_guest_config(nic, previous, pod))
    }
}

impl JoinPlan {
    /// Move the TAP, redirect, configure the guest. Returns the TAP's
    /// index in the pod's namespace.
    async fn run(self, id: &str) -> Result<u32, EngineError> {
        self.net.move_tap(id, 0, &self.netns).await?;
        let ifindex = kiln_net::pod::redirect(&self.netns, &self.pod, &self.tap).await?;
        self.agent
            .configure_network(&self.guest, CONFIGURE_TIMEOUT)
            .await?;
        Ok(ifindex)
    }
}

fn no_bridge_nic(id: &str) -> EngineError {
    EngineError::InvalidSpec(SpecError::Network(format!(
        "VM {id} has no bridge NIC to take into a pod's network: give it (or its pool's vm) network.mode = \"bridge\""
    )))
}
