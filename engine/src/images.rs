//! Stored images as the APIs show them, and the progress of a pull or
//! import as callers see it: one running tally per job, in bytes and
//! layers, built from the image store's step-by-step reports.
//!
//! The store itself (`kiln-image`) keeps the images; the actor's image half
//! (`actor/images.rs`) drives it.

use kiln_image::{Image, LayerStep, Progress};
use serde::Serialize;

pub use kiln_image::ProcessConfig as ImageProcess;

/// A stored image: what `ListImages` and `DescribeImage` return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    /// The manifest digest (`sha256:…`): the image's identity.
    pub digest: String,
    /// Normalised references (`registry/repository:tag`) naming it.
    pub references: Vec<String>,
    /// The manifest's media type (OCI or Docker v2 schema 2).
    pub media_type: String,
    /// The index (manifest list) it was picked from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// The config blob's digest.
    pub config_digest: String,
    /// `os/architecture[/variant]`.
    pub platform: String,
    /// Layers, lowest first.
    pub layers: Vec<ImageLayer>,
    /// The image config's process fields (entrypoint, cmd, env, working
    /// directory, user).
    pub process: ImageProcess,
    /// Bytes on disk: the erofs images of all layers.
    pub size: u64,
    /// The image's own creation time (RFC 3339, from its config), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// When the store finished storing it (µs since the epoch).
    pub stored_at: u64,
    /// Where it came from (`registry host/repository`, an archive's path).
    pub source: String,
    /// Who uses it (`vm:<id>`, `pool:<name>`, …): while any does,
    /// `RemoveImage` is refused with `ImageInUse`.
    pub users: Vec<String>,
}

/// One layer of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageLayer {
    /// The layer blob's digest (compressed, as in the manifest).
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// The digest of the uncompressed tar: what the converted layer is
    /// cached under, shared by every image with the same layer.
    pub diff_id: String,
    /// The size of its erofs image in bytes.
    pub erofs_size: u64,
}

impl From<Image> for ImageInfo {
    fn from(image: Image) -> Self {
        let r = image.record;
        Self {
            digest: r.digest.to_string(),
            references: image.references,
            media_type: r.media_type,
            index_digest: r.index_digest.map(|d| d.to_string()),
            config_digest: r.config_digest.to_string(),
            platform: r.platform.to_string(),
            layers: r
                .layers
                .into_iter()
                .map(|l| ImageLayer {
                    digest: l.digest.to_string(),
                    media_type: l.media_type,
                    size: l.size,
                    diff_id: l.diff_id.to_string(),
                    erofs_size: l.erofs_size,
                })
                .collect(),
            process: r.process,
            size: r.size,
            created: r.created,
            // The store keeps seconds; the APIs speak microseconds.
            stored_at: r.stored_at.saturating_mul(1_000_000),
            source: r.source,
            users: image.users,
        }
    }
}

/// What a pull or import is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ImageStep {
    /// The manifest is known: `layers` and `total_bytes` are set.
    Resolved,
    /// Layer `layer` was converted before: nothing to fetch.
    Cached,
    /// Layer `layer` is being downloaded (or read from the archive).
    Downloading,
    /// Layer `layer` arrived and matched its digest; its tar is scanned.
    Checking,
    /// Layer `layer` is being converted to erofs.
    Converting,
    /// Layer `layer` is stored.
    Converted,
    /// The image is stored (the last report).
    Stored,
}

/// One progress report of a pull or import: where it is, and how far in
/// bytes and layers. Reports are best effort: a caller that reads slowly
/// misses some (never the reply that ends the job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageProgress {
    /// What just happened.
    pub step: ImageStep,
    /// The manifest digest being stored.
    pub digest: String,
    /// The layer the step is about, from 1; 0 for the image as a whole.
    pub layer: u32,
    /// How many layers the image has.
    pub layers: u32,
    /// Bytes of layer blobs done: received, or already stored (a cached
    /// layer counts whole).
    pub done_bytes: u64,
    /// The sum of the layer blobs' sizes, as the manifest declares them.
    pub total_bytes: u64,
}

/// The running tally of one job, fed the store's reports in order.
#[derive(Debug, Default)]
pub(crate) struct ProgressTally {
    digest: String,
    total_bytes: u64,
    /// Bytes done per layer.
    done: Vec<u64>,
    /// The image is stored: everything is done, whatever was reported.
    stored: bool,
}

impl ProgressTally {
    /// Account for one store report; what callers see of it.
    pub(crate) fn apply(&mut self, report: Progress) -> ImageProgress {
        let (step, layer) = match report {
            Progress::Resolved {
                digest,
                layers,
                total_bytes,
            } => {
                self.digest = digest;
                self.total_bytes = total_bytes;
                self.done = vec![0; layers];
                (ImageStep::Resolved, 0)
            }
            Progress::Layer {
                index, size, step, ..
            } => {
                let (step, done) = match step {
                    LayerStep::Cached => (ImageStep::Cached, size),
                    LayerStep::Downloading { done, .. } => (ImageStep::Downloading, done),
                    LayerStep::Checking => (ImageStep::Checking, size),
                    LayerStep::Converting => (ImageStep::Converting, size),
                    LayerStep::Converted { .. } => (ImageStep::Converted, size),
                };
                if let Some(slot) = self.done.get_mut(index) {
                    *slot = done.min(size);
                }
                (step, index.saturating_add(1))
            }
            Progress::Stored { digest, .. } => {
                self.digest = digest;
                self.stored = true;
                (ImageStep::Stored, 0)
            }
        };
        let done = match self.stored {
            true => self.total_bytes,
            false => self.done.iter().sum::<u64>().min(self.total_bytes),
        };
        ImageProgress {
            step,
            digest: self.digest.clone(),
            layer: u32::try_from(layer).unwrap_or(u32::MAX),
            layers: u32::try_from(self.done.len()).unwrap_or(u32::MAX),
            done_bytes: done,
            total_bytes: self.total_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(index: usize, size: u64, step: LayerStep) -> Progress {
        Progress::Layer {
            index,
            layers: 2,
            digest: format!("sha256:{index}"),
            size,
            step,
        }
    }

    #[test]
    fn the_tally_counts_bytes_over_layers_and_cached_layers_whole() {
        let mut tally = ProgressTally::default();
        let seen: Vec<(ImageStep, u32, u64)> = [
            Progress::Resolved {
                digest: "sha256:m".into(),
                layers: 2,
                total_bytes: 300,
            },
            layer(0, 100, LayerStep::Cached),
            layer(
                1,
                200,
                LayerStep::Downloading {
                    done: 0,
                    total: 200,
                },
            ),
            layer(
                1,
                200,
                LayerStep::Downloading {
                    done: 150,
                    total: 200,
                },
            ),
            layer(1, 200, LayerStep::Checking),
            layer(1, 200, LayerStep::Converting),
            layer(1, 200, LayerStep::Converted { erofs_bytes: 4096 }),
            Progress::Stored {
                digest: "sha256:m".into(),
                cached: false,
            },
        ]
        .into_iter()
        .map(|p| {
            let r = tally.apply(p);
            assert_eq!(
                (r.digest.as_str(), r.layers, r.total_bytes),
                ("sha256:m", 2, 300)
            );
            (r.step, r.layer, r.done_bytes)
        })
        .collect();
        assert_eq!(
            seen,
            [
                (ImageStep::Resolved, 0, 0),
                (ImageStep::Cached, 1, 100),
                (ImageStep::Downloading, 2, 100),
                (ImageStep::Downloading, 2, 250),
                (ImageStep::Checking, 2, 300),
                (ImageStep::Converting, 2, 300),
                (ImageStep::Converted, 2, 300),
                (ImageStep::Stored, 0, 300),
            ]
        );
    }

    #[test]
    fn a_cache_hit_is_resolved_then_stored_and_reports_serialise_in_camel_case() {
        let mut tally = ProgressTally::default();
        tally.apply(Progress::Resolved {
            digest: "sha256:m".into(),
            layers: 1,
            total_bytes: 10,
        });
        let done = tally.apply(Progress::Stored {
            digest: "sha256:m".into(),
            cached: true,
        });
        assert_eq!(
            serde_json::to_value(&done).expect("json"),
            serde_json::json!({"step": "stored", "digest": "sha256:m", "layer": 0,
                "layers": 1, "doneBytes": 10, "totalBytes": 10})
        );
        // A report for a layer the manifest does not have changes nothing.
        let odd = tally.apply(layer(7, 5, LayerStep::Cached));
        assert_eq!((odd.layer, odd.done_bytes), (8, 10));
    }
}
