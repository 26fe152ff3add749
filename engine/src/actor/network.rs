//! Networking in the actor (DESIGN.md §5, docs/networking.md).
//!
//! The actor owns the [`kiln_net::Ipam`] and the VM records; `kiln-net`'s
//! [`kiln_net::Network`] does the system work in sub-tasks. A bridge VM's
//! address and MAC are leased when it is defined and written in its record
//! before anything exists on the host; they stay with the VM until it is
//! deleted (stable across restarts). Its TAP exists while a process does:
//! made by the boot sub-task right before QEMU, removed with the VM's
//! forwards when the process exits. On start the leases are rebuilt from
//! the records and every TAP and forward of a VM without a live process is
//! removed. A `netns`-mode VM's TAP follows the same life, in the
//! namespace its spec names.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_agent_proto as proto;

use tracing::{debug, error, info, warn};

use super::Engine;
use crate::error::EngineError;
use crate::spec::{NetMode, SpecError};
use crate::vm::{NicInfo, VmRecord};

/// Descriptor number of a VM's TAP in QEMU (`-netdev tap,fd=3`).
pub(super) const TAP_FD: i32 = 3;

/// The MAC of a template VM's NIC. Clones start with it (it is part of the
/// saved device state) until the agent gives them their own.
pub(super) fn template_mac() -> kiln_net::MacAddr {
    kiln_net::MacAddr::for_vm("000000000000", 0, 0)
}

/// The MAC a clone's boot NIC device carries: its snapshot's, or the
/// pool templates' fixed one.
pub(super) fn carried_mac(record: &VmRecord) -> kiln_net::MacAddr {
    record.saved_mac.unwrap_or_else(template_mac)
}

/// What the boot sub-task needs for a bridge VM's NIC.
#[derive(Debug)]
pub(super) struct NetPlan {
    /// Where its TAP is made.
    pub(super) home: TapHome,
    /// The MAC of QEMU's device: the VM's own, or a clone's template's.
    pub(super) device_mac: kiln_net::MacAddr,
    /// What the agent is told.
    pub(super) guest: proto::ConfigureNetworkRequest,
    pub(super) forwards: Vec<kiln_net::PortForward>,
    /// The previous process's TAP removal, awaited before the new TAP.
    pub(super) cleanup: Option<tokio::task::JoinHandle<()>>,
}

/// One of kilnd's bridges: the network and the leases of its VMs.
#[derive(Debug)]
pub(super) struct Bridge {
    pub(super) net: Arc<kiln_net::Network>,
    pub(super) ipam: kiln_net::Ipam,
}

/// kilnd's bridges by name: the `[network]` table's (the default) and
/// every `[[networks]]` entry's. Each has its own subnet and addresses; a
/// VM names one with `network.bridge`.
#[derive(Debug, Default)]
pub(super) struct Bridges {
    default: Option<String>,
    by_name: BTreeMap<String, Bridge>,
}

impl Bridges {
    /// Open every configured bridge, making sure it and Kiln's nft table
    /// exist. A bridge name given twice stops kilnd; so does a subnet that
    /// overlaps another's (kiln-net's `SubnetInUse`: the first bridge
    /// already carries its gateway address).
    pub(super) async fn open(
        default: Option<kiln_net::NetConfig>,
        more: Vec<kiln_net::NetConfig>,
    ) -> Result<Self, EngineError> {
        let mut bridges = Self {
            default: default.as_ref().map(|c| c.bridge.clone()),
            by_name: BTreeMap::new(),
        };
        for config in default.into_iter().chain(more) {
            let name = config.bridge.clone();
            if bridges.by_name.contains_key(&name) {
                return Err(EngineError::InvalidArgument(format!(
                    "bridge {name:?} is configured twice ([network] and [[networks]] need distinct bridges)"
                )));
            }
            let ipam = config.new_ipam().map_err(kiln_net::NetError::from)?;
            let net = kiln_net::Network::open(config).await?;
            let status = net.ensure().await?;
            info!(bridge = %status.name, index = status.index, created = status.created, "network ready");
            bridges.by_name.insert(
                name,
                Bridge {
                    net: Arc::new(net),
                    ipam,
                },
            );
        }
        Ok(bridges)
    }

    /// The bridge a VM's spec names (its `network.bridge`, else the
    /// default), if it is a bridge VM and that bridge exists.
    pub(super) fn of_spec(&self, spec: &crate::spec::ResolvedSpec) -> Option<&Bridge> {
        let name = self.name_for(spec)?;
        self.by_name.get(&name)
    }

    /// See [`Bridges::of_spec`].
    pub(super) fn of_spec_mut(&mut self, spec: &crate::spec::ResolvedSpec) -> Option<&mut Bridge> {
        let name = self.name_for(spec)?;
        self.by_name.get_mut(&name)
    }

    fn name_for(&self, spec: &crate::spec::ResolvedSpec) -> Option<String> {
        let network = spec
            .network
            .as_ref()
            .filter(|n| n.mode == NetMode::Bridge)?;
        network.bridge.clone().or_else(|| self.default.clone())
    }

    /// Every bridge.
    pub(super) fn all(&self) -> impl Iterator<Item = &Bridge> {
        self.by_name.values()
    }

    /// One bridge's network per network namespace: what is namespace-wide
    /// (Kiln's TAPs, the `inet kiln` table) is reconciled through it once.
    pub(super) fn one_per_namespace(&self) -> Vec<Arc<kiln_net::Network>> {
        let mut nets: Vec<Arc<kiln_net::Network>> = Vec::new();
        for bridge in self.all() {
            if !nets
                .iter()
                .any(|n| n.config().netns == bridge.net.config().netns)
            {
                nets.push(bridge.net.clone());
            }
        }
        nets
    }

    /// The error for a bridge VM whose bridge is not configured.
    pub(super) fn missing(&self, spec: &crate::spec::ResolvedSpec) -> EngineError {
        let named = spec.network.as_ref().and_then(|n| n.bridge.clone());
        EngineError::InvalidSpec(SpecError::Network(match named {
            Some(name) => format!(
                "no bridge named {name:?} in kilnd.toml (configured: {})",
                self.by_name.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            None => "bridge mode needs a [network] table in kilnd.toml".into(),
        }))
    }
}

/// Where a VM's boot NIC's TAP is made.
#[derive(Debug, Clone)]
pub(super) enum TapHome {
    /// On kilnd's bridge (with the VM's forwards).
    Bridge(Arc<kiln_net::Network>),
    /// In a caller's namespace (`netns` mode): made there, not wired.
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The TAP's name.
        tap: String,
    },
}

impl TapHome {
    /// Create (or reattach) the TAP of `id`'s boot NIC.
    pub(super) async fn create_tap(&self, id: &str) -> Result<kiln_net::Tap, EngineError> {
        Ok(match self {
            Self::Bridge(net) => net.create_tap(id, 0).await?,
            Self::Netns { path, tap } => {
                kiln_net::create_tap_in(Some(path), tap, kiln_net::TapOwner::default()).await?
            }
        })
    }
}

/// How the agent is told about one NIC: its MAC (and, for a clone's boot
/// NIC, the template's MAC it still carries), its address with the
/// subnet's prefix, and the MTU.
pub(super) fn guest_interface(
    nic: &NicInfo,
    previous_mac: Option<kiln_net::MacAddr>,
    prefix_length: Option<u8>,
    mtu: Option<u32>,
) -> proto::NetworkInterface {
    proto::NetworkInterface {
        mac: nic.mac.to_string(),
        previous_mac: previous_mac.map(|m| m.to_string()),
        address: nic.address.map(|a| a.to_string()),
        prefix_length: nic.address.and(prefix_length),
        mtu,
        // On, after the MAC: a clone's template saved its NIC up with IPv6
        // off (vmm/qemu.rs), so the link-local address is made from the
        // clone's own MAC.
        ipv6: Some(true),
    }
}

/// The namespace TAPs of a record's NICs (`netns` mode), to remove.
fn netns_taps(record: &VmRecord) -> Vec<(PathBuf, String)> {
    record
        .network
        .iter()
        .filter_map(|n| {
            let netns = n.netns.as_ref()?;
            Some((
                PathBuf::from(crate::spec::NETNS_DIR).join(netns),
                n.tap.clone(),
            ))
        })
        .collect()
}

impl Engine {
    /// Give a VM being defined its NIC: for `bridge`, lease an address and
    /// MAC (refusing, changing nothing, an address that is taken or
    /// outside the subnet and a host port another VM forwards); for
    /// `netns`, a MAC and the caller's address.
    pub(super) fn allocate_network(&mut self, record: &mut VmRecord) -> Result<(), EngineError> {
        let Some(spec) = record.spec.network.clone() else {
            return Ok(());
        };
        let tap = kiln_net::names::tap_name(&record.id, 0).map_err(kiln_net::NetError::from)?;
        if spec.mode == NetMode::Netns {
            record.network = vec![NicInfo {
                index: 0,
                tap,
                ifindex: 0,
                mac: kiln_net::MacAddr::for_vm(&record.id, 0, 0),
                address: spec.address,
                netns: spec.netns.clone(),
            }];
            return Ok(());
        }
        let Some(bridge) = self.bridges.of_spec_mut(&record.spec) else {
            return Err(self.bridges.missing(&record.spec));
        };
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
        let lease = bridge
            .ipam
            .allocate(&record.id, 0, spec.address)
            .map_err(kiln_net::NetError::from)?;
        record.network = vec![NicInfo {
            index: 0,
            tap,
            ifindex: 0,
            mac: lease.mac,
            address: Some(lease.address),
            netns: None,
        }];
        Ok(())
    }

    /// Whether VM `id` can get its NIC now: bridge mode needs kilnd's
    /// network, `netns` mode an existing namespace (checked before
    /// anything is changed, so a missing one leaves the VM as it was).
    pub(super) fn check_network(&self, id: &str) -> Result<(), EngineError> {
        let Some(entry) = self.vms.get(id) else {
            return Ok(());
        };
        let Some(spec) = entry.record.spec.network.as_ref() else {
            return Ok(());
        };
        if let Some(pod) = &entry.record.pod_network {
            return Err(EngineError::InvalidSpec(SpecError::Network(format!(
                "VM {id} took over the network of pod namespace {}, which went with its process: delete the VM",
                pod.netns
            ))));
        }
        if spec.mode == NetMode::Bridge && self.bridges.of_spec(&entry.record.spec).is_none() {
            return Err(self.bridges.missing(&entry.record.spec));
        }
        if entry.record.network.is_empty() {
            return Err(no_network_table());
        }
        if let Some(path) = spec.netns_path() {
            netns_exists(path)?;
        }
        Ok(())
    }

    /// What the boot sub-task needs for VM `id`'s NIC (None: no NIC).
    pub(super) fn net_plan(&mut self, id: &str, clone: bool) -> Option<NetPlan> {
        let guest = self.guest_net_for(id, clone)?;
        let net = self.vm_net(id);
        let entry = self.vms.get_mut(id)?;
        let nic = entry.record.network.iter().find(|n| n.index == 0)?.clone();
        let spec = entry.record.spec.network.as_ref()?;
        let home = match spec.netns_path() {
            Some(path) => TapHome::Netns {
                path,
                tap: nic.tap.clone(),
            },
            None => TapHome::Bridge(net?),
        };
        Some(NetPlan {
            forwards: spec
                .forwards
                .iter()
                .filter_map(|f| {
                    Some(kiln_net::PortForward {
                        vm_id: id.to_owned(),
                        protocol: f.protocol,
                        host_port: f.host_port,
                        address: nic.address?,
                        port: f.vm_port,
                    })
                })
                .collect(),
            // A clone's device keeps the saved machine's MAC (migrated
            // state).
            device_mac: if clone {
                carried_mac(&entry.record)
            } else {
                nic.mac
            },
            guest,
            cleanup: entry.net_cleanup.take(),
            home,
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
    /// a clone's boot NIC may still carry the template's. A `netns` VM
    /// gets what its spec says (maybe just a link that is up).
    fn guest_net_for(&self, id: &str, clone: bool) -> Option<proto::ConfigureNetworkRequest> {
        let record = &self.vms.get(id)?.record;
        if record.pod_network.is_some() {
            return self.pod_guest_net(record, clone);
        }
        let spec = record.spec.network.as_ref()?;
        let mut nics: Vec<&NicInfo> = record.network.iter().collect();
        nics.sort_by_key(|n| n.index);
        let carried = carried_mac(record);
        let interface = |nic: &NicInfo, prefix_length: Option<u8>, mtu: Option<u32>| {
            let previous = (clone && nic.index == 0).then_some(carried);
            guest_interface(nic, previous, prefix_length, mtu)
        };
        if spec.mode == NetMode::Netns {
            return Some(proto::ConfigureNetworkRequest {
                interfaces: nics
                    .into_iter()
                    .map(|n| interface(n, spec.prefix_length, None))
                    .collect(),
                gateway: spec.gateway.map(|g| g.to_string()),
                dns: None,
            });
        }
        let config = self.bridges.of_spec(&record.spec)?.net.config();
        if nics.is_empty() {
            return None;
        }
        Some(proto::ConfigureNetworkRequest {
            interfaces: nics
                .into_iter()
                .map(|n| interface(n, Some(config.subnet.prefix_len()), config.mtu))
                .collect(),
            gateway: Some(config.gateway().to_string()),
            dns: (!config.dns.is_empty())
                .then(|| config.dns.iter().map(ToString::to_string).collect()),
        })
    }

    /// Remove VM `id`'s TAPs and forwards in a sub-task (its process is
    /// gone); the next boot of the VM waits for it.
    pub(super) fn remove_taps(&mut self, id: &str) {
        let net = self.vm_net(id);
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        if entry.record.network.is_empty() {
            return;
        }
        let removal = Removal {
            net,
            id: id.to_owned(),
            netns_taps: netns_taps(&entry.record),
            previous: entry.net_cleanup.take(),
        };
        entry.net_cleanup = Some(removal.spawn());
    }

    /// Release VM `id`'s address and remove what it has on the host (it is
    /// being deleted).
    pub(super) fn release_network(&mut self, id: &str) {
        let net = self.vm_net(id);
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        let released = self
            .bridges
            .of_spec_mut(&entry.record.spec)
            .map(|b| b.ipam.release(id))
            .unwrap_or_default();
        // A VM in a pod's network released its address at the join; its
        // TAP may still be here if kilnd died before moving it.
        let joined = entry.record.pod_network.is_some();
        let removal = Removal {
            net: net.filter(|_| !released.is_empty() || joined),
            id: id.to_owned(),
            netns_taps: netns_taps(&entry.record),
            previous: entry.net_cleanup.take(),
        };
        if removal.net.is_some() || !removal.netns_taps.is_empty() || removal.previous.is_some() {
            drop(removal.spawn());
        }
    }

    /// On start: leases from the records, then every TAP and forward of a
    /// VM without a live process removed (orphans of VMs deleted or dead
    /// while kilnd was down).
    pub(super) async fn reconcile_network(&mut self) {
        let dead: Vec<(String, Vec<(PathBuf, String)>)> = self
            .vms
            .iter()
            .filter(|(_, e)| e.runtime.is_none())
            .map(|(id, e)| (id.clone(), netns_taps(&e.record)))
            .collect();
        for (id, taps) in dead {
            for (netns, tap) in taps {
                remove_netns_tap(&id, &netns, &tap).await;
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
        for entry in self.vms.values() {
            let Some(bridge) = self.bridges.of_spec_mut(&entry.record.spec) else {
                continue;
            };
            for n in &entry.record.network {
                let (Some(address), None) = (n.address, &n.netns) else {
                    continue;
                };
                let lease = kiln_net::Lease {
                    vm_id: entry.record.id.clone(),
                    nic: n.index,
                    address,
                    mac: n.mac,
                };
                if let Err(e) = bridge.ipam.restore(lease) {
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
        let leases: usize = self.bridges.all().map(|b| b.ipam.leases().count()).sum();
        // TAP listings and the nft table are per namespace, not per bridge.
        for net in self.bridges.one_per_namespace() {
            self.remove_unrecorded_taps(&net).await;
            match net.reconcile(&live).await {
                Ok(c) => info!(
                    netns = ?net.config().netns,
                    removed_taps = ?c.taps,
                    removed_forwards = c.forwards.len(),
                    leases,
                    "network reconciled"
                ),
                Err(e) => {
                    error!(error = %EngineError::from(e).message(), "cannot reconcile the network")
                }
            }
        }
    }

    /// The network of VM `id`'s bridge (bridge VMs only).
    pub(super) fn vm_net(&self, id: &str) -> Option<Arc<kiln_net::Network>> {
        let spec = &self.vms.get(id)?.record.spec;
        Some(self.bridges.of_spec(spec)?.net.clone())
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

/// The clean-up of a VM's network after its process ended or it was
/// deleted: its TAPs and forwards in kilnd's network, its TAP in a
/// caller's namespace.
struct Removal {
    net: Option<Arc<kiln_net::Network>>,
    id: String,
    netns_taps: Vec<(PathBuf, String)>,
    /// An earlier removal, finished first.
    previous: Option<tokio::task::JoinHandle<()>>,
}

impl Removal {
    fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let id = self.id;
            if let Some(previous) = self.previous {
                let _ = previous.await;
            }
            if let Some(net) = self.net {
                match net.remove_vm(&id).await {
                    Ok(c) => {
                        debug!(vm = %id, taps = ?c.taps, forwards = c.forwards.len(), "VM network removed")
                    }
                    Err(e) => {
                        warn!(vm = %id, error = %EngineError::from(e).message(), "cannot remove VM network")
                    }
                }
            }
            for (netns, tap) in self.netns_taps {
                remove_netns_tap(&id, &netns, &tap).await;
            }
        })
    }
}

/// Remove `tap` from the caller's namespace `netns`; a namespace that is
/// gone took the TAP with it.
async fn remove_netns_tap(id: &str, netns: &std::path::Path, tap: &str) {
    match kiln_net::delete_tap_in(Some(netns), tap).await {
        Ok(r) => {
            debug!(vm = %id, tap, netns = %netns.display(), removal = ?r, "namespace TAP removed")
        }
        Err(kiln_net::NetError::Netns(kiln_net::NetnsError::Open { .. })) => {
            debug!(vm = %id, tap, netns = %netns.display(), "namespace is gone, and its TAP with it")
        }
        Err(e) => {
            warn!(vm = %id, tap, netns = %netns.display(), error = %EngineError::from(e).message(), "cannot remove namespace TAP")
        }
    }
}

/// `path` (a namespace under `/run/netns`) can be opened: checked before
/// anything is changed, so a missing namespace leaves the VM as it was.
pub(super) fn netns_exists(path: PathBuf) -> Result<PathBuf, EngineError> {
    match std::fs::File::open(&path) {
        Ok(_) => Ok(path),
        Err(source) => {
            Err(kiln_net::NetError::Netns(kiln_net::NetnsError::Open { path, source }).into())
        }
    }
}

fn no_network_table() -> EngineError {
    EngineError::InvalidSpec(SpecError::Network(
        "bridge mode needs a [network] table in kilnd.toml".into(),
    ))
}
