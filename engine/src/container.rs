//! Containers in VMs: what a caller asks for ([`ContainerSpec`]), what is
//! persisted once its image is resolved ([`ContainerRecord`]), what callers
//! see ([`ContainerInfo`]), and how its image's layers are named on the
//! VM's SCSI bus ([`DiskAttachment`]).
//!
//! A container runs one image's process in its own namespaces in the guest
//! (the agent does that, `guest/agent/src/container/`), on an overlay of the
//! image's layers: each layer is an erofs file from the image store,
//! hot-plugged read-only as a `scsi-hd` the agent finds by serial. Kiln
//! picks every serial and address itself, so nothing depends on the order
//! in which the guest names disks.

use std::path::PathBuf;

use kiln_agent_proto::{
    self as proto, ContainerProcess, ContainerState as AgentState, MAX_LAYERS, MAX_PROCESS_STRINGS,
    MAX_PROCESS_STRING_BYTES, MAX_PROCESS_TOTAL_BYTES, MAX_USER_BYTES,
};
use kiln_image::ProcessConfig;
use serde::{Deserialize, Serialize};

use crate::name::{is_valid_name, MAX_NAME_LEN};

/// Smallest writable disk (`storageDisk`): ext4's own overhead leaves
/// little room below this.
pub const MIN_STORAGE_DISK_MIB: u64 = 16;

/// The LUN of a container's writable disk (above every layer's).
pub const UPPER_DISK_LUN: u16 = MAX_LAYERS as u16;

/// Containers one VM may run unless `max_containers_per_vm` says otherwise.
pub const DEFAULT_MAX_CONTAINERS: u32 = proto::DEFAULT_MAX_CONTAINERS as u32;

/// The name of the container a VM created with `image` runs.
pub const MAIN_CONTAINER: &str = "main";

/// A container as asked for (`AddContainer`, or a VM spec's `image` and
/// process fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSpec {
    /// Unique in the VM (a name like a VM's).
    pub name: String,
    /// A stored image: a reference (its tag) or a digest.
    pub image: String,
    /// Replaces the image's `Cmd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's `Entrypoint` (and, as Docker does, drops the
    /// image's `Cmd` unless `command` is given too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` entries, merged over the image's by key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory (absolute); default: the image's, else `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `uid[:gid]` or `name[:group]`; default: the image's, else root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Size of the writable layer (a guest tmpfs), MiB; default: the
    /// agent's (half the guest's RAM).
    #[serde(
        default,
        rename = "storageMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub storage_mib: Option<u64>,
    /// The writable layer is an ext4 disk of `storageMiB` (a sparse file
    /// on the host, kept across the VM's restarts, removed with the
    /// container) instead of a tmpfs: for writes larger than the guest's
    /// RAM, or that should outlive a reboot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storage_disk: bool,
    /// What happens when its process exits (default `no`).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_no")]
    pub restart_policy: RestartPolicy,
    /// Its process runs on a new terminal of this size, streamed like a
    /// `StartProcess` process: its `handle` (in `ListContainers`) is for
    /// `AttachProcess`, `WriteProcess`, `ResizeProcess`, `WaitProcess`,
    /// and its output is not in `ContainerLogs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<proto::WindowSize>,
    /// Its stdin stays open for `WriteProcess` (pipes); streamed as with a
    /// terminal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
}

/// What happens when a container's process exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// It stays exited; a VM's `main` container that exits stops the VM
    /// (the VM was made to run it).
    #[default]
    No,
    /// Started again when it exits with a non-zero code.
    OnFailure,
    /// Started again whenever it exits.
    Always,
}

impl RestartPolicy {
    fn is_no(&self) -> bool {
        *self == Self::No
    }

    /// Whether an exit with `code` restarts the container.
    pub fn restarts_after(self, code: Option<i32>) -> bool {
        match self {
            Self::No => false,
            Self::OnFailure => code != Some(0),
            Self::Always => true,
        }
    }
}

/// Delay before restart number `n` (1-based): 100 ms doubling, at most 10 s,
/// so a container that dies at once costs a few restarts a minute.
pub fn restart_delay(n: u32) -> std::time::Duration {
    let ms = 100u64.saturating_mul(1u64 << n.saturating_sub(1).min(10));
    std::time::Duration::from_millis(ms.min(10_000))
}

/// Why a container spec was refused (wire: `InvalidSpec`, as
/// `SpecError::Container`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ContainerSpecError(pub String);

fn invalid(message: impl Into<String>) -> ContainerSpecError {
    ContainerSpecError(message.into())
}

impl ContainerSpec {
    /// Check what can be checked before the image is looked up: the name,
    /// the image name's shape (the store checks the rest), sizes.
    pub fn validate(&self) -> Result<(), ContainerSpecError> {
        if !is_valid_name(&self.name) {
            return Err(invalid(format!(
                "container name {:?}: 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -",
                self.name.chars().take(80).collect::<String>(),
            )));
        }
        if self.image.is_empty() || self.image.len() > 512 {
            return Err(invalid("image must be 1 to 512 characters"));
        }
        let strings = self
            .command
            .iter()
            .chain(&self.entrypoint)
            .flatten()
            .chain(&self.env);
        let (mut count, mut total) = (0usize, 0usize);
        for s in strings {
            count += 1;
            total += s.len();
            if s.len() > MAX_PROCESS_STRING_BYTES || s.contains('\0') {
                return Err(invalid(format!(
                    "an argument or environment entry is over {MAX_PROCESS_STRING_BYTES} bytes or has a NUL"
                )));
            }
        }
        if count > MAX_PROCESS_STRINGS || total > MAX_PROCESS_TOTAL_BYTES {
            return Err(invalid(format!(
                "at most {MAX_PROCESS_STRINGS} arguments and environment entries, {MAX_PROCESS_TOTAL_BYTES} bytes in all"
            )));
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(invalid(format!("env entry {bad:?} is not KEY=VALUE")));
        }
        if let Some(dir) = &self.workdir {
            if !dir.starts_with('/') || dir.len() > proto::MAX_PATH_BYTES || dir.contains('\0') {
                return Err(invalid("workdir must be an absolute path"));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.len() > MAX_USER_BYTES || user.chars().any(char::is_control)
            {
                return Err(invalid(format!(
                    "user must be 1 to {MAX_USER_BYTES} printable bytes"
                )));
            }
        }
        if let Some(mib) = self.storage_mib {
            if mib == 0 || mib > proto::MAX_STORAGE_MIB {
                return Err(invalid(format!(
                    "storageMiB must be 1 to {}",
                    proto::MAX_STORAGE_MIB
                )));
            }
        }
        if let Some(size) = self.terminal {
            if size.rows == 0 || size.cols == 0 {
                return Err(invalid("terminal rows and cols must be 1 to 65535"));
            }
        }
        if (self.terminal.is_some() || self.stdin) && !self.restart_policy.is_no() {
            return Err(invalid(
                "a container with a terminal or stdin is not restarted: its streams end with its process (restartPolicy must be no)",
            ));
        }
        if self.storage_disk && self.storage_mib.is_none_or(|m| m < MIN_STORAGE_DISK_MIB) {
            return Err(invalid(format!(
                "storageDisk needs storageMiB of at least {MIN_STORAGE_DISK_MIB}"
            )));
        }
        Ok(())
    }

    /// The process to run: the image's config with this spec's overrides,
    /// as `docker run` applies them.
    pub fn process(&self, image: &ProcessConfig) -> Result<ContainerProcess, ContainerSpecError> {
        let entrypoint = self.entrypoint.as_ref().unwrap_or(&image.entrypoint);
        let command = match (&self.command, &self.entrypoint) {
            (Some(command), _) => command.clone(),
            // A new entrypoint does not inherit the image's arguments.
            (None, Some(_)) => Vec::new(),
            (None, None) => image.cmd.clone(),
        };
        let args: Vec<String> = entrypoint.iter().cloned().chain(command).collect();
        if args.is_empty() {
            return Err(invalid(
                "the image names no command (Entrypoint and Cmd are empty): give command",
            ));
        }
        Ok(ContainerProcess {
            args,
            env: merge_env(&image.env, &self.env),
            cwd: self.workdir.clone().or_else(|| image.working_dir.clone()),
            user: self
                .user
                .clone()
                .or_else(|| image.user.clone().filter(|u| !u.is_empty())),
            terminal: self.terminal,
            stdin: self.stdin,
        })
    }
}

/// `base` with `overrides` applied by key (a key keeps its first place).
pub(crate) fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_owned();
    let mut merged: Vec<String> = Vec::with_capacity(base.len() + overrides.len());
    for entry in base.iter().chain(overrides) {
        let k = key(entry);
        match merged.iter_mut().find(|e| key(e) == k) {
            Some(slot) => *slot = entry.clone(),
            None => merged.push(entry.clone()),
        }
    }
    merged
}

/// Where a container is in its life, as Kiln last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerPhase {
    /// Recorded; its disks and process come with the VM's next boot.
    Created,
    /// Disks being attached, process being started.
    Starting,
    /// Its process runs.
    Running,
    /// Its process ended (see `exitCode`).
    Exited,
    /// It could not be started (see `error`).
    Failed,
}

/// A container as persisted in its VM's record: the image resolved to a
/// digest and files, the process resolved from the image's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    /// Unique in the VM.
    pub name: String,
    /// The image as asked for.
    pub image: String,
    /// The image's manifest digest (what the VM holds; a tag may move).
    pub digest: String,
    /// Its SCSI target on the VM's controller (see [`DiskAttachment`]).
    pub slot: u8,
    /// erofs files of its layers, lowest first.
    pub layers: Vec<PathBuf>,
    /// The process.
    pub process: ContainerProcess,
    /// tmpfs size of its writable layer, MiB.
    #[serde(
        default,
        rename = "storageMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub storage_mib: Option<u64>,
    /// Its writable ext4 disk (`storageDisk`): a sparse file of
    /// `storageMiB`, made before its first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_disk: Option<PathBuf>,
    /// What happens when it exits.
    #[serde(default, skip_serializing_if = "RestartPolicy::is_no")]
    pub restart_policy: RestartPolicy,
    /// Times it was started again after an exit (this boot and before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Last known phase.
    pub phase: ContainerPhase,
    /// PID in the guest while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Exit code (or 128 + signal) once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The streamed-process handle of its process (a terminal or stdin),
    /// valid for this boot of the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
}

impl ContainerRecord {
    /// The image-store user this container is (`vm:<id>:<name>`).
    pub fn image_user(&self, vm_id: &str) -> String {
        image_user(vm_id, &self.name)
    }

    /// Its disks, lowest layer first, then its writable disk if it has
    /// one.
    pub fn disks(&self) -> Vec<DiskAttachment> {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(lun, path)| DiskAttachment::layer(self.slot, lun as u16, path.clone()));
        let upper = self
            .upper_disk
            .iter()
            .map(|path| DiskAttachment::upper(self.slot, path.clone()));
        layers.chain(upper).collect()
    }

    /// The agent request that starts it.
    pub fn start_request(&self) -> proto::StartContainerRequest {
        let (layers, upper): (Vec<_>, Vec<_>) = self.disks().into_iter().partition(|d| !d.writable);
        proto::StartContainerRequest {
            id: self.name.clone(),
            layers: layers.into_iter().map(|d| d.serial).collect(),
            process: self.process.clone(),
            hostname: None,
            // The size of a tmpfs upper; a disk has its own size.
            storage_mib: self.storage_mib.filter(|_| self.upper_disk.is_none()),
            upper_disk: upper.into_iter().next().map(|d| d.serial),
            disk_timeout_ms: None,
        }
    }

    /// Take what the agent reports.
    pub fn observe(&mut self, info: &proto::ContainerInfo) {
        match info.state {
            AgentState::Running => {
                self.phase = ContainerPhase::Running;
                self.pid = Some(info.pid);
                self.exit_code = None;
                self.handle = info.handle;
            }
            AgentState::Exited => {
                self.phase = ContainerPhase::Exited;
                self.pid = None;
                self.exit_code = info.exit_code;
            }
        }
        self.error = None;
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The image-store user of container `name` of VM `vm_id`.
pub fn image_user(vm_id: &str, name: &str) -> String {
    format!("{VM_USER_PREFIX}{vm_id}:{name}")
}

/// Image-store users that are containers of VMs start with this.
pub const VM_USER_PREFIX: &str = "vm:";

/// The VM id in an image-store user made by [`image_user`].
pub fn vm_of_image_user(user: &str) -> Option<&str> {
    user.strip_prefix(VM_USER_PREFIX)?.split(':').next()
}

/// A container as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerInfo {
    /// Unique in the VM.
    pub name: String,
    /// The image as asked for.
    pub image: String,
    /// The image's digest.
    pub digest: String,
    /// Its phase.
    pub state: ContainerPhase,
    /// PID in the guest while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Exit code once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The command it runs.
    pub command: Vec<String>,
    /// What happens when it exits.
    pub restart_policy: RestartPolicy,
    /// Times it was started again after an exit.
    pub restarts: u32,
    /// Its process's handle for `AttachProcess`, `WriteProcess`,
    /// `ResizeProcess`, `WaitProcess` (started with a terminal or stdin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
}

impl From<&ContainerRecord> for ContainerInfo {
    fn from(r: &ContainerRecord) -> Self {
        Self {
            name: r.name.clone(),
            image: r.image.clone(),
            digest: r.digest.clone(),
            state: r.phase,
            pid: r.pid,
            exit_code: r.exit_code,
            error: r.error.clone(),
            command: r.process.args.clone(),
            restart_policy: r.restart_policy,
            restarts: r.restarts,
            handle: r.handle,
        }
    }
}

/// One read-only layer disk on a VM's virtio-scsi controller (`scsi0`):
/// container slot `s` is SCSI target `s`, its layer `l` LUN `l`. The ids
/// and the serial follow from the two numbers, so a restarted kilnd (or an
/// undo) finds every disk again without a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAttachment {
    /// The file (an erofs image).
    pub path: PathBuf,
    /// SCSI target.
    pub target: u8,
    /// LUN.
    pub lun: u16,
    /// `serial=` (what the agent finds it by; at most 36 bytes).
    pub serial: String,
    /// `blockdev-add` node name.
    pub node: String,
    /// `device_add` id.
    pub device: String,
    /// The guest may write to it (a container's writable layer); layers
    /// are read-only at every level.
    pub writable: bool,
}

impl DiskAttachment {
    /// The writable disk of the container in `slot`.
    pub fn upper(slot: u8, path: PathBuf) -> Self {
        Self {
            writable: true,
            ..Self::layer(slot, UPPER_DISK_LUN, path)
        }
    }

    /// Layer `lun` of the container in `slot`.
    pub fn layer(slot: u8, lun: u16, path: PathBuf) -> Self {
        Self {
            path,
            target: slot,
            lun,
            serial: format!("kiln-{slot}-{lun}"),
            node: format!("kiln-node-{slot}-{lun}"),
            device: disk_device_id(slot, lun),
            writable: false,
        }
    }
}

/// The `device_add` id of layer `lun` of slot `slot`.
pub fn disk_device_id(slot: u8, lun: u16) -> String {
    format!("kiln-disk-{slot}-{lun}")
}

/// The slot of a device id made by [`disk_device_id`].
pub fn slot_of_device(id: &str) -> Option<u8> {
    id.strip_prefix("kiln-disk-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Most layers an image may have to run in Kiln (one disk each).
pub const MAX_IMAGE_LAYERS: usize = MAX_LAYERS;

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ProcessConfig {
        ProcessConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        }
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            image: "registry.local/web:1".into(),
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn the_image_config_applies_with_overrides_as_docker_does() {
        let plain = spec().process(&image()).expect("process");
        assert_eq!(plain.args, ["/entry", "serve", "--port=80"]);
        assert_eq!(plain.cwd.as_deref(), Some("/srv"));
        assert_eq!(plain.user.as_deref(), Some("app"));

        let command = ContainerSpec {
            command: Some(vec!["check".into()]),
            env: vec!["MODE=dev".into(), "NEW=1".into()],
            workdir: Some("/tmp".into()),
            user: Some("0:0".into()),
            ..spec()
        };
        let p = command.process(&image()).expect("process");
        assert_eq!(p.args, ["/entry", "check"]);
        assert_eq!(p.env, ["PATH=/bin", "MODE=dev", "NEW=1"]);
        assert_eq!(
            (p.cwd.as_deref(), p.user.as_deref()),
            (Some("/tmp"), Some("0:0"))
        );

        let entrypoint = ContainerSpec {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..spec()
        };
        assert_eq!(
            entrypoint.process(&image()).expect("process").args,
            ["/bin/sh"]
        );

        let empty = ProcessConfig::default();
        assert!(spec().process(&empty).is_err());
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            ContainerSpec {
                name: "a/b".into(),
                ..spec()
            },
            ContainerSpec {
                image: String::new(),
                ..spec()
            },
            ContainerSpec {
                env: vec!["NOVALUE".into()],
                ..spec()
            },
            ContainerSpec {
                workdir: Some("rel".into()),
                ..spec()
            },
            ContainerSpec {
                user: Some(String::new()),
                ..spec()
            },
            ContainerSpec {
                storage_mib: Some(0),
                ..spec()
            },
            ContainerSpec {
                command: Some(vec!["a\0b".into()]),
                ..spec()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        spec().validate().expect("valid");
        assert!(
            serde_json::from_str::<ContainerSpec>(r#"{"name":"a","image":"b","cmd":[]}"#).is_err()
        );
    }

    #[test]
    fn restart_policies_and_their_delays() {
        assert!(!RestartPolicy::No.restarts_after(Some(1)));
        assert!(RestartPolicy::OnFailure.restarts_after(Some(1)));
        assert!(RestartPolicy::OnFailure.restarts_after(None));
        assert!(!RestartPolicy::OnFailure.restarts_after(Some(0)));
        assert!(RestartPolicy::Always.restarts_after(Some(0)));
        assert_eq!(restart_delay(1).as_millis(), 100);
        assert_eq!(restart_delay(4).as_millis(), 800);
        assert_eq!(restart_delay(40).as_millis(), 10_000);
        let parsed: ContainerSpec =
            serde_json::from_str(r#"{"name":"a","image":"b","restartPolicy":"on-failure"}"#)
                .expect("spec");
        assert_eq!(parsed.restart_policy, RestartPolicy::OnFailure);
    }

    #[test]
    fn disks_are_named_by_slot_and_layer() {
        let disk = DiskAttachment::layer(3, 12, "/x.erofs".into());
        assert_eq!(disk.serial, "kiln-3-12");
        assert!(disk.serial.len() <= proto::MAX_SERIAL_BYTES);
        assert_eq!(slot_of_device(&disk.device), Some(3));
        assert_eq!(slot_of_device("nic1"), None);
        assert_eq!(vm_of_image_user(&image_user("ab12", "main")), Some("ab12"));
        assert_eq!(vm_of_image_user("pool:x"), None);
    }
}
