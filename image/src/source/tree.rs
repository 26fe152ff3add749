//! Files of a local source: a directory (an OCI layout), or the members of
//! a tar archive (an OCI archive, a docker archive) read in place by offset,
//! without unpacking the archive anywhere.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::Body;
use crate::error::ImageError;
use crate::manifest::MAX_DOCUMENT_BYTES;

/// A directory or an indexed archive.
#[derive(Debug)]
pub enum Tree {
    /// Files under a directory.
    Dir(PathBuf),
    /// Regular members of an uncompressed tar, by normalised name.
    Tar {
        /// The archive.
        path: PathBuf,
        /// Its members: offset of the data and size.
        members: HashMap<String, (u64, u64)>,
    },
}

/// `./a//b` → `a/b`; names that are absolute or climb are refused (the
/// names inside a docker archive's manifest are untrusted).
fn normalise(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!name.starts_with('/') && !parts.is_empty()).then(|| parts.join("/"))
}

impl Tree {
    /// Index the regular members (and symlinks to them: `docker save` links
    /// duplicate layers) of the tar at `path`. Blocking.
    pub fn index_tar(path: &Path) -> Result<Self, ImageError> {
        let image = path.display().to_string();
        let bad = |detail: String| ImageError::malformed(&image, "archive", detail);
        let mut file = std::fs::File::open(path).map_err(ImageError::io("read", path))?;
        let mut magic = [0u8; 4];
        let n = file
            .read(&mut magic)
            .map_err(ImageError::io("read", path))?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(bad("the archive is compressed; give the plain tar".into()));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(ImageError::io("read", path))?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let mut links = Vec::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(e.to_string()))?;
            let name = entry.path().map_err(|e| bad(e.to_string()))?;
            let Some(name) = normalise(&name.to_string_lossy()) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular => {
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink => {
                    if let Ok(Some(target)) = entry.link_name() {
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        let target = format!("{dir}/{}", target.to_string_lossy());
                        if let Some(target) = normalise(&target) {
                            links.push((name, target));
                        }
                    }
                }
                _ => {}
            }
        }
        // One level of links is what docker save writes; a link to a link
        // or to nothing is simply not a member.
        for (name, target) in links {
            if let Some(member) = members.get(&target).copied() {
                members.insert(name, member);
            }
        }
        Ok(Tree::Tar {
            path: path.to_owned(),
            members,
        })
    }

    /// Where the tree is, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Tree::Dir(p) | Tree::Tar { path: p, .. } => p,
        }
    }

    /// The size of member `name`, if present.
    pub fn member_size(&self, name: &str) -> Option<u64> {
        let name = normalise(name)?;
        match self {
            Tree::Dir(dir) => std::fs::metadata(dir.join(name)).ok().map(|m| m.len()),
            Tree::Tar { members, .. } => members.get(&name).map(|&(_, size)| size),
        }
    }

    /// Open member `name`, reading at most `limit` bytes; `None` if absent.
    pub async fn open(&self, name: &str, limit: u64) -> Result<Option<Body>, ImageError> {
        let Some(name) = normalise(name) else {
            return Ok(None);
        };
        let (path, member) = match self {
            Tree::Dir(dir) => (dir.join(&name), None),
            Tree::Tar { path, members } => match members.get(&name) {
                Some(&member) => (path.clone(), Some(member)),
                None => return Ok(None),
            },
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("read", path)(e)),
        };
        let limit = match member {
            Some((offset, size)) => {
                file.seek(SeekFrom::Start(offset))
                    .await
                    .map_err(ImageError::io("read", &path))?;
                size.min(limit)
            }
            None => limit,
        };
        Ok(Some(Body::File(file.take(limit))))
    }

    /// Read a small member whole (`index.json`, `manifest.json`); `None` if
    /// absent.
    pub async fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let Some(Body::File(mut body)) = self.open(name, MAX_DOCUMENT_BYTES + 1).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        body.read_to_end(&mut out)
            .await
            .map_err(ImageError::io("read", self.path().join(name)))?;
        if out.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(ImageError::malformed(
                self.path().display().to_string(),
                "archive",
                format!("{name} is larger than {MAX_DOCUMENT_BYTES} bytes"),
            ));
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_kept_inside() {
        assert_eq!(
            normalise("./blobs//sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(normalise("a/../b").as_deref(), Some("b"));
        assert_eq!(normalise("../x"), None);
        assert_eq!(normalise("/etc/passwd"), None);
        assert_eq!(normalise("./"), None);
    }
}
