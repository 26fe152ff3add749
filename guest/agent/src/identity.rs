//! `io.kiln.Agent.SetIdentity`: give a (cloned) guest its own hostname,
//! machine id and RNG state.

use std::fs::{self, File, OpenOptions};
use std::io;

use kiln_agent_proto::SetIdentityRequest;

use crate::params::InvalidParameter;
use crate::{log, sys};

/// Largest entropy seed accepted, in bytes.
pub const MAX_ENTROPY_BYTES: usize = 4096;
const MACHINE_ID_PATH: &str = "/etc/machine-id";
const HOSTNAME_PATH: &str = "/etc/hostname";

/// A validated `SetIdentity` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    hostname: Option<String>,
    machine_id: Option<String>,
    entropy: Option<Vec<u8>>,
}

/// Why applying an identity failed (`io.kiln.Agent.IdentityFailed`).
#[derive(Debug)]
pub struct IdentityFailed(pub String);

impl Identity {
    /// Checks every field before anything is changed, so an invalid request
    /// has no effect.
    pub fn new(req: SetIdentityRequest) -> Result<Self, InvalidParameter> {
        if let Some(name) = &req.hostname {
            if !valid_hostname(name) {
                return Err(InvalidParameter::new("hostname"));
            }
        }
        if let Some(id) = &req.machine_id {
            if !valid_machine_id(id) {
                return Err(InvalidParameter::new("machineId"));
            }
        }
        let entropy = match &req.entropy_hex {
            None => None,
            Some(hex) => match decode_hex(hex) {
                Some(bytes) if !bytes.is_empty() && bytes.len() <= MAX_ENTROPY_BYTES => Some(bytes),
                _ => return Err(InvalidParameter::new("entropyHex")),
            },
        };
        Ok(Self {
            hostname: req.hostname,
            machine_id: req.machine_id,
            entropy,
        })
    }

    /// Applies what the kernel holds — entropy first (it matters most
    /// for clones), then the hostname — and returns the files still to
    /// write. The agent writes them after the reply, once it has nothing
    /// else to answer or before any call that could read them
    /// (`Agent::catch_up`).
    ///
    /// `random` is `/dev/random` opened for writing, if the agent has it
    /// open already ([`open_random`]).
    pub fn apply(&self, random: Option<&File>) -> Result<IdentityFiles, IdentityFailed> {
        if let Some(seed) = &self.entropy {
            add_entropy(seed, random).map_err(|e| IdentityFailed(format!("entropy: {e}")))?;
        }
        if let Some(name) = &self.hostname {
            sys::sethostname(name).map_err(|e| IdentityFailed(format!("sethostname: {e}")))?;
        }
        Ok(IdentityFiles {
            hostname: self.hostname.clone(),
            machine_id: self.machine_id.clone(),
        })
    }
}

/// `/etc/hostname` and `/etc/machine-id` of an applied identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    hostname: Option<String>,
    machine_id: Option<String>,
}

impl IdentityFiles {
    /// Writes the files. Failures are logged, not returned: the reply has
    /// gone, and the kernel's hostname and RNG, which are what count, are
    /// already set.
    pub fn write(&self) {
        let files = [
            (HOSTNAME_PATH, &self.hostname),
            (MACHINE_ID_PATH, &self.machine_id),
        ];
        for (path, value) in files {
            if let Some(value) = value {
                if let Err(e) = fs::write(path, format!("{value}\n")) {
                    log::error!("SetIdentity: {path}: {e}");
                }
            }
        }
    }
}

/// 1–64 characters of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// 32 lowercase hex digits, not all zero (systemd's rule).
fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0')
}

/// Decodes hex (either case); `None` if malformed.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(*pair.first()?)? << 4 | digit(*pair.get(1)?)?))
        .collect()
}

/// `struct rand_pool_info { int entropy_count; int buf_size; u8 buf[]; }`
/// crediting 8 bits per byte.
fn rand_pool_info(seed: &[u8]) -> Option<Vec<u8>> {
    let size = i32::try_from(seed.len()).ok()?;
    let bits = size.checked_mul(8)?;
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(seed);
    Some(info)
}

/// `/dev/random` for writing. The agent opens it when it starts, so a
/// clone's agent (its template's, restored) has it open: the open was part
/// of the guest code a fresh clone's `SetIdentity` ran afresh under TCG.
pub fn open_random() -> io::Result<File> {
    OpenOptions::new().write(true).open("/dev/random")
}

/// Mixes `seed` into the input pool, credited, then forces a CRNG reseed so
/// the very next `/dev/urandom` bytes depend on it.
fn add_entropy(seed: &[u8], random: Option<&File>) -> io::Result<()> {
    let info = rand_pool_info(seed)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seed too large"))?;
    let opened;
    let random = match random {
        Some(file) => file,
        None => {
            opened = open_random()?;
            &opened
        }
    };
    sys::ioctl_ptr(random, sys::RNDADDENTROPY, info.as_ptr())
        .map_err(|e| io::Error::new(e.kind(), format!("RNDADDENTROPY: {e}")))?;
    sys::ioctl_ptr(random, sys::RNDRESEEDCRNG, std::ptr::null())
        .map_err(|e| io::Error::new(e.kind(), format!("RNDRESEEDCRNG: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        hostname: Option<&str>,
        machine_id: Option<&str>,
        entropy: Option<&str>,
    ) -> SetIdentityRequest {
        SetIdentityRequest {
            hostname: hostname.map(str::to_owned),
            machine_id: machine_id.map(str::to_owned),
            entropy_hex: entropy.map(str::to_owned),
        }
    }

    fn culprit(r: SetIdentityRequest) -> Option<String> {
        Identity::new(r).err().map(|e| e.0)
    }

    #[test]
    fn empty_request_is_valid() {
        assert!(Identity::new(SetIdentityRequest::default()).is_ok());
    }

    #[test]
    fn validates_hostname() {
        assert_eq!(culprit(req(Some("vm-1.pool"), None, None)), None);
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert_eq!(
                culprit(req(Some(bad), None, None)),
                Some("hostname".into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn validates_machine_id() {
        assert_eq!(
            culprit(req(None, Some("0123456789abcdef0123456789abcdef"), None)),
            None
        );
        for bad in [
            "0123456789ABCDEF0123456789ABCDEF",
            "0123",
            &"0".repeat(32),
            &"g".repeat(32),
        ] {
            assert_eq!(
                culprit(req(None, Some(bad), None)),
                Some("machineId".into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn validates_entropy() {
        assert_eq!(culprit(req(None, None, Some("00ffAb"))), None);
        let too_long = "00".repeat(MAX_ENTROPY_BYTES + 1);
        for bad in ["", "0", "zz", too_long.as_str()] {
            assert_eq!(
                culprit(req(None, None, Some(bad))),
                Some("entropyHex".into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn decodes_hex() {
        assert_eq!(decode_hex("00ffAb10"), Some(vec![0x00, 0xff, 0xab, 0x10]));
        assert_eq!(decode_hex("+1"), None);
        assert_eq!(decode_hex("é0"), None);
    }

    #[test]
    fn builds_rand_pool_info() {
        let info = rand_pool_info(&[1, 2, 3]).expect("fits");
        assert_eq!(info.get(..4), Some(&24i32.to_ne_bytes()[..]));
        assert_eq!(info.get(4..8), Some(&3i32.to_ne_bytes()[..]));
        assert_eq!(info.get(8..), Some(&[1u8, 2, 3][..]));
    }
}
