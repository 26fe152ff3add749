//! Crash-only file handling: everything visible in the store got there by
//! a rename of a complete, fsynced file, followed by an fsync of the
//! directory; and `flock` locks that serialise writers across processes
//! (two kilnds, or kilnd and a tool, on one store) and die with them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::ImageError;

/// Write `bytes` to `path` atomically: a temp file in `tmp` (same file
/// system), fsync, rename over `path`, fsync of `path`'s directory. After a
/// crash at any instant `path` is the old content or the new, never a mix.
pub fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let staged = TempPath::new(tmp, "write");
    let mut file = File::create(staged.path()).map_err(ImageError::io("write", staged.path()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(ImageError::io("write", staged.path()))?;
    staged.persist(path)
}

/// fsync a directory, so a rename or unlink in it survives a host crash.
pub fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io("sync", dir))
}

/// Remove a file; one already gone is fine.
pub fn remove_file(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ImageError::io("remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// A path under the store's `tmp/` that is removed on drop unless it was
/// persisted: an error, a cancelled future or a panic leave nothing behind
/// (and a crash leaves it under `tmp/`, which is emptied at open and by GC).
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    armed: bool,
}

impl TempPath {
    /// A fresh name under `tmp` (nothing is created).
    pub fn new(tmp: &Path, what: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = tmp.join(format!("{what}-{}-{n}", std::process::id()));
        Self { path, armed: true }
    }

    /// The temp path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsync the (already written) file, rename it to `dest` and fsync
    /// `dest`'s directory: from here on it is visible and complete.
    pub fn persist(mut self, dest: &Path) -> Result<(), ImageError> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(ImageError::io("sync", &self.path))?;
        fs::rename(&self.path, dest).map_err(ImageError::io("rename into", dest))?;
        self.armed = false;
        sync_dir(dest.parent().unwrap_or(Path::new("/")))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: what is left is swept from tmp/ at the next open.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// How a [`FileLock`] is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders (ingests, against GC).
    Shared,
    /// One holder.
    Exclusive,
}

/// An `flock(2)` lock on a file, released on drop (and by the kernel when
/// the process dies, so a `kill -9` never leaves a stale lock behind).
#[derive(Debug)]
pub struct FileLock {
    // Held for its descriptor: closing it releases the lock.
    _file: File,
}

impl FileLock {
    /// Take the lock, waiting for other holders. Blocks the thread: async
    /// callers run it on the blocking pool ([`FileLock::acquire`]).
    pub fn lock_blocking(path: &Path, mode: LockMode) -> Result<Self, ImageError> {
        Self::lock(path, mode, true)?.ok_or_else(|| {
            ImageError::io("lock", path)(std::io::Error::from(std::io::ErrorKind::WouldBlock))
        })
    }

    /// Take the lock if nobody holds it in a conflicting mode; `None` if
    /// somebody does.
    pub fn try_lock(path: &Path, mode: LockMode) -> Result<Option<Self>, ImageError> {
        Self::lock(path, mode, false)
    }

    /// [`FileLock::lock_blocking`] on tokio's blocking pool.
    pub async fn acquire(path: PathBuf, mode: LockMode) -> Result<Self, ImageError> {
        let for_error = path.clone();
        tokio::task::spawn_blocking(move || Self::lock_blocking(&path, mode))
            .await
            .map_err(|e| ImageError::io("lock", for_error)(std::io::Error::other(e)))?
    }

    fn lock(path: &Path, mode: LockMode, wait: bool) -> Result<Option<Self>, ImageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(ImageError::io("open lock", path))?;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a descriptor we own for the whole call.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(Self { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock if !wait => return Ok(None),
                _ => return Err(ImageError::io("lock", path)(e)),
            }
        }
    }
}

/// Remove the files in `dir` that `keep` does not keep; returns how many
/// and their bytes. The directory is synced once at the end.
pub fn sweep_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<(usize, u64), ImageError> {
    let mut removed = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).map_err(ImageError::io("list", dir))? {
        let entry = entry.map_err(ImageError::io("list", dir))?;
        let name = entry.file_name();
        if keep(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => {
                removed += 1;
                bytes += len;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("remove", path)(e)),
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok((removed, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let path = dir.path().join("f");
        write_atomic(&tmp, &path, b"one").unwrap();
        write_atomic(&tmp, &path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    }

    #[test]
    fn temp_path_is_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let t = TempPath::new(dir.path(), "x");
        fs::write(t.path(), b"x").unwrap();
        let p = t.path().to_owned();
        drop(t);
        assert!(!p.exists());
    }

    #[test]
    fn exclusive_lock_excludes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = FileLock::lock_blocking(&path, LockMode::Exclusive).unwrap();
        assert!(FileLock::try_lock(&path, LockMode::Shared)
            .unwrap()
            .is_none());
        drop(held);
        let a = FileLock::try_lock(&path, LockMode::Shared).unwrap();
        let b = FileLock::try_lock(&path, LockMode::Shared).unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(FileLock::try_lock(&path, LockMode::Exclusive)
            .unwrap()
            .is_none());
    }
}
