//! Kiln's VM networking (DESIGN.md §5): a persistent TAP per VM NIC, a
//! bridge with the subnet's gateway address, IPAM, and NAT/port forwards in
//! an nftables table Kiln owns.
//!
//! The pieces, usable on their own:
//!
//! | module | what | I/O |
//! | --- | --- | --- |
//! | [`names`] | TAP names `kt<vm id><nic>` and interface-name rules | none |
//! | [`mac`] | [`MacAddr`], derived per VM NIC | none |
//! | [`ipam`] | [`Ipam`]: addresses and MACs, serde-able, validated on load | none |
//! | [`config`] | [`NetConfig`], the `[network]` settings | none |
//! | [`tap`] | TAP ioctls on `/dev/net/tun` | blocking |
//! | [`link`] | rtnetlink: links, bridge, addresses | async |
//! | [`firewall`] | `inet kiln` table via `nft -j` | blocking |
//! | [`netns`] | running the blocking parts in a network namespace | — |
//! | [`pod`] | a VM taking over a pod's CNI interface (tc redirect) | async |
//!
//! [`Network`] ties them together for the engine: one value per network
//! namespace (normally kilnd's own), owning a netlink connection; every
//! method is async and runs blocking work off the executor. It holds no VM
//! state: the engine owns the [`Ipam`] and the VM records, and tells
//! `Network` what to create and what is still alive.
//!
//! Kiln touches only what it owns: the configured bridge, links named like
//! its TAPs *that are TAPs*, and the `inet kiln` table. A link with the
//! bridge's name that is not a bridge, or a TAP name taken by something
//! else, is an error, never changed.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod firewall;
pub mod ipam;
pub mod link;
pub mod mac;
pub mod names;
pub mod netns;
pub mod pod;
pub mod tap;

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;

pub use crate::config::NetConfig;
pub use crate::firewall::{FirewallError, ForwardOutcome, PortForward, Protocol};
pub use crate::ipam::{Ipam, IpamError, Ipv4Net, Lease};
pub use crate::link::LinkError;
pub use crate::mac::MacAddr;
pub use crate::names::NameError;
pub use crate::netns::NetnsError;
pub use crate::tap::{TapError, TapOutcome, TapOwner};

use crate::firewall::Firewall;
use crate::link::LinkFacts;
use crate::netns::NsExec;

/// Errors of [`Network`]. Each condition a caller may want to tell apart
/// has its own variant; [`NetError::kind`] sorts them for API error names.
#[derive(Debug, Error)]
pub enum NetError {
    /// The configured bridge name is not a valid interface name (too long…).
    #[error("invalid bridge name {name:?}: 1 to 15 characters, no '/', ':' or whitespace")]
    InvalidBridgeName {
        /// The name.
        name: String,
    },
    /// The MTU is outside 576..=65521.
    #[error("invalid MTU {mtu}: 576 to 65521")]
    InvalidMtu {
        /// The MTU.
        mtu: u32,
    },
    /// A VM id, NIC index or interface name is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An address problem (outside the subnet, reserved, in use…).
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// A link with the bridge's name exists and is not a bridge.
    #[error("interface {name} exists and is not a bridge; Kiln leaves it alone")]
    NotABridge {
        /// The name.
        name: String,
    },
    /// The subnet overlaps an address on another interface.
    #[error("subnet {subnet} overlaps {address}/{prefix_len} on interface {link}")]
    SubnetInUse {
        /// The configured subnet.
        subnet: Ipv4Net,
        /// The interface that has the overlapping address.
        link: String,
        /// The address.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
    },
    /// The bridge does not exist (call [`Network::ensure`] first).
    #[error("bridge {name} does not exist")]
    BridgeMissing {
        /// The name.
        name: String,
    },
    /// A link with a Kiln TAP name exists and is not a TAP.
    #[error("interface {name} is not a TAP; Kiln leaves it alone")]
    NotATap {
        /// The name.
        name: String,
    },
    /// TAP ioctl failure (busy, name taken, permission…).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Netlink failure.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// nftables failure (port in use, nft failed…).
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// The network namespace cannot be used.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The pod's CNI interface cannot be taken over.
    #[error("interface {name} of network namespace {netns:?}: {reason}")]
    PodInterface {
        /// The namespace file.
        netns: PathBuf,
        /// The interface asked for.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A sysctl could not be written.
    #[error("cannot write {path:?}")]
    Sysctl {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Broad classes of [`NetError`], for mapping to API errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input from the caller or the configuration (`InvalidSpec`).
    InvalidInput,
    /// Conflicts with something that exists (address or port taken, name
    /// used by a foreign link, TAP busy).
    Conflict,
    /// Not allowed (no `CAP_NET_ADMIN`…).
    PermissionDenied,
    /// The system failed (netlink, nft, namespace).
    System,
}

impl NetError {
    /// Which class the error belongs to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidBridgeName { .. } | Self::InvalidMtu { .. } | Self::Name(_) => {
                ErrorKind::InvalidInput
            }
            Self::Ipam(e) => match e {
                IpamError::AddressInUse { .. }
                | IpamError::MacInUse { .. }
                | IpamError::AlreadyAllocated { .. }
                | IpamError::Exhausted { .. }
                | IpamError::MacExhausted { .. } => ErrorKind::Conflict,
                _ => ErrorKind::InvalidInput,
            },
            Self::NotABridge { .. } | Self::SubnetInUse { .. } | Self::NotATap { .. } => {
                ErrorKind::Conflict
            }
            Self::BridgeMissing { .. } => ErrorKind::System,
            Self::PodInterface { .. } => ErrorKind::System,
            Self::Tap(e) => match e {
                TapError::Name(_) => ErrorKind::InvalidInput,
                TapError::Busy { .. } | TapError::NameTaken { .. } => ErrorKind::Conflict,
                TapError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
                _ => ErrorKind::System,
            },
            Self::Firewall(e) => match e {
                FirewallError::PortInUse { .. } => ErrorKind::Conflict,
                FirewallError::InvalidPort | FirewallError::Name(_) => ErrorKind::InvalidInput,
                _ => ErrorKind::System,
            },
            Self::Link(e) if e.errno() == Some(libc::EPERM) => ErrorKind::PermissionDenied,
            Self::Link(_) | Self::Netns(_) | Self::Sysctl { .. } => ErrorKind::System,
        }
    }
}

/// Whether something was removed or already gone (idempotent deletes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed now.
    Deleted,
    /// Was not there.
    AlreadyGone,
}

/// The bridge after [`Network::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeStatus {
    /// Name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Made by this call (as opposed to found).
    pub created: bool,
}

/// A VM NIC's TAP, ready to hand to QEMU.
#[derive(Debug)]
pub struct Tap {
    /// Interface name (`kt<vm id><nic>`).
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// The TAP descriptor (close-on-exec). Pass it to QEMU as
    /// `-netdev tap,id=net<nic>,fd=<N>` after making it inheritable (or with
    /// QMP `getfd` + `-netdev`/`netdev_add fd=<name>`), then close kilnd's
    /// copy: the TAP stays (it is persistent) until [`Network::delete_tap`].
    pub fd: OwnedFd,
    /// Created now or reattached.
    pub outcome: TapOutcome,
}

/// One of Kiln's TAPs, as found on the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// The VM its name encodes.
    pub vm_id: String,
    /// The NIC index its name encodes.
    pub nic: u8,
    /// The bridge it is enslaved to, if any.
    pub master: Option<u32>,
    /// Administratively up.
    pub up: bool,
}

/// What [`Network::remove_vm`] and [`Network::reconcile`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// TAPs deleted.
    pub taps: Vec<String>,
    /// Forwards deleted.
    pub forwards: Vec<PortForward>,
}

/// Bridge-mode networking in one network namespace. See the crate docs.
#[derive(Debug)]
pub struct Network {
    config: NetConfig,
    exec: NsExec,
    netlink: rtnetlink::Handle,
    firewall: Firewall,
    /// Serialises nft transactions (check-then-add of a forward must not
    /// interleave). Held only inside blocking closures, never across an
    /// `.await`.
    nft_lock: Arc<Mutex<()>>,
    /// Serialises netlink dumps on [`Network::netlink`]: the kernel runs
    /// one dump per socket at a time and answers a second one started
    /// meanwhile with EBUSY (`__netlink_dump_start`), so two tasks listing
    /// TAPs at once (a release and a reconcile) would fail one of them.
    /// Single-link requests are not dumps and do not take it.
    dump_lock: tokio::sync::Mutex<()>,
}

pub(crate) async fn connect_netlink(exec: &NsExec) -> Result<rtnetlink::Handle, NetError> {
    let runtime = tokio::runtime::Handle::current();
    let inner = runtime.clone();
    let (connection, handle) = exec
        .run(move || {
            // The socket is created (and so bound to the namespace) here;
            // registering it with tokio's reactor needs the runtime context.
            let _guard = inner.enter();
            rtnetlink::new_connection().map(|(c, h, _)| (c, h))
        })
        .await?
        .map_err(LinkError::Socket)?;
    runtime.spawn(connection);
    Ok(handle)
}

impl Network {
    /// Validates `config`, enters its namespace and opens a netlink
    /// connection. Changes nothing on the system.
    pub async fn open(config: NetConfig) -> Result<Self, NetError> {
        config.validate()?;
        let exec = NsExec::new(config.netns.as_deref())?;
        let netlink = connect_netlink(&exec).await?;
        let firewall = Firewall::new(config.nft.clone());
        Ok(Self {
            config,
            exec,
            netlink,
            firewall,
            nft_lock: Arc::new(Mutex::new(())),
            dump_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The namespace file, if not kilnd's own namespace.
    pub fn netns(&self) -> Option<&Path> {
        self.exec.path()
    }

    /// Makes sure the bridge exists, has the gateway address and is up,
    /// and that the `inet kiln` table exists with masquerading as
    /// configured (and IPv4 forwarding on when masquerading). Idempotent;
    /// call on start and before creating TAPs.
    ///
    /// Refuses, changing nothing, when a link with the bridge's name is not
    /// a bridge or when the subnet overlaps an address on another link. A
    /// bridge this call created is deleted again if a later step fails.
    pub async fn ensure(&self) -> Result<BridgeStatus, NetError> {
        let bridge = self.ensure_bridge().await?;
        let result = self.ensure_firewall().await;
        if let Err(e) = result {
            if bridge.created {
                let _ = link::delete(&self.netlink, bridge.index).await;
            }
            return Err(e);
        }
        Ok(bridge)
    }

    async fn ensure_bridge(&self) -> Result<BridgeStatus, NetError> {
        let name = &self.config.bridge;
        let subnet = self.config.subnet;
        let gateway = self.config.gateway();
        let existing = link::by_name(&self.netlink, name).await?;
        if let Some(l) = &existing {
            if !l.is_bridge() {
                return Err(NetError::NotABridge { name: name.clone() });
            }
        }
        let mut has_gateway = false;
        let addresses = {
            let _one_dump = self.dump_lock.lock().await;
            link::ipv4_addresses(&self.netlink).await?
        };
        for a in addresses {
            let ours = existing.as_ref().is_some_and(|l| l.index == a.index);
            if ours && a.address == gateway && a.prefix_len == subnet.prefix_len() {
                has_gateway = true;
                continue;
            }
            if !ours && overlaps(a.address, a.prefix_len, subnet) {
                let link = link::by_index(&self.netlink, a.index)
                    .await?
                    .map_or_else(|| a.index.to_string(), |l| l.name);
                return Err(NetError::SubnetInUse {
                    subnet,
                    link,
                    address: a.address,
                    prefix_len: a.prefix_len,
                });
            }
        }
        let (index, created) = match existing {
            Some(l) => (l.index, false),
            None => {
                link::create_bridge(&self.netlink, name, self.config.mtu).await?;
                let l = link::by_name(&self.netlink, name)
                    .await?
                    .ok_or_else(|| NetError::BridgeMissing { name: name.clone() })?;
                tracing::info!(bridge = %name, index = l.index, "created bridge");
                (l.index, true)
            }
        };
        let finish = async {
            if !has_gateway {
                link::add_ipv4(&self.netlink, index, gateway, subnet.prefix_len()).await?;
            }
            link::set_up(&self.netlink, index, None, self.config.mtu).await?;
            Ok::<(), NetError>(())
        };
        if let Err(e) = finish.await {
            if created {
                let _ = link::delete(&self.netlink, index).await;
            }
            return Err(e);
        }
        Ok(BridgeStatus {
            name: name.clone(),
            index,
            created,
        })
    }

    async fn ensure_firewall(&self) -> Result<(), NetError> {
        let fw = self.firewall.clone();
        let lock = Arc::clone(&self.nft_lock);
        let subnet = self.config.subnet;
        let masquerade = self.config.masquerade;
        self.exec
            .run(move || {
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                fw.ensure(subnet, masquerade)
            })
            .await??;
        if masquerade {
            let path = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
            let p = path.clone();
            self.exec
                .run(move || std::fs::write(&p, "1\n"))
                .await?
                .map_err(|source| NetError::Sysctl { path, source })?;
        }
        Ok(())
    }

    async fn bridge(&self) -> Result<LinkFacts, NetError> {
        match link::by_name(&self.netlink, &self.config.bridge).await? {
            Some(l) if l.is_bridge() => Ok(l),
            Some(_) => Err(NetError::NotABridge {
                name: self.config.bridge.clone(),
            }),
            None => Err(NetError::BridgeMissing {
                name: self.config.bridge.clone(),
            }),
        }
    }

    /// Creates (or reattaches to) the persistent TAP of NIC `nic` of
    /// `vm_id`, enslaves it to the bridge with the bridge's MTU, sets it up
    /// and returns its descriptor for QEMU. Idempotent while no QEMU holds
    /// the TAP ([`TapError::Busy`] otherwise). A TAP this call created is
    /// removed again if enslaving fails.
    pub async fn create_tap(&self, vm_id: &str, nic: u8) -> Result<Tap, NetError> {
        let name = names::tap_name(vm_id, nic)?;
        let bridge = self.bridge().await?;
        if let Some(l) = link::by_name(&self.netlink, &name).await? {
            if !l.is_tap() {
                return Err(NetError::NotATap { name });
            }
        }
        let owner = TapOwner {
            uid: self.config.tap_owner,
            gid: self.config.tap_group,
        };
        let n = name.clone();
        let (fd, outcome) = self
            .exec
            .run(move || tap::open_or_create(&n, owner))
            .await??;
        let enslave = async {
            let l = link::by_name(&self.netlink, &name)
                .await?
                .ok_or_else(|| NetError::NotATap { name: name.clone() })?;
            link::set_up(&self.netlink, l.index, Some(bridge.index), bridge.mtu).await?;
            Ok::<u32, NetError>(l.index)
        };
        match enslave.await {
            Ok(index) => {
                tracing::debug!(tap = %name, index, ?outcome, "TAP ready");
                Ok(Tap {
                    name,
                    index,
                    fd,
                    outcome,
                })
            }
            Err(e) => {
                if outcome == TapOutcome::Created {
                    drop(fd);
                    if let Ok(Some(l)) = link::by_name(&self.netlink, &name).await {
                        let _ = link::delete(&self.netlink, l.index).await;
                    }
                }
                Err(e)
            }
        }
    }

    /// Moves the TAP of NIC `nic` of `vm_id` (off the bridge) into network
    /// namespace `netns`, a pod's ([`pod`]). The QEMU holding it keeps its
    /// descriptor: frames go on flowing, now in that namespace. `false`:
    /// no such TAP here (a retry after the move); a link of its name that
    /// is not a TAP is [`NetError::NotATap`].
    pub async fn move_tap(&self, vm_id: &str, nic: u8, netns: &Path) -> Result<bool, NetError> {
        let name = names::tap_name(vm_id, nic)?;
        let target = std::fs::File::open(netns).map_err(|source| NetnsError::Open {
            path: netns.to_path_buf(),
            source,
        })?;
        let tap = match link::by_name(&self.netlink, &name).await? {
            None => return Ok(false),
            Some(l) if !l.is_tap() => return Err(NetError::NotATap { name }),
            Some(l) => l,
        };
        let moved = rtnetlink::LinkUnspec::new_with_index(tap.index)
            .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&target))
            .build();
        self.netlink
            .link()
            .set(moved)
            .execute()
            .await
            .map_err(|source| LinkError::Netlink {
                op: "move to network namespace",
                link: name.clone(),
                source,
            })?;
        tracing::debug!(tap = %name, netns = %netns.display(), "TAP moved");
        Ok(true)
    }

    /// Deletes the TAP of NIC `nic` of `vm_id` (also while QEMU holds it:
    /// its descriptor then fails with `EBADFD`). Idempotent.
    pub async fn delete_tap(&self, vm_id: &str, nic: u8) -> Result<Removal, NetError> {
        let name = names::tap_name(vm_id, nic)?;
        self.delete_tap_named(&name).await
    }

    async fn delete_tap_named(&self, name: &str) -> Result<Removal, NetError> {
        match link::by_name(&self.netlink, name).await? {
            None => Ok(Removal::AlreadyGone),
            Some(l) if !l.is_tap() => Err(NetError::NotATap {
                name: name.to_owned(),
            }),
            Some(l) => Ok(if link::delete(&self.netlink, l.index).await? {
                tracing::debug!(tap = %name, "deleted TAP");
                Removal::Deleted
            } else {
                Removal::AlreadyGone
            }),
        }
    }

    /// Kiln's TAPs in the namespace: TAP links whose name parses as
    /// `kt<vm id><nic>`.
    pub async fn taps(&self) -> Result<Vec<TapInfo>, NetError> {
        let links = {
            let _one_dump = self.dump_lock.lock().await;
            link::all(&self.netlink).await?
        };
        let mut taps = Vec::new();
        for l in links {
            if !l.is_tap() {
                continue;
            }
            if let Some((vm_id, nic)) = names::parse_tap_name(&l.name) {
                taps.push(TapInfo {
                    name: l.name,
                    index: l.index,
                    vm_id,
                    nic,
                    master: l.master,
                    up: l.up,
                });
            }
        }
        Ok(taps)
    }

    async fn with_firewall<R, F>(&self, f: F) -> Result<R, NetError>
    where
        F: FnOnce(&Firewall) -> Result<R, FirewallError> + Send + 'static,
        R: Send + 'static,
    {
        let fw = self.firewall.clone();
        let lock = Arc::clone(&self.nft_lock);
        Ok(self
            .exec
            .run(move || {
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                f(&fw)
            })
            .await??)
    }

    /// Forwards `hostPort` to a VM (see [`PortForward`]). The VM address
    /// must be in the subnet; a host port already forwarded elsewhere is
    /// [`FirewallError::PortInUse`]. Idempotent for the identical forward.
    pub async fn add_forward(&self, forward: PortForward) -> Result<ForwardOutcome, NetError> {
        if !self.config.subnet.contains(forward.address) {
            return Err(IpamError::OutsideSubnet {
                address: forward.address,
                subnet: self.config.subnet,
            }
            .into());
        }
        self.with_firewall(move |fw| fw.add_forward(&forward)).await
    }

    /// Every forward in Kiln's table.
    pub async fn forwards(&self) -> Result<Vec<PortForward>, NetError> {
        self.with_firewall(|fw| fw.forwards()).await
    }

    /// Whether masquerading is in place (as the table says).
    pub async fn masquerading(&self) -> Result<bool, NetError> {
        let subnet = self.config.subnet;
        self.with_firewall(move |fw| fw.masquerading(subnet)).await
    }

    /// Removes everything of `vm_id`: its TAPs and its rules. Idempotent.
    /// (Its leases are the caller's: [`Ipam::release`].)
    pub async fn remove_vm(&self, vm_id: &str) -> Result<Cleanup, NetError> {
        names::validate_vm_id(vm_id)?;
        let id = vm_id.to_owned();
        let forwards = self.with_firewall(move |fw| fw.remove_vm(&id)).await?;
        let mut taps = Vec::new();
        for t in self.taps().await? {
            if t.vm_id == vm_id && self.delete_tap_named(&t.name).await? == Removal::Deleted {
                taps.push(t.name);
            }
        }
        Ok(Cleanup { taps, forwards })
    }

    /// Removes the TAPs and rules of every VM not in `live` (on start, and
    /// whenever the engine wants). (Leases: [`Ipam::retain`].)
    pub async fn reconcile<I, S>(&self, live: I) -> Result<Cleanup, NetError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keep: std::collections::HashSet<String> =
            live.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let k = keep.clone();
        let forwards = self
            .with_firewall(move |fw| fw.retain(|id| k.contains(id)))
            .await?;
        let mut taps = Vec::new();
        for t in self.taps().await? {
            if !keep.contains(&t.vm_id) && self.delete_tap_named(&t.name).await? == Removal::Deleted
            {
                tracing::info!(tap = %t.name, vm = %t.vm_id, "removed orphan TAP");
                taps.push(t.name);
            }
        }
        Ok(Cleanup { taps, forwards })
    }

    /// Removes everything Kiln made in the namespace: all its TAPs, the
    /// bridge (if it is a bridge) and the `inet kiln` table. For uninstall
    /// and tests; VMs lose their network.
    pub async fn teardown(&self) -> Result<Cleanup, NetError> {
        let cleanup = self.reconcile(std::iter::empty::<&str>()).await?;
        if let Some(l) = link::by_name(&self.netlink, &self.config.bridge).await? {
            if l.is_bridge() {
                link::delete(&self.netlink, l.index).await?;
            }
        }
        self.with_firewall(|fw| fw.delete_table()).await?;
        Ok(cleanup)
    }
}

/// Whether `address/prefix_len` (an address on some link) shares any
/// address with `subnet`: compare under the shorter of the two prefixes.
fn overlaps(address: Ipv4Addr, prefix_len: u8, subnet: Ipv4Net) -> bool {
    let mask = prefix_mask(prefix_len.min(subnet.prefix_len()));
    u32::from(address) & mask == u32::from(subnet.network()) & mask
}

fn prefix_mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

/// Creates (or reattaches to) a persistent TAP called `name` in network
/// namespace `netns` (or kilnd's own), with no bridge, address or rules:
/// the CNI-style option, where an orchestrator owns the namespace and wires
/// the TAP itself. Delete it with `ip -n NS link del NAME` or by deleting
/// the namespace.
pub async fn create_tap_in(
    netns: Option<&Path>,
    name: &str,
    owner: TapOwner,
) -> Result<Tap, NetError> {
    names::validate_ifname(name)?;
    let exec = NsExec::new(netns)?;
    let n = name.to_owned();
    let (fd, outcome, index) = exec
        .run(move || {
            tap::open_or_create(&n, owner).map(|(fd, outcome)| (fd, outcome, tap::index(&n)))
        })
        .await??;
    Ok(Tap {
        name: name.to_owned(),
        index: index.unwrap_or(0),
        fd,
        outcome,
    })
}

/// Removes the persistent TAP `name` from network namespace `netns` (or
/// kilnd's own), as made by [`create_tap_in`]. Idempotent; a TAP a QEMU
/// still holds is `TapError::Busy`, an interface of that name that is not
/// such a TAP is left alone (`NotATap`).
pub async fn delete_tap_in(netns: Option<&Path>, name: &str) -> Result<Removal, NetError> {
    names::validate_ifname(name)?;
    let exec = NsExec::new(netns)?;
    let n = name.to_owned();
    match exec.run(move || tap::remove(&n)).await? {
        Ok(true) => Ok(Removal::Deleted),
        Ok(false) => Ok(Removal::AlreadyGone),
        Err(TapError::NameTaken { name }) => Err(NetError::NotATap { name }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
    }

    #[test]
    fn overlap_of_link_addresses_with_the_subnet() {
        let subnet: Ipv4Net = "10.77.0.0/24".parse().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(overlaps(ip("10.77.0.9"), 32, subnet));
        assert!(overlaps(ip("10.77.0.9"), 16, subnet));
        assert!(overlaps(ip("10.1.2.3"), 8, subnet));
        assert!(overlaps(ip("10.77.0.129"), 25, subnet));
        assert!(!overlaps(ip("10.77.1.1"), 24, subnet));
        assert!(!overlaps(ip("127.0.0.1"), 8, subnet));
        assert!(!overlaps(ip("10.76.255.255"), 32, subnet));
    }

    #[test]
    fn error_kinds() {
        assert_eq!(
            NetError::InvalidBridgeName { name: "x".into() }.kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            NetError::from(FirewallError::PortInUse {
                protocol: Protocol::Tcp,
                host_port: 1,
                vm_id: "x".into()
            })
            .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            NetError::from(IpamError::OutsideSubnet {
                address: Ipv4Addr::LOCALHOST,
                subnet: ipam::DEFAULT_SUBNET
            })
            .kind(),
            ErrorKind::InvalidInput
        );
    }
}
