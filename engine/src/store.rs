//! Crash-safe records on disk.
//!
//! One JSON file per record in a directory. Writes go to a temp file in the
//! same directory, are fsynced, renamed over the old file, and the directory
//! is fsynced: after a crash at any instant the file is either the old or
//! the new record, never a mix. A record that fails to parse is renamed to
//! `<name>.json.broken` (kept for the admin) and reported; it never stops the
//! others from loading.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Store errors.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Reading or writing the directory failed.
    #[error("state directory {path:?}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be serialized (a bug).
    #[error("cannot serialize record {key}")]
    Serialize {
        /// Record key.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A record on disk that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenRecord {
    /// Key (file stem) of the record.
    pub key: String,
    /// Where it was moved to.
    pub path: PathBuf,
    /// Why it could not be read.
    pub reason: String,
}

/// What [`RecordDir::load_all`] found: good records by key, and broken ones.
pub type Loaded<T> = (Vec<(String, T)>, Vec<BrokenRecord>);

/// A directory of JSON records keyed by file stem.
#[derive(Debug, Clone)]
pub struct RecordDir {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RecordDir {
    /// Open (creating if needed, mode 0700) a record directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        Ok(Self { dir })
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Atomically and durably replace record `key` with `value`.
    pub fn write<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.write_with(key, value, Durability::Durable)
    }

    /// Atomically replace record `key` with `value`, synced per `durability`.
    pub fn write_with<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Serialize {
            key: key.to_owned(),
            source,
        })?;
        write_atomic_with(&self.path_of(key), &bytes, durability)
    }

    /// Remove record `key`; a missing record is not an error (idempotent).
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Load every record. Unparseable ones are moved aside and returned as
    /// [`BrokenRecord`]s; leftover temp files from an interrupted write are
    /// removed.
    pub fn load_all<T: DeserializeOwned>(&self) -> Result<Loaded<T>, StoreError> {
        let mut good = Vec::new();
        let mut broken = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file_name.starts_with(".tmp-") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(key) = file_name.strip_suffix(".json") else {
                continue;
            };
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string()));
            match parsed {
                Ok(value) => good.push((key.to_owned(), value)),
                Err(reason) => {
                    let aside = path.with_extension("json.broken");
                    fs::rename(&path, &aside).map_err(io_err(&path))?;
                    broken.push(BrokenRecord {
                        key: key.to_owned(),
                        path: aside,
                        reason,
                    });
                }
            }
        }
        Ok((good, broken))
    }
}

/// Room a RAM file needs besides its own size (its device state, the
/// metadata written after it).
const RAM_FILE_MARGIN: u64 = 16 << 20;

/// Ok when the file system of `dir` has room for a RAM file of `bytes`
/// (and a margin). A guest's RAM in a file (a template, a snapshot) is
/// written page by page while the guest runs: on a full file system QEMU
/// dies of SIGBUS half-way, so the room is checked first and its lack is
/// a `StorageFailed` that says how much is missing.
pub fn ensure_room(dir: &Path, bytes: u64) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes one `struct statvfs`, which `stat` is, and
    // reads the NUL-terminated path that outlives the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // Both are u64 on 64-bit Linux; `as` keeps it building elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let free = (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64);
    let needed = bytes.saturating_add(RAM_FILE_MARGIN);
    if free < needed {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "a guest's RAM needs {} MiB here, {} MiB are free",
                needed >> 20,
                free >> 20
            ),
        )));
    }
    Ok(())
}

/// Create `dir` and its parents; the leaf gets mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// How far a write must reach before it counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk: survives a host crash (temp file, fsync, rename, fsync dir).
    Durable,
    /// Atomic but not synced (temp file, rename): survives a crash of kilnd,
    /// since the page cache outlives the process, but not of the host. For
    /// facts about running processes only (a lease): a host crash ends the
    /// VMs too, and start-up reconciles whatever version is on disk.
    UntilHostCrash,
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, bytes, Durability::Durable)
}

/// Write `bytes` to `path` atomically, synced per `durability`.
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    durability: Durability,
) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    let tmp = dir.join(format!(".tmp-{file_name}-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    match durability {
        Durability::Durable => sync_dir(dir),
        Durability::UntilHostCrash => Ok(()),
    }
}

/// Remove a directory tree; one that is already gone is fine, any other
/// failure is logged (a leftover directory is harmless, so callers go on).
pub fn remove_tree(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove directory");
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn write_replace_load_remove() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = RecordDir::open(tmp.path().join("r")).expect("open");
        store.write("a", &Rec { n: 1 }).expect("write");
        store.write("a", &Rec { n: 2 }).expect("rewrite");
        store.write("b", &Rec { n: 3 }).expect("write");
        let (good, broken) = store.load_all::<Rec>().expect("load");
        assert_eq!(
            good,
            vec![("a".into(), Rec { n: 2 }), ("b".into(), Rec { n: 3 })]
        );
        assert!(broken.is_empty());
        store.remove("a").expect("remove");
        store.remove("a").expect("remove twice is fine");
        assert_eq!(store.load_all::<Rec>().expect("load").0.len(), 1);
    }

    #[test]
    fn corrupt_records_are_moved_aside_and_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = RecordDir::open(tmp.path()).expect("open");
        store.write("good", &Rec { n: 1 }).expect("write");
        fs::write(tmp.path().join("bad.json"), b"{\"n\": ").expect("write");
        fs::write(tmp.path().join(".tmp-good.json-1"), b"half").expect("write");
        let (good, broken) = store.load_all::<Rec>().expect("load");
        assert_eq!(good.len(), 1);
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].key, "bad");
        assert!(broken[0].path.ends_with("bad.json.broken"));
        assert!(broken[0].path.exists());
        assert!(!tmp.path().join(".tmp-good.json-1").exists());
        // A second load no longer sees the broken record.
        assert!(store.load_all::<Rec>().expect("load").1.is_empty());
    }
}
