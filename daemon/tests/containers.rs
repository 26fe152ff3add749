//! Containers in VMs through the real kilnd: an OCI image built here from
//! busybox-static (a base layer, and an upper layer with a whiteout and an
//! opaque directory), imported with `ImportImage`, run as a VM's `main`
//! container on real QEMU with its layers hot-plugged as real erofs disks;
//! `ExecVM` in the container, `AddContainer` of a second one (its own
//! upper: it does not see the first one's writes), `ListContainers`,
//! `ContainerLogs` (one read and followed with `more`), `RemoveContainer`,
//! every refusal with its name and nothing left behind, the image's users
//! as containers come and go, a kill -9 of kilnd (the VM and its containers
//! re-adopted), and the same calls over D-Bus with real `busctl`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kiln_testkit::busctl::{DbusKilnd, MANAGER, MANAGER_IF};
use kiln_testkit::oci::{busybox_layer, file, one_image, Entry, Layer};
use kiln_testkit::{api_doc_script, run_bash, wait_until, Daemon};
use serde_json::{json, Value};

const VM_IF: &str = "io.kiln.Kiln1.VM";

/// The test image's upper layer: `/srv/app.txt`, a whiteout of the base's
/// `/etc/hello` replaced by `/etc/motd`, an opaque `/opt`.
fn upper_layer() -> Layer {
    Layer::gzip(&[
        Entry::Dir("srv/"),
        file("srv/app.txt", b"app layer\n"),
        Entry::Dir("etc/"),
        file("etc/.wh.hello", b""),
        file("etc/motd", b"upper\n"),
        Entry::Dir("opt/"),
        file("opt/.wh..wh..opq", b""),
        file("opt/new", b"new\n"),
    ])
}

/// An image of `layers` imported into `d` as `reference`: its layout (kept
/// by the caller while it is needed) and its digest.
fn import(d: &Daemon, layers: &[Layer], reference: &str) -> (tempfile::TempDir, String) {
    let layout = one_image(layers, "v1");
    let image = d.ok(
        "ImportImage",
        json!({ "path": layout.path(), "reference": reference }),
    )["image"]
        .clone();
    (layout, image["digest"].as_str().unwrap().to_owned())
}

/// `kiln.test/app:v1` (three layers: busybox, an `/opt/old` and the upper
/// layer) imported into `d`.
fn import_app(d: &Daemon) -> (tempfile::TempDir, String) {
    let opt = Layer::gzip(&[Entry::Dir("opt/"), file("opt/old", b"old\n")]);
    import(
        d,
        &[busybox_layer(), opt, upper_layer()],
        "kiln.test/app:v1",
    )
}

fn exec_in(d: &Daemon, id: &str, container: &str, script: &str) -> Value {
    d.ok(
        "ExecVM",
        json!({ "id": id, "container": container, "command": ["/bin/sh", "-c", script] }),
    )
}

fn users(d: &Daemon, digest: &str) -> Vec<String> {
    let image = d.ok("DescribeImage", json!({ "image": digest }))["image"].clone();
    serde_json::from_value(image["users"].clone()).unwrap()
}

fn container_states(d: &Daemon, id: &str) -> Vec<(String, String)> {
    let listed = d.ok("ListContainers", json!({ "id": id }))["containers"].clone();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

const SLEEPER: &str = "exec /bin/busybox sleep 100000";

#[test]
fn a_vm_runs_an_image_and_more_containers() {
    let mut d = Daemon::start();
    let (_layout, digest) = import_app(&d);

    // Refusals before anything runs.
    assert_eq!(
        d.err(
            "CreateVM",
            json!({ "name": "x", "spec": { "command": ["true"] } })
        ),
        "io.kiln.Manager.InvalidSpec"
    );
    assert_eq!(
        d.err(
            "CreateVM",
            json!({ "name": "x", "spec": { "image": "kiln.test/none:v1" } })
        ),
        "io.kiln.Manager.ImageNotFound"
    );
    let listed = d.ok("ListVMs", json!({}))["vms"].clone();
    assert_eq!(listed, json!([]), "a refused create leaves no VM");

    // A VM whose main container is the image, with its own command and env.
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "app", "spec": {
            "image": "kiln.test/app:v1",
            "command": ["-c", format!("echo started $GREETING; {SLEEPER}")],
            "env": ["GREETING=overridden", "EXTRA=1"],
        }}),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    assert_eq!(vm["containers"][0]["name"], "main");
    assert_eq!(vm["containers"][0]["digest"], digest);
    assert_eq!(vm["containers"][0]["state"], "created");
    assert_eq!(users(&d, &digest), [format!("vm:{id}:main")]);

    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "ready");
    assert_eq!(vm["containers"][0]["state"], "running", "{vm}");

    // In the container: the merged layers, the image's config with the
    // overrides, its own root.
    let r = exec_in(
        &d,
        &id,
        "main",
        "cat /srv/app.txt /etc/motd; test -e /etc/hello || echo hello-whited-out; \
         ls /opt; echo $GREETING $EXTRA; pwd; echo written > /mine",
    );
    assert_eq!(
        (&r["stdout"], &r["stderr"]),
        (
            &json!("app layer\nupper\nhello-whited-out\nnew\noverridden 1\n/etc\n"),
            &json!("")
        ),
        "{r}"
    );
    // The guest itself has no such files: the container has its own root.
    let guest = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", "test -e /srv/app.txt || echo not-in-guest"] }),
    );
    assert_eq!(guest["stdout"], "not-in-guest\n");

    // A second container of the same image: its own writable layer.
    let side = d.ok(
        "AddContainer",
        json!({ "id": id, "spec": {
            "name": "side", "image": digest,
            "command": ["-c", format!("echo side-out; echo side-err >&2; {SLEEPER}")],
        }}),
    )["container"]
        .clone();
    assert_eq!(side["state"], "running", "{side}");
    let r = exec_in(&d, &id, "side", "test -e /mine || echo isolated");
    assert_eq!(r["stdout"], "isolated\n");
    assert_eq!(
        container_states(&d, &id),
        [
            ("main".into(), "running".into()),
            ("side".into(), "running".into())
        ]
    );
    let mut users_now = users(&d, &digest);
    users_now.sort();
    assert_eq!(
        users_now,
        [format!("vm:{id}:main"), format!("vm:{id}:side")]
    );

    // Logs: one read, then followed until the container ends.
    wait_until(Duration::from_secs(20), "side's output", || {
        let logs = d.ok("ContainerLogs", json!({ "id": id, "name": "side" }));
        let text: String = logs["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["stream"].as_str().unwrap(),
                    e["text"].as_str().unwrap()
                )
            })
            .collect();
        (text.contains("stdout:side-out") && text.contains("stderr:side-err"))
            .then_some(())
            .ok_or(text)
    });
    d.ok(
        "AddContainer",
        json!({ "id": id, "spec": {
            "name": "counter", "image": digest,
            "command": ["-c", "for i in 1 2 3; do echo tick $i; /bin/busybox sleep 0.3; done"],
        }}),
    );
    let followed = d
        .more("ContainerLogs", json!({ "id": id, "name": "counter" }))
        .unwrap();
    let text: String = followed
        .iter()
        .flat_map(|r| r["entries"].as_array().unwrap().clone())
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "tick 1\ntick 2\ntick 3\n", "{followed:?}");
    assert_eq!(followed.last().unwrap()["ended"], true);
    let states = container_states(&d, &id);
    assert_eq!(states[2], ("counter".into(), "exited".into()));

    // Refusals, each leaving nothing behind.
    let again = json!({ "id": id, "spec": { "name": "side", "image": digest } });
    assert_eq!(
        d.err("AddContainer", again),
        "io.kiln.Manager.ContainerExists"
    );
    let unknown = json!({ "id": id, "spec": { "name": "u", "image": "kiln.test/none:v2" } });
    assert_eq!(
        d.err("AddContainer", unknown),
        "io.kiln.Manager.ImageNotFound"
    );
    let missing_program = json!({ "id": id, "spec": {
        "name": "broken", "image": digest, "entrypoint": ["/no/such/program"] } });
    assert_eq!(
        d.err("AddContainer", missing_program),
        "io.kiln.Manager.ContainerStartFailed"
    );
    let bad = json!({ "id": id, "spec": { "name": "a/b", "image": digest } });
    assert_eq!(d.err("AddContainer", bad), "io.kiln.Manager.InvalidSpec");
    assert_eq!(
        d.err(
            "ExecVM",
            json!({ "id": id, "container": "nope", "command": ["true"] })
        ),
        "io.kiln.Manager.NoSuchContainer"
    );
    assert_eq!(
        d.err("RemoveContainer", json!({ "id": id, "name": "nope" })),
        "io.kiln.Manager.NoSuchContainer"
    );
    assert_eq!(container_states(&d, &id).len(), 3);
    assert_eq!(
        users(&d, &digest).len(),
        3,
        "the failed adds released the image"
    );
    assert_eq!(
        d.err("RemoveImage", json!({ "image": digest })),
        "io.kiln.Manager.ImageInUse"
    );

    // kill -9 of kilnd: the VM and its containers are re-adopted.
    d.sigkill();
    d.spawn();
    let r = exec_in(&d, &id, "main", "cat /mine");
    assert_eq!(r["stdout"], "written\n", "{r}\n{}", d.log());
    assert_eq!(
        container_states(&d, &id)[0],
        ("main".into(), "running".into())
    );

    // Removed: the process, its disks and its image user go.
    d.ok("RemoveContainer", json!({ "id": id, "name": "side" }));
    d.ok("RemoveContainer", json!({ "id": id, "name": "counter" }));
    assert_eq!(
        container_states(&d, &id),
        [("main".into(), "running".into())]
    );
    wait_until(Duration::from_secs(10), "users released", || {
        let u = users(&d, &digest);
        (u == [format!("vm:{id}:main")])
            .then_some(())
            .ok_or(format!("{u:?}"))
    });
    let disks = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["sh", "-c", "ls /sys/block | grep -c sd || true"] }),
    );
    assert_eq!(
        disks["stdout"], "3\n",
        "only main's three layers stay plugged"
    );

    // A reboot starts the main container again.
    let vm = d.ok("RebootVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["containers"][0]["state"], "running", "{vm}");
    let r = exec_in(&d, &id, "main", "test -e /mine || echo fresh-upper");
    assert_eq!(r["stdout"], "fresh-upper\n");

    // Deleting the VM releases the image, which can then go.
    d.ok("DeleteVM", json!({ "id": id }));
    wait_until(Duration::from_secs(10), "the VM's users released", || {
        let u = users(&d, &digest);
        u.is_empty().then_some(()).ok_or(format!("{u:?}"))
    });
    d.ok("RemoveImage", json!({ "image": digest }));
}

#[test]
fn dbus_runs_containers() {
    let k = DbusKilnd::start(false);
    let layout = one_image(&[busybox_layer()], "v1");
    let image = k.varlinkctl(
        "ImportImage",
        json!({ "path": layout.path(), "reference": "kiln.test/bus:v1" }),
    );
    let digest = image["image"]["digest"].as_str().unwrap().to_owned();
    let created = k.call(
        MANAGER,
        MANAGER_IF,
        "CreateVM",
        &[
            "sa{sv}",
            "bus",
            "2",
            "image",
            "s",
            "kiln.test/bus:v1",
            "command",
            "as",
            "2",
            "-c",
            "exec /bin/busybox sleep 100000",
        ],
    );
    let path = created[0].as_str().unwrap().to_owned();
    k.call(&path, VM_IF, "Start", &[]);
    let added = k.call(
        &path,
        VM_IF,
        "AddContainer",
        &[
            "a{sv}",
            "3",
            "name",
            "s",
            "two",
            "image",
            "s",
            &digest,
            "command",
            "as",
            "2",
            "-c",
            "echo from-two; exec /bin/busybox sleep 100000",
        ],
    );
    assert_eq!(added[0], "two", "{added:?}");
    assert_eq!(added[3], "running", "{added:?}");
    let listed = k.call(&path, VM_IF, "ListContainers", &[]);
    let names: Vec<&str> = listed[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "two"]);
    let out = k.call(
        &path,
        VM_IF,
        "ExecIn",
        &[
            "sasassuu",
            "two",
            "2",
            "cat",
            "/etc/hello",
            "0",
            "",
            "0",
            "0",
        ],
    );
    assert_eq!(out[1], "hello from the base layer\n", "{out:?}");
    wait_until(Duration::from_secs(20), "two's output over D-Bus", || {
        let logs = k.call(&path, VM_IF, "ContainerLogs", &["stu", "two", "0", "0"]);
        let text = logs[0].to_string();
        text.contains("from-two").then_some(()).ok_or(text)
    });
    let mut monitor = k.monitor();
    k.call_err(None, &path, VM_IF, "RemoveContainer", &["s", "nope"]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.NoSuchContainer");
    k.call(&path, VM_IF, "RemoveContainer", &["s", "two"]);
    let listed = k.call(&path, VM_IF, "ListContainers", &[]);
    assert_eq!(listed[0].as_array().unwrap().len(), 1);
}

#[test]
fn container_doc_examples_run() {
    let d = Daemon::start();
    let layout = one_image(&[busybox_layer()], "kiln.test/app:v1");
    let script = api_doc_script(
        "## Containers",
        &[
            (
                "SOCK=unix:/run/kiln/io.kiln.Manager",
                format!("SOCK={}", d.address()),
            ),
            (
                "LAYOUT=/srv/images/app",
                format!("LAYOUT={}", layout.path().display()),
            ),
        ],
    );
    let stdout = run_bash(&script, &d.log());
    for line in [
        "[\"main\",\"running\"]",
        "demo\nhello from the base layer",
        "[\"once\",\"exited\"]",
        "one-shot",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));
    assert_eq!(d.ok("ListVMs", json!({}))["vms"], json!([]));
}

#[test]
fn acquire_with_an_image_hands_out_a_clone_running_it() {
    let d = Daemon::start();
    let (_layout, digest) = import(&d, &[busybox_layer()], "kiln.test/acq:v1");
    d.ok(
        "CreatePool",
        json!({ "name": "generic", "spec": { "mode": "template", "warm": 1, "max": 2 } }),
    );
    let spec = json!({ "name": "job", "image": "kiln.test/acq:v1",
                       "command": ["-c", "echo job-ready; exec /bin/busybox sleep 100000"] });
    let vm = d.ok(
        "Acquire",
        json!({ "pool": "generic", "timeoutMs": 300000, "container": spec }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    assert_eq!(vm["state"], "leased");
    assert_eq!(vm["containers"][0]["name"], "job");
    assert_eq!(vm["containers"][0]["state"], "running", "{vm}");
    assert_eq!(vm["containers"][0]["digest"], digest);
    let r = exec_in(&d, &id, "job", "cat /etc/hello");
    assert_eq!(r["stdout"], "hello from the base layer\n");
    assert_eq!(users(&d, &digest), [format!("vm:{id}:job")]);

    // A container that cannot start: no VM is handed out, none stays
    // leased, the image is not held for it.
    let broken = json!({ "name": "job", "image": digest, "entrypoint": ["/missing"] });
    let (name, _) = d
        .call(
            "io.kiln.Manager.Acquire",
            json!({ "pool": "generic", "timeoutMs": 300000, "container": broken }),
        )
        .unwrap_err();
    assert_eq!(name, "io.kiln.Manager.ContainerStartFailed");
    let vms = d.ok("ListVMs", json!({}))["vms"].clone();
    let leased: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "leased")
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(leased, [id.as_str()], "only the first lease is held");
    assert_eq!(users(&d, &digest), [format!("vm:{id}:job")]);
    let bad = json!({ "pool": "generic", "container": { "name": "a b", "image": digest } });
    assert_eq!(d.err("Acquire", bad), "io.kiln.Manager.InvalidSpec");

    d.ok("Release", json!({ "id": id }));
    assert!(users(&d, &digest).is_empty());
    d.ok("DeletePool", json!({ "name": "generic" }));
}

#[test]
fn a_per_image_pool_hands_out_clones_whose_container_already_runs() {
    let d = Daemon::start();
    let (_layout, digest) = import(&d, &[busybox_layer()], "kiln.test/warm:v1");
    // The container prints a random token once, when it starts: clones of
    // one template all show the template's token.
    d.ok(
        "CreatePool",
        json!({ "name": "warm", "spec": { "mode": "template", "warm": 2, "max": 3, "warmupSec": 1,
                 "vm": { "image": "kiln.test/warm:v1",
                         "command": ["-c", "echo token $RANDOM$RANDOM; exec /bin/busybox sleep 100000"] } } }),
    );
    wait_until(Duration::from_secs(30), "the pool holds its image", || {
        let u = users(&d, &digest);
        (u == ["pool:warm"]).then_some(()).ok_or(format!("{u:?}"))
    });
    let acquire = || d.ok("Acquire", json!({ "pool": "warm", "timeoutMs": 300000 }))["vm"].clone();
    let (a, b) = (acquire(), acquire());
    let mut tokens = Vec::new();
    for vm in [&a, &b] {
        let id = vm["id"].as_str().unwrap();
        assert_eq!(vm["containers"][0]["name"], "main");
        assert_eq!(vm["containers"][0]["state"], "running", "{vm}");
        // Printed in the template, during its warm-up: there at once.
        let logs = d.ok("ContainerLogs", json!({ "id": id, "name": "main" }));
        let text = logs["entries"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(text.starts_with("token "), "{logs}");
        tokens.push(text);
        let r = exec_in(&d, id, "main", "cat /etc/hello");
        assert_eq!(r["stdout"], "hello from the base layer\n");
    }
    assert_eq!(
        tokens[0], tokens[1],
        "both clones resumed the template's running container"
    );
    // Each clone writes its own upper layer.
    let (ida, idb) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    exec_in(&d, ida, "main", "echo a > /mine");
    let r = exec_in(&d, idb, "main", "test -e /mine || echo own-upper");
    assert_eq!(r["stdout"], "own-upper\n");
    assert_eq!(
        d.err("RemoveImage", json!({ "image": digest })),
        "io.kiln.Manager.ImageInUse"
    );

    // A newer image under the same tag: the pool follows it with a new
    // template, and lets go of the old image.
    let v2_layers = [
        busybox_layer(),
        Layer::gzip(&[Entry::Dir("etc/"), file("etc/version", b"2\n")]),
    ];
    let (_v2, digest2) = import(&d, &v2_layers, "kiln.test/warm:v1");
    assert_ne!(digest, digest2);
    wait_until(
        Duration::from_secs(30),
        "the pool moved to the new image",
        || {
            let new = users(&d, &digest2);
            (new == ["pool:warm"])
                .then_some(())
                .ok_or(format!("{new:?}"))
        },
    );
    // Right after the move the old image's hot VM is still being destroyed
    // and counts toward max (2 leased + 1 going = 3): an Acquire then is
    // PoolExhausted at once. Known and transient (noted on issue 16);
    // wait for the new template's clone instead.
    let c = wait_until(Duration::from_secs(120), "a clone of the new image", || {
        d.call(
            "io.kiln.Manager.Acquire",
            json!({ "pool": "warm", "timeoutMs": 300000 }),
        )
        .map(|r| r["vm"].clone())
        .map_err(|e| e.0)
    });
    assert_eq!(c["containers"][0]["digest"], digest2, "{c}");
    let r = exec_in(&d, c["id"].as_str().unwrap(), "main", "cat /etc/version");
    assert_eq!(r["stdout"], "2\n");
    // The old image stays held while clones leased before the move run it,
    // and is let go with the last of them.
    assert_eq!(users(&d, &digest), ["pool:warm"]);
    d.ok("Release", json!({ "id": ida }));
    assert_eq!(users(&d, &digest), ["pool:warm"]);
    d.ok("Release", json!({ "id": idb }));
    wait_until(Duration::from_secs(10), "the old image let go", || {
        let old = users(&d, &digest);
        old.is_empty().then_some(()).ok_or(format!("{old:?}"))
    });
    // Likewise after DeletePool: its leased VM keeps the image held.
    d.ok("DeletePool", json!({ "name": "warm" }));
    assert_eq!(users(&d, &digest2), ["pool:warm"]);
    d.ok("Release", json!({ "id": c["id"] }));
    wait_until(
        Duration::from_secs(30),
        "the pool's image user released",
        || {
            let u = users(&d, &digest2);
            u.is_empty().then_some(()).ok_or(format!("{u:?}"))
        },
    );
}

#[test]
fn kill_9_mid_add_leaves_no_stray_user_and_the_add_can_be_retried() {
    let mut d = Daemon::start();
    let (_layout, digest) = import_app(&d);
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "crash", "spec": { "image": digest,
                 "command": ["-c", format!("echo up; {SLEEPER}")] } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    d.ok("StartVM", json!({ "id": id }));
    // AddContainer in flight (resolving, plugging or starting) when kilnd
    // dies: nothing records it.
    let address = d.address();
    let params = json!({ "id": id, "spec": { "name": "late", "image": digest,
                          "command": ["-c", SLEEPER] } })
    .to_string();
    let mut add = std::process::Command::new("varlinkctl")
        .args(["call", &address, "io.kiln.Manager.AddContainer", &params])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    d.sigkill();
    let _ = add.wait();
    d.spawn();
    // The VM is re-adopted with its main container; whatever the add left
    // (an image user, plugged disks, a process in the guest) is gone or
    // harmless, and the add works when retried.
    assert_eq!(
        container_states(&d, &id)[0],
        ("main".into(), "running".into())
    );
    wait_until(
        Duration::from_secs(20),
        "the stray image user swept",
        || {
            let u = users(&d, &digest);
            (u == [format!("vm:{id}:main")])
                .then_some(())
                .ok_or(format!("{u:?}"))
        },
    );
    let late = json!({ "id": id, "spec": { "name": "late", "image": digest,
                        "command": ["-c", format!("echo late-up; {SLEEPER}")] } });
    // If the first try got as far as the guest, its process is replaced.
    let added = d.ok("AddContainer", late)["container"].clone();
    assert_eq!(added["state"], "running", "{added}");
    assert_eq!(
        container_states(&d, &id),
        [
            ("main".into(), "running".into()),
            ("late".into(), "running".into())
        ]
    );
    wait_until(
        Duration::from_secs(20),
        "the retried container's output",
        || {
            let logs = d.ok("ContainerLogs", json!({ "id": id, "name": "late" }));
            let text = logs["entries"].to_string();
            text.contains("late-up").then_some(()).ok_or(text)
        },
    );
    let r = exec_in(&d, &id, "main", "echo still-here");
    assert_eq!(r["stdout"], "still-here\n");
    d.ok("DeleteVM", json!({ "id": id }));
    assert!(users(&d, &digest).is_empty());
}

#[test]
fn restart_policies_restart_or_stop_the_vm() {
    let d = Daemon::start();
    let _layout = import(&d, &[busybox_layer()], "kiln.test/rs:v1");
    // A VM made to run one job: its main container exits, the VM stops.
    let job = d.ok(
        "CreateVM",
        json!({ "name": "job", "spec": { "image": "kiln.test/rs:v1",
                 "command": ["-c", "/bin/busybox sleep 1; echo done"] } }),
    )["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok("StartVM", json!({ "id": job }));
    wait_until(Duration::from_secs(30), "the job's VM stops", || {
        let vm = d.ok("DescribeVM", json!({ "id": job }))["vm"].clone();
        (vm["state"] == "stopped")
            .then_some(())
            .ok_or(vm.to_string())
    });
    let vm = d.ok("DescribeVM", json!({ "id": job }))["vm"].clone();
    assert_eq!(vm["containers"][0]["state"], "exited", "{vm}");
    assert_eq!(vm["containers"][0]["exitCode"], 0, "{vm}");

    // A long-lived VM: a failing container is restarted, one that succeeds
    // under on-failure is not, always restarts even a clean exit.
    let host = d.ok(
        "CreateVM",
        json!({ "name": "host", "spec": { "image": "kiln.test/rs:v1", "restartPolicy": "always",
                 "command": ["-c", "exec /bin/busybox sleep 100000"] } }),
    )["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok("StartVM", json!({ "id": host }));
    for (name, policy, script) in [
        ("flaky", "on-failure", "echo try; exit 3"),
        ("fine", "on-failure", "exit 0"),
        ("loop", "always", "exit 0"),
    ] {
        d.ok(
            "AddContainer",
            json!({ "id": host, "spec": { "name": name, "image": "kiln.test/rs:v1",
                     "restartPolicy": policy, "command": ["-c", script] } }),
        );
    }
    let restarts = |name: &str| -> (u64, String) {
        let listed = d.ok("ListContainers", json!({ "id": host }))["containers"].clone();
        let c = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone();
        (
            c["restarts"].as_u64().unwrap(),
            c["state"].as_str().unwrap().to_owned(),
        )
    };
    wait_until(Duration::from_secs(60), "restarts", || {
        let (flaky, lp) = (restarts("flaky"), restarts("loop"));
        (flaky.0 >= 2 && lp.0 >= 2)
            .then_some(())
            .ok_or(format!("flaky {flaky:?}, loop {lp:?}"))
    });
    let fine = restarts("fine");
    assert_eq!(fine, (0, "exited".into()));
    let r = exec_in(&d, &host, "main", "echo alive");
    assert_eq!(r["stdout"], "alive\n");
    assert_eq!(
        d.ok("DescribeVM", json!({ "id": host }))["vm"]["state"],
        "ready"
    );
}

#[test]
fn a_storage_disk_keeps_the_writable_layer_across_restarts() {
    let d = Daemon::start();
    let _layout = import(&d, &[busybox_layer()], "kiln.test/disk:v1");
    let spec = json!({ "image": "kiln.test/disk:v1", "storageMiB": 64, "storageDisk": true,
                       "command": ["-c", "exec /bin/busybox sleep 100000"] });
    let id = d.ok("CreateVM", json!({ "name": "disk", "spec": spec }))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok("StartVM", json!({ "id": id }));
    let disks = d.kilnd.dir.path().join("state/disks").join(&id);
    let file = disks.join("main.ext4");
    assert!(file.is_file(), "{}", file.display());
    let r = exec_in(&d, &id, "main", "echo kept > /data; df -k / | tail -1");
    assert!(r["stdout"].as_str().unwrap().contains("overlay"), "{r}");
    // A reboot, then a stop and a start: the disk, and what was written
    // on it, stay.
    d.ok("RebootVM", json!({ "id": id }));
    assert_eq!(exec_in(&d, &id, "main", "cat /data")["stdout"], "kept\n");
    d.ok("StopVM", json!({ "id": id }));
    d.ok("StartVM", json!({ "id": id }));
    assert_eq!(exec_in(&d, &id, "main", "cat /data")["stdout"], "kept\n");
    // Its own disk for an added container; removed with it.
    d.ok(
        "AddContainer",
        json!({ "id": id, "spec": { "name": "side", "image": "kiln.test/disk:v1", "storageMiB": 32,
                 "storageDisk": true, "command": ["-c", "exec /bin/busybox sleep 100000"] } }),
    );
    assert!(disks.join("side.ext4").is_file());
    assert_eq!(
        exec_in(&d, &id, "side", "test -e /data || echo own-disk")["stdout"],
        "own-disk\n"
    );
    d.ok("RemoveContainer", json!({ "id": id, "name": "side" }));
    assert!(!disks.join("side.ext4").exists());
    // Refused: too small, or in a template pool.
    let small = json!({ "id": id, "spec": { "name": "s", "image": "kiln.test/disk:v1",
                        "storageMiB": 4, "storageDisk": true } });
    assert_eq!(d.err("AddContainer", small), "io.kiln.Manager.InvalidSpec");
    let pool = json!({ "name": "p", "spec": { "mode": "template", "warm": 0, "max": 1,
                       "vm": { "image": "kiln.test/disk:v1", "storageMiB": 64, "storageDisk": true } } });
    assert_eq!(d.err("CreatePool", pool), "io.kiln.Manager.InvalidSpec");
    d.ok("DeleteVM", json!({ "id": id }));
    assert!(!disks.exists(), "the VM's disks go with it");
}

/// Layer directories as containerd's overlayfs snapshotter leaves them
/// (what the containerd shim hands kilnd): `ImportRootfs` (root alone)
/// converts each once, and the image runs as a container with its
/// whiteout applied.
#[test]
fn layer_directories_run_as_a_container() {
    let d = Daemon::start_with("manage_group = \"nogroup\"\n");
    let snapshots = tempfile::tempdir().unwrap();
    let (base, upper) = (snapshots.path().join("1/fs"), snapshots.path().join("2/fs"));
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("bin/busybox"), kiln_testkit::oci::busybox()).unwrap();
    std::fs::set_permissions(
        base.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(base.join("etc/hello"), "hello\n").unwrap();
    std::fs::create_dir_all(upper.join("srv")).unwrap();
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("srv/app.txt"), "from a directory\n").unwrap();
    kiln_testkit::run(
        std::process::Command::new("mknod")
            .arg(upper.join("etc/hello"))
            .args(["c", "0", "0"]),
    );
    let params = json!({ "layers": [base, upper], "reference": "kiln.test/rootfs:v1" });

    let refused = d
        .call_as(
            Some(65534),
            "io.kiln.Manager.ImportRootfs",
            &params.to_string(),
        )
        .unwrap_err();
    assert_eq!(refused.0, "io.kiln.Manager.PermissionDenied", "{refused:?}");
    let replies = d.more("ImportRootfs", params.clone()).unwrap();
    let image = replies.last().unwrap()["image"].clone();
    let digest = image["digest"].as_str().unwrap().to_owned();
    assert_eq!(image["layers"].as_array().unwrap().len(), 2, "{image}");
    let converted = replies
        .iter()
        .filter(|r| r["progress"]["step"] == "converted")
        .count();
    assert_eq!(converted, 2, "one conversion per layer: {replies:?}");

    let script = "cat /srv/app.txt; test -e /etc/hello || echo whited-out; \
                  exec /bin/busybox sleep 100000";
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "dirs", "spec": { "image": digest,
            "entrypoint": ["/bin/busybox", "sh", "-c", script] } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["containers"][0]["state"], "running", "{vm}");
    wait_until(Duration::from_secs(20), "the container's output", || {
        let logs = d.ok("ContainerLogs", json!({ "id": id, "name": "main" }));
        let text: String = logs["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["text"].as_str().unwrap().to_owned())
            .collect();
        (text == "from a directory\nwhited-out\n")
            .then_some(())
            .ok_or(text)
    });

    // The same directories again: the same image, nothing converted.
    let again = d.ok("ImportRootfs", params)["image"].clone();
    assert_eq!(again["digest"], digest.as_str());
    assert_eq!(
        d.err("ImportRootfs", json!({ "layers": ["relative/dir"] })),
        "io.kiln.Manager.InvalidArgument"
    );
    assert_eq!(
        d.err(
            "ImportRootfs",
            json!({ "layers": [snapshots.path().join("nope")] })
        ),
        "io.kiln.Manager.ImageNotFound"
    );
    d.ok("DeleteVM", json!({ "id": id }));
}

/// A container that ignores SIGTERM takes the whole grace period to
/// remove; meanwhile the VM's agent goes on answering (the host waits,
/// not the agent): an exec in the guest returns while the removal is
/// still under way, and the removal ends with the container gone.
#[test]
fn removing_a_stubborn_container_does_not_hold_up_the_vm() {
    let d = Daemon::start();
    let (_layout, digest) = import_app(&d);
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "stubborn", "spec": { "image": digest,
            "command": ["-c", format!("trap '' TERM; {SLEEPER}")] } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    d.ok("StartVM", json!({ "id": id }));
    let removing = {
        let (address, id) = (d.address(), id.clone());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let out = std::process::Command::new("varlinkctl")
                .args(["call", &address, "io.kiln.Manager.RemoveContainer"])
                .arg(json!({ "id": id, "name": "main" }).to_string())
                .output()
                .unwrap();
            (out.status.success(), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let r = d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["echo", "still here"] }),
    );
    assert_eq!(r["stdout"], "still here\n");
    assert!(
        !removing.is_finished(),
        "the exec came back while the removal waited out the grace period"
    );
    let (removed, took) = removing.join().unwrap();
    assert!(removed, "RemoveContainer failed");
    assert!(
        took >= Duration::from_secs(9),
        "SIGTERM was ignored: removed after the grace period ({took:?})"
    );
    assert_eq!(container_states(&d, &id), Vec::<(String, String)>::new());
}

/// The bytes of `stdout` chunks of `AttachProcess`/`ReadProcess` replies.
fn process_output(reply: &Value) -> String {
    let bytes: Vec<u8> = reply["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| kiln_agent_proto::decode_bytes(c["data"].as_str()?))
        .flatten()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Read process `handle` of VM `id` until it exited: its output and exit
/// code.
fn drain_process(d: &Daemon, id: &str, handle: u64) -> (String, i64) {
    let exit = d.ok(
        "WaitProcess",
        json!({ "id": id, "handle": handle, "timeoutSec": 60 }),
    );
    let mut text = String::new();
    let mut since = 0u64;
    loop {
        let read = d.ok(
            "AttachProcess",
            json!({ "id": id, "handle": handle, "since": since }),
        );
        text.push_str(&process_output(&read));
        let cursor = read["cursor"].as_u64().unwrap();
        if read.get("exit").is_some() || cursor == since {
            break;
        }
        since = cursor;
    }
    (text, exit["exit"]["exitCode"].as_i64().unwrap())
}

#[test]
fn a_containers_process_can_have_a_terminal_or_stdin() {
    let d = Daemon::start();
    let (_layout, digest) = import_app(&d);
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "tty", "spec": { "memoryMiB": 192 } }),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    d.ok("StartVM", json!({ "id": id }));
    // Refused before anything starts.
    for (spec, why) in [
        (json!({"terminal": {"rows": 0, "cols": 80}}), "rows"),
        (json!({"stdin": true, "restartPolicy": "always"}), "restart"),
    ] {
        let mut full = json!({ "name": "bad", "image": digest, "command": ["-c", "true"] });
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        assert_eq!(
            d.err("AddContainer", json!({ "id": id, "spec": full })),
            "io.kiln.Manager.InvalidSpec",
            "{why}"
        );
    }

    // A terminal: its size, a controlling tty, typed input, the exit code.
    let added = d.ok(
        "AddContainer",
        json!({ "id": id, "spec": { "name": "term", "image": digest,
            "terminal": {"rows": 33, "cols": 101},
            "command": ["-c", "stty size; [ -t 0 ] && echo on-a-tty; read line; echo got:$line; exit 3"] } }),
    )["container"]
        .clone();
    let handle = added["handle"]
        .as_u64()
        .expect("a terminal container has a handle");
    d.ok(
        "WriteProcess",
        json!({ "id": id, "handle": handle, "data": kiln_agent_proto::encode_bytes(b"typed\n") }),
    );
    let (text, code) = drain_process(&d, &id, handle);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("33 101"), "{text}");
    assert!(text.contains("on-a-tty"), "{text}");
    assert!(text.contains("got:typed"), "{text}");
    // Its output is the stream's, not the log's.
    let logs = d.ok("ContainerLogs", json!({ "id": id, "name": "term" }));
    assert_eq!(logs["entries"], json!([]), "{logs}");
    let listed = d.ok("ListContainers", json!({ "id": id }))["containers"].clone();
    let term = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "term")
        .unwrap();
    assert_eq!(term["state"], "exited", "{listed}");
    assert_eq!(term["exitCode"], 3, "{listed}");
    assert_eq!(term["handle"], handle, "{listed}");

    // stdin on pipes: every byte through, end of file by close.
    let added = d.ok(
        "AddContainer",
        json!({ "id": id, "spec": { "name": "pipe", "image": digest, "stdin": true,
            "command": ["-c", "wc -c; exit 4"] } }),
    )["container"]
        .clone();
    let handle = added["handle"]
        .as_u64()
        .expect("a stdin container has a handle");
    let chunk = kiln_agent_proto::encode_bytes(&[b'x'; 50_000]);
    d.ok(
        "WriteProcess",
        json!({ "id": id, "handle": handle, "data": chunk }),
    );
    d.ok(
        "WriteProcess",
        json!({ "id": id, "handle": handle, "data": kiln_agent_proto::encode_bytes(b"12"), "close": true }),
    );
    let (text, code) = drain_process(&d, &id, handle);
    assert_eq!((text.trim(), code), ("50002", 4));

    // A plain container keeps its logs and has no handle.
    let plain = d.ok(
        "AddContainer",
        json!({ "id": id, "spec": { "name": "plain", "image": digest, "command": ["-c", SLEEPER] } }),
    )["container"]
        .clone();
    assert!(plain.get("handle").is_none(), "{plain}");
    d.ok("DeleteVM", json!({ "id": id }));
}
