//! Render node inventory: `<sysfs>/class/drm/renderD*` and `<dev>/dri/*`.
//!
//! For every `renderD<N>` entry in `<sysfs>/class/drm` the scan reports the
//! device node `<dev>/dri/renderD<N>` and what sysfs says about it:
//!
//! | fact | read from |
//! | --- | --- |
//! | `dev` (major:minor) | `renderD<N>/dev`, checked against the node's `st_rdev` |
//! | vendor / device id | `renderD<N>/device/vendor`, `…/device/device` |
//! | driver | basename of the `renderD<N>/device/driver` link |
//! | bus | basename of the `renderD<N>/device/subsystem` link (`pci`, `platform`, …) |
//! | PCI address | basename of the resolved `renderD<N>/device` link (PCI devices only) |
//! | NUMA node | `renderD<N>/device/numa_node` (`-1` = none) |
//!
//! A fact that cannot be read leaves its field empty and adds a named
//! [`NodeProblem`]; the node is still listed. A node is [`usable`] (may be
//! leased) only when its `dev` is known and `<dev>/dri/renderD<N>` is a
//! character device with that number: anything else would hand QEMU the
//! wrong device or none.
//!
//! [`usable`]: RenderNode::usable

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Prefix of render node names in `class/drm` and `/dev/dri`.
pub const RENDER_PREFIX: &str = "renderD";

/// Serde as the type's `Display`/`FromStr` string (`"226:128"`, `"0x10de"`).
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A device number, written `major:minor` as in sysfs `dev` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    /// Major number (226 for DRM).
    pub major: u32,
    /// Minor number (128 and up for render nodes).
    pub minor: u32,
}

impl DevNum {
    /// Split a raw `dev_t` (`st_rdev`).
    pub fn from_raw(rdev: u64) -> Self {
        Self {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }

    /// The raw `dev_t` (for `mknod`).
    pub fn to_raw(self) -> u64 {
        libc::makedev(self.major, self.minor)
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevNum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not major:minor"))?;
        let parse = |n: &str| {
            n.parse::<u32>()
                .map_err(|_| format!("{s:?} is not major:minor"))
        };
        Ok(Self {
            major: parse(major)?,
            minor: parse(minor)?,
        })
    }
}

string_serde!(DevNum);

/// A 16-bit PCI vendor or device id, written `0x10de` (as in sysfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId(pub u16);

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04x}", self.0)
    }
}

impl FromStr for PciId {
    type Err = String;
    /// Accepts `0x10de`, `0X10DE` and `10de`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let hex = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        if hex.is_empty() || hex.len() > 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a 16-bit hex id like 0x10de"));
        }
        u16::from_str_radix(hex, 16)
            .map(PciId)
            .map_err(|_| format!("{s:?} is not a 16-bit hex id like 0x10de"))
    }
}

string_serde!(PciId);

/// Which fact of a node a [`NodeProblem`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeFact {
    /// The `dev` file (major:minor).
    Dev,
    /// The `device` link.
    Device,
    /// `device/vendor`.
    Vendor,
    /// `device/device`.
    DeviceId,
    /// `device/driver`.
    Driver,
    /// `device/subsystem`.
    Bus,
    /// `device/numa_node`.
    NumaNode,
    /// The device node under `<dev>/dri`.
    DeviceNode,
}

impl fmt::Display for NodeFact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeFact::Dev => "device number",
            NodeFact::Device => "device link",
            NodeFact::Vendor => "vendor id",
            NodeFact::DeviceId => "device id",
            NodeFact::Driver => "driver",
            NodeFact::Bus => "bus",
            NodeFact::NumaNode => "NUMA node",
            NodeFact::DeviceNode => "device node",
        })
    }
}

/// Something the scan could not establish about one node. The node is still
/// listed; see [`RenderNode::usable`] for which problems keep it from being
/// leased.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(
    tag = "problem",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum NodeProblem {
    /// A sysfs file or link could not be read.
    #[error("{fact} unknown: cannot read {path:?}: {reason}")]
    Unreadable {
        /// The fact.
        fact: NodeFact,
        /// What was read.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A sysfs file holds something unexpected.
    #[error("{fact} unknown: {path:?} holds {value:?}")]
    Malformed {
        /// The fact.
        fact: NodeFact,
        /// What was read.
        path: PathBuf,
        /// Its content.
        value: String,
    },
    /// `<dev>/dri/renderD<N>` does not exist.
    #[error("no device node at {path:?}")]
    NodeMissing {
        /// Where it was expected.
        path: PathBuf,
    },
    /// `<dev>/dri/renderD<N>` exists but is not a character device.
    #[error("{path:?} is not a character device")]
    NotCharDevice {
        /// The path.
        path: PathBuf,
    },
    /// The node's device number is not the one sysfs reports.
    #[error("{path:?} is device {found}, sysfs says {expected}")]
    DevMismatch {
        /// The device node.
        path: PathBuf,
        /// From sysfs.
        expected: DevNum,
        /// From `stat`.
        found: DevNum,
    },
}

/// One render node and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenderNode {
    /// `renderD128`.
    pub name: String,
    /// `<dev>/dri/renderD128`: what QEMU opens.
    pub path: PathBuf,
    /// Device number from sysfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<DevNum>,
    /// PCI vendor id (`0x10de` NVIDIA, `0x1002` AMD, `0x8086` Intel, `0x1af4` virtio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_id: Option<PciId>,
    /// PCI device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<PciId>,
    /// Kernel driver bound to the device (`amdgpu`, `i915`, `virtio-pci`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Bus of the device (`pci`, `platform`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// PCI address (`0000:03:00.0`), for PCI devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// NUMA node of the device, if the host has more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Whether the node may be leased: `dev` known, device node present
    /// with that number.
    pub usable: bool,
    /// What could not be established.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<NodeProblem>,
}

impl RenderNode {
    /// A node with only a name and path known (for building inventories by
    /// hand, e.g. in unit tests of leasing).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            dev: None,
            vendor_id: None,
            device_id: None,
            driver: None,
            bus: None,
            pci_address: None,
            numa_node: None,
            usable: false,
            problems: Vec::new(),
        }
    }

    /// The number in `renderD<N>`, used for ordering.
    pub fn index(&self) -> Option<u32> {
        render_index(&self.name)
    }
}

/// The `N` of `renderD<N>`, if `name` is a render node name.
pub fn render_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(RENDER_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is a render node name (`renderD` and digits).
pub fn is_render_name(name: &str) -> bool {
    render_index(name).is_some()
}

/// Scan errors: only the `class/drm` directory itself being unreadable;
/// everything about single nodes is a [`NodeProblem`].
#[derive(Debug, Error)]
pub enum InventoryError {
    /// `<sysfs>/class/drm` exists but cannot be listed.
    #[error("cannot list {path:?}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The render nodes of a host, ordered by their number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Every node found, usable or not.
    pub nodes: Vec<RenderNode>,
}

impl Inventory {
    /// Scan `<sysfs_root>/class/drm` and `<dev_root>/dri` (normally `/sys`
    /// and `/dev`). A missing `class/drm` (a kernel without DRM, like the
    /// development machines') is an empty inventory, not an error.
    pub fn scan(sysfs_root: &Path, dev_root: &Path) -> Result<Self, InventoryError> {
        let class = sysfs_root.join("class/drm");
        let entries = match fs::read_dir(&class) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(InventoryError::ReadDir {
                    path: class,
                    source,
                })
            }
        };
        let mut nodes = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| InventoryError::ReadDir {
                path: class.clone(),
                source,
            })?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_render_name(&name) {
                continue;
            }
            nodes.push(scan_node(&class.join(&name), &name, dev_root));
        }
        Ok(Self::from_nodes(nodes))
    }

    /// An inventory of the given nodes (sorted by number).
    pub fn from_nodes(mut nodes: Vec<RenderNode>) -> Self {
        nodes.sort_by(|a, b| (a.index(), &a.name).cmp(&(b.index(), &b.name)));
        Self { nodes }
    }

    /// The node called `name` (`renderD128`).
    pub fn get(&self, name: &str) -> Option<&RenderNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Nodes that may be leased.
    pub fn usable(&self) -> impl Iterator<Item = &RenderNode> {
        self.nodes.iter().filter(|n| n.usable)
    }

    /// Number of nodes found.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was found.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Everything about one `class/drm/renderD<N>` entry.
fn scan_node(sys: &Path, name: &str, dev_root: &Path) -> RenderNode {
    let mut node = RenderNode::new(name, dev_root.join("dri").join(name));
    let mut problems = Vec::new();

    let dev_path = sys.join("dev");
    node.dev = read_fact(&dev_path, NodeFact::Dev, &mut problems)
        .and_then(|s| parse_fact(&dev_path, NodeFact::Dev, &s, &mut problems));

    // The device the node belongs to (a PCI function for real GPUs).
    let device_link = sys.join("device");
    match fs::canonicalize(&device_link) {
        Ok(device) => {
            let vendor = device.join("vendor");
            node.vendor_id = read_fact(&vendor, NodeFact::Vendor, &mut problems)
                .and_then(|s| parse_fact(&vendor, NodeFact::Vendor, &s, &mut problems));
            let device_id = device.join("device");
            node.device_id = read_fact(&device_id, NodeFact::DeviceId, &mut problems)
                .and_then(|s| parse_fact(&device_id, NodeFact::DeviceId, &s, &mut problems));
            node.driver = link_basename(&device.join("driver"), NodeFact::Driver, &mut problems);
            node.bus = link_basename(&device.join("subsystem"), NodeFact::Bus, &mut problems);
            let base = device
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned);
            // The device directory's name is the PCI address for PCI
            // devices; when the bus is unknown, trust the name's shape.
            node.pci_address = base.filter(|b| match node.bus.as_deref() {
                Some(bus) => bus == "pci",
                None => is_pci_address(b),
            });
            let numa = device.join("numa_node");
            node.numa_node = read_fact(&numa, NodeFact::NumaNode, &mut problems).and_then(|s| {
                match s.trim().parse::<i64>() {
                    Ok(n) if n < 0 => None, // -1: no NUMA affinity
                    Ok(n) => u32::try_from(n).ok(),
                    Err(_) => {
                        problems.push(NodeProblem::Malformed {
                            fact: NodeFact::NumaNode,
                            path: numa.clone(),
                            value: s.trim().to_owned(),
                        });
                        None
                    }
                }
            });
        }
        Err(e) => problems.push(NodeProblem::Unreadable {
            fact: NodeFact::Device,
            path: device_link,
            reason: e.to_string(),
        }),
    }

    // The device node: it must be a character device with sysfs' number.
    let mut node_ok = false;
    match fs::metadata(&node.path) {
        Ok(meta) if !meta.file_type().is_char_device() => {
            problems.push(NodeProblem::NotCharDevice {
                path: node.path.clone(),
            });
        }
        Ok(meta) => {
            let found = DevNum::from_raw(meta.rdev());
            match node.dev {
                Some(expected) if expected != found => problems.push(NodeProblem::DevMismatch {
                    path: node.path.clone(),
                    expected,
                    found,
                }),
                _ => node_ok = true,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => problems.push(NodeProblem::NodeMissing {
            path: node.path.clone(),
        }),
        Err(e) => problems.push(NodeProblem::Unreadable {
            fact: NodeFact::DeviceNode,
            path: node.path.clone(),
            reason: e.to_string(),
        }),
    }
    node.usable = node_ok && node.dev.is_some();
    node.problems = problems;
    node
}

fn read_fact(path: &Path, fact: NodeFact, problems: &mut Vec<NodeProblem>) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(NodeProblem::Unreadable {
                fact,
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
            None
        }
    }
}

fn parse_fact<T: FromStr>(
    path: &Path,
    fact: NodeFact,
    value: &str,
    problems: &mut Vec<NodeProblem>,
) -> Option<T> {
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            problems.push(NodeProblem::Malformed {
                fact,
                path: path.to_path_buf(),
                value: value.trim().to_owned(),
            });
            None
        }
    }
}

fn link_basename(path: &Path, fact: NodeFact, problems: &mut Vec<NodeProblem>) -> Option<String> {
    match fs::read_link(path) {
        Ok(target) => target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned),
        Err(e) => {
            problems.push(NodeProblem::Unreadable {
                fact,
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
            None
        }
    }
}

/// `DDDD:BB:DD.F` (domain, bus, device, function in hex).
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_parse_print_and_round_trip() {
        let d: DevNum = "226:128\n".parse().expect("parse");
        assert_eq!(
            d,
            DevNum {
                major: 226,
                minor: 128
            }
        );
        assert_eq!(d.to_string(), "226:128");
        assert_eq!(DevNum::from_raw(d.to_raw()), d);
        assert!("226".parse::<DevNum>().is_err());
        assert!("a:1".parse::<DevNum>().is_err());
        assert_eq!(serde_json::to_string(&d).expect("json"), "\"226:128\"");
    }

    #[test]
    fn pci_ids_accept_sysfs_and_user_spellings() {
        assert_eq!("0x10de\n".parse::<PciId>(), Ok(PciId(0x10de)));
        assert_eq!("0X10DE".parse::<PciId>(), Ok(PciId(0x10de)));
        assert_eq!("1002".parse::<PciId>(), Ok(PciId(0x1002)));
        assert_eq!(PciId(0x1af4).to_string(), "0x1af4");
        for bad in ["", "0x", "0x12345", "nvidia", "-1"] {
            assert!(bad.parse::<PciId>().is_err(), "{bad:?}");
        }
        let id: PciId = serde_json::from_str("\"0x8086\"").expect("json");
        assert_eq!(id, PciId(0x8086));
    }

    #[test]
    fn render_names() {
        assert_eq!(render_index("renderD128"), Some(128));
        assert_eq!(render_index("renderD"), None);
        assert_eq!(render_index("renderD12x"), None);
        assert_eq!(render_index("card0"), None);
        assert_eq!(render_index("../renderD128"), None);
    }

    #[test]
    fn pci_address_shape() {
        assert!(is_pci_address("0000:03:00.0"));
        assert!(is_pci_address("0000:00:02.0"));
        assert!(!is_pci_address("vgem"));
        assert!(!is_pci_address("0000:03:00"));
        assert!(!is_pci_address("000g:03:00.0"));
    }

    #[test]
    fn nodes_sort_by_number_not_text() {
        let inv = Inventory::from_nodes(vec![
            RenderNode::new("renderD1000", "/dev/dri/renderD1000"),
            RenderNode::new("renderD129", "/dev/dri/renderD129"),
            RenderNode::new("renderD128", "/dev/dri/renderD128"),
        ]);
        let names: Vec<_> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["renderD128", "renderD129", "renderD1000"]);
    }

    #[test]
    fn missing_class_drm_is_an_empty_inventory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inv = Inventory::scan(tmp.path(), tmp.path()).expect("scan");
        assert!(inv.is_empty());
    }

    #[test]
    fn problems_serialize_with_their_name() {
        let p = NodeProblem::NodeMissing {
            path: "/dev/dri/renderD128".into(),
        };
        assert_eq!(
            serde_json::to_value(&p).expect("json"),
            serde_json::json!({"problem": "nodeMissing", "path": "/dev/dri/renderD128"})
        );
        let p = NodeProblem::Unreadable {
            fact: NodeFact::NumaNode,
            path: "/x".into(),
            reason: "gone".into(),
        };
        assert_eq!(p.to_string(), "NUMA node unknown: cannot read \"/x\": gone");
    }
}
