//! The image store's errors: one enum whose variants are the wire names the
//! engine maps to D-Bus and varlink errors (`ImageError::name`), and the
//! reasons an image is refused as invalid, so a client can match on both.

use std::path::PathBuf;

use thiserror::Error;

/// Everything the image store can fail with. Each variant is one wire error
/// name; [`ImageError::name`] returns it.
#[derive(Debug, Error)]
pub enum ImageError {
    /// No image, tag or layer by that name or digest in the store (or, for
    /// an import, no image by that name in the archive).
    #[error("no image {what}")]
    ImageNotFound {
        /// The reference, digest or name that was looked up.
        what: String,
    },
    /// The registry could not be reached or refused the request; `reason`
    /// is what it said (its error envelope, the HTTP status or the
    /// connection error).
    #[error("cannot pull {reference}: {reason}")]
    ImagePullFailed {
        /// The reference being pulled.
        reference: String,
        /// The registry's reason.
        reason: String,
    },
    /// The image itself is refused: nothing of it is stored.
    #[error("invalid image {image}")]
    InvalidImage {
        /// The reference, path or digest of the refused image.
        image: String,
        /// Why.
        #[source]
        reason: InvalidReason,
    },
    /// The image still has users (VMs, pools, templates) and cannot be
    /// removed.
    #[error("image {digest} is in use by {}", users.join(", "))]
    ImageInUse {
        /// The image's manifest digest.
        digest: String,
        /// Who holds it (`vm:<id>`, `pool:<name>`, ...).
        users: Vec<String>,
    },
    /// Reading or writing the store failed (I/O, a full disk, mkfs.erofs).
    #[error("image store: cannot {action} {}", path.display())]
    StorageFailed {
        /// What was being done ("write", "convert", "lock", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The wire name: the same on D-Bus (`io.kiln.Kiln1.Error.<name>`) and
    /// varlink (`io.kiln.Manager.<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            ImageError::ImageNotFound { .. } => "ImageNotFound",
            ImageError::ImagePullFailed { .. } => "ImagePullFailed",
            ImageError::InvalidImage { .. } => "InvalidImage",
            ImageError::ImageInUse { .. } => "ImageInUse",
            ImageError::StorageFailed { .. } => "StorageFailed",
        }
    }

    /// An [`ImageError::InvalidImage`] for `image`.
    pub(crate) fn invalid(image: impl Into<String>, reason: InvalidReason) -> Self {
        ImageError::InvalidImage {
            image: image.into(),
            reason,
        }
    }

    /// An [`ImageError::InvalidImage`] for a document of `image` that is
    /// malformed.
    pub(crate) fn malformed(image: impl Into<String>, what: &'static str, detail: String) -> Self {
        Self::invalid(image, InvalidReason::Malformed { what, detail })
    }

    /// A closure that wraps an I/O error as [`ImageError::StorageFailed`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::StorageFailed {
            action,
            path,
            source,
        }
    }
}

/// Why an image was refused. Digest and size failures, unsupported formats
/// and unsafe layers all land here, so every refusal has one wire name
/// (`InvalidImage`) and a reason a program can match on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InvalidReason {
    /// Not a valid image reference or digest.
    #[error("bad reference {0:?}")]
    BadReference(String),
    /// A blob's content does not hash to its digest.
    #[error("blob {expected} has digest {actual}")]
    DigestMismatch {
        /// The digest the manifest (or index) promised.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A blob is not the size its descriptor says.
    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Size that arrived (or at least that much, when cut off early).
        actual: u64,
    },
    /// An uncompressed layer does not match the config's `rootfs.diff_ids`.
    #[error("layer {layer} unpacks to {actual}, the config says {expected}")]
    DiffIdMismatch {
        /// The layer's (compressed) digest.
        layer: String,
        /// The config's diff id.
        expected: String,
        /// The digest of the uncompressed tar.
        actual: String,
    },
    /// A manifest, index, config or archive that cannot be parsed or is
    /// inconsistent.
    #[error("bad {what}: {detail}")]
    Malformed {
        /// Which document ("manifest", "config", "index.json", ...).
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A media type the store does not handle.
    #[error("unsupported media type {0}")]
    UnsupportedMediaType(String),
    /// No manifest for this host's platform.
    #[error("no manifest for {wanted} (the image has: {})", available.join(", "))]
    Platform {
        /// The host's platform (`linux/amd64`).
        wanted: String,
        /// What the image offers.
        available: Vec<String>,
    },
    /// A layer tar that would write outside its root.
    #[error("layer {layer}: {path:?} {why}")]
    UnsafeLayer {
        /// The layer's digest.
        layer: String,
        /// The offending entry.
        path: String,
        /// What it does ("escapes the root with ..", ...).
        why: &'static str,
    },
    /// The image is larger than the store's configured limit.
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit (`StoreConfig::max_image_bytes`).
        limit: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_wire_names() {
        let io = || std::io::Error::other("x");
        let cases = [
            (
                ImageError::ImageNotFound { what: "a".into() },
                "ImageNotFound",
            ),
            (
                ImageError::ImagePullFailed {
                    reference: "a".into(),
                    reason: "b".into(),
                },
                "ImagePullFailed",
            ),
            (
                ImageError::invalid("a", InvalidReason::TooLarge { limit: 1 }),
                "InvalidImage",
            ),
            (
                ImageError::ImageInUse {
                    digest: "d".into(),
                    users: vec!["vm:1".into()],
                },
                "ImageInUse",
            ),
            (ImageError::io("write", "/x")(io()), "StorageFailed"),
        ];
        for (error, name) in cases {
            assert_eq!(error.name(), name, "{error}");
        }
    }

    #[test]
    fn messages_do_not_repeat_their_source() {
        let e = ImageError::invalid("r", InvalidReason::TooLarge { limit: 5 });
        assert_eq!(e.to_string(), "invalid image r");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("larger than the limit of 5 bytes"));
    }
}
