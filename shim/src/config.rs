//! The shim's configuration: a TOML file named by the runtime's options in
//! containerd's config (`ConfigPath`, which CRI and `ctr run
//! --runtime-config-path` pass as `runtimeoptions.v1.Options`), every key
//! optional; kilnd's address also from `KILN_ADDRESS` in the environment
//! containerd gave the shim.

use std::path::{Path, PathBuf};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use serde::Deserialize;

/// The pool pods come from when neither the config nor the pod's
/// `io.kiln.pool` annotation names one: the pool every Kiln node ships
/// with (packaging/pools.d/default.toml).
pub const DEFAULT_POOL: &str = "default";

/// The pod annotation that picks a pool (containerd passes it on only when
/// the runtime's `pod_annotations` lists it, e.g. `["io.kiln.*"]`).
pub const POOL_ANNOTATION: &str = "io.kiln.pool";

/// `ttlSec` of the leases when the config names none.
const DEFAULT_LEASE_TTL_SEC: u64 = 60;

/// How long `Acquire` waits for a hot VM when the config names no time.
const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 60_000;

/// The type URL containerd gives the options of a runtime that is not runc.
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("runtime options are not a valid runtimeoptions.v1.Options message")]
    Options,
    #[error("cannot read the shim config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid shim config {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// The shim config file (docs/kubernetes.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// kilnd's varlink socket (`unix:PATH` or a path); wins over
    /// `KILN_ADDRESS`.
    pub address: Option<String>,
    /// The pool pods are acquired from unless their annotation says.
    pub pool: String,
    /// `Acquire`'s wait for a hot VM (0: fail at once when none is hot).
    pub acquire_timeout_ms: u64,
    /// The lease's lifetime, renewed every third of it while the pod
    /// lives: the backstop when the shim and containerd are both gone.
    /// 0: no lifetime (only `Release` ends the lease).
    pub lease_ttl_sec: u64,
    /// Put a pod's VM back in its pool (reset from the template) instead
    /// of destroying it.
    pub recycle: bool,
    /// MiB of each container's writable layer (default: kilnd's).
    pub storage_mib: Option<u64>,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            address: None,
            pool: DEFAULT_POOL.to_owned(),
            acquire_timeout_ms: DEFAULT_ACQUIRE_TIMEOUT_MS,
            lease_ttl_sec: DEFAULT_LEASE_TTL_SEC,
            recycle: false,
            storage_mib: None,
        }
    }
}

impl ShimConfig {
    /// The config the runtime options point to; the defaults without
    /// options or a `ConfigPath`.
    pub fn from_options(options: Option<&Any>) -> Result<Self, ConfigError> {
        let path = match options {
            Some(any) if any.type_url.ends_with(RUNTIME_OPTIONS_TYPE) => {
                config_path(&any.value).ok_or(ConfigError::Options)?
            }
            // Other options (runc's, say) are not ours to read.
            _ => None,
        };
        match path {
            Some(path) => Self::load(Path::new(&path)),
            None => Ok(Self::default()),
        }
    }

    /// Read the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// kilnd's address: the config's, else `KILN_ADDRESS`, else the
    /// default socket.
    pub fn address(&self) -> String {
        self.address
            .clone()
            .or_else(|| std::env::var("KILN_ADDRESS").ok().filter(|a| !a.is_empty()))
            .unwrap_or_else(|| kiln_client::client::DEFAULT_ADDRESS.to_owned())
    }
}

/// `config_path` (field 2, a string) of an encoded
/// `runtimeoptions.v1.Options { string type_url = 1; string config_path = 2; }`;
/// `Some(None)` when it is empty or absent, `None` when the bytes do not
/// parse. Decoded by hand: containerd-shim-protos does not carry this type.
fn config_path(mut bytes: &[u8]) -> Option<Option<String>> {
    let mut path = None;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
            }
            1 => bytes = bytes.get(8..)?,
            5 => bytes = bytes.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                let value = bytes.get(..len)?;
                bytes = bytes.get(len..)?;
                if key >> 3 == 2 {
                    path = Some(String::from_utf8(value.to_vec()).ok()?);
                }
            }
            _ => return None,
        }
    }
    Some(path.filter(|p| !p.is_empty()))
}

/// A protobuf varint from the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn options(type_url: &str, path: &str) -> Any {
        let mut value = vec![0x0a, type_url.len() as u8];
        value.extend_from_slice(type_url.as_bytes());
        value.extend([0x12, path.len() as u8]);
        value.extend_from_slice(path.as_bytes());
        Any {
            type_url: RUNTIME_OPTIONS_TYPE.to_owned(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn options_name_the_config_file() {
        let any = options("x", "/etc/kiln/shim.toml");
        assert_eq!(
            config_path(&any.value),
            Some(Some("/etc/kiln/shim.toml".into()))
        );
        assert_eq!(config_path(&[]), Some(None));
        assert_eq!(config_path(&[0x12, 5, b'a']), None, "truncated");
        // Unknown varint fields are skipped.
        assert_eq!(
            config_path(&[0x18, 0x96, 0x01, 0x12, 1, b'p']),
            Some(Some("p".into()))
        );
    }

    #[test]
    fn config_files_are_strict_and_default_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(&path, "pool = \"containerd\"\nlease_ttl_sec = 10\n").unwrap();
        let any = options("", path.to_str().unwrap());
        let config = ShimConfig::from_options(Some(&any)).unwrap();
        assert_eq!(config.pool, "containerd");
        assert_eq!(config.lease_ttl_sec, 10);
        assert_eq!(config.acquire_timeout_ms, DEFAULT_ACQUIRE_TIMEOUT_MS);
        std::fs::write(&path, "pools = \"x\"\n").unwrap();
        assert!(matches!(
            ShimConfig::from_options(Some(&any)),
            Err(ConfigError::Parse { .. })
        ));
        assert_eq!(
            ShimConfig::from_options(None).unwrap(),
            ShimConfig::default()
        );
    }

    #[test]
    fn the_config_address_wins() {
        let config = ShimConfig {
            address: Some("unix:/x".into()),
            ..ShimConfig::default()
        };
        assert_eq!(config.address(), "unix:/x");
    }
}
