//! What the store keeps about an image (`images/sha256/<hex>.json`), what
//! callers get back, and the platform an image runs on.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Version of the on-disk record format; a record of another version is
/// not read (and GC keeps its files) rather than misread.
pub const RECORD_VERSION: u32 = 1;

/// One stored image: a manifest whose every layer is converted to erofs.
/// Written once, after all its files are in place, so a record on disk
/// means a complete image. Tags live apart (`refs.json`), users too
/// (`users/`), so this file never changes after it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The image manifest's digest: the image's identity.
    pub digest: Digest,
    /// The manifest's media type (OCI or Docker v2 schema 2).
    pub media_type: String,
    /// The index (manifest list) it was picked from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// The config blob's digest.
    pub config_digest: Digest,
    /// The platform from the image config.
    pub platform: Platform,
    /// Layers, lowest first.
    pub layers: Vec<LayerRecord>,
    /// The process fields of the image config.
    pub process: ProcessConfig,
    /// Bytes on disk: the erofs images of all layers.
    pub size: u64,
    /// The image's own `created` time (RFC 3339, from its config), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// When the store finished storing it, in seconds since the epoch.
    pub stored_at: u64,
    /// Where it came from (`registry host/repository`, an archive's path).
    pub source: String,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    /// The layer blob's digest (compressed, as in the manifest).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// The blob's size.
    pub size: u64,
    /// The digest of the uncompressed tar (the config's `rootfs.diff_ids`
    /// entry): the erofs image's key, shared by every image and every
    /// compression of the same layer.
    pub diff_id: Digest,
    /// The erofs image, relative to the store's root.
    pub erofs: String,
    /// Its size in bytes.
    pub erofs_size: u64,
}

/// The OCI config's process fields (`config.Entrypoint`, ...), what a VM
/// running the image starts unless the caller overrides them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What [`crate::ImageStore::describe`] and `list` return: the record plus
/// the tags that point at it and who uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// The stored record.
    #[serde(flatten)]
    pub record: ImageRecord,
    /// Normalised references (`registry/repository:tag`) pointing at it.
    pub references: Vec<String>,
    /// Its users (`vm:<id>`, `pool:<name>`, ...), sorted.
    pub users: Vec<String>,
}

/// An OCI platform: the `os`/`architecture`/`variant` triple of image
/// configs and index entries, in Go's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, `v7`, ... where the architecture has variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/<arch>` of the machine this runs on, in Go's architecture
    /// names (what registries use).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "arm" => "arm",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Whether an image for `other` runs here: same OS and architecture,
    /// and the same variant when both name one (an unset variant is the
    /// architecture's default).
    pub fn runs(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn host_is_linux_in_go_names() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_ne!(host.architecture, "x86_64");
    }

    #[test]
    fn runs_matches_os_arch_and_named_variants() {
        let arm = p("linux", "arm64", Some("v8"));
        assert!(arm.runs(&p("linux", "arm64", None)));
        assert!(arm.runs(&p("linux", "arm64", Some("v8"))));
        assert!(!arm.runs(&p("linux", "arm64", Some("v9"))));
        assert!(!arm.runs(&p("linux", "amd64", None)));
        assert!(!arm.runs(&p("windows", "arm64", None)));
        assert_eq!(arm.to_string(), "linux/arm64/v8");
    }
}
