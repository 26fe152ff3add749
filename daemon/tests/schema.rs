//! The committed varlink IDLs against a real validator and the live service:
//! systemd's `varlinkctl validate-idl` accepts both (and refuses a broken
//! one), the manager's IDL declares exactly the engine's error names, kilnd
//! serves exactly the committed IDL, and every reply a real kilnd sends
//! (methods, a `more` stream, errors) has the types the IDL declares, as
//! checked by the small IDL type checker below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use kiln_engine::error::ErrorName;
use kiln_testkit::oci::{oci_archive, two_layers};
use kiln_testkit::{command_as, Registry};
use serde_json::{json, Value};

const MANAGER_IDL: &str = "varlink/io.kiln.Manager.varlink";
const AGENT_IDL: &str = "guest/io.kiln.Agent.varlink";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap()
}

fn validate_idl(file: &Path) -> Output {
    Command::new("varlinkctl")
        .args(["validate-idl", "--no-pager"])
        .arg(file)
        .output()
        .unwrap()
}

/// Both committed IDLs pass systemd's parser; a broken one does not (so
/// this is a validator, not a pretty-printer that accepts anything).
#[test]
fn committed_idls_pass_systemds_validator() {
    for file in [MANAGER_IDL, AGENT_IDL] {
        let out = validate_idl(&repo(file));
        assert!(
            out.status.success(),
            "varlinkctl validate-idl {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.varlink");
    // An enum value that is not a varlink identifier.
    let text = format!(
        "{}\nmethod Broken(display: ?(none, virtio-gpu)) -> ()\n",
        read(MANAGER_IDL)
    );
    std::fs::write(&broken, text).unwrap();
    assert!(!validate_idl(&broken).status.success());
}

/// The IDL declares every error the engine and the adapters can name, and
/// nothing else.
#[test]
fn idl_declares_exactly_the_error_names() {
    let idl = Idl::parse(&read(MANAGER_IDL));
    let declared: BTreeSet<&str> = idl.errors.keys().map(String::as_str).collect();
    let names: BTreeSet<&str> = ErrorName::ALL.iter().map(|n| n.as_str()).collect();
    assert_eq!(declared, names);
}

/// The served IDL is the committed one, as systemd's parser reads it (a
/// description `varlinkctl introspect` cannot parse comes out verbatim and
/// would differ from the validator's rendering).
#[test]
fn kilnd_serves_the_committed_idl() {
    let kilnd = Kilnd::start();
    let introspected = Command::new("varlinkctl")
        .args([
            "introspect",
            "--no-pager",
            &kilnd.address(),
            "io.kiln.Manager",
        ])
        .output()
        .unwrap();
    assert!(introspected.status.success(), "{}", kilnd.log());
    let validated = validate_idl(&repo(MANAGER_IDL));
    assert!(validated.status.success());
    assert_eq!(
        String::from_utf8_lossy(&introspected.stdout),
        String::from_utf8_lossy(&validated.stdout)
    );
    // The other interface kilnd serves parses too.
    let mut conn = Conn::open(&kilnd.socket());
    let service = conn.call(
        "org.varlink.service.GetInterfaceDescription",
        json!({"interface": "org.varlink.service"}),
    );
    let file = kilnd.fixture.dir.path().join("org.varlink.service.varlink");
    std::fs::write(
        &file,
        service["parameters"]["description"].as_str().unwrap(),
    )
    .unwrap();
    assert!(validate_idl(&file).status.success());
}

/// The checker is strict: what the IDL does not declare is reported.
#[test]
fn the_type_checker_refuses_what_the_idl_does_not_declare() {
    let idl = Idl::parse(&read(MANAGER_IDL));
    let good = json!({"pool": {"name": "p", "mode": "cold", "warm": 0, "max": 1,
        "refillConcurrency": 2, "recycleOnExpiry": false, "state": "ready", "hot": 0,
        "booting": 0, "leased": 0,
        "failed": 0, "waiting": 0, "templateReady": false, "source": "/x",
        "vm": {"vcpus": null, "display": "none"}}});
    assert_eq!(idl.check_reply("DescribePool", &good), Vec::<String>::new());
    let mut extra = good.clone();
    extra["pool"]["colour"] = json!("red");
    let mut missing = good.clone();
    missing["pool"].as_object_mut().unwrap().remove("hot");
    let mut wrong = good.clone();
    wrong["pool"]["warm"] = json!("0");
    let mut null_required = good.clone();
    null_required["pool"]["max"] = Value::Null;
    let mut bad_enum = good.clone();
    bad_enum["pool"]["vm"]["accel"] = json!("hvf");
    let mut float = good.clone();
    float["pool"]["hot"] = json!(0.5);
    for bad in [extra, missing, wrong, null_required, bad_enum, float] {
        assert_eq!(idl.check_reply("DescribePool", &bad).len(), 1, "{bad}");
    }
    assert_eq!(
        idl.check_error("NoSuchVM", &json!({"message": "x"})).len(),
        2,
        "undeclared message, missing id"
    );
    assert!(!idl.check_error("NoSuchThing", &json!({})).is_empty());
}

/// Every reply of a representative run (one VM boot) matches the IDL.
#[test]
fn every_reply_matches_the_idl() {
    let kilnd = Kilnd::start();
    let mut run = Run::new(&kilnd);

    // The service interface, and a watcher that records every event.
    run.ok("org.varlink.service.GetInfo", json!({}));
    for interface in ["io.kiln.Manager", "org.varlink.service"] {
        run.ok(
            "org.varlink.service.GetInterfaceDescription",
            json!({ "interface": interface }),
        );
    }
    run.err(
        "org.varlink.service.GetInterfaceDescription",
        json!({"interface": "io.kiln.Nope"}),
    );
    let watch = Watch::start(&kilnd);
    run.ok("io.kiln.Manager.GetStatus", json!({}));
    run.ok("io.kiln.Manager.ListVMs", json!({}));
    run.ok("io.kiln.Manager.ListPools", json!({}));
    let gpus = run.ok("io.kiln.Manager.ListGPUs", json!({}));
    assert_eq!(gpus["gpus"].as_array().unwrap().len(), 2, "{gpus}");

    // A VM through its life: created, booted, exec'd, paused, stopped.
    let vm = run.ok(
        "io.kiln.Manager.CreateVM",
        json!({"name": "schema", "spec": {"vcpus": 1, "memoryMiB": 128, "display": "none"}}),
    );
    let id = vm["vm"]["id"].as_str().unwrap().to_owned();
    run.ok("io.kiln.Manager.DescribeVM", json!({ "id": id }));
    run.ok("io.kiln.Manager.ListNICs", json!({ "id": id }));
    let started = run.ok("io.kiln.Manager.StartVM", json!({ "id": id }));
    assert_eq!(started["vm"]["state"], "ready", "{started}");
    assert!(
        started["vm"]["pid"].is_u64(),
        "the optional fields of a running VM are checked too"
    );
    run.ok("io.kiln.Manager.ListVMs", json!({}));
    run.ok(
        "io.kiln.Manager.ExecVM",
        json!({"id": id, "command": ["echo", "hi"]}),
    );
    let killed = run.ok(
        "io.kiln.Manager.ExecVM",
        json!({"id": id, "command": ["sh", "-c", "head -c 64 /dev/zero; kill -9 $$"],
               "maxOutputBytes": 16, "timeoutSec": 30}),
    );
    assert_eq!(
        (&killed["signal"], &killed["stdoutTruncated"]),
        (&json!(9), &json!(true)),
        "{killed}"
    );
    run.ok("io.kiln.Manager.PauseVM", json!({ "id": id }));
    run.err(
        "io.kiln.Manager.ExecVM",
        json!({"id": id, "command": ["true"]}),
    );
    run.ok("io.kiln.Manager.ResumeVM", json!({ "id": id }));
    run.ok(
        "io.kiln.Manager.StopVM",
        json!({"id": id, "timeoutSec": 20}),
    );
    run.ok("io.kiln.Manager.DescribeVM", json!({ "id": id }));

    // Pools (cold and empty: nothing boots).
    run.ok(
        "io.kiln.Manager.CreatePool",
        json!({"name": "schema", "spec": {"mode": "cold", "warm": 0, "max": 1}}),
    );
    run.ok("io.kiln.Manager.DescribePool", json!({"name": "schema"}));
    run.ok(
        "io.kiln.Manager.ResizePool",
        json!({"name": "schema", "warm": 0, "max": 2}),
    );
    run.ok("io.kiln.Manager.ListPools", json!({}));

    // Errors, each with its declared parameters.
    for (method, params) in [
        ("DescribeVM", json!({"id": "000000000000"})),
        ("CreateVM", json!({"name": "schema"})),
        ("CreateVM", json!({"name": "../x"})),
        ("CreateVM", json!({"name": "x", "spec": {"vcpus": 0}})),
        ("CreateVM", json!({"name": 5})),
        ("ExecVM", json!({"id": id, "command": ["true"]})),
        ("ExecVM", json!({"id": id, "command": []})),
        ("DescribePool", json!({"name": "nope"})),
        ("Acquire", json!({"pool": "nope"})),
        (
            "CreatePool",
            json!({"name": "p", "spec": {"warm": 3, "max": 1}}),
        ),
        ("Watch", json!({})),
        ("NoSuchMethod", json!({})),
    ] {
        run.err(&format!("io.kiln.Manager.{method}"), params);
    }
    // `display` is a string in the IDL (its values are not identifiers);
    // kilnd takes only the two it documents.
    assert_eq!(
        run.err(
            "io.kiln.Manager.CreateVM",
            json!({"name": "x", "spec": {"display": "vga"}}),
        ),
        "org.varlink.service.InvalidParameter"
    );
    // A caller without rights, through the real client: varlinkctl prints
    // the error's parameters on stdout and its name on stderr.
    let out = command_as(Some(65534), "varlinkctl")
        .args([
            "call",
            "--json=short",
            &kilnd.address(),
            "io.kiln.Manager.CreateVM",
            r#"{"name": "intruder"}"#,
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("io.kiln.Manager.PermissionDenied"));
    let parameters: Value = serde_json::from_slice(&out.stdout).unwrap();
    run.record_error("PermissionDenied", &parameters);

    run.ok("io.kiln.Manager.DeletePool", json!({"name": "schema"}));
    run.ok("io.kiln.Manager.DeleteVM", json!({ "id": id }));

    // The stream: every event up to the VM's removal.
    let events = watch.until(|e| e["event"]["type"] == "vmRemoved" && e["event"]["id"] == id);
    for event in &events {
        run.check("io.kiln.Manager.Watch", event);
    }
    let types: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["parameters"]["event"]["type"].as_str())
        .collect();

    assert_eq!(run.problems, Vec::<String>::new(), "{}", kilnd.log());
    // What was covered, so the checks above cannot have checked nothing.
    for method in [
        "GetStatus",
        "ListVMs",
        "CreateVM",
        "DescribeVM",
        "StartVM",
        "ExecVM",
        "PauseVM",
        "ResumeVM",
        "StopVM",
        "DeleteVM",
        "ListNICs",
        "CreatePool",
        "DescribePool",
        "ResizePool",
        "ListPools",
        "DeletePool",
        "ListGPUs",
        "Watch",
    ] {
        assert!(run.replied.contains(method), "no {method} reply checked");
    }
    for name in [
        "io.kiln.Manager.NoSuchVM",
        "io.kiln.Manager.AlreadyExists",
        "io.kiln.Manager.InvalidName",
        "io.kiln.Manager.InvalidSpec",
        "io.kiln.Manager.InvalidState",
        "io.kiln.Manager.InvalidArgument",
        "io.kiln.Manager.NoSuchPool",
        "io.kiln.Manager.PermissionDenied",
        "org.varlink.service.InvalidParameter",
        "org.varlink.service.MethodNotFound",
        "org.varlink.service.ExpectedMore",
        "org.varlink.service.InterfaceNotFound",
    ] {
        assert!(
            run.errors.contains(name),
            "no {name} checked: {:?}",
            run.errors
        );
    }
    for kind in [
        "ready",
        "vmAdded",
        "vmChanged",
        "vmRemoved",
        "poolChanged",
        "poolRemoved",
    ] {
        assert!(types.contains(kind), "no {kind} event: {types:?}");
    }
}

/// Every reply of the image methods (a pull's `more` stream, an import
/// with and without `more`, list, describe, remove, their errors) and the
/// image events match the IDL. A real registry on 127.0.0.1 holds the
/// image.
#[test]
fn image_replies_match_the_idl() {
    let registry = Registry::start();
    let (layout, _) = two_layers();
    registry.push(layout.path(), "v1", "app:v1", false);
    let kilnd = Kilnd::start_with(&format!(
        "image_insecure_registries = [\"{}\"]\n",
        registry.host()
    ));
    let mut run = Run::new(&kilnd);
    let watch = Watch::start(&kilnd);
    let app = registry.reference("app:v1");

    let pulled = run.more("io.kiln.Manager.PullImage", json!({ "reference": app }));
    assert!(pulled.len() > 2, "progress, then the image: {pulled:#?}");
    let digest = pulled.last().unwrap()["parameters"]["image"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    run.ok("io.kiln.Manager.PullImage", json!({ "reference": app }));
    run.ok("io.kiln.Manager.ListImages", json!({}));
    run.ok("io.kiln.Manager.DescribeImage", json!({ "image": digest }));
    let archive = kilnd.fixture.dir.path().join("app.tar");
    oci_archive(layout.path(), "v1", &archive);
    let import = json!({"path": archive, "reference": "localhost/app:schema"});
    run.more("io.kiln.Manager.ImportImage", import.clone());
    run.ok("io.kiln.Manager.ImportImage", import);
    run.ok(
        "io.kiln.Manager.RemoveImage",
        json!({"image": "localhost/app:schema"}),
    );
    run.ok("io.kiln.Manager.RemoveImage", json!({ "image": digest }));
    for (method, params) in [
        ("DescribeImage", json!({ "image": app })),
        ("PullImage", json!({"reference": "no spaces"})),
        (
            "PullImage",
            json!({"reference": registry.reference("nope:v1")}),
        ),
        ("ImportImage", json!({"path": "/nonexistent.tar"})),
    ] {
        run.err(&format!("io.kiln.Manager.{method}"), params);
    }
    // An error at the end of a `more` stream too.
    run.more(
        "io.kiln.Manager.PullImage",
        json!({"reference": "no spaces"}),
    );

    let events = watch.until(|e| e["event"]["type"] == "imageRemoved");
    for event in &events {
        run.check("io.kiln.Manager.Watch", event);
    }
    assert_eq!(run.problems, Vec::<String>::new(), "{}", kilnd.log());
    for method in [
        "PullImage",
        "ImportImage",
        "ListImages",
        "DescribeImage",
        "RemoveImage",
    ] {
        assert!(run.replied.contains(method), "no {method} reply checked");
    }
    for error in ["ImageNotFound", "InvalidArgument", "ImagePullFailed"] {
        let name = format!("io.kiln.Manager.{error}");
        assert!(run.errors.contains(&name), "no {name}: {:?}", run.errors);
    }
    let types: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["parameters"]["event"]["type"].as_str())
        .collect();
    assert!(
        types.contains("imageAdded") && types.contains("imageRemoved"),
        "{types:?}"
    );
}

// --- A kilnd to talk to ------------------------------------------------------

#[test]
fn container_replies_match_the_idl() {
    let kilnd = Kilnd::start_with("");
    let mut run = Run::new(&kilnd);
    let layout = kiln_testkit::oci::one_image(&[kiln_testkit::oci::busybox_layer()], "v1");
    let digest = run.ok(
        "io.kiln.Manager.ImportImage",
        json!({"path": layout.path(), "reference": "kiln.test/schema:v1"}),
    )["image"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let vm = run.ok(
        "io.kiln.Manager.CreateVM",
        json!({"name": "c", "spec": {"image": digest, "entrypoint": ["/bin/sh", "-c"],
               "command": ["echo up; exec /bin/busybox sleep 100000"], "storageMiB": 16}}),
    );
    let id = vm["vm"]["id"].as_str().unwrap().to_owned();
    run.ok("io.kiln.Manager.StartVM", json!({ "id": id }));
    run.ok(
        "io.kiln.Manager.ExecVM",
        json!({"id": id, "container": "main", "command": ["/bin/sh", "-c", "echo in"]}),
    );
    run.ok(
        "io.kiln.Manager.AddContainer",
        json!({"id": id, "spec": {"name": "two", "image": digest, "command": ["-c", "echo two"]}}),
    );
    run.ok("io.kiln.Manager.ListContainers", json!({ "id": id }));
    run.ok(
        "io.kiln.Manager.ContainerLogs",
        json!({"id": id, "name": "main", "maxBytes": 3}),
    );
    run.more(
        "io.kiln.Manager.ContainerLogs",
        json!({"id": id, "name": "two"}),
    );
    run.ok("io.kiln.Manager.DescribeVM", json!({ "id": id }));
    for (method, params) in [
        (
            "AddContainer",
            json!({"id": id, "spec": {"name": "two", "image": digest}}),
        ),
        (
            "AddContainer",
            json!({"id": id, "spec": {"name": "x", "image": digest,
                                 "entrypoint": ["/missing"]}}),
        ),
        ("RemoveContainer", json!({"id": id, "name": "nope"})),
        ("ContainerLogs", json!({"id": id, "name": "nope"})),
        (
            "AddContainer",
            json!({"id": id, "spec": {"name": "x", "image": "kiln.test/none:1"}}),
        ),
    ] {
        run.err(&format!("io.kiln.Manager.{method}"), params);
    }
    run.ok(
        "io.kiln.Manager.RemoveContainer",
        json!({"id": id, "name": "two"}),
    );
    run.ok("io.kiln.Manager.DeleteVM", json!({ "id": id }));
    assert_eq!(run.problems, Vec::<String>::new(), "{}", kilnd.log());
    for method in [
        "AddContainer",
        "ListContainers",
        "ContainerLogs",
        "RemoveContainer",
    ] {
        assert!(run.replied.contains(method), "no {method} reply checked");
    }
    for error in [
        "ContainerExists",
        "ContainerStartFailed",
        "NoSuchContainer",
        "ImageNotFound",
    ] {
        let name = format!("io.kiln.Manager.{error}");
        assert!(run.errors.contains(&name), "no {name}: {:?}", run.errors);
    }
}

/// kilnd without D-Bus, with two render nodes in a fake sysfs (so the GPU
/// type has values to check).
struct Kilnd {
    fixture: kiln_testkit::Kilnd,
}

impl Kilnd {
    fn start() -> Self {
        Self::start_with("")
    }

    fn start_with(extra_config: &str) -> Self {
        let mut fixture = kiln_testkit::Kilnd::new(&format!("dbus = \"none\"\n{extra_config}"));
        fixture.add_fake_gpus();
        let socket = fixture.dir.path().join("varlink");
        fixture.spawn(|_| UnixStream::connect(&socket).is_ok());
        Self { fixture }
    }

    fn socket(&self) -> PathBuf {
        self.fixture.dir.path().join("varlink")
    }

    fn address(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn log(&self) -> String {
        self.fixture.log()
    }
}

/// A varlink connection of our own: the replies exactly as kilnd sent
/// them, before any client interprets them.
struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        // A VM boot under TCG takes seconds; a hang fails the test.
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, method: &str, parameters: Value, more: bool) {
        let mut call = json!({"method": method, "parameters": parameters});
        if more {
            call["more"] = json!(true);
        }
        let mut bytes = serde_json::to_vec(&call).unwrap();
        bytes.push(0);
        self.reader.get_mut().write_all(&bytes).unwrap();
    }

    fn receive(&mut self) -> Value {
        self.try_receive().expect("kilnd closed the connection")
    }

    /// The next reply, or None once kilnd closed the connection.
    fn try_receive(&mut self) -> Option<Value> {
        let mut bytes = Vec::new();
        self.reader.read_until(0, &mut bytes).ok()?;
        (bytes.pop() == Some(0)).then(|| serde_json::from_slice(&bytes).unwrap())
    }

    fn call(&mut self, method: &str, parameters: Value) -> Value {
        self.send(method, parameters, false);
        self.receive()
    }
}

/// `Watch` on a connection of its own, its replies collected by a thread.
struct Watch {
    replies: mpsc::Receiver<Value>,
}

impl Watch {
    fn start(kilnd: &Kilnd) -> Self {
        let mut conn = Conn::open(&kilnd.socket());
        conn.send("io.kiln.Manager.Watch", json!({}), true);
        let first = conn.receive();
        assert_eq!(first["parameters"]["event"]["type"], "ready", "{first}");
        let (tx, replies) = mpsc::channel();
        tx.send(first).unwrap();
        std::thread::spawn(move || {
            // Ends when the test drops the receiver or kilnd goes away.
            while let Some(reply) = conn.try_receive() {
                if tx.send(reply).is_err() {
                    return;
                }
            }
        });
        Self { replies }
    }

    /// Every reply up to and including the first that `last` accepts.
    fn until(&self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let reply = self
                .replies
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the stream ended early: {seen:#?}"));
            let done = last(&reply["parameters"]);
            seen.push(reply);
            if done {
                return seen;
            }
        }
    }
}

/// Calls that check each reply against the IDLs and remember what was
/// covered.
struct Run {
    conn: Conn,
    manager: Idl,
    service: Idl,
    problems: Vec<String>,
    replied: BTreeSet<String>,
    errors: BTreeSet<String>,
}

impl Run {
    fn new(kilnd: &Kilnd) -> Self {
        let mut conn = Conn::open(&kilnd.socket());
        // The service interface's IDL as kilnd serves it (validated by
        // systemd in `kilnd_serves_the_committed_idl`).
        let service = conn.call(
            "org.varlink.service.GetInterfaceDescription",
            json!({"interface": "org.varlink.service"}),
        );
        let service = Idl::parse(service["parameters"]["description"].as_str().unwrap());
        Self {
            conn,
            manager: Idl::parse(&read(MANAGER_IDL)),
            service,
            problems: Vec::new(),
            replied: BTreeSet::new(),
            errors: BTreeSet::new(),
        }
    }

    /// A call that must succeed; its reply's parameters.
    fn ok(&mut self, method: &str, parameters: Value) -> Value {
        let reply = self.conn.call(method, parameters.clone());
        assert!(
            reply.get("error").is_none(),
            "{method} {parameters}: {reply}"
        );
        self.check(method, &reply);
        reply["parameters"].clone()
    }

    /// A call with `more`: every reply up to the last (the one without
    /// `continues`, or an error), each checked.
    fn more(&mut self, method: &str, parameters: Value) -> Vec<Value> {
        self.conn.send(method, parameters, true);
        let mut replies = Vec::new();
        loop {
            let reply = self.conn.receive();
            self.check(method, &reply);
            let last = reply["continues"] != true;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// A call that must fail; the error's name.
    fn err(&mut self, method: &str, parameters: Value) -> String {
        let reply = self.conn.call(method, parameters.clone());
        let Some(name) = reply["error"].as_str().map(str::to_owned) else {
            panic!("{method} {parameters}: {reply}");
        };
        self.check(method, &reply);
        name
    }

    /// Check one reply to `method` (`interface.Method`).
    fn check(&mut self, method: &str, reply: &Value) {
        let context = format!("{method} → {reply}");
        let Some(object) = reply.as_object() else {
            return self.problems.push(format!("{context}: not an object"));
        };
        for key in object.keys() {
            if !["parameters", "continues", "error"].contains(&key.as_str()) {
                self.problems.push(format!("{context}: unknown key {key}"));
            }
        }
        let parameters = reply.get("parameters").cloned().unwrap_or(json!({}));
        let problems = if let Some(error) = reply["error"].as_str() {
            self.errors.insert(error.to_owned());
            match error.rsplit_once('.') {
                Some(("io.kiln.Manager", name)) => self.manager.check_error(name, &parameters),
                Some(("org.varlink.service", name)) => self.service.check_error(name, &parameters),
                _ => vec![format!("undeclared error {error}")],
            }
        } else {
            match method.rsplit_once('.') {
                Some(("io.kiln.Manager", name)) => {
                    self.replied.insert(name.to_owned());
                    self.manager.check_reply(name, &parameters)
                }
                Some(("org.varlink.service", name)) => self.service.check_reply(name, &parameters),
                _ => vec![format!("reply to an unknown method {method}")],
            }
        };
        self.problems
            .extend(problems.into_iter().map(|p| format!("{context}: {p}")));
    }

    /// An error reply seen through another client.
    fn record_error(&mut self, name: &str, parameters: &Value) {
        self.errors.insert(format!("io.kiln.Manager.{name}"));
        let problems = self.manager.check_error(name, parameters);
        self.problems.extend(
            problems
                .into_iter()
                .map(|p| format!("{name} {parameters}: {p}")),
        );
    }
}

// --- The IDL and its types -------------------------------------------------

/// A varlink type.
#[derive(Debug, Clone)]
enum Type {
    Bool,
    Int,
    Float,
    String,
    Object,
    Nullable(Box<Type>),
    Array(Box<Type>),
    Map(Box<Type>),
    Enum(Vec<String>),
    Struct(Vec<(String, Type)>),
    Named(String),
}

/// What an interface description declares.
#[derive(Debug)]
struct Idl {
    types: BTreeMap<String, Type>,
    /// Method → (input, output).
    methods: BTreeMap<String, (Type, Type)>,
    errors: BTreeMap<String, Type>,
}

/// The IDL's tokens: words, punctuation and `->`, comments dropped.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut chars = line.split('#').next().unwrap().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                c if c.is_whitespace() => {}
                '-' if chars.peek() == Some(&'>') => {
                    chars.next();
                    out.push("->".to_owned());
                }
                '(' | ')' | ',' | ':' | '?' | '[' | ']' => out.push(c.to_string()),
                c => {
                    let mut word = c.to_string();
                    while let Some(&next) = chars.peek() {
                        if next.is_ascii_alphanumeric() || next == '_' || next == '.' {
                            word.push(next);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    out.push(word);
                }
            }
        }
    }
    out
}

struct Parser {
    tokens: Vec<String>,
    at: usize,
}

impl Parser {
    fn next(&mut self) -> String {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token.unwrap_or_else(|| panic!("the IDL ends early"))
    }

    fn peek(&self) -> &str {
        self.tokens.get(self.at).map(String::as_str).unwrap_or("")
    }

    fn expect(&mut self, want: &str) {
        let got = self.next();
        assert_eq!(got, want, "IDL token {}", self.at);
    }

    /// `( ... )`: a struct (`name: type, ...`) or an enum (`a, b`).
    fn parenthesized(&mut self) -> Type {
        self.expect("(");
        if self.peek() == ")" {
            self.next();
            return Type::Struct(Vec::new());
        }
        let first = self.next();
        if self.peek() != ":" {
            let mut values = vec![first];
            while self.next() == "," {
                values.push(self.next());
            }
            return Type::Enum(values);
        }
        let mut fields = Vec::new();
        let mut name = first;
        loop {
            self.expect(":");
            fields.push((name, self.ty()));
            match self.next().as_str() {
                ")" => return Type::Struct(fields),
                "," => name = self.next(),
                other => panic!("IDL: {other:?} in a struct"),
            }
        }
    }

    fn ty(&mut self) -> Type {
        match self.peek() {
            "?" => {
                self.next();
                Type::Nullable(Box::new(self.ty()))
            }
            "[" => {
                self.next();
                if self.peek() == "]" {
                    self.next();
                    Type::Array(Box::new(self.ty()))
                } else {
                    self.expect("string");
                    self.expect("]");
                    Type::Map(Box::new(self.ty()))
                }
            }
            "(" => self.parenthesized(),
            _ => match self.next().as_str() {
                "bool" => Type::Bool,
                "int" => Type::Int,
                "float" => Type::Float,
                "string" => Type::String,
                "object" => Type::Object,
                name => Type::Named(name.to_owned()),
            },
        }
    }
}

impl Idl {
    fn parse(text: &str) -> Self {
        let mut p = Parser {
            tokens: tokens(text),
            at: 0,
        };
        let mut idl = Self {
            types: BTreeMap::new(),
            methods: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        while p.at < p.tokens.len() {
            match p.next().as_str() {
                "interface" => {
                    p.next();
                }
                "type" => {
                    let name = p.next();
                    idl.types.insert(name, p.parenthesized());
                }
                "method" => {
                    let name = p.next();
                    let input = p.parenthesized();
                    p.expect("->");
                    idl.methods.insert(name, (input, p.parenthesized()));
                }
                "error" => {
                    let name = p.next();
                    idl.errors.insert(name, p.parenthesized());
                }
                other => panic!("IDL: unexpected {other:?}"),
            }
        }
        idl
    }

    fn check_reply(&self, method: &str, parameters: &Value) -> Vec<String> {
        match self.methods.get(method) {
            Some((_, output)) => self.check(output, parameters, "parameters"),
            None => vec![format!("undeclared method {method}")],
        }
    }

    fn check_error(&self, name: &str, parameters: &Value) -> Vec<String> {
        match self.errors.get(name) {
            Some(declared) => self.check(declared, parameters, "parameters"),
            None => vec![format!("undeclared error {name}")],
        }
    }

    /// What is wrong with `value` as a `ty`, each problem with its path.
    fn check(&self, ty: &Type, value: &Value, at: &str) -> Vec<String> {
        let wrong = |what: &str| vec![format!("{at}: {value} is not {what}")];
        match ty {
            Type::Bool if value.is_boolean() => vec![],
            Type::Bool => wrong("a bool"),
            Type::Int if value.is_i64() || value.is_u64() => vec![],
            Type::Int => wrong("an int"),
            Type::Float if value.is_number() => vec![],
            Type::Float => wrong("a float"),
            Type::String if value.is_string() => vec![],
            Type::String => wrong("a string"),
            Type::Object if value.is_object() => vec![],
            Type::Object => wrong("an object"),
            Type::Nullable(_) if value.is_null() => vec![],
            Type::Nullable(inner) => self.check(inner, value, at),
            Type::Enum(values) => match value.as_str() {
                Some(s) if values.iter().any(|v| v == s) => vec![],
                _ => wrong(&format!("one of {values:?}")),
            },
            Type::Named(name) => match self.types.get(name) {
                Some(declared) => self.check(declared, value, at),
                None => vec![format!("{at}: undeclared type {name}")],
            },
            Type::Array(item) => match value.as_array() {
                Some(items) => items
                    .iter()
                    .enumerate()
                    .flat_map(|(i, v)| self.check(item, v, &format!("{at}[{i}]")))
                    .collect(),
                None => wrong("an array"),
            },
            Type::Map(item) => match value.as_object() {
                Some(map) => map
                    .iter()
                    .flat_map(|(k, v)| self.check(item, v, &format!("{at}[{k:?}]")))
                    .collect(),
                None => wrong("a map"),
            },
            Type::Struct(fields) => {
                let Some(object) = value.as_object() else {
                    return wrong("an object");
                };
                let mut problems = Vec::new();
                for key in object.keys() {
                    if !fields.iter().any(|(name, _)| name == key) {
                        problems.push(format!("{at}.{key} is not declared"));
                    }
                }
                for (name, field) in fields {
                    match object.get(name) {
                        Some(v) => problems.extend(self.check(field, v, &format!("{at}.{name}"))),
                        None if matches!(field, Type::Nullable(_)) => {}
                        None => problems.push(format!("{at}.{name} is missing")),
                    }
                }
                problems
            }
        }
    }
}
