//! Images made of directories: a containerd shim hands kilnd the layer
//! directories of the overlayfs snapshot containerd prepared for a
//! container (its committed snapshots' `fs/`, one layer each, whiteouts in
//! overlayfs form), lowest first. Each becomes one erofs layer, keyed by
//! the directory's identity (real path, device, inode, change time), not
//! its content: committed snapshots never change and containerd never
//! reuses their ids, so the second container of an image converts nothing
//! and reading every file to hash it is not needed.
//!
//! The image record is an ordinary one (so acquiring, releasing and GC
//! work unchanged): its "manifest" is the list of layer keys, stored as a
//! blob; it has no process config (the caller brings the OCI runtime
//! spec's) and the host's platform.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::convert::convert_dir;
use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};
use crate::fsio::{FileLock, LockMode, TempPath};
use crate::ingest::{store_blob, tag_if_stored};
use crate::paths::Paths;
use crate::progress::{LayerStep, Progress, ProgressFn};
use crate::record::{Image, ImageRecord, LayerRecord, ProcessConfig, RECORD_VERSION};
use crate::reference::{parse_reference, tag_key};
use crate::store::{blocking, ImageStore};

/// The most layer directories one image may have (OCI images rarely pass
/// 100; overlayfs stacks at most 500 lower layers).
pub const MAX_ROOTFS_LAYERS: usize = 128;
/// The media type of a rootfs image's "manifest" (its layer keys).
pub const ROOTFS_MEDIA_TYPE: &str = "application/vnd.kiln.rootfs.v1+json";
/// The media type of a layer made from a directory.
pub const DIR_LAYER_MEDIA_TYPE: &str = "application/vnd.kiln.layer.v1.dir";

/// One layer directory, resolved.
struct DirLayer {
    dir: PathBuf,
    key: Digest,
}

/// The key of directory `dir`: a digest of its identity. Blocking.
fn dir_layer(dir: &Path) -> Result<DirLayer, ImageError> {
    let not_found = || ImageError::ImageNotFound {
        what: format!("layer directory {}", dir.display()),
    };
    let real = std::fs::canonicalize(dir).map_err(|_| not_found())?;
    let meta = std::fs::metadata(&real).map_err(|_| not_found())?;
    if !meta.is_dir() {
        return Err(not_found());
    }
    let identity = format!(
        "kiln-dir-layer:v1\0{}\0{}\0{}\0{}.{}",
        real.display(),
        meta.dev(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    Ok(DirLayer {
        dir: real,
        key: Digest::of(identity.as_bytes()),
    })
}

/// Store the image made of `dirs` (lowest layer first), tagged `tag`.
pub(crate) async fn import_rootfs(
    store: &ImageStore,
    dirs: &[PathBuf],
    tag: Option<&str>,
    progress: &ProgressFn,
) -> Result<Image, ImageError> {
    let name = dirs
        .last()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    if dirs.is_empty() || dirs.len() > MAX_ROOTFS_LAYERS {
        return Err(ImageError::malformed(
            &name,
            "rootfs",
            format!("{} layer directories: 1 to {MAX_ROOTFS_LAYERS}", dirs.len()),
        ));
    }
    let tags = match tag {
        Some(t) => vec![tag_key(&parse_reference(t)?)],
        None => Vec::new(),
    };
    let wanted = dirs.to_vec();
    let layers = blocking(move || wanted.iter().map(|d| dir_layer(d)).collect()).await?;
    let layers: Vec<DirLayer> = layers;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "mediaType": ROOTFS_MEDIA_TYPE,
        "layers": layers.iter().map(|l| l.key.to_string()).collect::<Vec<_>>(),
    }))
    .unwrap_or_default();
    let digest = Digest::of(&manifest);
    progress(Progress::Resolved {
        digest: digest.to_string(),
        layers: layers.len(),
        total_bytes: 0,
    });
    if let Some(image) = tag_if_stored(store, &digest, &tags).await? {
        progress(Progress::Stored {
            digest: digest.to_string(),
            cached: true,
        });
        return Ok(image);
    }
    let inner = &store.inner;
    let _store_lock = FileLock::acquire(inner.paths.store_lock(), LockMode::Shared).await?;
    let limit = inner.config.max_image_bytes;
    let mut records = Vec::with_capacity(layers.len());
    let mut size = 0u64;
    for (index, layer) in layers.iter().enumerate() {
        let step = |step| {
            progress(Progress::Layer {
                index,
                layers: layers.len(),
                digest: layer.key.to_string(),
                size: 0,
                step,
            })
        };
        let erofs_size = convert_layer_dir(store, layer, &step).await?;
        size += erofs_size;
        if size > limit {
            return Err(ImageError::invalid(
                &name,
                InvalidReason::TooLarge { limit },
            ));
        }
        records.push(LayerRecord {
            digest: layer.key.clone(),
            media_type: DIR_LAYER_MEDIA_TYPE.to_owned(),
            size: 0,
            diff_id: layer.key.clone(),
            erofs: Paths::erofs_rel(&layer.key),
            erofs_size,
        });
    }
    let (paths, blob_digest) = (inner.paths.clone(), digest.clone());
    blocking(move || store_blob(&paths, &blob_digest, &manifest)).await?;
    let record = ImageRecord {
        version: RECORD_VERSION,
        digest: digest.clone(),
        media_type: ROOTFS_MEDIA_TYPE.to_owned(),
        index_digest: None,
        config_digest: digest.clone(),
        platform: inner.config.platform.clone(),
        size,
        layers: records,
        process: ProcessConfig::default(),
        created: None,
        stored_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        source: format!("rootfs:{name}"),
    };
    let meta = inner.meta.clone();
    let image = blocking(move || meta.commit(record, &tags)).await?;
    progress(Progress::Stored {
        digest: digest.to_string(),
        cached: false,
    });
    Ok(image)
}

/// Make sure `layer`'s erofs image exists (under its own lock, as a
/// pulled layer); its size.
async fn convert_layer_dir(
    store: &ImageStore,
    layer: &DirLayer,
    step: &(dyn Fn(LayerStep) + Sync),
) -> Result<u64, ImageError> {
    let paths = &store.inner.paths;
    let erofs = paths.erofs(&layer.key);
    let _layer_lock = FileLock::acquire(paths.layer_lock(&layer.key), LockMode::Exclusive).await?;
    if let Ok(meta) = tokio::fs::metadata(&erofs).await {
        step(LayerStep::Cached);
        return Ok(meta.len());
    }
    step(LayerStep::Converting);
    let out = TempPath::new(&paths.tmp(), "erofs");
    let mkfs = store.inner.config.mkfs_erofs.clone();
    let dir = layer.dir.clone();
    let size = blocking(move || {
        convert_dir(&mkfs, &dir, out.path())?;
        let size = std::fs::metadata(out.path())
            .map_err(ImageError::io("read", out.path()))?
            .len();
        out.persist(&erofs)?;
        Ok(size)
    })
    .await?;
    step(LayerStep::Converted { erofs_bytes: size });
    Ok(size)
}
