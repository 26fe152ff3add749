//! A pull or an import, the same steps for every source:
//!
//! 1. resolve the manifest for this platform (verified by digest); if a
//!    record for that digest exists, only tag it: a cache hit;
//! 2. take the store lock shared (GC waits) and fetch the config;
//! 3. per layer, under its own lock: if its erofs image exists, reuse it;
//!    else download the blob into `tmp/` verifying digest and size as it
//!    streams, scan the tar, convert it, and rename the erofs image into
//!    `erofs/` — the blob itself is dropped, the erofs image is the cache;
//! 4. store manifest and config in `blobs/`, then the record, then tags.
//!
//! Everything before its rename lives in `tmp/`, so a crash or a refusal
//! at any step leaves no partial file where the store looks.

use std::path::Path;

use tokio::io::AsyncWriteExt;

use crate::convert::convert_fed;
use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};
use crate::fsio::{write_atomic, FileLock, LockMode, TempPath};
use crate::manifest::{parse_config, Compression, Descriptor};
use crate::paths::Paths;
use crate::progress::{LayerStep, Progress, ProgressFn};
use crate::record::{Image, ImageRecord, LayerRecord, RECORD_VERSION};
use crate::scan::{scan_layer, Scanned};
use crate::source::{Source, Verifier};
use crate::store::{blocking, ImageStore};

/// Report download progress at most every this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// Pull or import the image `source` names.
pub async fn ingest(
    store: &ImageStore,
    source: &Source,
    progress: &ProgressFn,
) -> Result<Image, ImageError> {
    let inner = &store.inner;
    let resolved = source.resolve(&inner.config.platform).await?;
    let name = source.name();
    let layers = &resolved.manifest.layers;
    let total: u64 = layers.iter().map(|l| l.size).sum();
    progress(Progress::Resolved {
        digest: resolved.digest.to_string(),
        layers: layers.len(),
        total_bytes: total,
    });
    if let Some(image) = tag_if_stored(store, &resolved.digest, &resolved.tags).await? {
        progress(Progress::Stored {
            digest: resolved.digest.to_string(),
            cached: true,
        });
        return Ok(image);
    }
    let limit = inner.config.max_image_bytes;
    if total > limit {
        return Err(ImageError::invalid(
            &name,
            InvalidReason::TooLarge { limit },
        ));
    }
    let _store_lock = FileLock::acquire(inner.paths.store_lock(), LockMode::Shared).await?;

    let config_bytes = source.read_document(&resolved.manifest.config).await?;
    let config = parse_config(&config_bytes).map_err(|r| ImageError::invalid(&name, r))?;
    let wanted = &inner.config.platform;
    if !wanted.runs(&config.platform) {
        return Err(ImageError::invalid(
            &name,
            InvalidReason::Platform {
                wanted: wanted.to_string(),
                available: vec![config.platform.to_string()],
            },
        ));
    }
    if config.diff_ids.len() != layers.len() {
        return Err(ImageError::malformed(
            &name,
            "config",
            format!(
                "{} diff ids for {} layers",
                config.diff_ids.len(),
                layers.len()
            ),
        ));
    }

    let mut records = Vec::with_capacity(layers.len());
    // Uncompressed bytes of this image so far, against the limit.
    let mut used = 0u64;
    for (index, (layer, diff_id)) in layers.iter().zip(&config.diff_ids).enumerate() {
        let step = |step| {
            progress(Progress::Layer {
                index,
                layers: layers.len(),
                digest: layer.digest.to_string(),
                size: layer.size,
                step,
            })
        };
        let job = LayerJob {
            store,
            source,
            name: &name,
            layer,
            diff_id,
            budget: limit.saturating_sub(used),
        };
        let (record, uncompressed) = job.run(&step).await?;
        used += uncompressed;
        records.push(record);
    }

    let paths = inner.paths.clone();
    let (manifest_digest, manifest_bytes) = (resolved.digest.clone(), resolved.bytes.clone());
    let config_digest = resolved.manifest.config.digest.clone();
    blocking(move || {
        store_blob(&paths, &manifest_digest, &manifest_bytes)?;
        store_blob(&paths, &config_digest, &config_bytes)
    })
    .await?;

    let record = ImageRecord {
        version: RECORD_VERSION,
        digest: resolved.digest.clone(),
        media_type: resolved.manifest.media_type.clone(),
        index_digest: resolved.index_digest.clone(),
        config_digest: resolved.manifest.config.digest.clone(),
        platform: config.platform,
        size: records.iter().map(|l| l.erofs_size).sum(),
        layers: records,
        process: config.process,
        created: config.created,
        stored_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        source: resolved.origin.clone(),
    };
    let (meta, tags) = (inner.meta.clone(), resolved.tags.clone());
    let image = blocking(move || meta.commit(record, &tags)).await?;
    progress(Progress::Stored {
        digest: resolved.digest.to_string(),
        cached: false,
    });
    Ok(image)
}

/// Tag the image if it is stored and all its layers are in place.
pub(crate) async fn tag_if_stored(
    store: &ImageStore,
    digest: &Digest,
    tags: &[String],
) -> Result<Option<Image>, ImageError> {
    let (meta, digest, tags) = (store.inner.meta.clone(), digest.clone(), tags.to_vec());
    let paths = store.inner.paths.clone();
    blocking(move || {
        let complete = match meta.record(&digest)? {
            Some(r) => r.layers.iter().all(|l| paths.erofs(&l.diff_id).is_file()),
            None => false,
        };
        if !complete {
            // No record, or one whose layers an admin removed by hand: a
            // full ingest puts them back.
            return Ok(None);
        }
        meta.tag_if_stored(&digest, &tags)
    })
    .await
}

/// Write a verified blob into `blobs/` unless it is there.
pub(crate) fn store_blob(paths: &Paths, digest: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
    let path = paths.blob(digest);
    if path.is_file() {
        return Ok(());
    }
    write_atomic(&paths.tmp(), &path, bytes)
}

/// One layer of one ingest.
struct LayerJob<'a> {
    store: &'a ImageStore,
    source: &'a Source,
    name: &'a str,
    layer: &'a Descriptor,
    diff_id: &'a Digest,
    /// Uncompressed bytes still allowed for the image.
    budget: u64,
}

impl LayerJob<'_> {
    /// Make sure the layer's erofs image exists; returns its record and the
    /// uncompressed bytes it counts against the image's limit.
    async fn run(
        &self,
        step: &(dyn Fn(LayerStep) + Sync),
    ) -> Result<(LayerRecord, u64), ImageError> {
        let inner = &self.store.inner;
        let compression = Compression::of_layer(&self.layer.media_type)
            .map_err(|r| ImageError::invalid(self.name, r))?;
        let erofs = inner.paths.erofs(self.diff_id);
        let _layer_lock =
            FileLock::acquire(inner.paths.layer_lock(self.diff_id), LockMode::Exclusive).await?;
        let existing = tokio::fs::metadata(&erofs).await.ok().map(|m| m.len());
        let (erofs_size, uncompressed) = match existing {
            Some(size) => {
                step(LayerStep::Cached);
                // The erofs image is at least as large as the files in it.
                if size > self.budget {
                    return Err(self.too_large());
                }
                (size, size)
            }
            None => {
                let blob = self.download(step).await?;
                // Checked and converted in one pass (one decompression):
                // the conversion is kept only if the check passes.
                step(LayerStep::Checking);
                step(LayerStep::Converting);
                let (size, scanned) = self.scan_and_convert(&blob, compression, &erofs).await?;
                step(LayerStep::Converted { erofs_bytes: size });
                (size, scanned.uncompressed)
            }
        };
        Ok((
            LayerRecord {
                digest: self.layer.digest.clone(),
                media_type: self.layer.media_type.clone(),
                size: self.layer.size,
                diff_id: self.diff_id.clone(),
                erofs: Paths::erofs_rel(self.diff_id),
                erofs_size,
            },
            uncompressed,
        ))
    }

    fn too_large(&self) -> ImageError {
        ImageError::invalid(
            self.name,
            InvalidReason::TooLarge {
                limit: self.store.inner.config.max_image_bytes,
            },
        )
    }

    /// Stream the blob into `tmp/`, verified; the temp file goes away when
    /// the returned guard does.
    async fn download(&self, step: &(dyn Fn(LayerStep) + Sync)) -> Result<TempPath, ImageError> {
        let tmp = TempPath::new(&self.store.inner.paths.tmp(), "blob");
        let mut file = tokio::fs::File::create(tmp.path())
            .await
            .map_err(ImageError::io("write", tmp.path()))?;
        let total = self.layer.size;
        step(LayerStep::Downloading { done: 0, total });
        let mut v = Verifier::open(self.source, self.layer).await?;
        let mut reported = 0;
        while let Some(chunk) = v.chunk().await? {
            file.write_all(&chunk)
                .await
                .map_err(ImageError::io("write", tmp.path()))?;
            if v.done() - reported >= PROGRESS_STEP {
                reported = v.done();
                step(LayerStep::Downloading {
                    done: reported,
                    total,
                });
            }
        }
        file.flush()
            .await
            .map_err(ImageError::io("write", tmp.path()))?;
        v.finish()?;
        step(LayerStep::Downloading { done: total, total });
        Ok(tmp)
    }

    /// Scan the blob and convert what the scan reads with mkfs.erofs into
    /// `tmp/`; if the scan passes, fsync and rename to `erofs`.
    async fn scan_and_convert(
        &self,
        blob: &TempPath,
        compression: Compression,
        erofs: &Path,
    ) -> Result<(u64, Scanned), ImageError> {
        let inner = &self.store.inner;
        let out = TempPath::new(&inner.paths.tmp(), "erofs");
        let mkfs = inner.config.mkfs_erofs.clone();
        let (name, path) = (self.name.to_owned(), blob.path().to_owned());
        let (digest, diff_id) = (self.layer.digest.clone(), self.diff_id.clone());
        let (budget, limit) = (self.budget, inner.config.max_image_bytes);
        let erofs = erofs.to_owned();
        blocking(move || {
            let scanned = convert_fed(&mkfs, out.path(), &path, |feed| {
                scan_layer(
                    &name,
                    &path,
                    compression,
                    &digest,
                    &diff_id,
                    budget,
                    limit,
                    feed,
                )
            })?;
            let size = std::fs::metadata(out.path())
                .map_err(ImageError::io("read", out.path()))?
                .len();
            out.persist(&erofs)?;
            Ok((size, scanned))
        })
        .await
    }
}
