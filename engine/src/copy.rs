//! `CopyIn` and `CopyOut`: files and directory trees into and out of a
//! guest (or a container's root) as a tar stream on a client's file
//! descriptor.
//!
//! The tar side runs on a blocking thread (the `tar` crate is
//! synchronous); it talks to the async side through a channel of two
//! items, so at most a couple of 1 MiB chunks are in flight whatever the
//! size of the copy. The guest side is made of the agent's file calls:
//! each file is written to a temporary and renamed when complete, so a
//! copy that fails half-way never leaves a half-written file under its
//! name.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use kiln_agent_proto::{
    FileInfo, FileKind, FileLocation, MakeDirectoryRequest, MakeSymlinkRequest, WriteFileRequest,
    MAX_PATH_BYTES,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::EngineHandle;
use crate::error::EngineError;

/// Bytes per agent file call.
const CHUNK: usize = 1024 * 1024;
/// Copy size limit when the caller names none.
pub const DEFAULT_MAX_COPY_BYTES: u64 = 1 << 30;
/// Largest copy size limit a caller may name.
pub const LIMIT_MAX_COPY_BYTES: u64 = 16 << 30;
/// Most entries (files, directories, links) one copy may have.
pub const MAX_COPY_ENTRIES: u64 = 100_000;

/// What a copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyStats {
    /// Files, directories and symlinks.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// Where and how much: the target in the guest and the size limit.
#[derive(Debug, Clone)]
pub struct CopyTarget {
    /// VM id.
    pub id: String,
    /// Absolute path in the guest (or the container).
    pub path: String,
    /// A container of the VM.
    pub container: Option<String>,
    /// Most bytes of file content (`FileTooLarge` beyond).
    pub max_bytes: u64,
}

impl CopyTarget {
    /// Checks the path and the limit.
    pub fn validate(&self) -> Result<(), EngineError> {
        if !self.path.starts_with('/')
            || self.path.len() > MAX_PATH_BYTES
            || self.path.contains('\0')
        {
            return Err(EngineError::InvalidArgument(
                "path must be absolute, at most 4095 bytes".into(),
            ));
        }
        if self.max_bytes == 0 || self.max_bytes > LIMIT_MAX_COPY_BYTES {
            return Err(EngineError::InvalidArgument(format!(
                "maxBytes must be 1 to {LIMIT_MAX_COPY_BYTES}"
            )));
        }
        Ok(())
    }

    /// Checks the target, then what is at its path (`NoSuchFile`).
    pub async fn describe(&self, engine: &EngineHandle) -> Result<FileInfo, EngineError> {
        self.validate()?;
        engine
            .describe_path(&self.id, &self.at(self.path.clone()))
            .await
    }

    fn at(&self, path: String) -> FileLocation {
        FileLocation {
            path,
            container: self.container.clone(),
        }
    }
}

/// One thing read from an archive (copy in) or found in the guest (copy
/// out).
#[derive(Debug)]
enum Item {
    Directory {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
    },
    Chunk(Vec<u8>),
    Symlink {
        path: String,
        target: String,
    },
    Failed(EngineError),
}

fn archive_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::FileFailed(format!("archive: {e}"))
}

/// `dest` joined with an archive entry's path; refuses absolute paths and
/// `..`, which could write outside `dest`.
fn join_entry(dest: &str, entry: &Path) -> Result<Option<String>, EngineError> {
    let mut joined = dest.trim_end_matches('/').to_owned();
    let mut any = false;
    for component in entry.components() {
        match component {
            Component::Normal(part) => {
                let part = part
                    .to_str()
                    .ok_or_else(|| EngineError::FileFailed(format!("{entry:?}: not UTF-8")))?;
                joined.push('/');
                joined.push_str(part);
                any = true;
            }
            Component::CurDir => {}
            _ => {
                return Err(EngineError::FileFailed(format!(
                    "{entry:?}: absolute paths and \"..\" are refused"
                )))
            }
        }
    }
    if joined.len() > MAX_PATH_BYTES {
        return Err(EngineError::FileFailed(format!("{entry:?}: path too long")));
    }
    Ok(any.then_some(joined))
}

/// Reads the tar archive on `archive` and sends its entries.
fn read_archive(
    archive: OwnedFd,
    dest: &str,
    items: &mpsc::Sender<Item>,
) -> Result<(), EngineError> {
    let mut archive = tar::Archive::new(File::from(archive));
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let header = entry.header();
        let kind = header.entry_type();
        // An empty mode field gets tar's usual defaults.
        let default_mode = if kind.is_dir() { 0o755 } else { 0o644 };
        let mode = header.mode().unwrap_or(default_mode) & 0o7777;
        // Owners absent from the header (an empty field) mean root, as
        // for tar run by root.
        let uid = header
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0);
        let gid = header
            .gid()
            .ok()
            .and_then(|g| u32::try_from(g).ok())
            .unwrap_or(0);
        let entry_path = entry.path().map_err(archive_error)?.into_owned();
        let Some(path) = join_entry(dest, &entry_path)? else {
            continue;
        };
        let item = if kind.is_dir() {
            Item::Directory {
                path,
                mode,
                uid,
                gid,
            }
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(archive_error)?
                .and_then(|t| t.to_str().map(str::to_owned))
                .ok_or_else(|| EngineError::FileFailed(format!("{entry_path:?}: bad link")))?;
            Item::Symlink { path, target }
        } else if kind.is_file() {
            let size = entry.size();
            if items
                .blocking_send(Item::File {
                    path,
                    mode,
                    uid,
                    gid,
                    size,
                })
                .is_err()
            {
                return Ok(());
            }
            loop {
                let mut chunk = Vec::with_capacity(CHUNK);
                (&mut entry)
                    .take(CHUNK as u64)
                    .read_to_end(&mut chunk)
                    .map_err(archive_error)?;
                if chunk.is_empty() {
                    break;
                }
                if items.blocking_send(Item::Chunk(chunk)).is_err() {
                    return Ok(());
                }
            }
            continue;
        } else {
            return Err(EngineError::FileFailed(format!(
                "{entry_path:?}: only files, directories and symlinks can be copied"
            )));
        };
        if items.blocking_send(item).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `CopyIn`: unpacks the tar archive read from `archive` below the
/// directory `target.path` (which must exist).
pub async fn copy_in(
    engine: &EngineHandle,
    target: &CopyTarget,
    archive: OwnedFd,
) -> Result<CopyStats, EngineError> {
    let dest = target.describe(engine).await?;
    if dest.kind != FileKind::Directory {
        return Err(EngineError::FileFailed(format!(
            "{}: not a directory",
            target.path
        )));
    }
    let (tx, mut rx) = mpsc::channel(2);
    let dest_path = target.path.clone();
    let reader = tokio::task::spawn_blocking(move || {
        if let Err(e) = read_archive(archive, &dest_path, &tx) {
            let _ = tx.blocking_send(Item::Failed(e));
        }
    });
    let mut stats = CopyStats::default();
    // The file being written: its request (offset advancing) and size.
    let mut open: Option<(WriteFileRequest, u64)> = None;
    let result = async {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Failed(e) => return Err(e),
                Item::Directory {
                    path,
                    mode,
                    uid,
                    gid,
                } => {
                    count_entry(&mut stats)?;
                    let request = MakeDirectoryRequest {
                        at: target.at(path),
                        mode: Some(mode),
                        uid: Some(uid),
                        gid: Some(gid),
                    };
                    engine.make_directory(&target.id, &request).await?;
                }
                Item::Symlink { path, target: link } => {
                    count_entry(&mut stats)?;
                    let request = MakeSymlinkRequest {
                        at: target.at(path),
                        target: link,
                    };
                    engine.make_symlink(&target.id, &request).await?;
                }
                Item::File {
                    path,
                    mode,
                    uid,
                    gid,
                    size,
                } => {
                    count_entry(&mut stats)?;
                    count_bytes(&mut stats, size, target.max_bytes)?;
                    let request = WriteFileRequest {
                        at: target.at(path),
                        offset: 0,
                        data: String::new(),
                        last: size == 0,
                        mode: Some(mode),
                        uid: Some(uid),
                        gid: Some(gid),
                    };
                    if size == 0 {
                        engine.write_file(&target.id, &request).await?;
                    } else {
                        open = Some((request, size));
                    }
                }
                Item::Chunk(bytes) => {
                    let Some((request, size)) = open.as_mut() else {
                        continue;
                    };
                    request.data = kiln_agent_proto::encode_bytes(&bytes);
                    let end = request.offset + bytes.len() as u64;
                    request.last = end >= *size;
                    engine.write_file(&target.id, request).await?;
                    request.offset = end;
                    if request.last {
                        open = None;
                    }
                }
            }
        }
        Ok(stats)
    }
    .await;
    drop(rx);
    let _ = reader.await;
    result
}

/// Counts `size` bytes of file content against the copy's `max`.
fn count_bytes(stats: &mut CopyStats, size: u64, max: u64) -> Result<(), EngineError> {
    stats.bytes = stats.bytes.saturating_add(size);
    if stats.bytes > max {
        return Err(EngineError::FileTooLarge(format!(
            "the copy is over its limit of {max} bytes"
        )));
    }
    Ok(())
}

fn count_entry(stats: &mut CopyStats) -> Result<(), EngineError> {
    stats.entries += 1;
    if stats.entries > MAX_COPY_ENTRIES {
        return Err(EngineError::FileTooLarge(format!(
            "more than {MAX_COPY_ENTRIES} entries"
        )));
    }
    Ok(())
}

/// `CopyOut`: writes `target.path` (a file, or a directory with all it
/// holds) as a tar archive to `archive`; entries are named from the
/// path's last component.
pub async fn copy_out(
    engine: &EngineHandle,
    target: &CopyTarget,
    archive: OwnedFd,
) -> Result<CopyStats, EngineError> {
    let root = target.describe(engine).await?;
    let (tx, rx) = mpsc::channel(2);
    let writer = tokio::task::spawn_blocking(move || write_archive(archive, rx));
    let walked = walk(engine, target, root, &tx).await;
    if let Err(e) = &walked {
        let _ = tx
            .send(Item::Failed(EngineError::FileFailed(e.to_string())))
            .await;
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| EngineError::FileFailed(format!("archive writer: {e}")))?;
    // A walk that found the channel closed failed because the writer did:
    // the writer's error says why. Otherwise the walk's error is the cause.
    match (walked, written) {
        (Err(EngineError::FileFailed(m)), Err(w)) if m == READER_GONE => Err(w),
        (Err(e), _) => Err(e),
        (Ok(_), Err(w)) => Err(w),
        (Ok(stats), Ok(())) => Ok(stats),
    }
}

/// Sends `root` and, for a directory, everything below it.
async fn walk(
    engine: &EngineHandle,
    target: &CopyTarget,
    root: FileInfo,
    items: &mpsc::Sender<Item>,
) -> Result<CopyStats, EngineError> {
    let base = if target.path.trim_end_matches('/').is_empty() {
        String::new()
    } else {
        target.path.trim_end_matches('/').to_owned()
    };
    let name = if root.name == "/" {
        ".".to_owned()
    } else {
        root.name.clone()
    };
    let mut stats = CopyStats::default();
    // (path in the guest, name in the archive, metadata)
    let mut pending = vec![(base, name, root)];
    while let Some((guest_path, archive_path, info)) = pending.pop() {
        count_entry(&mut stats)?;
        let send = |item| async { items.send(item).await.map_err(|_| closed()) };
        match info.kind {
            FileKind::Directory => {
                send(Item::Directory {
                    path: archive_path.clone(),
                    mode: info.mode,
                    uid: info.uid,
                    gid: info.gid,
                })
                .await?;
                let dir = if guest_path.is_empty() {
                    "/".to_owned()
                } else {
                    guest_path.clone()
                };
                let mut entries = engine.list_directory(&target.id, &target.at(dir)).await?;
                // Popped from the end: push in reverse for name order.
                entries.reverse();
                for entry in entries {
                    pending.push((
                        format!("{guest_path}/{}", entry.name),
                        format!("{archive_path}/{}", entry.name),
                        entry,
                    ));
                }
            }
            FileKind::Symlink => {
                // A link whose target cannot be read (`/proc`'s kernel
                // threads) has nothing to copy.
                if let Some(target) = info.target.filter(|t| !t.is_empty()) {
                    send(Item::Symlink {
                        path: archive_path,
                        target,
                    })
                    .await?;
                }
            }
            FileKind::File => {
                count_bytes(&mut stats, info.size, target.max_bytes)?;
                send(Item::File {
                    path: archive_path,
                    mode: info.mode,
                    uid: info.uid,
                    gid: info.gid,
                    size: info.size,
                })
                .await?;
                let at = target.at(guest_path.clone());
                let mut offset = 0;
                while offset < info.size {
                    let want = (info.size - offset).min(CHUNK as u64) as u32;
                    let bytes = engine.read_file(&target.id, &at, offset, want).await?;
                    if bytes.is_empty() {
                        return Err(EngineError::FileFailed(format!(
                            "{guest_path}: shrank during the copy"
                        )));
                    }
                    offset += bytes.len() as u64;
                    send(Item::Chunk(bytes)).await?;
                }
            }
            // Devices, FIFOs and sockets have no content to copy.
            FileKind::Other => {}
        }
    }
    Ok(stats)
}

const READER_GONE: &str = "the reader of the archive went away";

fn closed() -> EngineError {
    EngineError::FileFailed(READER_GONE.into())
}

/// The blocking side of `CopyOut`: builds the archive from the items.
fn write_archive(archive: OwnedFd, mut items: mpsc::Receiver<Item>) -> Result<(), EngineError> {
    let mut builder = tar::Builder::new(File::from(archive));
    let io = |e: io::Error| EngineError::FileFailed(format!("writing the archive: {e}"));
    while let Some(item) = items.blocking_recv() {
        let mut header = tar::Header::new_gnu();
        match item {
            Item::Failed(e) => return Err(e),
            Item::Chunk(_) => {}
            Item::Directory {
                path,
                mode,
                uid,
                gid,
            } => {
                header.set_entry_type(tar::EntryType::Directory);
                set_owner(&mut header, mode, uid, gid, 0);
                builder
                    .append_data(&mut header, &path, io::empty())
                    .map_err(io)?;
            }
            Item::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                set_owner(&mut header, 0o777, 0, 0, 0);
                builder
                    .append_link(&mut header, &path, &target)
                    .map_err(io)?;
            }
            Item::File {
                path,
                mode,
                uid,
                gid,
                size,
            } => {
                header.set_entry_type(tar::EntryType::Regular);
                set_owner(&mut header, mode, uid, gid, size);
                let content = ChunkReader {
                    items: &mut items,
                    left: size,
                    current: Vec::new(),
                    at: 0,
                };
                builder
                    .append_data(&mut header, &path, content)
                    .map_err(io)?;
            }
        }
    }
    builder.into_inner().map_err(io)?;
    Ok(())
}

fn set_owner(header: &mut tar::Header, mode: u32, uid: u32, gid: u32, size: u64) {
    header.set_mode(mode);
    header.set_uid(u64::from(uid));
    header.set_gid(u64::from(gid));
    header.set_size(size);
    header.set_mtime(0);
}

/// A file's content as it arrives in chunks.
struct ChunkReader<'a> {
    items: &'a mut mpsc::Receiver<Item>,
    left: u64,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        while self.at >= self.current.len() {
            match self.items.blocking_recv() {
                Some(Item::Chunk(bytes)) => {
                    self.current = bytes;
                    self.at = 0;
                }
                Some(Item::Failed(e)) => return Err(io::Error::other(e.to_string())),
                _ => return Err(io::Error::other("file content cut short")),
            }
        }
        let rest = self.current.get(self.at..).unwrap_or_default();
        let n = rest
            .len()
            .min(buf.len())
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf.get_mut(..n)
            .unwrap_or_default()
            .copy_from_slice(rest.get(..n).unwrap_or_default());
        self.at += n;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_stay_below_the_destination() {
        assert_eq!(
            join_entry("/tmp/in", Path::new("./a/b.txt"))
                .unwrap()
                .as_deref(),
            Some("/tmp/in/a/b.txt")
        );
        assert_eq!(
            join_entry("/", Path::new("x")).unwrap().as_deref(),
            Some("/x")
        );
        assert_eq!(join_entry("/tmp", Path::new("./")).unwrap(), None);
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
            assert_eq!(
                join_entry("/tmp", Path::new(bad)).unwrap_err().name(),
                "FileFailed",
                "{bad}"
            );
        }
    }

    #[test]
    fn targets_are_checked() {
        let target = |path: &str, max_bytes| CopyTarget {
            id: "vm".into(),
            path: path.into(),
            container: None,
            max_bytes,
        };
        assert!(target("/tmp", 1).validate().is_ok());
        assert!(target("tmp", 1).validate().is_err());
        assert!(target("/tmp", 0).validate().is_err());
        assert!(target("/tmp", LIMIT_MAX_COPY_BYTES + 1).validate().is_err());
    }
}
