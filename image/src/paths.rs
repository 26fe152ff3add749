//! Where everything lives under the store's root (`<state_dir>/images`).
//!
//! ```text
//! blobs/sha256/<hex>              manifests and configs, verified
//! erofs/sha256/<diff-id hex>.erofs converted layers, keyed by the digest
//!                                  of the uncompressed tar
//! images/sha256/<hex>.json        image records, by manifest digest
//! users/sha256/<hex>.json         who uses an image (refcount)
//! refs.json                       tag -> manifest digest
//! locks/                          flock files (store, meta, one per layer)
//! boot/sha256/<hex>.{vmlinuz,modules.cpio,json}
//!                                 an OS image's kernel and modules
//! tmp/                            in-flight downloads and conversions
//! ```

use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// The store's paths.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// Paths under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every directory the store needs.
    pub fn dirs(&self) -> [PathBuf; 8] {
        [
            self.boot_dir(),
            self.blobs_dir(),
            self.erofs_dir(),
            self.images_dir(),
            self.users_dir(),
            self.locks_dir(),
            self.tmp(),
            self.root.clone(),
        ]
    }

    /// Verified blobs (manifests, configs).
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    /// A blob.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Converted layers.
    pub fn erofs_dir(&self) -> PathBuf {
        self.root.join("erofs/sha256")
    }

    /// The erofs image of the layer whose uncompressed digest is `diff_id`,
    /// relative to the root (as records keep it).
    pub fn erofs_rel(diff_id: &Digest) -> String {
        format!("erofs/sha256/{}.erofs", diff_id.hex())
    }

    /// The erofs image of a layer.
    pub fn erofs(&self, diff_id: &Digest) -> PathBuf {
        self.root.join(Self::erofs_rel(diff_id))
    }

    /// Image records.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images/sha256")
    }

    /// An image record.
    pub fn record(&self, digest: &Digest) -> PathBuf {
        self.images_dir().join(format!("{}.json", digest.hex()))
    }

    /// Users files.
    pub fn users_dir(&self) -> PathBuf {
        self.root.join("users/sha256")
    }

    /// An image's users.
    pub fn users(&self, digest: &Digest) -> PathBuf {
        self.users_dir().join(format!("{}.json", digest.hex()))
    }

    /// Tag → digest.
    pub fn refs(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Lock files.
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// Held shared by every pull and import, exclusively by GC and the
    /// sweep of `tmp/` at open: GC never deletes what a pull is building.
    pub fn store_lock(&self) -> PathBuf {
        self.locks_dir().join("store.lock")
    }

    /// Held exclusively around every read-modify-write of `refs.json`,
    /// `users/` and `images/`.
    pub fn meta_lock(&self) -> PathBuf {
        self.locks_dir().join("meta.lock")
    }

    /// Held exclusively while a layer is fetched and converted: two pulls
    /// sharing a layer convert it once.
    pub fn layer_lock(&self, diff_id: &Digest) -> PathBuf {
        self.locks_dir()
            .join(format!("layer-{}.lock", diff_id.hex()))
    }

    /// OS images' kernels and modules (`boot.rs`).
    pub fn boot_dir(&self) -> PathBuf {
        self.root.join("boot/sha256")
    }

    /// Boot file `suffix` of image `digest`.
    pub fn boot_file(&self, digest: &Digest, suffix: &str) -> PathBuf {
        self.boot_dir().join(format!("{}.{suffix}", digest.hex()))
    }

    /// Held exclusively while an image's boot files are made.
    pub fn boot_lock(&self, digest: &Digest) -> PathBuf {
        self.locks_dir().join(format!("boot-{}.lock", digest.hex()))
    }

    /// In-flight data.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}
