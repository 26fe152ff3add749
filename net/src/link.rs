//! Links and addresses over rtnetlink: the bridge, enslaving TAPs, finding
//! and deleting Kiln's TAPs.
//!
//! A thin layer over the `rtnetlink` crate that turns its messages into
//! small facts ([`LinkFacts`]) and its errors into [`LinkError`]. It only
//! ever changes links it is told to by name or index; the policy (which
//! links are Kiln's) is in [`crate::Network`].

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use thiserror::Error;

use crate::mac::MacAddr;

/// Netlink errors, with the operation and the link they were about.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The kernel (or the netlink layer) refused a request.
    #[error("netlink {op} on {link}")]
    Netlink {
        /// What was attempted (`"create bridge"`, `"set master"`…).
        op: &'static str,
        /// The link (name or index) it was about.
        link: String,
        /// Cause; the errno is in [`LinkError::errno`].
        #[source]
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
}

impl LinkError {
    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => msg.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

/// What Kiln needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`"bridge"`, `"tun"`, `"veth"`…); `None` for
    /// physical devices and loopback.
    pub kind: Option<String>,
    /// For a `tun` link: `IFF_TAP` (2) or `IFF_TUN` (1), from
    /// `IFLA_TUN_TYPE`.
    pub tun_type: Option<u8>,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// MTU.
    pub mtu: Option<u32>,
    /// Hardware address.
    pub mac: Option<MacAddr>,
}

impl LinkFacts {
    /// A TAP (a `tun` link of type TAP).
    pub fn is_tap(&self) -> bool {
        self.kind.as_deref() == Some("tun") && self.tun_type == Some(libc::IFF_TAP as u8)
    }

    /// A Linux bridge.
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
}

/// `IFLA_TUN_TYPE` in `IFLA_INFO_DATA` of a `tun` link.
const IFLA_TUN_TYPE: u16 = 3;

fn facts(msg: &LinkMessage) -> LinkFacts {
    let mut f = LinkFacts {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        tun_type: None,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu: None,
        mac: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => f.name.clone_from(name),
            LinkAttribute::Controller(index) => f.master = Some(*index),
            LinkAttribute::Mtu(mtu) => f.mtu = Some(*mtu),
            LinkAttribute::Address(bytes) => {
                f.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr);
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => f.kind = Some(kind_name(kind)),
                        LinkInfo::Data(InfoData::Tun(nlas)) => {
                            for nla in nlas {
                                if nla.kind() == IFLA_TUN_TYPE && nla.value_len() == 1 {
                                    let mut v = [0u8; 1];
                                    nla.emit_value(&mut v);
                                    f.tun_type = Some(v[0]);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn nl_err(op: &'static str, link: impl ToString) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let link = link.to_string();
    move |source| LinkError::Netlink { op, link, source }
}

pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(msg) if msg.code.map(|c| -c.get()) == Some(errno))
}

/// The first link a `get` request answers with; `None` for "no such device".
async fn first_link(
    request: rtnetlink::LinkGetRequest,
    label: String,
) -> Result<Option<LinkFacts>, LinkError> {
    let mut links = std::pin::pin!(request.execute());
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(facts(&msg))),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err("get link", label)(e)),
    }
}

/// The link called `name`, if there is one.
pub async fn by_name(handle: &Handle, name: &str) -> Result<Option<LinkFacts>, LinkError> {
    first_link(
        handle.link().get().match_name(name.to_owned()),
        name.to_owned(),
    )
    .await
}

/// The link with index `index`, if there is one.
pub async fn by_index(handle: &Handle, index: u32) -> Result<Option<LinkFacts>, LinkError> {
    first_link(handle.link().get().match_index(index), index.to_string()).await
}

/// Every link in the namespace.
pub async fn all(handle: &Handle) -> Result<Vec<LinkFacts>, LinkError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("dump links", "*"))?;
    Ok(msgs.iter().map(facts).collect())
}

/// Creates bridge `name` (down; see [`set_up`]), with `mtu` if given.
pub async fn create_bridge(handle: &Handle, name: &str, mtu: Option<u32>) -> Result<(), LinkError> {
    let mut builder = LinkBridge::new(name).down();
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    handle
        .link()
        .add(builder.build())
        .execute()
        .await
        .map_err(nl_err("create bridge", name))
}

/// Sets `index` up, optionally with an MTU and a controller (bridge).
pub async fn set_up(
    handle: &Handle,
    index: u32,
    master: Option<u32>,
    mtu: Option<u32>,
) -> Result<(), LinkError> {
    let mut builder = LinkUnspec::new_with_index(index).up();
    if let Some(master) = master {
        builder = builder.controller(master);
    }
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    handle
        .link()
        .set(builder.build())
        .execute()
        .await
        .map_err(nl_err("set link up", index))
}

/// Deletes link `index`; `Ok(false)` if it was already gone.
pub async fn delete(handle: &Handle, index: u32) -> Result<bool, LinkError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
        Err(e) => Err(nl_err("delete link", index)(e)),
    }
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4OnLink {
    /// Link index.
    pub index: u32,
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4OnLink> {
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
    // point-to-point links); fall back to IFA_ADDRESS.
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    Some(Ipv4OnLink {
        index: msg.header.index,
        address: local.or(address)?,
        prefix_len: msg.header.prefix_len,
    })
}

/// Every IPv4 address in the namespace.
pub async fn ipv4_addresses(handle: &Handle) -> Result<Vec<Ipv4OnLink>, LinkError> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("dump addresses", "*"))?;
    Ok(msgs.iter().filter_map(ipv4_of).collect())
}

/// Adds `address/prefix_len` to link `index`.
pub async fn add_ipv4(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), LinkError> {
    handle
        .address()
        .add(index, IpAddr::V4(address), prefix_len)
        .execute()
        .await
        .map_err(nl_err("add address", index))
}
