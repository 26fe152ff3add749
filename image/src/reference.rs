//! What callers name images with: a digest, or a reference normalised the
//! way Docker and the containers tools do (`busybox` is
//! `docker.io/library/busybox:latest`), so one image has one tag key
//! whichever spelling was used.

use std::fmt;

use oci_client::Reference;

use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};

/// An image as named by a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// By manifest digest (`sha256:…`, or `name@sha256:…`).
    Digest(Digest),
    /// By tag, normalised (`registry/repository:tag`).
    Tag(String),
}

impl Lookup {
    /// Parse a digest, a reference with a digest, or a tag reference.
    pub fn parse(what: &str) -> Result<Self, ImageError> {
        if what.starts_with("sha256:") {
            return Digest::parse(what)
                .map(Lookup::Digest)
                .map_err(|reason| ImageError::invalid(what, reason));
        }
        let reference = parse_reference(what)?;
        Ok(match reference.digest() {
            Some(d) => Lookup::Digest(Digest::parse(d).map_err(|r| ImageError::invalid(what, r))?),
            None => Lookup::Tag(tag_key(&reference)),
        })
    }
}

impl fmt::Display for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookup::Digest(d) => d.fmt(f),
            Lookup::Tag(t) => f.write_str(t),
        }
    }
}

/// Parse a reference; a bad one is an invalid image.
pub fn parse_reference(what: &str) -> Result<Reference, ImageError> {
    what.parse::<Reference>()
        .map_err(|_| ImageError::invalid(what, InvalidReason::BadReference(what.to_owned())))
}

/// The key a tag reference is stored under: `registry/repository:tag`.
pub fn tag_key(reference: &Reference) -> String {
    format!(
        "{}/{}:{}",
        reference.registry(),
        reference.repository(),
        reference.tag().unwrap_or("latest")
    )
}

/// The tags a pull of `reference` records: its tag, unless it was pulled
/// by digest (then the tag is not what was verified).
pub fn tags_of(reference: &Reference) -> Vec<String> {
    match reference.digest() {
        Some(_) => Vec::new(),
        None => vec![tag_key(reference)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn tags_are_normalised() {
        for (given, key) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("docker.io/library/busybox:1", "docker.io/library/busybox:1"),
            ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
            ("localhost/x", "localhost/x:latest"),
        ] {
            assert_eq!(
                Lookup::parse(given).unwrap(),
                Lookup::Tag(key.into()),
                "{given}"
            );
        }
    }

    #[test]
    fn digests_win_over_tags() {
        let d = Digest::parse(D).unwrap();
        assert_eq!(Lookup::parse(D).unwrap(), Lookup::Digest(d.clone()));
        assert_eq!(
            Lookup::parse(&format!("127.0.0.1:5000/a:t@{D}")).unwrap(),
            Lookup::Digest(d)
        );
        let r = parse_reference(&format!("127.0.0.1:5000/a@{D}")).unwrap();
        assert!(tags_of(&r).is_empty());
    }

    #[test]
    fn bad_references_are_invalid() {
        for bad in ["a//b", "sha256:abc", "a b", "", "x@sha256:zz"] {
            let e = Lookup::parse(bad).unwrap_err();
            assert_eq!(e.name(), "InvalidImage", "{bad}");
        }
    }
}
