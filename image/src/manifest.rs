//! Reading the image documents: indexes (manifest lists), manifests and
//! configs, OCI and Docker v2 schema 2 alike, parsed with `oci-spec` and
//! reduced to what the store needs; media types it accepts; picking the
//! host's manifest from an index.

use std::collections::HashMap;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::InvalidReason;
use crate::record::{Platform, ProcessConfig};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker v2 schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What the store asks a registry for, in order of preference.
pub const ACCEPTED: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// An uncompressed OCI layer (what the docker-archive source declares).
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Manifests, indexes and configs are small JSON documents; anything larger
/// is refused before it is parsed (a registry is untrusted).
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`tar+gzip`, Docker's `rootfs.diff.tar.gzip`).
    Gzip,
    /// zstd (`tar+zstd`).
    Zstd,
}

impl Compression {
    /// The compression of a layer media type; non-distributable ("foreign")
    /// layers and anything else are refused.
    pub fn of_layer(media_type: &str) -> Result<Self, InvalidReason> {
        match media_type {
            OCI_LAYER_TAR => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Self::Zstd),
            other => Err(InvalidReason::UnsupportedMediaType(other.to_owned())),
        }
    }
}

/// A content descriptor, validated (sha256 digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// Digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries).
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` in layouts).
    pub annotations: HashMap<String, String>,
}

impl Descriptor {
    fn from_spec(d: &oci_spec::image::Descriptor) -> Result<Self, InvalidReason> {
        Ok(Self {
            media_type: d.media_type().to_string(),
            digest: Digest::parse(d.digest().as_ref())?,
            size: d.size(),
            platform: d.platform().as_ref().map(|p| Platform {
                os: p.os().to_string(),
                architecture: p.architecture().to_string(),
                variant: p.variant().clone(),
            }),
            annotations: d.annotations().clone().unwrap_or_default(),
        })
    }
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Its media type (OCI or Docker).
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// Layers, lowest first.
    pub layers: Vec<Descriptor>,
}

/// A top-level document: an index to pick from, or a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// An OCI index or Docker manifest list.
    Index(Vec<Descriptor>),
    /// An image manifest.
    Manifest(Manifest),
}

/// Just enough of any document to tell what it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

fn malformed(what: &'static str) -> impl FnOnce(serde_json::Error) -> InvalidReason {
    move |e| InvalidReason::Malformed {
        what,
        detail: e.to_string(),
    }
}

/// Parse a manifest or an index. `declared` is the media type it was
/// served or described with; the document's own `mediaType` field wins
/// when present, and without either the shape decides (OCI allows both
/// fields to be absent).
pub fn parse_document(bytes: &[u8], declared: Option<&str>) -> Result<Document, InvalidReason> {
    let probe: Probe = serde_json::from_slice(bytes).map_err(malformed("manifest"))?;
    if probe.schema_version != Some(2) {
        // Schema 1 manifests are signed JSON with another layout; registries
        // have converted them for years.
        return Err(InvalidReason::UnsupportedMediaType(format!(
            "manifest schema version {}",
            probe.schema_version.unwrap_or(0)
        )));
    }
    let media_type = probe.media_type.as_deref().or(declared);
    let is_index = match media_type {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => return Err(InvalidReason::UnsupportedMediaType(other.to_owned())),
        None => probe.manifests.is_some() && probe.config.is_none(),
    };
    if is_index {
        let index: ImageIndex = serde_json::from_slice(bytes).map_err(malformed("index"))?;
        let entries = index
            .manifests()
            .iter()
            .map(Descriptor::from_spec)
            .collect::<Result<_, _>>()?;
        return Ok(Document::Index(entries));
    }
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(malformed("manifest"))?;
    let config = Descriptor::from_spec(manifest.config())?;
    if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
        // An artifact (a Helm chart, a signature, a WASM module): not an
        // image a VM can run.
        return Err(InvalidReason::UnsupportedMediaType(config.media_type));
    }
    let layers: Vec<Descriptor> = manifest
        .layers()
        .iter()
        .map(Descriptor::from_spec)
        .collect::<Result<_, _>>()?;
    for layer in &layers {
        Compression::of_layer(&layer.media_type)?;
    }
    Ok(Document::Manifest(Manifest {
        media_type: media_type.unwrap_or(OCI_MANIFEST).to_owned(),
        config,
        layers,
    }))
}

/// The index entry for `want`: the first image manifest whose platform
/// runs here. Entries without a platform (attestations, or a one-entry
/// layout index) are taken only when nothing else is there; the config's
/// platform is checked later anyway.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    want: &Platform,
) -> Result<&'a Descriptor, InvalidReason> {
    let manifests = || {
        entries
            .iter()
            .filter(|d| d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST)
    };
    if let Some(found) = manifests().find(|d| d.platform.as_ref().is_some_and(|p| want.runs(p))) {
        return Ok(found);
    }
    if entries.len() == 1 && entries[0].platform.is_none() {
        return Ok(&entries[0]);
    }
    Err(InvalidReason::Platform {
        wanted: want.to_string(),
        available: entries
            .iter()
            .map(|d| match &d.platform {
                Some(p) => p.to_string(),
                None => "unknown".to_owned(),
            })
            .collect(),
    })
}

/// What the store keeps from an image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `os`/`architecture`/`variant`.
    pub platform: Platform,
    /// The process fields.
    pub process: ProcessConfig,
    /// `rootfs.diff_ids`, one per layer.
    pub diff_ids: Vec<Digest>,
    /// `created`.
    pub created: Option<String>,
}

/// Parse an image config (OCI and Docker use the same fields).
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, InvalidReason> {
    let config: ImageConfiguration = serde_json::from_slice(bytes).map_err(malformed("config"))?;
    let process = config
        .config()
        .as_ref()
        .map(|c| ProcessConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
        })
        .unwrap_or_default();
    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d))
        .collect::<Result<_, _>>()?;
    Ok(ImageConfig {
        platform: Platform {
            os: config.os().to_string(),
            architecture: config.architecture().to_string(),
            variant: config.variant().clone(),
        },
        process,
        diff_ids,
        created: config.created().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index(entries: &[(&str, &str)]) -> Vec<u8> {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(digest, arch)| {
                serde_json::json!({
                    "mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
                    "platform": {"os": "linux", "architecture": arch}
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests
        }))
        .unwrap()
    }

    fn amd64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    #[test]
    fn index_picks_the_host_platform() {
        let doc = parse_document(&index(&[(D1, "arm64"), (D2, "amd64")]), None).unwrap();
        let Document::Index(entries) = doc else {
            panic!("not an index")
        };
        assert_eq!(
            select_platform(&entries, &amd64()).unwrap().digest.as_str(),
            D2
        );
    }

    #[test]
    fn index_without_the_host_platform_is_refused() {
        let Document::Index(entries) = parse_document(&index(&[(D1, "arm64")]), None).unwrap()
        else {
            panic!("not an index")
        };
        let err = select_platform(&entries, &amd64()).unwrap_err();
        assert_eq!(
            err,
            InvalidReason::Platform {
                wanted: "linux/amd64".into(),
                available: vec!["linux/arm64".into()]
            }
        );
    }

    #[test]
    fn docker_manifest_with_gzip_layers_parses() {
        let doc = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": D1, "size": 5},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": D2, "size": 7}]
        });
        let Document::Manifest(m) =
            parse_document(&serde_json::to_vec(&doc).unwrap(), None).unwrap()
        else {
            panic!("not a manifest")
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(
            Compression::of_layer(&m.layers[0].media_type).unwrap(),
            Compression::Gzip
        );
    }

    #[test]
    fn artifacts_schema1_and_foreign_layers_are_unsupported() {
        let artifact = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": D1, "size": 5},
            "layers": []
        });
        let foreign = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": D1, "size": 5},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                        "digest": D2, "size": 7}]
        });
        let schema1 = serde_json::json!({"schemaVersion": 1, "name": "x"});
        for doc in [artifact, foreign, schema1] {
            let err = parse_document(&serde_json::to_vec(&doc).unwrap(), None).unwrap_err();
            assert!(
                matches!(err, InvalidReason::UnsupportedMediaType(_)),
                "{doc}: {err}"
            );
        }
    }

    #[test]
    fn config_process_fields() {
        let cfg = serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"],
                       "Env": ["A=1"], "WorkingDir": "/srv", "User": "1000:1000"},
            "rootfs": {"type": "layers", "diff_ids": [D1]}
        });
        let c = parse_config(&serde_json::to_vec(&cfg).unwrap()).unwrap();
        assert_eq!(c.platform, amd64());
        assert_eq!(c.process.entrypoint, ["/bin/sh"]);
        assert_eq!(c.process.cmd, ["-c", "echo hi"]);
        assert_eq!(c.process.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.process.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.diff_ids[0].as_str(), D1);
    }
}
