//! QMP client: one actor task per VM connection.
//!
//! The actor owns the socket. Callers send commands through a cloneable
//! [`Qmp`] handle and await a oneshot reply under a deadline; replies are
//! matched by the `id` QMP echoes back, so a caller that gave up never
//! receives someone else's answer. Asynchronous events (`SHUTDOWN`, `RESET`,
//! `STOP`, `RESUME`, …) go to the event receiver returned by
//! [`Qmp::connect`]. When QEMU closes the socket every pending command fails
//! with [`QmpError::Disconnected`] and the event stream ends.
//!
//! Hand-written rather than the `qapi` crate: we need per-command deadlines,
//! events fanned into our own actor, and (for TAP hand-off) SCM_RIGHTS fd
//! passing with `getfd`, which `qapi`'s codec cannot carry. The handful of
//! commands Kiln uses are JSON values here; their replies are decoded into
//! small typed structs where we read them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// Longest QMP line we accept (query replies are small; this bounds memory
/// if QEMU misbehaves).
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// QMP failures.
#[derive(Debug, Clone, Error)]
pub enum QmpError {
    /// Could not connect to the QMP socket.
    #[error("cannot connect to QMP socket: {0}")]
    Connect(String),
    /// QEMU did not answer within the deadline.
    #[error("QMP command {command} timed out")]
    Timeout {
        /// Command name.
        command: String,
    },
    /// QEMU answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// Command name.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection is gone (QEMU exited or closed it).
    #[error("QMP connection closed")]
    Disconnected,
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// Event data, if any.
    #[serde(default)]
    pub data: Value,
}

struct Request {
    command: String,
    arguments: Option<Value>,
    /// A descriptor sent with the command (SCM_RIGHTS), for `getfd`.
    fd: Option<OwnedFd>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// Handle to a QMP connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Qmp {
    requests: mpsc::Sender<Request>,
    timeout: Duration,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion(pub String);

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}
#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfo,
}
#[derive(Deserialize)]
struct VersionInfo {
    qemu: VersionTriple,
    #[serde(default)]
    package: String,
}
#[derive(Deserialize)]
struct VersionTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// `running`, `paused`, `shutdown`, `inmigrate`, …
    pub status: String,
    /// Whether vCPUs run.
    pub running: bool,
}

impl Qmp {
    /// Connect, read the greeting, negotiate capabilities. Returns the
    /// handle, QEMU's version and the event stream.
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Self, QemuVersion, mpsc::Receiver<QmpEvent>), QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "connect".into(),
            })?
            .map_err(|e| QmpError::Connect(e.to_string()))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);

        let greeting_line = tokio::time::timeout(timeout, read_line(&mut lines))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
            })??
            .ok_or(QmpError::Disconnected)?;
        let greeting: Greeting = serde_json::from_str(&greeting_line)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        let v = greeting.qmp.version;
        let version = QemuVersion(
            format!(
                "{}.{}.{} {}",
                v.qemu.major,
                v.qemu.minor,
                v.qemu.micro,
                v.package.trim()
            )
            .trim()
            .to_owned(),
        );

        // Capabilities negotiation happens before the actor starts so the
        // actor only ever deals with id-tagged replies and events.
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n")
            .await
            .map_err(|_| QmpError::Disconnected)?;
        loop {
            let line = tokio::time::timeout(timeout, read_line(&mut lines))
                .await
                .map_err(|_| QmpError::Timeout {
                    command: "qmp_capabilities".into(),
                })??
                .ok_or(QmpError::Disconnected)?;
            let msg: Value =
                serde_json::from_str(&line).map_err(|e| QmpError::Protocol(e.to_string()))?;
            if msg.get("return").is_some() {
                break;
            }
            if let Some(err) = msg.get("error") {
                return Err(command_error("qmp_capabilities", err));
            }
        }

        let (req_tx, req_rx) = mpsc::channel(32);
        let (event_tx, event_rx) = mpsc::channel(64);
        tokio::spawn(run_actor(lines, write, req_rx, event_tx));
        Ok((
            Self {
                requests: req_tx,
                timeout,
            },
            version,
            event_rx,
        ))
    }

    /// Run `command` with `arguments` under the handle's deadline.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.timeout)
            .await
    }

    /// Run `command` with an explicit deadline.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None, timeout).await
    }

    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            command: command.to_owned(),
            arguments,
            fd,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| QmpError::Disconnected)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
            }),
        }
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// `stop`: pause vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resume vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_powerdown`: ACPI power button.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: hard reset.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            // QEMU may close the socket before the reply is read.
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `getfd`: hand QEMU the descriptor `fd` under `name` (sent with the
    /// command as SCM_RIGHTS), for a later `netdev_add … fd=name`. QEMU
    /// keeps its own copy; ours is closed once sent.
    pub async fn getfd(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        self.send(
            "getfd",
            Some(json!({ "fdname": name })),
            Some(fd),
            self.timeout,
        )
        .await
        .map(drop)
    }

    /// `device_add` with `arguments` (`driver`, `id`, and the device's
    /// properties).
    pub async fn device_add(&self, arguments: Value) -> Result<(), QmpError> {
        self.execute("device_add", Some(arguments)).await.map(drop)
    }

    /// `device_del`: ask the guest to release device `id`. Completion is
    /// the `DEVICE_DELETED` event, which needs the guest's cooperation
    /// (PCIe native hot-unplug).
    pub async fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute("device_del", Some(json!({ "id": id })))
            .await
            .map(drop)
    }

    /// `netdev_add` with `arguments` (`type`, `id`, and the backend's
    /// options).
    pub async fn netdev_add(&self, arguments: Value) -> Result<(), QmpError> {
        self.execute("netdev_add", Some(arguments)).await.map(drop)
    }

    /// `netdev_del`: remove backend `id` (its device must be gone).
    pub async fn netdev_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute("netdev_del", Some(json!({ "id": id })))
            .await
            .map(drop)
    }

    /// `blockdev-add` with `arguments` (`driver`, `node-name`, ...).
    pub async fn blockdev_add(&self, arguments: Value) -> Result<(), QmpError> {
        self.execute("blockdev-add", Some(arguments))
            .await
            .map(drop)
    }

    /// `blockdev-del`: remove block node `node` (no device may use it).
    pub async fn blockdev_del(&self, node: &str) -> Result<(), QmpError> {
        self.execute("blockdev-del", Some(json!({ "node-name": node })))
            .await
            .map(drop)
    }

    /// `closefd`: drop a descriptor given with [`Qmp::getfd`] and not used.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": name })))
            .await
            .map(drop)
    }

    /// The ids of the devices added with an `id` (`-device …,id=` or
    /// `device_add`): the children of `/machine/peripheral`.
    pub async fn peripheral_ids(&self) -> Result<Vec<String>, QmpError> {
        #[derive(Deserialize)]
        struct Property {
            name: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let value = self
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await?;
        let properties: Vec<Property> =
            serde_json::from_value(value).map_err(|e| QmpError::Protocol(e.to_string()))?;
        Ok(properties
            .into_iter()
            .filter(|p| p.kind.starts_with("child<"))
            .map(|p| p.name)
            .collect())
    }

    /// Turn on `x-ignore-shared` (both sides of a template save/restore):
    /// RAM that lives in a shared file is not copied into the stream.
    pub async fn enable_ignore_shared(&self) -> Result<(), QmpError> {
        self.set_ignore_shared(true).await
    }

    /// Sets `x-ignore-shared`: with it, RAM in a shared file is neither
    /// saved nor loaded (the file is the RAM).
    pub async fn set_ignore_shared(&self, state: bool) -> Result<(), QmpError> {
        let capabilities = json!({
            "capabilities": [{"capability": "x-ignore-shared", "state": state}]
        });
        self.execute("migrate-set-capabilities", Some(capabilities))
            .await
            .map(drop)
    }

    /// Save device state (and RAM not ignored) to `path`, waiting until the
    /// migration completed or `timeout` passed.
    pub async fn save_to_file(&self, path: &Path, timeout: Duration) -> Result<(), QmpError> {
        let uri = format!("file:{}", path.display());
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reply = self.execute("query-migrate", None).await?;
            match reply.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let desc = reply
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("migration failed");
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: "MigrationFailed".into(),
                        desc: desc.to_owned(),
                    });
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(QmpError::Timeout {
                        command: "migrate".into(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Start loading state saved by [`Qmp::save_to_file`] into a QEMU
    /// started with `-incoming defer`, without waiting for the load.
    pub async fn start_incoming(&self, path: &Path) -> Result<(), QmpError> {
        let uri = format!("file:{}", path.display());
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Load state saved by [`Qmp::save_to_file`] into a QEMU started with
    /// `-incoming defer`, waiting until it is loaded (the guest is then
    /// paused, as it was when saved).
    pub async fn restore_from_file(&self, path: &Path, timeout: Duration) -> Result<(), QmpError> {
        self.start_incoming(path).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.query_status().await?;
            match status.status.as_str() {
                "inmigrate" if tokio::time::Instant::now() > deadline => {
                    return Err(QmpError::Timeout {
                        command: "migrate-incoming".into(),
                    })
                }
                // The timer's resolution: a template's device state loads
                // in a few ms, and every clone waits for this poll.
                "inmigrate" => tokio::time::sleep(Duration::from_millis(1)).await,
                "paused" | "postmigrate" | "running" => return Ok(()),
                other => {
                    return Err(QmpError::Command {
                        command: "migrate-incoming".into(),
                        class: "MigrationFailed".into(),
                        desc: format!("guest is {other} after loading the template"),
                    })
                }
            }
        }
    }

    /// Whether the actor is still connected.
    pub fn is_connected(&self) -> bool {
        !self.requests.is_closed()
    }
}

/// Write `bytes` with `fd` attached as SCM_RIGHTS ancillary data (QEMU
/// takes the descriptor that arrives with a command's first byte).
async fn send_with_fd(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let stream: &UnixStream = write.as_ref();
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            sendmsg_with_fd(stream.as_raw_fd(), bytes, fd.as_raw_fd())
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The descriptor went with the first byte; the rest is plain data.
    write.write_all(&bytes[sent..]).await
}

/// One `sendmsg(2)` of `bytes` carrying `fd`; returns the bytes written.
fn sendmsg_with_fd(socket: i32, bytes: &[u8], fd: i32) -> std::io::Result<usize> {
    const FD_SIZE: u32 = std::mem::size_of::<libc::c_int>() as u32;
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; every pointer set
    // below points into locals that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(FD_SIZE) } as usize;
    debug_assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
    // SAFETY: msg_control points at a buffer of at least CMSG_SPACE(int)
    // bytes, so the first header and its int payload fit in it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(FD_SIZE) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>(), fd);
    }
    // SAFETY: `msg` is fully initialised and its buffers are live; the
    // socket is non-blocking, so a full buffer is EWOULDBLOCK.
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn command_error(command: &str, err: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_owned(),
        class: err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_owned(),
        desc: err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    }
}

async fn read_line(
    lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Option<String>, QmpError> {
    let mut line = String::new();
    let mut limited = (&mut *lines).take(MAX_LINE_BYTES as u64);
    let n = limited
        .read_line(&mut line)
        .await
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') && n >= MAX_LINE_BYTES {
        return Err(QmpError::Protocol("line too long".into()));
    }
    Ok(Some(line))
}

/// Reads lines until EOF and hands them to the actor. A task of its own
/// because `read_line` is not cancel-safe and must not sit in a `select!`.
async fn run_reader(
    mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    out: mpsc::Sender<Value>,
) {
    while let Ok(Some(line)) = read_line(&mut lines).await {
        match serde_json::from_str::<Value>(&line) {
            Ok(msg) => {
                if out.send(msg).await.is_err() {
                    break;
                }
            }
            Err(_) => tracing::warn!(line = line.trim(), "ignoring malformed QMP message"),
        }
    }
}

async fn run_actor(
    lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<QmpEvent>,
) {
    let (msg_tx, mut messages) = mpsc::channel(64);
    let reader = tokio::spawn(run_reader(lines, msg_tx));
    let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)> =
        HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { break };
                let id = next_id;
                next_id += 1;
                let mut msg = json!({"execute": request.command, "id": id});
                if let Some(arguments) = request.arguments {
                    msg["arguments"] = arguments;
                }
                let mut bytes = msg.to_string().into_bytes();
                bytes.push(b'\n');
                let sent = match &request.fd {
                    Some(fd) => send_with_fd(&mut write, &bytes, fd.as_fd()).await,
                    None => write.write_all(&bytes).await,
                };
                // Our copy of a sent descriptor is not needed any more.
                drop(request.fd);
                if sent.is_err() {
                    let _ = request.reply.send(Err(QmpError::Disconnected));
                    break;
                }
                pending.insert(id, (request.command, request.reply));
            }
            msg = messages.recv() => {
                let Some(msg) = msg else { break };
                if msg.get("event").is_some() {
                    if let Ok(event) = serde_json::from_value::<QmpEvent>(msg) {
                        // A full queue means nobody is reading; dropping an
                        // event beats stalling command replies.
                        let _ = events.try_send(event);
                    }
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else { continue };
                // Callers that timed out dropped their receiver; send() just fails.
                if let Some((command, reply)) = pending.remove(&id) {
                    let result = match (msg.get("return"), msg.get("error")) {
                        (Some(ret), _) => Ok(ret.clone()),
                        (None, Some(err)) => Err(command_error(&command, err)),
                        (None, None) => Err(QmpError::Protocol("reply without return or error".into())),
                    };
                    let _ = reply.send(result);
                }
            }
        }
        // Forget callers that gave up long ago.
        pending.retain(|_, (_, reply)| !reply.is_closed());
    }
    reader.abort();
    for (_, (_, reply)) in pending {
        let _ = reply.send(Err(QmpError::Disconnected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greeting, capabilities, then one reply per
    /// command, an event in between, and a reply to an id nobody waits for.
    #[tokio::test]
    async fn matches_replies_by_id_and_forwards_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":10,\"minor\":0,\"micro\":2},\"package\":\"Debian\"},\"capabilities\":[]}}\n")
                .await
                .expect("greet");
            let caps = lines.next_line().await.expect("read").expect("caps");
            assert!(caps.contains("qmp_capabilities"));
            write
                .write_all(b"{\"return\":{},\"id\":0}\n")
                .await
                .expect("write");
            let cmd: Value =
                serde_json::from_str(&lines.next_line().await.expect("read").expect("cmd"))
                    .expect("json");
            assert_eq!(cmd["execute"], "query-status");
            let id = cmd["id"].as_u64().expect("id");
            write
                .write_all(b"{\"return\":{},\"id\":999}\n")
                .await
                .expect("stray");
            write
                .write_all(
                    b"{\"event\":\"STOP\",\"timestamp\":{\"seconds\":1,\"microseconds\":2}}\n",
                )
                .await
                .expect("event");
            write
                .write_all(
                    format!(
                        "{{\"return\":{{\"status\":\"paused\",\"running\":false}},\"id\":{id}}}\n"
                    )
                    .as_bytes(),
                )
                .await
                .expect("reply");
            let cmd: Value =
                serde_json::from_str(&lines.next_line().await.expect("read").expect("cmd"))
                    .expect("json");
            let id = cmd["id"].as_u64().expect("id");
            write
                .write_all(format!("{{\"error\":{{\"class\":\"GenericError\",\"desc\":\"nope\"}},\"id\":{id}}}\n").as_bytes())
                .await
                .expect("reply");
        });
        let (qmp, version, mut events) = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(version.0, "10.0.2 Debian");
        let status = qmp.query_status().await.expect("status");
        assert_eq!(
            status,
            StatusInfo {
                status: "paused".into(),
                running: false
            }
        );
        assert_eq!(events.recv().await.expect("event").event, "STOP");
        let err = qmp.cont().await.expect_err("error reply");
        assert!(
            matches!(err, QmpError::Command { ref desc, .. } if desc == "nope"),
            "{err:?}"
        );
        server.await.expect("server");
        // Server gone: the event stream ends and commands fail fast.
        assert!(events.recv().await.is_none());
        assert!(matches!(qmp.stop().await, Err(QmpError::Disconnected)));
    }

    /// `getfd` carries the descriptor: the peer receives it with the
    /// command and what it writes into it comes out of our pipe.
    #[tokio::test]
    async fn getfd_passes_the_descriptor_with_the_command() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let stream = stream.into_std().expect("std");
            stream.set_nonblocking(false).expect("blocking");
            tokio::task::spawn_blocking(move || {
                use std::io::{BufRead, Write};
                let mut writer = stream.try_clone().expect("clone");
                writer
                    .write_all(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":10,\"minor\":0,\"micro\":2},\"package\":\"\"},\"capabilities\":[]}}\n")
                    .expect("greet");
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                let mut caps = String::new();
                reader.read_line(&mut caps).expect("caps");
                writer.write_all(b"{\"return\":{},\"id\":0}\n").expect("ack");
                // Read the command with recvmsg to get the descriptor.
                let mut data = [0u8; 512];
                let mut control = [0u64; 8];
                let mut iov = libc::iovec {
                    iov_base: data.as_mut_ptr().cast(),
                    iov_len: data.len(),
                };
                // SAFETY: test-only recvmsg into local buffers.
                let (n, fd) = unsafe {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.as_mut_ptr().cast();
                    msg.msg_controllen = std::mem::size_of_val(&control);
                    let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, 0);
                    let header = libc::CMSG_FIRSTHDR(&msg);
                    assert!(!header.is_null(), "no ancillary data");
                    assert_eq!((*header).cmsg_type, libc::SCM_RIGHTS);
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<i32>());
                    (n, fd)
                };
                let text = std::str::from_utf8(&data[..n as usize]).expect("utf8");
                let cmd: Value = serde_json::from_str(text.trim()).expect("json");
                assert_eq!(cmd["execute"], "getfd");
                assert_eq!(cmd["arguments"]["fdname"], "tap1");
                // SAFETY: the descriptor just received is ours to own.
                let mut received = unsafe { std::fs::File::from_raw_fd(fd) };
                received.write_all(b"through").expect("write to passed fd");
                let id = cmd["id"].as_u64().expect("id");
                writer
                    .write_all(format!("{{\"return\":{{}},\"id\":{id}}}\n").as_bytes())
                    .expect("reply");
            })
            .await
            .expect("server thread");
        });
        let (qmp, _, _events) = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two fresh descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned here.
        let (mut read_end, write_end) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        qmp.getfd("tap1", write_end).await.expect("getfd");
        server.await.expect("server");
        let mut got = String::new();
        read_end.read_to_string(&mut got).expect("read");
        assert_eq!(got, "through");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        let err = Qmp::connect(&path, Duration::from_millis(100))
            .await
            .expect_err("timeout");
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    }
}
