//! A container's file systems in the agent's mount namespace, under
//! `/run/kiln/containers/N/` (N a sequence number, which keeps the overlay
//! option string short however long ids are):
//!
//! ```text
//! l0 … lK    each layer disk's erofs, read-only
//! upper/     a tmpfs (or the upper disk's ext4) holding upper/ and work/
//! rootfs/    the overlay: lowerdir=lK:…:l0, upperdir, workdir
//! ```
//!
//! A disk is mounted through a device node the agent makes from its
//! `major:minor` in [`NODES_DIR`] and removes once mounted.
//!
//! [`Mounts`] remembers what it mounted and unmounts in reverse order, also
//! when setting up fails half way: nothing stays half-created.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::disk::{self, Disk};
use super::ContainerError;
use crate::{log, sys};

/// Parent of every container's directory.
pub const CONTAINERS_DIR: &str = "/run/kiln/containers";
/// How long a disk listed in sysfs may take to become usable.
const DISK_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the short-lived device nodes of disks being mounted are made:
/// `/run` is `nodev`, devtmpfs is not.
pub const NODES_DIR: &str = "/dev/kiln";

/// The mounts of one container, unmounted on [`Mounts::unmount_all`].
#[derive(Debug)]
pub struct Mounts {
    dir: PathBuf,
    /// Mount points in the order they were mounted.
    stack: Vec<PathBuf>,
}

/// Where the writable layer comes from, resolved to a disk if any.
#[derive(Debug)]
pub enum UpperSource<'a> {
    /// tmpfs with an optional size limit in MiB.
    Tmpfs(Option<u64>),
    /// ext4 on this disk (with its serial, for messages).
    Disk(&'a str, &'a Disk),
}

/// The `overlay` mount data for `lowers` (lowest first).
pub fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    )
}

fn mount_failed(what: impl std::fmt::Display, e: io::Error) -> ContainerError {
    ContainerError::MountFailed(format!("{what}: {e}"))
}

impl Mounts {
    /// Mounts `layers` (lowest first, with their serials), the upper layer
    /// and the overlay under `CONTAINERS_DIR/seq`. On failure everything
    /// mounted so far is unmounted again.
    pub fn set_up(
        seq: u64,
        layers: &[(&str, &Disk)],
        upper: &UpperSource<'_>,
    ) -> Result<Self, ContainerError> {
        let dir = Path::new(CONTAINERS_DIR).join(seq.to_string());
        fs::create_dir_all(CONTAINERS_DIR).map_err(|e| mount_failed(CONTAINERS_DIR, e))?;
        // Never reuse a directory: one left by an agent that restarted
        // after a panic may still have mounts in it (see next_seq).
        fs::create_dir(&dir).map_err(|e| mount_failed(dir.display(), e))?;
        let mut mounts = Self {
            dir,
            stack: Vec::new(),
        };
        match mounts.mount_everything(layers, upper) {
            Ok(()) => Ok(mounts),
            Err(e) => {
                mounts.unmount_all();
                Err(e)
            }
        }
    }

    fn mount_everything(
        &mut self,
        layers: &[(&str, &Disk)],
        upper: &UpperSource<'_>,
    ) -> Result<(), ContainerError> {
        let mut lowers = Vec::with_capacity(layers.len());
        for (i, (serial, disk)) in layers.iter().enumerate() {
            let target = self.dir.join(format!("l{i}"));
            self.mount_disk(serial, disk, &target, "erofs", libc::MS_RDONLY, true)?;
            lowers.push(target);
        }
        let upper_mnt = self.dir.join("upper");
        match upper {
            UpperSource::Tmpfs(size) => {
                let data = match size {
                    Some(mib) => format!("mode=0755,size={mib}m"),
                    None => "mode=0755".to_owned(),
                };
                self.mount("tmpfs", &upper_mnt, "tmpfs", 0, &data)?;
            }
            UpperSource::Disk(serial, disk) => {
                self.mount_disk(serial, disk, &upper_mnt, "ext4", 0, false)?;
            }
        }
        let upper_dir = upper_mnt.join("upper");
        let work_dir = upper_mnt.join("work");
        for d in [&upper_dir, &work_dir] {
            create_dir(d).map_err(|e| mount_failed(d.display(), e))?;
        }
        let rootfs = self.dir.join("rootfs");
        let options = overlay_options(&lowers, &upper_dir, &work_dir);
        self.mount("overlay", &rootfs, "overlay", 0, &options)
    }

    /// Mounts `disk` through a device node of its own, removed again once
    /// mounted (the mount keeps the device).
    fn mount_disk(
        &mut self,
        serial: &str,
        disk: &Disk,
        target: &Path,
        fstype: &str,
        flags: libc::c_ulong,
        check_erofs: bool,
    ) -> Result<(), ContainerError> {
        let node = Path::new(NODES_DIR).join(&disk.name);
        fs::create_dir_all(NODES_DIR).map_err(|e| mount_failed(NODES_DIR, e))?;
        disk::make_node(&node, disk)
            .map_err(|e| mount_failed(format!("mknod {}", node.display()), e))?;
        let result = (|| {
            let mut file = disk::open_when_ready(&node, DISK_READY_TIMEOUT)
                .map_err(|e| mount_failed(format!("opening disk {serial}"), e))?;
            if check_erofs {
                match disk::is_erofs(&mut file) {
                    Ok(true) => {}
                    Ok(false) => return Err(ContainerError::NotErofs(serial.to_owned())),
                    Err(e) => return Err(mount_failed(format!("reading disk {serial}"), e)),
                }
            }
            drop(file);
            self.mount(&node.display().to_string(), target, fstype, flags, "")
                .map_err(|e| match e {
                    ContainerError::MountFailed(m) => {
                        ContainerError::MountFailed(format!("disk {serial}: {m}"))
                    }
                    other => other,
                })
        })();
        let _ = fs::remove_file(&node);
        result
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: libc::c_ulong,
        data: &str,
    ) -> Result<(), ContainerError> {
        create_dir(target).map_err(|e| mount_failed(target.display(), e))?;
        let target_str = target.display().to_string();
        if let Err(e) = sys::mount(source, &target_str, fstype, flags, data) {
            let _ = fs::remove_dir(target);
            return Err(mount_failed(format!("mount {fstype} on {target_str}"), e));
        }
        self.stack.push(target.to_owned());
        Ok(())
    }

    /// Nothing mounted, for tests of the container table.
    #[cfg(test)]
    pub fn none() -> Self {
        Self {
            dir: PathBuf::from("/nonexistent/kiln-test"),
            stack: Vec::new(),
        }
    }

    /// The overlay: the container's root.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Unmounts everything in reverse order and removes the (then empty)
    /// mount points and the directory, never recursively: a mount that
    /// could not be undone keeps its files. A busy mount is detached lazily
    /// (and logged): the disk is released when its last user goes.
    pub fn unmount_all(&mut self) {
        while let Some(target) = self.stack.pop() {
            if let Err(e) = sys::umount(&target, 0) {
                log::error!("umount {}: {e}; detaching it", target.display());
                if let Err(e) = sys::umount(&target, libc::MNT_DETACH) {
                    log::error!("umount -l {}: {e}", target.display());
                    continue;
                }
            }
            let _ = fs::remove_dir(&target);
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::error!("rmdir {}: {e}", self.dir.display());
            }
        }
    }
}

/// The first container number after those whose directories exist (left
/// by an agent that restarted after a panic, whose containers it no longer
/// knows): their mounts must not be touched.
pub fn next_seq(containers_dir: &Path) -> u64 {
    fs::read_dir(containers_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .map_or(0, |n| n.saturating_add(1))
        })
        .unwrap_or(0)
}

fn create_dir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lists_the_top_layer_first() {
        let lowers = [PathBuf::from("/c/1/l0"), PathBuf::from("/c/1/l1")];
        assert_eq!(
            overlay_options(
                &lowers,
                Path::new("/c/1/upper/upper"),
                Path::new("/c/1/upper/work")
            ),
            "lowerdir=/c/1/l1:/c/1/l0,upperdir=/c/1/upper/upper,workdir=/c/1/upper/work"
        );
    }

    #[test]
    fn numbering_continues_after_existing_directories() {
        let dir = std::env::temp_dir().join(format!("kiln-agent-seq-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(next_seq(&dir), 0, "no directory yet");
        for name in ["0", "7", "not-a-number"] {
            fs::create_dir_all(dir.join(name)).expect("mkdir");
        }
        assert_eq!(next_seq(&dir), 8);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_longest_option_string_fits_in_a_page() {
        let lowers: Vec<PathBuf> = (0..kiln_agent_proto::MAX_LAYERS)
            .map(|i| {
                Path::new(CONTAINERS_DIR)
                    .join(u64::MAX.to_string())
                    .join(format!("l{i}"))
            })
            .collect();
        let dir = Path::new(CONTAINERS_DIR).join(u64::MAX.to_string());
        let options = overlay_options(&lowers, &dir.join("upper/upper"), &dir.join("upper/work"));
        assert!(options.len() < 4096, "{}", options.len());
    }
}
