//! The actor's image half: `PullImage`, `ImportImage`, `ImportRootfs`, `ListImages`,
//! `DescribeImage`, `RemoveImage`, and the garbage collection after a
//! removal (docs/images.md).
//!
//! The image store (`kiln-image`) is opened at start under
//! `<state_dir>/images` and shared with sub-tasks: it locks itself (flock)
//! and does its disk work on the blocking pool, so every call to it runs in
//! a sub-task and the actor never waits on a download, a conversion or a
//! lock. Sub-tasks whose outcome watchers must hear of (a pull, an import,
//! a removal) report back as [`Internal`] events; the actor publishes the
//! [`EngineEvent`] and replies. Reads reply straight from their sub-task.

use std::sync::Mutex;

use kiln_image::{GcReport, ImageStore, Progress, ProgressFn, Removed};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Engine, Internal};
use crate::api::{validate_image_name, validate_import_path, EngineEvent, ImageRemoved, Reply};
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::images::{ImageInfo, ImageProgress, ProgressTally};

/// The store and the state of its garbage collection.
#[derive(Debug)]
pub(super) struct Images {
    store: ImageStore,
    /// A collection runs.
    collecting: bool,
    /// Another removal came while it ran: collect again after it.
    collect_again: bool,
}

impl Images {
    /// Open (creating) the store under `<state_dir>/images`; whatever a
    /// crash left in its `tmp/` is swept. Blocking, like the rest of the
    /// engine's start: a few directory operations.
    /// The store (sub-tasks use a clone).
    pub(super) fn store(&self) -> &ImageStore {
        &self.store
    }

    pub(super) fn open(config: &EngineConfig) -> Result<Self, EngineError> {
        let store = ImageStore::open(config.images_dir(), config.image_store_config())?;
        Ok(Self {
            store,
            collecting: false,
            collect_again: false,
        })
    }
}

/// How a finished `RemoveImage` reports back: what it did, and the image
/// as it is now when only one of its tags went.
pub(super) type RemoveOutcome = (ImageRemoved, Option<ImageInfo>);

/// A store progress callback that tallies reports into [`ImageProgress`]
/// and offers each to `tx` without waiting (a report that does not fit is
/// dropped: the callback runs inside the pull and must not block it).
fn progress_sink(tx: mpsc::Sender<ImageProgress>) -> impl Fn(Progress) + Send + Sync {
    let tally = Mutex::new(ProgressTally::default());
    move |report| {
        // A panic while holding it cannot leave the tally inconsistent.
        let shown = tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(report);
        let _ = tx.try_send(shown);
    }
}

impl Engine {
    pub(super) fn pull_image(
        &mut self,
        reference: String,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    ) {
        if let Err(e) = validate_image_name(&reference) {
            return drop(reply.send(Err(e)));
        }
        self.spawn_image_job(
            format!("pull of {reference}"),
            progress,
            reply,
            |store, sink| async move { store.pull(&reference, &*sink).await },
        );
    }

    pub(super) fn import_image(
        &mut self,
        path: std::path::PathBuf,
        reference: Option<String>,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    ) {
        let valid = validate_import_path(&path)
            .and_then(|()| reference.as_deref().map_or(Ok(()), validate_image_name));
        if let Err(e) = valid {
            return drop(reply.send(Err(e)));
        }
        let what = format!("import of {}", path.display());
        self.spawn_image_job(what, progress, reply, |store, sink| async move {
            store.import(&path, reference.as_deref(), &*sink).await
        });
    }

    pub(super) fn import_rootfs(
        &mut self,
        layers: Vec<std::path::PathBuf>,
        reference: Option<String>,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
    ) {
        let count = match layers.len() {
            1..=kiln_image::MAX_ROOTFS_LAYERS => Ok(()),
            n => Err(EngineError::InvalidArgument(format!(
                "{n} layer directories: 1 to {} are allowed",
                kiln_image::MAX_ROOTFS_LAYERS
            ))),
        };
        let valid = count
            .and_then(|()| layers.iter().try_for_each(|l| validate_import_path(l)))
            .and_then(|()| reference.as_deref().map_or(Ok(()), validate_image_name));
        if let Err(e) = valid {
            return drop(reply.send(Err(e)));
        }
        let what = format!("rootfs import of {} layers", layers.len());
        self.spawn_image_job(what, progress, reply, |store, sink| async move {
            store
                .import_rootfs(&layers, reference.as_deref(), &*sink)
                .await
        });
    }

    /// Run one pull or import (`job`, given the store and the sink of its
    /// reports) in a sub-task; its end goes back to the actor.
    fn spawn_image_job<Job>(
        &self,
        what: String,
        progress: mpsc::Sender<ImageProgress>,
        reply: Reply<ImageInfo>,
        job: impl FnOnce(ImageStore, Box<ProgressFn>) -> Job,
    ) where
        Job: std::future::Future<Output = Result<kiln_image::Image, kiln_image::ImageError>>
            + Send
            + 'static,
    {
        let job = job(self.images.store.clone(), Box::new(progress_sink(progress)));
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = job.await;
            if let Err(e) = &result {
                info!(error = %e, "image {what} failed");
            }
            let result = result.map(ImageInfo::from).map_err(EngineError::from);
            let _ = tx.send(Internal::ImageStored { result, reply });
        });
    }

    pub(super) fn list_images(&self, reply: Reply<Vec<ImageInfo>>) {
        let store = self.images.store.clone();
        tokio::spawn(async move {
            let images = store.list().await.map_err(EngineError::from);
            let _ = reply.send(images.map(|all| all.into_iter().map(ImageInfo::from).collect()));
        });
    }

    pub(super) fn describe_image(&self, image: String, reply: Reply<ImageInfo>) {
        if let Err(e) = validate_image_name(&image) {
            return drop(reply.send(Err(e)));
        }
        let store = self.images.store.clone();
        tokio::spawn(async move {
            let found = store.describe(&image).await.map_err(EngineError::from);
            let _ = reply.send(found.map(ImageInfo::from));
        });
    }

    pub(super) fn remove_image(&mut self, image: String, reply: Reply<ImageRemoved>) {
        if let Err(e) = validate_image_name(&image) {
            return drop(reply.send(Err(e)));
        }
        let (store, tx) = (self.images.store.clone(), self.internal_tx.clone());
        tokio::spawn(async move {
            let result = match store.remove(&image).await {
                Ok(Removed::Deleted { digest }) => Ok((
                    ImageRemoved::Deleted {
                        digest: digest.to_string(),
                    },
                    None,
                )),
                Ok(Removed::Untagged { digest }) => {
                    // What the image looks like without the tag, for
                    // watchers; gone meanwhile is fine.
                    let now = store.describe(digest.as_str()).await.ok();
                    Ok((
                        ImageRemoved::Untagged {
                            digest: digest.to_string(),
                        },
                        now.map(ImageInfo::from),
                    ))
                }
                Err(e) => Err(EngineError::from(e)),
            };
            let _ = tx.send(Internal::ImageRemoved { result, reply });
        });
    }

    /// A pull or import ended: tell watchers, then the caller.
    pub(super) fn image_stored(
        &mut self,
        result: Result<ImageInfo, EngineError>,
        reply: Reply<ImageInfo>,
    ) {
        if let Ok(image) = &result {
            info!(digest = %image.digest, references = ?image.references, "image stored");
            let _ = self.events.send(EngineEvent::ImageAdded {
                image: image.clone(),
            });
            // A tag may have moved to this image: per-image pools look
            // their image up again.
            self.follow_pool_tags();
        }
        let _ = reply.send(result);
    }

    /// A removal ended: tell watchers and the caller, and free the files
    /// of a removed image.
    pub(super) fn image_removed(
        &mut self,
        result: Result<RemoveOutcome, EngineError>,
        reply: Reply<ImageRemoved>,
    ) {
        let result = result.map(|(removed, now)| {
            match (&removed, now) {
                (ImageRemoved::Deleted { digest }, _) => {
                    info!(%digest, "image removed");
                    let digest = digest.clone();
                    let _ = self.events.send(EngineEvent::ImageRemoved { digest });
                    self.collect_images();
                }
                (ImageRemoved::Untagged { .. }, Some(image)) => {
                    let _ = self.events.send(EngineEvent::ImageAdded { image });
                }
                (ImageRemoved::Untagged { .. }, None) => {}
            }
            removed
        });
        let _ = reply.send(result);
    }

    /// Free the blobs and layers no image needs, in a sub-task (it waits
    /// for running pulls); one collection at a time, and one more if a
    /// removal came while it ran.
    fn collect_images(&mut self) {
        if self.images.collecting {
            self.images.collect_again = true;
            return;
        }
        self.images.collecting = true;
        let (store, tx) = (self.images.store.clone(), self.internal_tx.clone());
        tokio::spawn(async move {
            let result = store.gc().await.map_err(EngineError::from);
            let _ = tx.send(Internal::ImagesCollected { result });
        });
    }

    pub(super) fn images_collected(&mut self, result: Result<GcReport, EngineError>) {
        self.images.collecting = false;
        match result {
            Ok(report) => info!(
                blobs = report.blobs,
                layers = report.layers,
                bytes = report.bytes,
                broken = ?report.broken_records,
                "image store collected"
            ),
            Err(e) => warn!(error = %e.message(), "image store collection failed"),
        }
        if std::mem::take(&mut self.images.collect_again) {
            self.collect_images();
        }
    }
}
