//! Content digests: parsing `sha256:<hex>` strings from untrusted documents
//! into a type whose hex part is safe to use as a file name, and hashing
//! while bytes stream past.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::InvalidReason;

/// A `sha256:<64 lowercase hex>` digest. Only sha256: it is what every
/// registry and tool writes, and one algorithm keeps the store's paths
/// (`blobs/sha256/<hex>`) fixed. Parsing checks the hex, so `hex()` never
/// holds a `/` or `..` and can name a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    const PREFIX: &'static str = "sha256:";

    /// Parse and validate a digest string.
    pub fn parse(s: &str) -> Result<Self, InvalidReason> {
        let hex = s.strip_prefix(Self::PREFIX).ok_or_else(|| bad(s))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad(s));
        }
        Ok(Self(s.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Hasher::default();
        h.update(bytes);
        h.finish().0
    }

    /// The hex part, safe as a file name.
    pub fn hex(&self) -> &str {
        &self.0[Self::PREFIX.len()..]
    }

    /// The whole `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn bad(s: &str) -> InvalidReason {
    InvalidReason::Malformed {
        what: "digest",
        detail: format!("{s:?} is not sha256:<64 hex digits>"),
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidReason;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// sha256 and a byte count over data seen in pieces.
#[derive(Debug, Default, Clone)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    /// Account for the next piece.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.len
    }

    /// The digest and length of everything seen.
    pub fn finish(self) -> (Digest, u64) {
        let hex = format!("{:x}", self.sha.finalize());
        (Digest(format!("{}{hex}", Digest::PREFIX)), self.len)
    }

    /// Check the finished digest and length against a descriptor's.
    pub fn verify(self, expected: &Digest, size: u64) -> Result<(), InvalidReason> {
        let (actual, len) = self.finish();
        if len != size {
            return Err(InvalidReason::SizeMismatch {
                digest: expected.to_string(),
                expected: size,
                actual: len,
            });
        }
        if &actual != expected {
            return Err(InvalidReason::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }
}

/// A reader that hashes what passes through it (the scan's uncompressed
/// stream, checked against the config's diff id).
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R> HashingReader<R> {
    /// Hash everything read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::default(),
        }
    }

    /// Bytes read so far.
    pub fn seen(&self) -> u64 {
        self.hasher.seen()
    }

    /// The hasher, once reading is done.
    pub fn into_hasher(self) -> Hasher {
        self.hasher
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_nothing() {
        assert_eq!(Digest::of(b"").as_str(), EMPTY);
        assert_eq!(Digest::of(b"").hex(), &EMPTY[7..]);
    }

    #[test]
    fn parse_refuses_what_could_name_another_file() {
        assert!(Digest::parse(EMPTY).is_ok());
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:e3b0",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verify_names_size_before_digest() {
        let mut h = Hasher::default();
        h.update(b"abc");
        let expected = Digest::of(b"abc");
        assert!(h.clone().verify(&expected, 3).is_ok());
        assert!(matches!(
            h.clone().verify(&expected, 4),
            Err(InvalidReason::SizeMismatch { actual: 3, .. })
        ));
        assert!(matches!(
            h.verify(&Digest::of(b"abd"), 3),
            Err(InvalidReason::DigestMismatch { .. })
        ));
    }
}
