//! Processes and files in a running guest: the typed calls of the
//! streamed-process API (`StartProcess`, `AttachProcess`, `WriteProcess`,
//! `SignalProcess`, `ResizeProcess`, `WaitProcess`, `ReleaseProcess`) and
//! the file primitives the copies (module `copy`) are made of.
//!
//! The actor only resolves the VM's agent ([`Command::GuestAgent`]: the
//! VM exists, its guest answers, the container is one of its own); the
//! calls then go straight to the agent, so a long read never holds the
//! actor. The guest keeps each process's unread output (256 KiB at most,
//! then the process waits), so nothing here buffers more than one read.
//!
//! [`Command::GuestAgent`]: crate::api::Command::GuestAgent

use std::time::Duration;

use kiln_agent_proto::{
    self as proto, method, ExecRequest, FileInfo, FileLocation, ListDirectoryReply,
    MakeDirectoryRequest, MakeSymlinkRequest, ProcessExit, ProcessHandleRequest, ReadFileReply,
    ReadFileRequest, ReadProcessReply, ReadProcessRequest, ResizeProcessRequest,
    SignalProcessRequest, SpawnProcessReply, SpawnProcessRequest, StatPathReply, WindowSize,
    WriteFileRequest, WriteProcessReply, WriteProcessRequest,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{validate_exec, EngineHandle};
use crate::error::EngineError;
use crate::name::is_valid_name;

/// How long one read of a process's output waits in the guest for news.
/// The agent serves one call at a time, so this is also the longest a
/// call of another client waits behind a follower; short enough for
/// typing, long enough that an idle follower costs little.
pub const READ_WAIT: Duration = Duration::from_millis(25);
/// Most bytes of output one read returns.
pub const READ_BYTES: u32 = 256 * 1024;
/// Longest a `WriteProcess` keeps offering bytes to a process that does
/// not read its stdin.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// Longest `WaitProcess` timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Deadline of one agent call on top of what the call itself may take.
const CALL_SLACK: Duration = Duration::from_secs(10);

/// A process to start in a VM (`StartProcess`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessSpec {
    /// Program and arguments (`argv[0]` looked up in `PATH`).
    pub argv: Vec<String>,
    /// Extra environment entries, `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Run it in this container of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// A terminal of this size instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<WindowSize>,
    /// Keep stdin open for `WriteProcess` (a terminal always is).
    #[serde(default)]
    pub stdin: bool,
}

impl ProcessSpec {
    /// Checks the spec against the limits `ExecVM` has.
    pub fn validate(&self) -> Result<(), EngineError> {
        validate_exec(&ExecRequest {
            argv: self.argv.clone(),
            env: self.env.clone(),
            ..ExecRequest::default()
        })?;
        if let Some(name) = &self.container {
            if !is_valid_name(name) {
                return Err(EngineError::InvalidArgument(format!(
                    "{name:?} is not a container name"
                )));
            }
        }
        if let Some(size) = self.tty {
            validate_size(size)?;
        }
        Ok(())
    }
}

/// A terminal size must be at least 1×1.
pub fn validate_size(size: WindowSize) -> Result<(), EngineError> {
    if size.rows == 0 || size.cols == 0 {
        return Err(EngineError::InvalidArgument(
            "terminal rows and columns must be 1 to 65535".into(),
        ));
    }
    Ok(())
}

/// Output of one read, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessRead {
    /// Consecutive bytes per stream, in the order written.
    pub output: Vec<(proto::LogStream, Vec<u8>)>,
    /// Cursor after the last byte.
    pub cursor: u64,
    /// Set once the process exited and all its output was read.
    pub exit: Option<ProcessExit>,
}

impl EngineHandle {
    /// One agent call for VM `id` (`container`: checked to be the VM's).
    async fn guest_call<P: Serialize, R: DeserializeOwned>(
        &self,
        id: &str,
        container: Option<&str>,
        method: &'static str,
        parameters: &P,
        timeout: Duration,
    ) -> Result<R, EngineError> {
        let agent = self.guest_agent(id, container, method).await?;
        Ok(agent.call(method, parameters, timeout).await?)
    }

    /// An agent call whose reply carries nothing.
    async fn guest_do<P: Serialize>(
        &self,
        id: &str,
        container: Option<&str>,
        method: &'static str,
        parameters: &P,
    ) -> Result<(), EngineError> {
        let _: Value = self
            .guest_call(id, container, method, parameters, CALL_SLACK)
            .await?;
        Ok(())
    }

    /// `StartProcess`: starts the process and returns its handle at once.
    pub async fn spawn_process(
        &self,
        id: &str,
        spec: &ProcessSpec,
    ) -> Result<SpawnProcessReply, EngineError> {
        spec.validate()?;
        let request = SpawnProcessRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            container: spec.container.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
        };
        self.guest_call(
            id,
            spec.container.as_deref(),
            method::SPAWN_PROCESS,
            &request,
            CALL_SLACK,
        )
        .await
    }

    /// One read of a process's output from `since` (acknowledging what
    /// came before), waiting up to [`READ_WAIT`] for news.
    pub async fn read_process(
        &self,
        id: &str,
        handle: u64,
        since: Option<u64>,
    ) -> Result<ProcessRead, EngineError> {
        let request = ReadProcessRequest {
            handle,
            since,
            max_bytes: Some(READ_BYTES),
            wait_ms: Some(READ_WAIT.as_millis() as u64),
        };
        let reply: ReadProcessReply = self
            .guest_call(
                id,
                None,
                method::READ_PROCESS,
                &request,
                READ_WAIT + CALL_SLACK,
            )
            .await?;
        let mut output = Vec::with_capacity(reply.output.len());
        for chunk in reply.output {
            let bytes = proto::decode_bytes(&chunk.data).ok_or_else(|| {
                EngineError::AgentFailed(crate::agent::AgentError::Protocol(
                    "process output is not base64".into(),
                ))
            })?;
            output.push((chunk.stream, bytes));
        }
        Ok(ProcessRead {
            output,
            cursor: reply.cursor,
            exit: reply.exit.filter(|_| reply.ended),
        })
    }

    /// `WriteProcess`: all of `data` to the process's stdin (or terminal),
    /// offered again while the pipe is full, for at most
    /// [`WRITE_DEADLINE`]; then `close` if asked.
    pub async fn write_process(
        &self,
        id: &str,
        handle: u64,
        data: &[u8],
        close: bool,
    ) -> Result<(), EngineError> {
        if data.len() > proto::MAX_WRITE_BYTES {
            return Err(EngineError::InvalidArgument(format!(
                "at most {} bytes per write",
                proto::MAX_WRITE_BYTES
            )));
        }
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        let mut offset = 0;
        let mut pause = Duration::from_millis(2);
        loop {
            let rest = data.get(offset..).unwrap_or_default();
            let request = WriteProcessRequest {
                handle,
                data: proto::encode_bytes(rest),
                close,
            };
            let reply: WriteProcessReply = self
                .guest_call(id, None, method::WRITE_PROCESS, &request, CALL_SLACK)
                .await?;
            offset += usize::try_from(reply.written)
                .unwrap_or(usize::MAX)
                .min(rest.len());
            if offset >= data.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Timeout(format!(
                    "process {handle} did not read its stdin"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// `SignalProcess`: `signal` (1 to 64) to the process's group.
    pub async fn signal_process(
        &self,
        id: &str,
        handle: u64,
        signal: i32,
    ) -> Result<(), EngineError> {
        if !(1..=64).contains(&signal) {
            return Err(EngineError::InvalidArgument(
                "signal must be 1 to 64".into(),
            ));
        }
        let request = SignalProcessRequest { handle, signal };
        self.guest_do(id, None, method::SIGNAL_PROCESS, &request)
            .await
    }

    /// `ResizeProcess`: a new size for the process's terminal.
    pub async fn resize_process(
        &self,
        id: &str,
        handle: u64,
        size: WindowSize,
    ) -> Result<(), EngineError> {
        validate_size(size)?;
        let request = ResizeProcessRequest { handle, size };
        self.guest_do(id, None, method::RESIZE_PROCESS, &request)
            .await
    }

    /// `ReleaseProcess`: kill it if running, forget it.
    pub async fn release_process(&self, id: &str, handle: u64) -> Result<(), EngineError> {
        self.guest_do(
            id,
            None,
            method::RELEASE_PROCESS,
            &ProcessHandleRequest { handle },
        )
        .await
    }

    /// `WaitProcess`: waits up to `timeout` for the process to exit,
    /// without reading its output (a process blocked on unread output
    /// does not exit: read it, or start it without waiting).
    pub async fn wait_process(
        &self,
        id: &str,
        handle: u64,
        timeout: Duration,
    ) -> Result<ProcessExit, EngineError> {
        if timeout > MAX_WAIT {
            return Err(EngineError::InvalidArgument(
                "timeout must be at most 1 hour".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // No `since`: nothing is acknowledged, the output stays for a
            // reader; one byte at most comes back.
            let request = ReadProcessRequest {
                handle,
                since: None,
                max_bytes: Some(1),
                wait_ms: Some(0),
            };
            let reply: ReadProcessReply = self
                .guest_call(id, None, method::READ_PROCESS, &request, CALL_SLACK)
                .await?;
            if let Some(exit) = reply.exit {
                return Ok(exit);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Timeout(format!("process {handle} still runs")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // ----- files (the pieces of crate::copy) -------------------------------

    /// Metadata of `path` (not following a final symlink): `NoSuchFile`
    /// when there is nothing.
    pub async fn describe_path(
        &self,
        id: &str,
        at: &FileLocation,
    ) -> Result<FileInfo, EngineError> {
        let reply: StatPathReply = self
            .guest_call(
                id,
                at.container.as_deref(),
                method::STAT_PATH,
                at,
                CALL_SLACK,
            )
            .await?;
        Ok(reply.info)
    }

    /// Entries of the directory `path`.
    pub(crate) async fn list_directory(
        &self,
        id: &str,
        at: &FileLocation,
    ) -> Result<Vec<FileInfo>, EngineError> {
        let reply: ListDirectoryReply = self
            .guest_call(
                id,
                at.container.as_deref(),
                method::LIST_DIRECTORY,
                at,
                CALL_SLACK,
            )
            .await?;
        Ok(reply.entries)
    }

    /// Up to `max` bytes of the file at `offset`.
    pub(crate) async fn read_file(
        &self,
        id: &str,
        at: &FileLocation,
        offset: u64,
        max: u32,
    ) -> Result<Vec<u8>, EngineError> {
        let request = ReadFileRequest {
            at: at.clone(),
            offset,
            max_bytes: max,
        };
        let reply: ReadFileReply = self
            .guest_call(
                id,
                at.container.as_deref(),
                method::READ_FILE,
                &request,
                CALL_SLACK,
            )
            .await?;
        proto::decode_bytes(&reply.data).ok_or_else(|| {
            EngineError::AgentFailed(crate::agent::AgentError::Protocol(
                "file data is not base64".into(),
            ))
        })
    }

    /// One chunk of a file being written (see `WriteFile`).
    pub(crate) async fn write_file(
        &self,
        id: &str,
        request: &WriteFileRequest,
    ) -> Result<(), EngineError> {
        self.guest_do(
            id,
            request.at.container.as_deref(),
            method::WRITE_FILE,
            request,
        )
        .await
    }

    /// A directory with its mode and owner.
    pub(crate) async fn make_directory(
        &self,
        id: &str,
        request: &MakeDirectoryRequest,
    ) -> Result<(), EngineError> {
        self.guest_do(
            id,
            request.at.container.as_deref(),
            method::MAKE_DIRECTORY,
            request,
        )
        .await
    }

    /// A symlink.
    pub(crate) async fn make_symlink(
        &self,
        id: &str,
        request: &MakeSymlinkRequest,
    ) -> Result<(), EngineError> {
        self.guest_do(
            id,
            request.at.container.as_deref(),
            method::MAKE_SYMLINK,
            request,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_like_exec() {
        let ok = ProcessSpec {
            argv: vec!["sh".into()],
            tty: Some(WindowSize { rows: 24, cols: 80 }),
            ..ProcessSpec::default()
        };
        assert!(ok.validate().is_ok());
        let empty = ProcessSpec::default();
        assert_eq!(empty.validate().unwrap_err().name(), "InvalidArgument");
        let bad_env = ProcessSpec {
            env: vec!["NOEQUALS".into()],
            ..ok.clone()
        };
        assert_eq!(bad_env.validate().unwrap_err().name(), "InvalidArgument");
        let flat = ProcessSpec {
            tty: Some(WindowSize { rows: 0, cols: 80 }),
            ..ok.clone()
        };
        assert_eq!(flat.validate().unwrap_err().name(), "InvalidArgument");
        let bad_container = ProcessSpec {
            container: Some("../x".into()),
            ..ok
        };
        assert_eq!(
            bad_container.validate().unwrap_err().name(),
            "InvalidArgument"
        );
    }
}
