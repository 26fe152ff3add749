//! What the image tests share besides kiln-testkit's test images and
//! registry (`kiln_testkit::oci`, `kiln_testkit::registry`, re-exported
//! here): a store in a temp dir, progress recording, and looking into
//! refusals.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_image::{Image, ImageError, ImageStore, InvalidReason, Progress, StoreConfig};
pub use kiln_testkit::oci::*;
pub use kiln_testkit::registry::*;

/// The diff ids of a stored image's layers.
pub fn diff_ids(image: &Image) -> Vec<String> {
    image
        .record
        .layers
        .iter()
        .map(|l| l.diff_id.to_string())
        .collect()
}

/// Why an image was refused; panics on any other error.
pub fn reason(err: &ImageError) -> &InvalidReason {
    match err {
        ImageError::InvalidImage { reason, .. } => reason,
        other => panic!("not InvalidImage: {other:?}"),
    }
}

/// A store in a temp dir that pulls from 127.0.0.1 registries over HTTP.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: ImageStore,
}

impl TestStore {
    pub fn new(registry: Option<&Registry>) -> Self {
        Self::with(registry, |_| {})
    }

    pub fn with(registry: Option<&Registry>, tweak: impl FnOnce(&mut StoreConfig)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-img")
            .tempdir()
            .unwrap();
        let mut config = StoreConfig::default();
        if let Some(r) = registry {
            config.insecure_registries.push(r.host());
        }
        tweak(&mut config);
        let store = ImageStore::open(dir.path().join("images"), config).unwrap();
        Self { dir, store }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Files in a store directory (`erofs/sha256`, `tmp`, ...).
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Import the image in `dir` (a layout or an archive), untagged.
    pub async fn import(&self, dir: &Path) -> Result<Image, ImageError> {
        self.store.import(dir, None, &kiln_image::no_progress).await
    }

    /// Pull `reference`, ignoring progress.
    pub async fn pull(&self, reference: &str) -> Result<Image, ImageError> {
        self.store.pull(reference, &kiln_image::no_progress).await
    }

    /// Nothing of a refused image anywhere: no record, no layer, no blob,
    /// nothing left in tmp/.
    pub fn assert_empty(&self) {
        for sub in ["images/sha256", "erofs/sha256", "blobs/sha256", "tmp"] {
            assert_eq!(self.files(sub), Vec::<String>::new(), "{sub} is not empty");
        }
    }
}

/// Progress events, recorded.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Progress>>>);

impl Events {
    pub fn sink(&self) -> impl Fn(Progress) + Send + Sync + 'static {
        let events = self.0.clone();
        move |p| events.lock().unwrap().push(p)
    }
    pub fn take(&self) -> Vec<Progress> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Count layer steps matching `f`.
pub fn count_steps(events: &[Progress], f: impl Fn(&kiln_image::LayerStep) -> bool) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Progress::Layer { step, .. } if f(step)))
        .count()
}
