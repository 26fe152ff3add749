//! A VM taking over a pod's network, the way Kata Containers and
//! containerd-cloudhypervisor do it: the orchestrator's CNI plugins gave the
//! pod's network namespace an interface (a veth, say `eth0`) with the pod's
//! address and routes; the VM's TAP is moved into that namespace and two tc
//! rules pass every frame between the two (`ingress` of one → `egress` of
//! the other), so the namespace's own stack never sees the pod's traffic
//! and the guest, given the interface's MAC, address and gateway, *is* the
//! pod on the wire. Nothing in the pod's namespace is changed but the TAP
//! and the two rules: the CNI interface keeps its address (CNI `DEL`
//! still finds what `ADD` made) and deleting the namespace takes the TAP
//! and the rules with it.
//!
//! Netlink work in the pod's namespace runs on a connection opened there
//! ([`crate::netns::NsExec`]); moving the TAP is done from the namespace it
//! is in ([`crate::Network::move_tap`]).

use std::net::Ipv4Addr;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::link::{self, LinkError};
use crate::mac::MacAddr;
use crate::netns::NsExec;
use crate::{connect_netlink, names, NetError};

/// What the pod's CNI interface has: what the VM takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the pod's namespace (`eth0`).
    pub name: String,
    /// Its MAC: the guest's interface gets it, so the neighbours' ARP
    /// entries for the pod's address stay right.
    pub mac: MacAddr,
    /// The pod's address (the interface's first IPv4 address).
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_length: u8,
    /// The namespace's default gateway, if it has a default route.
    pub gateway: Option<Ipv4Addr>,
    /// The interface's MTU, which the TAP and the guest take.
    pub mtu: Option<u32>,
}

/// `ETH_P_ALL` as tc's `protocol all`: in network byte order, as the
/// kernel reads it from the low half of `tcm_info`.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// Priority of Kiln's redirect filters on each interface's ingress.
const REDIRECT_PRIORITY: u16 = 1;

/// Reads interface `name` of the pod's namespace `netns`: its MAC, first
/// IPv4 address and MTU, and the namespace's default gateway. Changes
/// nothing. An interface that does not exist or has no IPv4 address is
/// [`NetError::PodInterface`].
pub async fn inspect(netns: &Path, name: &str) -> Result<PodInterface, NetError> {
    names::validate_ifname(name)?;
    let exec = NsExec::new(Some(netns))?;
    let handle = connect_netlink(&exec).await?;
    let missing = |reason: &str| NetError::PodInterface {
        netns: netns.to_path_buf(),
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let facts = link::by_name(&handle, name)
        .await?
        .ok_or_else(|| missing("no such interface"))?;
    // Loopback has an all-zero MAC: no Ethernet interface a guest can be.
    let mac = facts
        .mac
        .filter(|m| m.0 != [0; 6])
        .ok_or_else(|| missing("it has no Ethernet address (loopback?)"))?;
    let on_link = link::ipv4_addresses(&handle)
        .await?
        .into_iter()
        .find(|a| a.index == facts.index && !a.address.is_loopback())
        .ok_or_else(|| missing("it has no IPv4 address"))?;
    Ok(PodInterface {
        name: name.to_owned(),
        mac,
        address: on_link.address,
        prefix_length: on_link.prefix_len,
        gateway: default_gateway(&handle).await?,
        mtu: facts.mtu,
    })
}

/// The gateway of the namespace's IPv4 default route, if there is one.
async fn default_gateway(handle: &Handle) -> Result<Option<Ipv4Addr>, NetError> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|source| LinkError::Netlink {
            op: "dump routes",
            link: "*".into(),
            source,
        })?;
    Ok(routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0)
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                _ => None,
            })
        }))
}

/// In the pod's namespace `netns`, where TAP `tap` now is: the TAP up with
/// the interface's MTU, and a redirect of everything arriving on either of
/// them out of the other (an `ingress` qdisc on each, a `u32` match-all
/// filter with `mirred egress redirect`, as `tc` would add them).
/// Returns the TAP's interface index there.
pub async fn redirect(netns: &Path, interface: &PodInterface, tap: &str) -> Result<u32, NetError> {
    names::validate_ifname(tap)?;
    let exec = NsExec::new(Some(netns))?;
    let handle = connect_netlink(&exec).await?;
    let pod = link::by_name(&handle, &interface.name)
        .await?
        .ok_or_else(|| NetError::PodInterface {
            netns: netns.to_path_buf(),
            name: interface.name.clone(),
            reason: "no such interface".into(),
        })?;
    let vm = link::by_name(&handle, tap)
        .await?
        .filter(link::LinkFacts::is_tap)
        .ok_or_else(|| NetError::NotATap { name: tap.into() })?;
    link::set_up(&handle, vm.index, None, interface.mtu).await?;
    for (from, to) in [(&pod, &vm), (&vm, &pod)] {
        add_redirect(&handle, from, to).await?;
    }
    Ok(vm.index)
}

/// `tc qdisc add dev FROM ingress` (kept if there is one) and
/// `tc filter add dev FROM ingress protocol all u32 match u8 0 0 action
/// mirred egress redirect dev TO`.
async fn add_redirect(
    handle: &Handle,
    from: &link::LinkFacts,
    to: &link::LinkFacts,
) -> Result<(), NetError> {
    let tc_err = |op: &'static str| {
        let link = from.name.clone();
        move |source| LinkError::Netlink { op, link, source }
    };
    let index = i32::try_from(from.index).unwrap_or(i32::MAX);
    match handle.qdisc().add(index).ingress().execute().await {
        Ok(()) => {}
        Err(e) if link::is_errno(&e, libc::EEXIST) => {}
        Err(e) => return Err(tc_err("add ingress qdisc")(e).into()),
    }
    handle
        .traffic_filter(index)
        .add()
        .ingress()
        .priority(REDIRECT_PRIORITY)
        .protocol(PROTOCOL_ALL)
        .redirect(to.index)
        .map_err(tc_err("build redirect filter"))?
        .execute()
        .await
        .map_err(tc_err("add redirect filter"))?;
    Ok(())
}
