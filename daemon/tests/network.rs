//! Bridge networking through the real kilnd, run inside a network
//! namespace the test creates (`ip netns exec`): real TAPs on a real
//! bridge, nftables forwards, the guest configured by its agent. Traffic
//! only goes to addresses inside that namespace; deleting the namespace
//! (also when a test fails) removes the bridge, TAPs and rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_testkit::{pid_alive, try_wait_until, wait_until, Daemon, Netns};
use serde_json::{json, Value};

const GATEWAY: &str = "10.77.0.1";

/// What these tests ask of a namespace besides the kit's.
trait NetnsExt {
    /// The helpers of guest/tests/net-smoke.py (raw-socket ping, TCP echo),
    /// run in the namespace; their JSON line.
    fn helper(&self, args: &[&str]) -> Value;
    /// kilnd's nftables table in the namespace.
    fn nft(&self) -> String;
}

impl NetnsExt for Netns {
    fn helper(&self, args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/tests/net-smoke.py");
        let out = self
            .command(&["python3", script.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn nft(&self) -> String {
        let out = self
            .command(&["nft", "list", "table", "inet", "kiln"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

const NETWORK: &str = "[network]\nbridge = \"kb0\"\nsubnet = \"10.77.0.0/24\"\n";

/// kilnd (no D-Bus) running inside `ns` with a `[network]` table.
fn daemon_in(ns: &Netns, network: &str) -> Daemon {
    let mut d = Daemon::new("");
    d.kilnd.append_config(network);
    d.spawn_in(ns);
    d
}

fn nic(vm: &Value) -> Value {
    vm["network"][0].clone()
}

fn echo_until_up(ns: &Netns, host: &str, port: &str, message: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("TCP echo {host}:{port}"),
        || {
            let r = ns.helper(&["--echo", host, port, message]);
            if r["reply"] == message {
                Ok(())
            } else {
                Err(r)
            }
        },
    );
}

fn start_echo_server(d: &Daemon, id: &Value) {
    let r = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c",
            "(nc -ll -p 7777 -e /bin/cat >/dev/null 2>&1 &)"]}),
    );
    assert_eq!(r["exitCode"], 0, "{r}");
}

#[test]
fn bridge_vm_ping_echo_forward_and_cleanup() {
    let ns = Netns::new();
    let d = daemon_in(&ns, NETWORK);
    let spec = json!({"memoryMiB": 128, "network": {"mode": "bridge",
        "forwards": [{"hostPort": 8080, "vmPort": 7777}]}});
    let vm = d.ok("CreateVM", json!({"name": "web", "spec": spec}))["vm"].clone();
    let id = vm["id"].clone();
    let n = nic(&vm);
    assert_eq!(n["address"], "10.77.0.2", "{vm}");
    assert_eq!(n["ifindex"], 0, "no TAP before start: {vm}");
    let tap = n["tap"].as_str().unwrap().to_owned();
    assert!(!ns.links().contains(&tap));

    // Bad input: named errors, nothing created.
    let bad = |name: &str, network: Value| {
        d.err(
            "CreateVM",
            json!({"name": name, "spec": {"memoryMiB": 128, "network": network}}),
        )
    };
    assert_eq!(
        bad("outside", json!({"mode": "bridge", "address": "10.78.0.5"})),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        bad("taken", json!({"mode": "bridge", "address": "10.77.0.2"})),
        "io.kiln.Manager.AddressInUse"
    );
    assert_eq!(
        bad("gw", json!({"mode": "bridge", "address": GATEWAY})),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        bad(
            "port",
            json!({"mode": "bridge", "forwards": [{"hostPort": 8080, "vmPort": 1}]})
        ),
        "io.kiln.Manager.PortInUse"
    );
    assert_eq!(
        bad(
            "zero",
            json!({"mode": "bridge", "forwards": [{"hostPort": 0, "vmPort": 1}]})
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    let vms = d.ok("ListVMs", json!({}))["vms"].as_array().unwrap().len();
    assert_eq!(vms, 1, "nothing half-created");

    let started = Instant::now();
    let vm = d.ok("StartVM", json!({"id": id}))["vm"].clone();
    eprintln!("bridge VM ready in {:?}", started.elapsed());
    let n = nic(&vm);
    assert!(n["ifindex"].as_u64().unwrap() > 0, "{vm}");
    assert!(ns.links().contains(&tap), "{}", ns.links());

    // The guest has its address: ping, then a TCP echo to a server the
    // agent started, directly and through the forward (output chain).
    let ping = ns.helper(&["--ping", "10.77.0.2"]);
    assert!(ping["received"].as_u64().unwrap_or(0) >= 2, "{ping}");
    eprintln!("host->guest ping: {ping}");
    start_echo_server(&d, &id);
    echo_until_up(&ns, "10.77.0.2", "7777", "direct\n");
    assert!(ns.nft().contains("8080"), "{}", ns.nft());
    echo_until_up(&ns, GATEWAY, "8080", "forwarded\n");

    // Describe on D-Bus is covered by the property; here varlink.
    let described = d.ok("DescribeVM", json!({"id": id}))["vm"].clone();
    assert_eq!(nic(&described)["mac"], n["mac"]);

    // Deleting the VM removes its TAP and its forward; its address is free.
    d.ok("DeleteVM", json!({"id": id}));
    wait_until(Duration::from_secs(10), "the TAP and forward gone", || {
        let (links, nft) = (ns.links(), ns.nft());
        if links.contains(&tap) || nft.contains("8080") {
            Err(format!("{links}\n{nft}"))
        } else {
            Ok(())
        }
    });
    let again = d.ok(
        "CreateVM",
        json!({"name": "again", "spec": {"memoryMiB": 128,
            "network": {"mode": "bridge", "address": "10.77.0.2",
                "forwards": [{"hostPort": 8080, "vmPort": 7777}]}}}),
    )["vm"]
        .clone();
    assert_eq!(nic(&again)["address"], "10.77.0.2");
}

#[test]
fn kill9_reconcile_reclaims_the_orphan_tap_and_keeps_live_ones() {
    let ns = Netns::new();
    let mut d = daemon_in(&ns, NETWORK);
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let vm = d.ok(
            "CreateVM",
            json!({"name": name, "spec": {"memoryMiB": 128, "network": {"mode": "bridge"}}}),
        )["vm"]
            .clone();
        vms.push(d.ok("StartVM", json!({"id": vm["id"]}))["vm"].clone());
    }
    let (a, b) = (&vms[0], &vms[1]);
    assert_ne!(nic(a)["address"], nic(b)["address"]);
    assert_ne!(nic(a)["mac"], nic(b)["mac"]);
    for vm in [a, b] {
        let addr = nic(vm)["address"].as_str().unwrap().to_owned();
        let ping = ns.helper(&["--ping", &addr]);
        assert!(
            ping["received"].as_u64().unwrap_or(0) >= 2,
            "{addr}: {ping}"
        );
    }

    d.sigkill();
    // b's QEMU dies while kilnd is down.
    let pid = b["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let tap_b = nic(b)["tap"].as_str().unwrap().to_owned();
    let tap_a = nic(a)["tap"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(10), "b's QEMU gone", || {
        !pid_alive(pid as u32)
    });
    assert!(ns.links().contains(&tap_b), "persistent TAP outlives QEMU");

    d.spawn_in(&ns);
    let links = ns.links();
    assert!(!links.contains(&tap_b), "orphan TAP reclaimed: {links}");
    assert!(links.contains(&tap_a), "live VM keeps its TAP: {links}");
    let a2 = d.ok("DescribeVM", json!({"id": a["id"]}))["vm"].clone();
    assert_eq!(a2["state"], "ready");
    assert_eq!(nic(&a2)["address"], nic(a)["address"]);
    let addr_a = nic(a)["address"].as_str().unwrap().to_owned();
    let ping = ns.helper(&["--ping", &addr_a]);
    assert!(ping["received"].as_u64().unwrap_or(0) >= 2, "{ping}");
    let b2 = d.ok("DescribeVM", json!({"id": b["id"]}))["vm"].clone();
    assert_eq!(b2["state"], "failed");
    assert_eq!(nic(&b2)["ifindex"], 0, "{b2}");
    // Deleting the dead VM frees its address for a new one.
    let addr_b = nic(b)["address"].clone();
    d.ok("DeleteVM", json!({"id": b["id"]}));
    let c = d.ok(
        "CreateVM",
        json!({"name": "c", "spec": {"memoryMiB": 128,
            "network": {"mode": "bridge", "address": addr_b}}}),
    )["vm"]
        .clone();
    assert_eq!(nic(&c)["address"], addr_b);
}

/// kilnd run in `ns` with `network` appended to its config must refuse to
/// start; its stderr.
fn kilnd_refuses(ns: &Netns, network: &str) -> String {
    let d = Daemon::new("");
    d.kilnd.append_config(network);
    let out = ns
        .command(&[env!("CARGO_BIN_EXE_kilnd")])
        .arg("--config")
        .arg(d.kilnd.dir.path().join("kilnd.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_too_long_bridge_name_stops_kilnd_with_a_named_error() {
    let ns = Netns::new();
    let stderr = kilnd_refuses(&ns, "[network]\nbridge = \"a-bridge-name-too-long\"\n");
    assert!(stderr.contains("invalid bridge name"), "{stderr}");
    assert!(!ns.links().contains("a-bridge"), "{}", ns.links());
}

#[test]
fn bridge_mode_without_a_network_table_is_invalid_spec() {
    let d = Daemon::start();
    assert_eq!(
        d.err(
            "CreateVM",
            json!({"name": "x", "spec": {"network": {"mode": "bridge"}}})
        ),
        "io.kiln.Manager.InvalidSpec"
    );
}

#[test]
fn template_clones_get_their_own_mac_and_address_and_are_reachable() {
    let ns = Netns::new();
    let mut d = Daemon::new("");
    d.kilnd.append_config(NETWORK);
    d.pool_file("net", "mode = \"template\"\nwarm = 2\nmax = 2\n[vm]\nmemoryMiB = 128\nnetwork = { mode = \"bridge\" }\n");
    d.spawn_in(&ns);
    // A fixed address or forwards cannot go to every VM of a pool.
    assert_eq!(
        d.err(
            "CreatePool",
            json!({"name": "fwd", "spec": {"mode": "cold", "warm": 0, "max": 1,
                "vm": {"network": {"mode": "bridge",
                    "forwards": [{"hostPort": 9090, "vmPort": 80}]}}}}),
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    try_wait_until(Duration::from_secs(400), || {
        let pool = d.ok("DescribePool", json!({"name": "net"}))["pool"].clone();
        if pool["hot"] == 2 {
            Ok(())
        } else {
            Err(pool)
        }
    })
    .unwrap_or_else(|t| panic!("pool net never got 2 hot VMs: {t}\n{}", d.log()));
    let vms = d.ok("ListVMs", json!({}))["vms"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(vms.len(), 2);
    let (a, b) = (nic(&vms[0]), nic(&vms[1]));
    assert_ne!(a["mac"], b["mac"], "{vms:?}");
    assert_ne!(a["address"], b["address"], "{vms:?}");
    for vm in &vms {
        let addr = nic(vm)["address"].as_str().unwrap().to_owned();
        let ping = ns.helper(&["--ping", &addr]);
        assert!(
            ping["received"].as_u64().unwrap_or(0) >= 2,
            "{addr}: {ping}"
        );
        start_echo_server(&d, &vm["id"]);
        echo_until_up(&ns, &addr, "7777", "clone\n");
        // The guest's interface has the VM's own MAC, not the template's.
        let out = d.ok(
            "ExecVM",
            json!({"id": vm["id"], "command": ["sh", "-c", "cat /sys/class/net/eth0/address"]}),
        );
        assert_eq!(
            out["stdout"].as_str().unwrap().trim(),
            nic(vm)["mac"].as_str().unwrap()
        );
        // Its IPv6 link-local address is made from that MAC too: the
        // template saved its NIC up with IPv6 off, the clone turned it on
        // once its MAC was set.
        let inet6 = d.ok(
            "ExecVM",
            json!({"id": vm["id"], "command": ["cat", "/proc/net/if_inet6"]}),
        );
        let link_local = link_local_of(nic(vm)["mac"].as_str().unwrap());
        assert!(
            inet6["stdout"]
                .as_str()
                .unwrap()
                .lines()
                .any(|l| l.starts_with(&link_local) && l.ends_with("eth0")),
            "no {link_local} on eth0: {inet6}"
        );
    }
    // No frame from the template's MAC reached the bridge (QEMU's RARP
    // announce of the loaded MAC is dropped before learning): it learned
    // the clones' MACs and nothing else.
    let macs: Vec<String> = vms
        .iter()
        .map(|vm| nic(vm)["mac"].as_str().unwrap().to_owned())
        .collect();
    for mac in learned_macs(&ns, "kb0") {
        assert!(
            macs.contains(&mac),
            "the bridge learned {mac}, not a clone's {macs:?}: {}",
            String::from_utf8_lossy(
                &std::process::Command::new("ip")
                    .args(["netns", "exec", ns.name(), "nft", "-a", "list", "ruleset"])
                    .output()
                    .unwrap()
                    .stdout
            )
        );
    }
    // After a reboot the clone is configured again (QEMU resets the
    // device to the template's MAC).
    let id = vms[0]["id"].clone();
    d.ok("RebootVM", json!({"id": id}));
    let addr = a["address"].as_str().unwrap().to_owned();
    let ping = ns.helper(&["--ping", &addr]);
    assert!(
        ping["received"].as_u64().unwrap_or(0) >= 2,
        "after reboot: {ping}"
    );
}

/// The link-local IPv6 address a MAC makes (modified EUI-64), as
/// `/proc/net/if_inet6` writes it: 32 hex digits.
fn link_local_of(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let eui = [b[0] ^ 2, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]];
    let hex: String = eui.iter().map(|x| format!("{x:02x}")).collect();
    format!("fe80000000000000{hex}")
}

/// MACs the bridge learned from frames (not its ports' own addresses).
fn learned_macs(ns: &Netns, bridge: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "bridge",
            "-j",
            "fdb",
            "show",
            "br",
            bridge,
        ])
        .output()
        .unwrap();
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    entries
        .iter()
        .filter(|e| e["state"].as_str() != Some("permanent"))
        .filter_map(|e| e["mac"].as_str().map(str::to_owned))
        .collect()
}

/// The guest's interfaces as `name mac` lines.
fn guest_interfaces(d: &Daemon, id: &Value) -> String {
    let r = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c",
            "for i in /sys/class/net/*; do echo ${i##*/} $(cat $i/address); done"]}),
    );
    r["stdout"].as_str().unwrap_or_default().to_owned()
}

fn pings(ns: &Netns, address: &str) -> bool {
    ns.helper(&["--ping", address])["received"]
        .as_u64()
        .unwrap_or(0)
        >= 2
}

#[test]
fn a_hot_plugged_nic_is_configured_reachable_and_gone_after_detach() {
    let ns = Netns::new();
    let mut d = daemon_in(&ns, NETWORK);
    let plain = d.ok(
        "CreateVM",
        json!({"name": "plain", "spec": {"memoryMiB": 128, "network": {"mode": "bridge"}}}),
    )["vm"]["id"]
        .clone();
    assert_eq!(
        d.err("AttachNIC", json!({"id": plain})),
        "io.kiln.Manager.NoHotplugSlot"
    );
    assert_eq!(
        d.err(
            "CreateVM",
            json!({"name": "many", "spec": {"network": {"mode": "bridge", "hotplugSlots": 9}}})
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    let vm = d.ok(
        "CreateVM",
        json!({"name": "hp", "spec": {"memoryMiB": 128,
            "network": {"mode": "bridge", "hotplugSlots": 2}}}),
    )["vm"]
        .clone();
    let id = vm["id"].clone();
    assert_eq!(
        d.err("AttachNIC", json!({"id": id})),
        "io.kiln.Manager.InvalidState",
        "not running yet"
    );
    let started = Instant::now();
    let vm = d.ok("StartVM", json!({"id": id}))["vm"].clone();
    eprintln!(
        "q35 VM with 2 hot-plug slots ready in {:?}",
        started.elapsed()
    );
    let boot_address = nic(&vm)["address"].as_str().unwrap().to_owned();

    // Bad addresses: named errors, nothing attached.
    assert_eq!(
        d.err("AttachNIC", json!({"id": id, "address": "10.78.0.9"})),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        d.err("AttachNIC", json!({"id": id, "address": boot_address})),
        "io.kiln.Manager.AddressInUse"
    );
    assert_eq!(
        d.ok("ListNICs", json!({"id": id}))["nics"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Attach: a TAP on the bridge, the guest has the MAC and the address.
    let started = Instant::now();
    let second = d.ok("AttachNIC", json!({"id": id, "address": "10.77.0.50"}))["nic"].clone();
    eprintln!("AttachNIC took {:?}: {second}", started.elapsed());
    assert_eq!(second["index"], 1, "{second}");
    assert_eq!(second["address"], "10.77.0.50");
    assert!(second["ifindex"].as_u64().unwrap() > 0, "{second}");
    let tap = second["tap"].as_str().unwrap().to_owned();
    let mac = second["mac"].as_str().unwrap().to_owned();
    assert!(ns.links().contains(&tap), "{}", ns.links());
    assert!(
        guest_interfaces(&d, &id).contains(&mac),
        "{}",
        guest_interfaces(&d, &id)
    );
    assert!(pings(&ns, "10.77.0.50"), "the new NIC's address answers");
    assert!(pings(&ns, &boot_address), "the boot NIC still answers");
    let third = d.ok("AttachNIC", json!({"id": id}))["nic"].clone();
    assert_eq!(third["index"], 2, "{third}");
    assert_eq!(
        d.err("AttachNIC", json!({"id": id})),
        "io.kiln.Manager.NoHotplugSlot",
        "both slots used"
    );
    let described = d.ok("DescribeVM", json!({"id": id}))["vm"].clone();
    assert_eq!(
        described["network"].as_array().unwrap().len(),
        3,
        "{described}"
    );

    // kill -9 and restart: the NICs QEMU has are kept.
    d.sigkill();
    d.spawn_in(&ns);
    let nics = d.ok("ListNICs", json!({"id": id}))["nics"].clone();
    assert_eq!(nics.as_array().unwrap().len(), 3, "{nics}");
    assert!(pings(&ns, "10.77.0.50"), "reachable after the restart");

    // Detach: gone in the guest, on the host and from the VM; the address
    // can be had again.
    assert_eq!(
        d.err("DetachNIC", json!({"id": id, "index": 0})),
        "io.kiln.Manager.InvalidArgument"
    );
    assert_eq!(
        d.err("DetachNIC", json!({"id": id, "index": 5})),
        "io.kiln.Manager.NoSuchNIC"
    );
    let started = Instant::now();
    d.ok("DetachNIC", json!({"id": id, "index": 1}));
    eprintln!("DetachNIC took {:?}", started.elapsed());
    assert!(!ns.links().contains(&tap), "{}", ns.links());
    assert!(
        !guest_interfaces(&d, &id).contains(&mac),
        "{}",
        guest_interfaces(&d, &id)
    );
    assert!(!pings(&ns, "10.77.0.50"), "the detached address is silent");
    let nics = d.ok("ListNICs", json!({"id": id}))["nics"].clone();
    let indices: Vec<u64> = nics
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 2], "{nics}");
    let again = d.ok("AttachNIC", json!({"id": id, "address": "10.77.0.50"}))["nic"].clone();
    assert_eq!(again["index"], 1, "{again}");

    // Hot-plugged NICs go with the process; the boot NIC's address stays.
    let third_tap = third["tap"].as_str().unwrap().to_owned();
    let stopped = d.ok("KillVM", json!({"id": id}))["vm"].clone();
    let network = stopped["network"].as_array().unwrap().clone();
    assert_eq!(network.len(), 1, "{stopped}");
    assert_eq!(network[0]["address"], boot_address.as_str());
    wait_until(Duration::from_secs(10), "the hot-plugged TAPs gone", || {
        let links = ns.links();
        if links.contains(&third_tap) || links.contains(&tap) {
            Err(links)
        } else {
            Ok(())
        }
    });
}

/// The guest's default gateway from `/proc/net/route` (hex, host order).
fn guest_default_gateway(d: &Daemon, id: &Value) -> String {
    let r = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c",
            "awk '$2 == \"00000000\" { print $3 }' /proc/net/route"]}),
    );
    r["stdout"].as_str().unwrap_or_default().trim().to_owned()
}

#[test]
fn a_netns_vm_gets_its_tap_in_the_callers_namespace() {
    let ns = Netns::new();
    let pod = Netns::new();
    // No [network] table: netns mode needs no bridge of kilnd's.
    let mut d = daemon_in(&ns, "");
    let bad = |name: &str, network: Value| {
        d.err(
            "CreateVM",
            json!({"name": name, "spec": {"memoryMiB": 128, "network": network}}),
        )
    };
    for network in [
        json!({"mode": "netns"}),
        json!({"mode": "netns", "netns": "../etc"}),
        json!({"mode": "netns", "netns": pod.name(), "address": "10.99.0.2"}),
        json!({"mode": "netns", "netns": pod.name(), "forwards": [{"hostPort": 80, "vmPort": 80}]}),
    ] {
        assert_eq!(
            bad("bad", network.clone()),
            "io.kiln.Manager.InvalidSpec",
            "{network}"
        );
    }
    // A namespace that does not exist: a named error at start, the VM
    // stays as it was.
    let lost = d.ok(
        "CreateVM",
        json!({"name": "lost", "spec": {"memoryMiB": 128,
            "network": {"mode": "netns", "netns": "kiln-t-no-such-ns"}}}),
    )["vm"]["id"]
        .clone();
    assert_eq!(
        d.err("StartVM", json!({"id": lost})),
        "io.kiln.Manager.NetworkFailed"
    );
    assert_eq!(
        d.ok("DescribeVM", json!({"id": lost}))["vm"]["state"],
        "created"
    );

    let vm = d.ok(
        "CreateVM",
        json!({"name": "pod", "spec": {"memoryMiB": 128, "network": {"mode": "netns",
            "netns": pod.name(), "address": "10.99.0.2", "prefixLength": 24,
            "gateway": "10.99.0.1"}}}),
    )["vm"]
        .clone();
    let id = vm["id"].clone();
    let n = nic(&vm);
    assert_eq!(n["netns"], pod.name(), "{vm}");
    assert_eq!(n["address"], "10.99.0.2");
    let tap = n["tap"].as_str().unwrap().to_owned();
    let vm = d.ok("StartVM", json!({"id": id}))["vm"].clone();
    assert!(nic(&vm)["ifindex"].as_u64().unwrap() > 0, "{vm}");
    assert!(
        pod.links().contains(&tap),
        "TAP in the pod namespace: {}",
        pod.links()
    );
    assert!(!ns.links().contains(&tap), "not in kilnd's: {}", ns.links());
    assert_eq!(guest_default_gateway(&d, &id), "0100630A", "via 10.99.0.1");

    // The orchestrator wires the TAP; then the guest answers.
    for argv in [
        vec!["ip", "addr", "add", "10.99.0.1/24", "dev", &tap],
        vec!["ip", "link", "set", &tap, "up"],
    ] {
        assert!(pod.command(&argv).status().unwrap().success(), "{argv:?}");
    }
    assert!(
        pings(&pod, "10.99.0.2"),
        "guest reachable in the pod namespace"
    );

    // kill -9 of kilnd and of the VM's QEMU: the restarted kilnd removes
    // the orphan TAP from the pod namespace.
    d.sigkill();
    let pid = vm["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "the VM's QEMU gone", || {
        !pid_alive(pid as u32)
    });
    assert!(pod.links().contains(&tap), "persistent TAP outlives QEMU");
    d.spawn_in(&ns);
    assert!(
        !pod.links().contains(&tap),
        "orphan TAP reclaimed: {}",
        pod.links()
    );

    // Start again: a new TAP; stopping the VM removes it.
    d.ok("StartVM", json!({"id": id}));
    assert!(pod.links().contains(&tap), "{}", pod.links());
    d.ok("KillVM", json!({"id": id}));
    wait_until(Duration::from_secs(10), "the TAP gone from the pod", || {
        let links = pod.links();
        if links.contains(&tap) {
            Err(links)
        } else {
            Ok(())
        }
    });
    d.ok("DeleteVM", json!({"id": id}));
}

const TWO_BRIDGES: &str = "[network]\nbridge = \"kb0\"\nsubnet = \"10.77.0.0/24\"\n\n\
    [[networks]]\nbridge = \"kb1\"\nsubnet = \"10.78.0.0/24\"\nmasquerade = true\n";

#[test]
fn a_pool_can_name_another_bridge_with_its_own_subnet() {
    let ns = Netns::new();
    let d = daemon_in(&ns, TWO_BRIDGES);
    for (network, why) in [
        (json!({"mode": "bridge", "bridge": "kb9"}), "no such bridge"),
        (
            json!({"mode": "none", "bridge": "kb1"}),
            "bridge without bridge mode",
        ),
    ] {
        assert_eq!(
            d.err(
                "CreateVM",
                json!({"name": "bad", "spec": {"network": network}})
            ),
            "io.kiln.Manager.InvalidSpec",
            "{why}"
        );
    }
    d.ok(
        "CreatePool",
        json!({"name": "back", "spec": {"mode": "template", "warm": 1, "max": 2,
            "vm": {"memoryMiB": 128, "network": {"mode": "bridge", "bridge": "kb1"}}}}),
    );
    let front = d.ok(
        "CreateVM",
        json!({"name": "front", "spec": {"memoryMiB": 128, "network": {"mode": "bridge"}}}),
    )["vm"]["id"]
        .clone();
    let front = d.ok("StartVM", json!({"id": front}))["vm"].clone();
    let back = d.ok("Acquire", json!({"pool": "back", "timeoutMs": 240000}))["vm"].clone();
    let (front_nic, back_nic) = (nic(&front), nic(&back));
    assert!(
        front_nic["address"]
            .as_str()
            .unwrap()
            .starts_with("10.77.0."),
        "{front}"
    );
    assert!(
        back_nic["address"]
            .as_str()
            .unwrap()
            .starts_with("10.78.0."),
        "{back}"
    );
    for (n, bridge) in [(&front_nic, "kb0"), (&back_nic, "kb1")] {
        let tap = n["tap"].as_str().unwrap();
        let out = ns
            .command(&["ip", "-d", "link", "show", tap])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("master {bridge}")), "{tap}: {text}");
        assert!(pings(&ns, n["address"].as_str().unwrap()), "{n}");
    }
    // Each network its own masquerade rule: kb1 asks for one, kb0 not.
    let table = ns.nft();
    assert!(
        table.contains("10.78.0.0/24") && !table.contains("ip saddr 10.77.0.0/24"),
        "{table}"
    );
}

#[test]
fn a_bridge_configured_twice_stops_kilnd() {
    let ns = Netns::new();
    let stderr = kilnd_refuses(
        &ns,
        "[network]\nbridge = \"kb0\"\n\n[[networks]]\nbridge = \"kb0\"\nsubnet = \"10.78.0.0/24\"\n",
    );
    assert!(stderr.contains("configured twice"), "{stderr}");
}

/// The guest's `eth0` MAC and IPv4 address.
fn guest_eth0(d: &Daemon, id: &Value) -> (String, String) {
    let r = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c",
            "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0"]}),
    );
    let out = r["stdout"].as_str().unwrap_or_default().to_owned();
    let mut lines = out.lines();
    let mac = lines.next().unwrap_or_default().trim().to_owned();
    let address = lines
        .next()
        .and_then(|l| l.split_whitespace().find(|w| w.contains('/')))
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_owned();
    (mac, address)
}

/// A snapshot of a bridged VM restores, and a running bridged VM forks,
/// into VMs with their own MAC, address and TAP, each reachable, the
/// origin still reachable at its own; deleting them all leaves no TAP.
#[test]
fn bridged_restores_and_forks_get_their_own_addresses_and_are_reachable() {
    let ns = Netns::new();
    let d = daemon_in(&ns, NETWORK);
    let spec = json!({"memoryMiB": 128, "network": {"mode": "bridge"}});
    let origin = d.ok("CreateVM", json!({"name": "origin", "spec": spec}))["vm"]["id"].clone();
    let origin = d.ok("StartVM", json!({"id": origin}))["vm"].clone();
    let origin_address = nic(&origin)["address"].as_str().unwrap().to_owned();
    assert!(pings(&ns, &origin_address), "origin at {origin_address}");

    d.ok("SnapshotVM", json!({"id": origin["id"], "name": "bridged"}));
    let restored = d.ok("RestoreVM", json!({"snapshot": "bridged", "name": "again"}))["vm"].clone();
    let forks = d.ok("ForkVM", json!({"id": origin["id"], "count": 2}))["vms"]
        .as_array()
        .unwrap()
        .clone();
    let mut copies = vec![restored];
    copies.extend(forks);
    // The snapshot loaders' TAPs (kernel-named, on no bridge) went with them.
    let links = ns.links();
    assert!(
        !links.lines().any(|l| l.starts_with("tap")),
        "a loader's TAP is left: {links}"
    );

    let mut seen = vec![(
        nic(&origin)["mac"].as_str().unwrap().to_owned(),
        origin_address.clone(),
        nic(&origin)["tap"].as_str().unwrap().to_owned(),
    )];
    for vm in &copies {
        let n = nic(vm);
        let (mac, address, tap) = (
            n["mac"].as_str().unwrap().to_owned(),
            n["address"].as_str().unwrap().to_owned(),
            n["tap"].as_str().unwrap().to_owned(),
        );
        assert!(
            !seen
                .iter()
                .any(|(m, a, t)| *m == mac || *a == address || *t == tap),
            "{} shares a MAC, address or TAP: {vm} {seen:?}",
            vm["name"]
        );
        assert!(ns.links().contains(&tap), "{}", ns.links());
        // The guest was told its own: the saved machine had the origin's.
        assert_eq!(
            guest_eth0(&d, &vm["id"]),
            (mac.clone(), address.clone()),
            "{}",
            vm["name"]
        );
        assert!(pings(&ns, &address), "{} at {address}", vm["name"]);
        seen.push((mac, address, tap));
    }
    assert!(
        pings(&ns, &origin_address),
        "origin still at {origin_address}"
    );

    for vm in copies.iter().chain([&origin]) {
        d.ok("DeleteVM", json!({"id": vm["id"]}));
    }
    wait_until(Duration::from_secs(10), "every TAP gone", || {
        let links = ns.links();
        match seen.iter().find(|(_, _, tap)| links.contains(tap.as_str())) {
            Some(left) => Err(format!("{left:?} in {links}")),
            None => Ok(()),
        }
    });
}

/// A pod's namespace as a CNI `bridge` plugin leaves it: a veth `eth0`
/// with the pod's address and a default route, its peer (with the
/// gateway's address) in another namespace standing for the node's.
struct CniPod {
    pod: Netns,
    node: Netns,
}

const POD_ADDRESS: &str = "10.99.40.7";
const POD_GATEWAY: &str = "10.99.40.1";

impl CniPod {
    fn new() -> Self {
        let (pod, node) = (Netns::new(), Netns::new());
        node.sh(&[
            "ip", "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "podside",
        ]);
        node.sh(&["ip", "link", "set", "eth0", "netns", pod.name()]);
        node.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{POD_GATEWAY}/24"),
            "dev",
            "podside",
        ]);
        node.sh(&["ip", "link", "set", "podside", "up"]);
        pod.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{POD_ADDRESS}/24"),
            "dev",
            "eth0",
        ]);
        pod.sh(&["ip", "link", "set", "eth0", "up"]);
        pod.sh(&["ip", "route", "add", "default", "via", POD_GATEWAY]);
        Self { pod, node }
    }
}

#[test]
fn a_leased_clone_takes_over_a_pods_network() {
    let ns = Netns::new();
    let cni = CniPod::new();
    let mut d = Daemon::new("");
    d.kilnd.append_config(NETWORK);
    d.pool_file(
        "pods",
        "mode = \"template\"\nwarm = 1\nmax = 2\nrecycleOnExpiry = true\n[vm]\nmemoryMiB = 128\nnetwork = { mode = \"bridge\" }\n",
    );
    d.spawn_in(&ns);
    let vm = d.ok("Acquire", json!({"pool": "pods", "timeoutMs": 400000}))["vm"].clone();
    let id = vm["id"].clone();
    let bridge_address = nic(&vm)["address"].as_str().unwrap().to_owned();
    let pod = cni.pod.name();
    // Bad input changes nothing: the VM stays on the bridge.
    for (args, error) in [
        (json!({"id": id, "netns": "../etc"}), "InvalidArgument"),
        (
            json!({"id": id, "netns": pod, "interface": "a b"}),
            "InvalidArgument",
        ),
        (
            json!({"id": id, "netns": pod, "dns": ["dns.example"]}),
            "InvalidArgument",
        ),
        (
            json!({"id": id, "netns": "kiln-t-no-such-ns"}),
            "NetworkFailed",
        ),
        (
            json!({"id": id, "netns": pod, "interface": "eth9"}),
            "NetworkFailed",
        ),
        (
            json!({"id": id, "netns": pod, "interface": "lo"}),
            "NetworkFailed",
        ),
    ] {
        assert_eq!(
            d.err("JoinNetns", args.clone()),
            format!("io.kiln.Manager.{error}"),
            "{args}"
        );
    }
    let ping = ns.helper(&["--ping", &bridge_address]);
    assert!(
        ping["received"].as_u64().unwrap_or(0) >= 2,
        "still on the bridge: {ping} {vm}\n{}",
        d.log()
    );

    let joined = d.ok(
        "JoinNetns",
        json!({"id": id, "netns": pod, "dns": ["10.99.40.53"]}),
    )["vm"]
        .clone();
    let n = nic(&joined);
    let pod_mac = cni.pod.sh(&["cat", "/sys/class/net/eth0/address"]);
    assert_eq!(n["netns"], pod, "{joined}");
    assert_eq!(n["address"], POD_ADDRESS, "{joined}");
    assert_eq!(n["mac"], pod_mac.trim(), "{joined}");
    let tap = n["tap"].as_str().unwrap().to_owned();
    assert!(cni.pod.sh(&["ip", "link", "show"]).contains(&tap));
    assert!(
        !ns.sh(&["ip", "link", "show"]).contains(&tap),
        "off kilnd's bridge"
    );
    // The guest is the pod: its MAC, address, gateway, MTU and DNS.
    let eth0 = d.ok(
        "ExecVM",
        json!({"id": id, "command": ["sh", "-c",
            "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip -4 addr show eth0; cat /etc/resolv.conf"]}),
    )["stdout"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        eth0.contains(pod_mac.trim()) && eth0.contains("1400"),
        "{eth0}"
    );
    assert!(eth0.contains(&format!("{POD_ADDRESS}/24")), "{eth0}");
    assert!(eth0.contains("nameserver 10.99.40.53"), "{eth0}");
    assert_eq!(guest_default_gateway(&d, &id), "0128630A", "10.99.40.1");
    // Reachable at the pod's address from the node's side, TCP too.
    assert!(pings(&cni.node, POD_ADDRESS), "{}", d.log());
    start_echo_server(&d, &id);
    echo_until_up(&cni.node, POD_ADDRESS, "7777", "pod\n");
    // Once is enough; the bridge address went back to the pool.
    assert_eq!(
        d.err("JoinNetns", json!({"id": id, "netns": pod})),
        "io.kiln.Manager.InvalidState"
    );
    // Released with recycle, it is destroyed all the same: it cannot go
    // back to the bridge. Its TAP goes from the pod's namespace.
    d.ok("Release", json!({"id": id, "recycle": true}));
    wait_until(Duration::from_secs(30), "the pod's VM to go", || {
        let vms = d.ok("ListVMs", json!({}))["vms"].clone();
        let gone = !vms.as_array().unwrap().iter().any(|v| v["id"] == id);
        let tap_gone = !cni.pod.sh(&["ip", "link", "show"]).contains(&tap);
        (gone && tap_gone).then_some(()).ok_or(vms)
    });
    // The pod's interface is as CNI left it.
    let addr = cni.pod.sh(&["ip", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{POD_ADDRESS}/24")), "{addr}");
}
