//! The store's small mutable state: tags (`refs.json`), users per image
//! (`users/`), the records themselves, and what reads and changes them
//! together: lookup, acquire/release, remove and GC. Every change happens
//! under the meta lock and is an atomic file write, so two processes on one
//! store, or a crash at any instant, never leave a half-made change.
//! Blocking: the store runs these on the blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};
use crate::fsio::{remove_file, sweep_dir, write_atomic, FileLock, LockMode};
use crate::paths::Paths;
use crate::record::{Image, ImageRecord, RECORD_VERSION};
use crate::reference::Lookup;

/// Tag (normalised reference) → manifest digest.
pub type Refs = BTreeMap<String, Digest>;

/// What [`crate::ImageStore::acquire`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Acquired {
    /// The user was added.
    Acquired {
        /// The image's manifest digest (what the user should remember).
        digest: Digest,
    },
    /// The user already held it.
    AlreadyHeld {
        /// The image's manifest digest.
        digest: Digest,
    },
}

/// What [`crate::ImageStore::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Released {
    /// The user was removed.
    Released,
    /// The user did not hold it (or the image is gone).
    NotHeld,
}

/// What [`crate::ImageStore::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Removed {
    /// A tag was removed; other tags still point at the image, which stays.
    Untagged {
        /// The image.
        digest: Digest,
    },
    /// The image record and its tags are gone; [`crate::ImageStore::gc`]
    /// frees its files.
    Deleted {
        /// The image.
        digest: Digest,
    },
}

/// What [`crate::ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    /// Blobs (manifests, configs) removed.
    pub blobs: usize,
    /// Converted layers removed.
    pub layers: usize,
    /// OS images' boot files removed (kernels, module archives).
    pub boot_files: usize,
    /// Bytes freed by all of them.
    pub bytes: u64,
    /// Records that could not be read: while there are any, GC removes no
    /// blob or layer, since it cannot know what they need.
    pub broken_records: Vec<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ImageError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io("read", path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        ImageError::io("parse", path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
}

fn write_json<T: Serialize>(paths: &Paths, path: &Path, value: &T) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| ImageError::io("serialize", path)(std::io::Error::other(e)))?;
    write_atomic(&paths.tmp(), path, &bytes)
}

/// Read and write the store's metadata; every method that changes
/// something takes the meta lock itself.
#[derive(Debug, Clone)]
pub struct Meta {
    paths: Paths,
}

impl Meta {
    /// Metadata under `paths`.
    pub fn new(paths: Paths) -> Self {
        Self { paths }
    }

    fn lock(&self) -> Result<FileLock, ImageError> {
        FileLock::lock_blocking(&self.paths.meta_lock(), LockMode::Exclusive)
    }

    fn refs(&self) -> Result<Refs, ImageError> {
        Ok(read_json(&self.paths.refs())?.unwrap_or_default())
    }

    fn users(&self, digest: &Digest) -> Result<BTreeSet<String>, ImageError> {
        Ok(read_json(&self.paths.users(digest))?.unwrap_or_default())
    }

    fn write_users(&self, digest: &Digest, users: &BTreeSet<String>) -> Result<(), ImageError> {
        let path = self.paths.users(digest);
        if users.is_empty() {
            remove_file(&path)?;
            return crate::fsio::sync_dir(&self.paths.users_dir());
        }
        write_json(&self.paths, &path, users)
    }

    /// The record of `digest`, if stored (and of this format version).
    pub fn record(&self, digest: &Digest) -> Result<Option<ImageRecord>, ImageError> {
        let record: Option<ImageRecord> = read_json(&self.paths.record(digest))?;
        Ok(record.filter(|r| r.version == RECORD_VERSION && &r.digest == digest))
    }

    /// The digest `what` names, if any: a digest as is (when stored), a
    /// tag through `refs.json`.
    fn resolve(&self, what: &Lookup) -> Result<Option<Digest>, ImageError> {
        Ok(match what {
            Lookup::Digest(d) => self.record(d)?.map(|_| d.clone()),
            Lookup::Tag(tag) => self.refs()?.get(tag).cloned(),
        })
    }

    fn resolve_or_missing(&self, what: &Lookup) -> Result<Digest, ImageError> {
        self.resolve(what)?
            .ok_or_else(|| ImageError::ImageNotFound {
                what: what.to_string(),
            })
    }

    fn view(&self, record: ImageRecord, refs: &Refs) -> Result<Image, ImageError> {
        let references = refs
            .iter()
            .filter(|(_, d)| **d == record.digest)
            .map(|(tag, _)| tag.clone())
            .collect();
        let users = self.users(&record.digest)?.into_iter().collect();
        Ok(Image {
            record,
            references,
            users,
        })
    }

    /// The image `what` names.
    pub fn describe(&self, what: &Lookup) -> Result<Image, ImageError> {
        let digest = self.resolve_or_missing(what)?;
        let record = self
            .record(&digest)?
            .ok_or_else(|| ImageError::ImageNotFound {
                what: what.to_string(),
            })?;
        self.view(record, &self.refs()?)
    }

    /// Every stored image, by digest. Unreadable records are skipped with
    /// a warning (GC reports them).
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let refs = self.refs()?;
        let mut out = Vec::new();
        for digest in self.record_digests()? {
            match self.record(&digest) {
                Ok(Some(record)) => out.push(self.view(record, &refs)?),
                Ok(None) => {}
                Err(e) => tracing::warn!(%digest, error = %e, "skipping unreadable image record"),
            }
        }
        Ok(out)
    }

    fn record_digests(&self) -> Result<Vec<Digest>, ImageError> {
        let dir = self.paths.images_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(ImageError::io("list", &dir))? {
            let entry = entry.map_err(ImageError::io("list", &dir))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(d) = Digest::parse(&format!("sha256:{hex}")) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// If `digest` is stored, point `tags` at it and return it; `None` if
    /// it is not (the caller then stores it and calls [`Meta::commit`]).
    pub fn tag_if_stored(
        &self,
        digest: &Digest,
        tags: &[String],
    ) -> Result<Option<Image>, ImageError> {
        let _meta = self.lock()?;
        let Some(record) = self.record(digest)? else {
            return Ok(None);
        };
        let refs = self.add_tags(digest, tags)?;
        self.view(record, &refs).map(Some)
    }

    /// Store a new record (all its files are in place) and point `tags` at
    /// it. The record is written before the tags: a crash in between
    /// leaves an untagged image, never a tag to nothing.
    pub fn commit(&self, record: ImageRecord, tags: &[String]) -> Result<Image, ImageError> {
        let _meta = self.lock()?;
        let path = self.paths.record(&record.digest);
        let record = match self.record(&record.digest)? {
            // Stored meanwhile by a concurrent pull: keep the first.
            Some(existing) => existing,
            None => {
                write_json(&self.paths, &path, &record)?;
                record
            }
        };
        let refs = self.add_tags(&record.digest, tags)?;
        self.view(record, &refs)
    }

    fn add_tags(&self, digest: &Digest, tags: &[String]) -> Result<Refs, ImageError> {
        let mut refs = self.refs()?;
        let before = refs.clone();
        for tag in tags {
            refs.insert(tag.clone(), digest.clone());
        }
        if refs != before {
            write_json(&self.paths, &self.paths.refs(), &refs)?;
        }
        Ok(refs)
    }

    /// Add `user` to the image `what` names.
    pub fn acquire(&self, what: &Lookup, user: &str) -> Result<Acquired, ImageError> {
        if user.is_empty() {
            return Err(ImageError::invalid(
                what.to_string(),
                InvalidReason::BadReference("an empty user".into()),
            ));
        }
        let _meta = self.lock()?;
        let digest = self.resolve_or_missing(what)?;
        let mut users = self.users(&digest)?;
        if !users.insert(user.to_owned()) {
            return Ok(Acquired::AlreadyHeld { digest });
        }
        self.write_users(&digest, &users)?;
        Ok(Acquired::Acquired { digest })
    }

    /// Remove `user` from the image `what` names.
    pub fn release(&self, what: &Lookup, user: &str) -> Result<Released, ImageError> {
        let _meta = self.lock()?;
        let digest = match what {
            // By digest even when the record is gone: the users file may
            // outlive it after a crash, and GC sweeps it anyway.
            Lookup::Digest(d) => d.clone(),
            Lookup::Tag(_) => match self.resolve(what)? {
                Some(d) => d,
                None => return Ok(Released::NotHeld),
            },
        };
        let mut users = self.users(&digest)?;
        if !users.remove(user) {
            return Ok(Released::NotHeld);
        }
        self.write_users(&digest, &users)?;
        Ok(Released::Released)
    }

    /// Remove a tag, or an image with all its tags; refused while the image
    /// has users (untagging one of several tags is not).
    pub fn remove(&self, what: &Lookup) -> Result<Removed, ImageError> {
        let _meta = self.lock()?;
        let digest = self.resolve_or_missing(what)?;
        let mut refs = self.refs()?;
        if let Lookup::Tag(tag) = what {
            let others = refs
                .iter()
                .filter(|(t, d)| **d == digest && *t != tag)
                .count();
            if others > 0 {
                refs.remove(tag);
                write_json(&self.paths, &self.paths.refs(), &refs)?;
                return Ok(Removed::Untagged { digest });
            }
        }
        let users = self.users(&digest)?;
        if !users.is_empty() {
            return Err(ImageError::ImageInUse {
                digest: digest.to_string(),
                users: users.into_iter().collect(),
            });
        }
        // Tags first: a crash after leaves an untagged image that a retry
        // by digest removes.
        let before = refs.len();
        refs.retain(|_, d| *d != digest);
        if refs.len() != before {
            write_json(&self.paths, &self.paths.refs(), &refs)?;
        }
        remove_file(&self.paths.record(&digest))?;
        crate::fsio::sync_dir(&self.paths.images_dir())?;
        Ok(Removed::Deleted { digest })
    }

    /// Remove every blob, layer, users file, tag, lock file and temp file
    /// that no record needs. The caller holds the store lock exclusively,
    /// so no pull is running.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _meta = self.lock()?;
        let mut report = GcReport::default();
        let mut blobs = HashSet::new();
        let mut layers = HashSet::new();
        let mut images = HashSet::new();
        for digest in self.record_digests()? {
            match self.record(&digest) {
                Ok(Some(record)) => {
                    blobs.insert(record.digest.hex().to_owned());
                    blobs.insert(record.config_digest.hex().to_owned());
                    for layer in &record.layers {
                        layers.insert(format!("{}.erofs", layer.diff_id.hex()));
                    }
                    images.insert(record.digest);
                }
                Ok(None) | Err(_) => report.broken_records.push(digest.to_string()),
            }
        }
        sweep_dir(&self.paths.tmp(), |_| false)?;
        if !report.broken_records.is_empty() {
            tracing::warn!(
                records = ?report.broken_records,
                "image records cannot be read; GC keeps every blob and layer"
            );
            return Ok(report);
        }
        let (n, bytes) = sweep_dir(&self.paths.blobs_dir(), |name| blobs.contains(name))?;
        report.blobs = n;
        report.bytes += bytes;
        let (n, bytes) = sweep_dir(&self.paths.erofs_dir(), |name| layers.contains(name))?;
        report.layers = n;
        report.bytes += bytes;
        // Layer locks are only taken under the shared store lock, which GC's
        // caller holds exclusively: nobody waits on one now.
        sweep_dir(&self.paths.locks_dir(), |name| {
            !name.starts_with("layer-") && !name.starts_with("boot-")
        })?;
        let (n, bytes) = sweep_dir(&self.paths.boot_dir(), |name| {
            name.split_once('.')
                .and_then(|(hex, _)| Digest::parse(&format!("sha256:{hex}")).ok())
                .is_some_and(|d| images.contains(&d))
        })?;
        report.boot_files = n;
        report.bytes += bytes;
        let live = |name: &str| {
            name.strip_suffix(".json")
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                .is_some_and(|d| images.contains(&d))
        };
        sweep_dir(&self.paths.users_dir(), live)?;
        let mut refs = self.refs()?;
        let before = refs.len();
        refs.retain(|_, d| images.contains(d));
        if refs.len() != before {
            write_json(&self.paths, &self.paths.refs(), &refs)?;
        }
        Ok(report)
    }
}
