//! Wire types of the container methods of `io.kiln.Agent`: a container is a
//! process the agent runs in its own namespaces on an overlay of read-only
//! erofs layer disks (found by serial) and a writable upper layer.
//!
//! The limits below are enforced by the agent; a host should check them
//! before it hot-plugs anything.

use serde::{Deserialize, Serialize};

use crate::ExecRequest;

/// Containers one guest runs at once (running or exited, not removed),
/// unless the kernel command line says `kiln.max_containers=N`.
pub const DEFAULT_MAX_CONTAINERS: usize = 8;
/// Largest `kiln.max_containers` the agent accepts.
pub const LIMIT_MAX_CONTAINERS: usize = 64;
/// Longest container id.
pub const MAX_CONTAINER_ID_BYTES: usize = 64;
/// Longest disk serial: QEMU's `scsi-hd` reports at most 36 bytes in VPD
/// page 0x80.
pub const MAX_SERIAL_BYTES: usize = 36;
/// Most layers of one container.
pub const MAX_LAYERS: usize = 64;
/// Most entries of `args` and of `env`.
pub const MAX_PROCESS_STRINGS: usize = 4096;
/// Longest single argument or environment entry (Linux `MAX_ARG_STRLEN`).
pub const MAX_PROCESS_STRING_BYTES: usize = 128 * 1024;
/// Most bytes of `args` and `env` together.
pub const MAX_PROCESS_TOTAL_BYTES: usize = 1024 * 1024;
/// Longest `cwd` (Linux `PATH_MAX` without the NUL).
pub const MAX_PATH_BYTES: usize = 4095;
/// Longest `user`.
pub const MAX_USER_BYTES: usize = 256;
/// Largest tmpfs upper layer, MiB.
pub const MAX_STORAGE_MIB: u64 = 1024 * 1024;
/// How long a missing disk is waited for unless the call says otherwise.
pub const DEFAULT_DISK_TIMEOUT_MS: u64 = 10_000;
/// Longest `diskTimeoutMs`.
pub const LIMIT_DISK_TIMEOUT_MS: u64 = 120_000;
/// Bytes of output kept per container (stdout and stderr together).
pub const LOG_BUFFER_BYTES: usize = 1024 * 1024;
/// Default and upper bound of `ContainerLogs`' `maxBytes`.
pub const DEFAULT_LOG_READ_BYTES: u32 = 64 * 1024;
/// Upper bound of `ContainerLogs`' `maxBytes`.
pub const LIMIT_LOG_READ_BYTES: u32 = 1024 * 1024;
/// `StopContainer`'s wait before SIGKILL unless the call says otherwise.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// Longest `StopContainer` `timeoutMs`.
pub const LIMIT_STOP_TIMEOUT_MS: u64 = 300_000;

/// The process a container runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerProcess {
    /// Program and arguments; `args[0]` is looked up in the container's
    /// `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries. `PATH` and `HOME` get defaults when absent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Absolute working directory in the container (default `/`), created
    /// when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `uid`, `uid:gid`, `name` or `name:group` (default `0:0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run it on a new terminal of this size (stdin, stdout and stderr),
    /// streamed like a `SpawnProcess` process instead of kept as logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<crate::WindowSize>,
    /// Keep its stdin open for `WriteProcess` (a terminal always is); its
    /// output is then streamed too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
}

impl ContainerProcess {
    /// Whether its stdio is a streamed process's (a handle for
    /// `ReadProcess` and friends) rather than the log ring.
    pub fn attached(&self) -> bool {
        self.terminal.is_some() || self.stdin
    }
}

/// Parameters of `StartContainer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartContainerRequest {
    /// Caller-chosen id, unique in the guest.
    pub id: String,
    /// Serials of the layer disks, lowest first.
    pub layers: Vec<String>,
    /// What to run.
    pub process: ContainerProcess,
    /// Hostname in the container's UTS namespace (default: the id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Size limit of the tmpfs upper layer, MiB (default: half the RAM).
    #[serde(
        default,
        rename = "storageMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub storage_mib: Option<u64>,
    /// Serial of an ext4 disk for the upper layer instead of a tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_disk: Option<String>,
    /// How long to wait for a disk to appear (default
    /// [`DEFAULT_DISK_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_timeout_ms: Option<u64>,
}

/// State of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerState {
    /// Its process is alive.
    Running,
    /// Its process ended; its file systems stay until `RemoveContainer`.
    Exited,
}

/// A container as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerInfo {
    /// The id it was started with.
    pub id: String,
    /// Running or exited.
    pub state: ContainerState,
    /// PID of its process in the guest (PID 1 inside the container).
    pub pid: u32,
    /// Exit code, or `128 + signal`, once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `CLOCK_BOOTTIME` milliseconds when it started.
    pub started_at_ms: u64,
    /// `CLOCK_BOOTTIME` milliseconds when its exit was noticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at_ms: Option<u64>,
    /// Serials of its layers, lowest first.
    pub layers: Vec<String>,
    /// Serial of its upper-layer disk; absent: a tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_disk: Option<String>,
    /// Its hostname.
    pub hostname: String,
    /// The handle of its process for `ReadProcess`, `WriteProcess`,
    /// `ResizeProcess`… when started with a terminal or stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
}

/// Reply of `StartContainer` and `ContainerStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerReply {
    /// The container.
    pub container: ContainerInfo,
}

/// Parameters of `ContainerStatus` and `RemoveContainer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerIdRequest {
    /// The container's id.
    pub id: String,
}

/// Reply of `ListContainers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListContainersReply {
    /// Every container, in start order.
    pub containers: Vec<ContainerInfo>,
}

/// Parameters of `StopContainer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopContainerRequest {
    /// The container's id.
    pub id: String,
    /// Signal sent first (default 15, SIGTERM), 1 to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Wait before SIGKILL (default [`DEFAULT_STOP_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `false`: send the signal and reply at once, no SIGKILL: the host
    /// waits (polling `ContainerStatus`), so the agent serves its other
    /// calls meanwhile. Default `true`: wait for the exit, SIGKILL after
    /// `timeout_ms`. (An older agent ignores it and waits.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

/// Reply of `StopContainer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopContainerReply {
    /// The container, exited.
    pub container: ContainerInfo,
    /// It ignored the signal for `timeoutMs` and got SIGKILL.
    pub killed: bool,
}

/// What `RemoveContainer` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RemoveResult {
    /// It existed and is gone now.
    Removed,
    /// No container had that id (removed before, or never started).
    AlreadyGone,
}

/// Reply of `RemoveContainer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveContainerReply {
    /// Removed, or already gone.
    pub result: RemoveResult,
}

/// Parameters of `ContainerLogs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerLogsRequest {
    /// The container's id.
    pub id: String,
    /// Cursor to read from (a previous reply's `cursor`); default: the
    /// oldest byte kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// At most this many bytes (default [`DEFAULT_LOG_READ_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u32>,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Consecutive output of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerLogEntry {
    /// The stream.
    pub stream: LogStream,
    /// The bytes (lossy UTF-8).
    pub text: String,
}

/// Reply of `ContainerLogs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerLogsReply {
    /// Output in the order it was written.
    pub entries: Vec<ContainerLogEntry>,
    /// Pass as `since` to read on.
    pub cursor: u64,
    /// Bytes after `since` that were dropped from the ring buffer.
    pub dropped: u64,
    /// The container exited and all its output has been returned.
    pub ended: bool,
}

/// Parameters of `Exec` as the agent reads them: [`ExecRequest`] plus the
/// optional `container` to run in. Kept apart from `ExecRequest` so that
/// hosts building `ExecRequest` field by field keep compiling; the wire
/// form is the same flat object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecInRequest {
    /// The command.
    #[serde(flatten)]
    pub exec: ExecRequest,
    /// Id of a running container to run it in; absent: the guest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Error parameters of `DiskNotFound` and `NotErofs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskParameters {
    /// The disk's serial.
    pub serial: String,
}

/// Error parameters of `NoSuchContainer`, `ContainerExists` and
/// `ContainerNotRunning`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerIdParameters {
    /// The container's id.
    pub id: String,
}

/// Error parameters of `TooManyContainers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TooManyContainersParameters {
    /// The guest's limit.
    pub max: u32,
}

/// Error parameters of `InvalidProcessSpec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidProcessSpecParameters {
    /// `args`, `env`, `cwd` or `user`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Error parameters of `ExecFormatError`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecFormatParameters {
    /// The program as asked for.
    pub program: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn start_container_wire_form() {
        let req: StartContainerRequest = serde_json::from_value(json!({
            "id": "web",
            "layers": ["l0", "l1"],
            "process": {"args": ["/bin/sh"], "env": ["A=b"], "cwd": "/srv", "user": "1000:1000"},
            "storageMiB": 64,
            "diskTimeoutMs": 500
        }))
        .expect("request");
        assert_eq!(req.storage_mib, Some(64));
        assert_eq!(req.disk_timeout_ms, Some(500));
        assert_eq!(req.process.user.as_deref(), Some("1000:1000"));
        let back = serde_json::to_value(&req).expect("json");
        assert_eq!(back["storageMiB"], 64);
        assert!(back.get("upperDisk").is_none());
        let minimal: StartContainerRequest = serde_json::from_value(
            json!({"id": "a", "layers": ["x"], "process": {"args": ["true"]}}),
        )
        .expect("minimal");
        assert!(minimal.process.env.is_empty());
    }

    #[test]
    fn enums_are_camel_case() {
        assert_eq!(json!(ContainerState::Running), json!("running"));
        assert_eq!(json!(RemoveResult::AlreadyGone), json!("alreadyGone"));
        assert_eq!(json!(LogStream::Stderr), json!("stderr"));
    }

    #[test]
    fn exec_in_is_flat_on_the_wire() {
        let req: ExecInRequest = serde_json::from_value(json!({
            "argv": ["ls"], "timeoutMs": 5, "container": "web"
        }))
        .expect("request");
        assert_eq!(req.exec.argv, ["ls"]);
        assert_eq!(req.exec.timeout_ms, Some(5));
        assert_eq!(req.container.as_deref(), Some("web"));
        let plain: ExecInRequest = serde_json::from_value(json!({"argv": ["ls"]})).expect("plain");
        assert_eq!(plain.container, None);
        assert_eq!(
            serde_json::to_value(&req).expect("json"),
            json!({"argv": ["ls"], "env": [], "timeoutMs": 5, "container": "web"})
        );
    }
}
