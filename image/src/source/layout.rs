//! An OCI image layout (`oci-layout`, `index.json`, `blobs/`), as a
//! directory or as a tar of one (an OCI archive, what `skopeo copy
//! oci-archive:` and `docker save` since Docker 25 write).

use super::{Body, Resolved, Source, Tree};
use crate::digest::Digest;
use crate::error::ImageError;
use crate::manifest::{parse_document, select_platform, Descriptor, Document, OCI_INDEX};
use crate::record::Platform;
use crate::reference::{parse_reference, tag_key};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI layout source.
#[derive(Debug)]
pub struct Layout {
    tree: Tree,
    /// The tag to record, also used to pick among several images.
    tag: Option<String>,
    /// The bare tag (`v1` of `host/app:v1`), matched against `ref.name`.
    short: Option<String>,
}

impl Layout {
    /// Whether `tree` is an OCI layout.
    pub fn is_layout(tree: &Tree) -> bool {
        match tree {
            Tree::Dir(d) => d.join("oci-layout").is_file(),
            Tree::Tar { members, .. } => members.contains_key("oci-layout"),
        }
    }

    /// A layout source; `tag` is a full reference to record.
    pub fn new(tree: Tree, tag: Option<&str>) -> Result<Self, ImageError> {
        let (tag, short) = match tag {
            Some(t) => {
                let r = parse_reference(t)?;
                (Some(tag_key(&r)), r.tag().map(str::to_owned))
            }
            None => (None, None),
        };
        Ok(Self { tree, tag, short })
    }

    /// For messages.
    pub fn name(&self) -> String {
        let kind = match self.tree {
            Tree::Dir(_) => "oci",
            Tree::Tar { .. } => "oci-archive",
        };
        format!("{kind}:{}", self.tree.path().display())
    }

    fn malformed(&self, detail: String) -> ImageError {
        ImageError::malformed(self.name(), "layout", detail)
    }

    /// Pick the manifest: the one image in `index.json`, or the one whose
    /// `ref.name` is the tag asked for, then the host's platform if that is
    /// an index.
    pub async fn resolve(
        &self,
        source: &Source,
        platform: &Platform,
    ) -> Result<Resolved, ImageError> {
        let index = self
            .tree
            .read_small("index.json")
            .await?
            .ok_or_else(|| self.malformed("no index.json".into()))?;
        let Document::Index(entries) = parse_document(&index, Some(OCI_INDEX))
            .map_err(|r| ImageError::invalid(self.name(), r))?
        else {
            return Err(self.malformed("index.json is not an index".into()));
        };
        let named: Vec<Descriptor> = entries
            .iter()
            .filter(|d| {
                let name = d.annotations.get(REF_NAME);
                name.is_some() && (name == self.short.as_ref() || name == self.tag.as_ref())
            })
            .cloned()
            .collect();
        let candidates = if named.is_empty() { entries } else { named };
        let chosen = match candidates.as_slice() {
            [] => return Err(self.malformed("index.json lists no image".into())),
            [one] => one.clone(),
            // One image for several platforms listed flat in index.json.
            several if distinct_platforms(several) => select_platform(several, platform)
                .map_err(|r| ImageError::invalid(self.name(), r))?
                .clone(),
            several => {
                return Err(ImageError::ImageNotFound {
                    what: format!(
                        "{} in {} ({} images; name one by its tag)",
                        self.tag.as_deref().unwrap_or("(no tag given)"),
                        self.name(),
                        several.len()
                    ),
                })
            }
        };
        let (manifest_desc, index_digest) = self.through_index(source, chosen, platform).await?;
        let bytes = source.read_document(&manifest_desc).await?;
        let manifest = match parse_document(&bytes, Some(&manifest_desc.media_type))
            .map_err(|r| ImageError::invalid(self.name(), r))?
        {
            Document::Manifest(m) => m,
            Document::Index(_) => return Err(self.malformed("nested index".into())),
        };
        Ok(Resolved {
            manifest,
            bytes,
            digest: manifest_desc.digest,
            index_digest,
            tags: self.tag.iter().cloned().collect(),
            origin: self.name(),
        })
    }

    /// If `chosen` is an index, the host's manifest in it.
    async fn through_index(
        &self,
        source: &Source,
        chosen: Descriptor,
        platform: &Platform,
    ) -> Result<(Descriptor, Option<Digest>), ImageError> {
        let bytes = match chosen.media_type.as_str() {
            crate::manifest::OCI_INDEX | crate::manifest::DOCKER_LIST => {
                source.read_document(&chosen).await?
            }
            _ => return Ok((chosen, None)),
        };
        match parse_document(&bytes, Some(&chosen.media_type))
            .map_err(|r| ImageError::invalid(self.name(), r))?
        {
            Document::Index(entries) => {
                let pick = select_platform(&entries, platform)
                    .map_err(|r| ImageError::invalid(self.name(), r))?;
                Ok((pick.clone(), Some(chosen.digest)))
            }
            Document::Manifest(_) => Err(self.malformed(format!(
                "{} is described as an index but is a manifest",
                chosen.digest
            ))),
        }
    }

    /// `blobs/sha256/<hex>`.
    pub async fn open(&self, desc: &Descriptor) -> Result<Body, ImageError> {
        let name = format!("blobs/sha256/{}", desc.digest.hex());
        self.tree
            .open(&name, desc.size.saturating_add(1))
            .await?
            .ok_or_else(|| self.malformed(format!("blob {} is missing", desc.digest)))
    }
}

/// Whether every entry names a platform and no two the same one.
fn distinct_platforms(entries: &[Descriptor]) -> bool {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .all(|d| d.platform.as_ref().is_some_and(|p| seen.insert(p.clone())))
}
