//! QEMU processes: launch, identify, watch, signal.
//!
//! QEMU is started in a session of its own (`setsid`), with its output in a
//! log file rather than a pipe (a pipe would SIGPIPE it once kilnd is gone),
//! so it outlives a `kill -9` of kilnd. We do not use `-daemonize`: its
//! fork and `setsid` happen after `-sandbox` is in force, and the sandbox's
//! `spawn=deny,elevateprivileges=deny` would refuse them. The spawned child
//! handle is dropped at once; tokio reaps it when it exits. Every process,
//! launched or re-adopted, is tracked through a pidfd, which reports its
//! exit at once and cannot signal a recycled pid.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::qemu::argv::{process_name, QemuLaunch};
use crate::qemu::GuestMemory;
use crate::qemu_user::{drop_privileges, give_to, Jail, QemuUser};

/// Process failures.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// The QEMU binary could not be executed.
    #[error("cannot run {binary}")]
    Exec {
        /// Binary.
        binary: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited while starting, with its own error message.
    #[error("QEMU refused to start: {message}")]
    QemuRefused {
        /// What QEMU printed on stderr.
        message: String,
    },
    /// pidfd_open failed (the process is already gone).
    #[error("process {pid} is gone")]
    Gone {
        /// Pid.
        pid: u32,
    },
    /// Every uid of the configured range is some VM's.
    #[error("no free uid for QEMU: all {count} of the range are in use")]
    NoFreeUser {
        /// The range's size.
        count: u32,
    },
    /// QEMU's unprivileged user could not be given its files.
    #[error("cannot give QEMU's user {uid} its files")]
    Files {
        /// The uid.
        uid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Signalling failed.
    #[error("cannot signal process {pid}")]
    Signal {
        /// Pid.
        pid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running QEMU, watched through its pidfd.
#[derive(Debug, Clone)]
pub struct VmProcess {
    /// Process id.
    pub pid: u32,
    pidfd: Arc<AsyncFd<OwnedFd>>,
}

impl VmProcess {
    /// Start QEMU in its own session; stdout and stderr go to `log`.
    /// `inherit` are descriptors QEMU gets at fixed numbers (a TAP as fd 3
    /// for `-netdev tap,fd=3`); kilnd's copies stay with the caller.
    /// Returns at once: the caller waits for QMP to learn it is up.
    pub fn launch(
        launch: &QemuLaunch,
        log: &Path,
        inherit: &[(BorrowedFd<'_>, RawFd)],
    ) -> Result<Self, ProcessError> {
        let argv = launch.argv();
        let binary = launch.binary.display().to_string();
        let exec_err = |source| ProcessError::Exec {
            binary: binary.clone(),
            source,
        };
        let log = std::fs::File::create(log).map_err(exec_err)?;
        if let Some(user) = &launch.user {
            give_files(user, launch).map_err(|source| ProcessError::Files {
                uid: user.uid,
                source,
            })?;
        }
        // Prepared before the fork: the child may not allocate.
        let drop_to: Option<(u32, Vec<libc::gid_t>)> =
            launch.user.as_ref().map(|u| (u.uid, u.groups.clone()));
        let no_huge_pages = !launch.transparent_huge_pages();
        let jail = match &launch.user {
            Some(user) if user.jailed => {
                Some(
                    jail_for(user, launch).map_err(|source| ProcessError::Files {
                        uid: user.uid,
                        source,
                    })?,
                )
            }
            _ => None,
        };
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            // kilnd's own malloc tuning (kilnd.service) is not QEMU's.
            .env_remove("GLIBC_TUNABLES")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(exec_err)?)
            .stderr(log)
            .kill_on_drop(false);
        let fds: Vec<(RawFd, RawFd)> = inherit
            .iter()
            .map(|(fd, target)| (fd.as_raw_fd(), *target))
            .collect();
        // SAFETY: the closure runs between fork and exec and only calls
        // setsid(2), dup2(2), fcntl(2), setgroups(2), setres[ug]id(2) and
        // prctl(2), which are async-signal-safe, on memory prepared before
        // the fork; the descriptors are borrowed from the caller and open
        // until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Kept across execve(2): QEMU's own madvise cannot undo it.
                if no_huge_pages && libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for &(src, dst) in &fds {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    let rc = if src == dst {
                        libc::fcntl(src, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(src, dst)
                    };
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                // Last: the descriptors above are opened by kilnd, as root.
                if let Some((uid, groups)) = &drop_to {
                    drop_privileges(*uid, groups)?;
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(exec_err)?;
        let pid = child.id().ok_or(ProcessError::Gone { pid: 0 })?;
        let process = Self::attach(pid);
        // Dropping the handle does not kill QEMU; tokio reaps it on exit.
        drop(child);
        process
    }

    /// Watch an existing process.
    pub fn attach(pid: u32) -> Result<Self, ProcessError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
        // no memory is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(ProcessError::Gone { pid });
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is an open fd that the AsyncFd owns from here on;
        // OwnedFd always returns that same fd from as_raw_fd().
        let pidfd =
            unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                .map_err(|_| ProcessError::Gone { pid })?;
        Ok(Self {
            pid,
            pidfd: Arc::new(pidfd),
        })
    }

    /// Resolves when the process has exited.
    pub async fn exited(&self) {
        // A pidfd becomes readable when the process exits (and stays so).
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    // Not our child: nothing to reap, readiness is the signal.
                    guard.retain_ready();
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// Whether it is still running (non-blocking).
    pub fn is_alive(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 0
    }

    /// Send `signal` through the pidfd (never hits a recycled pid).
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, a
        // null siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(()); // Already gone: the goal of every signal we send.
        }
        Err(ProcessError::Signal {
            pid: self.pid,
            source: err,
        })
    }

    /// SIGKILL.
    pub fn kill(&self) -> Result<(), ProcessError> {
        self.signal(libc::SIGKILL)
    }
}

/// Read a QEMU pid file.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a QEMU running VM `vm_id` (guards re-adoption against
/// recycled pids): its argv carries `-name kiln-<id>,…`.
pub fn is_qemu_of(pid: u32, vm_id: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = format!("{},process=", process_name(vm_id));
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.starts_with(wanted.as_bytes()))
}

/// The last `max` bytes of a file.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::with_capacity(max.min(len) as usize);
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Most bytes a VM's console log may hold before it is cut back: the
/// guest writes it (a hostile or looping guest without end) and it lives
/// in the runtime directory, which is RAM.
pub const CONSOLE_LOG_MAX: u64 = 1024 * 1024;
/// What stays of a console log that is cut back: its last bytes.
const CONSOLE_LOG_KEEP: u64 = 64 * 1024;

/// Cut a console log over [`CONSOLE_LOG_MAX`] back to its last
/// [`CONSOLE_LOG_KEEP`] bytes, after a marker line. QEMU appends to it
/// (`append=on`), so after the truncation its next write lands at the new
/// end; what it writes between the read and the truncation is lost, which
/// only a guest that floods its console sees. Returns whether it cut.
pub fn bound_console_log(path: &Path) -> std::io::Result<bool> {
    if std::fs::metadata(path)?.len() <= CONSOLE_LOG_MAX {
        return Ok(false);
    }
    let tail = read_tail(path, CONSOLE_LOG_KEEP)?;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(0)?;
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(b"\n[kiln: console log over 1 MiB, cut to its last 64 KiB]\n")?;
    file.write_all(&tail)?;
    Ok(true)
}

/// Last lines of a console log, for error messages.
pub fn console_tail(path: &Path) -> Option<String> {
    // Only the end is read: a guest decides how large the log is.
    let bytes = read_tail(path, 1024).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    (!tail.is_empty()).then_some(tail)
}

/// The view of the filesystem `launch`'s QEMU gets: its tmpfs root is
/// mounted on `<run dir>/root` (made here, empty) in its own namespace.
fn jail_for(user: &QemuUser, launch: &QemuLaunch) -> std::io::Result<Jail> {
    let run_dir = launch
        .qmp_socket
        .parent()
        .ok_or_else(|| std::io::Error::other("QMP socket without a directory"))?;
    let root = run_dir.join("root");
    match std::fs::create_dir(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let mut files = vec![launch.kernel.as_path(), launch.initrd.as_path()];
    if launch.binary.is_absolute() {
        files.push(launch.binary.as_path());
    }
    let devices: Vec<&Path> = user.devices.iter().map(PathBuf::as_path).collect();
    Jail::plan(&root, &user.tops, &files, &devices)
}

/// Everything `launch` opens by path made openable by `user`: its
/// run directory (where QEMU creates its sockets, pid file and console
/// log) and a template it builds become its own; a template it clones
/// and its read-only layers are shared read-only; its writable disks
/// become its own.
fn give_files(user: &QemuUser, launch: &QemuLaunch) -> std::io::Result<()> {
    if let Some(run_dir) = launch.qmp_socket.parent() {
        give_to(run_dir, user)?;
    }
    match &launch.memory {
        GuestMemory::Anonymous => {}
        GuestMemory::TemplateSource(ram) => {
            if let Some(dir) = ram.parent() {
                give_to(dir, user)?;
            }
        }
        GuestMemory::TemplateClone(ram) => {
            if let Some(dir) = ram.parent() {
                user.share(dir)?;
            }
        }
    }
    for disk in &launch.disks {
        user.open_disk(&disk.path, disk.writable)?;
    }
    // An OS image's kernel and its VM's initramfs, which kilnd made under
    // its state directory (the built-in guest's are readable by all
    // already). Never a caller's kernel or initrd: a request must not make
    // kilnd re-own a file it names.
    if launch.boot_files_are_kilnds {
        user.share(&launch.kernel)?;
        user.share(&launch.initrd)?;
    } else if launch.kernel_is_kilnds {
        user.share(&launch.kernel)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_log_is_cut_back_to_its_tail() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let mut text = vec![b'a'; CONSOLE_LOG_MAX as usize];
        text.extend_from_slice(b"\nlast line\n");
        std::fs::write(&path, &text).expect("write");
        assert!(bound_console_log(&path).expect("bound"));
        let len = std::fs::metadata(&path).expect("meta").len();
        assert!(len <= CONSOLE_LOG_KEEP + 100, "{len}");
        assert_eq!(
            console_tail(&path)
                .as_deref()
                .map(|t| t.ends_with("last line")),
            Some(true)
        );
        assert!(!bound_console_log(&path).expect("bound"), "small logs stay");
    }

    #[tokio::test]
    async fn pidfd_sees_exit_of_a_non_child() {
        // `sh -c 'sleep 30 & echo $!'` leaves a grandchild we did not spawn
        // directly, like a re-adopted QEMU.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .expect("sh");
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        let process = VmProcess::attach(pid).expect("attach");
        assert!(process.is_alive());
        assert!(!is_qemu_of(pid, "0123456789ab"));
        process.kill().expect("kill");
        tokio::time::timeout(std::time::Duration::from_secs(5), process.exited())
            .await
            .expect("exit seen");
        assert!(!process.is_alive());
        process.kill().expect("killing the dead is fine");
    }
}
