//! Where images come from: a registry over the OCI distribution API, an
//! OCI image layout (a directory or an archive of one), or a docker
//! archive. Each source resolves to one verified manifest for the host's
//! platform and hands out blob bodies; verifying what they contain is the
//! [`Verifier`]'s job, the same for every source.

mod docker;
mod layout;
mod registry;

pub use registry::SharedClient;
mod tree;

use std::path::Path;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use crate::digest::{Digest, Hasher};
use crate::error::{ImageError, InvalidReason};
use crate::manifest::{Descriptor, Manifest, MAX_DOCUMENT_BYTES};
use crate::record::Platform;
use crate::StoreConfig;

pub use docker::DockerArchive;
pub use layout::Layout;
pub use registry::Registry;
pub use tree::Tree;

/// A manifest picked for this host, verified against its digest.
#[derive(Debug)]
pub struct Resolved {
    /// The manifest.
    pub manifest: Manifest,
    /// Its bytes, as stored in `blobs/`.
    pub bytes: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
    /// The index it was picked from.
    pub index_digest: Option<Digest>,
    /// Tags to record.
    pub tags: Vec<String>,
    /// Where it came from, for the record.
    pub origin: String,
}

/// A blob's bytes as they arrive.
pub enum Body {
    /// From a registry.
    Stream(BoxStream<'static, std::io::Result<bytes::Bytes>>),
    /// From a file or an archive member.
    File(tokio::io::Take<tokio::fs::File>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Body::Stream(_) => "Body::Stream",
            Body::File(_) => "Body::File",
        })
    }
}

impl Body {
    async fn next(&mut self) -> Option<std::io::Result<bytes::Bytes>> {
        match self {
            Body::Stream(s) => s.next().await,
            Body::File(f) => {
                let mut buf = vec![0u8; 1 << 16];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some(Ok(buf.into()))
                    }
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }
}

/// A source of one image.
#[derive(Debug)]
pub enum Source {
    /// A registry.
    Registry(Registry),
    /// An OCI layout, as a directory or an archive.
    Layout(Layout),
    /// A docker archive.
    Docker(DockerArchive),
}

impl Source {
    /// A pull of `reference`.
    pub fn registry(
        reference: &str,
        config: &StoreConfig,
        client: oci_client::Client,
    ) -> Result<Self, ImageError> {
        Registry::new(reference, config, client).map(Source::Registry)
    }

    /// An import of `path`: a layout directory, or an archive (an OCI
    /// archive has `index.json`, a docker archive only `manifest.json`).
    /// `name` picks the image (a layout's `ref.name`, a docker `RepoTag`)
    /// and is recorded as its tag. Blocking (indexes the archive).
    pub fn local(path: &Path, name: Option<&str>) -> Result<Self, ImageError> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ImageError::ImageNotFound {
                what: path.display().to_string(),
            },
            _ => ImageError::io("read", path)(e),
        })?;
        let tree = if meta.is_dir() {
            Tree::Dir(path.to_owned())
        } else {
            Tree::index_tar(path)?
        };
        if Layout::is_layout(&tree) {
            Layout::new(tree, name).map(Source::Layout)
        } else {
            DockerArchive::new(tree, name).map(Source::Docker)
        }
    }

    /// The image's name in messages.
    pub fn name(&self) -> String {
        match self {
            Source::Registry(r) => r.name(),
            Source::Layout(l) => l.name(),
            Source::Docker(d) => d.name(),
        }
    }

    /// Find the manifest for `platform`.
    pub async fn resolve(&self, platform: &Platform) -> Result<Resolved, ImageError> {
        match self {
            Source::Registry(r) => r.resolve(platform).await,
            Source::Layout(l) => l.resolve(self, platform).await,
            Source::Docker(d) => d.resolve().await,
        }
    }

    /// Start reading a blob.
    async fn open(&self, desc: &Descriptor) -> Result<Body, ImageError> {
        match self {
            Source::Registry(r) => r.open(desc).await,
            Source::Layout(l) => l.open(desc).await,
            Source::Docker(d) => d.open(desc).await,
        }
    }

    /// An error reading a blob's bytes: a digest failure the registry
    /// client noticed first is the image's fault, anything else the
    /// source's.
    fn read_error(&self, desc: &Descriptor, e: std::io::Error) -> ImageError {
        match self {
            Source::Registry(r) => r.read_error(desc, e),
            Source::Layout(_) | Source::Docker(_) => {
                ImageError::io("read", Path::new(desc.digest.as_str()))(e)
            }
        }
    }

    /// Read a small blob (a manifest, an index, a config) whole, verified.
    pub async fn read_document(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        if desc.size > MAX_DOCUMENT_BYTES {
            return Err(ImageError::malformed(
                self.name(),
                "descriptor",
                format!("{} claims {} bytes", desc.digest, desc.size),
            ));
        }
        let mut v = Verifier::open(self, desc).await?;
        let mut out = Vec::with_capacity(usize::try_from(desc.size).unwrap_or(0));
        while let Some(chunk) = v.chunk().await? {
            out.extend_from_slice(&chunk);
        }
        v.finish()?;
        Ok(out)
    }
}

/// Reads a blob and checks it against its descriptor as it streams: more
/// bytes than the descriptor says stop the read at once, and the digest is
/// checked at the end, before anything is stored.
#[derive(Debug)]
pub struct Verifier<'a> {
    source: &'a Source,
    desc: &'a Descriptor,
    body: Body,
    hasher: Hasher,
}

impl<'a> Verifier<'a> {
    /// Start reading `desc` from `source`.
    pub async fn open(source: &'a Source, desc: &'a Descriptor) -> Result<Self, ImageError> {
        let body = source.open(desc).await?;
        Ok(Self {
            source,
            desc,
            body,
            hasher: Hasher::default(),
        })
    }

    /// The next piece, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, ImageError> {
        let Some(chunk) = self.body.next().await else {
            return Ok(None);
        };
        let chunk = chunk.map_err(|e| self.source.read_error(self.desc, e))?;
        self.hasher.update(&chunk);
        if self.hasher.seen() > self.desc.size {
            return Err(ImageError::invalid(
                self.source.name(),
                InvalidReason::SizeMismatch {
                    digest: self.desc.digest.to_string(),
                    expected: self.desc.size,
                    actual: self.hasher.seen(),
                },
            ));
        }
        Ok(Some(chunk))
    }

    /// Bytes read so far.
    pub fn done(&self) -> u64 {
        self.hasher.seen()
    }

    /// Check size and digest.
    pub fn finish(self) -> Result<(), ImageError> {
        let name = self.source.name();
        self.hasher
            .verify(&self.desc.digest, self.desc.size)
            .map_err(|reason| ImageError::invalid(name, reason))
    }
}
