//! Progress of a pull or import, for the engine to stream (`more` on
//! varlink, signals on D-Bus): the image resolved, then per layer its
//! download, check and conversion, then the image stored.

use serde::Serialize;

/// A callback that receives progress; called from the pulling task, so
/// it must be quick (send on a channel, don't block).
pub type ProgressFn = dyn Fn(Progress) + Send + Sync;

/// Ignore progress.
pub fn no_progress(_: Progress) {}

/// One step of a pull or import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum Progress {
    /// The manifest is known: how many layers and bytes (compressed) it has.
    #[serde(rename_all = "camelCase")]
    Resolved {
        /// Manifest digest.
        digest: String,
        /// Number of layers.
        layers: usize,
        /// Sum of the layer blobs' sizes.
        total_bytes: u64,
    },
    /// Layer `index` (0-based) of `layers` moved on.
    #[serde(rename_all = "camelCase")]
    Layer {
        /// Which layer, lowest first.
        index: usize,
        /// How many there are.
        layers: usize,
        /// The layer blob's digest.
        digest: String,
        /// The layer blob's size (what a download of it fetches), so a
        /// consumer can count a cached layer as done.
        size: u64,
        /// What happened.
        step: LayerStep,
    },
    /// The image is stored (or was already: `cached`).
    #[serde(rename_all = "camelCase")]
    Stored {
        /// Manifest digest.
        digest: String,
        /// Whether nothing had to be fetched or converted.
        cached: bool,
    },
}

/// What happened to a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "step")]
pub enum LayerStep {
    /// Already converted: nothing to download.
    Cached,
    /// Bytes of the blob received so far.
    #[serde(rename_all = "camelCase")]
    Downloading {
        /// Received.
        done: u64,
        /// The blob's size.
        total: u64,
    },
    /// Downloaded and verified; the tar is being scanned.
    Checking,
    /// Scanned; mkfs.erofs is running.
    Converting,
    /// The erofs image is in place.
    #[serde(rename_all = "camelCase")]
    Converted {
        /// Its size.
        erofs_bytes: u64,
    },
}
