//! Wire types of the streamed processes (`SpawnProcess`, `ReadProcess`,
//! `WriteProcess`, `SignalProcess`, `ResizeProcess`, `ReleaseProcess`).
//!
//! Output is pulled: the agent keeps at most [`PROCESS_BUFFER_BYTES`] of a
//! process's output that the host has not acknowledged (by reading past it
//! with `since`), and stops reading the process's pipes while that is full,
//! so a process whose reader is slow blocks on its own writes instead of
//! growing any buffer. Bytes travel as standard base64 (binary-safe JSON).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::LogStream;

/// Most processes one guest keeps (running, or exited and not released).
pub const MAX_PROCESSES: usize = 64;
/// Unacknowledged output the agent keeps per process.
pub const PROCESS_BUFFER_BYTES: usize = 256 * 1024;
/// Default and upper bound of the bytes one `ReadProcess` returns.
pub const DEFAULT_PROCESS_READ_BYTES: u32 = 64 * 1024;
/// Upper bound of `ReadProcessRequest::max_bytes`.
pub const LIMIT_PROCESS_READ_BYTES: u32 = 1024 * 1024;
/// Upper bound of `ReadProcessRequest::wait_ms`.
pub const LIMIT_PROCESS_WAIT_MS: u64 = 1000;
/// Most bytes one `WriteProcess` or `WriteFile` carries (before base64).
pub const MAX_WRITE_BYTES: usize = 1024 * 1024;

/// Encodes bytes for the wire.
pub fn encode_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes bytes from the wire; `None` if `text` is not standard base64.
pub fn decode_bytes(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Size of a terminal, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSize {
    /// Rows, 1 to 65535.
    pub rows: u16,
    /// Columns, 1 to 65535.
    pub cols: u16,
}

/// Parameters of `SpawnProcess`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnProcessRequest {
    /// Program and arguments, as for `Exec`.
    pub argv: Vec<String>,
    /// Extra environment entries, `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Id of a running container to run the process in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// A pseudo-terminal of this size as stdin, stdout and stderr (the
    /// process leads a new session with it as controlling terminal);
    /// absent: pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<WindowSize>,
    /// Keep stdin open for `WriteProcess`; otherwise stdin is `/dev/null`
    /// (a terminal is always open).
    #[serde(default)]
    pub stdin: bool,
}

/// Reply of `SpawnProcess`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnProcessReply {
    /// The process's handle for the other process calls. Never reused
    /// within one boot of the guest.
    pub handle: u64,
    /// Its PID in the guest (in the container's PID namespace the agent
    /// does not see: this is the guest's view).
    pub pid: u32,
}

/// Parameters of the calls that only name a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessHandleRequest {
    /// From `SpawnProcess`.
    pub handle: u64,
}

/// Parameters of `ReadProcess`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadProcessRequest {
    /// From `SpawnProcess`.
    pub handle: u64,
    /// Cursor to read from; every byte before it is acknowledged and
    /// freed. Absent: the oldest byte kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// At most this many bytes (default [`DEFAULT_PROCESS_READ_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u32>,
    /// Wait up to this long for output or the exit when there is none yet
    /// (at most [`LIMIT_PROCESS_WAIT_MS`]; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// Consecutive output bytes of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessOutput {
    /// `stdout` (also a terminal's output) or `stderr`.
    pub stream: LogStream,
    /// The bytes, base64.
    pub data: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessExit {
    /// Exit code, or 128 + signal.
    pub exit_code: i32,
    /// Signal that ended it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Reply of `ReadProcess`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadProcessReply {
    /// Output from `since` on.
    pub output: Vec<ProcessOutput>,
    /// Cursor after the last byte returned; pass it as `since` next.
    pub cursor: u64,
    /// Set once the process has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ProcessExit>,
    /// The process has exited and all its output has been returned.
    pub ended: bool,
}

/// Parameters of `WriteProcess`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteProcessRequest {
    /// From `SpawnProcess`.
    pub handle: u64,
    /// Bytes for stdin (or the terminal), base64.
    #[serde(default)]
    pub data: String,
    /// Close stdin after `data` (a terminal gets end-of-file, ^D, instead).
    #[serde(default)]
    pub close: bool,
}

/// Reply of `WriteProcess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteProcessReply {
    /// Bytes taken; fewer than sent when the pipe is full (send the rest
    /// again later). `close` only happens once everything was taken.
    pub written: u64,
}

/// Parameters of `SignalProcess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignalProcessRequest {
    /// From `SpawnProcess`.
    pub handle: u64,
    /// Signal number, 1 to 64; sent to the process's process group.
    pub signal: i32,
}

/// Parameters of `ResizeProcess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResizeProcessRequest {
    /// From `SpawnProcess` with a `tty`.
    pub handle: u64,
    /// The new size.
    pub size: WindowSize,
}

/// Error parameters of `NoSuchProcess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoSuchProcessParameters {
    /// The handle asked for.
    pub handle: u64,
}

/// Error parameters of `TooManyProcesses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TooManyProcessesParameters {
    /// [`MAX_PROCESSES`].
    pub max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_base64() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(
            decode_bytes(&encode_bytes(&bytes)).as_deref(),
            Some(&bytes[..])
        );
        assert_eq!(decode_bytes("not base64!"), None);
    }
}
