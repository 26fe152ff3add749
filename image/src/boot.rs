//! What an image needs to boot as a whole OS (`VMSpec.boot: "image"`): its
//! own kernel, and the kernel modules Kiln's initramfs must load before it
//! can mount the image's layers as root (virtio, SCSI disks, erofs,
//! overlay, ext4 — modules of *that* kernel, not of Kiln's).
//!
//! Both are read out of the layers' erofs images with `dump.erofs` (no
//! mount on the host: an image is untrusted, the host kernel never parses
//! it) and kept per image:
//!
//! ```text
//! boot/sha256/<manifest hex>.vmlinuz       the image's kernel
//! boot/sha256/<manifest hex>.modules.cpio  newc: lib/modules/<release>/…,
//!                                           etc/kiln/modules (load order)
//! boot/sha256/<manifest hex>.json          release and modules: written
//!                                           last, so it marks the set whole
//! ```
//!
//! A later layer hides an earlier one's files (also by a whiteout); the
//! kernel is the newest `/boot/vmlinuz-<release>` of the topmost layer
//! that has one; modules come from `/usr/lib/modules/<release>` or
//! `/lib/modules/<release>`, resolved through that kernel's `modules.dep`.
//! Modules `modules.dep` does not list are built into the kernel (or
//! absent: the guest then says which disk or file system it cannot use).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ImageError, InvalidReason};
use crate::fsio::{FileLock, LockMode, TempPath};
use crate::newc::Archive;
use crate::record::ImageRecord;
use crate::store::{blocking, ImageStore};

/// The largest kernel taken from an image.
const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// The largest `modules.dep`.
const MAX_MODULES_DEP_BYTES: u64 = 8 << 20;
/// The largest module file.
const MAX_MODULE_BYTES: u64 = 32 << 20;
/// Most modules taken (a closure of a dozen names stays far below).
const MAX_MODULES: usize = 256;
/// Most bytes of modules in all: the archive is built in memory and copied
/// into every VM's initramfs (a dozen compressed modules are ~1 MiB).
const MAX_MODULES_TOTAL_BYTES: usize = 64 << 20;
/// Longest one `dump.erofs` may run: it reads an image's (untrusted)
/// file system while the image's boot lock and the store's lock are held,
/// so one that never ends must not hold them for good. A kernel of
/// 256 MiB is read in about a second here.
const DUMP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// An image's kernel and the modules Kiln's initramfs loads for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootFiles {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// A newc fragment to append to Kiln's initramfs: the modules, and
    /// `etc/kiln/modules` listing them in load order.
    pub modules_cpio: PathBuf,
    /// The kernel's release (`uname -r`), from its file name.
    pub release: String,
    /// Module names loaded, in order.
    pub modules: Vec<String>,
}

/// What `<hex>.json` holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BootMeta {
    release: String,
    modules: Vec<String>,
    /// The module names asked for (another set builds again).
    wanted: Vec<String>,
}

impl ImageStore {
    /// The boot files of the stored image `digest`, made at the first call
    /// and kept until the image is collected. `wanted` names modules (with
    /// their dependencies) the initramfs loads. Refused with
    /// `InvalidImage` when the image carries no kernel.
    pub async fn boot_files(&self, digest: &str, wanted: &[&str]) -> Result<BootFiles, ImageError> {
        let store = self.clone();
        let wanted: Vec<String> = wanted.iter().map(|&w| w.to_owned()).collect();
        let digest = digest.to_owned();
        blocking(move || store.boot_files_blocking(&digest, &wanted)).await
    }

    fn boot_files_blocking(&self, what: &str, wanted: &[String]) -> Result<BootFiles, ImageError> {
        let paths = &self.inner.paths;
        let digest = Digest::parse(what).map_err(|r| ImageError::invalid(what, r))?;
        let record = self
            .inner
            .meta
            .record(&digest)?
            .ok_or_else(|| ImageError::ImageNotFound { what: what.into() })?;
        // Against GC (exclusive), and one builder per image.
        let _store = FileLock::lock_blocking(&paths.store_lock(), LockMode::Shared)?;
        let _image = FileLock::lock_blocking(&paths.boot_lock(&digest), LockMode::Exclusive)?;
        let files = |meta: BootMeta| BootFiles {
            kernel: paths.boot_file(&digest, "vmlinuz"),
            modules_cpio: paths.boot_file(&digest, "modules.cpio"),
            release: meta.release,
            modules: meta.modules,
        };
        let meta_path = paths.boot_file(&digest, "json");
        if let Ok(bytes) = std::fs::read(&meta_path) {
            if let Ok(meta) = serde_json::from_slice::<BootMeta>(&bytes) {
                if meta.wanted == wanted {
                    return Ok(files(meta));
                }
            }
        }
        let layers = Layers::new(self, &record);
        let (kernel_layer, release) = layers.kernel(what)?;
        let kernel_tmp = TempPath::new(&paths.tmp(), "vmlinuz");
        layers.extract(
            kernel_layer,
            &format!("/boot/vmlinuz-{release}"),
            MAX_KERNEL_BYTES,
            Some(kernel_tmp.path()),
        )?;
        let (modules, archive) = layers.modules_cpio(what, &release, wanted)?;
        let cpio_tmp = TempPath::new(&paths.tmp(), "modules");
        std::fs::write(cpio_tmp.path(), archive)
            .map_err(ImageError::io("write", cpio_tmp.path()))?;
        kernel_tmp.persist(&paths.boot_file(&digest, "vmlinuz"))?;
        cpio_tmp.persist(&paths.boot_file(&digest, "modules.cpio"))?;
        let meta = BootMeta {
            release,
            modules,
            wanted: wanted.to_vec(),
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| ImageError::io("write", &meta_path)(std::io::Error::other(e)))?;
        crate::fsio::write_atomic(&paths.tmp(), &meta_path, &json)?;
        tracing::info!(
            image = %digest,
            release = %meta.release,
            modules = meta.modules.len(),
            "boot files of an OS image stored"
        );
        Ok(files(meta))
    }
}

/// A directory entry `dump.erofs --ls` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirEntry {
    name: String,
    /// erofs file type: 1 regular, 2 directory, 3 character device (an
    /// overlayfs whiteout), 7 symlink.
    kind: u8,
}

const REGULAR: u8 = 1;

/// Directory listings already read: (layer, directory) → its entries
/// (`None`: no such directory in that layer).
type Listings = HashMap<(usize, String), Option<Vec<DirEntry>>>;

/// An image's layers, topmost first, read through `dump.erofs`.
struct Layers {
    dump: PathBuf,
    /// erofs files, topmost first.
    files: Vec<PathBuf>,
    listed: std::cell::RefCell<Listings>,
    /// How long one `dump.erofs` may run ([`DUMP_DEADLINE`]).
    deadline: std::time::Duration,
}

impl Layers {
    fn new(store: &ImageStore, record: &ImageRecord) -> Self {
        let mkfs = &store.inner.config.mkfs_erofs;
        // dump.erofs ships with mkfs.erofs (erofs-utils).
        let dump = match mkfs.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("dump.erofs"),
            _ => PathBuf::from("dump.erofs"),
        };
        Self {
            dump,
            files: record
                .layers
                .iter()
                .rev()
                .map(|l| store.erofs_path(l))
                .collect(),
            listed: Default::default(),
            deadline: DUMP_DEADLINE,
        }
    }

    /// The topmost layer with a `/boot/vmlinuz-<release>`, and the newest
    /// release there. Names a higher layer has (files or whiteouts) hide
    /// a lower layer's.
    fn kernel(&self, image: &str) -> Result<(usize, String), ImageError> {
        let mut hidden = BTreeSet::new();
        for layer in 0..self.files.len() {
            let Some(entries) = self.list(layer, "/boot")? else {
                continue;
            };
            let best = entries
                .iter()
                .filter(|e| e.kind == REGULAR && !hidden.contains(&e.name))
                .filter_map(|e| e.name.strip_prefix("vmlinuz-"))
                .filter(|release| valid_release(release))
                .max_by(|a, b| version_order(a, b));
            if let Some(release) = best {
                return Ok((layer, release.to_owned()));
            }
            hidden.extend(entries.into_iter().map(|e| e.name));
        }
        Err(ImageError::invalid(
            image,
            InvalidReason::Malformed {
                what: "OS image",
                detail: "it carries no kernel (/boot/vmlinuz-<release>) to boot".into(),
            },
        ))
    }

    /// The modules of `release` that `wanted` needs (dependencies first),
    /// as a newc fragment; an image without `modules.dep` gets an empty
    /// list (its kernel must have what it needs built in).
    fn modules_cpio(
        &self,
        image: &str,
        release: &str,
        wanted: &[String],
    ) -> Result<(Vec<String>, Vec<u8>), ImageError> {
        let mut archive = Archive::new();
        archive.parents("etc/kiln/modules");
        // Kiln's own lists name modules of its own kernel: replaced.
        archive.file("etc/kiln/modules.containers", 0o644, b"");
        let dirs = [
            format!("/usr/lib/modules/{release}"),
            format!("/lib/modules/{release}"),
        ];
        let found = dirs
            .iter()
            .find_map(|dir| self.find(dir, "modules.dep").transpose().map(|l| (dir, l)));
        let Some((dir, layer)) = found else {
            archive.file("etc/kiln/modules", 0o644, b"");
            return Ok((Vec::new(), archive.finish()));
        };
        let dep_text = self.extract(
            layer?,
            &format!("{dir}/modules.dep"),
            MAX_MODULES_DEP_BYTES,
            None,
        )?;
        let deps = parse_modules_dep(&String::from_utf8_lossy(&dep_text));
        let order = load_order(&deps, wanted).map_err(|detail| {
            ImageError::invalid(
                image,
                InvalidReason::Malformed {
                    what: "modules.dep",
                    detail,
                },
            )
        })?;
        let mut list = String::new();
        let mut names = Vec::new();
        let mut made = BTreeSet::new();
        let mut total = 0usize;
        for rel in &order {
            let full = format!("{dir}/{rel}");
            let (parent, file) = full.rsplit_once('/').unwrap_or(("/", &full));
            let layer = self.find(parent, file)?.ok_or_else(|| {
                ImageError::invalid(
                    image,
                    InvalidReason::Malformed {
                        what: "modules.dep",
                        detail: format!("it names {rel}, which the image does not have"),
                    },
                )
            })?;
            let data = self.extract(layer, &full, MAX_MODULE_BYTES, None)?;
            total += data.len();
            if total > MAX_MODULES_TOTAL_BYTES {
                return Err(ImageError::invalid(
                    image,
                    InvalidReason::Malformed {
                        what: "modules.dep",
                        detail: format!(
                            "its modules come to more than {MAX_MODULES_TOTAL_BYTES} bytes"
                        ),
                    },
                ));
            }
            let target = format!("lib/modules/{release}/{rel}");
            let target_dir = target.rsplit_once('/').map_or("", |(d, _)| d);
            if made.insert(target_dir.to_owned()) {
                archive.parents(&target);
            }
            archive.file(&target, 0o644, &data);
            list.push_str(&target);
            list.push('\n');
            names.push(module_name(rel).to_owned());
        }
        archive.file("etc/kiln/modules", 0o644, list.as_bytes());
        Ok((names, archive.finish()))
    }

    /// The topmost layer where `dir/name` is a regular file (`None` when
    /// none has it, or a higher layer hides it).
    fn find(&self, dir: &str, name: &str) -> Result<Option<usize>, ImageError> {
        for layer in 0..self.files.len() {
            if let Some(entries) = self.list(layer, dir)? {
                if let Some(e) = entries.iter().find(|e| e.name == name) {
                    return Ok((e.kind == REGULAR).then_some(layer));
                }
            }
        }
        Ok(None)
    }

    /// `dump.erofs --ls` of `dir` in `layer`; `None` if it has no such
    /// directory.
    fn list(&self, layer: usize, dir: &str) -> Result<Option<Vec<DirEntry>>, ImageError> {
        let key = (layer, dir.to_owned());
        if let Some(known) = self.listed.borrow().get(&key) {
            return Ok(known.clone());
        }
        let out = self.run(layer, "--ls", dir, 4 << 20)?;
        let entries = out.map(|text| parse_listing(&String::from_utf8_lossy(&text)));
        self.listed.borrow_mut().insert(key, entries.clone());
        Ok(entries)
    }

    /// The content of regular file `path` of `layer`, at most `limit`
    /// bytes, into `to` (returning nothing) or returned.
    fn extract(
        &self,
        layer: usize,
        path: &str,
        limit: u64,
        to: Option<&Path>,
    ) -> Result<Vec<u8>, ImageError> {
        let data = self
            .run(layer, "--cat", path, limit)?
            .ok_or_else(|| self.failed(layer, format!("cannot read {path}")))?;
        match to {
            Some(file) => {
                std::fs::write(file, &data).map_err(ImageError::io("write", file))?;
                Ok(Vec::new())
            }
            None => Ok(data),
        }
    }

    /// Run `dump.erofs <op> --path=<path>` on `layer`: its stdout, or
    /// `None` when it reports an error (it exits 0 either way, so its
    /// stderr decides). Output over `limit` bytes is refused.
    fn run(
        &self,
        layer: usize,
        op: &str,
        path: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        let file = &self.files[layer];
        let mut cmd = Command::new(&self.dump);
        cmd.arg(op)
            .arg(format!("--path={path}"))
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::convert::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| self.failed(layer, format!("{}: {e}", self.dump.display())))?;
        let watchdog = Watchdog::start(child.id(), self.deadline);
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| self.failed(layer, e.to_string()))?;
        }
        if out.len() as u64 > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.failed(layer, format!("{path} is larger than {limit} bytes")));
        }
        // All of its output read: its exit says whether that was all of
        // the file (a crashed or killed dump.erofs must not leave half a
        // kernel cached for good).
        let status = child
            .wait()
            .map_err(|e| self.failed(layer, e.to_string()))?;
        if watchdog.stop() {
            return Err(self.failed(
                layer,
                format!(
                    "dump.erofs {op} {path} ran longer than {} s and was killed",
                    self.deadline.as_secs_f32()
                ),
            ));
        }
        let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        if stderr.contains("<E>") || (op == "--ls" && !out.starts_with(b"Path :")) {
            return Ok(None);
        }
        if !status.success() {
            return Err(self.failed(layer, format!("dump.erofs {op} {path}: {status}")));
        }
        Ok(Some(out))
    }

    fn failed(&self, layer: usize, why: String) -> ImageError {
        ImageError::io("read boot files from", &self.files[layer])(std::io::Error::other(why))
    }
}

/// Kills a process that is still running after a deadline. Through a
/// pidfd, taken right after the spawn: a pid that was reaped and reused
/// meanwhile is never signalled.
struct Watchdog {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn start(pid: u32, deadline: std::time::Duration) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
        // descriptor or -1; nothing else is touched.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let thread = (fd >= 0).then(|| {
            // SAFETY: a descriptor pidfd_open just returned, owned here only.
            let pidfd =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
            std::thread::spawn(move || {
                if stopped.recv_timeout(deadline) != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return false;
                }
                // SAFETY: pidfd_send_signal(2) on a valid pidfd with no
                // siginfo.
                let sent = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                sent == 0
            })
        });
        Self { stop, thread }
    }

    /// Stop watching; whether the deadline had passed and it killed.
    fn stop(self) -> bool {
        drop(self.stop);
        self.thread.is_some_and(|t| t.join().unwrap_or(false))
    }
}

/// Entries of a `dump.erofs --ls` listing, `.` and `..` left out.
fn parse_listing(text: &str) -> Vec<DirEntry> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("NID TYPE"))
        .skip(1)
        .filter_map(|line| {
            let (nid, rest) = line.trim_start().split_once(' ')?;
            let _nid: u64 = nid.parse().ok()?;
            let (kind, name) = rest.trim_start().split_once(' ')?;
            let (name, kind) = (name.trim_start(), kind.parse().ok()?);
            (name != "." && name != "..").then(|| DirEntry {
                name: name.to_owned(),
                kind,
            })
        })
        .collect()
}

/// `modules.dep`: module path → its dependencies' paths (relative to the
/// release's directory). Lines that are not safe relative paths to module
/// files are dropped.
fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
            (safe_module_path(module) && deps.iter().all(|d| safe_module_path(d)))
                .then(|| (module.to_owned(), deps))
        })
        .collect()
}

/// A relative path to a module file, without `..`.
fn safe_module_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.+,".contains(&b))
        && [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|s| path.ends_with(s))
}

/// `virtio_net` of `kernel/drivers/net/virtio_net.ko.xz`; module names
/// treat `-` and `_` alike, as modprobe does.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// The module files to load for `wanted` (names; those `deps` does not
/// list are built in), each after its dependencies, each once.
fn load_order(
    deps: &HashMap<String, Vec<String>>,
    wanted: &[String],
) -> Result<Vec<String>, String> {
    let by_name: HashMap<String, &String> = deps
        .keys()
        .map(|path| (module_name(path).replace('-', "_"), path))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        path: &str,
        deps: &HashMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > 64 {
            return Err(format!("dependencies of {path} nest too deep"));
        }
        if !seen.insert(path.to_owned()) {
            return Ok(());
        }
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, seen, order, depth + 1)?;
        }
        order.push(path.to_owned());
        if order.len() > MAX_MODULES {
            return Err(format!("more than {MAX_MODULES} modules"));
        }
        Ok(())
    }
    for name in wanted {
        if let Some(path) = by_name.get(&name.replace('-', "_")) {
            visit(path, deps, &mut seen, &mut order, 0)?;
        }
    }
    Ok(order)
}

/// A kernel release as a file name can carry it.
fn valid_release(release: &str) -> bool {
    // It becomes a directory name: it starts with a digit, so never `.`
    // or `..`.
    release.starts_with(|c: char| c.is_ascii_digit())
        && release.len() <= 64
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
}

/// Releases compared by their numbers first (`6.12.9` < `6.12.10`).
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    numbers(a).cmp(&numbers(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `dump.erofs` that never ends (an image crafted to loop it) is
    /// killed at the deadline, with an error saying so; one that ends in
    /// time is read as usual.
    #[test]
    fn a_dump_erofs_that_hangs_is_killed_at_the_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layers = |script: &str, deadline_ms: u64| {
            let dump = dir.path().join(format!("dump-{deadline_ms}"));
            std::fs::write(&dump, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o755)).unwrap();
            Layers {
                dump,
                files: vec![dir.path().join("layer.erofs")],
                listed: Default::default(),
                deadline: std::time::Duration::from_millis(deadline_ms),
            }
        };
        let started = std::time::Instant::now();
        let hung = layers("exec sleep 30", 300).run(0, "--cat", "/boot/vmlinuz-6.1", 1024);
        let error = hung.unwrap_err();
        let mut chain = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(e) = source {
            chain.push_str(&format!(": {e}"));
            source = e.source();
        }
        assert!(
            chain.contains("ran longer than 0.3 s and was killed"),
            "{chain}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let quick = layers("printf kernel", 5000).run(0, "--cat", "/boot/vmlinuz-6.1", 1024);
        assert_eq!(quick.unwrap(), Some(b"kernel".to_vec()));
    }

    #[test]
    fn reads_a_dump_erofs_listing() {
        let text = "Path : /boot\nSize: 50\n\n       NID TYPE  FILENAME\n        41    2  .\n        36    2  ..\n        52    1  vmlinuz-6.1\n        53    7  vmlinuz\n        54    1  a name\n";
        assert_eq!(
            parse_listing(text),
            [
                DirEntry {
                    name: "vmlinuz-6.1".into(),
                    kind: 1
                },
                DirEntry {
                    name: "vmlinuz".into(),
                    kind: 7
                },
                DirEntry {
                    name: "a name".into(),
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn modules_load_after_their_dependencies_once() {
        let dep = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
                   kernel/lib/libcrc32c.ko.xz:\n\
                   kernel/drivers/scsi/sd_mod.ko.xz: kernel/drivers/scsi/scsi_mod.ko.xz kernel/drivers/scsi/scsi_common.ko.xz\n\
                   kernel/drivers/scsi/scsi_mod.ko.xz: kernel/drivers/scsi/scsi_common.ko.xz\n\
                   kernel/drivers/scsi/scsi_common.ko.xz:\n\
                   ../../etc/shadow.ko: \n\
                   kernel/evil.ko: /etc/passwd.ko\n";
        let deps = parse_modules_dep(dep);
        assert_eq!(deps.len(), 5, "unsafe lines are dropped");
        let wanted: Vec<String> = ["sd_mod", "erofs", "ext4", "scsi-mod"]
            .map(String::from)
            .into();
        let order = load_order(&deps, &wanted).expect("order");
        assert_eq!(
            order,
            [
                "kernel/drivers/scsi/scsi_common.ko.xz",
                "kernel/drivers/scsi/scsi_mod.ko.xz",
                "kernel/drivers/scsi/sd_mod.ko.xz",
                "kernel/lib/libcrc32c.ko.xz",
                "kernel/fs/erofs/erofs.ko.xz",
            ]
        );
    }

    #[test]
    fn a_dependency_loop_is_an_error_not_a_hang() {
        let deps = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n");
        // A loop ends at the first module seen again.
        assert_eq!(load_order(&deps, &["a".into()]).expect("order").len(), 2);
    }

    #[test]
    fn releases_sort_by_number() {
        assert_eq!(
            version_order("6.12.9-amd64", "6.12.10-amd64"),
            std::cmp::Ordering::Less
        );
        assert!(valid_release("6.12.117+deb13-amd64"));
        assert!(!valid_release("../x"));
        assert!(!valid_release(".."));
        assert!(!valid_release(""));
    }
}
