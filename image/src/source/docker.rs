//! A docker archive (`docker save`, `skopeo copy docker-archive:`):
//! `manifest.json` lists each image's config file and its layer tars,
//! which are uncompressed, so each layer's digest is its config diff id.
//! The store synthesises the OCI manifest such an image would have (config
//! and layer descriptors by digest) and from there treats it like any
//! other: every member is verified against its digest as it is read.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;

use super::{Body, Resolved, Tree};
use crate::digest::Digest;
use crate::error::ImageError;
use crate::manifest::{
    parse_config, parse_document, Descriptor, Document, OCI_LAYER_TAR, OCI_MANIFEST,
};
use crate::reference::{parse_reference, tag_key};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A docker archive source.
#[derive(Debug)]
pub struct DockerArchive {
    tree: Tree,
    tag: Option<String>,
    /// Member name of each blob, filled by `resolve`.
    names: Mutex<HashMap<Digest, String>>,
}

impl DockerArchive {
    /// A docker archive; `tag` is a full reference to pick and record.
    pub fn new(tree: Tree, tag: Option<&str>) -> Result<Self, ImageError> {
        let tag = tag
            .map(|t| parse_reference(t).map(|r| tag_key(&r)))
            .transpose()?;
        Ok(Self {
            tree,
            tag,
            names: Mutex::new(HashMap::new()),
        })
    }

    /// For messages.
    pub fn name(&self) -> String {
        format!("docker-archive:{}", self.tree.path().display())
    }

    fn malformed(&self, detail: String) -> ImageError {
        ImageError::malformed(self.name(), "docker archive", detail)
    }

    /// Pick the image (the only one, or the one tagged as asked) and
    /// synthesise its manifest.
    pub async fn resolve(&self) -> Result<Resolved, ImageError> {
        let bytes = self
            .tree
            .read_small("manifest.json")
            .await?
            .ok_or_else(|| {
                self.malformed(
                    "neither an OCI layout nor a docker archive: no manifest.json".into(),
                )
            })?;
        let entries: Vec<Entry> = serde_json::from_slice(&bytes)
            .map_err(|e| self.malformed(format!("manifest.json: {e}")))?;
        let normalised = |e: &Entry| -> Vec<String> {
            e.repo_tags
                .iter()
                .flatten()
                .filter_map(|t| parse_reference(t).ok().map(|r| tag_key(&r)))
                .collect()
        };
        let entry = match (&self.tag, entries.as_slice()) {
            (_, [one]) => one,
            (Some(tag), several) => several
                .iter()
                .find(|e| normalised(e).contains(tag))
                .ok_or_else(|| ImageError::ImageNotFound {
                    what: format!("{tag} in {}", self.name()),
                })?,
            (None, several) => {
                return Err(ImageError::ImageNotFound {
                    what: format!(
                        "an image in {} ({} images; name one by its tag)",
                        self.name(),
                        several.len()
                    ),
                })
            }
        };
        let config = self
            .tree
            .read_small(&entry.config)
            .await?
            .ok_or_else(|| self.malformed(format!("{} is missing", entry.config)))?;
        let config_digest = Digest::of(&config);
        let parsed = parse_config(&config).map_err(|r| ImageError::invalid(self.name(), r))?;
        if parsed.diff_ids.len() != entry.layers.len() {
            return Err(self.malformed(format!(
                "{} layers but {} diff ids in the config",
                entry.layers.len(),
                parsed.diff_ids.len()
            )));
        }
        let mut names = HashMap::from([(config_digest.clone(), entry.config.clone())]);
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&parsed.diff_ids) {
            let size = self
                .tree
                .member_size(name)
                .ok_or_else(|| self.malformed(format!("layer {name} is missing")))?;
            names.insert(diff_id.clone(), name.clone());
            layers.push(serde_json::json!({
                "mediaType": OCI_LAYER_TAR, "digest": diff_id, "size": size
            }));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| self.malformed(e.to_string()))?;
        let Document::Manifest(manifest) =
            parse_document(&bytes, None).map_err(|r| ImageError::invalid(self.name(), r))?
        else {
            return Err(self.malformed("synthesised manifest is an index".into()));
        };
        if let Ok(mut map) = self.names.lock() {
            *map = names;
        }
        Ok(Resolved {
            manifest,
            digest: Digest::of(&bytes),
            bytes,
            index_digest: None,
            tags: match &self.tag {
                Some(t) => vec![t.clone()],
                None => normalised(entry),
            },
            origin: self.name(),
        })
    }

    /// The member that holds `desc`.
    pub async fn open(&self, desc: &Descriptor) -> Result<Body, ImageError> {
        let name = self
            .names
            .lock()
            .ok()
            .and_then(|m| m.get(&desc.digest).cloned())
            .ok_or_else(|| self.malformed(format!("no member for {}", desc.digest)))?;
        self.tree
            .open(&name, desc.size.saturating_add(1))
            .await?
            .ok_or_else(|| self.malformed(format!("{name} is missing")))
    }
}
