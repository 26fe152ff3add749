//! The converted layers as a guest will use them: each erofs image mounted
//! (`mount -t erofs -o loop`), overlayfs on top; a whiteout hides a lower
//! file, an opaque directory hides the lower directory's contents. Root
//! only (fails in CI when not root).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::{LayerStep, Progress};
use kiln_testkit::run;
use support::*;

/// Mount points, unmounted (top first) on drop, also when the test fails.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], target: &Path) {
        std::fs::create_dir_all(target).unwrap();
        run(Command::new("mount").args(args).arg(target));
        self.0.push(target.to_owned());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = Command::new("umount").arg(target).status();
        }
    }
}

/// Each erofs layer of `image` mounted read-only under `mnt` (`l0`, `l1`,
/// ... lowest first): the mounts and their mount points.
fn mount_layers(t: &TestStore, image: &kiln_image::Image, mnt: &Path) -> (Mounts, Vec<PathBuf>) {
    let mut mounts = Mounts(Vec::new());
    let mut lowers = Vec::new();
    for (i, layer) in image.record.layers.iter().enumerate() {
        let target = mnt.join(format!("l{i}"));
        let erofs = t.store.erofs_path(layer);
        mounts.mount(
            &["-t", "erofs", "-o", "loop,ro", erofs.to_str().unwrap()],
            &target,
        );
        lowers.push(target);
    }
    (mounts, lowers)
}

#[tokio::test]
async fn whiteouts_and_opaque_dirs_work_in_the_merged_view() {
    if !kiln_testkit::require_root("mounts erofs images and overlayfs") {
        return;
    }
    let base = Layer::gzip(&[
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", busybox(), 0o755),
        Entry::Dir("etc/"),
        file("etc/gone", b"deleted by the upper layer\n"),
        file("etc/kept", b"kept\n"),
        Entry::Dir("data/"),
        file("data/old", b"hidden by the opaque dir\n"),
    ]);
    // zstd, so the decoded-and-piped path is checked by content too.
    let upper = Layer::zstd(&[
        Entry::Dir("etc/"),
        file("etc/.wh.gone", b""),
        file("etc/new", b"new\n"),
        Entry::Dir("data/"),
        file("data/.wh..wh..opq", b""),
        file("data/fresh", b"fresh\n"),
    ]);
    let dir = one_image(&[base, upper], "t");
    let t = TestStore::new(None);
    let image = t.import(dir.path()).await.unwrap();

    let mnt = tempfile::tempdir().unwrap();
    let (mut mounts, lowers) = mount_layers(&t, &image, mnt.path());
    // The upper erofs image holds the overlayfs whiteout itself.
    let wh = std::fs::symlink_metadata(lowers[1].join("etc/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "whiteout is a 0/0 char device"
    );

    let lowerdir = format!("lowerdir={}:{}", lowers[1].display(), lowers[0].display());
    let merged = mnt.path().join("merged");
    mounts.mount(&["-t", "overlay", "overlay", "-o", &lowerdir], &merged);

    assert!(
        !merged.join("etc/gone").exists(),
        "whiteout hides the lower file"
    );
    assert_eq!(std::fs::read(merged.join("etc/kept")).unwrap(), b"kept\n");
    assert_eq!(std::fs::read(merged.join("etc/new")).unwrap(), b"new\n");
    let mut data: Vec<String> = std::fs::read_dir(merged.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    data.sort();
    assert_eq!(data, ["fresh"], "the opaque dir hides data/old");
    // The image's own binary runs from the merged view.
    let out = run(Command::new(merged.join("bin/busybox"))
        .args(["cat"])
        .arg(merged.join("etc/kept")));
    assert_eq!(out, "kept\n");
}

/// Sets xattr `name` to `value` on `path`.
fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let (path, name) = (
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap(),
        std::ffi::CString::new(name).unwrap(),
    );
    // SAFETY: both strings are NUL-terminated and outlive the call; value
    // is a valid buffer of value.len() bytes.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Layer directories as containerd's overlayfs snapshotter keeps them
/// (whiteouts as overlayfs ones already) become erofs layers with their
/// owners, links, whiteouts and opaque directories; converted once: the
/// same directories again are a cache hit, a new image sharing a
/// directory reuses its layer.
#[tokio::test]
async fn layer_directories_convert_once_and_keep_their_whiteouts() {
    if !kiln_testkit::require_root("makes whiteout devices and mounts erofs and overlayfs") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let snapshots = tempfile::tempdir().unwrap();
    let (base, upper) = (snapshots.path().join("1/fs"), snapshots.path().join("2/fs"));
    for dir in ["etc", "data", "bin"] {
        std::fs::create_dir_all(base.join(dir)).unwrap();
    }
    std::fs::write(base.join("etc/gone"), "deleted by the upper layer\n").unwrap();
    std::fs::write(base.join("etc/kept"), "kept\n").unwrap();
    std::os::unix::fs::chown(base.join("etc/kept"), Some(1000), Some(1000)).unwrap();
    std::fs::hard_link(base.join("etc/kept"), base.join("etc/hard")).unwrap();
    std::os::unix::fs::symlink("kept", base.join("etc/link")).unwrap();
    std::fs::write(base.join("data/old"), "hidden by the opaque dir\n").unwrap();
    std::fs::write(base.join("bin/busybox"), busybox()).unwrap();
    std::fs::set_permissions(
        base.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::create_dir_all(upper.join("data")).unwrap();
    run(Command::new("mknod")
        .arg(upper.join("etc/gone"))
        .args(["c", "0", "0"]));
    set_xattr(&upper.join("data"), "trusted.overlay.opaque", b"y");
    std::fs::write(upper.join("data/fresh"), "fresh\n").unwrap();

    let t = TestStore::new(None);
    let events = Events::default();
    let dirs = [base.clone(), upper.clone()];
    let image = t
        .store
        .import_rootfs(&dirs, Some("rootfs.test/app:v1"), &events.sink())
        .await
        .unwrap();
    let first = events.take();
    assert_eq!(
        count_steps(&first, |s| matches!(s, LayerStep::Converted { .. })),
        2
    );
    assert_eq!(image.record.media_type, kiln_image::ROOTFS_MEDIA_TYPE);
    assert_eq!(image.references, ["rootfs.test/app:v1"]);
    assert_eq!(image.record.process, kiln_image::ProcessConfig::default());

    let mnt = tempfile::tempdir().unwrap();
    let (mut mounts, lowers) = mount_layers(&t, &image, mnt.path());
    let kept = std::fs::symlink_metadata(lowers[0].join("etc/kept")).unwrap();
    assert_eq!(
        (kept.uid(), kept.gid(), kept.nlink()),
        (1000, 1000, 2),
        "owner and hard link kept"
    );
    assert_eq!(
        std::fs::read_link(lowers[0].join("etc/link")).unwrap(),
        Path::new("kept")
    );
    let lowerdir = format!("lowerdir={}:{}", lowers[1].display(), lowers[0].display());
    let merged = mnt.path().join("merged");
    mounts.mount(&["-t", "overlay", "overlay", "-o", &lowerdir], &merged);
    assert!(
        !merged.join("etc/gone").exists(),
        "the whiteout hides the lower file"
    );
    assert_eq!(std::fs::read(merged.join("etc/link")).unwrap(), b"kept\n");
    let data: Vec<String> = std::fs::read_dir(merged.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(data, ["fresh"], "the opaque dir hides data/old");
    let out = run(Command::new(merged.join("bin/busybox"))
        .args(["cat"])
        .arg(merged.join("etc/kept")));
    assert_eq!(out, "kept\n");
    drop(mounts);

    // The same directories: nothing converted, the same image.
    let erofs = t.store.erofs_path(&image.record.layers[0]);
    let mtime = std::fs::metadata(&erofs).unwrap().modified().unwrap();
    let again = t
        .store
        .import_rootfs(&dirs, None, &events.sink())
        .await
        .unwrap();
    assert_eq!(again.record.digest, image.record.digest);
    assert!(events
        .take()
        .iter()
        .any(|e| matches!(e, Progress::Stored { cached: true, .. })));
    assert_eq!(
        std::fs::metadata(&erofs).unwrap().modified().unwrap(),
        mtime
    );
    // Another image on the same base: the base layer is reused.
    let base_only = t
        .store
        .import_rootfs(&dirs[..1], None, &events.sink())
        .await
        .unwrap();
    assert_ne!(base_only.record.digest, image.record.digest);
    let steps = events.take();
    assert_eq!(
        count_steps(&steps, |s| matches!(s, LayerStep::Cached)),
        1,
        "{steps:?}"
    );
    assert_eq!(
        count_steps(&steps, |s| matches!(s, LayerStep::Converted { .. })),
        0
    );

    // Refusals: a missing directory, no layers.
    let missing = t
        .store
        .import_rootfs(&[snapshots.path().join("nope")], None, &events.sink())
        .await
        .unwrap_err();
    assert_eq!(missing.name(), "ImageNotFound", "{missing}");
    let none = t
        .store
        .import_rootfs(&[], None, &events.sink())
        .await
        .unwrap_err();
    assert_eq!(none.name(), "InvalidImage", "{none}");
}
