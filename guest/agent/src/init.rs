//! PID 1 duties before serving: file systems, standard descriptors,
//! environment, hostname, kernel modules. Every step logs and carries on
//! when it fails; all of them are idempotent, so a restarted agent (see the
//! panic hook in `main.rs`) can run them again.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::time::Instant;

use crate::exec::{BASE_HOME, BASE_PATH};
use crate::{log, sys};

/// Modules to load at boot, one path per line relative to `/`, in
/// dependency order.
pub const MODULES_LIST: &str = "/etc/kiln/modules";
/// Modules containers need (SCSI disks, erofs, overlay), same format;
/// loaded by the first `StartContainer` (or at boot, see `cmdline.rs`).
pub const CONTAINER_MODULES_LIST: &str = "/etc/kiln/modules.containers";
/// Hostname until the host sets one with `SetIdentity`.
pub const DEFAULT_HOSTNAME: &str = "kiln";

struct MountSpec {
    fstype: &'static str,
    target: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
];

/// Mounts, standard descriptors, environment and hostname.
pub fn early() {
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o022) };
    for m in MOUNTS {
        if let Err(e) = fs::create_dir_all(m.target) {
            log::error!("mkdir {}: {e}", m.target);
        }
        match sys::mount(m.fstype, m.target, m.fstype, m.flags, m.data) {
            Ok(()) => {}
            // Already mounted (the agent restarted itself).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log::error!("mount {} on {}: {e}", m.fstype, m.target),
        }
        if m.target == "/dev" {
            log::use_kmsg();
            ensure_std_fds();
        }
    }
    std::env::set_var("PATH", BASE_PATH);
    std::env::set_var("HOME", BASE_HOME);
    if let Err(e) = sys::sethostname(DEFAULT_HOSTNAME) {
        log::error!("sethostname: {e}");
    }
}

/// Makes sure descriptors 0, 1 and 2 are open (the kernel leaves them closed
/// when the initramfs has no `/dev/console`), so that files the agent opens
/// never land on them.
fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on any integer is harmless; it only reports EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
        match opened {
            Ok(file) if file.as_raw_fd() == fd => {
                // Lowest free descriptor: it is the one we wanted. Keep it
                // open for good (clearing close-on-exec is not needed: the
                // agent never passes its own stdio to commands).
                let _ = file.into_raw_fd();
            }
            Ok(file) => {
                // SAFETY: dup2 between two valid descriptors.
                unsafe { libc::dup2(file.as_raw_fd(), fd) };
            }
            Err(e) => log::error!("cannot open a console for fd {fd}: {e}"),
        }
    }
}

/// Loads the modules listed in [`MODULES_LIST`], in order.
pub fn load_modules() {
    if let Err(e) = load_module_list(MODULES_LIST) {
        log::error!("{MODULES_LIST}: {e}");
    }
}

/// Loads the modules listed in `list`, in order, and logs one line with
/// the time each took. A missing list is an empty one; a module that is
/// already loaded counts as loaded. Fails if the list cannot be read or a
/// module cannot be loaded (after trying the rest).
pub fn load_module_list(list_path: &str) -> io::Result<()> {
    let list = match fs::read_to_string(list_path) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let start = Instant::now();
    let mut loaded = Vec::new();
    let mut failed = None;
    for path in module_paths(&list) {
        let one = Instant::now();
        match load_module(&Path::new("/").join(path)) {
            Ok(()) => loaded.push(format!(
                "{} {}",
                module_name(path),
                one.elapsed().as_millis()
            )),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                log::error!("module {path}: {e}");
                failed
                    .get_or_insert_with(|| io::Error::new(e.kind(), format!("module {path}: {e}")));
            }
        }
    }
    // One line: /dev/kmsg allows a burst of only 10 records per 5 s.
    log::info!(
        "loaded {} modules of {list_path} in {} ms ({} ms)",
        loaded.len(),
        start.elapsed().as_millis(),
        loaded.join(", ")
    );
    failed.map_or(Ok(()), Err)
}

/// `virtio_net` of `lib/modules/R/kernel/drivers/net/virtio_net.ko[.xz]`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// `finit_module`; a compressed module (`.ko.xz`, `.ko.zst`, `.ko.gz`) is
/// handed to the kernel to decompress (`MODULE_INIT_COMPRESSED_FILE`).
fn load_module(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let compressed = path
        .extension()
        .is_some_and(|ext| ext == "xz" || ext == "zst" || ext == "gz");
    sys::finit_module(file.as_raw_fd(), compressed)
}

/// Non-empty, non-comment lines of the modules list.
pub fn module_paths(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_modules() {
        assert_eq!(
            module_name("lib/modules/x/kernel/fs/erofs/erofs.ko.xz"),
            "erofs"
        );
        assert_eq!(module_name("lib/modules/x/virtio_net.ko"), "virtio_net");
        assert_eq!(module_name("odd"), "odd");
    }

    #[test]
    fn parses_the_modules_list() {
        let list = "# virtio\nlib/modules/x/virtio_mmio.ko\n\n  lib/modules/x/virtio_net.ko  \n";
        let paths: Vec<_> = module_paths(list).collect();
        assert_eq!(
            paths,
            [
                "lib/modules/x/virtio_mmio.ko",
                "lib/modules/x/virtio_net.ko"
            ]
        );
    }
}
