//! The image store: its configuration, opening it (and sweeping what a
//! crash left in `tmp/`), and the calls the engine makes. Pulls and imports
//! are in `ingest`, metadata changes in `meta`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::ImageError;
use crate::fsio::{FileLock, LockMode};
use crate::meta::{Acquired, GcReport, Meta, Released, Removed};
use crate::paths::Paths;
use crate::progress::ProgressFn;
use crate::record::{Image, LayerRecord, Platform};
use crate::reference::Lookup;
use crate::source::Source;

/// How the store pulls and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The platform images must run on (the host's by default).
    pub platform: Platform,
    /// The largest image accepted, in bytes: the compressed layers as the
    /// manifest declares them, and the uncompressed tars as they stream
    /// through the scan (a tar bomb stops there).
    pub max_image_bytes: u64,
    /// A `containers-auth.json`-style credentials file; a missing file
    /// means anonymous pulls.
    pub auth_file: Option<PathBuf>,
    /// Registries (`host[:port]`) reached over plain HTTP; every other one
    /// over HTTPS.
    pub insecure_registries: Vec<String>,
    /// The mkfs.erofs binary (erofs-utils ≥ 1.7).
    pub mkfs_erofs: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            platform: Platform::host(),
            max_image_bytes: 8 << 30,
            auth_file: None,
            insecure_registries: Vec::new(),
            mkfs_erofs: PathBuf::from("mkfs.erofs"),
        }
    }
}

/// The content-addressed image store under `<state_dir>/images`. Cheap to
/// clone; every clone, and every other process opening the same root,
/// coordinates through the store's lock files.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) paths: Paths,
    pub(crate) meta: Meta,
    pub(crate) config: StoreConfig,
    /// The registry client, made at the first pull.
    registry_client: crate::source::SharedClient,
}

/// Run blocking store work (file I/O, locks, mkfs.erofs) on tokio's
/// blocking pool, so the engine's executor never waits on a disk.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ImageError::io("run", PathBuf::new())(
            std::io::Error::other(e),
        )),
    }
}

impl ImageStore {
    /// Open (creating) the store at `root`. When no pull or GC is running
    /// on it, whatever a crash left in `tmp/` is removed. Blocking (a few
    /// directory operations).
    pub fn open(root: impl Into<PathBuf>, config: StoreConfig) -> Result<Self, ImageError> {
        let paths = Paths::new(root.into());
        for dir in paths.dirs() {
            std::fs::create_dir_all(&dir).map_err(ImageError::io("create", &dir))?;
        }
        if let Some(_store) = FileLock::try_lock(&paths.store_lock(), LockMode::Exclusive)? {
            let _meta = FileLock::lock_blocking(&paths.meta_lock(), LockMode::Exclusive)?;
            // Leftovers of a pull or conversion a crash interrupted.
            crate::fsio::sweep_dir(&paths.tmp(), |_| false)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                meta: Meta::new(paths.clone()),
                paths,
                config,
                registry_client: Default::default(),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.inner.paths.root()
    }

    /// Its configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The erofs image of a layer of a stored image.
    pub fn erofs_path(&self, layer: &LayerRecord) -> PathBuf {
        self.inner.paths.erofs(&layer.diff_id)
    }

    /// Pull `reference` from its registry; an image already stored under
    /// the digest the registry names is not fetched again.
    pub async fn pull(&self, reference: &str, progress: &ProgressFn) -> Result<Image, ImageError> {
        let inner = &self.inner;
        let client = inner.registry_client.get(&inner.config);
        let source = Source::registry(reference, &inner.config, client)?;
        crate::ingest::ingest(self, &source, progress).await
    }

    /// Import an OCI layout directory, an OCI archive or a docker archive.
    /// `tag` (a full reference) is recorded, and picks the image when the
    /// source holds several.
    pub async fn import(
        &self,
        path: &Path,
        tag: Option<&str>,
        progress: &ProgressFn,
    ) -> Result<Image, ImageError> {
        let (path, tag) = (path.to_owned(), tag.map(str::to_owned));
        let source = blocking(move || Source::local(&path, tag.as_deref())).await?;
        crate::ingest::ingest(self, &source, progress).await
    }

    /// Store the image made of layer directories `dirs`, lowest first
    /// (containerd's committed overlayfs snapshots), each converted once
    /// and kept by the directory's identity.
    pub async fn import_rootfs(
        &self,
        dirs: &[PathBuf],
        tag: Option<&str>,
        progress: &ProgressFn,
    ) -> Result<Image, ImageError> {
        crate::rootfs::import_rootfs(self, dirs, tag, progress).await
    }

    /// Every stored image.
    pub async fn list(&self) -> Result<Vec<Image>, ImageError> {
        let meta = self.inner.meta.clone();
        blocking(move || meta.list()).await
    }

    /// The image a reference or digest names.
    pub async fn describe(&self, what: &str) -> Result<Image, ImageError> {
        self.on_meta(what, |meta, what| meta.describe(what)).await
    }

    /// Record that `user` (`vm:<id>`, `pool:<name>`, ...) uses the image;
    /// returns its digest, which the user should keep (a tag can move).
    pub async fn acquire(&self, what: &str, user: &str) -> Result<Acquired, ImageError> {
        let user = user.to_owned();
        self.on_meta(what, move |meta, what| meta.acquire(what, &user))
            .await
    }

    /// `user` no longer uses the image.
    pub async fn release(&self, what: &str, user: &str) -> Result<Released, ImageError> {
        let user = user.to_owned();
        self.on_meta(what, move |meta, what| meta.release(what, &user))
            .await
    }

    /// Remove a tag (the image stays while other tags name it) or an image
    /// by digest; refused with `ImageInUse` while it has users. Its files
    /// are freed by [`ImageStore::gc`].
    pub async fn remove(&self, what: &str) -> Result<Removed, ImageError> {
        self.on_meta(what, |meta, what| meta.remove(what)).await
    }

    /// Run `f` on the metadata for the image `what` names, on the blocking
    /// pool.
    async fn on_meta<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Meta, &Lookup) -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, ImageError> {
        let (meta, what) = (self.inner.meta.clone(), Lookup::parse(what)?);
        blocking(move || f(&meta, &what)).await
    }

    /// Remove every blob and layer no image record needs. Waits for running
    /// pulls and imports to finish first.
    pub async fn gc(&self) -> Result<GcReport, ImageError> {
        let (meta, lock) = (self.inner.meta.clone(), self.inner.paths.store_lock());
        blocking(move || {
            let _store = FileLock::lock_blocking(&lock, LockMode::Exclusive)?;
            meta.gc()
        })
        .await
    }
}
