//! The converted layers as a guest will use them: each erofs image mounted
//! (`mount -t erofs -o loop`), overlayfs on top; a whiteout hides a lower
//! file, an opaque directory hides the lower directory's contents. Root
//! only (fails in CI when not root).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    let mut mounts = Mounts(Vec::new());
    let mut lowers = Vec::new();
    for (i, layer) in image.record.layers.iter().enumerate() {
        let target = mnt.path().join(format!("l{i}"));
        let erofs = t.store.erofs_path(layer);
        mounts.mount(
            &["-t", "erofs", "-o", "loop,ro", erofs.to_str().unwrap()],
            &target,
        );
        lowers.push(target);
    }
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
