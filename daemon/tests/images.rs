//! Images through the real kilnd: a real Debian `docker-registry` on
//! 127.0.0.1 with its own config and storage, images built here from
//! busybox-static and pushed with real `skopeo`, kilnd driven with real
//! `varlinkctl` and `busctl` (on a private `dbus-daemon`). `PullImage` with
//! its progress before its result, `ListImages`, `DescribeImage`, a second
//! pull that fetches no blob, `ImportImage` of an OCI archive skopeo wrote,
//! `RemoveImage`, image events, every named error, the caller's read access
//! to what it imports, a kill -9 of kilnd mid-pull, and the docs/api.md
//! examples.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_testkit::busctl::{DbusKilnd, MANAGER, MANAGER_IF, NAME};
use kiln_testkit::oci::{
    busybox_layer, file, noise, oci_archive, one_image, sha256, two_layers, Entry, Layer,
};
use kiln_testkit::{api_doc_script, json_seq, run_bash, wait_until, Daemon, Registry};
use kiln_testkit::{Kilnd, VarlinkStream};
use serde_json::{json, Value};

/// A registry holding `app:v1` (busybox, then `/srv/app.txt`) and
/// `tampered:v1`, whose layer blob has one byte flipped in the registry's
/// own storage.
struct Source {
    registry: Registry,
    layout: tempfile::TempDir,
}

impl Source {
    fn start() -> Self {
        let registry = Registry::start();
        let (layout, _) = two_layers();
        registry.push(layout.path(), "v1", "app:v1", false);
        let layer = Layer::gzip(&[Entry::Dir("srv/"), file("srv/t.txt", b"tampered\n")]);
        let tampered = one_image(std::slice::from_ref(&layer), "v1");
        registry.push(tampered.path(), "v1", "tampered:v1", false);
        let blob = registry.blob_file(&sha256(&layer.blob()));
        let mut bytes = std::fs::read(&blob).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&blob, bytes).unwrap();
        Self { registry, layout }
    }

    /// `app:v1`'s reference.
    fn app(&self) -> String {
        self.registry.reference("app:v1")
    }

    /// kilnd.toml lines that let kilnd pull from it over plain HTTP.
    fn config(&self) -> String {
        format!(
            "image_insecure_registries = [\"{}\"]\n",
            self.registry.host()
        )
    }

    /// An OCI archive of `app:v1`, written by skopeo at `dir/app.tar` and
    /// readable by everyone.
    fn archive(&self, dir: &Path) -> PathBuf {
        let path = dir.join("app.tar");
        oci_archive(self.layout.path(), "v1", &path);
        chmod(&path, 0o644);
        path
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A reference on 127.0.0.1 where nothing listens.
fn unreachable_reference() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}/app:v1")
}

/// The replies of a `PullImage` or `ImportImage` called with `more`: the
/// progress reports, then the image.
fn progress_and_image(replies: Vec<Value>) -> (Vec<Value>, Value) {
    let (last, reports) = replies.split_last().expect("no reply");
    let progress: Vec<Value> = reports.iter().map(|r| r["progress"].clone()).collect();
    assert!(progress.iter().all(Value::is_object), "{replies:#?}");
    assert!(last["image"].is_object(), "{replies:#?}");
    (progress, last["image"].clone())
}

fn steps(progress: &[Value]) -> Vec<&str> {
    progress.iter().filter_map(|p| p["step"].as_str()).collect()
}

/// The files in a directory of kilnd's image store.
fn store_files(kilnd: &Kilnd, sub: &str) -> Vec<String> {
    let dir = kilnd.dir.path().join("state/images").join(sub);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Wait until GC has freed every converted layer.
fn wait_collected(kilnd: &Kilnd) {
    wait_until(Duration::from_secs(30), "the layers collected", || {
        let left = store_files(kilnd, "erofs/sha256");
        left.is_empty()
            .then_some(())
            .ok_or_else(|| format!("{left:?}"))
    });
}

/// Hold or let go of an image through the store itself, as another process
/// sharing it (a VM user, later) would: `RemoveImage` must see the user.
fn hold(kilnd: &Kilnd, digest: &str, held: bool) {
    let root = kilnd.dir.path().join("state/images");
    let store = kiln_image::ImageStore::open(root, Default::default()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(async {
            if held {
                store.acquire(digest, "test:holder").await.map(drop)
            } else {
                store.release(digest, "test:holder").await.map(drop)
            }
        })
        .unwrap();
}

#[test]
fn varlink_pulls_lists_describes_imports_removes_and_names_errors() {
    let source = Source::start();
    let d = Daemon::start_with(&source.config());
    let watch = VarlinkStream::start(&d.address(), "io.kiln.Manager.Watch", "{}");
    let first = watch.next(Duration::from_secs(30)).unwrap();
    assert_eq!(first["event"]["type"], "ready");
    let app = source.app();

    // A pull: its progress replies as it goes, then the image.
    let pulled = d.more("PullImage", json!({ "reference": app }));
    let (progress, image) = progress_and_image(pulled.unwrap());
    let seen = steps(&progress);
    assert_eq!(
        (seen.first(), seen.last()),
        (Some(&"resolved"), Some(&"stored"))
    );
    for step in ["downloading", "checking", "converting", "converted"] {
        assert!(seen.contains(&step), "{step}: {seen:?}");
    }
    let done: Vec<u64> = progress
        .iter()
        .map(|p| p["doneBytes"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    let last = progress.last().unwrap();
    assert_eq!(
        (&last["doneBytes"], &last["layers"]),
        (&last["totalBytes"], &json!(2))
    );
    let digest = image["digest"].as_str().unwrap().to_owned();
    assert_eq!(image["references"], json!([app]));
    assert_eq!(image["layers"].as_array().unwrap().len(), 2);
    assert_eq!(image["process"]["entrypoint"], json!(["/bin/sh"]));
    assert_eq!(image["users"], json!([]));

    // Listed; described by tag and by digest.
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([image]));
    for name in [&app, &digest] {
        assert_eq!(
            d.ok("DescribeImage", json!({ "image": name }))["image"],
            image
        );
    }

    // Again: a cache hit, the manifest only, no blob fetched.
    let blob_gets = source.registry.blob_gets();
    let again = d.more("PullImage", json!({ "reference": app }));
    let (progress, cached) = progress_and_image(again.unwrap());
    assert_eq!(steps(&progress), ["resolved", "stored"]);
    assert_eq!(cached, image);
    assert_eq!(source.registry.blob_gets(), blob_gets);

    // Removed by digest; its converted layers are collected behind it.
    d.ok("RemoveImage", json!({ "image": digest }));
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));
    wait_collected(&d.kilnd);

    // Imported from an OCI archive skopeo wrote: converted again, the same
    // manifest, tagged as asked.
    let archive = source.archive(d.kilnd.dir.path());
    let imported = d.more(
        "ImportImage",
        json!({"path": archive, "reference": "localhost/app:archive"}),
    );
    let (progress, imported) = progress_and_image(imported.unwrap());
    assert!(steps(&progress).contains(&"converting"), "{progress:?}");
    assert_eq!(imported["digest"], digest.as_str());
    assert_eq!(imported["references"], json!(["localhost/app:archive"]));
    assert!(imported["source"]
        .as_str()
        .unwrap()
        .starts_with("oci-archive:"));
    // Pulled once more: a cache hit that adds the registry's tag.
    let both = d.ok("PullImage", json!({ "reference": app }))["image"].clone();
    assert_eq!(both["references"], json!([app, "localhost/app:archive"]));

    // While something uses the image it cannot go; one of its two tags can.
    hold(&d.kilnd, &digest, true);
    let by_digest = json!({ "image": digest });
    assert_eq!(
        d.err("RemoveImage", by_digest.clone()),
        "io.kiln.Manager.ImageInUse"
    );
    let held = d.ok("DescribeImage", by_digest.clone())["image"].clone();
    assert_eq!(held["users"], json!(["test:holder"]));
    d.ok("RemoveImage", json!({"image": "localhost/app:archive"}));
    let untagged = d.ok("DescribeImage", by_digest.clone())["image"].clone();
    assert_eq!(untagged["references"], json!([app]));
    hold(&d.kilnd, &digest, false);
    // Its last tag takes the image with it.
    d.ok("RemoveImage", json!({ "image": app }));
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));

    // Watchers saw each change: stored, pulled again, removed, imported,
    // tagged, untagged, removed.
    let mut events = Vec::new();
    while events.len() < 7 {
        let reply = watch
            .next(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the watch ended: {events:?}"));
        let event = &reply["event"];
        if event["type"].as_str().unwrap().starts_with("image") {
            assert_eq!(event["id"], digest.as_str(), "{event}");
            events.push(event["type"].as_str().unwrap().to_owned());
        }
    }
    let added = "imageAdded";
    let removed = "imageRemoved";
    assert_eq!(
        events,
        [added, added, removed, added, added, added, removed]
    );

    // Every refusal has its name, and nothing of a refused image is kept.
    let tampered = source.registry.reference("tampered:v1");
    for (method, params, error) in [
        ("DescribeImage", json!({ "image": app }), "ImageNotFound"),
        ("RemoveImage", json!({ "image": digest }), "ImageNotFound"),
        (
            "ImportImage",
            json!({"path": "/nonexistent/app.tar"}),
            "ImageNotFound",
        ),
        (
            "PullImage",
            json!({"reference": source.registry.reference("nope:v1")}),
            "ImagePullFailed",
        ),
        (
            "PullImage",
            json!({"reference": unreachable_reference()}),
            "ImagePullFailed",
        ),
        (
            "PullImage",
            json!({ "reference": tampered }),
            "InvalidImage",
        ),
        (
            "PullImage",
            json!({"reference": "no spaces"}),
            "InvalidArgument",
        ),
        (
            "PullImage",
            json!({"reference": "x".repeat(600)}),
            "InvalidArgument",
        ),
        (
            "PullImage",
            json!({"reference": "Upper/Case:1"}),
            "InvalidArgument",
        ),
        (
            "DescribeImage",
            json!({"image": "sha256:1234"}),
            "InvalidArgument",
        ),
        (
            "ImportImage",
            json!({"path": "relative/app.tar"}),
            "InvalidArgument",
        ),
    ] {
        let name = d.err(method, params.clone());
        assert_eq!(
            name,
            format!("io.kiln.Manager.{error}"),
            "{method} {params}"
        );
    }
    let (_, why) = d
        .call(
            "io.kiln.Manager.PullImage",
            json!({ "reference": tampered }),
        )
        .unwrap_err();
    assert!(
        why["message"].as_str().unwrap().contains("has digest"),
        "{why}"
    );
    for params in [json!({ "reference": 5 }), json!({})] {
        assert_eq!(
            d.err("PullImage", params),
            "org.varlink.service.InvalidParameter"
        );
    }
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));
    assert_eq!(store_files(&d.kilnd, "tmp"), Vec::<String>::new());

    // An unprivileged caller may look, not change.
    let nobody = Some(65534);
    assert!(d
        .call_as(nobody, "io.kiln.Manager.ListImages", "{}")
        .is_ok());
    for (method, params) in [
        ("PullImage", json!({ "reference": app })),
        ("ImportImage", json!({ "path": archive })),
        ("RemoveImage", json!({ "image": app })),
    ] {
        let method = format!("io.kiln.Manager.{method}");
        let refused = d.call_as(nobody, &method, &params.to_string());
        assert_eq!(
            refused.unwrap_err().0,
            "io.kiln.Manager.PermissionDenied",
            "{method}"
        );
    }
}

/// kilnd reads an import with its own rights, so a caller who may manage
/// (here through `manage_group`) imports only what it could read itself.
#[test]
fn an_import_needs_read_access_for_the_caller() {
    let d = Daemon::start_with("manage_group = \"nogroup\"\n");
    let (layout, _) = two_layers();
    let archive = d.kilnd.dir.path().join("app.tar");
    oci_archive(layout.path(), "v1", &archive);
    let params = json!({ "path": archive }).to_string();
    // uid 65534 with primary group nogroup: allowed to manage.
    let import = |uid| d.call_as(uid, "io.kiln.Manager.ImportImage", &params);

    chmod(&archive, 0o600);
    let refused = import(Some(65534)).unwrap_err();
    assert_eq!(refused.0, "io.kiln.Manager.PermissionDenied", "{refused:?}");
    assert!(refused.1["message"]
        .as_str()
        .unwrap()
        .contains("may not read"));
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));

    chmod(&archive, 0o644);
    let image = import(Some(65534)).unwrap()["image"].clone();
    assert!(image["source"]
        .as_str()
        .unwrap()
        .starts_with("oci-archive:"));
    // Root reads it whatever its mode (a cache hit now).
    chmod(&archive, 0o600);
    assert_eq!(import(None).unwrap()["image"]["digest"], image["digest"]);
}

#[test]
fn dbus_pulls_with_progress_signals_and_names_errors() {
    let source = Source::start();
    let k = DbusKilnd::start_with(false, &source.config());
    let mut monitor = k.monitor();
    let app = source.app();
    let manager = |method: &str, args: &[&str]| k.call(MANAGER, MANAGER_IF, method, args);

    let digest = manager("PullImage", &["s", &app])[0]
        .as_str()
        .unwrap()
        .to_owned();
    // The call emits its progress signals before it replies; the last
    // says every byte is there. `ImageAdded` comes from the event follower,
    // in any order with them.
    let progress = |m: &Value| m["member"] == "ImagePullProgress" && m["type"] == "signal";
    let first = monitor.find("ImagePullProgress", progress);
    assert_eq!(first["payload"]["data"][0], app.as_str());
    let (mut last, mut added) = (None, None);
    while last.is_none() || added.is_none() {
        let m = monitor.find("the last ImagePullProgress and ImageAdded", |m| {
            let data = &m["payload"]["data"];
            let done = data[3] == 0 && data[1] == data[2] && data[1] != 0;
            (progress(m) && done) || m["member"] == "ImageAdded"
        });
        match m["member"].as_str() {
            Some("ImageAdded") => added = Some(m),
            _ => last = Some(m),
        }
    }
    let (last, added) = (last.unwrap(), added.unwrap());
    assert_eq!(last["payload"]["data"][4], 2, "{last}");
    assert_eq!(added["payload"]["data"], json!([digest, [app]]));

    // (digest, references, platform, size, layers, stored_at, users)
    let images = manager("ListImages", &[])[0].clone();
    assert_eq!(images[0][0], digest.as_str());
    assert_eq!(images[0][1], json!([app]));
    assert_eq!(images[0][4], 2);
    let described = manager("DescribeImage", &["s", &app]);
    assert_eq!(described[0], images[0]);
    assert_eq!(described[1].as_array().unwrap().len(), 2);
    assert_eq!(described[2][0], json!(["/bin/sh"]));
    // The same image over varlink.
    let over_varlink = k.varlinkctl("DescribeImage", json!({ "image": digest }));
    assert_eq!(over_varlink["image"]["references"], json!([app]));

    // A cache hit; an import of an OCI archive with a tag.
    assert_eq!(manager("PullImage", &["s", &app])[0], digest.as_str());
    let archive = source.archive(k.kilnd.dir.path());
    let archive = archive.to_str().unwrap();
    let tag = "localhost/app:dbus";
    assert_eq!(
        manager("ImportImage", &["ss", archive, tag])[0],
        digest.as_str()
    );

    // In use, then free: removed tag by tag.
    hold(&k.kilnd, &digest, true);
    k.call_err(None, MANAGER, MANAGER_IF, "RemoveImage", &["s", &digest]);
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.ImageInUse");
    hold(&k.kilnd, &digest, false);
    manager("RemoveImage", &["s", tag]);
    manager("RemoveImage", &["s", &app]);
    let removed = monitor.find("ImageRemoved", |m| m["member"] == "ImageRemoved");
    assert_eq!(removed["payload"]["data"], json!([digest]));
    assert_eq!(manager("ListImages", &[])[0], json!([]));

    let nope = source.registry.reference("nope:v1");
    let tampered = source.registry.reference("tampered:v1");
    for (method, args, error) in [
        ("DescribeImage", vec!["s", &app], "ImageNotFound"),
        ("PullImage", vec!["s", &nope], "ImagePullFailed"),
        ("PullImage", vec!["s", &tampered], "InvalidImage"),
        ("PullImage", vec!["s", "no spaces"], "InvalidArgument"),
        (
            "ImportImage",
            vec!["ss", "relative.tar", ""],
            "InvalidArgument",
        ),
    ] {
        k.call_err(None, MANAGER, MANAGER_IF, method, &args);
        let name = monitor.error_name();
        assert_eq!(name, format!("io.kiln.Kiln1.Error.{error}"), "{method}");
    }
    // nobody may list, not pull.
    let listed = k.busctl_as(
        Some(65534),
        &["call", NAME, MANAGER, MANAGER_IF, "ListImages"],
    );
    assert!(listed.status.success());
    let refused = k.call_err(Some(65534), MANAGER, MANAGER_IF, "PullImage", &["s", &app]);
    assert!(refused.contains("io.kiln.manage"), "{refused}");
    assert_eq!(monitor.error_name(), "io.kiln.Kiln1.Error.PermissionDenied");
}

/// kill -9 of kilnd while it pulls: the store holds no record and no tag
/// of the image, the next kilnd opens it (sweeping what the pull left in
/// `tmp/`) and pulls the image whole.
#[test]
fn kill_9_mid_pull_leaves_a_store_the_next_kilnd_pulls_into() {
    let registry = Registry::start();
    // 24 MiB that do not compress: long enough to be caught mid-way.
    let big = Layer::plain(&[file("noise", &noise(24 << 20))]);
    let layout = one_image(&[busybox_layer(), big], "big");
    registry.push(layout.path(), "big", "big:1", false);
    let reference = registry.reference("big:1");
    let mut d = Daemon::start_with(&format!(
        "image_insecure_registries = [\"{}\"]\n",
        registry.host()
    ));

    let params = json!({ "reference": reference }).to_string();
    let mut pull = Command::new("varlinkctl")
        .args(["call", "--more", "--json=short", &d.address()])
        .args(["io.kiln.Manager.PullImage", &params])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut big_started = None;
    let lines = BufReader::new(pull.stdout.take().unwrap()).lines();
    'read: for line in lines {
        for reply in json_seq(&line.unwrap()) {
            assert!(reply["image"].is_null(), "the pull ended first: {seen:#?}");
            let p = reply["progress"].clone();
            let done = p["doneBytes"].as_u64().unwrap();
            seen.push(p.clone());
            // The big layer, once under way.
            let under_way = p["layer"] == 2
                && match p["step"].as_str().unwrap() {
                    "downloading" => done > *big_started.get_or_insert(done),
                    step => step == "checking" || step == "converting",
                };
            if under_way {
                d.sigkill();
                break 'read;
            }
        }
    }
    let _ = pull.wait();
    let killed_at = seen.last().unwrap().clone();
    eprintln!("killed at {killed_at}");
    assert_eq!(killed_at["layer"], 2, "{seen:#?}");

    // No record, no tag; at most the base layer converted.
    assert_eq!(store_files(&d.kilnd, "images/sha256"), Vec::<String>::new());
    assert!(!d.kilnd.dir.path().join("state/images/refs.json").exists());
    assert!(store_files(&d.kilnd, "erofs/sha256").len() <= 1);
    eprintln!("left in tmp/: {:?}", store_files(&d.kilnd, "tmp"));

    // The next kilnd opens it, sweeps tmp/, lists nothing and pulls again.
    d.spawn();
    assert_eq!(store_files(&d.kilnd, "tmp"), Vec::<String>::new());
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([]));
    let image = d.ok("PullImage", json!({ "reference": reference }))["image"].clone();
    assert_eq!(image["layers"].as_array().unwrap().len(), 2);
    assert_eq!(d.ok("ListImages", json!({}))["images"], json!([image]));
    assert_eq!(store_files(&d.kilnd, "erofs/sha256").len(), 2);
    assert_eq!(store_files(&d.kilnd, "tmp"), Vec::<String>::new());
}

/// The examples of docs/api.md's Images section (varlink and D-Bus) run
/// verbatim against a kilnd on a private bus and a registry holding
/// `app:v1`.
#[test]
fn image_doc_examples_run() {
    let source = Source::start();
    let k = DbusKilnd::start_with(false, &source.config());
    let script = api_doc_script(
        "## Images",
        &[
            (
                "SOCK=unix:/run/kiln/io.kiln.Manager",
                format!("SOCK={}", k.kilnd.varlink_address()),
            ),
            (
                "REGISTRY=127.0.0.1:5000",
                format!("REGISTRY={}", source.registry.host()),
            ),
            ("busctl --system", format!("busctl --address={}", k.address)),
        ],
    );
    let stdout = run_bash(&script, &k.log());
    assert!(stdout.contains("\"step\":\"stored\""), "{stdout}");
    assert!(stdout.contains("localhost/app:imported"), "{stdout}");
    let left = k.varlinkctl("ListImages", json!({}));
    assert_eq!(
        left["images"],
        json!([]),
        "the examples remove what they add"
    );
}
