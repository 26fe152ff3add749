//! Wake-ups when render nodes come, go or change.
//!
//! [`GpuWatcher`] puts inotify watches on `<dev>/dri` and
//! `<sysfs>/class/drm`, and on their parents so that the directories
//! appearing later (the first GPU driver loaded) are picked up. It only
//! says *that* something changed; the engine then rescans (a scan is a few
//! dozen small reads) and reconciles.
//!
//! What fires on a real host: `/dev` is devtmpfs, which reports the kernel
//! creating and removing `/dev/dri/renderD*` and attribute changes (udev
//! setting the mode, logind or [`crate::grant`] editing the ACL), so
//! hotplug and access changes are seen there. sysfs (kernfs) does not
//! report new or removed entries to inotify; its watch matters for the
//! fabricated trees of tests and costs nothing otherwise. A queue overflow
//! counts as a change.
//!
//! Use it blocking ([`GpuWatcher::wait`]) or from tokio
//! ([`GpuWatcher::changed`]); both drain every pending event.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::inventory::is_render_name;

/// Watcher errors.
#[derive(Debug, Error)]
pub enum WatchError {
    /// inotify could not be set up (`fs.inotify.max_user_instances`?).
    #[error("cannot create an inotify instance")]
    Init(#[source] io::Error),
    /// A watch could not be added (`fs.inotify.max_user_watches`?).
    #[error("cannot watch {path:?}")]
    AddWatch {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading events failed.
    #[error("cannot read inotify events")]
    Read(#[source] io::Error),
    /// Registering with the tokio reactor failed (no runtime?).
    #[error("cannot register the inotify descriptor with tokio")]
    Register(#[source] io::Error),
}

const DIR_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;
const PARENT_EVENTS: u32 =
    libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO | libc::IN_ONLYDIR;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The watched directory itself.
    Dir(usize),
    /// Its parent, for the directory appearing or going.
    Parent(usize),
}

#[derive(Debug)]
struct Target {
    dir: PathBuf,
    events: u32,
    wd: Option<i32>,
}

#[derive(Debug)]
struct Inner {
    fd: OwnedFd,
    targets: Vec<Target>,
    roles: HashMap<i32, Vec<Role>>,
}

/// Tells when `<dev>/dri` or `<sysfs>/class/drm` changed.
#[derive(Debug)]
pub struct GpuWatcher {
    // Declared first so it is dropped (deregistered) before the fd closes.
    reactor: Option<AsyncFd<RawFd>>,
    inner: Inner,
}

impl GpuWatcher {
    /// Watch `<sysfs_root>/class/drm` and `<dev_root>/dri`. Either may be
    /// missing now; it is watched once it appears (as long as its parent
    /// exists).
    pub fn new(sysfs_root: &Path, dev_root: &Path) -> Result<Self, WatchError> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(WatchError::Init(io::Error::last_os_error()));
        }
        // SAFETY: fd is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut inner = Inner {
            fd,
            targets: vec![
                Target {
                    dir: dev_root.join("dri"),
                    // Attribute changes too: mode and ACL edits of the nodes.
                    events: DIR_EVENTS | libc::IN_ATTRIB,
                    wd: None,
                },
                Target {
                    dir: sysfs_root.join("class/drm"),
                    events: DIR_EVENTS,
                    wd: None,
                },
            ],
            roles: HashMap::new(),
        };
        for i in 0..inner.targets.len() {
            if let Some(parent) = inner.targets[i].dir.parent().map(Path::to_path_buf) {
                match inner.add_watch(&parent, PARENT_EVENTS) {
                    Ok(wd) => inner.roles.entry(wd).or_default().push(Role::Parent(i)),
                    Err(WatchError::AddWatch { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        tracing::debug!(dir = %parent.display(), "not watching: missing");
                    }
                    Err(e) => return Err(e),
                }
            }
            inner.arm(i)?;
        }
        Ok(Self {
            reactor: None,
            inner,
        })
    }

    /// Read every pending event without blocking; true if any was about a
    /// render node (or the watched directories, or an overflow).
    pub fn read_changes(&mut self) -> Result<bool, WatchError> {
        self.inner.read_changes()
    }

    /// Block until a change (true) or until `timeout` passes (false);
    /// `None` waits forever.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, WatchError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if self.inner.read_changes()? {
                return Ok(true);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.inner.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(WatchError::Read(err));
                }
            }
        }
    }

    /// Wait (in tokio) until a change. Must be called inside a tokio
    /// runtime with IO enabled.
    pub async fn changed(&mut self) -> Result<(), WatchError> {
        if self.reactor.is_none() {
            // Registering panics outside a runtime: say so as an error.
            tokio::runtime::Handle::try_current()
                .map_err(|e| WatchError::Register(io::Error::other(e)))?;
            // SAFETY: the descriptor stays open, and the same, for the
            // AsyncFd's whole life: `reactor` is dropped before `inner`
            // (field order) and `inner.fd` is never replaced.
            let afd = unsafe {
                AsyncFd::register_with_interest(
                    self.inner.fd.as_raw_fd(),
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| WatchError::Register(e.into_parts().1))?;
            self.reactor = Some(afd);
        }
        let Some(reactor) = self.reactor.as_ref() else {
            return Err(WatchError::Register(io::Error::other("no reactor")));
        };
        loop {
            let mut guard = reactor.readable().await.map_err(WatchError::Read)?;
            let changed = self.inner.read_changes()?;
            // read_changes read until EAGAIN: wait for new readiness.
            guard.clear_ready();
            if changed {
                return Ok(());
            }
        }
    }

    /// The directories watched now (for logs and tests).
    pub fn watched(&self) -> Vec<&Path> {
        self.inner
            .targets
            .iter()
            .filter(|t| t.wd.is_some())
            .map(|t| t.dir.as_path())
            .collect()
    }
}

impl AsFd for GpuWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for GpuWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

impl Inner {
    fn add_watch(&self, path: &Path, mask: u32) -> Result<i32, WatchError> {
        let err = |source| WatchError::AddWatch {
            path: path.to_path_buf(),
            source,
        };
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: valid fd and NUL-terminated path; result checked.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                cpath.as_ptr(),
                mask | libc::IN_MASK_ADD,
            )
        };
        if wd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(wd)
    }

    /// Watch target `i`'s directory if it exists and is not watched yet.
    fn arm(&mut self, i: usize) -> Result<(), WatchError> {
        if self.targets[i].wd.is_some() {
            return Ok(());
        }
        let dir = self.targets[i].dir.clone();
        match self.add_watch(&dir, self.targets[i].events) {
            Ok(wd) => {
                self.targets[i].wd = Some(wd);
                self.roles.entry(wd).or_default().push(Role::Dir(i));
                tracing::debug!(dir = %dir.display(), "watching");
                Ok(())
            }
            Err(WatchError::AddWatch { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn disarm(&mut self, i: usize) {
        if let Some(wd) = self.targets[i].wd.take() {
            if let Some(roles) = self.roles.get_mut(&wd) {
                roles.retain(|r| *r != Role::Dir(i));
                if roles.is_empty() {
                    self.roles.remove(&wd);
                }
            }
        }
    }

    fn read_changes(&mut self) -> Result<bool, WatchError> {
        let mut changed = false;
        // Room for many events; each is 16 bytes plus its padded name.
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => return Ok(changed),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(WatchError::Read(err)),
                }
            }
            let n = n.unsigned_abs();
            let mut off = 0;
            while off + 16 <= n {
                let word = |at: usize| {
                    let b = &buf[off + at..off + at + 4];
                    [b[0], b[1], b[2], b[3]]
                };
                let wd = i32::from_ne_bytes(word(0));
                let mask = u32::from_ne_bytes(word(4));
                let len = u32::from_ne_bytes(word(12)) as usize;
                let name_bytes = &buf[(off + 16).min(n)..(off + 16 + len).min(n)];
                let name_end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = OsStr::from_bytes(&name_bytes[..name_end]).to_os_string();
                off += 16 + len;
                changed |= self.handle(wd, mask, &name)?;
            }
        }
    }

    /// One event; true if it is a change the engine should rescan for.
    fn handle(&mut self, wd: i32, mask: u32, name: &OsStr) -> Result<bool, WatchError> {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            tracing::warn!("inotify queue overflowed; rescanning");
            return Ok(true);
        }
        let roles = self.roles.get(&wd).cloned().unwrap_or_default();
        let mut changed = false;
        for role in roles {
            match role {
                Role::Dir(i) => {
                    if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
                        self.disarm(i);
                        changed = true;
                    } else if name.to_str().is_some_and(is_render_name) {
                        changed = true;
                    }
                }
                Role::Parent(i) => {
                    let ours = self.targets[i].dir.file_name() == Some(name);
                    if ours {
                        if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                            self.arm(i)?;
                        } else {
                            self.disarm(i);
                        }
                        changed = true;
                    }
                }
            }
        }
        Ok(changed)
    }
}
