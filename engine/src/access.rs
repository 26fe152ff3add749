//! Could a caller read a path itself? kilnd reads what `ImportImage` names
//! with its own rights (root, in production), so the adapters, which know
//! the caller, refuse a path the caller could not read: otherwise a member
//! of the `kiln` group could import an archive only root may read.
//!
//! The check follows the classic permission bits: the path is resolved
//! (symlinks followed, as the import follows them), every directory above
//! it must be searchable by the caller, a file readable, a directory (an
//! OCI layout) readable and searchable with every entry under it, within
//! [`MAX_TREE_ENTRIES`] entries and [`MAX_TREE_DEPTH`] levels. POSIX ACLs are
//! not consulted. The check happens before the import opens the path, so a
//! caller who can swap what the path names between the two could win a
//! race; docs/images.md lists that residual risk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Most entries of a directory tree checked; a larger tree is refused.
pub const MAX_TREE_ENTRIES: usize = 10_000;
/// Deepest level of a directory tree checked (an OCI layout has
/// `blobs/sha256/<hex>`: 3); anything deeper is refused.
pub const MAX_TREE_DEPTH: usize = 4;

const READ: u32 = 4;
const EXEC: u32 = 1;

/// Who asks: a uid and every group id it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's uid.
    pub uid: u32,
    /// Its primary and supplementary group ids.
    pub gids: Vec<u32>,
}

impl Caller {
    /// Whether `caller` could read `path` (a file, or a directory with
    /// everything under it) by itself. Root and kilnd's own user read what
    /// kilnd reads. Runs its few `stat` calls on the blocking pool.
    pub async fn may_read(&self, path: &Path) -> bool {
        let (caller, path) = (self.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || caller.may_read_blocking(&path))
            .await
            .unwrap_or(false)
    }

    /// [`Caller::may_read`], blocking.
    pub fn may_read_blocking(&self, path: &Path) -> bool {
        // SAFETY: geteuid has no preconditions.
        let daemon = unsafe { libc::geteuid() };
        if self.uid == 0 || self.uid == daemon {
            return true;
        }
        let mut budget = MAX_TREE_ENTRIES;
        self.readable(path, 0, &mut budget)
    }

    /// Whether the permission bits of `meta` give the caller `want`
    /// (`READ`, `EXEC` or both): the owner's bits for the owner, the
    /// group's for a member, the others' for everyone else.
    fn allowed(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// `path` resolved, with every directory above it searchable.
    fn reachable(&self, path: &Path) -> Option<PathBuf> {
        let real = std::fs::canonicalize(path).ok()?;
        let searchable = real
            .ancestors()
            .skip(1)
            .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && self.allowed(&m, EXEC)));
        searchable.then_some(real)
    }

    fn readable(&self, path: &Path, depth: usize, budget: &mut usize) -> bool {
        let Some(real) = self.reachable(path) else {
            return false;
        };
        let Ok(meta) = std::fs::metadata(&real) else {
            return false;
        };
        if !meta.is_dir() {
            return self.allowed(&meta, READ);
        }
        if depth >= MAX_TREE_DEPTH || !self.allowed(&meta, READ | EXEC) {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(&real) else {
            return false;
        };
        for entry in entries {
            let Ok(entry) = entry else { return false };
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            if !self.readable(&entry.path(), depth + 1, budget) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Files owned by the test's user, judged for another uid (the bits
    /// decide; no privilege needed).
    #[test]
    fn the_permission_bits_decide_for_the_caller() {
        let dir = tempfile::tempdir().expect("temp dir");
        chmod(dir.path(), 0o755);
        let file = dir.path().join("image.tar");
        std::fs::write(&file, b"x").expect("write");
        let stranger = Caller {
            uid: 65534,
            gids: vec![65534],
        };
        chmod(&file, 0o644);
        assert!(stranger.may_read_blocking(&file));
        chmod(&file, 0o600);
        assert!(!stranger.may_read_blocking(&file));
        // A member of the file's group reads it by the group's bits.
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let member = Caller {
            uid: 65534,
            gids: vec![gid],
        };
        chmod(&file, 0o640);
        assert!(member.may_read_blocking(&file));
        assert!(!stranger.may_read_blocking(&file));
        // A directory the caller cannot search hides a readable file.
        chmod(&file, 0o644);
        chmod(dir.path(), 0o700);
        assert!(!stranger.may_read_blocking(&file));
        chmod(dir.path(), 0o755);
        // A symlink is judged by what it points to.
        let link = dir.path().join("link.tar");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(stranger.may_read_blocking(&link));
        chmod(&file, 0o600);
        assert!(!stranger.may_read_blocking(&link));
        // Missing is unreadable; our own user reads everything kilnd does.
        assert!(!stranger.may_read_blocking(&dir.path().join("nope")));
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let owner = Caller {
            uid: me,
            gids: vec![],
        };
        assert!(owner.may_read_blocking(&file));
    }

    #[test]
    fn a_directory_is_readable_only_with_everything_under_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        chmod(dir.path(), 0o755);
        let layout = dir.path().join("layout");
        std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
        std::fs::write(layout.join("index.json"), b"{}").expect("write");
        let blob = layout.join("blobs/sha256/aa");
        std::fs::write(&blob, b"x").expect("write");
        for d in [&layout, &layout.join("blobs"), &layout.join("blobs/sha256")] {
            chmod(d, 0o755);
        }
        chmod(&layout.join("index.json"), 0o644);
        chmod(&blob, 0o644);
        let stranger = Caller {
            uid: 65534,
            gids: vec![65534],
        };
        assert!(stranger.may_read_blocking(&layout));
        chmod(&blob, 0o600);
        assert!(!stranger.may_read_blocking(&layout));
        chmod(&blob, 0o644);
        // Too deep a tree is refused rather than walked.
        let deep = layout.join("a/b/c/d");
        std::fs::create_dir_all(&deep).expect("mkdir");
        for d in ["a", "a/b", "a/b/c", "a/b/c/d"] {
            chmod(&layout.join(d), 0o755);
        }
        assert!(!stranger.may_read_blocking(&layout));
    }
}
