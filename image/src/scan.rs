//! The safety scan of a layer tar, before mkfs.erofs ever reads it.
//!
//! A layer is untrusted input. The scan decompresses it the way mkfs.erofs
//! will (every gzip member, not just the first), walks it with the `tar`
//! crate and refuses: paths that are absolute or climb with `..`; entries
//! written through a symlink of the same layer (`link -> /etc` then
//! `link/passwd`); hard links that are absolute, climb or go through a
//! symlink; relative symlinks that climb above the root; entry types other
//! than files, directories, links and device nodes (so no extension header
//! that a parser other than the `tar` crate's could read differently); data
//! after the end-of-archive marker; more uncompressed bytes than the size
//! budget (a tar bomb stops here, mid-stream). It also hashes the
//! uncompressed stream, which must be the config's diff id.
//!
//! Absolute symlink targets are allowed: the layer is only ever mounted as
//! the root of a container in a guest, where `/x` means the image's `/x`;
//! distribution images are full of them (`/etc/alternatives/*`). What
//! would follow one on the host, an entry written through it, is refused.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use crate::digest::{Digest, HashingReader};
use crate::error::{ImageError, InvalidReason};
use crate::manifest::Compression;

/// What a passed scan learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Uncompressed bytes (the tar stream).
    pub uncompressed: u64,
}

/// Why reading stopped, carried through `io::Error` by the readers below
/// so the tar crate's errors can be told apart from ours.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("over the size budget")]
    TooLarge,
    #[error("cannot read the layer file")]
    Read(#[source] std::io::Error),
    #[error("cannot feed the converter")]
    Feed(#[source] std::io::Error),
}

/// Passes what is read on to `out` too: the tar stream, decompressed once,
/// goes to the scan and to mkfs.erofs together.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut dyn Write,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out
            .write_all(&buf[..n])
            .map_err(|e| std::io::Error::other(Stop::Feed(e)))?;
        Ok(n)
    }
}

/// Counts bytes and stops the stream past `budget`.
struct Budget<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte over is enough to know the budget is exceeded.
        let want = buf
            .len()
            .min(usize::try_from(self.left + 1).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(Stop::TooLarge));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Tags errors of the file itself (not of decoding it).
struct FileReader(BufReader<File>);

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| std::io::Error::other(Stop::Read(e)))
    }
}

/// Scan the layer blob at `path` (verified against `layer`), compressed as
/// `compression`. `diff_id` is the config's digest of the uncompressed
/// tar, `budget` the uncompressed bytes still allowed for this image.
/// Every byte of the tar is also written to `feed` as it is scanned (the
/// converter's input, so the layer is decompressed once): what `feed`
/// made of it must be thrown away unless the scan passes. Blocking: run
/// it on the blocking pool.
#[allow(clippy::too_many_arguments)]
pub fn scan_layer(
    image: &str,
    path: &Path,
    compression: Compression,
    layer: &Digest,
    diff_id: &Digest,
    budget: u64,
    limit: u64,
    feed: &mut dyn Write,
) -> Result<Scanned, ImageError> {
    let file = File::open(path).map_err(ImageError::io("read", path))?;
    let file = FileReader(BufReader::with_capacity(1 << 16, file));
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| classify(image, path, layer, e, limit))?,
        ),
    };
    let mut reader = HashingReader::new(Budget {
        inner: Tee {
            inner: decoded,
            out: feed,
        },
        left: budget,
    });
    walk_tar(&mut reader, layer).map_err(|e| match e {
        Walked::Io(e) => classify(image, path, layer, e, limit),
        Walked::Unsafe(reason) => ImageError::invalid(image, reason),
    })?;
    let uncompressed = reader.seen();
    let (actual, _) = reader.into_hasher().finish();
    if &actual != diff_id {
        return Err(ImageError::invalid(
            image,
            InvalidReason::DiffIdMismatch {
                layer: layer.to_string(),
                expected: diff_id.to_string(),
                actual: actual.to_string(),
            },
        ));
    }
    Ok(Scanned { uncompressed })
}

/// Map an error out of the reader chain: the budget, the file, or else the
/// data itself (bad compression, a broken tar header).
fn classify(image: &str, path: &Path, layer: &Digest, e: std::io::Error, limit: u64) -> ImageError {
    let stop = e.get_ref().and_then(|inner| inner.downcast_ref::<Stop>());
    match stop {
        Some(Stop::TooLarge) => ImageError::invalid(image, InvalidReason::TooLarge { limit }),
        Some(Stop::Read(_)) => {
            let kind = e.kind();
            let source = match e.into_inner().map(|b| b.downcast::<Stop>()) {
                Some(Ok(stop)) => match *stop {
                    Stop::Read(e) => e,
                    Stop::TooLarge | Stop::Feed(_) => std::io::Error::from(kind),
                },
                _ => std::io::Error::from(kind),
            };
            ImageError::io("read", path)(source)
        }
        Some(Stop::Feed(inner)) => ImageError::StorageFailed {
            action: "convert to erofs",
            path: path.to_owned(),
            source: std::io::Error::new(inner.kind(), inner.to_string()),
        },
        None => ImageError::malformed(image, "layer", format!("{layer}: {e}")),
    }
}

enum Walked {
    Io(std::io::Error),
    Unsafe(InvalidReason),
}

impl From<std::io::Error> for Walked {
    fn from(e: std::io::Error) -> Self {
        Walked::Io(e)
    }
}

/// What the walk remembers: the symlinks the layer made so far.
#[derive(Debug, Default)]
struct Walk {
    symlinks: HashSet<Vec<String>>,
}

/// Walk every entry, then require only zeros up to the end of the stream.
fn walk_tar<R: Read>(reader: &mut R, layer: &Digest) -> Result<(), Walked> {
    use tar::EntryType;
    let mut walk = Walk::default();
    let mut archive = tar::Archive::new(&mut *reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let raw_path = entry.path()?.to_string_lossy().into_owned();
        let unsafe_entry = |why| {
            Walked::Unsafe(InvalidReason::UnsafeLayer {
                layer: layer.to_string(),
                path: raw_path.clone(),
                why,
            })
        };
        match kind {
            EntryType::XGlobalHeader => {
                // A global header that renames entries would be read by
                // mkfs.erofs and ignored by the tar crate.
                let sets_names = match entry.pax_extensions()? {
                    Some(exts) => exts.flatten().any(|e| {
                        matches!(e.key(), Ok("path" | "linkpath"))
                            || e.key_bytes().starts_with(b"GNU.")
                    }),
                    None => false,
                };
                if sets_names {
                    return Err(unsafe_entry("is a global header that sets names"));
                }
                continue;
            }
            EntryType::Regular
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            _ => return Err(unsafe_entry("has an entry type the store does not take")),
        }
        let path = components(&raw_path).map_err(unsafe_entry)?;
        if walk.through_symlink(&path) {
            return Err(unsafe_entry("is written through a symlink"));
        }
        match kind {
            EntryType::Symlink => {
                let target = link_target(&mut entry)?;
                if !target.starts_with('/') && climbs_out(&path, &target) {
                    return Err(unsafe_entry("is a symlink that points above the root"));
                }
                walk.symlinks.insert(path);
            }
            EntryType::Link => {
                let target = link_target(&mut entry)?;
                let target = components(&target).map_err(|why| match why {
                    "is absolute" => unsafe_entry("is a hard link to an absolute path"),
                    _ => unsafe_entry("is a hard link that climbs with .."),
                })?;
                if walk.through_symlink(&target) {
                    return Err(unsafe_entry("is a hard link through a symlink"));
                }
                walk.symlinks.remove(&path);
            }
            _ => {
                // A later entry replaces an earlier one of the same path.
                walk.symlinks.remove(&path);
            }
        }
    }
    // The tar crate stops at the first zero block; anything but zeros after
    // it could be read by another parser.
    let rest = archive.into_inner();
    let mut buf = [0u8; 8192];
    loop {
        let n = rest.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(Walked::Unsafe(InvalidReason::UnsafeLayer {
                layer: layer.to_string(),
                path: String::new(),
                why: "has data after the end of the archive",
            }));
        }
    }
    Ok(())
}

impl Walk {
    /// Whether a proper prefix of `path` is a symlink of this layer.
    fn through_symlink(&self, path: &[String]) -> bool {
        (1..path.len()).any(|n| self.symlinks.contains(&path[..n]))
    }
}

fn link_target<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<String, Walked> {
    Ok(entry
        .link_name()?
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// The normal components of a tar path (`./a//b/` → `[a, b]`), or why it
/// is refused.
fn components(path: &str) -> Result<Vec<String>, &'static str> {
    if path.starts_with('/') {
        return Err("is absolute");
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("climbs with .."),
            name => out.push(name.to_owned()),
        }
    }
    Ok(out)
}

/// Whether the relative symlink `target`, placed at `link`, resolves above
/// the root.
fn climbs_out(link: &[String], target: &str) -> bool {
    // The link's directory is its parent.
    let mut depth = link.len().saturating_sub(1) as i64;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_absolute_and_climbing() {
        assert_eq!(components("./a//b/").unwrap(), ["a", "b"]);
        assert_eq!(components("./").unwrap(), Vec::<String>::new());
        assert_eq!(components("/etc/passwd"), Err("is absolute"));
        assert_eq!(components("a/../../b"), Err("climbs with .."));
    }

    #[test]
    fn relative_symlinks_may_not_climb_above_the_root() {
        let at = |p: &str| components(p).unwrap();
        assert!(!climbs_out(&at("usr/bin/x"), "../lib/y"));
        assert!(!climbs_out(&at("usr/bin/x"), "../../etc"));
        assert!(climbs_out(&at("usr/bin/x"), "../../../etc"));
        assert!(climbs_out(&at("x"), ".."));
        assert!(!climbs_out(&at("x"), "y/../z"));
    }
}
