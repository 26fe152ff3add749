//! QEMU without privilege: every VM's QEMU runs under a uid and gid of its
//! own from a configured range, with no capabilities (issue 16, the
//! jailer model; docs/security.md).
//!
//! What such a QEMU may touch, and how it gets it:
//! - its own run directory (sockets, pid file, console log), a template or
//!   snapshot it is building, its writable container disks: owned by its
//!   uid ([`give_to`]);
//! - the node's read-only inputs it boots from (template RAM and device
//!   state, image layers, snapshots): `root:<shared gid>`, mode 0640, in
//!   directories the shared group may traverse but not list
//!   ([`share_read_only`]); every QEMU has the shared gid as a
//!   supplementary group, and none can write them;
//! - what only root can open (TAPs, the QMP-passed NIC descriptors): kilnd
//!   opens it and passes the descriptor;
//! - `/dev/kvm` and render nodes: through their device groups, added as
//!   supplementary groups when the VM uses them.
//!
//! Offset 0 of the range is the template builders' uid; VMs get 1 and up.
//! A VM's uid is kept in its record, so a re-adopted QEMU keeps it and no
//! other VM is given it while the record exists.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The range QEMUs run in, or none (kilnd is not root, or the range is
/// configured away): then QEMU runs as kilnd's own user, as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUsers {
    base: u32,
    count: u32,
    jailed: bool,
    /// kilnd's state and runtime directories: only what is under them is
    /// ever re-owned.
    tops: Vec<PathBuf>,
}

/// Who one QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    /// Its uid (and primary gid).
    pub uid: u32,
    /// Supplementary groups: the shared read-only group first, then the
    /// device groups it needs.
    pub groups: Vec<u32>,
    /// kilnd's directories (see [`QemuUsers`]).
    pub tops: Vec<PathBuf>,
    /// Device nodes it opens (`/dev/kvm`, render nodes), for its view.
    pub devices: Vec<PathBuf>,
    /// Whether it gets a view of the filesystem of its own ([`Jail`]).
    pub jailed: bool,
}

impl QemuUsers {
    /// The range `base .. base + count` when kilnd runs as root and `count`
    /// leaves room for the builders' uid and one VM.
    /// `jailed`: each QEMU also gets a [`Jail`].
    pub fn new(
        base: u32,
        count: u32,
        jailed: bool,
        state_dir: &Path,
        runtime_dir: &Path,
    ) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        (root && base > 0 && count >= 2 && base.checked_add(count).is_some()).then(|| Self {
            base,
            count,
            jailed,
            tops: vec![state_dir.to_owned(), runtime_dir.to_owned()],
        })
    }

    /// The group that may read the node's shared read-only inputs.
    pub fn shared_gid(&self) -> u32 {
        self.base
    }

    /// Whether `uid` is one of this range's VM uids.
    pub fn contains(&self, uid: u32) -> bool {
        uid > self.base && uid < self.base + self.count
    }

    /// The lowest VM uid not in `used`, or None when all are taken.
    pub fn allocate(&self, used: impl IntoIterator<Item = u32>) -> Option<u32> {
        let used: std::collections::HashSet<u32> = used.into_iter().collect();
        (self.base + 1..self.base + self.count).find(|uid| !used.contains(uid))
    }

    /// The template builders' user, opening `devices`.
    pub fn builder(&self, devices: &[PathBuf]) -> QemuUser {
        self.user(self.base, devices)
    }

    /// The user of uid `uid` opening `devices`: their groups are its
    /// supplementary groups besides the shared one.
    pub fn user(&self, uid: u32, devices: &[PathBuf]) -> QemuUser {
        let mut groups = vec![self.base];
        for gid in devices.iter().filter_map(|d| device_group(d)) {
            if !groups.contains(&gid) {
                groups.push(gid);
            }
        }
        QemuUser {
            uid,
            groups,
            tops: self.tops.clone(),
            devices: devices.to_vec(),
            jailed: self.jailed,
        }
    }
}

impl QemuUser {
    /// The shared read-only group.
    pub fn shared_gid(&self) -> u32 {
        self.groups[0]
    }

    /// A disk this user's QEMU opens (at launch or on a hot-plug): a
    /// read-only layer is shared read-only, a writable one becomes its own.
    pub fn open_disk(&self, path: &Path, writable: bool) -> io::Result<()> {
        match writable {
            true => give_to(path, self),
            false => self.share(path),
        }
    }

    /// [`share_read_only`] of `path` if it is under kilnd's directories;
    /// anything else (the guest image, a caller's kernel) is left as it is
    /// and must be readable by others already.
    pub fn share(&self, path: &Path) -> io::Result<()> {
        match self.top_of(path) {
            Some(top) => share_read_only(top, path, self.shared_gid()),
            None => Ok(()),
        }
    }

    /// The one of kilnd's directories `path` is under.
    fn top_of(&self, path: &Path) -> Option<&Path> {
        self.tops
            .iter()
            .find(|top| path.starts_with(top))
            .map(PathBuf::as_path)
    }
}

/// The group owning a device node (`/dev/kvm`, a render node), for a
/// supplementary group; None when it cannot be read.
pub fn device_group(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.gid())
}

/// `path` (a directory or file) owned by `user`'s uid and primary gid; a
/// directory's tree too, and the directories above it under the state
/// directory searchable. Used for what its QEMU creates or writes.
pub fn give_to(path: &Path, user: &QemuUser) -> io::Result<()> {
    let Some(top) = user.top_of(path) else {
        return Ok(());
    };
    searchable_ancestors(top, path)?;
    chown_tree(path, user.uid, user.uid)
}

/// The files of `dir` (recursively) become `root:<gid>` 0640 and its
/// directories `root:<gid>` 0710, and every directory from `top` down to
/// `dir` gets search permission for group and others (0711): QEMUs of the
/// group may open what they are told to, and list nothing. Idempotent.
pub fn share_read_only(top: &Path, dir: &Path, gid: u32) -> io::Result<()> {
    searchable_ancestors(top, dir)?;
    share_tree(dir, gid)
}

/// Search permission (0o011) on every directory above `path` from `top`
/// (included) down. `top`'s own parents must be searchable already.
fn searchable_ancestors(top: &Path, path: &Path) -> io::Result<()> {
    let mut ancestor = path.parent();
    while let Some(a) = ancestor {
        if !a.starts_with(top) {
            break;
        }
        let mode = std::fs::metadata(a)?.permissions().mode();
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(a, std::fs::Permissions::from_mode((mode | 0o011) & 0o7777))?;
        }
        ancestor = a.parent();
    }
    Ok(())
}

fn share_tree(path: &Path, gid: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = if meta.is_dir() { 0o710 } else { 0o640 };
    std::os::unix::fs::lchown(path, Some(0), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            share_tree(&entry?.path(), gid)?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Between fork and exec: drop to `user` for good (supplementary groups,
/// then gid, then uid; a uid change away from 0 clears every capability).
/// Only async-signal-safe calls, on memory prepared before the fork.
///
/// # Safety
/// Must only be called in the child between fork and exec.
pub unsafe fn drop_privileges(uid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: setgroups reads `groups.len()` gids from a live slice;
    // setresgid/setresuid/prctl take plain integers.
    unsafe {
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setresgid(uid, uid, uid))?;
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// A QEMU's view of the filesystem (the jailer's chroot, made with a
/// mount namespace): a tmpfs root holding, at their usual paths, `/usr`
/// and the top-level links into it, the dynamic linker's cache, a few
/// device nodes, a fresh `/proc` showing only its own processes, `/sys`
/// read-only, the guest kernel and initramfs it boots, and kilnd's state
/// and runtime directories (where its own files are, and nothing it may
/// open that DAC does not let it). The rest of the host is not there.
///
/// Everything is prepared before the fork ([`Jail::plan`]); the child
/// only makes system calls ([`Jail::enter`]).
#[derive(Debug)]
pub struct Jail {
    root: CString,
    root_proc: CString,
    /// Directories to create in the root, parents first.
    dirs: Vec<CString>,
    /// Empty files to create as mount points for file binds.
    files: Vec<CString>,
    /// (link, target) symlinks.
    links: Vec<(CString, CString)>,
    /// (source, target, read-only) bind mounts.
    binds: Vec<(CString, CString, bool)>,
}

/// Top-level paths that are links into `/usr` on merged-/usr systems, or
/// directories of their own elsewhere.
const TOP_LEVEL: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];
/// Device nodes every QEMU may use.
const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

impl Jail {
    /// The view for a QEMU in `root` (an empty directory, the mount point
    /// of its tmpfs) that reads `files` (kernel, initramfs) and `devices`
    /// besides the usual ones, and works under `tops` (kilnd's dirs).
    pub fn plan(
        root: &Path,
        tops: &[PathBuf],
        files: &[&Path],
        devices: &[&Path],
    ) -> io::Result<Self> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let mut dirs = std::collections::BTreeSet::new();
        let add_parents = |p: &Path, dirs: &mut std::collections::BTreeSet<PathBuf>| {
            let mut parent = p.parent();
            while let Some(d) = parent.filter(|d| *d != Path::new("/")) {
                dirs.insert(d.to_owned());
                parent = d.parent();
            }
        };
        let mut plan = Self {
            root: c(root)?,
            root_proc: c(&root.join("proc"))?,
            dirs: Vec::new(),
            files: Vec::new(),
            links: Vec::new(),
            binds: Vec::new(),
        };
        let bind_dir = |src: &Path,
                        ro: bool,
                        plan: &mut Self,
                        dirs: &mut std::collections::BTreeSet<PathBuf>|
         -> io::Result<()> {
            dirs.insert(src.to_owned());
            add_parents(src, dirs);
            plan.binds.push((c(src)?, c(&inside(src))?, ro));
            Ok(())
        };
        bind_dir(Path::new("/usr"), true, &mut plan, &mut dirs)?;
        bind_dir(Path::new("/sys"), true, &mut plan, &mut dirs)?;
        dirs.insert("/proc".into());
        dirs.insert("/dev".into());
        dirs.insert("/tmp".into());
        for top in TOP_LEVEL.map(Path::new) {
            match std::fs::symlink_metadata(top) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(top)?;
                    plan.links.push((c(&inside(top))?, c(&target)?));
                }
                Ok(m) if m.is_dir() => bind_dir(top, true, &mut plan, &mut dirs)?,
                _ => {}
            }
        }
        for top in tops {
            bind_dir(top, false, &mut plan, &mut dirs)?;
        }
        let cache = Path::new("/etc/ld.so.cache");
        let wanted_files = files
            .iter()
            .copied()
            .filter(|f| !f.starts_with("/usr") && !tops.iter().any(|t| f.starts_with(t)))
            .map(|f| (f, true))
            .chain([(cache, true)])
            .chain(DEVICES.iter().map(|d| (Path::new(*d), false)))
            .chain(devices.iter().map(|d| (*d, false)));
        for (file, ro) in wanted_files {
            if !file.exists() {
                continue;
            }
            add_parents(file, &mut dirs);
            plan.files.push(c(&inside(file))?);
            plan.binds.push((c(file)?, c(&inside(file))?, ro));
        }
        // BTreeSet order puts every parent before its children.
        plan.dirs = dirs
            .iter()
            .map(|d| c(&inside(d)))
            .collect::<io::Result<_>>()?;
        Ok(plan)
    }

    /// Between fork and exec, as root: a mount namespace of its own, the
    /// view built on a tmpfs, and a chroot into it. The caller then drops
    /// its privileges, which also takes away any way out of the chroot.
    ///
    /// # Safety
    /// Must only be called in the child between fork and exec.
    pub unsafe fn enter(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string prepared
        // before the fork and alive here, or null where the call allows.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted here propagates back to the host.
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=1m".as_ptr().cast(),
            ))?;
            for dir in &self.dirs {
                if libc::mkdir(dir.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(io::Error::last_os_error());
                }
                // Searchable by QEMU's uid whatever kilnd's umask (the
                // unit's is 0077, which would leave them 0700).
                check(libc::chmod(dir.as_ptr(), 0o755))?;
            }
            for file in &self.files {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                check(fd)?;
                libc::close(fd);
            }
            for (link, target) in &self.links {
                check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
            }
            for (source, target, read_only) in &self.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                if *read_only {
                    check(libc::mount(
                        none,
                        target.as_ptr(),
                        none,
                        libc::MS_BIND
                            | libc::MS_REMOUNT
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV,
                        std::ptr::null(),
                    ))?;
                }
            }
            // Its own processes only; where a fresh proc cannot be mounted
            // (some containers), the host's.
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                c"proc".as_ptr(),
                self.root_proc.as_ptr(),
                c"proc".as_ptr(),
                flags,
                c"hidepid=invisible".as_ptr().cast(),
            ) < 0
            {
                check(libc::mount(
                    c"/proc".as_ptr(),
                    self.root_proc.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_allocated_lowest_first_past_the_builders() {
        let users = QemuUsers {
            base: 1000,
            count: 4,
            jailed: true,
            tops: vec!["/var/lib/kiln".into()],
        };
        assert_eq!(users.allocate([]), Some(1001));
        assert_eq!(users.allocate([1001, 1003]), Some(1002));
        assert_eq!(users.allocate([1001, 1002, 1003]), None);
        assert!(users.contains(1003) && !users.contains(1000) && !users.contains(1004));
        assert_eq!(users.builder(&[]).uid, 1000);
        assert_eq!(users.user(1002, &[]).groups, vec![1000]);
    }
}
