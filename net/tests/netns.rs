//! kiln-net against the real kernel: real TAPs, a real bridge, real
//! nftables, each test inside a network namespace it creates
//! (`ip netns add kiln-t-<random>`) and deletes on drop, so the host's own
//! interfaces and rules are never touched. Needs root (CAP_NET_ADMIN,
//! CAP_SYS_ADMIN for setns), `ip` and `nft`; without root every test says
//! it was skipped (and fails in CI).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use kiln_net::firewall::Protocol;
use kiln_net::{
    create_tap_in, delete_tap_in, ForwardOutcome, IpamError, NetConfig, NetError, Network,
    PortForward, Removal, TapError, TapOutcome, TapOwner,
};
use kiln_testkit::{random_hex, Netns};

/// Every test here starts with it: without root it is skipped (a failure
/// in CI).
macro_rules! require_root {
    () => {
        if !kiln_testkit::require_root("network namespaces, TAPs, nftables") {
            return;
        }
    };
}

fn vm_id() -> String {
    random_hex(6)
}

/// The kit's network namespace, with what these tests ask of it.
struct TestNs(Netns);

impl std::ops::Deref for TestNs {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.0
    }
}

impl TestNs {
    fn new() -> Self {
        Self(Netns::new())
    }

    fn config(&self) -> NetConfig {
        NetConfig {
            bridge: format!("kb{}", random_hex(3)),
            netns: Some(self.path()),
            ..NetConfig::default()
        }
    }

    /// A link Kiln does not own, named `name` (a veth pair; its peer gets a
    /// random name). The kernel here has no `dummy` driver.
    fn foreign_link(&self, name: &str) {
        let peer = format!("vp{}", random_hex(4));
        self.sh(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]);
    }

    fn link_exists(&self, name: &str) -> bool {
        self.run(&["ip", "link", "show", "dev", name]).0
    }
}

/// The test's links must never show up in the test process's own
/// (the host's) namespace.
fn assert_not_on_host(name: &str) {
    let out = Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{name} leaked into the host namespace"
    );
}

#[tokio::test]
async fn tap_create_persist_reopen_list_delete() {
    require_root!();
    let ns = TestNs::new();
    let mut config = ns.config();
    config.tap_owner = Some(4242);
    let net = Network::open(config).await.unwrap();
    let bridge = net.ensure().await.unwrap();
    let vm = vm_id();

    let tap = net.create_tap(&vm, 0).await.unwrap();
    assert_eq!(tap.name, format!("kt{vm}0"));
    assert_eq!(tap.outcome, TapOutcome::Created);
    let flags = kiln_net::tap::flags(&tap.fd).unwrap();
    let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    assert_eq!(flags & want, want, "flags {flags:#x}");
    let details = ns.sh(&["ip", "-d", "link", "show", "dev", &tap.name]);
    assert!(
        details.contains("tun type tap pi off vnet_hdr on persist on"),
        "{details}"
    );
    assert!(details.contains("user 4242"), "{details}");
    assert!(
        details.contains(&format!("master {}", bridge.name)),
        "{details}"
    );
    assert!(details.contains(",UP"), "{details}");
    assert_not_on_host(&tap.name);

    // Held by a "QEMU": a second open is refused, not stolen.
    match net.create_tap(&vm, 0).await {
        Err(NetError::Tap(TapError::Busy { name })) => assert_eq!(name, tap.name),
        other => panic!("expected Busy, got {other:?}"),
    }
    // Persistent: survives its descriptor, and is reattached.
    let index = tap.index;
    drop(tap);
    assert!(ns.link_exists(&format!("kt{vm}0")));
    let again = net.create_tap(&vm, 0).await.unwrap();
    assert_eq!(again.outcome, TapOutcome::Reopened);
    assert_eq!(again.index, index);
    drop(again);

    let second = net.create_tap(&vm, 1).await.unwrap();
    let mut listed = net.taps().await.unwrap();
    listed.sort_by_key(|t| t.nic);
    assert_eq!(listed.len(), 2);
    assert_eq!((listed[0].vm_id.as_str(), listed[0].nic), (vm.as_str(), 0));
    assert_eq!((listed[1].vm_id.as_str(), listed[1].nic), (vm.as_str(), 1));
    assert!(listed
        .iter()
        .all(|t| t.master == Some(bridge.index) && t.up));

    // Deleting works while the descriptor is still held (QEMU running).
    assert_eq!(net.delete_tap(&vm, 1).await.unwrap(), Removal::Deleted);
    assert!(!ns.link_exists(&second.name));
    assert_eq!(net.delete_tap(&vm, 1).await.unwrap(), Removal::AlreadyGone);
    assert_eq!(net.delete_tap(&vm, 0).await.unwrap(), Removal::Deleted);
    assert!(net.taps().await.unwrap().is_empty());
}

#[tokio::test]
async fn bridge_gets_the_gateway_once_and_is_found_again() {
    require_root!();
    let ns = TestNs::new();
    let mut config = ns.config();
    config.subnet = "10.77.8.0/24".parse().unwrap();
    config.mtu = Some(1400);
    let net = Network::open(config.clone()).await.unwrap();
    let first = net.ensure().await.unwrap();
    assert!(first.created);
    let second = net.ensure().await.unwrap();
    assert!(!second.created);
    assert_eq!(first.index, second.index);
    let addrs = ns.sh(&["ip", "-4", "-o", "addr", "show", "dev", &config.bridge]);
    assert_eq!(addrs.matches("inet 10.77.8.1/24").count(), 1, "{addrs}");
    let details = ns.sh(&["ip", "-d", "link", "show", "dev", &config.bridge]);
    assert!(
        details.contains("mtu 1400") && details.contains(",UP") && details.contains("bridge "),
        "{details}"
    );
    assert_not_on_host(&config.bridge);

    // A TAP takes the bridge's MTU and is enslaved.
    let tap = net.create_tap(&vm_id(), 0).await.unwrap();
    let details = ns.sh(&["ip", "-d", "link", "show", "dev", &tap.name]);
    assert!(
        details.contains("mtu 1400") && details.contains(&format!("master {}", config.bridge)),
        "{details}"
    );

    // teardown removes bridge, TAPs and table.
    drop(tap);
    let cleanup = net.teardown().await.unwrap();
    assert_eq!(cleanup.taps.len(), 1);
    assert!(!ns.link_exists(&config.bridge));
    assert!(!ns.run(&["nft", "list", "table", "inet", "kiln"]).0);
}

#[tokio::test]
async fn bad_input_is_a_named_error_and_creates_nothing() {
    require_root!();
    let ns = TestNs::new();
    let links_before = ns.sh(&["ip", "-o", "link"]);

    // Bridge name too long: refused before anything happens.
    let mut config = ns.config();
    config.bridge = "kiln-bridge-too-long".into();
    match Network::open(config).await {
        Err(e @ NetError::InvalidBridgeName { .. }) => {
            assert_eq!(e.kind(), kiln_net::ErrorKind::InvalidInput)
        }
        other => panic!("expected InvalidBridgeName, got {other:?}"),
    }

    // A foreign link with the bridge's name is not taken over.
    let config = ns.config();
    ns.foreign_link(&config.bridge);
    let net = Network::open(config.clone()).await.unwrap();
    assert!(matches!(
        net.ensure().await,
        Err(NetError::NotABridge { .. })
    ));
    let foreign = ns.sh(&["ip", "-d", "link", "show", "dev", &config.bridge]);
    assert!(foreign.contains("veth"), "{foreign}");
    assert!(
        !ns.run(&["nft", "list", "table", "inet", "kiln"]).0,
        "table made anyway"
    );
    ns.sh(&["ip", "link", "del", &config.bridge]);

    // A subnet already on another interface is refused.
    ns.foreign_link("other0");
    ns.sh(&["ip", "addr", "add", "10.77.0.9/16", "dev", "other0"]);
    match net.ensure().await {
        Err(NetError::SubnetInUse { link, .. }) => assert_eq!(link, "other0"),
        other => panic!("expected SubnetInUse, got {other:?}"),
    }
    // Also a single host address inside the subnet.
    ns.sh(&["ip", "addr", "flush", "dev", "other0"]);
    ns.sh(&["ip", "addr", "add", "10.77.0.200/32", "dev", "other0"]);
    assert!(matches!(
        net.ensure().await,
        Err(NetError::SubnetInUse { prefix_len: 32, .. })
    ));
    assert!(!ns.link_exists(&config.bridge));
    assert!(
        !ns.run(&["nft", "list", "table", "inet", "kiln"]).0,
        "table made anyway"
    );
    ns.sh(&["ip", "link", "del", "other0"]);

    // No bridge yet: no TAP either.
    assert!(matches!(
        net.create_tap(&vm_id(), 0).await,
        Err(NetError::BridgeMissing { .. })
    ));
    assert_eq!(ns.sh(&["ip", "-o", "link"]), links_before);

    net.ensure().await.unwrap();
    // A TAP name held by a non-TAP link is not touched.
    let vm = vm_id();
    ns.foreign_link(&format!("kt{vm}0"));
    assert!(matches!(
        net.create_tap(&vm, 0).await,
        Err(NetError::NotATap { .. })
    ));
    assert!(matches!(
        net.delete_tap(&vm, 0).await,
        Err(NetError::NotATap { .. })
    ));
    assert!(ns.link_exists(&format!("kt{vm}0")));
    // Bad VM id / NIC index.
    assert!(matches!(
        net.create_tap("NOPE", 0).await,
        Err(NetError::Name(_))
    ));
    assert!(matches!(
        net.create_tap(&vm, 40).await,
        Err(NetError::Name(_))
    ));

    // Forward to an address outside the subnet, or a port already taken.
    let outside = PortForward {
        vm_id: vm.clone(),
        protocol: Protocol::Tcp,
        host_port: 8080,
        address: Ipv4Addr::new(192, 0, 2, 1),
        port: 80,
    };
    assert!(matches!(
        net.add_forward(outside).await,
        Err(NetError::Ipam(IpamError::OutsideSubnet { .. }))
    ));
    assert!(net.forwards().await.unwrap().is_empty());
    let fwd = PortForward {
        vm_id: vm.clone(),
        protocol: Protocol::Tcp,
        host_port: 8080,
        address: Ipv4Addr::new(10, 77, 0, 5),
        port: 80,
    };
    net.add_forward(fwd.clone()).await.unwrap();
    let rules_before = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    let taken = PortForward {
        vm_id: vm_id(),
        port: 81,
        address: Ipv4Addr::new(10, 77, 0, 6),
        ..fwd
    };
    match net.add_forward(taken).await {
        Err(e @ NetError::Firewall(kiln_net::FirewallError::PortInUse { .. })) => {
            assert_eq!(e.kind(), kiln_net::ErrorKind::Conflict);
            assert!(e.to_string().contains(&vm), "{e}");
        }
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert_eq!(
        ns.sh(&["nft", "list", "table", "inet", "kiln"]),
        rules_before
    );
}

#[tokio::test]
async fn nft_masquerade_and_forwards_by_vm_leave_other_tables_alone() {
    require_root!();
    let ns = TestNs::new();
    // Someone else's table, with a rule.
    ns.sh(&["nft", "add", "table", "ip", "other"]);
    ns.sh(&[
        "nft",
        "add",
        "chain",
        "ip",
        "other",
        "input",
        "{ type filter hook input priority 0; }",
    ]);
    ns.sh(&[
        "nft",
        "add",
        "rule",
        "ip",
        "other",
        "input",
        "tcp",
        "dport",
        "22",
        "accept",
        "comment",
        "\"kiln:vm=000000000000;fwd=tcp/22;to=10.77.0.2:22\"",
    ]);
    let other_before = ns.sh(&["nft", "list", "table", "ip", "other"]);

    let mut config = ns.config();
    config.masquerade = true;
    let net = Network::open(config).await.unwrap();
    net.ensure().await.unwrap();
    assert!(net.masquerading().await.unwrap());
    let table = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    assert!(
        table.contains("ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade"),
        "{table}"
    );
    assert_eq!(ns.sh(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    // ensure() is idempotent: still exactly one masquerade rule.
    net.ensure().await.unwrap();
    let table = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    assert_eq!(table.matches("masquerade comment").count(), 1, "{table}");
    // And one rule dropping RARP from Kiln's TAPs on the bridge.
    let bridge = ns.sh(&["nft", "list", "table", "bridge", "kiln"]);
    assert_eq!(
        bridge
            .matches(r#"iifname "kt*" ether type 0x8035 drop comment "kiln:no-rarp""#)
            .count(),
        1,
        "{bridge}"
    );
    // A second network of kilnd's in the namespace has its own rule, and
    // turning it off leaves the first one's.
    let mut second = ns.config();
    second.subnet = "10.78.0.0/24".parse().unwrap();
    second.masquerade = true;
    let net2 = Network::open(second.clone()).await.unwrap();
    net2.ensure().await.unwrap();
    let table = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    assert_eq!(table.matches("masquerade comment").count(), 2, "{table}");
    second.masquerade = false;
    let net2 = Network::open(second).await.unwrap();
    net2.ensure().await.unwrap();
    assert!(!net2.masquerading().await.unwrap());
    assert!(net.masquerading().await.unwrap());

    let (a, b) = (vm_id(), vm_id());
    let fwd = |vm: &str, protocol, host_port, last, port| PortForward {
        vm_id: vm.to_owned(),
        protocol,
        host_port,
        address: Ipv4Addr::new(10, 77, 0, last),
        port,
    };
    let a1 = fwd(&a, Protocol::Tcp, 8080, 2, 80);
    let a2 = fwd(&a, Protocol::Udp, 5353, 2, 53);
    let b1 = fwd(&b, Protocol::Tcp, 9090, 3, 90);
    // The same port number on the other protocol is a different forward.
    let b2 = fwd(&b, Protocol::Udp, 8080, 3, 8080);
    for f in [&a1, &a2, &b1, &b2] {
        assert_eq!(
            net.add_forward(f.clone()).await.unwrap(),
            ForwardOutcome::Added
        );
    }
    assert_eq!(
        net.add_forward(a1.clone()).await.unwrap(),
        ForwardOutcome::AlreadyPresent
    );
    let table = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    assert!(
        table.contains("fib daddr type local tcp dport 8080 dnat ip to 10.77.0.2:80"),
        "{table}"
    );
    assert!(
        table.contains("fib daddr type local udp dport 5353 dnat ip to 10.77.0.2:53"),
        "{table}"
    );
    // Each forward is in prerouting and output.
    assert_eq!(table.matches("dnat ip to").count(), 8, "{table}");
    let mut listed = net.forwards().await.unwrap();
    listed.sort_by_key(|f| (f.host_port, f.protocol));
    assert_eq!(listed, vec![a2.clone(), a1.clone(), b2.clone(), b1.clone()]);

    // Removing A removes exactly A's rules.
    let cleanup = net.remove_vm(&a).await.unwrap();
    let mut removed = cleanup.forwards;
    removed.sort_by_key(|f| f.host_port);
    assert_eq!(removed, vec![a2, a1]);
    let mut left = net.forwards().await.unwrap();
    left.sort_by_key(|f| f.host_port);
    assert_eq!(left, vec![b2.clone(), b1.clone()]);
    assert!(net.remove_vm(&a).await.unwrap().forwards.is_empty());
    let table = ns.sh(&["nft", "list", "table", "inet", "kiln"]);
    assert!(table.contains("masquerade"), "masquerade lost: {table}");

    // Reconcile with only A "alive": B's rules go.
    let cleanup = net.reconcile([&a]).await.unwrap();
    assert_eq!(cleanup.forwards.len(), 2);
    assert!(net.forwards().await.unwrap().is_empty());

    // The other table was never touched (even its Kiln-looking comment).
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "other"]),
        other_before
    );
    net.teardown().await.unwrap();
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "other"]),
        other_before
    );
}

#[tokio::test]
async fn reconcile_removes_orphan_taps_only() {
    require_root!();
    let ns = TestNs::new();
    let net = Network::open(ns.config()).await.unwrap();
    net.ensure().await.unwrap();
    let (live, dead) = (vm_id(), vm_id());
    let held = net.create_tap(&live, 0).await.unwrap();
    drop(net.create_tap(&live, 1).await.unwrap());
    let dead_tap = net.create_tap(&dead, 0).await.unwrap();
    net.add_forward(PortForward {
        vm_id: dead.clone(),
        protocol: Protocol::Tcp,
        host_port: 2222,
        address: Ipv4Addr::new(10, 77, 0, 9),
        port: 22,
    })
    .await
    .unwrap();
    // Not Kiln's: a TAP with another name, a TUN and a veth with Kiln-like
    // names.
    ns.sh(&["ip", "tuntap", "add", "dev", "othertap", "mode", "tap"]);
    let tun = format!("kt{}0", vm_id());
    ns.sh(&["ip", "tuntap", "add", "dev", &tun, "mode", "tun"]);
    let fake = format!("kt{}0", vm_id());
    ns.foreign_link(&fake);

    let cleanup = net.reconcile([&live]).await.unwrap();
    assert_eq!(cleanup.taps, vec![dead_tap.name.clone()]);
    assert_eq!(cleanup.forwards.len(), 1);
    assert!(!ns.link_exists(&dead_tap.name));
    assert!(ns.link_exists(&held.name));
    assert!(ns.link_exists(&format!("kt{live}1")));
    assert!(ns.link_exists("othertap"));
    assert!(ns.link_exists(&fake));
    assert!(ns.link_exists(&tun));
    let names: Vec<String> = net
        .taps()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[tokio::test]
async fn tap_in_a_named_namespace_for_cni() {
    require_root!();
    let ns = TestNs::new();
    let name = format!("cni{}", random_hex(3));
    let tap = create_tap_in(Some(&ns.path()), &name, TapOwner::default())
        .await
        .unwrap();
    assert_eq!(tap.outcome, TapOutcome::Created);
    assert!(tap.index > 0, "the index in the namespace");
    assert!(ns.link_exists(&name));
    assert_not_on_host(&name);
    drop(tap);
    assert!(ns.link_exists(&name), "not persistent");
    let tap = create_tap_in(Some(&ns.path()), &name, TapOwner::default())
        .await
        .unwrap();
    assert_eq!(tap.outcome, TapOutcome::Reopened);
    // Held: not removed. Released: removed, then already gone.
    assert!(matches!(
        delete_tap_in(Some(&ns.path()), &name).await,
        Err(NetError::Tap(kiln_net::TapError::Busy { .. }))
    ));
    drop(tap);
    assert_eq!(
        delete_tap_in(Some(&ns.path()), &name).await.unwrap(),
        Removal::Deleted
    );
    assert!(!ns.link_exists(&name));
    assert_eq!(
        delete_tap_in(Some(&ns.path()), &name).await.unwrap(),
        Removal::AlreadyGone
    );
    // Something else with the name is left alone.
    let veth = format!("cniv{}", random_hex(3));
    let ok = std::process::Command::new("ip")
        .args(["-n", ns.name(), "link", "add", &veth, "type", "veth"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(matches!(
        delete_tap_in(Some(&ns.path()), &veth).await,
        Err(NetError::NotATap { .. })
    ));
    assert!(ns.link_exists(&veth));
    // A namespace that does not exist is a named error.
    assert!(matches!(
        create_tap_in(
            Some(&PathBuf::from("/run/netns/kiln-t-none")),
            &name,
            TapOwner::default()
        )
        .await,
        Err(NetError::Netns(kiln_net::NetnsError::Open { .. }))
    ));
}

/// Measures what the engine pays per VM NIC (printed; run with
/// `--nocapture`): TAP create + enslave + up, and delete. Asserts only
/// that every cycle worked and left nothing behind.
#[tokio::test]
async fn tap_create_attach_delete_cost() {
    require_root!();
    let ns = TestNs::new();
    let net = Network::open(ns.config()).await.unwrap();
    net.ensure().await.unwrap();
    const N: u32 = 20;
    let (mut create, mut delete) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for _ in 0..N {
        let vm = vm_id();
        let t = std::time::Instant::now();
        let tap = net.create_tap(&vm, 0).await.unwrap();
        create += t.elapsed();
        drop(tap);
        let t = std::time::Instant::now();
        assert_eq!(net.delete_tap(&vm, 0).await.unwrap(), Removal::Deleted);
        delete += t.elapsed();
    }
    assert!(net.taps().await.unwrap().is_empty());
    println!(
        "TAP create+attach: {:.2} ms, delete: {:.2} ms (mean of {N})",
        create.as_secs_f64() * 1000.0 / f64::from(N),
        delete.as_secs_f64() * 1000.0 / f64::from(N)
    );
}

/// A pod's namespace as CNI leaves it (a veth `eth0` with the pod's
/// address and a default route, its peer in kilnd's namespace), and a
/// VM's TAP on kilnd's bridge: the TAP moves over, the two get the tc
/// redirect both ways, and the pod's interface is what the guest is told.
#[tokio::test]
async fn a_vm_tap_takes_over_a_pods_cni_interface() {
    require_root!();
    let host = TestNs::new();
    let pod = Netns::new();
    let net = Network::open(host.config()).await.unwrap();
    net.ensure().await.unwrap();
    let id = vm_id();
    let tap = net.create_tap(&id, 0).await.unwrap();
    let peer = format!("vp{}", random_hex(4));
    host.sh(&[
        "ip", "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", &peer,
    ]);
    host.sh(&["ip", "link", "set", "eth0", "netns", pod.name()]);
    pod.sh(&["ip", "addr", "add", "10.99.7.5/24", "dev", "eth0"]);
    pod.sh(&["ip", "link", "set", "eth0", "up"]);
    pod.sh(&["ip", "route", "add", "default", "via", "10.99.7.1"]);
    let mac = pod.sh(&["cat", "/sys/class/net/eth0/address"]);

    let found = kiln_net::pod::inspect(&pod.path(), "eth0").await.unwrap();
    assert_eq!(found.mac.to_string(), mac.trim());
    assert_eq!(found.address.to_string(), "10.99.7.5");
    assert_eq!(found.prefix_length, 24);
    assert_eq!(
        found.gateway.map(|g| g.to_string()).as_deref(),
        Some("10.99.7.1")
    );
    assert_eq!(found.mtu, Some(1400));

    assert!(net.move_tap(&id, 0, &pod.path()).await.unwrap());
    assert!(
        !host.link_exists(&tap.name),
        "the TAP left kilnd's namespace"
    );
    assert!(
        !net.move_tap(&id, 0, &pod.path()).await.unwrap(),
        "a retry finds nothing to move"
    );
    let index = kiln_net::pod::redirect(&pod.path(), &found, &tap.name)
        .await
        .unwrap();
    assert!(index > 0);
    let link = pod.sh(&["ip", "-d", "link", "show", "dev", &tap.name]);
    assert!(
        link.contains("tun type tap") && link.contains("mtu 1400"),
        "{link}"
    );
    assert!(!link.contains("master"), "off the bridge: {link}");
    assert!(link.contains(",UP"), "up: {link}");
    for (dev, to) in [("eth0", tap.name.as_str()), (tap.name.as_str(), "eth0")] {
        let filters = pod.sh(&["tc", "filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("protocol all")
                && filters.contains(&format!("Redirect to device {to}")),
            "{dev}: {filters}"
        );
    }
    // The pod's interface keeps what CNI gave it.
    let addr = pod.sh(&["ip", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.99.7.5/24"), "{addr}");

    // Not the pod's: a missing interface, one without an address, a bad name.
    let no_such = kiln_net::pod::inspect(&pod.path(), "eth9")
        .await
        .unwrap_err();
    assert!(
        matches!(no_such, NetError::PodInterface { .. }),
        "{no_such}"
    );
    assert!(
        no_such.to_string().contains("no such interface"),
        "{no_such}"
    );
    pod.sh(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth2",
    ]);
    let bare = kiln_net::pod::inspect(&pod.path(), "eth1")
        .await
        .unwrap_err();
    assert!(bare.to_string().contains("no IPv4 address"), "{bare}");
    pod.sh(&["ip", "link", "set", "lo", "up"]);
    let lo = kiln_net::pod::inspect(&pod.path(), "lo").await.unwrap_err();
    assert!(lo.to_string().contains("no Ethernet address"), "{lo}");
    assert!(matches!(
        kiln_net::pod::inspect(&pod.path(), "a/b").await,
        Err(NetError::Name(_))
    ));
    // The QEMU's descriptor still works in the pod's namespace; deleting
    // the namespace takes the TAP with it.
    drop(tap);
    assert!(matches!(
        delete_tap_in(
            Some(&pod.path()),
            &kiln_net::names::tap_name(&id, 0).unwrap()
        )
        .await,
        Ok(Removal::Deleted)
    ));
    net.teardown().await.unwrap();
}

/// The kernel runs one netlink dump per socket at a time and answers a
/// dump started meanwhile with EBUSY; listing TAPs from many tasks at once
/// over `Network`'s one connection must queue, not fail (seen as a TAP left
/// behind when a release and a reconcile listed TAPs together), also while
/// TAPs come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tap_listings_share_the_netlink_socket() {
    require_root!();
    let ns = TestNs::new();
    let net = std::sync::Arc::new(Network::open(ns.config()).await.unwrap());
    net.ensure().await.unwrap();
    // Enough links that a dump spans several reads (one read holds ~32 KiB,
    // a TAP's message ~1.5 KiB).
    let held: Vec<String> = (0..16).map(|_| vm_id()).collect();
    for vm in &held {
        for nic in 0..4 {
            drop(net.create_tap(vm, nic).await.unwrap());
        }
    }
    let churn = {
        let net = std::sync::Arc::clone(&net);
        tokio::spawn(async move {
            for _ in 0..40 {
                let vm = vm_id();
                drop(net.create_tap(&vm, 0).await.unwrap());
                net.remove_vm(&vm).await.unwrap();
            }
        })
    };
    let listers: Vec<_> = (0..8)
        .map(|_| {
            let net = std::sync::Arc::clone(&net);
            tokio::spawn(async move {
                for _ in 0..25 {
                    let (taps, _) = tokio::join!(net.taps(), net.ensure());
                    let taps = taps.unwrap();
                    assert!(taps.len() >= 64, "{}", taps.len());
                }
            })
        })
        .collect();
    for lister in listers {
        lister.await.unwrap();
    }
    churn.await.unwrap();
}
