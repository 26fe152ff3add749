//! IP address management: a pure, serde-able allocator of IPv4 addresses
//! (and MACs) over one subnet.
//!
//! No I/O here. The engine owns an [`Ipam`] in its actor, persists either
//! the whole allocator (it is `Serialize`/`Deserialize`, checked on load) or
//! — better, crash-only — each [`Lease`] inside the VM record it belongs to,
//! and rebuilds the allocator on start with [`Ipam::restore`]. Either way a
//! lease is decided in memory, persisted, and only then used to create
//! devices, so a crash never leaves a device whose address nobody owns.
//!
//! Invariants (checked by the tests and on every load): no two leases share
//! an address or a MAC, every leased address is a usable host address of
//! the subnet (not the network, broadcast or gateway address), and a VM NIC
//! has at most one lease.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::mac::MacAddr;
use crate::names::{self, NameError};

/// Smallest prefix length accepted (a /8 holds 16 M addresses).
pub const MIN_PREFIX: u8 = 8;
/// Largest prefix length accepted (a /30 leaves one address for one VM).
pub const MAX_PREFIX: u8 = 30;
/// MAC derivations tried before giving up (a collision needs two VMs whose
/// 40-bit hashes agree; 64 in a row does not happen).
const MAC_ATTEMPTS: u32 = 64;

/// IPAM errors. Each names the bad input so callers can map it to an API
/// error (`InvalidSpec` for most, a conflict for `AddressInUse`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpamError {
    /// The subnet is not `A.B.C.D/N` with host bits zero and N in 8..=30.
    #[error("invalid subnet {subnet:?}: {reason}")]
    InvalidSubnet {
        /// The subnet given.
        subnet: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The address is not in the subnet.
    #[error("address {address} is outside subnet {subnet}")]
    OutsideSubnet {
        /// The address given.
        address: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The address is the subnet's network, broadcast or gateway address.
    #[error("address {address} is the {role} address of the subnet")]
    ReservedAddress {
        /// The address given.
        address: Ipv4Addr,
        /// Which reserved address it is.
        role: Reserved,
    },
    /// The address is leased to another VM NIC.
    #[error("address {address} is already leased to VM {vm_id} NIC {nic}")]
    AddressInUse {
        /// The address given.
        address: Ipv4Addr,
        /// VM holding it.
        vm_id: String,
        /// NIC of that VM.
        nic: u8,
    },
    /// The MAC is leased to another VM NIC (only from [`Ipam::restore`]).
    #[error("MAC {mac} is already leased to VM {vm_id} NIC {nic}")]
    MacInUse {
        /// The MAC given.
        mac: MacAddr,
        /// VM holding it.
        vm_id: String,
        /// NIC of that VM.
        nic: u8,
    },
    /// This VM NIC already holds a different address.
    #[error("VM {vm_id} NIC {nic} already holds address {address}")]
    AlreadyAllocated {
        /// The VM.
        vm_id: String,
        /// Its NIC.
        nic: u8,
        /// The address it holds.
        address: Ipv4Addr,
    },
    /// Every usable address of the subnet is leased.
    #[error("no free address left in subnet {subnet}")]
    Exhausted {
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// No free MAC could be derived for this VM NIC.
    #[error("no free MAC address for VM {vm_id} NIC {nic}")]
    MacExhausted {
        /// The VM.
        vm_id: String,
        /// Its NIC.
        nic: u8,
    },
    /// The VM id or NIC index is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The reserved addresses of a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reserved {
    /// All host bits zero.
    Network,
    /// All host bits one.
    Broadcast,
    /// The bridge's (host's) own address.
    Gateway,
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Network => "network",
            Self::Broadcast => "broadcast",
            Self::Gateway => "gateway",
        })
    }
}

/// Kiln's default subnet, `10.77.0.0/24`.
pub const DEFAULT_SUBNET: Ipv4Net = Ipv4Net {
    network: Ipv4Addr::new(10, 77, 0, 0),
    prefix: 24,
};

/// An IPv4 subnet, `A.B.C.D/N` with the host bits zero. Text form on the
/// wire and in config files: `"10.77.0.0/24"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// A subnet; `network` must have its host bits zero and `prefix` be in
    /// [`MIN_PREFIX`]..=[`MAX_PREFIX`].
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, IpamError> {
        let err = |reason| IpamError::InvalidSubnet {
            subnet: format!("{network}/{prefix}"),
            reason,
        };
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(err("the prefix length must be 8 to 30"));
        }
        let net = Self { network, prefix };
        if u32::from(network) & !net.mask() != 0 {
            return Err(err("host bits must be zero"));
        }
        Ok(net)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// The first host address (the default gateway).
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `addr` is in the subnet (network and broadcast included).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| IpamError::InvalidSubnet {
            subnet: s.to_owned(),
            reason,
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| err("expected A.B.C.D/N"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("expected A.B.C.D/N"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("expected A.B.C.D/N"))?;
        Self::new(addr, prefix)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One VM NIC's address and MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lease {
    /// The VM.
    pub vm_id: String,
    /// NIC index within the VM (0 for the first NIC).
    pub nic: u8,
    /// The VM NIC's IPv4 address.
    pub address: Ipv4Addr,
    /// Its MAC address.
    pub mac: MacAddr,
}

/// The allocator. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "IpamState", into = "IpamState")]
pub struct Ipam {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// Where the next search for a free address starts: addresses are
    /// handed out round-robin, so a just-released address (still in some
    /// neighbour cache with the old MAC) is reused as late as possible.
    next: u32,
    by_address: BTreeMap<Ipv4Addr, Lease>,
    by_nic: BTreeMap<(String, u8), Ipv4Addr>,
    by_mac: BTreeMap<MacAddr, (String, u8)>,
}

/// The serialized form of [`Ipam`], validated on load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamState {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The gateway address.
    pub gateway: Ipv4Addr,
    /// Where the next search starts.
    pub next: Ipv4Addr,
    /// All leases.
    pub leases: Vec<Lease>,
}

impl From<Ipam> for IpamState {
    fn from(ipam: Ipam) -> Self {
        Self {
            subnet: ipam.subnet,
            gateway: ipam.gateway,
            next: Ipv4Addr::from(ipam.next),
            leases: ipam.by_address.into_values().collect(),
        }
    }
}

impl TryFrom<IpamState> for Ipam {
    type Error = IpamError;

    fn try_from(state: IpamState) -> Result<Self, Self::Error> {
        let mut ipam = Ipam::new(state.subnet, Some(state.gateway))?;
        if state.subnet.contains(state.next) {
            ipam.next = u32::from(state.next);
        }
        for lease in state.leases {
            ipam.restore(lease)?;
        }
        Ok(ipam)
    }
}

impl Ipam {
    /// An empty allocator over `subnet`; the gateway defaults to the first
    /// host address and must be a host address of the subnet.
    pub fn new(subnet: Ipv4Net, gateway: Option<Ipv4Addr>) -> Result<Self, IpamError> {
        let gateway = gateway.unwrap_or_else(|| subnet.first_host());
        let mut ipam = Self {
            subnet,
            gateway,
            next: u32::from(subnet.first_host()),
            by_address: BTreeMap::new(),
            by_nic: BTreeMap::new(),
            by_mac: BTreeMap::new(),
        };
        // The gateway must be a usable host address (not network/broadcast).
        ipam.gateway = Ipv4Addr::UNSPECIFIED;
        ipam.check_usable(gateway)?;
        ipam.gateway = gateway;
        Ok(ipam)
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The gateway (bridge) address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Why `address` cannot be leased to anyone, if it cannot.
    pub fn check_usable(&self, address: Ipv4Addr) -> Result<(), IpamError> {
        if !self.subnet.contains(address) {
            return Err(IpamError::OutsideSubnet {
                address,
                subnet: self.subnet,
            });
        }
        let role = if address == self.subnet.network() {
            Reserved::Network
        } else if address == self.subnet.broadcast() {
            Reserved::Broadcast
        } else if address == self.gateway {
            Reserved::Gateway
        } else {
            return Ok(());
        };
        Err(IpamError::ReservedAddress { address, role })
    }

    /// Leases an address and a MAC to NIC `nic` of `vm_id`: `requested` if
    /// given (and usable and free), else the next free address.
    ///
    /// Idempotent: a NIC that already holds a lease gets it back (an error
    /// if `requested` names another address). Nothing changes on error.
    pub fn allocate(
        &mut self,
        vm_id: &str,
        nic: u8,
        requested: Option<Ipv4Addr>,
    ) -> Result<Lease, IpamError> {
        names::tap_name(vm_id, nic)?;
        if let Some(lease) = self.lease(vm_id, nic) {
            return match requested {
                Some(address) if address != lease.address => Err(IpamError::AlreadyAllocated {
                    vm_id: vm_id.to_owned(),
                    nic,
                    address: lease.address,
                }),
                _ => Ok(lease.clone()),
            };
        }
        let address = match requested {
            Some(address) => {
                self.check_usable(address)?;
                if let Some(holder) = self.by_address.get(&address) {
                    return Err(IpamError::AddressInUse {
                        address,
                        vm_id: holder.vm_id.clone(),
                        nic: holder.nic,
                    });
                }
                address
            }
            None => self.next_free()?,
        };
        let mac = (0..MAC_ATTEMPTS)
            .map(|attempt| MacAddr::for_vm(vm_id, nic, attempt))
            .find(|mac| !self.by_mac.contains_key(mac))
            .ok_or_else(|| IpamError::MacExhausted {
                vm_id: vm_id.to_owned(),
                nic,
            })?;
        let lease = Lease {
            vm_id: vm_id.to_owned(),
            nic,
            address,
            mac,
        };
        self.insert(lease.clone());
        if requested.is_none() {
            self.next = self.successor(u32::from(address));
        }
        Ok(lease)
    }

    /// Puts back a lease known from elsewhere (a VM record, on start).
    /// Fails, changing nothing, if it conflicts with the subnet or another
    /// lease; restoring the very same lease again is a no-op.
    pub fn restore(&mut self, lease: Lease) -> Result<(), IpamError> {
        names::tap_name(&lease.vm_id, lease.nic)?;
        if self.lease(&lease.vm_id, lease.nic) == Some(&lease) {
            return Ok(());
        }
        self.check_usable(lease.address)?;
        if let Some(holder) = self.by_address.get(&lease.address) {
            return Err(IpamError::AddressInUse {
                address: lease.address,
                vm_id: holder.vm_id.clone(),
                nic: holder.nic,
            });
        }
        if let Some((vm_id, nic)) = self.by_mac.get(&lease.mac) {
            return Err(IpamError::MacInUse {
                mac: lease.mac,
                vm_id: vm_id.clone(),
                nic: *nic,
            });
        }
        if let Some(address) = self.by_nic.get(&(lease.vm_id.clone(), lease.nic)) {
            return Err(IpamError::AlreadyAllocated {
                vm_id: lease.vm_id,
                nic: lease.nic,
                address: *address,
            });
        }
        self.insert(lease);
        Ok(())
    }

    fn insert(&mut self, lease: Lease) {
        self.by_nic
            .insert((lease.vm_id.clone(), lease.nic), lease.address);
        self.by_mac
            .insert(lease.mac, (lease.vm_id.clone(), lease.nic));
        self.by_address.insert(lease.address, lease);
    }

    fn successor(&self, addr: u32) -> u32 {
        let next = addr.wrapping_add(1);
        if self.subnet.contains(Ipv4Addr::from(next)) {
            next
        } else {
            u32::from(self.subnet.network())
        }
    }

    fn next_free(&self) -> Result<Ipv4Addr, IpamError> {
        let size = 1u64 << (32 - u32::from(self.subnet.prefix_len()));
        let mut candidate = self.next;
        for _ in 0..size {
            let addr = Ipv4Addr::from(candidate);
            if self.check_usable(addr).is_ok() && !self.by_address.contains_key(&addr) {
                return Ok(addr);
            }
            candidate = self.successor(candidate);
        }
        Err(IpamError::Exhausted {
            subnet: self.subnet,
        })
    }

    /// The lease of NIC `nic` of `vm_id`.
    pub fn lease(&self, vm_id: &str, nic: u8) -> Option<&Lease> {
        let address = self.by_nic.get(&(vm_id.to_owned(), nic))?;
        self.by_address.get(address)
    }

    /// The leases of `vm_id`, by NIC index.
    pub fn leases_of(&self, vm_id: &str) -> Vec<&Lease> {
        self.by_nic
            .range((vm_id.to_owned(), 0)..=(vm_id.to_owned(), u8::MAX))
            .filter_map(|(_, address)| self.by_address.get(address))
            .collect()
    }

    /// Who holds `address`.
    pub fn holder(&self, address: Ipv4Addr) -> Option<&Lease> {
        self.by_address.get(&address)
    }

    /// Every lease, by address.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.by_address.values()
    }

    /// Releases one NIC's lease; `None` if it had none (idempotent).
    pub fn release_nic(&mut self, vm_id: &str, nic: u8) -> Option<Lease> {
        let address = self.by_nic.remove(&(vm_id.to_owned(), nic))?;
        let lease = self.by_address.remove(&address)?;
        self.by_mac.remove(&lease.mac);
        Some(lease)
    }

    /// Releases every lease of `vm_id`; returns them (empty if none).
    pub fn release(&mut self, vm_id: &str) -> Vec<Lease> {
        let nics: Vec<u8> = self.leases_of(vm_id).iter().map(|l| l.nic).collect();
        nics.into_iter()
            .filter_map(|nic| self.release_nic(vm_id, nic))
            .collect()
    }

    /// Releases the leases of every VM for which `live` is false (reconcile);
    /// returns them.
    pub fn retain(&mut self, mut live: impl FnMut(&str) -> bool) -> Vec<Lease> {
        let dead: Vec<String> = self
            .by_nic
            .keys()
            .map(|(vm, _)| vm.clone())
            .filter(|vm| !live(vm))
            .collect();
        let mut released = Vec::new();
        for vm in dead {
            released.extend(self.release(&vm));
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn vm(i: u32) -> String {
        format!("{i:012x}")
    }

    #[test]
    fn subnets_parse_and_reject_bad_input() {
        let n = net("10.77.0.0/24");
        assert_eq!(n.broadcast(), ip("10.77.0.255"));
        assert_eq!(n.first_host(), ip("10.77.0.1"));
        assert!(n.contains(ip("10.77.0.9")) && !n.contains(ip("10.77.1.0")));
        assert_eq!(n.to_string(), "10.77.0.0/24");
        assert!(net("10.0.0.0/8").overlaps(&n));
        assert!(!net("10.78.0.0/16").overlaps(&n));
        assert_eq!(DEFAULT_SUBNET, net("10.77.0.0/24"));
        for bad in [
            "10.77.0.1/24",
            "10.77.0.0/31",
            "10.77.0.0/7",
            "10.77.0.0",
            "x/24",
            "10.77.0.0/x",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Net>(), Err(IpamError::InvalidSubnet { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn allocates_round_robin_skipping_reserved() {
        let mut ipam = Ipam::new(net("10.77.0.0/29"), None).unwrap();
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.allocate(&vm(i), 0, None).unwrap().address)
            .collect();
        assert_eq!(
            got,
            [
                "10.77.0.2",
                "10.77.0.3",
                "10.77.0.4",
                "10.77.0.5",
                "10.77.0.6"
            ]
            .map(ip)
            .to_vec()
        );
        assert_eq!(
            ipam.allocate(&vm(9), 0, None),
            Err(IpamError::Exhausted {
                subnet: net("10.77.0.0/29")
            })
        );
        // Released addresses come back only after the others.
        ipam.release(&vm(1));
        ipam.release(&vm(3));
        assert_eq!(
            ipam.allocate(&vm(10), 0, None).unwrap().address,
            ip("10.77.0.3")
        );
        assert_eq!(
            ipam.allocate(&vm(11), 0, None).unwrap().address,
            ip("10.77.0.5")
        );
    }

    #[test]
    fn bad_addresses_are_named_errors_and_change_nothing() {
        let mut ipam = Ipam::new(net("10.77.0.0/24"), None).unwrap();
        let before = ipam.clone();
        assert!(matches!(
            ipam.allocate(&vm(1), 0, Some(ip("10.78.0.5"))),
            Err(IpamError::OutsideSubnet { .. })
        ));
        for (addr, role) in [
            ("10.77.0.0", Reserved::Network),
            ("10.77.0.255", Reserved::Broadcast),
            ("10.77.0.1", Reserved::Gateway),
        ] {
            assert_eq!(
                ipam.allocate(&vm(1), 0, Some(ip(addr))),
                Err(IpamError::ReservedAddress {
                    address: ip(addr),
                    role
                })
            );
        }
        assert!(matches!(
            ipam.allocate("BAD", 0, None),
            Err(IpamError::Name(NameError::InvalidVmId { .. }))
        ));
        assert!(matches!(
            ipam.allocate(&vm(1), 99, None),
            Err(IpamError::Name(NameError::InvalidNicIndex { nic: 99 }))
        ));
        assert_eq!(ipam, before);
        ipam.allocate(&vm(1), 0, Some(ip("10.77.0.50"))).unwrap();
        assert_eq!(
            ipam.allocate(&vm(2), 0, Some(ip("10.77.0.50"))),
            Err(IpamError::AddressInUse {
                address: ip("10.77.0.50"),
                vm_id: vm(1),
                nic: 0
            })
        );
        assert!(matches!(
            Ipam::new(net("10.77.0.0/24"), Some(ip("10.77.0.255"))),
            Err(IpamError::ReservedAddress {
                role: Reserved::Broadcast,
                ..
            })
        ));
        assert!(matches!(
            Ipam::new(net("10.77.0.0/24"), Some(ip("10.9.0.1"))),
            Err(IpamError::OutsideSubnet { .. })
        ));
    }

    #[test]
    fn allocation_is_idempotent_per_nic() {
        let mut ipam = Ipam::new(net("10.77.0.0/24"), Some(ip("10.77.0.254"))).unwrap();
        let a = ipam.allocate(&vm(1), 0, None).unwrap();
        // The gateway is .254 here, so .1 is a host address like any other.
        assert_eq!(a.address, ip("10.77.0.1"));
        assert_eq!(ipam.allocate(&vm(1), 0, None).unwrap(), a);
        assert_eq!(ipam.allocate(&vm(1), 0, Some(a.address)).unwrap(), a);
        assert!(matches!(
            ipam.allocate(&vm(1), 0, Some(ip("10.77.0.9"))),
            Err(IpamError::AlreadyAllocated { .. })
        ));
        let b = ipam.allocate(&vm(1), 1, None).unwrap();
        assert_ne!(a.address, b.address);
        assert_ne!(a.mac, b.mac);
        assert_eq!(ipam.leases_of(&vm(1)), vec![&a, &b]);
        assert_eq!(ipam.release(&vm(1)), vec![a, b]);
        assert!(ipam.release(&vm(1)).is_empty());
    }

    /// Property: any sequence of allocations and releases keeps addresses
    /// and MACs unique, inside the subnet, never reserved, and agrees with a
    /// simple model of who holds what.
    #[test]
    fn random_operations_keep_the_invariants() {
        let subnet = net("10.77.0.0/26");
        let mut ipam = Ipam::new(subnet, None).unwrap();
        let mut model: HashMap<(String, u8), Ipv4Addr> = HashMap::new();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            let id = vm(u32::try_from(rand(80)).unwrap());
            let nic = u8::try_from(rand(2)).unwrap();
            match rand(4) {
                0 => {
                    ipam.release(&id);
                    model.retain(|(v, _), _| *v != id);
                }
                1 => {
                    let want = Ipv4Addr::from(
                        u32::from(subnet.network()) + u32::try_from(rand(70)).unwrap(),
                    );
                    match ipam.allocate(&id, nic, Some(want)) {
                        Ok(lease) => {
                            assert_eq!(lease.address, want);
                            let prev = model.insert((id.clone(), nic), want);
                            assert!(prev.is_none() || prev == Some(want));
                        }
                        Err(IpamError::AlreadyAllocated { address, .. }) => {
                            assert_eq!(model.get(&(id.clone(), nic)), Some(&address));
                        }
                        Err(IpamError::AddressInUse { .. }) => {
                            assert!(model.values().any(|a| *a == want));
                        }
                        Err(IpamError::OutsideSubnet { .. }) => assert!(!subnet.contains(want)),
                        Err(IpamError::ReservedAddress { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                _ => match ipam.allocate(&id, nic, None) {
                    Ok(lease) => {
                        let prev = model.insert((id.clone(), nic), lease.address);
                        assert!(prev.is_none() || prev == Some(lease.address));
                    }
                    Err(IpamError::Exhausted { .. }) => assert_eq!(model.len(), 61),
                    Err(e) => panic!("unexpected {e}"),
                },
            }
            let leases: Vec<&Lease> = ipam.leases().collect();
            assert_eq!(leases.len(), model.len());
            let addrs: HashSet<_> = leases.iter().map(|l| l.address).collect();
            let macs: HashSet<_> = leases.iter().map(|l| l.mac).collect();
            assert_eq!(addrs.len(), leases.len(), "duplicate address");
            assert_eq!(macs.len(), leases.len(), "duplicate MAC");
            for l in &leases {
                ipam.check_usable(l.address).unwrap();
                assert_eq!(model.get(&(l.vm_id.clone(), l.nic)), Some(&l.address));
            }
        }
    }

    #[test]
    fn mac_collisions_are_resolved() {
        let mut ipam = Ipam::new(net("10.77.0.0/24"), None).unwrap();
        // Someone (restored from a record) already holds vm 2's first choice.
        let taken = MacAddr::for_vm(&vm(2), 0, 0);
        ipam.restore(Lease {
            vm_id: vm(1),
            nic: 0,
            address: ip("10.77.0.9"),
            mac: taken,
        })
        .unwrap();
        let lease = ipam.allocate(&vm(2), 0, None).unwrap();
        assert_eq!(lease.mac, MacAddr::for_vm(&vm(2), 0, 1));
    }

    #[test]
    fn serde_round_trip_and_validation_on_load() {
        let mut ipam = Ipam::new(net("10.77.0.0/24"), None).unwrap();
        ipam.allocate(&vm(1), 0, None).unwrap();
        ipam.allocate(&vm(2), 0, Some(ip("10.77.0.77"))).unwrap();
        let json = serde_json::to_string(&ipam).unwrap();
        let back: Ipam = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ipam);
        // A tampered file with two VMs on one address is refused.
        let mut state: serde_json::Value = serde_json::from_str(&json).unwrap();
        state["leases"][1]["address"] = "10.77.0.2".into();
        let err = serde_json::from_value::<Ipam>(state).unwrap_err();
        assert!(err.to_string().contains("already leased"), "{err}");
    }

    #[test]
    fn retain_releases_the_dead() {
        let mut ipam = Ipam::new(net("10.77.0.0/24"), None).unwrap();
        for i in 0..4 {
            ipam.allocate(&vm(i), 0, None).unwrap();
        }
        ipam.allocate(&vm(1), 1, None).unwrap();
        let live: HashSet<String> = [vm(0), vm(2)].into();
        let released = ipam.retain(|v| live.contains(v));
        let mut gone: Vec<_> = released.iter().map(|l| (l.vm_id.clone(), l.nic)).collect();
        gone.sort();
        assert_eq!(gone, vec![(vm(1), 0), (vm(1), 1), (vm(3), 0)]);
        assert_eq!(ipam.leases().count(), 2);
    }
}
