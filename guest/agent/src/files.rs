//! The file calls: `WriteFile`, `ReadFile`, `MakeDirectory`,
//! `MakeSymlink`, `StatPath`, `ListDirectory`.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` below a root
//! directory: `/` for the guest, `/proc/<pid>/root` for a container, so
//! `..` and symlinks in a container's image cannot lead outside it. The
//! last component is never followed: the calls act on the entry itself
//! (`WriteFile` replaces a symlink rather than writing through it).
//!
//! A file is written to a hidden temporary next to it, chunk by chunk, and
//! renamed over the path with the last chunk: a reader never sees half a
//! file, and an abandoned copy leaves only the temporary.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kiln_agent_proto::{
    decode_bytes, encode_bytes, error, FileFailedParameters, FileInfo, FileKind, FileLocation,
    ListDirectoryReply, MakeDirectoryRequest, MakeSymlinkRequest, PathParameters, ReadFileReply,
    ReadFileRequest, StatPathReply, WriteFileRequest, LIMIT_FILE_READ_BYTES, MAX_DIRECTORY_ENTRIES,
    MAX_PATH_BYTES, MAX_WRITE_BYTES,
};
use serde_json::{json, Value};

use crate::params::InvalidParameter;

/// Suffix of the temporary a file is written to before its rename.
const TEMP_SUFFIX: &str = ".kiln-part";

/// Why a file call failed.
#[derive(Debug)]
pub enum FileError {
    /// A parameter is malformed.
    InvalidParameter(InvalidParameter),
    /// A system call failed on `path`.
    Io { path: String, error: io::Error },
    /// Any other failure on `path`.
    Failed { path: String, message: String },
}

impl From<InvalidParameter> for FileError {
    fn from(e: InvalidParameter) -> Self {
        Self::InvalidParameter(e)
    }
}

impl FileError {
    fn io(path: &str) -> impl FnOnce(io::Error) -> Self + '_ {
        move |error| Self::Io {
            path: path.to_owned(),
            error,
        }
    }

    /// The error's varlink name and parameters.
    pub fn reply(&self) -> (&'static str, Value) {
        match self {
            Self::InvalidParameter(p) => (error::INVALID_PARAMETER, json!({ "parameter": p.0 })),
            Self::Io { path, error } => {
                let name = match error.raw_os_error() {
                    Some(libc::ENOENT) => error::NO_SUCH_FILE,
                    Some(libc::EACCES | libc::EPERM | libc::EROFS) => error::PERMISSION_DENIED,
                    Some(libc::ENOTDIR) => error::NOT_A_DIRECTORY,
                    Some(libc::EISDIR) => error::IS_A_DIRECTORY,
                    _ => {
                        return (
                            error::FILE_FAILED,
                            json!(FileFailedParameters {
                                path: path.clone(),
                                message: error.to_string(),
                            }),
                        )
                    }
                };
                (name, json!(PathParameters { path: path.clone() }))
            }
            Self::Failed { path, message } => (
                error::FILE_FAILED,
                json!(FileFailedParameters {
                    path: path.clone(),
                    message: message.clone(),
                }),
            ),
        }
    }
}

/// A checked location: the root to resolve in and the path below it.
#[derive(Debug)]
pub struct Target {
    root: PathBuf,
    path: String,
}

impl Target {
    /// `at.path` below `root` (`/`, or a container's `/proc/<pid>/root`).
    pub fn new(root: PathBuf, at: &FileLocation) -> Result<Self, InvalidParameter> {
        let path = &at.path;
        if !path.starts_with('/') || path.len() > MAX_PATH_BYTES || path.contains('\0') {
            return Err(InvalidParameter::new("path"));
        }
        Ok(Self {
            root,
            path: path.clone(),
        })
    }

    /// The parent directory (opened) and the last component. The root
    /// itself has no parent: refused.
    fn parent(&self) -> Result<(OwnedFd, CString), FileError> {
        let trimmed = self.path.trim_end_matches('/');
        let (dir, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
        if name.is_empty() || name == "." || name == ".." {
            return Err(InvalidParameter::new("path").into());
        }
        let dir = if dir.is_empty() { "/" } else { dir };
        let dirfd = self.open(dir, libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
        let name = CString::new(name).map_err(|_| InvalidParameter::new("path"))?;
        Ok((dirfd, name))
    }

    /// `openat2` of `path` (absolute) below the root.
    fn open(&self, path: &str, flags: libc::c_int, mode: u32) -> Result<OwnedFd, FileError> {
        let root = File::open(&self.root).map_err(FileError::io(&self.path))?;
        let relative = CString::new(path.trim_start_matches('/').to_owned())
            .map_err(|_| InvalidParameter::new("path"))?;
        let relative = if relative.as_bytes().is_empty() {
            CString::from(c".")
        } else {
            relative
        };
        openat2(&root, &relative, flags | libc::O_CLOEXEC, mode).map_err(FileError::io(&self.path))
    }
}

fn openat2(
    dir: &impl AsRawFd,
    path: &CString,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is a valid value of it.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: path is a valid C string, how a valid open_how of the size
    // passed; the kernel returns a new descriptor or an error.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            std::ptr::from_ref(&how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn temp_name(name: &CString) -> CString {
    let mut bytes = b".".to_vec();
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(TEMP_SUFFIX.as_bytes());
    CString::new(bytes).unwrap_or_else(|_| CString::from(c".kiln-part"))
}

/// `WriteFile`.
pub fn write_file(target: &Target, req: &WriteFileRequest) -> Result<(), FileError> {
    let data = decode_bytes(&req.data).ok_or_else(|| InvalidParameter::new("data"))?;
    if data.len() > MAX_WRITE_BYTES {
        return Err(InvalidParameter::new("data").into());
    }
    let mode = req.mode.unwrap_or(0o644);
    if mode > 0o7777 {
        return Err(InvalidParameter::new("mode").into());
    }
    let (dir, name) = target.parent()?;
    let temp = temp_name(&name);
    let path = target.path.as_str();
    let flags = if req.offset == 0 {
        libc::O_CREAT | libc::O_TRUNC
    } else {
        0
    };
    // SAFETY: dir is open, temp a valid C string; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            temp.as_ptr(),
            flags | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })
    .map_err(|e| {
        if req.offset != 0 && e.raw_os_error() == Some(libc::ENOENT) {
            FileError::Failed {
                path: path.to_owned(),
                message: "no copy in progress: the first chunk has offset 0".into(),
            }
        } else {
            FileError::io(path)(e)
        }
    })?;
    // SAFETY: openat returned a fresh descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    let size = file.metadata().map_err(FileError::io(path))?.len();
    if size != req.offset {
        return Err(FileError::Failed {
            path: path.to_owned(),
            message: format!(
                "chunk at offset {} but {size} bytes written so far",
                req.offset
            ),
        });
    }
    file.write_all_at(&data, req.offset)
        .map_err(FileError::io(path))?;
    if !req.last {
        return Ok(());
    }
    // SAFETY: fchown/fchmod on an open descriptor.
    cvt(unsafe { libc::fchown(file.as_raw_fd(), req.uid.unwrap_or(0), req.gid.unwrap_or(0)) })
        .map_err(FileError::io(path))?;
    // After chown, which clears set-id bits.
    // SAFETY: as above.
    cvt(unsafe { libc::fchmod(file.as_raw_fd(), mode) }).map_err(FileError::io(path))?;
    drop(file);
    // SAFETY: both names are valid C strings relative to the open dir.
    cvt(unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            temp.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
        )
    })
    .map_err(FileError::io(path))?;
    Ok(())
}

/// `ReadFile`.
pub fn read_file(target: &Target, req: &ReadFileRequest) -> Result<ReadFileReply, FileError> {
    if req.max_bytes > LIMIT_FILE_READ_BYTES {
        return Err(InvalidParameter::new("maxBytes").into());
    }
    let path = target.path.as_str();
    let (dir, name) = target.parent()?;
    // SAFETY: dir is open, name a valid C string; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })
    .map_err(FileError::io(path))?;
    // SAFETY: openat returned a fresh descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(FileError::io(path))?;
    if meta.is_dir() {
        return Err(FileError::io(path)(io::Error::from_raw_os_error(
            libc::EISDIR,
        )));
    }
    if !meta.is_file() {
        return Err(FileError::Failed {
            path: path.to_owned(),
            message: "not a regular file".into(),
        });
    }
    let want = usize::try_from(req.max_bytes).unwrap_or(0);
    let mut buf =
        vec![
            0u8;
            want.min(usize::try_from(meta.len().saturating_sub(req.offset)).unwrap_or(usize::MAX))
        ];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(
            buf.get_mut(filled..).unwrap_or_default(),
            req.offset + filled as u64,
        ) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileError::io(path)(e)),
        }
    }
    buf.truncate(filled);
    Ok(ReadFileReply {
        data: encode_bytes(&buf),
        size: meta.len(),
    })
}

/// `MakeDirectory`.
pub fn make_directory(target: &Target, req: &MakeDirectoryRequest) -> Result<(), FileError> {
    let mode = req.mode.unwrap_or(0o755);
    if mode > 0o7777 {
        return Err(InvalidParameter::new("mode").into());
    }
    let path = target.path.as_str();
    let (dir, name) = target.parent()?;
    // SAFETY: dir is open, name a valid C string.
    if let Err(e) = cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }) {
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(FileError::io(path)(e));
        }
    }
    // SAFETY: as above; O_NOFOLLOW: an existing symlink is not a directory.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
    .map_err(|e| {
        let e = if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::from_raw_os_error(libc::ENOTDIR)
        } else {
            e
        };
        FileError::io(path)(e)
    })?;
    // SAFETY: openat returned a fresh descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: fchown/fchmod on an open descriptor.
    cvt(unsafe { libc::fchown(file.as_raw_fd(), req.uid.unwrap_or(0), req.gid.unwrap_or(0)) })
        .map_err(FileError::io(path))?;
    // SAFETY: as above.
    cvt(unsafe { libc::fchmod(file.as_raw_fd(), mode) }).map_err(FileError::io(path))?;
    Ok(())
}

/// `MakeSymlink`: replaces whatever non-directory is there.
pub fn make_symlink(target: &Target, req: &MakeSymlinkRequest) -> Result<(), FileError> {
    if req.target.is_empty() || req.target.len() > MAX_PATH_BYTES {
        return Err(InvalidParameter::new("target").into());
    }
    let link_target =
        CString::new(req.target.clone()).map_err(|_| InvalidParameter::new("target"))?;
    let path = target.path.as_str();
    let (dir, name) = target.parent()?;
    // SAFETY: dir is open, names valid C strings. A missing entry is fine.
    let _ = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    // SAFETY: as above.
    cvt(unsafe { libc::symlinkat(link_target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
        .map_err(FileError::io(path))?;
    Ok(())
}

/// `StatPath`: the entry itself (a symlink is not followed).
pub fn stat_path(target: &Target) -> Result<StatPathReply, FileError> {
    if target.path.trim_end_matches('/').is_empty() {
        // The root: a directory by definition; stat it through its fd.
        let fd = target.open("/", libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
        let info = stat_at(&fd, c".", "/", &target.path)?;
        return Ok(StatPathReply { info });
    }
    let (dir, name) = target.parent()?;
    let display = name.to_string_lossy().into_owned();
    Ok(StatPathReply {
        info: stat_at(&dir, &name, &display, &target.path)?,
    })
}

/// `ListDirectory`.
pub fn list_directory(target: &Target) -> Result<ListDirectoryReply, FileError> {
    let path = target.path.as_str();
    let dir = target.open(path, libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
    let listing = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string());
    let mut names: Vec<CString> = Vec::new();
    for entry in std::fs::read_dir(&listing).map_err(FileError::io(path))? {
        let entry = entry.map_err(FileError::io(path))?;
        if names.len() >= MAX_DIRECTORY_ENTRIES {
            return Err(FileError::Failed {
                path: path.to_owned(),
                message: format!("more than {MAX_DIRECTORY_ENTRIES} entries"),
            });
        }
        if let Ok(name) = CString::new(entry.file_name().as_bytes()) {
            names.push(name);
        }
    }
    names.sort();
    let mut entries = Vec::with_capacity(names.len());
    for name in &names {
        let display = name.to_string_lossy().into_owned();
        match stat_at(&dir, name, &display, path) {
            Ok(info) => entries.push(info),
            // Removed between the listing and the stat.
            Err(FileError::Io { error, .. }) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ListDirectoryReply { entries })
}

fn stat_at(
    dir: &impl AsRawFd,
    name: &std::ffi::CStr,
    display: &str,
    path: &str,
) -> Result<FileInfo, FileError> {
    // SAFETY: stat is plain data; fstatat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: dir is open, name a valid C string, st writable.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map_err(FileError::io(path))?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::File,
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    };
    let target = if kind == FileKind::Symlink {
        let mut buf = vec![0u8; MAX_PATH_BYTES + 1];
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        usize::try_from(n).ok().map(|n| {
            OsStr::from_bytes(buf.get(..n).unwrap_or_default())
                .to_string_lossy()
                .into_owned()
        })
    } else {
        None
    };
    Ok(FileInfo {
        name: display.to_owned(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(root: &Path, path: &str) -> Target {
        Target::new(
            root.to_path_buf(),
            &FileLocation {
                path: path.to_owned(),
                container: None,
            },
        )
        .unwrap()
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kiln-files-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ids() -> (u32, u32) {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        unsafe { (libc::getuid(), libc::getgid()) }
    }

    fn write(t: &Target, offset: u64, data: &[u8], last: bool) -> Result<(), FileError> {
        write_file(
            t,
            &WriteFileRequest {
                offset,
                data: encode_bytes(data),
                last,
                mode: Some(0o640),
                uid: Some(ids().0),
                gid: Some(ids().1),
                ..WriteFileRequest::default()
            },
        )
    }

    #[test]
    fn a_file_is_written_in_chunks_then_renamed() {
        let root = scratch();
        let t = target(&root, "/f.bin");
        write(&t, 0, b"hello ", false).unwrap();
        assert!(
            !root.join("f.bin").exists(),
            "visible before the last chunk"
        );
        write(&t, 6, b"world", true).unwrap();
        assert_eq!(std::fs::read(root.join("f.bin")).unwrap(), b"hello world");
        let read = read_file(
            &t,
            &ReadFileRequest {
                offset: 6,
                max_bytes: 100,
                ..ReadFileRequest::default()
            },
        )
        .unwrap();
        assert_eq!(decode_bytes(&read.data).unwrap(), b"world");
        assert_eq!(read.size, 11);
        let info = stat_path(&t).unwrap().info;
        assert_eq!(
            (info.kind, info.mode, info.size),
            (FileKind::File, 0o640, 11)
        );
    }

    #[test]
    fn a_chunk_at_the_wrong_offset_is_refused() {
        let root = scratch();
        let t = target(&root, "/f");
        write(&t, 0, b"abc", false).unwrap();
        let (name, _) = write(&t, 10, b"x", true).unwrap_err().reply();
        assert_eq!(name, error::FILE_FAILED);
    }

    #[test]
    fn paths_cannot_leave_the_root() {
        let root = scratch();
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("d/escape")).unwrap();
        // Resolved inside the root, /etc is root/etc, which does not exist.
        let (name, _) = list_directory(&target(&root, "/d/escape"))
            .unwrap_err()
            .reply();
        assert_eq!(name, error::NO_SUCH_FILE);
        let (name, _) = read_file(
            &target(&root, "/../../etc/passwd"),
            &ReadFileRequest {
                max_bytes: 10,
                ..ReadFileRequest::default()
            },
        )
        .unwrap_err()
        .reply();
        assert_eq!(name, error::NO_SUCH_FILE);
    }

    #[test]
    fn directories_and_symlinks_are_made_and_listed() {
        let root = scratch();
        make_directory(
            &target(&root, "/sub"),
            &MakeDirectoryRequest {
                mode: Some(0o750),
                uid: Some(ids().0),
                gid: Some(ids().1),
                ..MakeDirectoryRequest::default()
            },
        )
        .unwrap();
        make_symlink(
            &target(&root, "/sub/link"),
            &MakeSymlinkRequest {
                target: "../nowhere".into(),
                ..MakeSymlinkRequest::default()
            },
        )
        .unwrap();
        let listing = list_directory(&target(&root, "/")).unwrap();
        let sub = listing.entries.iter().find(|e| e.name == "sub").unwrap();
        assert_eq!((sub.kind, sub.mode), (FileKind::Directory, 0o750));
        let inner = list_directory(&target(&root, "/sub")).unwrap();
        assert_eq!(inner.entries[0].target.as_deref(), Some("../nowhere"));
        let (name, _) = read_file(
            &target(&root, "/sub"),
            &ReadFileRequest {
                max_bytes: 1,
                ..ReadFileRequest::default()
            },
        )
        .unwrap_err()
        .reply();
        assert_eq!(name, error::IS_A_DIRECTORY);
    }

    #[test]
    fn bad_paths_are_invalid_parameters() {
        for path in ["relative", "", "/a\0b"] {
            assert!(Target::new(
                PathBuf::from("/"),
                &FileLocation {
                    path: path.into(),
                    container: None
                }
            )
            .is_err());
        }
        let root = scratch();
        assert!(matches!(
            write(&target(&root, "/"), 0, b"", true),
            Err(FileError::InvalidParameter(_))
        ));
    }
}
