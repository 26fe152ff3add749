//! Users, removal and GC; and a pull killed with SIGKILL in a child
//! process, at the download and at the conversion, leaving a store that
//! reopens clean and pulls again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use kiln_image::{no_progress, Acquired, ImageError, ImageStore, Released, Removed, StoreConfig};
use support::*;

#[tokio::test]
async fn remove_is_refused_while_in_use_and_gc_frees_only_unused_files() {
    // Two images sharing their base layer, each in a layout of its own.
    let base = busybox_layer();
    let layout = |top: Layer| one_image(&[base.clone(), top], "1");
    let (dir_a, dir_b) = (
        layout(Layer::gzip(&[file("a", b"a")])),
        layout(Layer::gzip(&[file("b", b"b")])),
    );
    let t = TestStore::new(None);
    let s = &t.store;
    let img_a = s
        .import(dir_a.path(), Some("localhost/a:1"), &no_progress)
        .await
        .unwrap();
    s.import(dir_a.path(), Some("localhost/a:latest"), &no_progress)
        .await
        .unwrap();
    let img_b = s
        .import(dir_b.path(), Some("localhost/b:1"), &no_progress)
        .await
        .unwrap();
    assert_eq!(t.files("erofs/sha256").len(), 3, "base, a, b");
    let da = img_a.record.digest.clone();

    assert_eq!(
        s.acquire("localhost/a:1", "vm:1").await.unwrap(),
        Acquired::Acquired { digest: da.clone() }
    );
    assert_eq!(
        s.acquire(da.as_str(), "vm:1").await.unwrap(),
        Acquired::AlreadyHeld { digest: da.clone() }
    );
    s.acquire("localhost/a:latest", "pool:web").await.unwrap();
    // Users survive a reopen (they are on disk).
    let reopened = ImageStore::open(t.root(), StoreConfig::default()).unwrap();
    assert_eq!(
        reopened.describe(da.as_str()).await.unwrap().users,
        ["pool:web", "vm:1"]
    );

    // One of two tags goes; the last tag or the digest is refused.
    assert_eq!(
        s.remove("localhost/a:1").await.unwrap(),
        Removed::Untagged { digest: da.clone() }
    );
    for what in ["localhost/a:latest", da.as_str()] {
        match s.remove(what).await.unwrap_err() {
            ImageError::ImageInUse { users, .. } => assert_eq!(users, ["pool:web", "vm:1"]),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(
        s.release(da.as_str(), "vm:1").await.unwrap(),
        Released::Released
    );
    assert_eq!(
        s.release(da.as_str(), "vm:1").await.unwrap(),
        Released::NotHeld
    );
    assert_eq!(
        s.release("localhost/a:latest", "pool:web").await.unwrap(),
        Released::Released
    );
    // Nothing removed by GC while the image is recorded.
    assert_eq!(s.gc().await.unwrap().layers, 0);

    assert_eq!(
        s.remove("localhost/a:latest").await.unwrap(),
        Removed::Deleted { digest: da.clone() }
    );
    assert_eq!(
        s.describe(da.as_str()).await.unwrap_err().name(),
        "ImageNotFound"
    );
    assert_eq!(
        s.remove(da.as_str()).await.unwrap_err().name(),
        "ImageNotFound"
    );
    assert_eq!(
        s.acquire(da.as_str(), "vm:2").await.unwrap_err().name(),
        "ImageNotFound"
    );

    let report = s.gc().await.unwrap();
    assert_eq!(
        (report.layers, report.blobs),
        (1, 2),
        "a's layer, manifest and config"
    );
    assert!(report.bytes > 0);
    // b and the shared base layer stay.
    let b = s.describe("localhost/b:1").await.unwrap();
    assert_eq!(b.record, img_b.record);
    for layer in &b.record.layers {
        assert!(s.erofs_path(layer).is_file());
    }
    assert_eq!(t.files("erofs/sha256").len(), 2);
    assert_eq!(s.gc().await.unwrap(), Default::default());
}

/// The child side of the kill test: pull, printing every progress event.
/// Run only by `pull_killed_mid_way_leaves_a_consistent_store`.
#[tokio::test]
#[ignore = "helper process of pull_killed_mid_way_leaves_a_consistent_store"]
async fn child_pull() {
    let root = std::env::var("KILN_IMAGE_CHILD_ROOT").expect("run by the kill test");
    let reference = std::env::var("KILN_IMAGE_CHILD_REF").unwrap();
    let registry = std::env::var("KILN_IMAGE_CHILD_REGISTRY").unwrap();
    let config = StoreConfig {
        insecure_registries: vec![registry],
        ..Default::default()
    };
    let store = ImageStore::open(root, config).unwrap();
    let print = |p| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "EVENT {}", serde_json::to_string(&p).unwrap()).unwrap();
        out.flush().unwrap();
    };
    store.pull(&reference, &print).await.unwrap();
    println!("EVENT done");
}

#[tokio::test]
async fn pull_killed_mid_way_leaves_a_consistent_store() {
    let registry = Registry::start();
    // Random data, uncompressed: a 24 MiB download and conversion, long
    // enough to be caught in the middle.
    let layers = [
        busybox_layer(),
        Layer::plain(&[file("noise", &noise(24 << 20))]),
    ];
    let dir = one_image(&layers, "big");
    registry.push(dir.path(), "big", "big:1", false);
    let reference = registry.reference("big:1");

    let t = TestStore::new(Some(&registry));
    for kill_at in [r#""step":"downloading""#, r#""step":"converting""#] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_pull", "--ignored", "--nocapture"])
            .env("KILN_IMAGE_CHILD_ROOT", t.root())
            .env("KILN_IMAGE_CHILD_REF", &reference)
            .env("KILN_IMAGE_CHILD_REGISTRY", registry.host())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if !line.starts_with("EVENT") {
                continue;
            }
            seen.push(line.clone());
            // The big layer (index 1), once it is under way.
            if line.contains(r#""index":1"#)
                && line.contains(kill_at)
                && !line.contains(r#""done":0,"#)
            {
                child.kill().unwrap(); // SIGKILL
                break;
            }
            assert_ne!(
                line, "EVENT done",
                "the pull finished before {kill_at}: {seen:#?}"
            );
        }
        child.wait().unwrap();
        eprintln!("killed at {kill_at}; last event: {:?}", seen.last());

        // What the kill left: no record, no tag; only whole erofs images
        // (the base layer's may be done); temp files at most in tmp/.
        assert_eq!(t.files("images/sha256"), Vec::<String>::new());
        assert!(!t.root().join("refs.json").exists());
        let leftovers = t.files("tmp");
        eprintln!("left in tmp/: {leftovers:?}");
        for layer in t.files("erofs/sha256") {
            assert_eq!(
                layer,
                format!("{}.erofs", &layers[0].diff_id()[7..]),
                "only the base is complete"
            );
        }
        // Reopening sweeps tmp/ (nobody else holds the store).
        let store = ImageStore::open(t.root(), t.store.config().clone()).unwrap();
        assert_eq!(t.files("tmp"), Vec::<String>::new());
        assert!(store.list().await.unwrap().is_empty());
    }

    // The store pulls the image again, whole, and nothing is left over.
    let image = t.pull(&reference).await.unwrap();
    assert_eq!(image.record.layers.len(), 2);
    for layer in &image.record.layers {
        assert_eq!(
            std::fs::metadata(t.store.erofs_path(layer)).unwrap().len(),
            layer.erofs_size
        );
    }
    assert_eq!(t.store.gc().await.unwrap().layers, 0);
    assert_eq!(t.files("tmp"), Vec::<String>::new());
}
