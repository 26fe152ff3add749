//! `io.kiln.Agent.ConfigureNetwork`: MAC, MTU, IPv4 address, default route
//! and DNS of the guest's NICs.
//!
//! Done with the classic `SIOC*` ioctls on an `AF_INET` datagram socket (no
//! child processes, no netlink message building): one primary IPv4 address
//! per interface is all Kiln hands out. Order per interface: `arp_notify`,
//! MTU, address, MAC, up — so the MAC write (or the "up" of an interface
//! that was down) announces the final address with a gratuitous ARP, and a
//! neighbour cache on the host that still maps the address to a previous
//! VM's MAC is corrected at once.
//!
//! A running interface is never taken down. A restored or cloned guest's
//! virtio-net is announced by QEMU after the restore: a config interrupt
//! per round, whose work in the guest takes the RTNL lock, while the
//! driver's close (6.12) waits for that work with the RTNL lock held. A
//! "down" at that moment hangs the guest's networking for good (seen as
//! `ConfigureNetwork` never answering; `guest/tests/net-smoke.py`
//! reproduces it with `announce-self`).
//!
//! A template clone's NIC still has the template's MAC (QEMU migrates the
//! virtio-net MAC with the device state); the host names it in
//! `previousMac` and the agent sets the new one (`SIOCSIFHWADDR`, which the
//! virtio-net driver forwards to the device through its control queue).

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_agent_proto::{
    ConfigureNetworkReply, ConfigureNetworkRequest, ConfiguredInterface, MAX_NETWORK_INTERFACES,
};

use crate::log;
use crate::params::InvalidParameter;

const SYS_CLASS_NET: &str = "/sys/class/net";
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long to wait for an interface to appear (a NIC hot-plugged just
/// before the call is probed asynchronously).
const APPEAR_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65_535;
/// Default routes removed at most before giving up (there is normally one).
const MAX_DEFAULT_ROUTES: usize = 16;

/// Why `ConfigureNetwork` failed.
#[derive(Debug)]
pub enum NetworkFailure {
    /// No interface has this MAC (or the previous MAC) — `NoSuchInterface`.
    NoSuchInterface(String),
    /// A system call failed — `NetworkFailed`.
    Failed(String),
}

type Mac = [u8; 6];

#[derive(Debug, Clone, PartialEq, Eq)]
struct IfacePlan {
    mac: Mac,
    previous: Option<Mac>,
    address: Option<(Ipv4Addr, u8)>,
    mtu: Option<u32>,
    ipv6: Option<bool>,
}

/// A validated `ConfigureNetwork` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    interfaces: Vec<IfacePlan>,
    gateway: Option<Ipv4Addr>,
    dns: Option<Vec<IpAddr>>,
}

/// What the agent keeps from one `ConfigureNetwork` to the next. A
/// template's lives on in its clones' memory, which is the point: on a
/// fresh clone every kernel path the call takes is guest code TCG
/// translates afresh, so what the template already did is not redone.
#[derive(Debug, Default)]
pub struct NetworkState {
    interfaces: KnownInterfaces,
    /// The ioctl socket, opened once: `socket()` was ~2.5 ms of a fresh
    /// clone's call.
    socket: Option<Socket>,
    /// Interfaces whose IPv6 the last call turns on once the agent has
    /// answered ([`NetworkState::catch_up`]).
    ipv6_due: Vec<String>,
}

impl NetworkState {
    /// Turns IPv6 on where the last `ConfigureNetwork` asked for it. Left
    /// until after the reply (~4 ms of a fresh clone's call, and the
    /// address configuration it starts runs on after it): the link-local
    /// address it makes is tentative for the whole duplicate address
    /// detection anyway, far longer than this wait. Failures are logged:
    /// the reply has gone.
    pub fn catch_up(&mut self) {
        for name in self.ipv6_due.drain(..) {
            if let Err(e) = set_ipv6(&name, true) {
                log::error!("ConfigureNetwork: turn IPv6 on on {name}: {e}");
            }
        }
    }
}

#[cfg(test)]
impl NetworkState {
    /// A state with IPv6 due on `names`.
    pub fn with_ipv6_due(names: &[&str]) -> Self {
        Self {
            ipv6_due: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Self::default()
        }
    }

    /// Whether IPv6 is still due somewhere.
    pub fn has_ipv6_due(&self) -> bool {
        !self.ipv6_due.is_empty()
    }
}

/// Interfaces an earlier `ConfigureNetwork` configured: name and MAC, so
/// the next call finds them with one ioctl each instead of a scan of
/// `/sys/class/net`. A template's list lives on in its clones' memory: on
/// a fresh clone the scan and the `arp_notify` writes were ~10 ms of guest
/// code TCG translates afresh. A stale entry (the NIC was unplugged, or
/// renamed) fails its ioctl check and the scan runs as before.
#[derive(Debug, Default)]
struct KnownInterfaces(Vec<(String, Mac)>);

impl KnownInterfaces {
    /// The known interfaces whose MAC is still the one remembered.
    fn still_there(&self, sock: &Socket) -> Vec<(String, Mac)> {
        self.0
            .iter()
            .filter(|(name, mac)| sock.mac(name).ok() == Some(*mac))
            .cloned()
            .collect()
    }

    fn remember(&mut self, name: &str, mac: Mac) {
        self.0.retain(|(known, _)| known != name);
        self.0.push((name.to_owned(), mac));
    }
}

fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    u32::from(a) & mask(prefix) == u32::from(b) & mask(prefix)
}

impl NetworkPlan {
    /// Checks every field before anything changes; the culprit is named
    /// (`interfaces`, `gateway` or `dns`).
    pub fn new(req: ConfigureNetworkRequest) -> Result<Self, InvalidParameter> {
        let bad = InvalidParameter::new;
        if req.interfaces.len() > MAX_NETWORK_INTERFACES {
            return Err(bad("interfaces"));
        }
        let mut interfaces = Vec::with_capacity(req.interfaces.len());
        for iface in &req.interfaces {
            let mac = parse_mac(&iface.mac).ok_or_else(|| bad("interfaces"))?;
            let previous = match &iface.previous_mac {
                None => None,
                Some(m) => Some(parse_mac(m).ok_or_else(|| bad("interfaces"))?),
            };
            // A multicast MAC cannot be an interface's address.
            if mac[0] & 1 != 0 {
                return Err(bad("interfaces"));
            }
            let address = match (&iface.address, iface.prefix_length) {
                (None, None) => None,
                (Some(a), Some(p)) if (1..=32).contains(&p) => {
                    let a: Ipv4Addr = a.parse().map_err(|_| bad("interfaces"))?;
                    if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                        return Err(bad("interfaces"));
                    }
                    Some((a, p))
                }
                _ => return Err(bad("interfaces")),
            };
            if iface.mtu.is_some_and(|m| !(MIN_MTU..=MAX_MTU).contains(&m)) {
                return Err(bad("interfaces"));
            }
            let plan = IfacePlan {
                mac,
                previous,
                address,
                mtu: iface.mtu,
                ipv6: iface.ipv6,
            };
            // Two entries for one NIC would fight over it.
            let macs = |p: &IfacePlan| [Some(p.mac), p.previous];
            if interfaces.iter().any(|o: &IfacePlan| {
                macs(o)
                    .iter()
                    .flatten()
                    .any(|m| macs(&plan).contains(&Some(*m)))
            }) {
                return Err(bad("interfaces"));
            }
            interfaces.push(plan);
        }
        let gateway = match &req.gateway {
            None => None,
            Some(g) => {
                let g: Ipv4Addr = g.parse().map_err(|_| bad("gateway"))?;
                let reachable = interfaces.iter().any(|i| {
                    i.address
                        .is_some_and(|(a, p)| a != g && same_subnet(a, g, p))
                });
                if !reachable {
                    return Err(bad("gateway"));
                }
                Some(g)
            }
        };
        let dns = match &req.dns {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|s| s.parse::<IpAddr>().map_err(|_| bad("dns")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Self {
            interfaces,
            gateway,
            dns,
        })
    }

    /// Applies the plan. Interfaces are configured in order; a failure
    /// stops there (earlier interfaces stay configured: calling again with
    /// the same request is safe and finishes the job).
    pub fn apply(&self, state: &mut NetworkState) -> Result<ConfigureNetworkReply, NetworkFailure> {
        let NetworkState {
            interfaces: known,
            socket,
            ipv6_due,
        } = state;
        let sock = match socket {
            Some(sock) => &*sock,
            None => socket
                .insert(Socket::new().map_err(|e| NetworkFailure::Failed(format!("socket: {e}")))?),
        };
        let failed = |what: &str, name: &str, e: io::Error| {
            NetworkFailure::Failed(format!("{what} {name}: {e}"))
        };
        // Loopback too: guest services usually expect it.
        sock.set_up("lo", true).map_err(|e| failed("up", "lo", e))?;
        let names = self.find_interfaces(sock, known)?;
        let mut reply = ConfigureNetworkReply::default();
        let mut gateway_dev = None;
        for (plan, (name, seen_before)) in self.interfaces.iter().zip(&names) {
            let running = sock.is_up(name).map_err(|e| failed("flags of", name, e))?;
            if plan.ipv6 == Some(false) {
                set_ipv6(name, false).map_err(|e| failed("turn IPv6 off on", name, e))?;
            }
            // Gratuitous ARP when the interface comes up or its MAC is set
            // (best effort: a missing sysctl only costs the announcement).
            // Once per interface: the sysctl stays set.
            if !seen_before {
                let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{name}/arp_notify"), "1\n");
            }
            // A running NIC with another MAC (a clone's, restored from a
            // template that saved it up) gets its own MAC first: nothing
            // it sends once it has an address may carry the template's.
            if running && sock.mac(name).ok() != Some(plan.mac) {
                sock.set_mac_live(name, &plan.mac)
                    .map_err(|e| failed("set MAC of", name, e))?;
            }
            if let Some(mtu) = plan.mtu {
                sock.set_mtu(name, mtu)
                    .map_err(|e| failed("set MTU of", name, e))?;
            }
            match plan.address {
                Some((addr, prefix)) => {
                    sock.set_addr(name, libc::SIOCSIFADDR, addr)
                        .map_err(|e| failed("set address of", name, e))?;
                    sock.set_addr(name, libc::SIOCSIFNETMASK, Ipv4Addr::from(mask(prefix)))
                        .map_err(|e| failed("set netmask of", name, e))?;
                    if let Some(g) = self.gateway {
                        if gateway_dev.is_none() && g != addr && same_subnet(addr, g, prefix) {
                            gateway_dev = Some(name.clone());
                        }
                    }
                }
                // Setting 0.0.0.0 removes the primary address.
                None => sock
                    .set_addr(name, libc::SIOCSIFADDR, Ipv4Addr::UNSPECIFIED)
                    .map_err(|e| failed("remove address of", name, e))?,
            }
            // Last, so the announcement carries the final address. A
            // running NIC gets it written even when unchanged: that is
            // what makes the kernel announce a new address on it.
            if running || sock.mac(name).ok() != Some(plan.mac) {
                sock.set_mac_live(name, &plan.mac)
                    .map_err(|e| failed("set MAC of", name, e))?;
            }
            sock.set_up(name, true).map_err(|e| failed("up", name, e))?;
            if plan.ipv6 == Some(true) {
                ipv6_due.push(name.clone());
            }
            let mac = sock.mac(name).unwrap_or(plan.mac);
            known.remember(name, mac);
            reply.interfaces.push(ConfiguredInterface {
                name: name.clone(),
                mac: format_mac(&mac),
            });
        }
        if let (Some(gateway), Some(dev)) = (self.gateway, gateway_dev) {
            sock.replace_default_route(gateway, &dev)
                .map_err(|e| failed("default route via", &gateway.to_string(), e))?;
        }
        if let Some(dns) = &self.dns {
            write_resolv_conf(dns).map_err(|e| failed("write", RESOLV_CONF, e))?;
        }
        Ok(reply)
    }

    /// Interface names for the plan's entries, in order, and whether an
    /// earlier call configured each: among the known interfaces that still
    /// have the MAC they were left with, else among all (a scan), waiting
    /// a little for interfaces that have not appeared yet.
    fn find_interfaces(
        &self,
        sock: &Socket,
        known: &KnownInterfaces,
    ) -> Result<Vec<(String, bool)>, NetworkFailure> {
        let flagged =
            |names: Vec<String>, seen_before| names.into_iter().map(|n| (n, seen_before)).collect();
        if let Ok(names) = self.match_interfaces(&known.still_there(sock)) {
            return Ok(flagged(names, true));
        }
        let deadline = Instant::now() + APPEAR_TIMEOUT;
        loop {
            match self.match_interfaces(&list_interfaces()) {
                Ok(names) => return Ok(flagged(names, false)),
                Err(mac) if Instant::now() >= deadline => {
                    return Err(NetworkFailure::NoSuchInterface(mac))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The name in `present` for each of the plan's entries, by its MAC or
    /// else its previous MAC; the first entry with neither, as text.
    fn match_interfaces(&self, present: &[(String, Mac)]) -> Result<Vec<String>, String> {
        let named = |mac: Mac| present.iter().find(|(_, m)| *m == mac);
        self.interfaces
            .iter()
            .map(|plan| {
                named(plan.mac)
                    .or_else(|| plan.previous.and_then(named))
                    .map(|(name, _)| name.clone())
                    .ok_or_else(|| format_mac(&plan.mac))
            })
            .collect()
    }
}

/// `(name, MAC)` of every interface with an Ethernet-sized address.
fn list_interfaces() -> Vec<(String, Mac)> {
    let Ok(dir) = fs::read_dir(SYS_CLASS_NET) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let mac = read_mac(&name)?;
            Some((name, mac))
        })
        .collect()
}

/// `net.ipv6.conf.<name>.disable_ipv6`. Turning IPv6 on makes the
/// interface's link-local address from its MAC as it is now.
fn set_ipv6(name: &str, on: bool) -> io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match fs::write(&path, if on { "0\n" } else { "1\n" }) {
        // A guest without IPv6 has nothing to turn on or off.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        done => done,
    }
}

fn read_mac(name: &str) -> Option<Mac> {
    let text = fs::read_to_string(format!("{SYS_CLASS_NET}/{name}/address")).ok()?;
    parse_mac(text.trim())
}

/// `/etc/resolv.conf` with one `nameserver` line per server, replaced
/// atomically (write a temp file, rename).
fn write_resolv_conf(servers: &[IpAddr]) -> io::Result<()> {
    let mut text = String::from("# written by kiln-agent (ConfigureNetwork)\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    let tmp = format!("{RESOLV_CONF}.kiln-tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, RESOLV_CONF)
}

/// The kernel's `struct rtentry` (`<linux/route.h>`); the libc crate
/// defines it for musl only.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data C
    // structs; the kernel reads the former through the latter.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An `AF_INET` datagram socket for interface ioctls.
#[derive(Debug)]
struct Socket(OwnedFd);

impl Socket {
    fn new() -> io::Result<Self> {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(&self, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here reads and/or writes one `struct
        // ifreq`, which `req` is, alive for the duration of the call.
        let ret = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request as libc::Ioctl,
                req as *mut libc::ifreq,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_up(&self, name: &str, up: bool) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        let wanted = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        if wanted == flags {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = wanted;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn is_up(&self, name: &str) -> io::Result<bool> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        Ok(flags & libc::IFF_UP as libc::c_short != 0)
    }

    /// Sets the MAC of `name` without taking it down, which virtio-net
    /// allows (`IFF_LIVE_ADDR_CHANGE`). A driver that does not says
    /// `EBUSY`; only then is it taken down for the change (and left down
    /// for the caller to bring up).
    fn set_mac_live(&self, name: &str, mac: &Mac) -> io::Result<()> {
        match self.set_mac(name, mac) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.set_up(name, false)?;
                self.set_mac(name, mac)
            }
            done => done,
        }
    }

    /// The interface's MAC (`SIOCGIFHWADDR`).
    fn mac(&self, name: &str) -> io::Result<Mac> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
            *dst = src as u8;
        }
        Ok(mac)
    }

    fn set_mac(&self, name: &str, mac: &Mac) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        // SAFETY: sockaddr is plain old data; all-zero is a valid value.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
    }

    fn set_mtu(&self, name: &str, mtu: u32) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
        self.ioctl(libc::SIOCSIFMTU, &mut req)
    }

    fn set_addr(&self, name: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        self.ioctl(request, &mut req)
    }

    fn route(&self, request: libc::c_ulong, entry: &mut RtEntry) -> io::Result<()> {
        // SAFETY: SIOCADDRT/SIOCDELRT read one `struct rtentry`, which
        // `entry` is (its `rt_dev`, if set, points to a live C string).
        let ret = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request as libc::Ioctl,
                entry as *mut RtEntry,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Deletes every IPv4 default route, then adds one via `gateway` on `dev`.
    fn replace_default_route(&self, gateway: Ipv4Addr, dev: &str) -> io::Result<()> {
        let any = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        let entry = |gw: libc::sockaddr, flags: libc::c_ushort, dev: *mut libc::c_char| RtEntry {
            rt_pad1: 0,
            rt_dst: any,
            rt_gateway: gw,
            rt_genmask: any,
            rt_flags: flags,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev,
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        for _ in 0..MAX_DEFAULT_ROUTES {
            let mut del = entry(any, libc::RTF_UP, std::ptr::null_mut());
            match self.route(libc::SIOCDELRT, &mut del) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
                Err(e) => return Err(e),
            }
        }
        let dev = CString::new(dev)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
        let mut add = entry(
            sockaddr_v4(gateway),
            libc::RTF_UP | libc::RTF_GATEWAY,
            dev.as_ptr().cast_mut(),
        );
        self.route(libc::SIOCADDRT, &mut add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_agent_proto::NetworkInterface;

    #[test]
    fn known_interfaces_follow_the_last_configuration() {
        let mut known = KnownInterfaces::default();
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        known.remember("eth0", a);
        assert_eq!(known.0, [("eth0".to_owned(), a)]);
        // A clone gave eth0 its own MAC: the template's is forgotten.
        known.remember("eth0", b);
        assert_eq!(known.0, [("eth0".to_owned(), b)]);
    }

    fn iface(mac: &str, address: Option<&str>, prefix: Option<u8>) -> NetworkInterface {
        NetworkInterface {
            mac: mac.into(),
            address: address.map(str::to_owned),
            prefix_length: prefix,
            ..NetworkInterface::default()
        }
    }

    fn culprit(req: ConfigureNetworkRequest) -> Option<String> {
        NetworkPlan::new(req).err().map(|e| e.0)
    }

    fn req(interfaces: Vec<NetworkInterface>, gateway: Option<&str>) -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces,
            gateway: gateway.map(str::to_owned),
            dns: None,
        }
    }

    #[test]
    fn valid_plan() {
        let plan = NetworkPlan::new(ConfigureNetworkRequest {
            interfaces: vec![NetworkInterface {
                previous_mac: Some("02:00:00:00:00:0a".into()),
                mtu: Some(1400),
                ..iface("02:00:00:00:00:0B", Some("10.77.0.5"), Some(24))
            }],
            gateway: Some("10.77.0.1".into()),
            dns: Some(vec!["10.77.0.1".into(), "2001:db8::1".into()]),
        })
        .unwrap();
        assert_eq!(plan.interfaces[0].mac, [2, 0, 0, 0, 0, 0x0b]);
        assert_eq!(plan.interfaces[0].previous, Some([2, 0, 0, 0, 0, 0x0a]));
        assert_eq!(plan.gateway, Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(plan.dns.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn invalid_fields_are_named() {
        let ok = || iface("02:00:00:00:00:0b", Some("10.77.0.5"), Some(24));
        for bad in [
            iface("02:00:00:00:00", Some("10.77.0.5"), Some(24)),
            iface("03:00:00:00:00:0b", Some("10.77.0.5"), Some(24)),
            iface("02:00:00:00:00:0b", Some("10.77.0.5"), None),
            iface("02:00:00:00:00:0b", None, Some(24)),
            iface("02:00:00:00:00:0b", Some("10.77.0.5"), Some(33)),
            iface("02:00:00:00:00:0b", Some("10.77.0"), Some(24)),
            iface("02:00:00:00:00:0b", Some("0.0.0.0"), Some(24)),
            NetworkInterface {
                mtu: Some(20),
                ..ok()
            },
            NetworkInterface {
                previous_mac: Some("x".into()),
                ..ok()
            },
        ] {
            assert_eq!(
                culprit(req(vec![bad.clone()], None)),
                Some("interfaces".into()),
                "{bad:?}"
            );
        }
        // The same NIC twice.
        assert_eq!(
            culprit(req(vec![ok(), ok()], None)),
            Some("interfaces".into())
        );
        // A gateway outside every interface's subnet, or not an address.
        assert_eq!(
            culprit(req(vec![ok()], Some("10.78.0.1"))),
            Some("gateway".into())
        );
        assert_eq!(
            culprit(req(vec![ok()], Some("10.77.0.5"))),
            Some("gateway".into())
        );
        assert_eq!(culprit(req(vec![ok()], Some("gw"))), Some("gateway".into()));
        let mut r = req(vec![ok()], None);
        r.dns = Some(vec!["dns.example".into()]);
        assert_eq!(culprit(r), Some("dns".into()));
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let data: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        // sin_port (2 bytes), then the address in network order.
        assert_eq!(&data[..6], &[0, 0, 10, 77, 0, 1]);
    }

    #[test]
    fn masks() {
        assert_eq!(Ipv4Addr::from(mask(24)), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask(32), u32::MAX);
        assert!(same_subnet(
            Ipv4Addr::new(10, 77, 0, 5),
            Ipv4Addr::new(10, 77, 0, 1),
            24
        ));
        assert!(!same_subnet(
            Ipv4Addr::new(10, 77, 1, 5),
            Ipv4Addr::new(10, 77, 0, 1),
            24
        ));
    }
}
