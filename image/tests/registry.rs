//! Pulls from a real registry (Debian's docker-registry on 127.0.0.1),
//! images pushed with real skopeo: by tag and by digest, the cache hit,
//! multi-arch indexes, another architecture, a tampered blob, basic auth
//! from an auth file, size limits, concurrent pulls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use kiln_image::{ImageError, InvalidReason, LayerStep, Progress};
use support::*;

/// A two-layer image (busybox; a file and an env) pushed as `name:tag`.
fn push_two_layers(registry: &Registry, name_tag: &str) -> (tempfile::TempDir, Vec<Layer>) {
    let (dir, layers) = two_layers();
    registry.push(dir.path(), "v1", name_tag, false);
    (dir, layers)
}

#[tokio::test]
async fn pull_by_tag_then_by_digest_then_cache_hit() {
    let registry = Registry::start();
    let (_layout, layers) = push_two_layers(&registry, "app:v1");
    let t = TestStore::new(Some(&registry));
    let events = Events::default();
    let sink = events.sink();

    let image = t
        .store
        .pull(&registry.reference("app:v1"), &sink)
        .await
        .unwrap();
    let r = &image.record;
    assert_eq!(image.references, [registry.reference("app:v1")]);
    assert_eq!(r.layers.len(), 2);
    assert_eq!(r.platform.architecture, "amd64");
    assert_eq!(r.process.entrypoint, ["/bin/sh"]);
    assert_eq!(r.process.cmd, ["-c", "cat /etc/hello"]);
    assert_eq!(r.process.env, ["PATH=/bin", "GREETING=hi"]);
    assert_eq!(r.process.working_dir.as_deref(), Some("/etc"));
    assert_eq!(r.process.user.as_deref(), Some("0:0"));
    assert_eq!(r.created.as_deref(), Some("2024-05-01T00:00:00Z"));
    for (layer, built) in r.layers.iter().zip(&layers) {
        assert_eq!(layer.diff_id.as_str(), built.diff_id());
        let erofs = t.store.erofs_path(layer);
        assert_eq!(std::fs::metadata(&erofs).unwrap().len(), layer.erofs_size);
    }
    assert_eq!(r.size, r.layers.iter().map(|l| l.erofs_size).sum::<u64>());
    let first = events.take();
    assert_eq!(
        count_steps(&first, |s| matches!(s, LayerStep::Converting)),
        2
    );
    assert!(matches!(
        first.last(),
        Some(Progress::Stored { cached: false, .. })
    ));
    assert_eq!(t.files("tmp"), Vec::<String>::new());

    // By digest: the same image, stored, nothing fetched but the manifest.
    let gets = registry.blob_gets();
    assert_eq!(gets, 3, "config and two layers, each fetched once");
    let by_digest = format!("{}@{}", registry.reference("app"), r.digest);
    let again = t.store.pull(&by_digest, &sink).await.unwrap();
    assert_eq!(again.record, image.record);
    // And by tag once more.
    let started = std::time::Instant::now();
    let third = t
        .store
        .pull(&registry.reference("app:v1"), &sink)
        .await
        .unwrap();
    let cache_hit = started.elapsed();
    assert_eq!(third.record.digest, r.digest);
    let cached = events.take();
    assert_eq!(
        count_steps(&cached, |s| matches!(s, LayerStep::Downloading { .. })),
        0
    );
    assert!(cached
        .iter()
        .all(|e| !matches!(e, Progress::Stored { cached: false, .. })));
    assert_eq!(registry.blob_gets(), gets, "a cache hit downloaded blobs");
    eprintln!("cache-hit pull by tag took {cache_hit:?}");

    // describe by tag and by digest, list.
    assert_eq!(
        t.store
            .describe(&registry.reference("app:v1"))
            .await
            .unwrap()
            .record
            .digest,
        r.digest
    );
    assert_eq!(
        t.store
            .describe(r.digest.as_str())
            .await
            .unwrap()
            .references,
        image.references
    );
    assert_eq!(t.store.list().await.unwrap().len(), 1);
    let missing = t
        .store
        .describe(&registry.reference("app:v2"))
        .await
        .unwrap_err();
    assert_eq!(missing.name(), "ImageNotFound");
}

#[tokio::test]
async fn multi_arch_index_resolves_to_the_host() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let amd = layout.image("amd64", &[busybox_layer()]);
    let arm = layout.image(
        "arm64",
        &[Layer::gzip(&[
            Entry::Dir("etc/"),
            file("etc/arch", b"arm64\n"),
        ])],
    );
    let index = layout.index(&[arm, amd.clone()]);
    layout.tag(index.clone(), "multi");
    registry.push(dir.path(), "multi", "multi:1", true);

    let t = TestStore::new(Some(&registry));
    let image = t.pull(&registry.reference("multi:1")).await.unwrap();
    assert_eq!(image.record.platform.architecture, "amd64");
    assert_eq!(
        image.record.digest.as_str(),
        amd["digest"].as_str().unwrap()
    );
    assert_eq!(
        image.record.index_digest.as_ref().map(|d| d.as_str()),
        index["digest"].as_str()
    );
    assert_eq!(image.record.layers.len(), 1);
}

#[tokio::test]
async fn another_architecture_only_is_invalid_and_stores_nothing() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let arm_layer = Layer::gzip(&[Entry::Dir("etc/"), file("etc/arch", b"arm64\n")]);
    let arm = layout.image("arm64", std::slice::from_ref(&arm_layer));
    let index = layout.index(std::slice::from_ref(&arm));
    layout.tag(index, "index");
    layout.tag(arm, "single");
    registry.push(dir.path(), "index", "arm:index", true);
    registry.push(dir.path(), "single", "arm:single", false);

    let t = TestStore::new(Some(&registry));
    for tag in ["arm:index", "arm:single"] {
        let err = t.pull(&registry.reference(tag)).await.unwrap_err();
        match &err {
            ImageError::InvalidImage {
                reason: InvalidReason::Platform { wanted, available },
                ..
            } => {
                assert_eq!(wanted, "linux/amd64");
                assert_eq!(available, &["linux/arm64".to_owned()]);
            }
            other => panic!("{tag}: {other:?}"),
        }
        assert_eq!(err.name(), "InvalidImage");
    }
    t.assert_empty();
}

#[tokio::test]
async fn tampered_blob_is_invalid_and_nothing_is_stored() {
    let registry = Registry::start();
    let (_layout, layers) = push_two_layers(&registry, "app:v1");
    // Flip a byte of the second layer's blob in the registry's storage: the
    // registry still serves it under its old digest.
    let blob = layers[1].blob();
    let path = registry.blob_file(&sha256(&blob));
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let t = TestStore::new(Some(&registry));
    let err = t.pull(&registry.reference("app:v1")).await.unwrap_err();
    eprintln!(
        "tampered: {err}: {}",
        std::error::Error::source(&err).unwrap()
    );
    assert!(
        matches!(reason(&err), InvalidReason::DigestMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(t.files("images/sha256"), Vec::<String>::new());
    assert_eq!(t.files("blobs/sha256"), Vec::<String>::new());
    assert_eq!(t.files("tmp"), Vec::<String>::new());
    // The untampered base layer may have been converted before the bad one
    // was reached: a complete, verified layer that GC frees.
    assert!(t.files("erofs/sha256").len() <= 1);
    t.store.gc().await.unwrap();
    t.assert_empty();
}

#[tokio::test]
async fn basic_auth_with_the_auth_file() {
    let registry = Registry::with_auth("kiln", "s3cret");
    push_two_layers(&registry, "private:v1");
    let reference = registry.reference("private:v1");

    let anonymous = TestStore::new(Some(&registry));
    let err = anonymous.pull(&reference).await.unwrap_err();
    eprintln!("anonymous: {err}");
    assert_eq!(err.name(), "ImagePullFailed", "{err:?}");
    anonymous.assert_empty();

    let wrong = auth_file(&registry.host(), "kiln", "wrong");
    let t = TestStore::with(Some(&registry), |c| {
        c.auth_file = Some(wrong.path().to_owned())
    });
    let err = t.pull(&reference).await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert_eq!(err.name(), "ImagePullFailed", "{err:?}");

    let right = auth_file(&registry.host(), "kiln", "s3cret");
    let t = TestStore::with(Some(&registry), |c| {
        c.auth_file = Some(right.path().to_owned())
    });
    let image = t.pull(&reference).await.unwrap();
    assert_eq!(image.record.layers.len(), 2);
}

#[tokio::test]
async fn size_limit_refuses_large_and_bomb_layers() {
    let registry = Registry::start();
    // 8 MiB of zeros: a few KiB compressed, a bomb uncompressed.
    let bomb = Layer::gzip(&[file("zeros", &vec![0u8; 8 << 20])]);
    let dir = one_image(&[bomb], "bomb");
    registry.push(dir.path(), "bomb", "bomb:1", false);
    push_two_layers(&registry, "app:v1");

    let t = TestStore::with(Some(&registry), |c| c.max_image_bytes = 1 << 20);
    // The bomb: small compressed, stopped while the scan streams it.
    let err = t.pull(&registry.reference("bomb:1")).await.unwrap_err();
    assert!(
        matches!(reason(&err), InvalidReason::TooLarge { limit: 1048576 }),
        "{err:?}"
    );
    // busybox alone is over 1 MiB compressed: refused before downloading.
    let gets = registry.blob_gets();
    let err = t.pull(&registry.reference("app:v1")).await.unwrap_err();
    assert!(
        matches!(reason(&err), InvalidReason::TooLarge { .. }),
        "{err:?}"
    );
    assert_eq!(registry.blob_gets(), gets);
    t.assert_empty();
}

#[tokio::test]
async fn concurrent_pulls_of_one_image_convert_each_layer_once() {
    let registry = Registry::start();
    push_two_layers(&registry, "app:v1");
    let t = TestStore::new(Some(&registry));
    // A second store handle on the same root, as a second process would be.
    let other = kiln_image::ImageStore::open(t.root(), t.store.config().clone()).unwrap();
    let events = Events::default();
    let (a, b) = (events.sink(), events.sink());
    let reference = registry.reference("app:v1");
    let (x, y) = tokio::join!(t.store.pull(&reference, &a), other.pull(&reference, &b));
    assert_eq!(x.unwrap().record.digest, y.unwrap().record.digest);
    let all = events.take();
    assert_eq!(count_steps(&all, |s| matches!(s, LayerStep::Converting)), 2);
    assert_eq!(t.files("erofs/sha256").len(), 2);
    assert_eq!(t.files("images/sha256").len(), 1);
}

#[tokio::test]
async fn bearer_tokens_from_the_challenge_realm() {
    let registry = Registry::with_token_auth("kiln", "s3cret");
    push_two_layers(&registry, "team/private:v1");
    let reference = registry.reference("team/private:v1");

    // Anonymous: the token server grants nothing, the registry refuses.
    let anonymous = TestStore::new(Some(&registry));
    let err = anonymous.pull(&reference).await.unwrap_err();
    eprintln!("anonymous: {err}");
    assert_eq!(err.name(), "ImagePullFailed", "{err:?}");
    anonymous.assert_empty();

    // With the auth file (keyed by namespace): a token for the pull scope.
    let file = auth_file(&format!("{}/team", registry.host()), "kiln", "s3cret");
    let t = TestStore::with(Some(&registry), |c| {
        c.auth_file = Some(file.path().to_owned())
    });
    let before = registry.token_requests().len();
    let image = t.pull(&reference).await.unwrap();
    assert_eq!(image.record.layers.len(), 2);
    let ours = &registry.token_requests()[before..];
    assert!(
        ours.iter()
            .any(|r| r.contains("scope=repository%3Ateam%2Fprivate%3Apull")
                && r.ends_with("authorized=true")),
        "{ours:#?}"
    );
}
