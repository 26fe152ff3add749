//! Thin, checked wrappers over the few Linux system calls the agent needs
//! that `std` does not offer. Every wrapper turns `-1`/`errno` into an
//! `io::Error`; none of them panics.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = cstring(fstype)?;
    let data = cstring(data)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

fn utsname_field(field: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `(release, nodename)` from `uname(2)`.
pub fn uname() -> (String, String) {
    // SAFETY: `utsname` is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return (String::new(), String::new());
    }
    (utsname_field(&uts.release), utsname_field(&uts.nodename))
}

/// Milliseconds since boot, suspend included (`CLOCK_BOOTTIME`).
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// `MODULE_INIT_COMPRESSED_FILE` (linux/module.h): the kernel decompresses.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// `finit_module(2)` with no parameters; `compressed` lets the kernel
/// decompress the file (`CONFIG_MODULE_DECOMPRESS`).
pub fn finit_module(fd: RawFd, compressed: bool) -> io::Result<()> {
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: `fd` is an open file descriptor; the params string is a valid
    // empty C string with static lifetime.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), flags) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `pidfd_open(2)`: a descriptor that polls readable once `pid` has exited.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: plain system call with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `kill(2)`; `pid` may be negative to address a process group.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call with integer arguments.
    cvt(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Reaps every exited child without blocking, telling `on_exit` about
/// each; returns how many were reaped.
///
/// Only called while no `Exec` child is being waited for, so it never steals
/// the status of a command the agent is running.
pub fn reap_children(mut on_exit: impl FnMut(libc::pid_t, ExitStatus)) -> usize {
    let mut reaped = 0;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        on_exit(pid, ExitStatus::from_raw(status));
        reaped += 1;
    }
}

/// `waitpid(pid, WNOHANG)`: the status of child `pid` if it has exited.
pub fn try_wait(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int.
    let ret = cvt(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok((ret == pid).then(|| ExitStatus::from_raw(status)))
}

/// `pidfd_send_signal(2)`: signals the process behind `pidfd` (never a
/// recycled pid).
pub fn pidfd_send_signal(pidfd: &impl AsRawFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call; no siginfo is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits up to `timeout` for the process behind `pidfd` to exit; true if
/// it has.
pub fn pidfd_wait(pidfd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut fds = [libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll(
            &mut fds,
            Some(deadline.saturating_duration_since(std::time::Instant::now())),
        )?;
        if fds[0].revents != 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// `umount2(2)`.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = path_cstring(target)?;
    // SAFETY: `target` is a valid NUL-terminated string.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `mknod(2)` of a block device node, mode 0600.
pub fn mknod_block(path: &Path, major: u32, minor: u32) -> io::Result<()> {
    let path = path_cstring(path)?;
    // SAFETY: `path` is a valid NUL-terminated string; makedev is pure.
    cvt(unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    })
    .map(drop)
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call with an integer argument.
    cvt(unsafe { libc::unshare(flags) }).map(drop)
}

/// `setns(2)` into the namespace behind `fd`.
pub fn setns(fd: &impl AsRawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call with integer arguments.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

/// Reads at most `max` bytes of the regular file `rel` inside the tree at
/// `root`, resolving `rel` and every symlink on the way as if `root` were
/// `/` (`openat2` with `RESOLVE_IN_ROOT`): an image's absolute symlinks
/// cannot lead outside it. `None` if the file does not exist or is not a
/// regular file; FIFOs and devices are never read.
pub fn read_in_root(root: &Path, rel: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;

    let root = std::fs::File::open(root)?;
    let rel = cstring(rel)?;
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `rel` is a valid C string and `how` a valid open_how whose
    // size is passed along.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => Ok(None),
            _ => Err(err),
        };
    }
    let fd = RawFd::try_from(ret)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut data = Vec::new();
    file.take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_to_end(&mut data)?;
    Ok(Some(data))
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Sets or clears `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: &impl AsRawFd, nonblocking: bool) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on an open descriptor has no memory effects.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL on an open descriptor has no memory effects.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// Asks for `SIGIO` to be sent to this process when `fd` changes state
/// (`F_SETOWN` + `O_ASYNC`).
pub fn set_async_owner(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: F_SETOWN on an open descriptor has no memory effects.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETOWN, pid) })?;
    // SAFETY: as above.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) }).map(drop)
}

/// `poll(2)`; an interrupted call counts as "nothing ready".
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout_ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: the pointer and count describe the caller's slice of pollfds.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(usize::try_from(ret).unwrap_or(0))
}

fn sigset_of(signal: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset right after.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal number is valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
    }
    set
}

/// Blocks `signal` for the calling thread (and threads it spawns later).
pub fn block_signal(signal: libc::c_int) -> io::Result<()> {
    let set = sigset_of(signal);
    // SAFETY: `set` is a valid sigset_t; the old mask is not requested.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits up to `timeout` for the blocked `signal`; true if it arrived.
pub fn wait_signal(signal: libc::c_int, timeout: Duration) -> bool {
    let set = sigset_of(signal);
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `ts` are valid for the duration of the call; no
    // siginfo is requested.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) >= 0 }
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() }
}

/// `reboot(2)` with `RB_POWER_OFF` or `RB_AUTOBOOT`. Returns only on failure.
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: plain system call; on success it does not return.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// `_IOW('R', 0x03, int[2])`: add entropy and credit it.
pub const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
pub const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `ioctl(fd, request, arg)` with a pointer (or null) argument.
pub fn ioctl_ptr(fd: &impl AsRawFd, request: libc::c_ulong, arg: *const u8) -> io::Result<()> {
    // SAFETY: the caller passes a request whose argument layout matches
    // `arg` (a valid buffer of the size the request encodes, or null for
    // requests without argument).
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) }).map(drop)
}

/// Replaces the process image with `path` (used to restart after a panic).
/// Returns only on failure.
pub fn exec_self(path: &std::ffi::CStr) {
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings
    // that outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ioc(dir: libc::c_ulong, ty: u8, nr: libc::c_ulong, size: libc::c_ulong) -> libc::c_ulong {
        (dir << 30) | (size << 16) | (libc::c_ulong::from(ty) << 8) | nr
    }

    #[test]
    fn random_ioctl_numbers_match_linux_uapi() {
        assert_eq!(RNDADDENTROPY, ioc(1, b'R', 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, b'R', 0x07, 0));
    }

    #[test]
    fn reads_files_inside_a_root_only() {
        let dir = std::env::temp_dir().join(format!("kiln-agent-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("write");
        // An absolute symlink resolves inside the root, not on the host.
        std::os::unix::fs::symlink("/etc/passwd", dir.join("etc/link")).expect("symlink");
        std::os::unix::fs::symlink("/../../../../etc/hostname", dir.join("etc/escape"))
            .expect("symlink");
        let read = |rel: &str| read_in_root(&dir, rel, 1024).expect("read");
        assert_eq!(
            read("etc/passwd").as_deref(),
            Some(&b"root:x:0:0::/root:/bin/sh\n"[..])
        );
        assert_eq!(read("/etc/link"), read("etc/passwd"));
        assert_eq!(read("etc/escape"), None);
        assert_eq!(read("etc"), None, "a directory is not read");
        assert_eq!(read("missing"), None);
        assert_eq!(
            read_in_root(&dir, "etc/passwd", 4)
                .expect("read")
                .as_deref(),
            Some(&b"root"[..])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn boottime_is_monotonic() {
        let a = boottime_ms();
        let b = boottime_ms();
        assert!(a > 0 && b >= a);
    }
}
