//! The streamed-process and copy methods of `io.kiln.Manager`:
//! `StartProcess`, `AttachProcess`, `WriteProcess`, `SignalProcess`,
//! `ResizeProcess`, `WaitProcess`, `ReleaseProcess`, `CopyIn`, `CopyOut`.
//!
//! Output travels as `more` replies (varlink's own way to stream); a
//! terminal and a copy's archive as file descriptors passed with a reply
//! or a call (varlink over a unix socket carries them, like D-Bus's `h`).

use std::os::fd::OwnedFd;
use std::time::Duration;

use futures_util::stream;
use kiln_agent_proto::{ProcessExit, WindowSize};
use kiln_engine::copy::{self, CopyTarget, DEFAULT_MAX_COPY_BYTES};
use kiln_engine::guest_io::{ProcessRead, ProcessSpec};
use kiln_engine::stream::{pump, socket_pair, ClientStdio, Follower, ProcessGuard, PumpEnd};
use kiln_engine::{EngineError, EngineHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use zlink::Reply;

use crate::service::{continues, ErrorReply, Outcome};

/// `StartProcess(id, process, detach?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartProcessParams {
    pub id: String,
    pub process: ProcessSpec,
    #[serde(default)]
    pub detach: bool,
}

/// `{id, handle}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandleParams {
    pub id: String,
    pub handle: u64,
}

/// `AttachProcess(id, handle, since?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    pub id: String,
    pub handle: u64,
    #[serde(default)]
    pub since: Option<u64>,
}

/// `WriteProcess(id, handle, data, close?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteParams {
    pub id: String,
    pub handle: u64,
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub close: bool,
}

/// `SignalProcess(id, handle, signal)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalParams {
    pub id: String,
    pub handle: u64,
    pub signal: i32,
}

/// `ResizeProcess(id, handle, rows, cols)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    pub id: String,
    pub handle: u64,
    pub rows: u16,
    pub cols: u16,
}

/// `WaitProcess(id, handle, timeoutSec?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaitParams {
    pub id: String,
    pub handle: u64,
    #[serde(default)]
    pub timeout_sec: Option<u32>,
}

/// `CopyIn` and `CopyOut(id, path, container?, maxBytes?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CopyParams {
    pub id: String,
    pub path: String,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl CopyParams {
    fn target(self) -> CopyTarget {
        CopyTarget {
            id: self.id,
            path: self.path,
            container: self.container,
            max_bytes: self.max_bytes.unwrap_or(DEFAULT_MAX_COPY_BYTES),
        }
    }
}

fn exit_json(exit: &ProcessExit) -> Value {
    json!({ "exitCode": exit.exit_code, "signal": exit.signal })
}

fn read_json(read: &ProcessRead) -> Value {
    let output: Vec<Value> = read
        .output
        .iter()
        .map(|(stream, bytes)| {
            json!({ "stream": stream, "data": kiln_agent_proto::encode_bytes(bytes) })
        })
        .collect();
    let mut reply = json!({ "output": output, "cursor": read.cursor });
    if let Some(exit) = &read.exit {
        reply["exit"] = exit_json(exit);
    }
    reply
}

fn bad_data() -> ErrorReply {
    ErrorReply::from(EngineError::InvalidArgument("data must be base64".into()))
}

/// `StartProcess`.
pub async fn start(
    engine: &EngineHandle,
    p: StartProcessParams,
    more: bool,
) -> Result<Outcome, ErrorReply> {
    let started = engine.spawn_process(&p.id, &p.process).await?;
    let first = json!({ "handle": started.handle, "pid": started.pid });
    let handle = started.handle;
    if p.process.tty.is_some() {
        return terminal(engine, &p.id, handle, first, p.detach, more).await;
    }
    if !more {
        // Nobody follows it: it runs until it ends or is released.
        return Ok(Outcome::Single(first));
    }
    let guard = ProcessGuard::new(engine.clone(), &p.id, handle, p.detach);
    Ok(follow(
        Follower::new(engine.clone(), &p.id, handle, None),
        Some(first),
        guard,
    ))
}

/// A process on a terminal: the client gets one end of a socket pair
/// (passed with the first reply); kilnd pumps the other.
async fn terminal(
    engine: &EngineHandle,
    id: &str,
    handle: u64,
    mut first: Value,
    detach: bool,
    more: bool,
) -> Result<Outcome, ErrorReply> {
    let (ours, theirs) = match socket_pair() {
        Ok(pair) => pair,
        Err(e) => {
            let _ = engine.release_process(id, handle).await;
            return Err(EngineError::ExecFailed(format!("socketpair: {e}")).into());
        }
    };
    first["terminal"] = json!(0);
    let pumped = tokio::spawn({
        let (engine, id) = (engine.clone(), id.to_owned());
        async move {
            pump(
                engine,
                &id,
                handle,
                None,
                ClientStdio::Terminal(ours),
                detach,
            )
            .await
        }
    });
    if !more {
        return Ok(Outcome::SingleWithFds(first, vec![theirs]));
    }
    let opening = (
        Ok(Reply::new(Some(first)).set_continues(Some(true))),
        vec![theirs],
    );
    let last = async move {
        let last = match pumped.await {
            Ok(Ok(PumpEnd::Exited(exit))) => Ok(json!({ "exit": exit_json(&exit) })),
            Ok(Ok(PumpEnd::ClientGone)) => Ok(json!({})),
            Ok(Err(e)) => Err(ErrorReply::from(e)),
            Err(e) => Err(ErrorReply::from(EngineError::ExecFailed(format!(
                "terminal: {e}"
            )))),
        };
        let last = last.map(|v| Reply::new(Some(v)).set_continues(Some(false)));
        (last, Vec::<OwnedFd>::new())
    };
    use futures_util::StreamExt;
    Ok(Outcome::Stream(Box::pin(
        stream::iter([opening]).chain(stream::once(last)),
    )))
}

/// `more` replies from a follower: `first` (if any), one per read, the
/// one with the exit last. The guard kills the process if the client
/// drops the stream first.
fn follow(follower: Follower, first: Option<Value>, guard: ProcessGuard) -> Outcome {
    use futures_util::StreamExt;
    let opening = stream::iter(first.map(continues));
    let reads = stream::unfold(Some((follower, guard)), |state| async move {
        let (mut follower, mut guard) = state?;
        match follower.next().await? {
            Err(e) => Some(((Err(ErrorReply::from(e)), Vec::new()), None)),
            Ok(read) if read.exit.is_some() => {
                guard.disarm();
                let last = Reply::new(Some(read_json(&read))).set_continues(Some(false));
                Some(((Ok(last), Vec::new()), None))
            }
            Ok(read) => Some((continues(read_json(&read)), Some((follower, guard)))),
        }
    });
    Outcome::Stream(Box::pin(opening.chain(reads)))
}

/// `AttachProcess`: with `more`, everything from `since` until the exit
/// (the process is not killed when this client goes: it was detached);
/// without, one read.
pub async fn attach(
    engine: &EngineHandle,
    p: AttachParams,
    more: bool,
) -> Result<Outcome, ErrorReply> {
    if !more {
        let read = engine.read_process(&p.id, p.handle, p.since).await?;
        return Ok(Outcome::Single(read_json(&read)));
    }
    let guard = ProcessGuard::new(engine.clone(), &p.id, p.handle, true);
    Ok(follow(
        Follower::new(engine.clone(), &p.id, p.handle, p.since),
        None,
        guard,
    ))
}

/// `WriteProcess`.
pub async fn write(engine: &EngineHandle, p: WriteParams) -> Result<Outcome, ErrorReply> {
    let data = kiln_agent_proto::decode_bytes(&p.data).ok_or_else(bad_data)?;
    engine
        .write_process(&p.id, p.handle, &data, p.close)
        .await?;
    Ok(Outcome::Single(json!({})))
}

/// `SignalProcess`.
pub async fn signal(engine: &EngineHandle, p: SignalParams) -> Result<Outcome, ErrorReply> {
    engine.signal_process(&p.id, p.handle, p.signal).await?;
    Ok(Outcome::Single(json!({})))
}

/// `ResizeProcess`.
pub async fn resize(engine: &EngineHandle, p: ResizeParams) -> Result<Outcome, ErrorReply> {
    let size = WindowSize {
        rows: p.rows,
        cols: p.cols,
    };
    engine.resize_process(&p.id, p.handle, size).await?;
    Ok(Outcome::Single(json!({})))
}

/// `WaitProcess`.
pub async fn wait(engine: &EngineHandle, p: WaitParams) -> Result<Outcome, ErrorReply> {
    let timeout = Duration::from_secs(u64::from(p.timeout_sec.unwrap_or(60)));
    let exit = engine.wait_process(&p.id, p.handle, timeout).await?;
    Ok(Outcome::Single(json!({ "exit": exit_json(&exit) })))
}

/// `ReleaseProcess`.
pub async fn release(engine: &EngineHandle, p: HandleParams) -> Result<Outcome, ErrorReply> {
    engine.release_process(&p.id, p.handle).await?;
    Ok(Outcome::Single(json!({})))
}

/// `CopyIn`: the archive comes as the call's first file descriptor.
pub async fn copy_in(
    engine: &EngineHandle,
    p: CopyParams,
    fds: Vec<OwnedFd>,
) -> Result<Outcome, ErrorReply> {
    let Some(archive) = fds.into_iter().next() else {
        return Err(EngineError::InvalidArgument(
            "CopyIn needs the archive as a file descriptor".into(),
        )
        .into());
    };
    let stats = copy::copy_in(engine, &p.target(), archive).await?;
    Ok(Outcome::Single(json!(stats)))
}

/// `CopyOut`: the archive is written to a pipe whose read end goes with
/// the reply; with `more`, a last reply tells how the copy ended.
pub async fn copy_out(
    engine: &EngineHandle,
    p: CopyParams,
    more: bool,
) -> Result<Outcome, ErrorReply> {
    let target = p.target();
    target.validate()?;
    let (reader, writer) =
        kiln_engine::stream::pipe().map_err(|e| EngineError::FileFailed(format!("pipe: {e}")))?;
    let copied = tokio::spawn({
        let engine = engine.clone();
        async move { copy::copy_out(&engine, &target, writer).await }
    });
    let first = json!({ "archive": 0 });
    if !more {
        return Ok(Outcome::SingleWithFds(first, vec![reader]));
    }
    let opening = (
        Ok(Reply::new(Some(first)).set_continues(Some(true))),
        vec![reader],
    );
    let last = async move {
        let last = match copied.await {
            Ok(Ok(stats)) => Ok(Reply::new(Some(json!(stats))).set_continues(Some(false))),
            Ok(Err(e)) => Err(ErrorReply::from(e)),
            Err(e) => Err(ErrorReply::from(EngineError::FileFailed(format!(
                "copy: {e}"
            )))),
        };
        (last, Vec::<OwnedFd>::new())
    };
    use futures_util::StreamExt;
    Ok(Outcome::Stream(Box::pin(
        stream::iter([opening]).chain(stream::once(last)),
    )))
}
