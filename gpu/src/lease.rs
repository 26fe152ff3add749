//! GPU leases: which VM holds which render node.
//!
//! [`LeaseTable`] is pure state (serde, camelCase) with no IO of its own, so
//! the engine can keep it in its actor and persist it wherever it likes;
//! [`LeaseTable::save`]/[`LeaseTable::load`] are a convenience that writes
//! one JSON file atomically.
//!
//! Rules, checked by [`LeaseTable::check`] and kept by every method:
//!
//! - a node held `exclusive` has exactly one holder;
//! - a node held `shared` has only shared holders, at most
//!   `maxVmsPerGpu` of them (lowering the limit later keeps existing
//!   leases and only refuses new ones);
//! - a VM holds a node at most once;
//! - [`LeaseTable::acquire`] is all-or-nothing: it leases every node asked
//!   for or none, and it is idempotent (asking again with the same request
//!   returns the leases the VM already holds).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::inventory::{is_render_name, DevNum, Inventory, PciId, RenderNode};

/// Most render nodes one VM may ask for.
pub const MAX_GPUS_PER_VM: u32 = 16;

/// Version of the persisted table format.
pub const TABLE_VERSION: u32 = 1;

/// How a VM holds its nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LeaseMode {
    /// The VM is the node's only user.
    #[default]
    Exclusive,
    /// Up to `maxVmsPerGpu` VMs share the node (virgl contexts are
    /// separate, the GPU's time and memory are not).
    Shared,
}

impl fmt::Display for LeaseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseMode::Exclusive => "exclusive",
            LeaseMode::Shared => "shared",
        })
    }
}

/// What a VM spec asks for. Deserializes from a bare count (`"gpus": 1`)
/// or an object (`"gpus": {"count": 1, "vendor": "0x10de", "mode":
/// "shared"}`); serializes as the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequest {
    /// Number of render nodes (distinct nodes; at least 1).
    pub count: u32,
    /// Only nodes of this PCI vendor (`0x10de`, `0x1002`, `0x8086`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<PciId>,
    /// Exactly this node (`renderD128`); then `count` must be 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Exclusive (default) or shared.
    #[serde(default)]
    pub mode: LeaseMode,
}

impl GpuRequest {
    /// `count` nodes of any vendor, exclusive.
    pub fn count(count: u32) -> Self {
        Self {
            count,
            vendor: None,
            node: None,
            mode: LeaseMode::Exclusive,
        }
    }

    /// Checks the request on its own (the engine calls this when it
    /// validates a spec, so a bad one is `InvalidSpec` before anything
    /// starts).
    pub fn validate(&self) -> Result<(), GpuError> {
        let invalid = |reason: String| Err(GpuError::InvalidRequest { reason });
        if self.count == 0 {
            return invalid("count must be at least 1".into());
        }
        if self.count > MAX_GPUS_PER_VM {
            return invalid(format!(
                "count {} is more than {MAX_GPUS_PER_VM}",
                self.count
            ));
        }
        if let Some(node) = &self.node {
            if !is_render_name(node) {
                return invalid(format!(
                    "node {node:?} is not a render node name like renderD128"
                ));
            }
            if self.count != 1 {
                return invalid(format!(
                    "node {node} names one render node but count is {}",
                    self.count
                ));
            }
        }
        Ok(())
    }

    /// Whether `node` fits the request's filters (not its availability).
    pub fn matches(&self, node: &RenderNode) -> bool {
        self.node.as_ref().is_none_or(|n| *n == node.name)
            && self.vendor.is_none_or(|v| node.vendor_id == Some(v))
    }
}

impl<'de> Deserialize<'de> for GpuRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Full {
            #[serde(default = "one")]
            count: u32,
            #[serde(default)]
            vendor: Option<PciId>,
            #[serde(default)]
            node: Option<String>,
            #[serde(default)]
            mode: LeaseMode,
        }
        fn one() -> u32 {
            1
        }

        struct RequestVisitor;
        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = GpuRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU count or {count, vendor?, node?, mode?}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GpuRequest, E> {
                let count = u32::try_from(v).map_err(|_| E::custom("GPU count too large"))?;
                Ok(GpuRequest::count(count))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GpuRequest, E> {
                let v =
                    u64::try_from(v).map_err(|_| E::custom("GPU count must not be negative"))?;
                self.visit_u64(v)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<GpuRequest, A::Error> {
                let full = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(GpuRequest {
                    count: full.count,
                    vendor: full.vendor,
                    node: full.node,
                    mode: full.mode,
                })
            }
        }
        d.deserialize_any(RequestVisitor)
    }
}

/// One VM's hold on one render node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuLease {
    /// The VM.
    pub vm_id: String,
    /// `renderD128`.
    pub node: String,
    /// `/dev/dri/renderD128`: what QEMU gets as `rendernode=`.
    pub path: PathBuf,
    /// Device number when leased: a different device under the same name
    /// later (hot-unplug and replug) ends the lease.
    pub dev: DevNum,
    /// Exclusive or shared.
    pub mode: LeaseMode,
    /// Vendor when leased (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_id: Option<PciId>,
    /// PCI address when leased (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
}

/// Why [`LeaseTable::reconcile`] dropped a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DropReason {
    /// The VM no longer exists.
    VmGone,
    /// The render node is no longer in the inventory.
    NodeGone,
    /// A node of that name exists, but it is another device.
    NodeReplaced,
}

/// A lease [`LeaseTable::reconcile`] removed: the engine revokes access for
/// it (the node may be gone, which [`crate::revoke`] reports as such).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DroppedLease {
    /// The lease.
    pub lease: GpuLease,
    /// Why.
    pub reason: DropReason,
}

/// How one node is used (for `ListGPUs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUsage {
    /// `renderD128`.
    pub node: String,
    /// Mode of the current holders, none when free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<LeaseMode>,
    /// VM ids holding it.
    pub vm_ids: Vec<String>,
    /// How many more VMs could lease it in the holders' mode (a free node:
    /// 1 exclusive or `maxVmsPerGpu` shared; reported as the shared number).
    pub free_slots: u32,
}

/// Lease errors. The engine maps `NoGpuAvailable` and `InvalidRequest` to
/// API errors of the same name and `InvalidSpec`.
#[derive(Debug, Error)]
pub enum GpuError {
    /// The request itself is wrong.
    #[error("invalid GPU request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// Not enough free render nodes; nothing was leased.
    #[error(
        "no GPU available: {requested} {mode} render node(s) wanted, \
         {available} free of {matching} matching ({usable} usable on this host)"
    )]
    NoGpuAvailable {
        /// Nodes asked for.
        requested: u32,
        /// Mode asked for.
        mode: LeaseMode,
        /// Usable nodes matching the request's vendor/node filter.
        matching: u32,
        /// Of those, how many could take this VM now.
        available: u32,
        /// Usable nodes on the host.
        usable: u32,
    },
    /// The VM already holds leases that do not fit the new request
    /// (release them first).
    #[error("VM {vm_id} already holds GPU leases on {nodes:?}")]
    AlreadyLeased {
        /// The VM.
        vm_id: String,
        /// Its nodes.
        nodes: Vec<String>,
    },
    /// A table breaks the lease rules (a hand-edited or foreign file).
    #[error("lease table is inconsistent: {reason}")]
    Inconsistent {
        /// Which rule.
        reason: String,
    },
    /// Reading or writing the table file failed.
    #[error("lease table {path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The table file is not a lease table.
    #[error("lease table {path:?} cannot be parsed")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// All GPU leases of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseTable {
    /// Format version ([`TABLE_VERSION`]).
    version: u32,
    /// Most VMs on one node in shared mode.
    max_vms_per_gpu: u32,
    /// Sorted by (node, vm id).
    leases: Vec<GpuLease>,
}

impl Default for LeaseTable {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_VMS_PER_GPU)
    }
}

impl LeaseTable {
    /// Shared-mode limit when the configuration says nothing.
    pub const DEFAULT_MAX_VMS_PER_GPU: u32 = 4;

    /// An empty table; `max_vms_per_gpu` below 1 counts as 1.
    pub fn new(max_vms_per_gpu: u32) -> Self {
        Self {
            version: TABLE_VERSION,
            max_vms_per_gpu: max_vms_per_gpu.max(1),
            leases: Vec::new(),
        }
    }

    /// The shared-mode limit.
    pub fn max_vms_per_gpu(&self) -> u32 {
        self.max_vms_per_gpu
    }

    /// Change the shared-mode limit (after a config reload). Existing leases
    /// stay; only new shared leases see the new limit.
    pub fn set_max_vms_per_gpu(&mut self, n: u32) {
        self.max_vms_per_gpu = n.max(1);
    }

    /// Every lease, sorted by node then VM id.
    pub fn leases(&self) -> &[GpuLease] {
        &self.leases
    }

    /// The leases of one VM.
    pub fn leases_of<'a>(&'a self, vm_id: &'a str) -> impl Iterator<Item = &'a GpuLease> + 'a {
        self.leases.iter().filter(move |l| l.vm_id == vm_id)
    }

    /// The leases on one node.
    pub fn holders<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a GpuLease> + 'a {
        self.leases.iter().filter(move |l| l.node == node)
    }

    /// Lease render nodes to `vm_id`: all of `request.count` or none.
    ///
    /// Picks, among usable nodes matching the filters, those that can take
    /// the VM in the requested mode: for exclusive, free nodes in inventory
    /// order; for shared, the least shared nodes first (spreading VMs).
    /// If the VM already holds leases that satisfy the request they are
    /// returned unchanged (a retried call is harmless); leases that do not
    /// are [`GpuError::AlreadyLeased`].
    pub fn acquire(
        &mut self,
        vm_id: &str,
        request: &GpuRequest,
        inventory: &Inventory,
    ) -> Result<Vec<GpuLease>, GpuError> {
        request.validate()?;
        let held: Vec<GpuLease> = self.leases_of(vm_id).cloned().collect();
        if !held.is_empty() {
            let fits = held.len() == request.count as usize
                && held.iter().all(|l| {
                    l.mode == request.mode
                        && inventory
                            .get(&l.node)
                            .is_some_and(|n| request.matches(n) && n.dev == Some(l.dev))
                });
            if fits {
                return Ok(held);
            }
            return Err(GpuError::AlreadyLeased {
                vm_id: vm_id.to_owned(),
                nodes: held.into_iter().map(|l| l.node).collect(),
            });
        }

        let usable = inventory.usable().count();
        let matching: Vec<&RenderNode> =
            inventory.usable().filter(|n| request.matches(n)).collect();
        let mut open: Vec<(usize, &RenderNode)> = matching
            .iter()
            .filter_map(|n| {
                let holders: Vec<&GpuLease> = self.holders(&n.name).collect();
                let takes = match request.mode {
                    LeaseMode::Exclusive => holders.is_empty(),
                    LeaseMode::Shared => {
                        holders.iter().all(|h| h.mode == LeaseMode::Shared)
                            && holders.len() < self.max_vms_per_gpu as usize
                    }
                };
                takes.then_some((holders.len(), *n))
            })
            .collect();
        if open.len() < request.count as usize {
            return Err(GpuError::NoGpuAvailable {
                requested: request.count,
                mode: request.mode,
                matching: count_u32(matching.len()),
                available: count_u32(open.len()),
                usable: count_u32(usable),
            });
        }
        if request.mode == LeaseMode::Shared {
            // Stable: equal load keeps inventory order.
            open.sort_by_key(|(load, _)| *load);
        }
        let mut granted = Vec::with_capacity(request.count as usize);
        for (_, node) in open.into_iter().take(request.count as usize) {
            let Some(dev) = node.dev else { continue }; // usable implies dev
            granted.push(GpuLease {
                vm_id: vm_id.to_owned(),
                node: node.name.clone(),
                path: node.path.clone(),
                dev,
                mode: request.mode,
                vendor_id: node.vendor_id,
                pci_address: node.pci_address.clone(),
            });
        }
        self.leases.extend(granted.iter().cloned());
        self.sort();
        tracing::info!(
            vm = vm_id,
            nodes = ?granted.iter().map(|l| l.node.as_str()).collect::<Vec<_>>(),
            mode = %request.mode,
            "GPU leased"
        );
        Ok(granted)
    }

    /// End every lease of `vm_id` and return them (empty if it held none:
    /// releasing twice is harmless).
    pub fn release(&mut self, vm_id: &str) -> Vec<GpuLease> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leases)
            .into_iter()
            .partition(|l| l.vm_id == vm_id);
        self.leases = kept;
        if !gone.is_empty() {
            tracing::info!(vm = vm_id, count = gone.len(), "GPU leases released");
        }
        gone
    }

    /// Drop leases of VMs not in `live_vm_ids` and of nodes that left the
    /// inventory or are now another device. A node that is still in sysfs
    /// but whose device node is missing for the moment keeps its leases.
    /// Returns what was dropped so the engine can revoke access.
    pub fn reconcile<I, S>(&mut self, live_vm_ids: I, inventory: &Inventory) -> Vec<DroppedLease>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let live: BTreeSet<String> = live_vm_ids
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for lease in std::mem::take(&mut self.leases) {
            let reason = if !live.contains(&lease.vm_id) {
                Some(DropReason::VmGone)
            } else {
                match inventory.get(&lease.node) {
                    None => Some(DropReason::NodeGone),
                    Some(n) if n.dev.is_some_and(|d| d != lease.dev) => {
                        Some(DropReason::NodeReplaced)
                    }
                    Some(_) => None,
                }
            };
            match reason {
                Some(reason) => {
                    tracing::info!(vm = %lease.vm_id, node = %lease.node, ?reason, "GPU lease dropped");
                    dropped.push(DroppedLease { lease, reason });
                }
                None => kept.push(lease),
            }
        }
        self.leases = kept;
        dropped
    }

    /// How each inventory node is used.
    pub fn usage(&self, inventory: &Inventory) -> Vec<NodeUsage> {
        inventory
            .nodes
            .iter()
            .map(|n| {
                let holders: Vec<&GpuLease> = self.holders(&n.name).collect();
                let mode = holders.first().map(|h| h.mode);
                let free_slots = if !n.usable {
                    0
                } else {
                    match mode {
                        Some(LeaseMode::Exclusive) => 0,
                        Some(LeaseMode::Shared) | None => self
                            .max_vms_per_gpu
                            .saturating_sub(count_u32(holders.len())),
                    }
                };
                NodeUsage {
                    node: n.name.clone(),
                    mode,
                    vm_ids: holders.iter().map(|h| h.vm_id.clone()).collect(),
                    free_slots,
                }
            })
            .collect()
    }

    /// Checks the lease rules (see the module docs).
    pub fn check(&self) -> Result<(), GpuError> {
        let bad = |reason: String| Err(GpuError::Inconsistent { reason });
        if self.version != TABLE_VERSION {
            return bad(format!(
                "version {} (this is {TABLE_VERSION})",
                self.version
            ));
        }
        if self.max_vms_per_gpu == 0 {
            return bad("maxVmsPerGpu is 0".into());
        }
        let mut by_node: BTreeMap<&str, Vec<&GpuLease>> = BTreeMap::new();
        let mut pairs = BTreeSet::new();
        for l in &self.leases {
            if !is_render_name(&l.node) {
                return bad(format!("{:?} is not a render node name", l.node));
            }
            if !pairs.insert((l.vm_id.as_str(), l.node.as_str())) {
                return bad(format!("VM {} holds {} twice", l.vm_id, l.node));
            }
            by_node.entry(&l.node).or_default().push(l);
        }
        for (node, holders) in by_node {
            let exclusive = holders
                .iter()
                .filter(|h| h.mode == LeaseMode::Exclusive)
                .count();
            if exclusive > 0 && holders.len() > 1 {
                return bad(format!(
                    "{node} is held exclusively but has {} holders",
                    holders.len()
                ));
            }
            if holders
                .iter()
                .any(|h| h.dev != holders[0].dev || h.path != holders[0].path)
            {
                return bad(format!("{node} is leased as different devices"));
            }
        }
        Ok(())
    }

    /// Write the table to `path` atomically: a temp file in the same
    /// directory, fsync, rename over `path`, fsync the directory. After a
    /// crash the file is the old table or the new one, never a mix.
    pub fn save(&self, path: &Path) -> Result<(), GpuError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| GpuError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes).map_err(|source| GpuError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Read a table written by [`save`](Self::save); `Ok(None)` if the file
    /// does not exist. The table is [`check`](Self::check)ed.
    pub fn load(path: &Path) -> Result<Option<Self>, GpuError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(GpuError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut table: Self = serde_json::from_slice(&bytes).map_err(|source| GpuError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        table.check()?;
        table.sort();
        Ok(Some(table))
    }

    fn sort(&mut self) {
        self.leases.sort_by(|a, b| {
            let key = |l: &GpuLease| (crate::inventory::render_index(&l.node), l.node.clone());
            (key(a), &a.vm_id).cmp(&(key(b), &b.vm_id))
        });
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Temp file, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("gpu-leases");
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u32, vendor: u16) -> RenderNode {
        let mut node = RenderNode::new(format!("renderD{n}"), format!("/dev/dri/renderD{n}"));
        node.dev = Some(DevNum {
            major: 226,
            minor: n,
        });
        node.vendor_id = Some(PciId(vendor));
        node.usable = true;
        node
    }

    fn inventory() -> Inventory {
        Inventory::from_nodes(vec![
            node(128, 0x10de),
            node(129, 0x1002),
            node(130, 0x10de),
        ])
    }

    fn shared(count: u32) -> GpuRequest {
        GpuRequest {
            mode: LeaseMode::Shared,
            ..GpuRequest::count(count)
        }
    }

    fn nodes(leases: &[GpuLease]) -> Vec<&str> {
        leases.iter().map(|l| l.node.as_str()).collect()
    }

    #[test]
    fn requests_parse_from_a_count_or_an_object() {
        let r: GpuRequest = serde_json::from_str("2").expect("count");
        assert_eq!(r, GpuRequest::count(2));
        let r: GpuRequest =
            serde_json::from_str(r#"{"vendor":"0x10de","mode":"shared"}"#).expect("object");
        assert_eq!(r.count, 1);
        assert_eq!(r.vendor, Some(PciId(0x10de)));
        assert_eq!(r.mode, LeaseMode::Shared);
        let r: GpuRequest =
            toml::from_str::<toml::Value>("gpus = { count = 1, node = \"renderD129\" }")
                .expect("toml")
                .get("gpus")
                .cloned()
                .expect("gpus")
                .try_into()
                .expect("request");
        assert_eq!(r.node.as_deref(), Some("renderD129"));
        let err = serde_json::from_str::<GpuRequest>(r#"{"count":1,"vram":8}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `vram`"), "{err}");
        assert!(serde_json::from_str::<GpuRequest>("-1").is_err());
        assert!(serde_json::from_str::<GpuRequest>(r#"{"vendor":"nvidia"}"#).is_err());
        let json = serde_json::to_value(GpuRequest::count(1)).expect("json");
        assert_eq!(json, serde_json::json!({"count": 1, "mode": "exclusive"}));
    }

    #[test]
    fn validation() {
        assert!(GpuRequest::count(1).validate().is_ok());
        for bad in [
            GpuRequest::count(0),
            GpuRequest::count(MAX_GPUS_PER_VM + 1),
            GpuRequest {
                node: Some("card0".into()),
                ..GpuRequest::count(1)
            },
            GpuRequest {
                node: Some("renderD128".into()),
                ..GpuRequest::count(2)
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(GpuError::InvalidRequest { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn exclusive_leases_never_share_a_node() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        assert_eq!(
            nodes(&t.acquire("a", &GpuRequest::count(2), &inv).expect("a")),
            ["renderD128", "renderD129"]
        );
        assert_eq!(
            nodes(&t.acquire("b", &GpuRequest::count(1), &inv).expect("b")),
            ["renderD130"]
        );
        let err = t
            .acquire("c", &GpuRequest::count(1), &inv)
            .expect_err("none left");
        assert!(
            matches!(
                err,
                GpuError::NoGpuAvailable {
                    requested: 1,
                    matching: 3,
                    available: 0,
                    usable: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        // Shared cannot join an exclusive node either.
        assert!(t.acquire("c", &shared(1), &inv).is_err());
        t.check().expect("rules hold");
    }

    #[test]
    fn acquire_is_all_or_nothing() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(2), &inv).expect("a");
        let before = t.clone();
        let err = t
            .acquire("b", &GpuRequest::count(2), &inv)
            .expect_err("only one free");
        assert!(matches!(
            err,
            GpuError::NoGpuAvailable {
                requested: 2,
                available: 1,
                ..
            }
        ));
        assert_eq!(t, before, "a failed acquire changes nothing");
    }

    #[test]
    fn acquire_is_idempotent_for_the_same_request() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        let first = t.acquire("a", &GpuRequest::count(1), &inv).expect("a");
        let again = t.acquire("a", &GpuRequest::count(1), &inv).expect("again");
        assert_eq!(first, again);
        assert_eq!(t.leases().len(), 1);
        let err = t
            .acquire("a", &GpuRequest::count(2), &inv)
            .expect_err("different request");
        assert!(matches!(err, GpuError::AlreadyLeased { .. }), "{err:?}");
    }

    #[test]
    fn vendor_and_node_filters() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        let amd = GpuRequest {
            vendor: Some(PciId(0x1002)),
            ..GpuRequest::count(1)
        };
        assert_eq!(
            nodes(&t.acquire("a", &amd, &inv).expect("amd")),
            ["renderD129"]
        );
        let err = t.acquire("b", &amd, &inv).expect_err("one AMD only");
        assert!(matches!(
            err,
            GpuError::NoGpuAvailable {
                matching: 1,
                available: 0,
                ..
            }
        ));
        let named = GpuRequest {
            node: Some("renderD130".into()),
            ..GpuRequest::count(1)
        };
        assert_eq!(
            nodes(&t.acquire("b", &named, &inv).expect("named")),
            ["renderD130"]
        );
        let missing = GpuRequest {
            node: Some("renderD200".into()),
            ..GpuRequest::count(1)
        };
        assert!(matches!(
            t.acquire("c", &missing, &inv),
            Err(GpuError::NoGpuAvailable { matching: 0, .. })
        ));
    }

    #[test]
    fn shared_leases_spread_and_stop_at_the_limit() {
        let inv = Inventory::from_nodes(vec![node(128, 0x10de), node(129, 0x10de)]);
        let mut t = LeaseTable::new(2);
        let got: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|vm| {
                t.acquire(vm, &shared(1), &inv).expect("shared")[0]
                    .node
                    .clone()
            })
            .collect();
        assert_eq!(
            got,
            ["renderD128", "renderD129", "renderD128", "renderD129"]
        );
        assert!(matches!(
            t.acquire("e", &shared(1), &inv),
            Err(GpuError::NoGpuAvailable {
                available: 0,
                matching: 2,
                ..
            })
        ));
        // Exclusive cannot join a shared node.
        assert!(t.acquire("e", &GpuRequest::count(1), &inv).is_err());
        t.release("a");
        assert_eq!(
            nodes(&t.acquire("e", &shared(1), &inv).expect("slot freed")),
            ["renderD128"]
        );
        let usage = t.usage(&inv);
        assert_eq!(usage[0].vm_ids, ["c", "e"]);
        assert_eq!(usage[0].free_slots, 0);
        t.check().expect("rules hold");
    }

    #[test]
    fn lowering_the_limit_keeps_leases_and_refuses_new_ones() {
        let inv = Inventory::from_nodes(vec![node(128, 0x10de)]);
        let mut t = LeaseTable::new(3);
        t.acquire("a", &shared(1), &inv).expect("a");
        t.acquire("b", &shared(1), &inv).expect("b");
        t.set_max_vms_per_gpu(1);
        assert_eq!(t.leases().len(), 2);
        assert!(t.acquire("c", &shared(1), &inv).is_err());
        t.set_max_vms_per_gpu(0);
        assert_eq!(t.max_vms_per_gpu(), 1);
    }

    #[test]
    fn unusable_nodes_are_never_leased() {
        let mut broken = node(128, 0x10de);
        broken.usable = false;
        let inv = Inventory::from_nodes(vec![broken, node(129, 0x10de)]);
        let mut t = LeaseTable::default();
        assert_eq!(
            nodes(&t.acquire("a", &GpuRequest::count(1), &inv).expect("a")),
            ["renderD129"]
        );
        assert!(matches!(
            t.acquire("b", &GpuRequest::count(1), &inv),
            Err(GpuError::NoGpuAvailable { usable: 1, .. })
        ));
        assert_eq!(t.usage(&inv)[0].free_slots, 0);
    }

    #[test]
    fn release_is_idempotent() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(2), &inv).expect("a");
        assert_eq!(t.release("a").len(), 2);
        assert!(t.release("a").is_empty());
        assert!(t.leases().is_empty());
    }

    #[test]
    fn reconcile_drops_gone_vms_and_nodes() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(1), &inv).expect("a"); // 128
        t.acquire("b", &GpuRequest::count(1), &inv).expect("b"); // 129
        t.acquire("c", &GpuRequest::count(1), &inv).expect("c"); // 130
                                                                 // 129 vanished; 130 is now another device; VM "a" died.
        let mut replaced = node(130, 0x10de);
        replaced.dev = Some(DevNum {
            major: 226,
            minor: 131,
        });
        let later = Inventory::from_nodes(vec![node(128, 0x10de), replaced]);
        let mut dropped = t.reconcile(["b", "c"], &later);
        dropped.sort_by(|x, y| x.lease.vm_id.cmp(&y.lease.vm_id));
        let got: Vec<_> = dropped
            .iter()
            .map(|d| (d.lease.vm_id.as_str(), d.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("a", DropReason::VmGone),
                ("b", DropReason::NodeGone),
                ("c", DropReason::NodeReplaced)
            ]
        );
        assert!(t.leases().is_empty());
    }

    #[test]
    fn reconcile_keeps_a_lease_whose_device_node_is_briefly_missing() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(1), &inv).expect("a");
        let mut flapping = node(128, 0x10de);
        flapping.usable = false;
        let later = Inventory::from_nodes(vec![flapping]);
        assert!(t.reconcile(["a"], &later).is_empty());
        assert_eq!(t.leases().len(), 1);
    }

    #[test]
    fn check_rejects_broken_tables() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(1), &inv).expect("a");
        let mut two = t.clone();
        let mut other = two.leases[0].clone();
        other.vm_id = "b".into();
        two.leases.push(other);
        assert!(matches!(two.check(), Err(GpuError::Inconsistent { .. })));
        let mut twice = t.clone();
        twice.leases.push(t.leases[0].clone());
        assert!(matches!(twice.check(), Err(GpuError::Inconsistent { .. })));
        let mut v2 = t.clone();
        v2.version = 2;
        assert!(v2.check().is_err());
    }

    #[test]
    fn serialized_form_is_camel_case() {
        let inv = inventory();
        let mut t = LeaseTable::default();
        t.acquire("a", &GpuRequest::count(1), &inv).expect("a");
        let json = serde_json::to_value(&t).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "maxVmsPerGpu": 4,
                "leases": [{
                    "vmId": "a",
                    "node": "renderD128",
                    "path": "/dev/dri/renderD128",
                    "dev": "226:128",
                    "mode": "exclusive",
                    "vendorId": "0x10de"
                }]
            })
        );
        let back: LeaseTable = serde_json::from_value(json).expect("back");
        assert_eq!(back, t);
    }
}
