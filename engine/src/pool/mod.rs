//! Pool definitions: the schema and where it comes from.
//!
//! A pool is a named [`PoolSpec`]. Definitions come from `*.toml` files in
//! layered directories — vendor (`/usr/lib/kiln/pools.d`), admin
//! (`/etc/kiln/pools.d`), runtime (`/run/kiln/pools.d`) — where a later
//! directory's file replaces an earlier one *with the same file name*, and a
//! file that is empty or a symlink to `/dev/null` masks it (systemd drop-in
//! style). The same serde type is the body of the API's `CreatePool`.
//!
//! This module holds the schema, reads and validates definitions, and
//! defines what callers see of a pool ([`PoolInfo`]); keeping pools filled
//! is the engine's job (`engine/pools.rs`), templates live in
//! [`crate::pool::template`].

pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::spec::{validate_name, NetMode, SpecError, VmSpec};

/// Most VMs one pool may own.
pub const MAX_POOL_VMS: u32 = 1000;
/// Most boots a pool runs at once while refilling.
pub const MAX_REFILL_CONCURRENCY: u32 = 16;

/// How a pool makes VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Clone from a paused template VM (RAM file mapped copy-on-write).
    #[default]
    Template,
    /// Boot every VM from scratch.
    Cold,
}

/// A pool as defined in a file or through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// `template` (default) or `cold`.
    #[serde(default)]
    pub mode: PoolMode,
    /// Hot VMs kept ready.
    pub warm: u32,
    /// Hard cap of VMs the pool owns: hot + booting + leased.
    pub max: u32,
    /// Boots run at once while refilling (default 2).
    #[serde(default = "default_refill_concurrency")]
    pub refill_concurrency: u32,
    /// A lease that expires puts its VM back hot (reset from the
    /// template) instead of destroying it (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recycle_on_expiry: bool,
    /// The VM every pool member is made from. With `image`, the pool is a
    /// per-image pool: its template runs the container (docs/images.md).
    #[serde(default)]
    pub vm: VmSpec,
    /// Seconds the container of a per-image template runs before the
    /// template is saved (0 to [`MAX_WARMUP_SEC`], default 0): a workload
    /// that warms caches at start is saved warm.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_sec: u32,
}

/// Longest `warmupSec`.
pub const MAX_WARMUP_SEC: u32 = 600;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_refill_concurrency() -> u32 {
    2
}

/// Why a pool definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolSpecError {
    /// The pool name is not acceptable.
    #[error(transparent)]
    Name(SpecError),
    /// `warm` is above `max`, or `max` out of range.
    #[error("need 0 <= warm <= max and 1 <= max <= {MAX_POOL_VMS}, got warm {warm}, max {max}")]
    Counts {
        /// Requested warm count.
        warm: u32,
        /// Requested cap.
        max: u32,
    },
    /// `warmupSec` above [`MAX_WARMUP_SEC`], or without `vm.image`.
    #[error("warmupSec must be 0 to {MAX_WARMUP_SEC} and needs vm.image, got {0}")]
    Warmup(u32),
    /// `vm.storageDisk` in a template pool: every clone would resume with
    /// the template's disk mounted as its writable layer.
    #[error(
        "storageDisk is for cold pools only: a template's clones would share its writable disk"
    )]
    StorageDisk,
    /// `refillConcurrency` out of range.
    #[error("refillConcurrency must be between 1 and {MAX_REFILL_CONCURRENCY}, got {0}")]
    Concurrency(u32),
    /// A fixed address or a port forward in a pool's VM spec (it would
    /// need to go to every VM of the pool).
    #[error("pool VMs cannot have a fixed network address, port forwards or a caller's namespace")]
    NetworkFixed,
    /// `vm.boot: image`: an OS image boots cold, with its own kernel and
    /// init, so there is nothing a pool could keep warm (docs/images.md).
    #[error("boot: image VMs boot cold (their own kernel and init): they cannot be pooled")]
    OsBoot,
}

impl PoolSpec {
    /// Check the pool's own bounds (the VM spec is checked when resolved).
    pub fn validate(&self, name: &str) -> Result<(), PoolSpecError> {
        validate_name(name).map_err(PoolSpecError::Name)?;
        if self.max == 0 || self.max > MAX_POOL_VMS || self.warm > self.max {
            return Err(PoolSpecError::Counts {
                warm: self.warm,
                max: self.max,
            });
        }
        if self.refill_concurrency == 0 || self.refill_concurrency > MAX_REFILL_CONCURRENCY {
            return Err(PoolSpecError::Concurrency(self.refill_concurrency));
        }
        if self.vm.network.as_ref().is_some_and(|n| {
            n.address.is_some() || !n.forwards.is_empty() || n.mode == NetMode::Netns
        }) {
            return Err(PoolSpecError::NetworkFixed);
        }
        if self.vm.boot.is_some_and(|b| !b.is_kiln()) {
            return Err(PoolSpecError::OsBoot);
        }
        if self.mode == PoolMode::Template && self.vm.storage_disk == Some(true) {
            return Err(PoolSpecError::StorageDisk);
        }
        if self.warmup_sec > MAX_WARMUP_SEC || (self.warmup_sec > 0 && self.vm.image.is_none()) {
            return Err(PoolSpecError::Warmup(self.warmup_sec));
        }
        Ok(())
    }
}

/// Where a pool stands, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolState {
    /// Fewer than `warm` VMs are hot; boots are under way.
    Filling,
    /// `warm` VMs are hot (or the pool is at `max`).
    Ready,
    /// The template VM is being booted and saved.
    BuildingTemplate,
    /// A boot failed; the next one waits (exponential back-off).
    Backoff,
    /// Boots keep failing (a crash loop): retried only rarely; see `lastError`.
    Failed,
}

/// A pool as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// `template` or `cold`.
    pub mode: PoolMode,
    /// Hot VMs kept ready.
    pub warm: u32,
    /// Cap of VMs the pool owns.
    pub max: u32,
    /// Boots run at once while refilling.
    pub refill_concurrency: u32,
    /// Whether an expired lease's VM is put back hot rather than destroyed.
    pub recycle_on_expiry: bool,
    /// Where it stands.
    pub state: PoolState,
    /// Ready, unleased VMs.
    pub hot: u32,
    /// VMs being booted or cloned.
    pub booting: u32,
    /// VMs handed out and not yet released.
    pub leased: u32,
    /// Boots that failed since the last one that worked.
    pub failed: u32,
    /// `Acquire` calls waiting for a VM.
    pub waiting: u32,
    /// Whether the template is built and on disk (template pools).
    pub template_ready: bool,
    /// Last boot or template error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The file the definition came from.
    pub source: PathBuf,
    /// The VM every member is made from.
    pub vm: VmSpec,
}

/// A definition that was found and accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDefinition {
    /// Pool name (the file stem).
    pub name: String,
    /// The spec.
    pub spec: PoolSpec,
    /// The file it came from.
    pub source: PathBuf,
}

/// A pool file that could not be used; the others still load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Read every `*.toml` in `dirs` (lowest precedence first) and return the
/// effective definitions by name, and the files that were refused.
pub fn load_definitions(
    dirs: &[PathBuf],
) -> (BTreeMap<String, PoolDefinition>, Vec<PoolFileError>) {
    // File name -> the path that wins for it.
    let mut winners: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file_name.ends_with(".toml") {
                winners.insert(file_name.to_owned(), path);
            }
        }
    }
    let mut pools = BTreeMap::new();
    let mut errors = Vec::new();
    for (file_name, path) in winners {
        if is_masked(&path) {
            continue;
        }
        let name = file_name.trim_end_matches(".toml").to_owned();
        match read_definition(&name, &path) {
            Ok(spec) => {
                pools.insert(
                    name.clone(),
                    PoolDefinition {
                        name,
                        spec,
                        source: path,
                    },
                );
            }
            Err(reason) => errors.push(PoolFileError { path, reason }),
        }
    }
    (pools, errors)
}

/// Empty files and symlinks to `/dev/null` mask a lower-precedence file.
fn is_masked(path: &Path) -> bool {
    if std::fs::read_link(path).is_ok_and(|target| target == Path::new("/dev/null")) {
        return true;
    }
    std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
}

fn read_definition(name: &str, path: &Path) -> Result<PoolSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let spec: PoolSpec = toml::from_str(&text).map_err(|e| e.to_string())?;
    spec.validate(name).map_err(|e| e.to_string())?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join(file), text).expect("write");
    }

    #[test]
    fn later_directories_replace_and_mask_by_file_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (vendor, admin, runtime) = (
            tmp.path().join("usr"),
            tmp.path().join("etc"),
            tmp.path().join("run"),
        );
        write(
            &vendor,
            "default.toml",
            "warm = 2\nmax = 8\n[vm]\nmemoryMiB = 128\n",
        );
        write(&vendor, "gpu.toml", "warm = 1\nmax = 2\n");
        write(&vendor, "ci.toml", "mode = \"cold\"\nwarm = 1\nmax = 4\n");
        write(&admin, "default.toml", "warm = 4\nmax = 16\n");
        write(&admin, "gpu.toml", "");
        std::fs::create_dir_all(&runtime).expect("dir");
        std::os::unix::fs::symlink("/dev/null", runtime.join("ci.toml")).expect("symlink");
        write(
            &runtime,
            "burst.toml",
            "warm = 0\nmax = 1\nrefillConcurrency = 1\n",
        );
        let (pools, errors) = load_definitions(&[vendor, admin.clone(), runtime]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["burst", "default"]);
        let default = &pools["default"];
        assert_eq!(
            (default.spec.warm, default.spec.max, default.spec.mode),
            (4, 16, PoolMode::Template)
        );
        assert_eq!(default.source, admin.join("default.toml"));
        assert_eq!(
            default.spec.vm,
            VmSpec::default(),
            "an override replaces the whole file"
        );
    }

    #[test]
    fn bad_files_are_reported_and_do_not_hide_good_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        write(&dir, "good.toml", "warm = 1\nmax = 1\n");
        write(&dir, "typo.toml", "warm = 1\nmax = 2\nwram = 3\n");
        write(&dir, "counts.toml", "warm = 5\nmax = 2\n");
        write(&dir, "vm.toml", "warm = 1\nmax = 2\n[vm]\nvcpu = 1\n");
        write(&dir, "-bad.toml", "warm = 1\nmax = 2\n");
        write(&dir, "notes.txt", "ignored");
        let (pools, errors) = load_definitions(std::slice::from_ref(&dir));
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["good"]);
        let mut refused: Vec<_> = errors
            .iter()
            .map(|e| e.path.file_name().map(|n| n.to_owned()))
            .collect();
        refused.sort();
        assert_eq!(refused.len(), 4, "{errors:?}");
        assert!(
            errors.iter().any(|e| e.reason.contains("wram")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_shipped_default_pool_is_valid() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/pools.d");
        let (pools, errors) = load_definitions(&[dir]);
        assert!(errors.is_empty(), "{errors:?}");
        let default = &pools["default"];
        assert!(default.spec.warm >= 1 && default.spec.warm <= default.spec.max);
    }

    #[test]
    fn json_and_toml_share_the_schema() {
        let json: PoolSpec =
            serde_json::from_str(r#"{"mode":"cold","warm":1,"max":2,"vm":{"memoryMiB":64}}"#)
                .expect("json");
        assert_eq!(
            (json.mode, json.refill_concurrency, json.vm.memory_mib),
            (PoolMode::Cold, 2, Some(64))
        );
        assert!(serde_json::from_str::<PoolSpec>(r#"{"warm":1,"max":2,"extra":1}"#).is_err());
    }

    #[test]
    fn os_images_are_not_pooled() {
        for mode in ["cold", "template"] {
            let spec: PoolSpec = serde_json::from_str(&format!(
                r#"{{"mode":"{mode}","warm":1,"max":1,"vm":{{"image":"os","boot":"image"}}}}"#
            ))
            .expect("json");
            assert_eq!(spec.validate("os"), Err(PoolSpecError::OsBoot), "{mode}");
        }
    }
}
