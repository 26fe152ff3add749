//! The host's side of `cp`: a local file or tree packed as the tar archive
//! `CopyIn` reads, and the archive `CopyOut` writes unpacked into a local
//! directory, kept from writing anywhere else.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why packing or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive from kilnd could not be read (or ended early).
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
    /// The archive could not be written to kilnd.
    #[error("writing the archive: {0}")]
    Write(#[source] io::Error),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An entry that could land outside the destination, or one kilnctl
    /// does not unpack.
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: &'static str },
}

fn local(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Local {
        path: path.to_owned(),
        source,
    }
}

/// Writes `source` (a file, a symlink, or a directory and everything
/// below it, symlinks not followed) to `out` as a tar archive whose top
/// entry is `name`. Modes are kept, owners are root's (as `docker cp`
/// makes them); sockets, FIFOs and devices have no content to copy and
/// are left out, each told to `skipped`.
pub fn pack(
    source: &Path,
    name: &OsStr,
    out: impl Write,
    skipped: &mut dyn FnMut(&Path),
) -> Result<(), ArchiveError> {
    let mut builder = tar::Builder::new(out);
    // (local path, path in the archive), popped from the end.
    let mut pending = vec![(source.to_owned(), PathBuf::from(name))];
    let mut top = true;
    while let Some((path, in_archive)) = pending.pop() {
        let meta = fs::symlink_metadata(&path).map_err(local(&path))?;
        let kind = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_size(0);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            builder
                .append_data(&mut header, &in_archive, io::empty())
                .map_err(ArchiveError::Write)?;
            let mut children: Vec<OsString> = fs::read_dir(&path)
                .map_err(local(&path))?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<io::Result<_>>()
                .map_err(local(&path))?;
            // Name order, popped from the end.
            children.sort_by(|a, b| b.cmp(a));
            for child in children {
                pending.push((path.join(&child), in_archive.join(&child)));
            }
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(local(&path))?;
            header.set_entry_type(tar::EntryType::Symlink);
            builder
                .append_link(&mut header, &in_archive, &target)
                .map_err(ArchiveError::Write)?;
        } else if kind.is_file() {
            let file = File::open(&path).map_err(local(&path))?;
            // The size of what was opened: a file replaced meanwhile is
            // copied as it is now.
            let size = file.metadata().map_err(local(&path))?.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let mut content = Exactly {
                file,
                left: size,
                failed: None,
            };
            let appended = builder.append_data(&mut header, &in_archive, &mut content);
            if let Some(source) = content.failed.take() {
                return Err(ArchiveError::Local { path, source });
            }
            appended.map_err(ArchiveError::Write)?;
        } else if top {
            return Err(ArchiveError::Refused {
                path,
                reason: "only files, directories and symlinks can be copied",
            });
        } else {
            skipped(&path);
        }
        top = false;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(ArchiveError::Write)
}

/// A file's content, exactly as many bytes as its header says: tar writes
/// whatever the reader gives, so a file that shrank while it was read
/// would make the archive lie. Read errors are kept apart from the
/// archive's write errors.
struct Exactly {
    file: File,
    left: u64,
    failed: Option<io::Error>,
}

impl Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let result = self.file.read(buf.get_mut(..want).unwrap_or_default());
        let error = match result {
            Ok(0) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was copied",
            ),
            Ok(n) => {
                self.left -= n as u64;
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => e,
        };
        let kind = error.kind();
        self.failed = Some(error);
        Err(io::Error::new(kind, "reading a file to copy"))
    }
}

/// Where an unpacked archive goes: into the existing directory `dir`, its
/// top entry under its own name or renamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub dir: PathBuf,
    pub rename: Option<OsString>,
}

/// Unpacks the archive read from `input` (as `CopyOut` writes it: the top
/// entry first, everything else below it) at `dest`. Files, directories
/// and symlinks only; an entry naming `..` or an absolute path is refused,
/// and so is one that would go through a symlink or anything else that is
/// not a directory, so nothing is written outside `dest`. Each file and
/// symlink is written under a hidden name and renamed when complete.
/// Permission bits are kept (setuid, setgid and sticky dropped), owners
/// are the caller's, times are now; directories get their modes once
/// everything is in them.
pub fn unpack(input: impl Read, dest: &Destination) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut top: Option<Vec<OsString>> = None;
    let mut directories: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let parts = normal_parts(&path)?;
        let top = top.get_or_insert_with(|| parts.clone());
        let Some(rest) = parts.strip_prefix(top.as_slice()) else {
            return Err(ArchiveError::Refused {
                path,
                reason: "not below the copy's first entry",
            });
        };
        let mut target = dest.dir.clone();
        match &dest.rename {
            Some(name) => target.push(name),
            None => target.extend(top.iter()),
        }
        target.extend(rest);
        if target == dest.dir {
            // The archive of a whole root (`.`): its contents go in, the
            // directory itself is the destination's.
            continue;
        }
        make_parents(&dest.dir, &target)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            match fs::symlink_metadata(&target) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(ArchiveError::Refused {
                        path: target,
                        reason: "exists and is not a directory",
                    })
                }
                Err(_) => fs::create_dir(&target).map_err(local(&target))?,
            }
            let mode = entry.header().mode().unwrap_or(0o755);
            directories.push((target, mode));
        } else if kind.is_file() || kind.is_symlink() {
            // Written beside, then renamed over the name: a copy cut short
            // leaves no half file, and whatever was at the name (a file, a
            // symlink) is replaced, not written through.
            let partial = partial_name(&target);
            let _ = fs::remove_file(&partial);
            let placed = if kind.is_file() {
                write_file(&mut entry, &partial)
            } else {
                let link = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .ok_or_else(|| ArchiveError::Refused {
                        path: path.clone(),
                        reason: "a symlink without a target",
                    })?;
                std::os::unix::fs::symlink(&link, &partial).map_err(local(&target))
            };
            let placed =
                placed.and_then(|()| fs::rename(&partial, &target).map_err(local(&target)));
            if placed.is_err() {
                let _ = fs::remove_file(&partial);
            }
            placed?;
        } else {
            return Err(ArchiveError::Refused {
                path,
                reason: "only files, directories and symlinks are unpacked",
            });
        }
    }
    // Deepest first, so a read-only directory is filled before it closes.
    for (dir, mode) in directories.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o777)).map_err(local(dir))?;
    }
    Ok(())
}

/// A file entry's content into a new file at `path`, with the entry's
/// permission bits. Reading the archive and writing the file fail apart:
/// an archive that ends inside a file is kilnd's news, a full disk here
/// is this machine's.
fn write_file(entry: &mut tar::Entry<'_, impl Read>, path: &Path) -> Result<(), ArchiveError> {
    let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(local(path))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::Read(e)),
        };
        file.write_all(buf.get(..n).unwrap_or_default())
            .map_err(local(path))?;
        copied += n as u64;
    }
    if copied != entry.size() {
        return Err(ArchiveError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the archive ended inside a file",
        )));
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(local(path))
}

/// Where an entry is written before it is renamed to `target`: hidden,
/// beside it.
fn partial_name(target: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(target.file_name().unwrap_or_default());
    name.push(".kilnctl-partial");
    target.with_file_name(name)
}

/// The names of an archive path, `.` left out; `..` and absolute paths
/// refused.
fn normal_parts(path: &Path) -> Result<Vec<OsString>, ArchiveError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::Refused {
                    path: path.to_owned(),
                    reason: "absolute paths and \"..\" are refused",
                })
            }
        }
    }
    Ok(parts)
}

/// Every directory between `root` and `target` exists and is one (created
/// when missing): a symlink on the way (which an archive could have made
/// a moment before) is refused rather than followed.
fn make_parents(root: &Path, target: &Path) -> Result<(), ArchiveError> {
    let Ok(below) = target.strip_prefix(root) else {
        return Err(ArchiveError::Refused {
            path: target.to_owned(),
            reason: "outside the destination",
        });
    };
    let mut dir = root.to_owned();
    let mut names: Vec<&OsStr> = below.iter().collect();
    names.pop();
    for name in names {
        dir.push(name);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(ArchiveError::Refused {
                    path: dir,
                    reason: "on the way and not a directory",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(local(&dir))?;
            }
            Err(e) => {
                return Err(ArchiveError::Local {
                    path: dir,
                    source: e,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// A tree packed and unpacked again, under its name and renamed.
    #[test]
    fn trees_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("tree");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(src.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(src.join("secret"), "s").unwrap();
        fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("sub/run.sh", src.join("link")).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o550)).unwrap();
        let fifo =
            std::ffi::CString::new(src.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

        let mut archive = Vec::new();
        let mut skipped = Vec::new();
        pack(&src, OsStr::new("tree"), &mut archive, &mut |p| {
            skipped.push(p.to_owned())
        })
        .unwrap();
        assert_eq!(skipped, [src.join("fifo")]);
        let names: Vec<String> = tar::Archive::new(&archive[..])
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                assert_eq!(
                    (e.header().uid().unwrap(), e.header().gid().unwrap()),
                    (0, 0)
                );
                e.path().unwrap().display().to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "tree",
                "tree/link",
                "tree/secret",
                "tree/sub",
                "tree/sub/run.sh"
            ]
        );

        for rename in [None, Some(OsString::from("copy"))] {
            let out = tempfile::tempdir().unwrap();
            let dest = Destination {
                dir: out.path().to_owned(),
                rename: rename.clone(),
            };
            unpack(&archive[..], &dest).unwrap();
            let root = out.path().join(rename.unwrap_or_else(|| "tree".into()));
            assert_eq!(
                fs::read_to_string(root.join("sub/run.sh")).unwrap(),
                "#!/bin/sh\necho hi\n"
            );
            assert_eq!(mode(&root.join("sub/run.sh")), 0o755);
            assert_eq!(mode(&root.join("secret")), 0o600);
            assert_eq!(mode(&root.join("sub")), 0o550);
            assert_eq!(
                fs::read_link(root.join("link")).unwrap(),
                Path::new("sub/run.sh")
            );
            fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn packed(path: &Path, name: &str) -> Vec<u8> {
        let mut archive = Vec::new();
        pack(path, OsStr::new(name), &mut archive, &mut |_| {}).unwrap();
        archive
    }

    /// A single file renamed, over an existing file.
    #[test]
    fn a_file_replaces_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), "new").unwrap();
        let archive = packed(&tmp.path().join("a"), "a");
        fs::write(tmp.path().join("b"), "old, and longer").unwrap();
        let dest = Destination {
            dir: tmp.path().to_owned(),
            rename: Some("b".into()),
        };
        unpack(&archive[..], &dest).unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("b")).unwrap(), "new");
        // A directory over that file is refused.
        fs::create_dir(tmp.path().join("d")).unwrap();
        let archive = packed(&tmp.path().join("d"), "d");
        let err = unpack(&archive[..], &dest).unwrap_err();
        assert!(
            err.to_string().ends_with("exists and is not a directory"),
            "{err}"
        );
    }

    /// An archive cut inside a file (kilnd's copy failed): a read error,
    /// and no half file left.
    #[test]
    fn a_cut_archive_leaves_no_half_file() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("big"), vec![7u8; 100_000]).unwrap();
        let mut archive = Vec::new();
        pack(
            &tmp.path().join("big"),
            OsStr::new("big"),
            &mut archive,
            &mut |_| {},
        )
        .unwrap();
        archive.truncate(50_000);
        let out = tempfile::tempdir().unwrap();
        let dest = Destination {
            dir: out.path().to_owned(),
            rename: None,
        };
        let err = unpack(&archive[..], &dest).unwrap_err();
        assert!(matches!(err, ArchiveError::Read(_)), "{err}");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
    }

    /// What a hostile archive tries: `..`, absolute paths, a symlink out
    /// and a write through it, an entry beside the top one.
    #[test]
    fn archives_cannot_write_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let inside = tmp.path().join("inside");
        fs::create_dir(&inside).unwrap();
        let dest = Destination {
            dir: inside.clone(),
            rename: None,
        };
        let raw_entry = |name: &[u8], kind: tar::EntryType, link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_size(if kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            // Written into the header directly: tar's setters refuse these.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            h
        };
        let archive = |entries: &[tar::Header]| {
            let mut b = tar::Builder::new(Vec::new());
            for h in entries {
                let data: &[u8] = if h.entry_type() == tar::EntryType::Regular {
                    b"x"
                } else {
                    b""
                };
                b.append(h, data).unwrap();
            }
            b.into_inner().unwrap()
        };
        let dir = tar::EntryType::Directory;
        let file = tar::EntryType::Regular;
        for (case, entries) in [
            ("dotdot", vec![raw_entry(b"../outside/x", file, None)]),
            ("absolute", vec![raw_entry(b"/tmp/x", file, None)]),
            (
                "through a symlink",
                vec![
                    raw_entry(b"top", dir, None),
                    raw_entry(
                        b"top/out",
                        tar::EntryType::Symlink,
                        Some(outside.to_str().unwrap()),
                    ),
                    raw_entry(b"top/out/x", file, None),
                ],
            ),
            (
                "beside the top",
                vec![
                    raw_entry(b"top", dir, None),
                    raw_entry(b"other/x", file, None),
                ],
            ),
            (
                "a device",
                vec![
                    raw_entry(b"top", dir, None),
                    raw_entry(b"top/null", tar::EntryType::Char, None),
                ],
            ),
        ] {
            let err = unpack(&archive(&entries)[..], &dest).unwrap_err();
            assert!(matches!(err, ArchiveError::Refused { .. }), "{case}: {err}");
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
    }
}
