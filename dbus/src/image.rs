//! Stored images on D-Bus: plain structs returned by the Manager's
//! `ListImages` and `DescribeImage`, not objects. An image is an immutable
//! record with no methods of its own (removal takes its name), no state to
//! follow with `PropertiesChanged`, and already has an identity (its
//! digest); objects would only add a mirror to keep in sync. Changes are
//! the Manager's `ImageAdded` and `ImageRemoved` signals.

use kiln_engine::ImageInfo;
use serde::Serialize;
use zbus::zvariant::Type;

/// One image in `ListImages`, and the first out arg of `DescribeImage`:
/// `(s digest, as references, s platform, t size, u layers, t stored_at,
/// as users)`. `size` is bytes on disk, `stored_at` µs since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Type)]
pub struct ImageSummary {
    digest: String,
    references: Vec<String>,
    platform: String,
    size: u64,
    layers: u32,
    stored_at: u64,
    users: Vec<String>,
}

impl From<&ImageInfo> for ImageSummary {
    fn from(image: &ImageInfo) -> Self {
        Self {
            digest: image.digest.clone(),
            references: image.references.clone(),
            platform: image.platform.clone(),
            size: image.size,
            layers: u32::try_from(image.layers.len()).unwrap_or(u32::MAX),
            stored_at: image.stored_at,
            users: image.users.clone(),
        }
    }
}

/// A layer in `DescribeImage`: `(s digest, s media_type, s diff_id,
/// t size, t erofs_size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Type)]
pub struct LayerSummary {
    digest: String,
    media_type: String,
    diff_id: String,
    size: u64,
    erofs_size: u64,
}

/// The image config's process fields in `DescribeImage`: `(as entrypoint,
/// as cmd, as env, s working_dir, s user)`, `""` where the config sets
/// none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Type)]
pub struct ProcessSummary {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    user: String,
}

/// `DescribeImage`'s out args: the summary, the layers, the process, where
/// it came from, and its own creation time (`""` when its config has none).
pub type ImageDetails = (
    ImageSummary,
    Vec<LayerSummary>,
    ProcessSummary,
    String,
    String,
);

/// Everything `DescribeImage` says of `image`.
pub fn details(image: &ImageInfo) -> ImageDetails {
    let layers = image
        .layers
        .iter()
        .map(|l| LayerSummary {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            diff_id: l.diff_id.clone(),
            size: l.size,
            erofs_size: l.erofs_size,
        })
        .collect();
    let p = &image.process;
    let process = ProcessSummary {
        entrypoint: p.entrypoint.clone(),
        cmd: p.cmd.clone(),
        env: p.env.clone(),
        working_dir: p.working_dir.clone().unwrap_or_default(),
        user: p.user.clone().unwrap_or_default(),
    };
    (
        ImageSummary::from(image),
        layers,
        process,
        image.source.clone(),
        image.created.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shapes_have_the_documented_signatures() {
        assert_eq!(ImageSummary::SIGNATURE.to_string(), "(sasstutas)");
        assert_eq!(LayerSummary::SIGNATURE.to_string(), "(ssstt)");
        assert_eq!(ProcessSummary::SIGNATURE.to_string(), "(asasasss)");
    }
}
