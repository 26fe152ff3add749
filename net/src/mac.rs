//! MAC addresses: a small value type and the derivation Kiln uses for its
//! VMs' NICs.
//!
//! A VM's MAC is derived from its id and NIC index, so it is stable for the
//! VM's whole life (and recomputable after a crash), and is locally
//! administered unicast: the first byte is `0x02 | nic << 2` (bit 1 set =
//! locally administered, bit 0 clear = unicast; NIC indexes 0–35 fit the six
//! upper bits), the other five bytes are a hash of the id. Uniqueness among
//! live VMs is enforced by [`crate::ipam::Ipam`], which perturbs the hash
//! (`attempt`) on the rare collision and records the result.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A 48-bit Ethernet address; text form `02:6b:00:12:ab:ff` (lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Text that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid MAC address {0:?}: six hex bytes separated by ':'")]
pub struct MacParseError(pub String);

impl MacAddr {
    /// The MAC of NIC `nic` of VM `vm_id`, `attempt` 0 unless that one is
    /// taken (see the module docs).
    pub fn for_vm(vm_id: &str, nic: u8, attempt: u32) -> Self {
        let mut hash = fnv1a64(vm_id.as_bytes());
        hash = fnv1a64_continue(hash, &attempt.to_le_bytes());
        let h = hash.to_be_bytes();
        Self([0x02 | (nic << 2), h[0], h[1], h[2], h[3], h[4]])
    }

    /// Locally administered (bit 1 of the first byte).
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Unicast (bit 0 of the first byte clear).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_continue(FNV_OFFSET, bytes)
}

fn fnv1a64_continue(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_local_unicast_stable_and_distinct() {
        let a = MacAddr::for_vm("0123456789ab", 0, 0);
        assert_eq!(a, MacAddr::for_vm("0123456789ab", 0, 0));
        assert!(a.is_local() && a.is_unicast(), "{a}");
        for nic in 0..crate::names::MAX_NICS {
            let m = MacAddr::for_vm("0123456789ab", nic, 0);
            assert!(m.is_local() && m.is_unicast(), "{m}");
        }
        assert_ne!(a, MacAddr::for_vm("0123456789ab", 1, 0));
        assert_ne!(a, MacAddr::for_vm("0123456789ab", 0, 1));
        assert_ne!(a, MacAddr::for_vm("0123456789ac", 0, 0));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000u32 {
            assert!(seen.insert(MacAddr::for_vm(&format!("{i:012x}"), 0, 0)));
        }
    }

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "02:6B:00:12:ab:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:6b:00:12:ab:ff");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:6b:00:12:ab:ff\"");
        let back: MacAddr = serde_json::from_str("\"02:6b:00:12:ab:ff\"").unwrap();
        assert_eq!(back, m);
        for bad in [
            "",
            "02:6b:00:12:ab",
            "02:6b:00:12:ab:ff:00",
            "2:6b:00:12:ab:ff",
            "zz:6b:00:12:ab:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
