//! grant/revoke on real device nodes: a process running as the granted
//! uid can open exactly its node, and nothing else changes. The nodes are
//! made with mknod as character devices 1:3 and 1:5 (/dev/null's and
//! /dev/zero's numbers), so an open that passes the permission check
//! really succeeds; the fake DRM nodes 226:N of the other tests would fail
//! with ENXIO (no DRM driver on the test machines).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kiln_gpu::{grant, granted_uids, revoke, AccessError, Granted, Revoked};
use kiln_testkit::{require_root, skip, FakeHost};

/// Why these tests need root.
const NEEDS_ROOT: &str = "mknod, ACLs, children running as other uids";

const QEMU_UID: u32 = 64_123;
const OTHER_UID: u32 = 64_124;

/// Opens `path` read-write as `uid` (a real child process, setuid'd):
/// `Ok(())` or the shell's error text.
fn open_as(uid: u32, path: &Path) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec 3<>\"$0\"")
        .arg(path)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("spawn sh");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `getfacl` output, when the acl package is installed (an independent
/// reader of what grant wrote).
fn getfacl(path: &Path) -> Option<String> {
    let out = Command::new("getfacl")
        .args(["-n", "-p"])
        .arg(path)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "getfacl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn node_pair(host: &FakeHost) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = host.node_path(128);
    let b = host.node_path(129);
    host.mknod(&a, 1, 3, 0o660);
    host.mknod(&b, 1, 5, 0o660);
    (a, b)
}

#[test]
fn grant_opens_exactly_that_node_and_revoke_closes_it() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    let (a, b) = node_pair(&host);
    let mode_before = std::fs::metadata(&a).unwrap().mode();

    let denied = open_as(QEMU_UID, &a).expect_err("no access before grant");
    assert!(denied.contains("Permission denied"), "{denied}");

    assert_eq!(grant(&a, QEMU_UID).unwrap(), Granted::Added);
    assert_eq!(grant(&a, QEMU_UID).unwrap(), Granted::AlreadyPresent);
    open_as(QEMU_UID, &a).expect("granted uid opens its node");
    assert!(open_as(QEMU_UID, &b).is_err(), "but not the other node");
    assert!(
        open_as(OTHER_UID, &a).is_err(),
        "and no other uid gains access"
    );
    assert_eq!(granted_uids(&a).unwrap(), [QEMU_UID]);
    assert!(granted_uids(&b).unwrap().is_empty());

    if let Some(acl) = getfacl(&a) {
        assert!(acl.contains(&format!("user:{QEMU_UID}:rw-")), "{acl}");
        assert!(acl.contains("group::rw-"), "owning group untouched: {acl}");
        assert!(acl.contains("mask::rw-"), "{acl}");
        eprintln!("getfacl after grant:\n{acl}");
    } else {
        eprintln!("getfacl not installed: ACL checked by behaviour only");
    }

    assert_eq!(revoke(&a, QEMU_UID).unwrap(), Revoked::Removed);
    assert_eq!(revoke(&a, QEMU_UID).unwrap(), Revoked::AlreadyAbsent);
    assert!(open_as(QEMU_UID, &a).is_err(), "revoked");
    let meta = std::fs::metadata(&a).unwrap();
    assert_eq!(meta.mode(), mode_before, "mode restored exactly");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owner never changed");
    if let Some(acl) = getfacl(&a) {
        assert!(!acl.contains("user:6"), "{acl}");
        assert!(!acl.contains("mask::"), "no ACL left: {acl}");
    }
}

#[test]
fn shared_nodes_keep_every_grantee_and_foreign_entries() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    let (a, _) = node_pair(&host);
    // Mode 0600: the owning group has nothing, and must keep having nothing.
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
    grant(&a, QEMU_UID).unwrap();
    grant(&a, OTHER_UID).unwrap();
    open_as(QEMU_UID, &a).unwrap();
    open_as(OTHER_UID, &a).unwrap();
    assert_eq!(granted_uids(&a).unwrap(), [QEMU_UID, OTHER_UID]);
    revoke(&a, QEMU_UID).unwrap();
    assert!(open_as(QEMU_UID, &a).is_err());
    open_as(OTHER_UID, &a).expect("the other VM's access survives");
    revoke(&a, OTHER_UID).unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn refuses_anything_but_a_character_device() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let host = FakeHost::new();
    let (a, _) = node_pair(&host);
    let file = host.dev().join("dri/renderD130");
    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        grant(&file, QEMU_UID),
        Err(AccessError::NotADevice { .. })
    ));
    // A symlink planted where a node should be is not followed.
    let link = host.dev().join("dri/renderD131");
    symlink(&a, &link).unwrap();
    assert!(matches!(
        grant(&link, QEMU_UID),
        Err(AccessError::NotADevice { .. })
    ));
    assert!(
        granted_uids(&a).unwrap().is_empty(),
        "the link's target is untouched"
    );
    let gone = host.dev().join("dri/renderD140");
    assert!(matches!(
        grant(&gone, QEMU_UID),
        Err(AccessError::NotFound { .. })
    ));
    assert_eq!(revoke(&gone, QEMU_UID).unwrap(), Revoked::NodeGone);
}

/// The same on devtmpfs, the file system of /dev on real hosts (a private
/// directory under this machine's /dev, removed afterwards).
#[test]
fn grant_and_revoke_on_devtmpfs() {
    if !require_root(NEEDS_ROOT) {
        return;
    }
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T", "/dev"])
        .output()
        .unwrap();
    let fs_type = String::from_utf8_lossy(&fs_type.stdout).trim().to_owned();
    if fs_type != "tmpfs" {
        // devtmpfs reports itself as tmpfs to statfs.
        skip(&format!("/dev is {fs_type}, not devtmpfs"));
        return;
    }
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Path::new("/dev").join(format!("kiln-gpu-test-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = dir.join("renderD128");
    let host = FakeHost::new();
    host.mknod(&node, 1, 3, 0o660);
    assert!(open_as(QEMU_UID, &node).is_err());
    match grant(&node, QEMU_UID) {
        Ok(Granted::Added) => {}
        Err(AccessError::AclUnsupported { .. }) => {
            panic!("/dev has no POSIX ACLs here (CONFIG_TMPFS_POSIX_ACL off?)")
        }
        other => panic!("{other:?}"),
    }
    open_as(QEMU_UID, &node).expect("granted on devtmpfs");
    assert_eq!(revoke(&node, QEMU_UID).unwrap(), Revoked::Removed);
    assert!(open_as(QEMU_UID, &node).is_err());
}
