//! Imports: an OCI layout directory, an OCI archive and a docker archive
//! (both written by real skopeo), zstd layers, and the layer tars the
//! safety scan refuses before mkfs.erofs sees them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use kiln_image::{no_progress, ImageError, InvalidReason, LayerStep, Progress};
use kiln_testkit::run;
use support::*;

#[tokio::test]
async fn import_layout_dir_oci_archive_and_docker_archive() {
    let (layout, layers) = two_layers();
    let t = TestStore::new(None);
    let events = Events::default();
    let sink = events.sink();

    let from_dir = t
        .store
        .import(layout.path(), Some("localhost/app:v1"), &sink)
        .await
        .unwrap();
    assert_eq!(from_dir.references, ["localhost/app:v1"]);
    assert!(from_dir.record.source.starts_with("oci:"));
    let built: Vec<String> = layers.iter().map(Layer::diff_id).collect();
    let stored = diff_ids(&from_dir);
    assert_eq!(stored, built);
    assert_eq!(
        count_steps(&events.take(), |s| matches!(s, LayerStep::Converting)),
        2
    );

    // skopeo writes both archive kinds from the same layout.
    let archives = tempfile::tempdir().unwrap();
    let oci_archive = archives.path().join("app-oci.tar");
    let docker_archive = archives.path().join("app-docker.tar");
    let src = format!("oci:{}:v1", layout.path().display());
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", &src])
        .arg(format!("oci-archive:{}:v1", oci_archive.display())));
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", &src])
        .arg(format!(
            "docker-archive:{}:localhost/app:docker",
            docker_archive.display()
        )));

    // Each archive into a store of its own: every blob read from the tar.
    for (archive, source) in [
        (&oci_archive, "oci-archive:"),
        (&docker_archive, "docker-archive:"),
    ] {
        let fresh = TestStore::new(None);
        let image = fresh.store.import(archive, None, &sink).await.unwrap();
        assert!(
            image.record.source.starts_with(source),
            "{}",
            image.record.source
        );
        let ids = diff_ids(&image);
        assert_eq!(ids, built, "{source}");
        assert_eq!(image.record.process, from_dir.record.process, "{source}");
        assert_eq!(
            count_steps(&events.take(), |s| matches!(s, LayerStep::Converting)),
            2
        );
        for layer in &image.record.layers {
            assert!(fresh.store.erofs_path(layer).is_file());
        }
    }

    // Into the first store: the OCI archive has the directory's manifest,
    // a cache hit.
    let from_oci = t.store.import(&oci_archive, None, &sink).await.unwrap();
    assert_eq!(from_oci.record.digest, from_dir.record.digest);
    assert!(matches!(
        events.take().last(),
        Some(Progress::Stored { cached: true, .. })
    ));

    let from_docker = t.store.import(&docker_archive, None, &sink).await.unwrap();
    assert!(from_docker.record.source.starts_with("docker-archive:"));
    assert_eq!(from_docker.references, ["localhost/app:docker"]);
    // Its layers are the uncompressed tars: other blobs, same diff ids, so
    // the erofs images made from the gzip layers are reused.
    let docker_ids = diff_ids(&from_docker);
    assert_eq!(docker_ids, built);
    assert_eq!(from_docker.record.process, from_dir.record.process);
    let steps = events.take();
    assert_eq!(
        count_steps(&steps, |s| matches!(s, LayerStep::Converting)),
        0,
        "{steps:?}"
    );
    assert_eq!(t.files("erofs/sha256").len(), 2);
    assert_eq!(t.store.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn several_images_in_a_layout_need_a_tag() {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let a = layout.image("amd64", &[Layer::gzip(&[file("a", b"a")])]);
    let b = layout.image("amd64", &[Layer::gzip(&[file("b", b"b")])]);
    layout.tag(a.clone(), "a").tag(b, "b");
    let t = TestStore::new(None);
    let err = t.import(dir.path()).await.unwrap_err();
    assert_eq!(err.name(), "ImageNotFound", "{err}");
    let image = t
        .store
        .import(dir.path(), Some("localhost/x:a"), &no_progress)
        .await
        .unwrap();
    assert_eq!(image.record.digest.as_str(), a["digest"].as_str().unwrap());
}

#[tokio::test]
async fn zstd_layers_are_decoded_and_converted() {
    let layer = Layer::zstd(&[Entry::Dir("etc/"), file("etc/z", b"zstd layer\n")]);
    let dir = one_image(std::slice::from_ref(&layer), "z");
    let t = TestStore::new(None);
    let image = t.import(dir.path()).await.unwrap();
    assert_eq!(image.record.layers[0].media_type, TAR_ZSTD);
    assert_eq!(image.record.layers[0].diff_id.as_str(), layer.diff_id());
    assert!(image.record.layers[0].erofs_size > 0);
}

/// Import a one-layer image made of `entries`; the error.
async fn import_layer(entries: &[Entry]) -> (TestStore, Result<kiln_image::Image, ImageError>) {
    let dir = one_image(&[Layer::gzip(entries)], "t");
    let t = TestStore::new(None);
    let result = t.import(dir.path()).await;
    (t, result)
}

#[tokio::test]
async fn unsafe_layers_are_refused_before_conversion() {
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "dot-dot path",
            vec![file("../escape", b"x")],
            "climbs with ..",
        ),
        (
            "nested dot-dot",
            vec![Entry::Dir("a/"), file("a/../../x", b"x")],
            "climbs with ..",
        ),
        (
            "absolute path",
            vec![file("/etc/passwd", b"x")],
            "is absolute",
        ),
        (
            "write through an absolute symlink",
            vec![
                Entry::Symlink("etc", "/etc"),
                file("etc/passwd", b"root::0:0::/:/bin/sh\n"),
            ],
            "is written through a symlink",
        ),
        (
            "write through a relative symlink",
            vec![
                Entry::Dir("a/"),
                Entry::Symlink("a/up", ".."),
                file("a/up/x", b"x"),
            ],
            "is written through a symlink",
        ),
        (
            "hard link to an absolute path",
            vec![Entry::Hardlink("shadow", "/etc/shadow")],
            "is a hard link to an absolute path",
        ),
        (
            "hard link climbing",
            vec![Entry::Hardlink("shadow", "../etc/shadow")],
            "is a hard link that climbs with ..",
        ),
        (
            "relative symlink above the root",
            vec![Entry::Dir("a/"), Entry::Symlink("a/root", "../../..")],
            "is a symlink that points above the root",
        ),
    ];
    for (what, entries, why) in cases {
        let (t, result) = import_layer(&entries).await;
        let err = result.expect_err(what);
        match &err {
            ImageError::InvalidImage {
                reason: InvalidReason::UnsafeLayer { why: got, .. },
                ..
            } => assert_eq!(*got, why, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        // Refused before mkfs.erofs ran: no layer, no record, no leftovers.
        t.assert_empty();
    }
}

#[tokio::test]
async fn absolute_symlinks_alone_are_accepted() {
    // Distribution images are full of them (/etc/alternatives/*); inside
    // the guest they resolve within the image.
    let (_t, result) = import_layer(&[
        Entry::Dir("usr/"),
        Entry::Dir("usr/bin/"),
        Entry::Symlink("usr/bin/awk", "/etc/alternatives/awk"),
        Entry::Symlink("lib64", "/usr/lib64"),
    ])
    .await;
    result.unwrap();
}

#[tokio::test]
async fn data_after_the_end_of_the_tar_is_refused() {
    let mut tar = tar(&[file("ok", b"ok")]);
    // A second archive appended after the end marker: tar(1) -i or another
    // parser might read it.
    tar.extend(support::tar(&[file("../hidden", b"x")]));
    let layer = Layer {
        tar,
        media_type: TAR,
    };
    let dir = one_image(&[layer], "t");
    let t = TestStore::new(None);
    let err = t.import(dir.path()).await.unwrap_err();
    assert!(
        matches!(
            reason(&err),
            InvalidReason::UnsafeLayer {
                why: "has data after the end of the archive",
                ..
            }
        ),
        "{err:?}"
    );
    t.assert_empty();
}

#[tokio::test]
async fn a_layer_that_is_not_its_diff_id_is_refused() {
    // A config whose diff id is another tar's: the blob matches its own
    // digest, but not what the (digest-checked) config says it unpacks to.
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let mut lying = Layer::gzip(&[file("a", b"a")]);
    let honest_blob = lying.blob();
    lying.tar = support::tar(&[file("b", b"b")]); // diff id of other content
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [lying.diff_id()]}
    });
    let config = layout.blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
    let layer = layout.blob(TAR_GZIP, &honest_blob);
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                      "config": config, "layers": [layer]});
    let desc = layout.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
    layout.tag(desc, "t");
    let t = TestStore::new(None);
    let err = t.import(dir.path()).await.unwrap_err();
    assert!(
        matches!(reason(&err), InvalidReason::DiffIdMismatch { .. }),
        "{err:?}"
    );
    t.assert_empty();
}
