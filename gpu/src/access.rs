//! Access to render nodes: a POSIX ACL entry per QEMU uid.
//!
//! [`grant`] adds `user:<uid>:rw-` to the node's access ACL (the
//! `system.posix_acl_access` extended attribute), [`revoke`] removes it.
//! Nothing else on the node changes: owner, group and mode stay what udev
//! made them (Debian: `root:render 0660`), and other ACL entries (logind's
//! `uaccess` entry for the seat user, an admin's) are kept. This is the
//! mechanism logind itself uses for render nodes, and it lets several VMs
//! (several uids) share one node, which a chown could not.
//!
//! Why not chown/chmod: a chown takes the node away from the `render`
//! group and from every other VM, udev puts it back on the next `change`
//! event, and a crash between chown and restore leaves the host altered
//! with no record of the old owner. An ACL entry is additive and named by
//! the uid it is for, so revoking and reconciling need no saved state.
//!
//! Both calls are idempotent and report what they did. They work on
//! devtmpfs (`/dev`, needs `CONFIG_TMPFS_POSIX_ACL`, which Debian, Fedora
//! and logind's `uaccess` rely on) and on ext4/xfs/btrfs/tmpfs (the tests).
//! An ACL only decides at `open()`: a QEMU that already holds the node open
//! keeps it after a revoke, so the engine revokes after QEMU exited.
//!
//! The ACL format is the kernel's (`include/uapi/linux/posix_acl_xattr.h`):
//! a little-endian `u32` version 2, then `{u16 tag, u16 perm, u32 id}`
//! entries sorted by tag and id.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

const XATTR_NAME: &[u8] = b"system.posix_acl_access\0";
const ACL_VERSION: u32 = 2;
const TAG_USER_OBJ: u16 = 0x01;
const TAG_USER: u16 = 0x02;
const TAG_GROUP_OBJ: u16 = 0x04;
const TAG_GROUP: u16 = 0x08;
const TAG_MASK: u16 = 0x10;
const TAG_OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;
const PERM_RW: u16 = 0o6;

/// What [`grant`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// The entry was added (or widened to `rw`).
    Added,
    /// The uid already had `rw`; nothing was written.
    AlreadyPresent,
}

/// What [`revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The entry was removed.
    Removed,
    /// The uid had no entry; nothing was written.
    AlreadyAbsent,
    /// The node no longer exists (the GPU went away): nothing to revoke.
    NodeGone,
}

/// Access errors.
#[derive(Debug, Error)]
pub enum AccessError {
    /// The path is not a character device (refusing to change ACLs of
    /// anything else, e.g. a symlink planted in its place).
    #[error("{path:?} is not a character device")]
    NotADevice {
        /// The path.
        path: PathBuf,
    },
    /// The node does not exist (for [`grant`] and [`granted_uids`]).
    #[error("{path:?} does not exist")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The file system has no POSIX ACLs (devtmpfs without
    /// `CONFIG_TMPFS_POSIX_ACL`, a mount with `noacl`).
    #[error("{path:?} is on a file system without POSIX ACL support")]
    AclUnsupported {
        /// The path.
        path: PathBuf,
    },
    /// The stored ACL is not in the kernel's format.
    #[error("ACL of {path:?} is malformed: {reason}")]
    Malformed {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A system call failed.
    #[error("cannot {op} {path:?}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Let processes running as `uid` open `node` read-write.
pub fn grant(node: &Path, uid: u32) -> Result<Granted, AccessError> {
    let mode = char_device_mode(node)?.ok_or_else(|| AccessError::NotFound {
        path: node.to_path_buf(),
    })?;
    let mut acl = read_acl(node, mode)?;
    if acl.user_perm(uid) == Some(PERM_RW) {
        return Ok(Granted::AlreadyPresent);
    }
    acl.set_user(uid, PERM_RW);
    write_acl(node, &acl)?;
    tracing::debug!(node = %node.display(), uid, "render node access granted");
    Ok(Granted::Added)
}

/// Take back what [`grant`] gave `uid` on `node`.
pub fn revoke(node: &Path, uid: u32) -> Result<Revoked, AccessError> {
    let Some(mode) = char_device_mode(node)? else {
        return Ok(Revoked::NodeGone);
    };
    let mut acl = read_acl(node, mode)?;
    if acl.user_perm(uid).is_none() {
        return Ok(Revoked::AlreadyAbsent);
    }
    acl.remove_user(uid);
    write_acl(node, &acl)?;
    tracing::debug!(node = %node.display(), uid, "render node access revoked");
    Ok(Revoked::Removed)
}

/// The uids with a named ACL entry on `node` (whatever their permissions),
/// for reconciling after a crash: an entry for a QEMU uid that no live
/// lease explains is revoked.
pub fn granted_uids(node: &Path) -> Result<Vec<u32>, AccessError> {
    let mode = char_device_mode(node)?.ok_or_else(|| AccessError::NotFound {
        path: node.to_path_buf(),
    })?;
    let acl = read_acl(node, mode)?;
    Ok(acl
        .entries
        .iter()
        .filter(|e| e.tag == TAG_USER)
        .map(|e| e.id)
        .collect())
}

/// The mode of `node` if it is a character device, `None` if it does not
/// exist. Symlinks are not followed.
fn char_device_mode(node: &Path) -> Result<Option<u32>, AccessError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(node) {
        Ok(meta) if meta.file_type().is_char_device() => Ok(Some(meta.mode())),
        Ok(_) => Err(AccessError::NotADevice {
            path: node.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AccessError::Io {
            op: "stat",
            path: node.to_path_buf(),
            source,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// An access ACL, entries sorted as the kernel wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// The ACL equivalent to a plain mode.
    fn from_mode(mode: u32) -> Self {
        let perm = |shift: u32| ((mode >> shift) & 0o7) as u16;
        Self {
            entries: vec![
                Entry {
                    tag: TAG_USER_OBJ,
                    perm: perm(6),
                    id: UNDEFINED_ID,
                },
                Entry {
                    tag: TAG_GROUP_OBJ,
                    perm: perm(3),
                    id: UNDEFINED_ID,
                },
                Entry {
                    tag: TAG_OTHER,
                    perm: perm(0),
                    id: UNDEFINED_ID,
                },
            ],
        }
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 4 || !(bytes.len() - 4).is_multiple_of(8) {
            return Err(format!("{} bytes", bytes.len()));
        }
        let version = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if version != ACL_VERSION {
            return Err(format!("version {version}"));
        }
        let entries = bytes[4..]
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect::<Vec<_>>();
        for tag in [TAG_USER_OBJ, TAG_GROUP_OBJ, TAG_OTHER] {
            if entries.iter().filter(|e| e.tag == tag).count() != 1 {
                return Err(format!("needs exactly one entry of tag {tag:#x}"));
            }
        }
        Ok(Self { entries })
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&ACL_VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn user_perm(&self, uid: u32) -> Option<u16> {
        self.entries
            .iter()
            .find(|e| e.tag == TAG_USER && e.id == uid)
            .map(|e| e.perm)
    }

    fn set_user(&mut self, uid: u32, perm: u16) {
        self.entries.retain(|e| !(e.tag == TAG_USER && e.id == uid));
        self.entries.push(Entry {
            tag: TAG_USER,
            perm,
            id: uid,
        });
        self.fix_mask();
    }

    fn remove_user(&mut self, uid: u32) {
        self.entries.retain(|e| !(e.tag == TAG_USER && e.id == uid));
        self.fix_mask();
    }

    /// The mask is what `setfacl` makes it: the union of the group class
    /// (owning group, named users, named groups); no mask without named
    /// entries, so removing the last one restores the plain mode.
    fn fix_mask(&mut self) {
        self.entries.retain(|e| e.tag != TAG_MASK);
        let named = self
            .entries
            .iter()
            .any(|e| e.tag == TAG_USER || e.tag == TAG_GROUP);
        if named {
            let perm = self
                .entries
                .iter()
                .filter(|e| matches!(e.tag, TAG_USER | TAG_GROUP | TAG_GROUP_OBJ))
                .fold(0, |acc, e| acc | e.perm);
            self.entries.push(Entry {
                tag: TAG_MASK,
                perm,
                id: UNDEFINED_ID,
            });
        }
        self.entries.sort_by_key(|e| (e.tag, e.id));
    }
}

fn c_path(path: &Path) -> Result<CString, AccessError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| AccessError::Io {
        op: "use",
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn acl_error(op: &'static str, path: &Path, err: io::Error) -> AccessError {
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => AccessError::AclUnsupported {
            path: path.to_path_buf(),
        },
        Some(libc::ENOENT) => AccessError::NotFound {
            path: path.to_path_buf(),
        },
        _ => AccessError::Io {
            op,
            path: path.to_path_buf(),
            source: err,
        },
    }
}

/// The node's access ACL, or the one its mode implies when it has none.
fn read_acl(path: &Path, mode: u32) -> Result<Acl, AccessError> {
    let cpath = c_path(path)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated; buf is valid for
        // buf.len() bytes and lgetxattr writes at most that many.
        let n = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                XATTR_NAME.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n.unsigned_abs());
            return Acl::parse(&buf).map_err(|reason| AccessError::Malformed {
                path: path.to_path_buf(),
                reason,
            });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => return Ok(Acl::from_mode(mode)),
            Some(libc::ERANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 4, 0),
            _ => return Err(acl_error("read the ACL of", path, err)),
        }
    }
}

fn write_acl(path: &Path, acl: &Acl) -> Result<(), AccessError> {
    let cpath = c_path(path)?;
    let bytes = acl.to_bytes();
    // SAFETY: both strings are NUL-terminated; bytes is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            XATTR_NAME.as_ptr().cast(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(acl_error(
            "set the ACL of",
            path,
            io::Error::last_os_error(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_becomes_the_three_base_entries() {
        let acl = Acl::from_mode(0o20640);
        let perms: Vec<_> = acl.entries.iter().map(|e| (e.tag, e.perm)).collect();
        assert_eq!(
            perms,
            [(TAG_USER_OBJ, 6), (TAG_GROUP_OBJ, 4), (TAG_OTHER, 0)]
        );
    }

    #[test]
    fn named_users_get_a_mask_and_lose_it_with_the_last_one() {
        let mut acl = Acl::from_mode(0o600);
        acl.set_user(1000, PERM_RW);
        acl.set_user(999, PERM_RW);
        let tags: Vec<_> = acl.entries.iter().map(|e| (e.tag, e.id)).collect();
        assert_eq!(
            tags,
            [
                (TAG_USER_OBJ, UNDEFINED_ID),
                (TAG_USER, 999),
                (TAG_USER, 1000),
                (TAG_GROUP_OBJ, UNDEFINED_ID),
                (TAG_MASK, UNDEFINED_ID),
                (TAG_OTHER, UNDEFINED_ID)
            ]
        );
        assert_eq!(acl.entries[4].perm, PERM_RW);
        acl.remove_user(1000);
        acl.remove_user(999);
        assert_eq!(acl, Acl::from_mode(0o600));
    }

    #[test]
    fn bytes_round_trip_and_bad_bytes_are_rejected() {
        let mut acl = Acl::from_mode(0o660);
        acl.set_user(4242, PERM_RW);
        let bytes = acl.to_bytes();
        assert_eq!(&bytes[..4], &[2, 0, 0, 0]);
        assert_eq!(bytes.len(), 4 + 8 * 5);
        assert_eq!(Acl::parse(&bytes), Ok(acl));
        assert!(Acl::parse(&bytes[..7]).is_err());
        let mut v3 = bytes.clone();
        v3[0] = 3;
        assert!(Acl::parse(&v3).is_err());
        assert!(Acl::parse(&2u32.to_le_bytes()).is_err(), "no base entries");
    }

    #[test]
    fn the_mask_never_widens_the_owning_group() {
        // 0600 root:render: the group has nothing; after a grant the mask
        // is rw (for the named user) but GROUP_OBJ stays 0.
        let mut acl = Acl::from_mode(0o600);
        acl.set_user(1000, PERM_RW);
        let group = acl
            .entries
            .iter()
            .find(|e| e.tag == TAG_GROUP_OBJ)
            .map(|e| e.perm);
        assert_eq!(group, Some(0));
    }
}
