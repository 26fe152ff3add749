//! An OS image's boot files: the kernel of the topmost layer that has one,
//! the modules its `modules.dep` says the wanted ones need (in load order,
//! in a newc fragment), made once and freed by GC with the image; an image
//! without a kernel is refused with a named error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

fn module(path: &'static str) -> Entry {
    Entry::File(path, path.as_bytes().to_vec(), 0o644)
}

/// Each entry of a newc archive: (name, data).
fn cpio_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let field = |at: usize, i: usize| {
        let hex = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
        usize::from_str_radix(hex, 16).unwrap()
    };
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let (size, name_size) = (field(at, 6), field(at, 11));
        let name = String::from_utf8(bytes[at + 110..at + 109 + name_size].to_vec()).unwrap();
        let data_at = (at + 110 + name_size).next_multiple_of(4);
        out.push((name, bytes[data_at..data_at + size].to_vec()));
        at = (data_at + size).next_multiple_of(4);
    }
    out
}

#[tokio::test]
async fn the_topmost_kernel_and_the_modules_it_needs_in_load_order() {
    let old = Layer::gzip(&[
        Entry::Dir("boot/"),
        Entry::File("boot/vmlinuz-6.1.0", b"old kernel".to_vec(), 0o644),
        Entry::Symlink("lib", "usr/lib"),
        Entry::Dir("usr/"),
        Entry::Dir("usr/lib/"),
        Entry::Dir("usr/lib/modules/"),
        Entry::Dir("usr/lib/modules/6.1.0/"),
        file("usr/lib/modules/6.1.0/modules.dep", b"kernel/old.ko:\n"),
    ]);
    let new = Layer::gzip(&[
        Entry::Dir("boot/"),
        Entry::File("boot/vmlinuz-6.9.0", b"new kernel".to_vec(), 0o644),
        Entry::File("boot/vmlinuz-6.10.0", b"newest kernel".to_vec(), 0o644),
        Entry::Dir("usr/"),
        Entry::Dir("usr/lib/"),
        Entry::Dir("usr/lib/modules/"),
        Entry::Dir("usr/lib/modules/6.10.0/"),
        Entry::Dir("usr/lib/modules/6.10.0/kernel/"),
        file(
            "usr/lib/modules/6.10.0/modules.dep",
            b"kernel/erofs.ko.xz: kernel/crc.ko.xz\nkernel/crc.ko.xz:\nkernel/unused.ko.xz:\n",
        ),
        module("usr/lib/modules/6.10.0/kernel/erofs.ko.xz"),
        module("usr/lib/modules/6.10.0/kernel/crc.ko.xz"),
        module("usr/lib/modules/6.10.0/kernel/unused.ko.xz"),
    ]);
    let dir = one_image(&[old, new], "os");
    let t = TestStore::new(None);
    let image = t.import(dir.path()).await.unwrap();
    let digest = image.record.digest.to_string();

    let boot = t
        .store
        .boot_files(&digest, &["erofs", "virtio_scsi"])
        .await
        .unwrap();
    assert_eq!(boot.release, "6.10.0", "6.10 sorts after 6.9");
    assert_eq!(std::fs::read(&boot.kernel).unwrap(), b"newest kernel");
    assert_eq!(boot.modules, ["crc", "erofs"], "virtio_scsi is built in");
    let entries = cpio_entries(&std::fs::read(&boot.modules_cpio).unwrap());
    let get = |name: &str| {
        entries
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in {entries:?}"))
            .1
            .clone()
    };
    assert_eq!(
        String::from_utf8(get("etc/kiln/modules")).unwrap(),
        "lib/modules/6.10.0/kernel/crc.ko.xz\nlib/modules/6.10.0/kernel/erofs.ko.xz\n"
    );
    assert_eq!(
        get("lib/modules/6.10.0/kernel/erofs.ko.xz"),
        b"usr/lib/modules/6.10.0/kernel/erofs.ko.xz"
    );
    assert_eq!(get("etc/kiln/modules.containers"), b"");
    assert!(!entries.iter().any(|(n, _)| n.contains("unused")));
    // Parents come before what is in them.
    let at = |name: &str| entries.iter().position(|(n, _)| n == name).unwrap();
    assert!(at("lib/modules/6.10.0/kernel") < at("lib/modules/6.10.0/kernel/crc.ko.xz"));

    // Made once: a second call finds them.
    let modified = std::fs::metadata(&boot.kernel).unwrap().modified().unwrap();
    let again = t
        .store
        .boot_files(&digest, &["erofs", "virtio_scsi"])
        .await
        .unwrap();
    assert_eq!(again, boot);
    assert_eq!(
        std::fs::metadata(&boot.kernel).unwrap().modified().unwrap(),
        modified
    );
    assert_eq!(t.files("tmp"), Vec::<String>::new());

    // Freed with the image.
    t.store.remove(&digest).await.unwrap();
    let report = t.store.gc().await.unwrap();
    assert_eq!(report.boot_files, 3, "{report:?}");
    assert_eq!(t.files("boot/sha256"), Vec::<String>::new());
}

#[tokio::test]
async fn an_image_without_a_kernel_is_refused_by_name() {
    let dir = one_image(&[Layer::gzip(&[file("hello", b"hi")])], "app");
    let t = TestStore::new(None);
    let image = t.import(dir.path()).await.unwrap();
    let err = t
        .store
        .boot_files(&image.record.digest.to_string(), &["erofs"])
        .await
        .unwrap_err();
    assert_eq!(err.name(), "InvalidImage");
    assert!(
        format!("{:?}", reason(&err)).contains("no kernel"),
        "{err:?}"
    );
    assert_eq!(t.files("boot/sha256"), Vec::<String>::new());
    let missing = t.store.boot_files("sha256:00", &[]).await.unwrap_err();
    assert_eq!(missing.name(), "InvalidImage", "a malformed digest");
}
