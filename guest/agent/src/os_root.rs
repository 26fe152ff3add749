//! Booting an OS image (`VMSpec.boot: "image"`): when the initramfs holds
//! [`OS_ROOT_CONFIG`], PID 1 mounts the image's layers and writable layer
//! as a container's root would be mounted, writes the environment to its
//! `/etc/environment`, moves `/dev`, `/proc` and `/sys` into it, and forks:
//!
//! - the child is the agent from then on: it enters the new root
//!   (`chroot`) and goes on to serve the host, beside the OS;
//! - PID 1 waits until the child is in, moves the new root over `/` (as
//!   `switch_root` does) and execs the image's init, which so gets PID 1.
//!
//! This runs before the agent starts any thread, so the child, a copy of a
//! one-thread process, is whole. Whatever fails, the VM keeps one agent
//! and says why on its console: a root that cannot be mounted or an init
//! that cannot be named leaves PID 1 the agent; an init that cannot be
//! run leaves the child the agent and PID 1 reaping.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use kiln_agent_proto::{ContainerInfo, StartContainerRequest, OS_ROOT_CONFIG};

use crate::{container, log};

/// The largest config read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest `/etc/environment` of an image that is kept and amended.
const MAX_ENVIRONMENT_BYTES: u64 = 64 << 10;
/// Mounts the init finds in place (the agent made them in the initramfs).
const MOVED_MOUNTS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// Set once this process is the agent inside an OS image's root: there is
/// no Kiln `/init` to re-execute after a panic (it would be the image's),
/// so the panic hook ends the agent instead (`main.rs`).
pub static IN_OS_ROOT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Enter `root` as the agent (see [`IN_OS_ROOT`]).
fn enter_as_agent(root: &Path) {
    match enter(root) {
        Ok(()) => IN_OS_ROOT.store(true, std::sync::atomic::Ordering::SeqCst),
        Err(e) => log::error!("entering the OS root: {e}"),
    }
}

/// Boot the OS image if this initramfs asks for one. Returns in the agent
/// (the child, or PID 1 when booting it failed) what became of it, for
/// `ContainerStatus("main")` ([`Containers::set_os_main`]): the container
/// the OS is, or why it does not run (also said on the console). `None`:
/// no OS image was asked for. Never returns in the process that becomes
/// the image's init.
///
/// [`Containers::set_os_main`]: crate::container::Containers::set_os_main
pub fn boot_if_asked() -> Option<Result<ContainerInfo, String>> {
    let failed = |reason: String| {
        log::error!("{reason}; serving without an OS");
        Some(Err(reason))
    };
    let config = match read_config() {
        Ok(Some(config)) => config,
        Ok(None) => return None,
        Err(e) => return failed(format!("{OS_ROOT_CONFIG}: {e}")),
    };
    let container::OsRoot {
        path: root,
        args,
        env,
        info,
    } = match container::mount_os_root(config) {
        Ok(mounted) => mounted,
        Err(e) => {
            let (name, detail) = e.reply();
            return failed(format!("mounting the OS image's root: {name} {detail}"));
        }
    };
    // Everything that can be refused is checked before anything moves:
    // from the first move on, the agent belongs in the new root.
    let init = match Init::new(&args, &env) {
        Ok(init) => init,
        Err(e) => return failed(format!("the OS image's init {args:?}: {e}")),
    };
    if let Err(e) = write_environment(&root, &env) {
        log::error!("writing /etc/environment: {e}");
    }
    for mount in MOVED_MOUNTS {
        let target = root.join(mount.trim_start_matches('/'));
        let moved =
            fs::create_dir_all(&target).and_then(|()| move_mount(Path::new(mount), &target));
        if let Err(e) = moved {
            log::error!("moving {mount} into the OS root: {e}");
        }
    }
    log::info!("handing PID 1 to the OS image's init {args:?}");
    Some(hand_over(&root, &init).map(|()| info))
}

fn read_config() -> io::Result<Option<StartContainerRequest>> {
    let file = match fs::File::open(OS_ROOT_CONFIG) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_CONFIG_BYTES), &mut bytes)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `/etc/environment` of the new root with `env` set in it: the image's
/// lines kept, a key `env` sets replaced in place, new keys appended.
fn write_environment(root: &Path, env: &[(String, String)]) -> io::Result<()> {
    let etc = root.join("etc");
    fs::create_dir_all(&etc)?;
    let path = etc.join("environment");
    // Never follow a link the image planted (it could point anywhere in
    // the agent's view); a non-file is replaced.
    let old = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() && m.len() <= MAX_ENVIRONMENT_BYTES => {
            fs::read_to_string(&path).unwrap_or_default()
        }
        Ok(_) => {
            fs::remove_file(&path)?;
            String::new()
        }
        Err(_) => String::new(),
    };
    fs::write(&path, amend_environment(&old, env))
}

/// `text` (an `/etc/environment`) with `env` set in it.
fn amend_environment(text: &str, env: &[(String, String)]) -> String {
    let key_of = |line: &str| -> Option<String> {
        let line = line
            .trim_start()
            .strip_prefix("export ")
            .unwrap_or(line.trim_start());
        line.split_once('=').map(|(k, _)| k.trim().to_owned())
    };
    let value_of = |key: &str| env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
    let mut out = String::new();
    let mut written = std::collections::BTreeSet::new();
    for line in text.lines() {
        match key_of(line).and_then(|k| value_of(&k).map(|v| (k, v))) {
            Some((key, value)) if written.insert(key.clone()) => {
                out.push_str(&format!("{key}=\"{}\"\n", quoted(value)));
            }
            Some(_) => {}
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (key, value) in env {
        if written.insert(key.clone()) {
            out.push_str(&format!(
                "{key}=\"{}\"\n",
                quoted(value_of(key).unwrap_or(value))
            ));
        }
    }
    out
}

/// A value inside double quotes, as pam_env and shells read it.
fn quoted(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// The init's argv and environment as C strings, made before the fork.
struct Init {
    args: Vec<CString>,
    env: Vec<CString>,
}

impl Init {
    fn new(args: &[String], env: &[(String, String)]) -> io::Result<Self> {
        let c =
            |s: String| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        if args.is_empty() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        Ok(Self {
            args: args.iter().cloned().map(c).collect::<io::Result<_>>()?,
            env: env
                .iter()
                .map(|(k, v)| c(format!("{k}={v}")))
                .collect::<io::Result<_>>()?,
        })
    }
}

/// Fork: the child enters `root` and returns (it is the agent) once PID 1
/// has exec'd the init, so the host never sees the agent before the OS
/// owns PID 1; PID 1 waits for the child to be in, makes `root` the root
/// and execs `init`. PID 1 never returns: should that fail, it writes why
/// into the pipe the child waits on, stays, reaping, and the child serves
/// on with that reason. Without a child (fork failed), PID 1 enters `root`
/// itself and returns to serve there, without an OS.
fn hand_over(root: &Path, init: &Init) -> Result<(), String> {
    let pipes = pipe().and_then(|entered| Ok((entered, pipe()?)));
    // `entered`: closed by the child once it is in the new root. `execd`:
    // closed by PID 1's exec (close-on-exec), or by PID 1 when it failed.
    // SAFETY: the agent has no other thread yet (see the module doc), so
    // the child is a whole copy of this process.
    let forked = pipes.and_then(|pipes| match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        pid => Ok((pid, pipes)),
    });
    match forked {
        Err(e) => {
            let reason = format!("forking the OS image's agent: {e}");
            log::error!("{reason}; serving without an OS");
            enter_as_agent(root);
            Err(reason)
        }
        Ok((0, ((entered_read, entered_write), (execd_read, execd_write)))) => {
            drop((entered_read, execd_write));
            enter_as_agent(root);
            drop(entered_write);
            // Nothing before the end: the exec closed it.
            match read_to_eof(execd_read) {
                reason if reason.is_empty() => Ok(()),
                reason => Err(reason),
            }
        }
        Ok((child, ((entered_read, entered_write), (execd_read, execd_write)))) => {
            drop((entered_write, execd_read));
            // EOF: the child entered (or died); either way go on.
            wait_for_eof(entered_read);
            log::info!("the agent goes on as pid {child}");
            let failed = match switch_root(root) {
                Ok(()) => exec(init),
                Err(e) => e,
            };
            let reason = format!("starting the OS image's init {:?}: {failed}", init.args[0]);
            log::error!("{reason}");
            let mut told = fs::File::from(execd_write);
            if let Err(e) = io::Write::write_all(&mut told, reason.as_bytes()) {
                log::error!("telling the agent: {e}");
            }
            drop(told);
            reap_forever()
        }
    }
}

/// Exec `init`; returns only its failure.
fn exec(init: &Init) -> io::Error {
    unblock_all_signals();
    let null_terminated = |strings: &[CString]| -> Vec<*const libc::c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect()
    };
    let (argv, envp) = (null_terminated(&init.args), null_terminated(&init.env));
    // SAFETY: NULL-terminated arrays of valid C strings that outlive the
    // call; execve returns only on failure.
    unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// What PID 1 does when it could not become the init: it must not exit
/// (the kernel would panic), and orphans are its to reap.
fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child with a valid status pointer.
        if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}

/// Read `fd` until its other end is closed everywhere: what came, as
/// text (at most 4 KiB).
fn read_to_eof(fd: OwnedFd) -> String {
    let mut text = Vec::new();
    let mut file = io::Read::take(fs::File::from(fd), 4096);
    if let Err(e) = io::Read::read_to_end(&mut file, &mut text) {
        log::error!("reading the init's outcome: {e}");
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Read `fd` until its other end is closed everywhere.
fn wait_for_eof(fd: OwnedFd) {
    let mut file = fs::File::from(fd);
    let mut byte = [0u8; 1];
    loop {
        match io::Read::read(&mut file, &mut byte) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Enter `root`: `chroot` and `chdir`.
fn enter(root: &Path) -> io::Result<()> {
    let root = path_c(root)?;
    // SAFETY: a valid NUL-terminated path.
    cvt(unsafe { libc::chroot(root.as_ptr()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::chdir(c"/".as_ptr()) })
}

/// What `switch_root` does: `root` moved over `/`, then entered.
fn switch_root(root: &Path) -> io::Result<()> {
    let root_c = path_c(root)?;
    // SAFETY: valid NUL-terminated paths.
    cvt(unsafe { libc::chdir(root_c.as_ptr()) })?;
    move_mount(Path::new("."), Path::new("/"))?;
    // SAFETY: as above.
    cvt(unsafe { libc::chroot(c".".as_ptr()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::chdir(c"/".as_ptr()) })
}

/// `mount --move from to`.
fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (path_c(from)?, path_c(to)?);
    // SAFETY: valid NUL-terminated strings; MS_MOVE takes no type or data.
    cvt(unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
}

/// The agent blocks SIGIO for its port; an init must not inherit that.
fn unblock_all_signals() {
    // SAFETY: an empty, initialised set; SIG_SETMASK with a valid pointer.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn path_c(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn the_environment_is_amended_not_replaced() {
        let image = "# the image's\nLANG=C\nexport EDITOR=vi\n";
        let out = amend_environment(
            image,
            &env(&[("EDITOR", "nano"), ("GREETING", "hi \"there\"")]),
        );
        assert_eq!(
            out,
            "# the image's\nLANG=C\nEDITOR=\"nano\"\nGREETING=\"hi \\\"there\\\"\"\n"
        );
        assert_eq!(
            amend_environment("", &env(&[("A", "1"), ("A", "2")])),
            "A=\"2\"\n"
        );
    }

    #[test]
    fn the_init_needs_a_program() {
        assert!(Init::new(&[], &[]).is_err());
        assert!(Init::new(&["/sbin/init".into()], &env(&[("A", "b\0")])).is_err());
        let init = Init::new(&["/sbin/init".into()], &env(&[("A", "1")])).expect("init");
        assert_eq!(init.env[0].to_str(), Ok("A=1"));
    }
}
