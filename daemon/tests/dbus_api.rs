//! The real kilnd binary on a private, real `dbus-daemon`, driven with the
//! real `busctl` (and `varlinkctl` for parity), booting real QEMU VMs (TCG
//! here). `busctl` prints only an error's message, so error *names* are read
//! from a `busctl monitor` of the same bus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;

use kiln_testkit::busctl::{DbusKilnd as Kiln, Monitor, MANAGER, MANAGER_IF, NAME, POOL_IF, VM_IF};
use kiln_testkit::{api_doc_script, run_bash, varlinkctl_call};
use serde_json::{json, Value};

fn vm_changed(path: &str, prop: &'static str, value: &'static str) -> impl Fn(&Value) -> bool {
    let path = path.to_owned();
    move |m: &Value| {
        m["member"] == "PropertiesChanged"
            && m["path"] == path.as_str()
            && m["payload"]["data"][1][prop]["data"] == value
    }
}

#[test]
fn dbus_lifecycle_over_busctl() {
    let k = Kiln::start(false);
    let mut monitor = k.monitor();
    let path = k.create("web", &["vcpus", "u", "1", "memoryMiB", "u", "128"]);
    assert!(path.starts_with("/io/kiln/Kiln1/vm/"), "{path}");
    assert_eq!(k.list(), vec![path.clone()]);
    assert_eq!(k.state(&path), "created");
    assert_eq!(k.prop(&path, VM_IF, "Name"), "web");
    assert_eq!(k.prop(&path, VM_IF, "MemoryMiB"), 128);
    assert_eq!(k.prop(&path, VM_IF, "Pid"), 0);

    k.call(&path, VM_IF, "Start", &[]);
    assert_eq!(k.state(&path), "ready");
    assert!(k.prop(&path, VM_IF, "Pid").as_u64().unwrap() > 0);
    assert!(k.prop(&path, VM_IF, "ReadyAt").as_u64().unwrap() > 0);
    assert_eq!(
        k.prop(&path, VM_IF, "BootId").as_str().unwrap().len(),
        36,
        "a boot id"
    );
    // Changes are signalled, not only readable.
    monitor.find("State=ready", vm_changed(&path, "State", "ready"));

    let exec = k.call(
        &path,
        VM_IF,
        "Exec",
        &[
            "asassuu",
            "3",
            "sh",
            "-c",
            "echo hi; echo err >&2; exit 3",
            "0",
            "",
            "0",
            "0",
        ],
    );
    assert_eq!(exec, json!([3, "hi\n", "err\n", 0, false, false, false]));
    let exec = k.call(
        &path,
        VM_IF,
        "Exec",
        &["asassuu", "1", "cat", "0", "fed", "10", "0"],
    );
    assert_eq!(exec, json!([0, "fed", "", 0, false, false, false]));
    // What varlink's ExecVM tells, D-Bus tells: output cut at
    // max_output_bytes, the signal that ended the command, the timeout.
    let exec = k.call(
        &path,
        VM_IF,
        "Exec",
        &[
            "asassuu",
            "3",
            "sh",
            "-c",
            "echo 0123456789abcdefghij; sleep 30",
            "0",
            "",
            "1",
            "16",
        ],
    );
    assert_eq!(
        exec,
        json!([137, "0123456789abcdef", "", 9, true, false, true])
    );
    // D-Bus strings cannot hold NUL: a guest printing one gets U+FFFD, not
    // a message the bus refuses.
    let exec = k.call(
        &path,
        VM_IF,
        "Exec",
        &["asassuu", "2", "printf", "a\\0b", "0", "", "0", "0"],
    );
    assert_eq!(exec[1], "a\u{fffd}b");

    k.call(&path, VM_IF, "Pause", &[]);
    assert_eq!(k.state(&path), "paused");
    monitor.find("State=paused", vm_changed(&path, "State", "paused"));
    k.call_err(
        None,
        &path,
        VM_IF,
        "Exec",
        &["asassuu", "1", "true", "0", "", "0", "0"],
    );
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.InvalidState");
    k.call(&path, VM_IF, "Resume", &[]);
    assert_eq!(k.state(&path), "ready");

    k.call(&path, VM_IF, "Stop", &["u", "20"]);
    assert_eq!(k.state(&path), "stopped");
    assert_eq!(k.prop(&path, VM_IF, "Pid"), 0);

    k.call(&path, VM_IF, "Delete", &[]);
    monitor.find("InterfacesRemoved", |m| {
        m["member"] == "InterfacesRemoved" && m["payload"]["data"][0] == path.as_str()
    });
    assert!(!k.tree().contains(&path), "{}", k.tree());
    assert!(k.list().is_empty());
    k.call_err(None, &path, VM_IF, "Start", &[]);
    assert_eq!(
        monitor.error_name(),
        "org.freedesktop.DBus.Error.UnknownObject"
    );
}

#[test]
fn dbus_and_varlink_show_the_same_vms() {
    let k = Kiln::start(false);
    let mut monitor = k.monitor();
    let vm = k.varlinkctl("CreateVM", json!({"name": "x"}))["vm"].clone();
    let path = format!("/io/kiln/Kiln1/vm/{}", vm["id"].as_str().unwrap());
    let added = monitor.find("InterfacesAdded", |m| m["member"] == "InterfacesAdded");
    assert_eq!(added["path"], "/io/kiln/Kiln1");
    assert_eq!(added["payload"]["data"][0], path.as_str());
    assert_eq!(
        added["payload"]["data"][1][VM_IF]["Name"]["data"], "x",
        "{added}"
    );
    assert!(k.tree().contains(&path), "{}", k.tree());
    assert_eq!(k.prop(&path, VM_IF, "Name"), "x");
    assert_eq!(k.prop(&path, VM_IF, "Id"), vm["id"]);
    let managed = k.call(
        "/io/kiln/Kiln1",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
        &[],
    );
    assert_eq!(managed[0][&path][VM_IF]["State"]["data"], "created");

    k.call(&path, VM_IF, "Delete", &[]);
    assert_eq!(k.varlinkctl("ListVMs", json!({}))["vms"], json!([]));
    assert!(!k.tree().contains(&path));

    // And the other way round: a VM deleted over varlink leaves D-Bus.
    let path = k.create("y", &[]);
    let id = k.prop(&path, VM_IF, "Id");
    k.varlinkctl("DeleteVM", json!({"id": id}));
    monitor.find("InterfacesRemoved", |m| {
        m["member"] == "InterfacesRemoved" && m["payload"]["data"][0] == path.as_str()
    });
    assert!(k.list().is_empty());
}

#[test]
fn dbus_bad_input_gets_named_errors() {
    let k = Kiln::start(false);
    let mut monitor = k.monitor();
    let create_err = |monitor: &mut Monitor, args: &[&str]| {
        k.call_err(None, MANAGER, MANAGER_IF, "CreateVM", args);
        monitor.error_name()
    };
    let unknown_key = k.call_err(
        None,
        MANAGER,
        MANAGER_IF,
        "CreateVM",
        &["sa{sv}", "a", "1", "cpus", "u", "1"],
    );
    assert!(unknown_key.contains("cpus"), "{unknown_key}");
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.InvalidSpec");
    assert_eq!(
        create_err(&mut monitor, &["sa{sv}", "a", "1", "vcpus", "s", "two"]),
        "io.kiln.Kiln1.Error.InvalidSpec"
    );
    assert_eq!(
        create_err(&mut monitor, &["sa{sv}", "a", "1", "vcpus", "u", "0"]),
        "io.kiln.Kiln1.Error.InvalidSpec"
    );
    assert_eq!(
        create_err(&mut monitor, &["sa{sv}", "a", "1", "kernel", "s", "/nope"]),
        "io.kiln.Kiln1.Error.InvalidSpec"
    );
    assert_eq!(
        create_err(&mut monitor, &["sa{sv}", "../a", "0"]),
        "io.kiln.Kiln1.Error.InvalidName"
    );
    // Wrong signature altogether: refused by zbus before Kiln's code runs,
    // under zbus' own error name.
    assert_eq!(
        create_err(&mut monitor, &["su", "a", "1"]),
        "org.freedesktop.zbus.Error"
    );
    k.create("dup", &[]);
    assert_eq!(
        create_err(&mut monitor, &["sa{sv}", "dup", "0"]),
        "io.kiln.Kiln1.Error.AlreadyExists"
    );
    // NIC hot-plug on a VM without slots, and a NIC that does not exist;
    // ListNICs of a VM without a network is empty.
    let dup = k.list()[0].clone();
    k.call_err(None, &dup, VM_IF, "AttachNIC", &["s", ""]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.NoHotplugSlot");
    k.call_err(None, &dup, VM_IF, "AttachNIC", &["s", "not-an-address"]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.InvalidArgument");
    k.call_err(None, &dup, VM_IF, "DetachNIC", &["y", "1"]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.NoSuchNIC");
    assert_eq!(k.call(&dup, VM_IF, "ListNICs", &[])[0], json!([]));
    k.call_err(None, "/io/kiln/Kiln1/vm/000000000000", VM_IF, "Start", &[]);
    assert_eq!(
        monitor.error_name(),
        "org.freedesktop.DBus.Error.UnknownObject"
    );
    k.call_err(None, MANAGER, MANAGER_IF, "NoSuchMethod", &[]);
    assert_eq!(
        monitor.error_name(),
        "org.freedesktop.DBus.Error.UnknownMethod"
    );
    // Still serving, and nothing half-created.
    assert_eq!(k.list().len(), 1);
    assert_eq!(
        k.prop(MANAGER, MANAGER_IF, "Accel").as_str().map(str::len),
        Some(3)
    );
}

/// The `io.kiln.*` `<interface>` elements of an introspection document,
/// whitespace-normalized.
fn kiln_interfaces(xml: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<interface name=\"io.kiln.") {
        let end = rest[start..].find("</interface>").unwrap() + start + "</interface>".len();
        found.push(
            rest[start..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
        rest = &rest[end..];
    }
    found
}

#[test]
fn dbus_introspection_matches_the_committed_xml() {
    let k = Kiln::start(false);
    let path = k.create("introspected", &[]);
    // A pool that boots nothing (warm 0), for its object.
    let pool = k.call(
        MANAGER,
        MANAGER_IF,
        "CreatePool",
        &[
            "sa{sv}",
            "introspected",
            "3",
            "mode",
            "s",
            "cold",
            "warm",
            "u",
            "0",
            "max",
            "u",
            "1",
        ],
    );
    let pool = pool[0].as_str().unwrap().to_owned();
    assert_eq!(pool, "/io/kiln/Kiln1/pool/introspected");
    let dbus_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dbus");
    for (object, file) in [
        (MANAGER, "io.kiln.Kiln1.Manager.xml"),
        (path.as_str(), "io.kiln.Kiln1.VM.xml"),
        (pool.as_str(), "io.kiln.Kiln1.Pool.xml"),
        ("/io/kiln/Kiln1/gpu/renderD128", "io.kiln.Kiln1.Gpu.xml"),
    ] {
        let live = k.introspect_xml(object);
        if std::env::var_os("KILN_UPDATE_XML").is_some() {
            write_interface_xml(&dbus_dir.join(file), &live);
        }
        let committed = std::fs::read_to_string(dbus_dir.join(file)).unwrap();
        let committed = kiln_interfaces(&committed);
        assert_eq!(committed.len(), 1, "{file}");
        assert_eq!(
            kiln_interfaces(&live),
            committed,
            "live {object} differs from dbus/{file}; regenerate it with KILN_UPDATE_XML=1 cargo nextest run dbus_introspection"
        );
    }
    let gpus: Vec<String> =
        serde_json::from_value(k.call(MANAGER, MANAGER_IF, "ListGPUs", &[])[0].clone()).unwrap();
    assert_eq!(
        gpus,
        [
            "/io/kiln/Kiln1/gpu/renderD128",
            "/io/kiln/Kiln1/gpu/renderD129"
        ]
    );
    assert_eq!(
        k.prop(
            "/io/kiln/Kiln1/gpu/renderD129",
            "io.kiln.Kiln1.Gpu",
            "Vendor"
        ),
        "0x1002"
    );
    // The root carries the ObjectManager.
    assert!(k
        .introspect_xml("/io/kiln/Kiln1")
        .contains("org.freedesktop.DBus.ObjectManager"));
}

/// Write the `io.kiln.*` interface of a live introspection as a committed
/// XML file.
fn write_interface_xml(file: &Path, live: &str) {
    let start = live.find("<interface name=\"io.kiln.").unwrap();
    let end = live[start..].find("</interface>").unwrap() + start + "</interface>".len();
    let xml = format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n\
         <!-- Committed interface of kilnd; daemon/tests/dbus_api.rs checks the live\n     \
         service against it. Regenerate with KILN_UPDATE_XML=1 and that test. -->\n\
         <node>\n  {}\n</node>\n",
        &live[start..end]
    );
    std::fs::write(file, xml).unwrap();
}

/// A stand-in for polkitd: resolves the subject's bus name to a uid like
/// polkitd does and authorizes uid 0 only. Records what it was asked.
struct FakeAuthority {
    conn: std::sync::OnceLock<zbus::Connection>,
    asked: std::sync::Arc<std::sync::Mutex<Vec<(String, u32, String)>>>,
}

#[zbus::interface(name = "org.freedesktop.PolicyKit1.Authority")]
impl FakeAuthority {
    async fn check_authorization(
        &self,
        subject: zbus_polkit::policykit1::Subject,
        action_id: String,
        _details: HashMap<String, String>,
        _flags: u32,
        _cancellation_id: String,
    ) -> zbus::fdo::Result<zbus_polkit::policykit1::AuthorizationResult> {
        let name: String = subject
            .subject_details
            .get("name")
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
            .ok_or_else(|| zbus::fdo::Error::InvalidArgs("subject without a bus name".into()))?;
        let conn = self.conn.get().unwrap();
        let uid = zbus::fdo::DBusProxy::new(conn)
            .await?
            .get_connection_unix_user(
                zbus::names::BusName::try_from(name.as_str()).map_err(zbus::Error::from)?,
            )
            .await?;
        self.asked
            .lock()
            .unwrap()
            .push((subject.subject_kind.clone(), uid, action_id));
        Ok(zbus_polkit::policykit1::AuthorizationResult {
            is_authorized: uid == 0,
            is_challenge: false,
            details: HashMap::new(),
        })
    }
}

#[test]
fn dbus_polkit_decides_for_the_caller() {
    let k = Kiln::start(true);
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let authority = FakeAuthority {
        conn: std::sync::OnceLock::new(),
        asked: asked.clone(),
    };
    let _polkit = runtime.block_on(async {
        let conn = zbus::connection::Builder::address(k.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        authority.conn.set(conn.clone()).unwrap();
        conn.object_server()
            .at("/org/freedesktop/PolicyKit1/Authority", authority)
            .await
            .unwrap();
        conn.request_name("org.freedesktop.PolicyKit1")
            .await
            .unwrap();
        conn
    });
    let mut monitor = k.monitor();
    let nobody = Some(65534);

    // Root: allowed by the authority.
    let path = k.create("guarded", &[]);
    // nobody: may read, may not change.
    let out = k.busctl_as(nobody, &["call", NAME, MANAGER, MANAGER_IF, "ListVMs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&path));
    let out = k.busctl_as(nobody, &["get-property", NAME, &path, VM_IF, "State"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = k.call_err(
        nobody,
        MANAGER,
        MANAGER_IF,
        "CreateVM",
        &["sa{sv}", "intruder", "0"],
    );
    assert!(refused.contains("io.kiln.manage"), "{refused}");
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.PermissionDenied");
    k.call_err(nobody, &path, VM_IF, "Delete", &[]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.PermissionDenied");
    assert_eq!(k.list(), vec![path.clone()]);

    // Every decision was asked about the calling bus name (never kilnd's
    // own process): root once, nobody twice.
    let asked = asked.lock().unwrap().clone();
    let uids: Vec<u32> = asked.iter().map(|(_, uid, _)| *uid).collect();
    assert_eq!(uids, vec![0, 65534, 65534], "{asked:?}");
    assert!(asked
        .iter()
        .all(|(kind, _, action)| kind == "system-bus-name" && action == "io.kiln.manage"));
}

/// The D-Bus examples of docs/api.md run verbatim against this daemon.
#[test]
fn dbus_api_doc_examples_run() {
    let kiln = Kiln::start(false);
    let script = api_doc_script(
        "## D-Bus",
        &[(
            "busctl --system",
            format!("busctl --address={}", kiln.address),
        )],
    );
    let stdout = run_bash(&script, &kiln.log());
    assert!(
        stdout.contains("s \"ready\""),
        "State property example output: {stdout}"
    );
    assert!(kiln.list().is_empty(), "the example deletes its VM");
}

#[test]
fn dbus_pools_acquire_and_release() {
    let k = Kiln::start(false);
    let mut monitor = k.monitor();
    let pool = k.call(
        MANAGER,
        MANAGER_IF,
        "CreatePool",
        &[
            "sa{sv}",
            "bus",
            "4",
            "mode",
            "s",
            "template",
            "warm",
            "u",
            "1",
            "max",
            "u",
            "2",
            "vm",
            "a{sv}",
            "1",
            "memoryMiB",
            "u",
            "128",
        ],
    )[0]
    .as_str()
    .unwrap()
    .to_owned();
    assert_eq!(pool, "/io/kiln/Kiln1/pool/bus");
    // The pool object's counts follow the engine, with PropertiesChanged.
    monitor.find("Hot=1", |m: &Value| {
        m["member"] == "PropertiesChanged"
            && m["path"] == "/io/kiln/Kiln1/pool/bus"
            && m["payload"]["data"][1]["Hot"]["data"] == 1
    });
    assert_eq!(k.prop(&pool, POOL_IF, "Mode"), "template");
    assert_eq!(k.prop(&pool, POOL_IF, "TemplateReady"), true);
    let listed: Vec<String> =
        serde_json::from_value(k.call(MANAGER, MANAGER_IF, "ListPools", &[])[0].clone()).unwrap();
    assert_eq!(listed, vec![pool.clone()]);

    let vm = k.call(
        MANAGER,
        MANAGER_IF,
        "Acquire",
        &[
            "sa{sv}",
            "bus",
            "2",
            "timeoutMs",
            "t",
            "120000",
            "labels",
            "a{ss}",
            "1",
            "job",
            "7",
        ],
    )[0]
    .as_str()
    .unwrap()
    .to_owned();
    assert_eq!(k.state(&vm), "leased");
    assert_eq!(k.prop(&vm, VM_IF, "Pool"), "bus");
    let holder = k.prop(&vm, VM_IF, "LeasedBy");
    assert!(
        holder.as_str().unwrap().starts_with("uid:0 dbus:"),
        "{holder}"
    );
    let out = k.call(
        &vm,
        VM_IF,
        "Exec",
        &["asassuu", "1", "hostname", "0", "", "30", "0"],
    );
    assert_eq!(out[0], 0);
    // varlink sees the same lease.
    let id = vm.rsplit('/').next().unwrap();
    let described = k.varlinkctl("DescribeVM", json!({ "id": id }));
    assert_eq!(described["vm"]["labels"]["job"], "7");

    let err = k.call_err(
        None,
        MANAGER,
        MANAGER_IF,
        "Acquire",
        &["sa{sv}", "nope", "0"],
    );
    assert!(err.contains("no pool named"), "{err}");
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.NoSuchPool");

    k.call(MANAGER, MANAGER_IF, "Release", &["ob", &vm, "false"]);
    assert!(!k.list().contains(&vm));
    k.call(MANAGER, MANAGER_IF, "DeletePool", &["s", "bus"]);
    k.wait_tree("pool object gone", |t| {
        !t.contains("/io/kiln/Kiln1/pool/bus")
    });
}

/// Issue 13's bug: a leased VM that was paused and resumed, or rebooted,
/// showed `ready` while it still held its lease. On both transports it is
/// `leased` after each of them, and no other Acquire ever gets it.
#[test]
fn leased_vms_stay_leased_through_pause_resume_and_reboot() {
    let k = Kiln::start(false);
    k.varlinkctl(
        "CreatePool",
        json!({ "name": "held", "spec": {
            "mode": "template", "warm": 1, "max": 3, "vm": { "memoryMiB": 128 } } }),
    );
    let acquire_varlink =
        || k.varlinkctl("Acquire", json!({ "pool": "held", "timeoutMs": 240000 }))["vm"].clone();

    // Over varlink: each reply and DescribeVM say `leased`.
    let a = acquire_varlink();
    let a_id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(a["state"], "leased");
    let id = json!({ "id": a_id });
    assert_eq!(k.varlinkctl("PauseVM", id.clone())["vm"]["state"], "paused");
    assert_eq!(
        k.varlinkctl("ResumeVM", id.clone())["vm"]["state"],
        "leased"
    );
    assert_eq!(
        k.varlinkctl("RebootVM", id.clone())["vm"]["state"],
        "leased"
    );
    let described = k.varlinkctl("DescribeVM", id.clone())["vm"].clone();
    assert_eq!(described["state"], "leased");
    assert_eq!(described["leasedBy"], a["leasedBy"]);

    // Over D-Bus: the State property says `leased` after each call.
    let b = k.call(
        MANAGER,
        MANAGER_IF,
        "Acquire",
        &["sa{sv}", "held", "1", "timeoutMs", "t", "240000"],
    )[0]
    .as_str()
    .unwrap()
    .to_owned();
    assert_eq!(k.state(&b), "leased");
    k.call(&b, VM_IF, "Pause", &[]);
    assert_eq!(k.state(&b), "paused");
    k.call(&b, VM_IF, "Resume", &[]);
    assert_eq!(k.state(&b), "leased");
    k.call(&b, VM_IF, "Reboot", &[]);
    assert_eq!(k.state(&b), "leased");

    // The third Acquire gets a third VM, and with max reached the pool is
    // exhausted: neither leased VM was handed out again.
    let b_id = b.rsplit('/').next().unwrap().to_owned();
    let c = acquire_varlink();
    let c_id = c["id"].as_str().unwrap();
    assert!(
        c_id != a_id && c_id != b_id,
        "a held VM was handed out again"
    );
    let refused = varlinkctl_call(
        None,
        &k.kilnd.varlink_address(),
        "io.kiln.Manager.Acquire",
        &json!({ "pool": "held", "timeoutMs": 1000 }).to_string(),
    );
    let error = format!("{refused:?}");
    assert!(error.contains("PoolExhausted"), "{error}");
    let pool = k.varlinkctl("DescribePool", json!({ "name": "held" }))["pool"].clone();
    assert_eq!(pool["leased"], 3, "{pool}");

    // Lease lifetimes on D-Bus: Renew on the VM object sets a deadline
    // (LeaseExpiresAt), and its expiry is the Manager's LeaseExpired signal.
    let mut monitor = k.monitor();
    assert_eq!(k.prop(&b, VM_IF, "LeaseExpiresAt"), 0);
    k.call(&b, VM_IF, "Renew", &["u", "2"]);
    assert!(k.prop(&b, VM_IF, "LeaseExpiresAt").as_u64().unwrap() > 0);
    let signal = monitor.find("LeaseExpired", |m: &Value| {
        m["member"] == "LeaseExpired" && m["path"] == MANAGER
    });
    assert_eq!(signal["payload"]["data"][0], b.as_str(), "{signal}");
    k.wait_tree("the expired VM gone", |t| !t.contains(&b));

    // releaseOnDisconnect: busctl's unique name leaves the bus when it
    // exits, and the lease ends with it.
    let bound = k.call(
        MANAGER,
        MANAGER_IF,
        "Acquire",
        &[
            "sa{sv}",
            "held",
            "2",
            "timeoutMs",
            "t",
            "240000",
            "releaseOnDisconnect",
            "b",
            "true",
        ],
    )[0]
    .as_str()
    .unwrap()
    .to_owned();
    k.wait_tree("the VM of a caller that left gone", |t| !t.contains(&bound));
}
