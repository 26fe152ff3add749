//! Snapshots on disk: `<state_dir>/snapshots/<name>/`, in the form of a
//! pool template (`memory`: the guest's RAM as a file, `state`: device
//! state saved with `x-ignore-shared`) plus `snapshot.json` (what the VM
//! was: its spec, containers and MAC), so that restoring one is cloning
//! it: the RAM file mapped copy-on-write, shared by every VM restored or
//! forked from it.
//!
//! A snapshot is built in `.build-<name>` and renamed into place once
//! `snapshot.json` is written and everything is synced: a crash leaves a
//! build directory (removed at start), never a half snapshot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::ContainerRecord;
use crate::error::EngineError;
use crate::name::is_valid_name;
use crate::pool::template::Template;
use crate::spec::ResolvedSpec;
use crate::store::{create_private_dir, remove_tree, write_atomic, StoreError};

const META_FILE: &str = "snapshot.json";
const BUILD_PREFIX: &str = ".build-";

/// What a snapshot was taken of.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMeta {
    /// The snapshot's name.
    pub name: String,
    /// The VM it was taken of.
    pub source_id: String,
    /// That VM's name.
    pub source_name: String,
    /// When (µs since the epoch).
    pub created_at: u64,
    /// The VM's spec: a restored VM has the same machine.
    pub spec: ResolvedSpec,
    /// Its containers (their layer disks are on the restored VM's command
    /// line, as they were plugged when it was saved).
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// The MAC of its boot NIC, which the saved device keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<kiln_net::MacAddr>,
}

/// A snapshot as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The VM it was taken of (it may be gone since).
    pub source_id: String,
    /// That VM's name.
    pub source_name: String,
    /// When (µs since the epoch).
    pub created_at: u64,
    /// Guest CPUs and RAM of VMs restored from it.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
    /// Disk space it takes (allocated blocks).
    pub size_bytes: u64,
    /// Names of the containers it runs.
    pub containers: Vec<String>,
}

/// Where snapshots live.
pub fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

fn check_name(name: &str) -> Result<(), EngineError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(EngineError::InvalidArgument(format!(
            "{name:?} is not a snapshot name (1 to 64 of [A-Za-z0-9_.-], starting with a letter or digit)"
        )))
    }
}

/// A snapshot being written.
#[derive(Debug)]
pub struct Build {
    dir: PathBuf,
    final_dir: PathBuf,
}

impl Build {
    /// Starts snapshot `name`: `AlreadyExists` if there is one.
    pub fn begin(state_dir: &Path, name: &str) -> Result<Self, EngineError> {
        check_name(name)?;
        let root = root(state_dir);
        let final_dir = root.join(name);
        if final_dir.exists() {
            return Err(EngineError::AlreadyExists(format!("snapshot {name}")));
        }
        let dir = root.join(format!("{BUILD_PREFIX}{name}"));
        if dir.exists() {
            return Err(EngineError::Busy {
                id: format!("snapshot {name}"),
            });
        }
        create_private_dir(&dir)?;
        Ok(Self { dir, final_dir })
    }

    /// Where the guest's RAM goes.
    pub fn template(&self) -> Template {
        Template {
            dir: self.dir.clone(),
        }
    }

    /// Where the finished snapshot lives.
    pub fn final_dir(&self) -> &Path {
        &self.final_dir
    }

    /// Where the full migration stream goes before it is turned into the
    /// RAM file (removed by [`Build::finish`]).
    pub fn stream(&self) -> PathBuf {
        self.dir.join("stream")
    }

    /// Sync, write `snapshot.json`, rename into place.
    pub fn finish(self, meta: &SnapshotMeta) -> Result<SnapshotInfo, EngineError> {
        let _ = std::fs::remove_file(self.stream());
        let template = self.template();
        for file in [template.memory(), template.state()] {
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| StoreError::Io {
                    path: file.clone(),
                    source: e,
                })?;
        }
        let json = serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Serialize {
            key: meta.name.clone(),
            source: e,
        })?;
        write_atomic(&self.dir.join(META_FILE), &json)?;
        std::fs::rename(&self.dir, &self.final_dir).map_err(|e| StoreError::Io {
            path: self.final_dir.clone(),
            source: e,
        })?;
        Ok(info(meta, &self.final_dir))
    }

    /// Gives up: nothing stays.
    pub fn discard(self) {
        remove_tree(&self.dir);
    }
}

/// Snapshot `name`: its saved machine and what it was.
pub fn load(state_dir: &Path, name: &str) -> Result<(Template, SnapshotMeta), EngineError> {
    check_name(name)?;
    let dir = root(state_dir).join(name);
    let missing = || EngineError::NoSuchSnapshot(name.to_owned());
    let bytes = std::fs::read(dir.join(META_FILE)).map_err(|_| missing())?;
    let meta: SnapshotMeta = serde_json::from_slice(&bytes).map_err(|e| {
        EngineError::FileFailed(format!("snapshot {name}: unreadable {META_FILE}: {e}"))
    })?;
    Ok((Template { dir }, meta))
}

/// Every finished snapshot, by name.
pub fn list(state_dir: &Path) -> Vec<SnapshotInfo> {
    let Ok(entries) = std::fs::read_dir(root(state_dir)) else {
        return Vec::new();
    };
    let mut all: Vec<SnapshotInfo> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let (template, meta) = load(state_dir, &name).ok()?;
            Some(info(&meta, &template.dir))
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Removes snapshot `name`. VMs restored from it keep running: their
/// QEMU maps the RAM file, which lives on until they exit.
pub fn remove(state_dir: &Path, name: &str) -> Result<(), EngineError> {
    let (template, _) = load(state_dir, name)?;
    // Renamed away first: the name is free at once, and a crash while
    // deleting leaves a build directory, removed at the next start.
    let doomed = root(state_dir).join(format!("{BUILD_PREFIX}{name}.removing"));
    std::fs::rename(&template.dir, &doomed).map_err(|e| StoreError::Io {
        path: template.dir.clone(),
        source: e,
    })?;
    remove_tree(&doomed);
    Ok(())
}

/// Removes what unfinished builds left (start-up).
pub fn remove_unfinished(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(root(state_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(BUILD_PREFIX)
        {
            remove_tree(&entry.path());
        }
    }
}

fn info(meta: &SnapshotMeta, dir: &Path) -> SnapshotInfo {
    use std::os::unix::fs::MetadataExt;
    let size_bytes = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0);
    SnapshotInfo {
        name: meta.name.clone(),
        source_id: meta.source_id.clone(),
        source_name: meta.source_name.clone(),
        created_at: meta.created_at,
        vcpus: meta.spec.vcpus,
        memory_mib: meta.spec.memory_mib,
        size_bytes,
        containers: meta.containers.iter().map(|c| c.name.clone()).collect(),
    }
}
