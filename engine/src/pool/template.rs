//! Pool templates: one booted VM saved so clones start in milliseconds.
//!
//! A template is built by booting a VM whose RAM is a *shared* file
//! (`memory-backend-file,share=on`), waiting for its agent, pausing it and
//! saving device state with the `x-ignore-shared` migration capability, so
//! the state file holds only devices (~90 KB) and the RAM stays in the file.
//! A clone maps that file *privately* (`share=off`, copy-on-write) and loads
//! the state with `-incoming defer` + `migrate-incoming`. The template is
//! saved without its run state (`migration.store-global-state=off`), so the
//! clone runs by itself as soon as the state is loaded, with no `cont`: it
//! is running in tens of milliseconds and shares every page it has not
//! written.
//!
//! On disk, `<state_dir>/templates/<pool>/<key>/` holds `memory`, `state`
//! and `template.json`. The key hashes everything the saved state depends
//! on (resolved VM spec, the exact QEMU argv shape, and size + mtime of the
//! kernel, initramfs and QEMU binary), so a change to any of them builds a
//! new template instead of restoring a stale one. A directory is complete
//! only once `template.json` exists: it is written last, after everything
//! else is synced, and the directory is built under a `.tmp` name and
//! renamed. A template's files are never rewritten in place, because running
//! clones map the RAM file; old templates are removed once no VM uses them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::ids::now_usec;
use crate::qemu::QemuLaunch;
use crate::store::{create_private_dir, ensure_room, remove_tree, write_atomic, StoreError};

/// File names inside a template directory.
const MEMORY_FILE: &str = "memory";
const STATE_FILE: &str = "state";
const META_FILE: &str = "template.json";

/// A complete template on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// `<templates>/<pool>/<key>`.
    pub dir: PathBuf,
}

impl Template {
    /// The RAM file clones map privately.
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    /// The saved device state clones load.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
}

/// What `template.json` records (for operators and checks).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateMeta {
    key: String,
    pool: String,
    created_at: u64,
    /// How long the template VM took to answer (ms).
    boot_ms: u64,
    state_bytes: u64,
}

/// The key of a template made with `launch`: every input the saved state
/// depends on. `launch` should use fixed placeholder paths (only their shape
/// matters), the real kernel, initrd and binary.
pub fn template_key(launch: &QemuLaunch) -> String {
    let mut hasher = Sha256::new();
    for arg in launch.argv() {
        hasher.update(arg.as_encoded_bytes());
        hasher.update([0]);
    }
    let binary = find_in_path(&launch.binary).unwrap_or_else(|| launch.binary.clone());
    for file in [&launch.kernel, &launch.initrd, &binary] {
        hasher.update(file.as_os_str().as_encoded_bytes());
        // Size and mtime: a rebuilt image or an upgraded QEMU changes them.
        if let Ok(meta) = std::fs::metadata(file) {
            use std::os::unix::fs::MetadataExt;
            hasher.update(meta.size().to_le_bytes());
            hasher.update(meta.mtime().to_le_bytes());
            hasher.update(meta.mtime_nsec().to_le_bytes());
        }
    }
    hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
    let digest = hasher.finalize();
    crate::ids::hex(&digest[..8])
}

fn find_in_path(binary: &Path) -> Option<PathBuf> {
    if binary.is_absolute() {
        return Some(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// The complete template with `key` for a pool, if one is on disk.
pub fn find(pool_dir: &Path, key: &str) -> Option<Template> {
    let dir = pool_dir.join(key);
    let complete = dir.join(META_FILE).is_file()
        && dir.join(MEMORY_FILE).is_file()
        && dir.join(STATE_FILE).is_file();
    complete.then_some(Template { dir })
}

/// Everything a template build needs, prepared by the actor.
#[derive(Debug)]
pub struct BuildPlan {
    /// Pool name (for the record).
    pub pool: String,
    /// The template's key.
    pub key: String,
    /// `<templates>/<pool>`.
    pub pool_dir: PathBuf,
    /// The template VM's launch (memory and paths are set by [`build`]).
    pub launch: QemuLaunch,
    /// Runtime directory of the template VM (sockets, pid file).
    pub runtime_dir: PathBuf,
    /// QMP deadline.
    pub qmp_timeout: Duration,
    /// Boot deadline.
    pub boot_timeout: Duration,
    /// A per-image pool's container, started in the template VM before it
    /// is saved (its layers are in `launch.disks`), so every clone resumes
    /// with the workload running.
    pub container: Option<kiln_agent_proto::StartContainerRequest>,
    /// How long the container runs before the template is saved.
    pub warmup: Duration,
}

/// A template being built: the directory the VMM writes the RAM and device
/// state into, under a `.tmp` name until [`Unfinished::finish`] moves it in
/// place. The pool side owns this layout; the VMM boots and saves.
#[derive(Debug)]
pub struct Unfinished {
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    started: std::time::Instant,
}

impl BuildPlan {
    /// Start a build: a fresh temporary directory (and runtime directory).
    pub fn begin(&self) -> Result<Unfinished, StoreError> {
        let tmp_dir = self.pool_dir.join(format!(".{}.tmp", self.key));
        remove_tree(&tmp_dir);
        create_private_dir(&tmp_dir)?;
        if let Err(e) = ensure_room(&tmp_dir, u64::from(self.launch.memory_mib) << 20) {
            remove_tree(&tmp_dir);
            return Err(e);
        }
        remove_tree(&self.runtime_dir);
        create_private_dir(&self.runtime_dir)?;
        Ok(Unfinished {
            tmp_dir,
            final_dir: self.pool_dir.join(&self.key),
            started: std::time::Instant::now(),
        })
    }
}

impl Unfinished {
    /// Where the template VM's RAM lives (a shared file).
    pub fn memory(&self) -> PathBuf {
        self.tmp_dir.join(MEMORY_FILE)
    }

    /// Where its device state is saved.
    pub fn state(&self) -> PathBuf {
        self.tmp_dir.join(STATE_FILE)
    }

    /// Sync RAM and state, write `template.json` last, and rename the
    /// directory in place: a template is complete or absent.
    pub fn finish(self, plan: &BuildPlan, boot_ms: u64) -> Result<Template, StoreError> {
        let state_bytes = std::fs::metadata(self.state())
            .map(|m| m.len())
            .unwrap_or(0);
        let meta = TemplateMeta {
            key: plan.key.clone(),
            pool: plan.pool.clone(),
            created_at: now_usec(),
            boot_ms,
            state_bytes,
        };
        let finish = || -> Result<(), StoreError> {
            for file in [MEMORY_FILE, STATE_FILE] {
                sync_file(&self.tmp_dir.join(file))?;
            }
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| StoreError::Serialize {
                key: plan.key.clone(),
                source: e,
            })?;
            write_atomic(&self.tmp_dir.join(META_FILE), &json)?;
            remove_tree(&self.final_dir);
            std::fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| io_error(&self.final_dir, e))?;
            Ok(())
        };
        if let Err(e) = finish() {
            remove_tree(&self.tmp_dir);
            return Err(e);
        }
        info!(
            pool = %plan.pool,
            key = %plan.key,
            boot_ms,
            total_ms = self.started.elapsed().as_millis() as u64,
            state_bytes,
            "template saved"
        );
        Ok(Template {
            dir: self.final_dir,
        })
    }

    /// Give up: nothing of the build is left.
    pub fn discard(self) {
        remove_tree(&self.tmp_dir);
    }
}

/// Remove template directories of `pool_dir` that are neither `current` nor
/// in `in_use`, and unfinished builds (`.tmp`) unless `building`.
pub fn remove_unused(pool_dir: &Path, current: Option<&Path>, in_use: &HashSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(pool_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || Some(path.as_path()) == current || in_use.contains(&path) {
            continue;
        }
        info!(dir = %path.display(), "removing unused template");
        remove_tree(&path);
    }
}

/// Remove unfinished builds left by a kilnd that died while building.
pub fn remove_unfinished(templates_root: &Path) {
    let Ok(pools) = std::fs::read_dir(templates_root) else {
        return;
    };
    for pool in pools.flatten() {
        let Ok(entries) = std::fs::read_dir(pool.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                remove_tree(&entry.path());
            }
        }
    }
}

fn sync_file(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, e))
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}
