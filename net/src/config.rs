//! Network settings: one serde type, meant to be a `[network]` table of
//! `kilnd.toml` (snake_case keys, unknown keys refused).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ipam::{Ipam, IpamError, Ipv4Net};
use crate::names::{self, NameError};
use crate::NetError;

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "kiln0";
pub use crate::ipam::DEFAULT_SUBNET;

/// Bridge-mode network settings.
///
/// ```toml
/// [network]
/// bridge = "kiln0"           # at most 15 characters
/// subnet = "10.77.0.0/24"    # VMs get addresses from here
/// gateway = "10.77.0.1"      # the bridge's address; default: first host
/// masquerade = false         # NAT egress for the subnet (also turns on IPv4 forwarding)
/// mtu = 1500                 # bridge and TAP MTU; default: kernel's
/// dns = ["10.77.0.1"]        # name servers handed to guests
/// tap_owner = 990            # uid allowed to attach to the TAPs by name
/// tap_group = 990            # gid likewise
/// nft = "nft"                # nft binary
/// netns = "/run/netns/kiln"  # do all of it inside this network namespace
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Bridge name.
    pub bridge: String,
    /// Subnet VMs are addressed from.
    pub subnet: Ipv4Net,
    /// The bridge's address (the VMs' default gateway); default: the
    /// subnet's first host address.
    pub gateway: Option<Ipv4Addr>,
    /// Masquerade traffic from the subnet to elsewhere, and turn on IPv4
    /// forwarding in the namespace.
    pub masquerade: bool,
    /// MTU of the bridge and the TAPs; `None` keeps the kernel's default.
    pub mtu: Option<u32>,
    /// Name servers guests are given.
    pub dns: Vec<Ipv4Addr>,
    /// Uid that may attach to Kiln's TAPs by name (`TUNSETOWNER`).
    pub tap_owner: Option<u32>,
    /// Gid that may attach to Kiln's TAPs by name (`TUNSETGROUP`).
    pub tap_group: Option<u32>,
    /// The `nft` binary.
    pub nft: PathBuf,
    /// Network namespace (a file such as `/run/netns/NAME`) to do
    /// everything in; `None` is kilnd's own namespace.
    pub netns: Option<PathBuf>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            bridge: DEFAULT_BRIDGE.to_owned(),
            subnet: DEFAULT_SUBNET,
            gateway: None,
            masquerade: false,
            mtu: None,
            dns: Vec::new(),
            tap_owner: None,
            tap_group: None,
            nft: PathBuf::from("nft"),
            netns: None,
        }
    }
}

/// Smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u32 = 576;
/// Largest MTU accepted (jumbo frames).
pub const MAX_MTU: u32 = 65_521;

impl NetConfig {
    /// The gateway address (explicit or the first host of the subnet).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway.unwrap_or_else(|| self.subnet.first_host())
    }

    /// Checks everything that can be checked without touching the system:
    /// the bridge name, the gateway, the MTU.
    pub fn validate(&self) -> Result<(), NetError> {
        names::validate_ifname(&self.bridge).map_err(|e| match e {
            NameError::InvalidInterfaceName { name } => NetError::InvalidBridgeName { name },
            other => NetError::Name(other),
        })?;
        Ipam::new(self.subnet, self.gateway)?;
        if let Some(mtu) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(NetError::InvalidMtu { mtu });
            }
        }
        Ok(())
    }

    /// An empty allocator for this configuration.
    pub fn new_ipam(&self) -> Result<Ipam, IpamError> {
        Ipam::new(self.subnet, self.gateway)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml_like_json() {
        let c = NetConfig::default();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        c.validate().unwrap();
        let c: NetConfig = serde_json::from_value(serde_json::json!({
            "bridge": "kb1", "subnet": "192.168.77.0/24", "masquerade": true, "dns": ["1.1.1.1"]
        }))
        .unwrap();
        assert_eq!(c.subnet.to_string(), "192.168.77.0/24");
        assert!(serde_json::from_value::<NetConfig>(serde_json::json!({"brige": "x"})).is_err());
    }

    #[test]
    fn bad_settings_are_named_errors() {
        let c = NetConfig {
            bridge: "a-bridge-name-too-long".into(),
            ..NetConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(NetError::InvalidBridgeName { .. })
        ));
        let c = NetConfig {
            gateway: Some(Ipv4Addr::new(10, 78, 0, 1)),
            ..NetConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(NetError::Ipam(IpamError::OutsideSubnet { .. }))
        ));
        let c = NetConfig {
            mtu: Some(100),
            ..NetConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(NetError::InvalidMtu { mtu: 100 })
        ));
    }
}
