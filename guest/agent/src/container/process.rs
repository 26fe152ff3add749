//! Starting a container's process in new namespaces, and entering a
//! running container for `Exec`.
//!
//! Both use `std::process::Command` with a `pre_exec` hook that does the
//! namespace work in the forked child and then calls `execve` itself, so
//! an exec failure (`ENOEXEC` for a binary of another architecture) comes
//! back through std's error pipe as the `spawn` error, never as a hang.
//! Everything the child needs is built before the fork: after it only
//! system calls run (no allocation, no locks; the agent has threads).
//!
//! PID namespaces apply to the *children* of the caller, so the parent
//! thread moves its `pid_for_children` into the new (or the container's)
//! namespace around `spawn` and back right after: the forked child is then
//! PID 1 of a new namespace, or a member of the container's.
//!
//! The agent's root is the initramfs (rootfs), which `pivot_root` refuses
//! to move (it has no parent mount). The child therefore does what
//! `switch_root` does: it moves the overlay onto `/` and `chroot`s into it.
//! Every path that reaches rootfs' root dentry crosses into the overlay
//! mounted on it, so the initramfs stays out of reach, and a `setns` into
//! the container's mount namespace also lands on the overlay. The agent's
//! own mounts (`/run` with every other container's layers, `/proc`, `/sys`,
//! `/dev`, `/tmp`) are detached from the child's namespace through a
//! descriptor of the old root, so the container holds no reference to
//! another container's disks.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::spec::DEFAULT_PATH;
use super::user::Credentials;
use crate::{log, sys};

/// Most `PATH` entries tried for a program without `/`.
const MAX_PATH_ENTRIES: usize = 64;
/// The agent's mounts, as seen from its root, detached in a new container.
const AGENT_MOUNTS: [&CStr; 5] = [c"run", c"proc", c"sys", c"dev", c"tmp"];

fn cstring(s: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

/// `execve` arguments, built before the fork.
#[derive(Debug)]
pub struct ExecImage {
    /// `args[0]` as given, for messages.
    pub program: String,
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into the heap buffers of the CStrings the
// same struct owns; those are never mutated and do not move when the
// struct does, so sharing or sending the struct shares only immutable data.
unsafe impl Send for ExecImage {}
// SAFETY: as above.
unsafe impl Sync for ExecImage {}

impl ExecImage {
    /// `args` (non-empty) with environment `env`; a program without `/` is
    /// looked up in `env`'s `PATH` (or [`DEFAULT_PATH`]).
    pub fn new(args: &[String], env: &[(String, String)]) -> io::Result<Self> {
        let program = args
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program"))?
            .clone();
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        let candidates = if program.contains('/') {
            vec![cstring(program.as_str())?]
        } else {
            path.split(':')
                .filter(|dir| !dir.is_empty())
                .take(MAX_PATH_ENTRIES)
                .map(|dir| cstring(format!("{}/{program}", dir.trim_end_matches('/'))))
                .collect::<io::Result<_>>()?
        };
        let argv: Vec<CString> = args
            .iter()
            .map(|a| cstring(a.as_str()))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}")))
            .collect::<io::Result<_>>()?;
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|e| e.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        Ok(Self {
            program,
            candidates,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
        })
    }

    /// In the child: `execve` each candidate in turn. Returns only on
    /// failure, with the errno that matters (the first one that is not
    /// "not here", else `EACCES` if some candidate was not executable,
    /// else `ENOENT`).
    fn exec(&self) -> libc::c_int {
        let mut denied = false;
        for path in &self.candidates {
            // SAFETY: all three arguments are valid NUL-terminated strings
            // or NULL-terminated arrays of them, owned by `self`.
            unsafe {
                libc::execve(
                    path.as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                )
            };
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                other => return other,
            }
        }
        if denied {
            libc::EACCES
        } else {
            libc::ENOENT
        }
    }
}

fn errno() -> libc::c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Credentials in the form the child applies them.
#[derive(Debug, Clone)]
pub struct Creds {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl From<&Credentials> for Creds {
    fn from(c: &Credentials) -> Self {
        Self {
            uid: c.uid,
            gid: c.gid,
            groups: c.groups.clone(),
        }
    }
}

impl Creds {
    /// In the child: groups, gid, then uid. Raw system calls: glibc's
    /// wrappers would try to change every thread of the (copied) process.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: the pointer and count describe `self.groups`.
        let ret =
            unsafe { libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) };
        check(ret)?;
        // SAFETY: plain system calls with integer arguments.
        check(unsafe { libc::syscall(libc::SYS_setgid, self.gid) })?;
        // SAFETY: as above.
        check(unsafe { libc::syscall(libc::SYS_setuid, self.uid) })?;
        Ok(())
    }
}

fn check<T: Into<i64>>(ret: T) -> io::Result<()> {
    if ret.into() < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One step of preparing the new root, run in the child before it switches
/// to it (paths are absolute in the agent's tree).
#[derive(Debug)]
pub enum RootStep {
    /// `mount(source, target, fstype, flags, data)`.
    Mount {
        /// Source.
        source: CString,
        /// Mount point.
        target: CString,
        /// File system type.
        fstype: CString,
        /// `MS_*` flags.
        flags: libc::c_ulong,
        /// Options.
        data: CString,
    },
    /// A character device node, mode 0666.
    CharDevice {
        /// Path.
        path: CString,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A directory (an existing one is fine).
    Dir {
        /// Path.
        path: CString,
        /// Mode.
        mode: libc::mode_t,
    },
    /// A symlink `path -> target`.
    Symlink {
        /// Where the link points.
        target: CString,
        /// The link.
        path: CString,
    },
}

/// The steps that give `root` its `/proc`, minimal `/dev` and read-only
/// `/sys`. The three directories must exist (and not be symlinks) in the
/// overlay already.
pub fn root_steps(root: &Path) -> io::Result<Vec<RootStep>> {
    let at = |rel: &str| -> io::Result<CString> {
        let mut bytes = root.as_os_str().as_bytes().to_vec();
        bytes.push(b'/');
        bytes.extend_from_slice(rel.as_bytes());
        cstring(bytes)
    };
    let mount = |source: &str, rel: &str, fstype: &str, flags: libc::c_ulong, data: &str| {
        Ok::<_, io::Error>(RootStep::Mount {
            source: cstring(source)?,
            target: at(rel)?,
            fstype: cstring(fstype)?,
            flags,
            data: cstring(data)?,
        })
    };
    let mut steps = vec![
        mount(
            "proc",
            "proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        )?,
        mount(
            "tmpfs",
            "dev",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_STRICTATIME,
            "mode=0755,size=64k",
        )?,
    ];
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        steps.push(RootStep::CharDevice {
            path: at(&format!("dev/{name}"))?,
            major,
            minor,
        });
    }
    steps.push(RootStep::Dir {
        path: at("dev/pts")?,
        mode: 0o755,
    });
    steps.push(RootStep::Dir {
        path: at("dev/shm")?,
        mode: 0o1777,
    });
    steps.push(mount(
        "devpts",
        "dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?);
    steps.push(mount(
        "shm",
        "dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777,size=65536k",
    )?);
    for (target, name) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        steps.push(RootStep::Symlink {
            target: cstring(target)?,
            path: at(&format!("dev/{name}"))?,
        });
    }
    steps.push(mount(
        "sysfs",
        "sys",
        "sysfs",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?);
    Ok(steps)
}

impl RootStep {
    fn run(&self) -> io::Result<()> {
        match self {
            RootStep::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                // SAFETY: all pointers are valid NUL-terminated strings.
                check(unsafe {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        fstype.as_ptr(),
                        *flags,
                        data.as_ptr().cast(),
                    )
                })
            }
            RootStep::CharDevice { path, major, minor } => {
                // SAFETY: `path` is a valid C string; makedev is pure.
                check(unsafe {
                    libc::mknod(
                        path.as_ptr(),
                        libc::S_IFCHR | 0o666,
                        libc::makedev(*major, *minor),
                    )
                })
            }
            RootStep::Dir { path, mode } => {
                // SAFETY: `path` is a valid C string.
                match check(unsafe { libc::mkdir(path.as_ptr(), *mode) }) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    other => other,
                }
            }
            RootStep::Symlink { target, path } => {
                // SAFETY: both are valid C strings.
                check(unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) })
            }
        }
    }
}

/// Where starting a container's process failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Creating its namespaces or session.
    Namespaces,
    /// Mounting /proc, /dev or /sys in its root.
    Mounts,
    /// Switching to its root.
    Root,
    /// Setting its hostname.
    Hostname,
    /// Opening /dev/null as its stdin.
    Stdin,
    /// Creating or entering its working directory.
    Cwd,
    /// Setting its user and groups.
    User,
    /// Executing the program.
    Exec,
    /// In the agent, before or around the fork.
    Spawn,
}

impl Stage {
    const ALL: [Stage; 9] = [
        Stage::Namespaces,
        Stage::Mounts,
        Stage::Root,
        Stage::Hostname,
        Stage::Stdin,
        Stage::Cwd,
        Stage::User,
        Stage::Exec,
        Stage::Spawn,
    ];

    fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|s| *s == self)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(u8::MAX)
    }

    fn from_code(code: u8) -> Self {
        Self::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or(Stage::Spawn)
    }

    /// What was being done, for messages.
    pub fn doing(self) -> &'static str {
        match self {
            Stage::Namespaces => "creating its namespaces",
            Stage::Mounts => "mounting /proc, /dev and /sys",
            Stage::Root => "switching to its root",
            Stage::Hostname => "setting its hostname",
            Stage::Stdin => "opening /dev/null",
            Stage::Cwd => "creating or entering its working directory",
            Stage::User => "setting its user and groups",
            Stage::Exec => "executing the program",
            Stage::Spawn => "forking",
        }
    }
}

/// Why a process could not be started.
#[derive(Debug)]
pub struct StartError {
    /// The step that failed.
    pub stage: Stage,
    /// Its error.
    pub error: io::Error,
}

/// What a new container's process is.
#[derive(Debug)]
pub struct Launch {
    /// The overlay, mounted.
    pub root: CString,
    /// Steps preparing it.
    pub steps: Vec<RootStep>,
    /// Hostname in the new UTS namespace.
    pub hostname: CString,
    /// The working directory and its parents, outermost first.
    pub cwd_chain: Vec<CString>,
    /// User and groups.
    pub creds: Creds,
    /// The program.
    pub image: ExecImage,
    /// stdin is the caller's (a pipe or a terminal), not `/dev/null`.
    pub keep_stdin: bool,
    /// stdin is a terminal that becomes the process's controlling one.
    pub controlling_terminal: bool,
}

/// The three standard descriptors of a new container's process.
#[derive(Debug)]
pub struct ProcessStdio {
    /// stdin.
    pub stdin: Stdio,
    /// stdout.
    pub stdout: Stdio,
    /// stderr.
    pub stderr: Stdio,
}

impl ProcessStdio {
    /// stdin `/dev/null` (the container's), stdout and stderr pipes for
    /// the log ring.
    pub fn logged() -> Self {
        Self {
            stdin: Stdio::null(),
            stdout: Stdio::piped(),
            stderr: Stdio::piped(),
        }
    }
}

impl Launch {
    /// `cwd` (absolute) with every ancestor, for `mkdir -p`.
    pub fn cwd_chain(cwd: &str) -> io::Result<Vec<CString>> {
        let mut chain = Vec::new();
        let mut prefix = String::new();
        for part in cwd.split('/').filter(|p| !p.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            chain.push(cstring(prefix.as_str())?);
        }
        if chain.is_empty() {
            chain.push(cstring("/")?);
        }
        Ok(chain)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: the kernel just returned these descriptors; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs `spawn` with this thread's children going to the PID namespace
/// `target` (`None`: a new one), then moves them back to our own.
fn in_pid_namespace<T>(
    target: Option<&File>,
    spawn: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let own = File::open("/proc/self/ns/pid")?;
    match target {
        Some(ns) => sys::setns(ns, libc::CLONE_NEWPID)?,
        None => sys::unshare(libc::CLONE_NEWPID)?,
    }
    let result = spawn();
    if let Err(e) = sys::setns(&own, libc::CLONE_NEWPID) {
        // Later Exec children would land in a container: say so loudly.
        log::error!("cannot return to the agent's PID namespace: {e}");
    }
    result
}

/// Starts the process of a new container on `stdio`.
pub fn start(launch: Launch, stdio: ProcessStdio) -> Result<Child, StartError> {
    let spawn_error = |error| StartError {
        stage: Stage::Spawn,
        error,
    };
    let (stage_r, stage_w) = pipe().map_err(spawn_error)?;
    let mut cmd = Command::new(&launch.image.program);
    cmd.stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr);
    let stage_fd = stage_w.as_raw_fd();
    // SAFETY: the hook only makes system calls on data built before the
    // fork (see `container_child`); it does not allocate or take locks.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &stage_w;
            container_child(&launch, stage_fd)
        })
    };
    let spawned = in_pid_namespace(None, || cmd.spawn());
    drop(cmd);
    spawned.map_err(|error| StartError {
        stage: read_stage(&stage_r),
        error,
    })
}

fn read_stage(fd: &OwnedFd) -> Stage {
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into `byte`.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
    if n == 1 {
        Stage::from_code(byte)
    } else {
        Stage::Spawn
    }
}

/// Reports `stage` on the pipe and returns the pending error.
fn failed(stage: Stage, stage_fd: RawFd, error: io::Error) -> io::Error {
    let code = [stage.code()];
    // SAFETY: writes one byte from `code`; a failure changes nothing.
    unsafe { libc::write(stage_fd, code.as_ptr().cast(), 1) };
    error
}

/// The forked child of [`start`]: new namespaces, the root, the process.
fn container_child(l: &Launch, stage_fd: RawFd) -> io::Result<()> {
    let at = |stage: Stage| move |e: io::Error| failed(stage, stage_fd, e);
    // Device nodes and /dev/shm get exactly their modes; the process gets
    // the usual 022 before it runs.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    // SAFETY: plain system calls.
    check(unsafe { libc::setsid() }).map_err(at(Stage::Namespaces))?;
    if l.controlling_terminal {
        // SAFETY: an ioctl on descriptor 0, the terminal's slave.
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map_err(at(Stage::Stdin))?;
    }
    sys::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
        .map_err(at(Stage::Namespaces))?;
    // SAFETY: valid C strings or NULL where the kernel accepts NULL.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map_err(at(Stage::Mounts))?;
    // SAFETY: opening "/" with constant flags.
    let old_root = unsafe {
        libc::open(
            c"/".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(old_root).map_err(at(Stage::Root))?;
    for step in &l.steps {
        step.run().map_err(at(Stage::Mounts))?;
    }
    // switch_root: the overlay onto "/", then make it our root.
    // SAFETY: valid C strings or NULL where the kernel accepts NULL.
    unsafe {
        check(libc::chdir(l.root.as_ptr())).map_err(at(Stage::Root))?;
        check(libc::mount(
            l.root.as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        ))
        .map_err(at(Stage::Root))?;
        check(libc::chroot(c".".as_ptr())).map_err(at(Stage::Root))?;
        // The agent's mounts sit on rootfs' directories, under the overlay
        // now: reach them through the old root's descriptor.
        check(libc::fchdir(old_root)).map_err(at(Stage::Root))?;
        for name in AGENT_MOUNTS {
            libc::umount2(name.as_ptr(), libc::MNT_DETACH);
        }
        libc::close(old_root);
        check(libc::chdir(c"/".as_ptr())).map_err(at(Stage::Root))?;
        let hostname = l.hostname.as_bytes();
        check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))
            .map_err(at(Stage::Hostname))?;
        // stdin from the container's own /dev/null, not the agent's.
        if !l.keep_stdin {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            check(null).map_err(at(Stage::Stdin))?;
            if null != 0 {
                check(libc::dup2(null, 0)).map_err(at(Stage::Stdin))?;
                libc::close(null);
            }
        }
        libc::umask(0o022);
        for dir in &l.cwd_chain {
            libc::mkdir(dir.as_ptr(), 0o755);
        }
        if let Some(cwd) = l.cwd_chain.last() {
            check(libc::chdir(cwd.as_ptr())).map_err(at(Stage::Cwd))?;
        }
    }
    l.creds.apply().map_err(at(Stage::User))?;
    let errno = l.image.exec();
    Err(failed(
        Stage::Exec,
        stage_fd,
        io::Error::from_raw_os_error(errno),
    ))
}

/// A running container, entered by an `Exec` child.
#[derive(Debug)]
pub struct Enter {
    pid_ns: File,
    inside: EnterInside,
}

/// What the child of [`Enter::spawn`] needs.
#[derive(Debug)]
struct EnterInside {
    mnt_ns: File,
    uts_ns: File,
    ipc_ns: File,
    cwd: CString,
    creds: Creds,
    image: ExecImage,
}

impl Enter {
    /// Opens the namespaces of the container process `pid`.
    pub fn open(pid: u32, cwd: &str, creds: Creds, image: ExecImage) -> io::Result<Self> {
        let ns = |name: &str| File::open(format!("/proc/{pid}/ns/{name}"));
        Ok(Self {
            pid_ns: ns("pid")?,
            inside: EnterInside {
                mnt_ns: ns("mnt")?,
                uts_ns: ns("uts")?,
                ipc_ns: ns("ipc")?,
                cwd: cstring(cwd)?,
                creds,
                image,
            },
        })
    }

    /// Spawns `cmd` (stdio, process group already set) inside the
    /// container: its namespaces, root, working directory, user and
    /// program. The program `cmd` was created with is not used.
    pub fn spawn(self, cmd: &mut Command) -> io::Result<Child> {
        let Enter { pid_ns, inside } = self;
        // SAFETY: the hook only makes system calls on data built before
        // the fork; it does not allocate or take locks.
        unsafe { cmd.pre_exec(move || inside.enter()) };
        in_pid_namespace(Some(&pid_ns), || cmd.spawn())
    }
}

impl EnterInside {
    fn enter(&self) -> io::Result<()> {
        sys::setns(&self.uts_ns, libc::CLONE_NEWUTS)?;
        sys::setns(&self.ipc_ns, libc::CLONE_NEWIPC)?;
        // Also sets root and working directory to the container's root.
        sys::setns(&self.mnt_ns, libc::CLONE_NEWNS)?;
        // SAFETY: `cwd` is a valid C string.
        check(unsafe { libc::chdir(self.cwd.as_ptr()) })?;
        self.creds.apply()?;
        Err(io::Error::from_raw_os_error(self.image.exec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[CString]) -> Vec<&str> {
        v.iter().map(|c| c.to_str().expect("utf8")).collect()
    }

    #[test]
    fn looks_programs_up_in_path() {
        let env = vec![("PATH".to_owned(), "/usr/bin::/bin/".to_owned())];
        let image = ExecImage::new(&["sh".into(), "-c".into()], &env).expect("image");
        assert_eq!(strings(&image.candidates), ["/usr/bin/sh", "/bin/sh"]);
        assert_eq!(image.argv_ptrs.len(), 3);
        assert!(image.argv_ptrs.last().is_some_and(|p| p.is_null()));
        assert_eq!(image.envp_ptrs.len(), 2);
        let image = ExecImage::new(&["./run".into()], &env).expect("image");
        assert_eq!(strings(&image.candidates), ["./run"]);
        let image = ExecImage::new(&["true".into()], &[]).expect("image");
        assert_eq!(image.candidates.len(), 6, "the default PATH");
        assert!(ExecImage::new(&[], &[]).is_err());
    }

    #[test]
    fn cwd_chain_lists_every_parent() {
        let chain = Launch::cwd_chain("/srv//app/").expect("chain");
        assert_eq!(strings(&chain), ["/srv", "/srv/app"]);
        assert_eq!(strings(&Launch::cwd_chain("/").expect("chain")), ["/"]);
    }

    #[test]
    fn stage_codes_round_trip() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_code(stage.code()), stage);
        }
        assert_eq!(Stage::from_code(200), Stage::Spawn);
    }

    #[test]
    fn root_steps_stay_under_the_root() {
        let steps = root_steps(Path::new("/run/kiln/containers/3/rootfs")).expect("steps");
        for step in &steps {
            let path = match step {
                RootStep::Mount { target, .. } => target,
                RootStep::CharDevice { path, .. }
                | RootStep::Dir { path, .. }
                | RootStep::Symlink { path, .. } => path,
            };
            assert!(path
                .to_str()
                .expect("utf8")
                .starts_with("/run/kiln/containers/3/rootfs/"));
        }
        assert!(steps.len() > 10);
    }

    #[test]
    fn exec_of_a_missing_program_reports_enoent() {
        let image = ExecImage::new(
            &["kiln-no-such-program".into()],
            &[("PATH".into(), "/nonexistent-a:/nonexistent-b".into())],
        )
        .expect("image");
        assert_eq!(image.exec(), libc::ENOENT);
    }
}
