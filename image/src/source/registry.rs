//! A registry over the OCI distribution API, through `oci-client`: the
//! `WWW-Authenticate` challenge on `/v2/`, bearer tokens from the realm
//! (with the file's credentials when it has some), HTTP basic where the
//! registry asks for it, plain HTTP only for registries listed as insecure.
//! Platform resolution and every digest check are the store's own: the
//! client hands over raw manifests and blob streams.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{Body, Resolved};
use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};
use crate::manifest::{
    parse_document, select_platform, Descriptor, Document, ACCEPTED, MAX_DOCUMENT_BYTES,
};
use crate::record::Platform;
use crate::reference::{parse_reference, tags_of};
use crate::{auth, StoreConfig};

/// A registry source for one reference.
pub struct Registry {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
}

impl std::fmt::Debug for Registry {
    // No client internals (tokens) and no credentials in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reference", &self.reference.whole())
            .finish_non_exhaustive()
    }
}

/// The HTTP client of a store's pulls. Made once per store: making one
/// loads the system's CA bundle (four reads of ~7 ms here, most of what a
/// cache hit cost when every pull made its own). Bearer tokens it caches
/// live until they expire, as in docker's and containerd's clients;
/// credentials are still read from the auth file for each pull.
fn client(config: &StoreConfig) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
        connect_timeout: Some(Duration::from_secs(30)),
        // Per read, not per request: a slow but moving download goes on.
        read_timeout: Some(Duration::from_secs(60)),
        // The store picks the platform itself (with its own errors).
        platform_resolver: None,
        user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
}

/// A store's one registry client ([`client`]), made at its first pull.
#[derive(Default)]
pub struct SharedClient(std::sync::OnceLock<Client>);

impl std::fmt::Debug for SharedClient {
    // No client internals (tokens) in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClient")
    }
}

impl SharedClient {
    /// The client (a cheap clone sharing its connections and tokens).
    pub fn get(&self, config: &StoreConfig) -> Client {
        self.0.get_or_init(|| client(config)).clone()
    }
}

impl Registry {
    /// A pull of `reference` through `client`, with credentials from the
    /// configured auth file, read afresh.
    pub fn new(reference: &str, config: &StoreConfig, client: Client) -> Result<Self, ImageError> {
        let reference = parse_reference(reference)?;
        let auth = match &config.auth_file {
            Some(path) => auth::lookup(path, reference.registry(), reference.repository())
                .map_err(|reason| ImageError::ImagePullFailed {
                    reference: reference.whole(),
                    reason,
                })?
                .map(|c| RegistryAuth::Basic(c.username, c.password))
                .unwrap_or(RegistryAuth::Anonymous),
            None => RegistryAuth::Anonymous,
        };
        Ok(Self {
            client,
            reference,
            auth,
        })
    }

    /// The reference, normalised.
    pub fn name(&self) -> String {
        self.reference.whole()
    }

    fn failed(&self, e: OciDistributionError) -> ImageError {
        match e {
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => ImageError::invalid(
                self.name(),
                InvalidReason::DigestMismatch { expected, actual },
            ),
            other => ImageError::ImagePullFailed {
                reference: self.name(),
                reason: other.to_string(),
            },
        }
    }

    /// Fetch the manifest `reference` names, verified against `expected`
    /// (a digest from the reference or an index) or else hashed.
    async fn manifest(
        &self,
        reference: &Reference,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, Digest), ImageError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, &ACCEPTED)
            .await
            .map_err(|e| self.failed(e))?;
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(ImageError::malformed(
                self.name(),
                "manifest",
                format!("larger than {MAX_DOCUMENT_BYTES} bytes"),
            ));
        }
        let digest = Digest::of(&bytes);
        if let Some(expected) = expected {
            if &digest != expected {
                return Err(ImageError::invalid(
                    self.name(),
                    InvalidReason::DigestMismatch {
                        expected: expected.to_string(),
                        actual: digest.to_string(),
                    },
                ));
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// The manifest for `platform`, through the index if there is one.
    pub async fn resolve(&self, platform: &Platform) -> Result<Resolved, ImageError> {
        let invalid = |r| ImageError::invalid(self.name(), r);
        let pinned = self
            .reference
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(invalid)?;
        let (bytes, digest) = self.manifest(&self.reference, pinned.as_ref()).await?;
        let (manifest, bytes, digest, index_digest) = match parse_document(&bytes, None)
            .map_err(invalid)?
        {
            Document::Manifest(m) => (m, bytes, digest, None),
            Document::Index(entries) => {
                let pick: &Descriptor = select_platform(&entries, platform).map_err(invalid)?;
                let by_digest = self.reference.clone_with_digest(pick.digest.to_string());
                let (inner, inner_digest) = self.manifest(&by_digest, Some(&pick.digest)).await?;
                match parse_document(&inner, Some(&pick.media_type)).map_err(invalid)? {
                    Document::Manifest(m) => (m, inner, inner_digest, Some(digest)),
                    Document::Index(_) => {
                        return Err(invalid(InvalidReason::Malformed {
                            what: "index",
                            detail: format!("{} is a nested index", pick.digest),
                        }))
                    }
                }
            }
        };
        Ok(Resolved {
            manifest,
            bytes,
            digest,
            index_digest,
            tags: tags_of(&self.reference),
            origin: format!(
                "{}/{}",
                self.reference.registry(),
                self.reference.repository()
            ),
        })
    }

    /// Start downloading a blob. Never from a descriptor's foreign `urls`:
    /// only from the registry the credentials belong to.
    pub async fn open(&self, desc: &Descriptor) -> Result<Body, ImageError> {
        let d = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.to_string(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            // Never the descriptor's foreign URLs (see above).
            urls: None,
            ..Default::default()
        };
        let stream = self
            .client
            .pull_blob_stream(&self.reference, &d)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(Body::Stream(stream.stream))
    }

    /// A failed read of a blob's bytes: the client's own digest check
    /// (it verifies too) is the image's fault; the rest the registry's.
    pub fn read_error(&self, desc: &Descriptor, e: std::io::Error) -> ImageError {
        if let Some(DigestError::VerificationError { actual, .. }) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<DigestError>())
        {
            return ImageError::invalid(
                self.name(),
                InvalidReason::DigestMismatch {
                    expected: desc.digest.to_string(),
                    actual: actual.clone(),
                },
            );
        }
        ImageError::ImagePullFailed {
            reference: self.name(),
            reason: format!("reading {}: {e}", desc.digest),
        }
    }
}
