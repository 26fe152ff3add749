//! `cp`: files and directory trees between the host and a VM, as tar
//! archives on a descriptor: packed here and read by kilnd (`CopyIn`), or
//! written by kilnd into a pipe and unpacked here (`CopyOut`). Naming
//! follows `docker cp`: a destination that is an existing directory gets
//! the source inside it under its own name, any other destination is the
//! copy's new name.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::thread;

use serde_json::Value;

use super::{CtlError, Ctx};
use crate::api::{CopyTarget, Manager};
use crate::archive::{self, ArchiveError, Destination};
use crate::cli::CpArgs;
use crate::client::ClientError;
use crate::output;
use crate::terminal;

/// One side of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side<'a> {
    Local(&'a str),
    /// `VM:PATH`.
    Vm {
        vm: &'a str,
        path: &'a str,
    },
}

impl<'a> Side<'a> {
    /// `VM:PATH` when there is a `:` with no `/` before it (VM names have
    /// neither), so `./a:b` and `/tmp/a:b` are local paths, as in docker.
    fn parse(arg: &'a str) -> Self {
        match arg.split_once(':') {
            Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => Self::Vm { vm, path },
            _ => Self::Local(arg),
        }
    }
}

pub fn cp(ctx: &mut Ctx, args: CpArgs) -> Result<i32, CtlError> {
    let stats = match (Side::parse(&args.src), Side::parse(&args.dest)) {
        (Side::Local(from), Side::Vm { vm, path }) => {
            let id = ctx.resolve(vm)?;
            let target = CopyTarget {
                path,
                container: args.container.as_deref(),
                max_bytes: args.max_bytes,
            };
            copy_in(ctx, Path::new(from), &id, target)?
        }
        (Side::Vm { vm, path }, Side::Local(to)) => {
            let dest = local_destination(Path::new(to))?;
            let id = ctx.resolve(vm)?;
            let target = CopyTarget {
                path,
                container: args.container.as_deref(),
                max_bytes: args.max_bytes,
            };
            copy_out(ctx, &id, target, &dest)?
        }
        (Side::Local(_), Side::Local(_)) => {
            return Err(CtlError::Usage(
                "one of SRC and DEST must be VM:PATH (cp copies between the host and a VM)".into(),
            ))
        }
        (Side::Vm { .. }, Side::Vm { .. }) => {
            return Err(CtlError::Usage(
                "only one of SRC and DEST may be VM:PATH".into(),
            ))
        }
    };
    if !ctx.json(&stats) {
        let number = |key: &str| stats.get(key).and_then(Value::as_u64).unwrap_or(0);
        let entries = number("entries");
        let plural = if entries == 1 { "entry" } else { "entries" };
        eprintln!(
            "copied {entries} {plural}, {}",
            output::bytes(number("bytes"))
        );
    }
    Ok(0)
}

/// Host to VM: `from` packed by a thread into a pipe whose read end goes
/// to kilnd with the call.
fn copy_in(
    ctx: &mut Ctx,
    from: &Path,
    id: &str,
    target: CopyTarget<'_>,
) -> Result<Value, CtlError> {
    let meta = fs::symlink_metadata(from).map_err(|source| CtlError::Local {
        what: from.display().to_string(),
        source,
    })?;
    let name = source_name(from)?;
    let (dir, name) = guest_destination(ctx, id, &target, name, meta.is_dir())?;
    let target = CopyTarget {
        path: &dir,
        ..target
    };
    let (reader, writer) = io::pipe().map_err(|source| CtlError::Local {
        what: "a pipe".into(),
        source,
    })?;
    let packer = {
        let from = from.to_owned();
        thread::spawn(move || {
            // kilnd may stop reading (a refusal, a full disk): that must be
            // an error here, not the end of kilnctl.
            terminal::no_sigpipe_in_this_thread();
            archive::pack(&from, &name, BufWriter::new(writer), &mut |skipped| {
                eprintln!(
                    "kilnctl: {}: left out (only files, directories and symlinks are copied)",
                    skipped.display()
                )
            })
        })
    };
    let reply = ctx.api.copy_in(id, &target, reader.as_fd());
    // Ours closed, kilnd's is the only reader: if kilnd stopped early the
    // packer gets EPIPE instead of waiting forever.
    drop(reader);
    let packed = packer
        .join()
        .unwrap_or_else(|_| Err(ArchiveError::Write(io::Error::other("the packer panicked"))));
    match (packed, reply) {
        // A local file that could not be read: kilnd saw an archive that
        // ended early, maybe at an entry's end, which looks complete.
        (Err(e @ (ArchiveError::Local { .. } | ArchiveError::Refused { .. })), _) => Err(e.into()),
        (_, Err(e)) => Err(e.into()),
        // kilnd took everything it needed and closed its end.
        (Ok(()) | Err(ArchiveError::Write(_) | ArchiveError::Read(_)), Ok(stats)) => Ok(stats),
    }
}

/// The name the copy of `from` gets: its last component (of the absolute
/// path for `.` and `..`).
fn source_name(from: &Path) -> Result<OsString, CtlError> {
    if let Some(name) = from.file_name() {
        return Ok(name.to_owned());
    }
    let absolute = fs::canonicalize(from).map_err(|source| CtlError::Local {
        what: from.display().to_string(),
        source,
    })?;
    absolute.file_name().map(ToOwned::to_owned).ok_or_else(|| {
        CtlError::Usage(format!(
            "{}: name a file or directory below /",
            from.display()
        ))
    })
}

/// What is at a path in the guest, as far as naming a copy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Directory,
    /// Not followed by the API: replacing it with the copy would surprise.
    Symlink,
    /// A file, or anything else that is not a directory.
    Other,
    Missing,
}

/// The directory in the guest that `CopyIn` unpacks into, and the top
/// entry's name: `DEST/name` when DEST is a directory (or ends with `/`),
/// else DEST's parent and DEST's own name.
fn guest_destination(
    ctx: &mut Ctx,
    id: &str,
    target: &CopyTarget<'_>,
    name: OsString,
    source_is_dir: bool,
) -> Result<(String, OsString), CtlError> {
    let path = target.path;
    if path.ends_with('/') {
        return Ok((path.to_owned(), name));
    }
    match probe(&mut ctx.api.reconnect()?, id, target)? {
        Existing::Directory => Ok((path.to_owned(), name)),
        Existing::Symlink => Err(CtlError::Invalid(format!(
            "{path} is a symlink in the guest: name the directory or file it points to"
        ))),
        Existing::Other if source_is_dir => Err(CtlError::Invalid(format!(
            "{path} exists and is not a directory: a directory cannot be copied over it"
        ))),
        Existing::Other | Existing::Missing => {
            let (parent, own) = path.rsplit_once('/').unwrap_or(("", path));
            let parent = if parent.is_empty() { "/" } else { parent };
            Ok((parent.to_owned(), OsString::from(own)))
        }
    }
}

/// Whether `target.path` is a directory in the guest. The API has no
/// `stat`; `CopyOut` of at most one byte answers it: a directory's
/// archive starts with the directory's own entry (read, then the pipe is
/// closed, ending the copy), a symlink's with the link, a file's with the
/// file or `FileTooLarge`, and a missing path is `NoSuchFile`.
fn probe(api: &mut Manager, id: &str, target: &CopyTarget<'_>) -> Result<Existing, CtlError> {
    let one_byte = CopyTarget {
        max_bytes: Some(1),
        ..*target
    };
    api.copy_out(id, &one_byte)?;
    let pipe = api.next_reply()?.take_fd("archive")?;
    let mut archive = tar::Archive::new(File::from(pipe));
    let first = archive
        .entries()
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(Result::ok)
        .map(|entry| entry.header().entry_type());
    match first {
        Some(kind) if kind.is_dir() => return Ok(Existing::Directory),
        Some(kind) if kind.is_symlink() => return Ok(Existing::Symlink),
        Some(_) => return Ok(Existing::Other),
        None => {}
    }
    drop(archive);
    match api.next_reply() {
        Ok(_) => Ok(Existing::Other),
        Err(ClientError::Remote { name, .. }) if name == "io.kiln.Manager.NoSuchFile" => {
            Ok(Existing::Missing)
        }
        Err(ClientError::Remote { name, .. }) if name == "io.kiln.Manager.FileTooLarge" => {
            Ok(Existing::Other)
        }
        Err(e) => Err(e.into()),
    }
}

/// Where a copy out goes on this machine, decided before anything is
/// asked of kilnd: into `to` when it is a directory; else `to` is the
/// copy's name in its parent (which must exist). `to/` must be an
/// existing directory.
fn local_destination(to: &Path) -> Result<Destination, CtlError> {
    let failed = |what: &Path| {
        let what = what.display().to_string();
        move |source| CtlError::Local { what, source }
    };
    match fs::metadata(to) {
        Ok(meta) if meta.is_dir() => {
            return Ok(Destination {
                dir: to.to_owned(),
                rename: None,
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if to.as_os_str().as_encoded_bytes().ends_with(b"/") {
                return Err(failed(to)(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such directory",
                )));
            }
        }
        Err(e) => return Err(failed(to)(e)),
    }
    let name = to
        .file_name()
        .ok_or_else(|| CtlError::Usage(format!("{}: not a name for a copy", to.display())))?;
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let meta = fs::metadata(&parent).map_err(failed(&parent))?;
    if !meta.is_dir() {
        return Err(failed(&parent)(io::Error::from(
            io::ErrorKind::NotADirectory,
        )));
    }
    Ok(Destination {
        dir: parent,
        rename: Some(name.to_owned()),
    })
}

/// VM to host: kilnd's archive unpacked from the pipe of its first
/// reply; its last reply says how the copy ended.
fn copy_out(
    ctx: &mut Ctx,
    id: &str,
    target: CopyTarget<'_>,
    dest: &Destination,
) -> Result<Value, CtlError> {
    ctx.api.copy_out(id, &target)?;
    let pipe = ctx.api.next_reply()?.take_fd("archive")?;
    let unpacked = archive::unpack(File::from(pipe), dest);
    // A local failure closed the pipe, and kilnd's copy failed of it:
    // the local error is the news.
    if let Err(e @ (ArchiveError::Local { .. } | ArchiveError::Refused { .. })) = unpacked {
        return Err(e.into());
    }
    let last = ctx.api.next_reply()?;
    // kilnd says it all went out; an archive that still did not read is
    // this side's error.
    unpacked?;
    Ok(last.parameters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_paths_are_told_from_local_ones() {
        assert_eq!(
            Side::parse("web:/tmp/x"),
            Side::Vm {
                vm: "web",
                path: "/tmp/x"
            }
        );
        assert_eq!(
            Side::parse("3fa2:/a:b"),
            Side::Vm {
                vm: "3fa2",
                path: "/a:b"
            }
        );
        for local in ["./a:b", "/tmp/a:b", "file", ":x", "dir/"] {
            assert_eq!(Side::parse(local), Side::Local(local));
        }
    }

    #[test]
    fn local_destinations_follow_docker_cp() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("file"), "x").unwrap();
        let into = local_destination(dir).unwrap();
        assert_eq!((into.dir.as_path(), into.rename), (dir, None));
        let new = local_destination(&dir.join("new")).unwrap();
        assert_eq!(
            (new.dir.as_path(), new.rename),
            (dir, Some(OsString::from("new")))
        );
        let over = local_destination(&dir.join("file")).unwrap();
        assert_eq!(over.rename, Some(OsString::from("file")));
        let relative = local_destination(Path::new("newname")).unwrap();
        assert_eq!(relative.dir, Path::new("."));
        for bad in ["missing/", "file/", "no/such/dir"] {
            let err = local_destination(&dir.join(bad)).unwrap_err();
            assert!(matches!(err, CtlError::Local { .. }), "{bad}: {err}");
        }
        assert_eq!(source_name(Path::new("a/b/")).unwrap(), "b");
        assert!(source_name(Path::new("/")).is_err());
    }
}
