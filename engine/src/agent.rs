//! Client of the guest agent (`io.kiln.Agent`, see `kiln-agent-proto`).
//!
//! QEMU bridges the guest's virtio-serial port to a unix socket it listens
//! on. One call is in flight at a time (the agent serves one at a time); the
//! client's mutex queues concurrent callers. A call that times out drops the
//! connection, and every new connection starts with a `Ping` carrying a fresh
//! nonce, skipping any late reply meant for the abandoned call: a reply can
//! never be taken for the answer to a different call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_agent_proto::{self as proto, Call, Reply};
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// Agent failures.
#[derive(Debug, Clone, Error)]
pub enum AgentError {
    /// The agent socket could not be reached.
    #[error("cannot connect to the guest agent: {0}")]
    Connect(String),
    /// No answer within the deadline.
    #[error("guest agent did not answer {method} in time")]
    Timeout {
        /// Method called.
        method: String,
    },
    /// The connection broke.
    #[error("guest agent connection closed")]
    Disconnected,
    /// The agent answered with a varlink error.
    #[error("guest agent error {name}: {message}")]
    Call {
        /// Varlink error name.
        name: String,
        /// Its `message` parameter, if any.
        message: String,
    },
    /// The agent sent something unreadable.
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
}

impl AgentError {
    /// Whether the agent answered with the varlink error `name`.
    pub fn is_call(&self, name: &str) -> bool {
        matches!(self, Self::Call { name: n, .. } if n == name)
    }
}

/// A call sent in the same write as the `Ping` that syncs a new connection
/// ([`AgentClient::wait_ready_then`]).
#[derive(Debug, Clone)]
pub struct FollowUp {
    /// Method called.
    pub method: &'static str,
    /// Its parameters.
    pub parameters: Value,
    /// Deadline of its reply, counted from the reply before it.
    pub timeout: Duration,
}

/// The answers to a [`AgentClient::wait_ready_then`].
#[derive(Debug)]
pub struct ReadyReplies {
    /// The syncing `Ping`'s reply.
    pub ping: proto::PingReply,
    /// When it came.
    pub ready_at: std::time::Instant,
    /// Each follow-up's reply and when it came, in order.
    pub replies: Vec<(Value, std::time::Instant)>,
}

/// Deadline of one `Ping` attempt in [`AgentClient::wait_ready`].
const PING_ATTEMPT: Duration = Duration::from_secs(2);

struct Connection {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// A call was sent and its reply not read yet. Still set when the next
    /// call comes, the call before it was cancelled half-way (its future
    /// dropped: a client that went away, a `select!`), and its reply may
    /// still arrive: the connection cannot be trusted to pair replies.
    in_flight: bool,
}

/// A client for one VM's agent socket.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

impl AgentClient {
    /// A client for `socket`; connects lazily.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            conn: Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Call `method` with JSON parameters; its JSON reply. The typed calls
    /// the engine makes are on `dyn GuestAgent` (`vmm`), which this client
    /// implements with this: one encode and one decode per call.
    pub async fn call_json(
        &self,
        method: &str,
        parameters: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.in_flight) {
            *guard = None;
        }
        let result = tokio::time::timeout_at(deadline, async {
            if guard.is_none() {
                *guard = Some(self.connect_and_sync(&[]).await?.0);
            }
            let conn = guard.as_mut().ok_or(AgentError::Disconnected)?;
            roundtrip(conn, method, parameters).await
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                method: method.to_owned(),
            }),
        };
        if matches!(
            result,
            Err(AgentError::Timeout { .. } | AgentError::Disconnected | AgentError::Protocol(_))
        ) {
            // The stream may now hold a late reply: start afresh next time.
            *guard = None;
        }
        result
    }

    /// Retry `Ping` on a new connection until the agent answers or
    /// `timeout` passes. Used while a guest boots.
    ///
    /// Each attempt has a short deadline of its own: a ping queued before
    /// the guest opened its port is answered as soon as the agent is up, but
    /// one the guest swallowed (a reset in mid-call) would otherwise be
    /// waited for until the whole boot timeout is gone.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<proto::PingReply, AgentError> {
        Ok(self.wait_ready_then(timeout, &[]).await?.ping)
    }

    /// [`AgentClient::wait_ready`], with `follow_ups` sent behind the
    /// syncing `Ping` in the same write: a just-restored clone wakes once
    /// for its Ping, `SetIdentity` and `ConfigureNetwork`, and the agent
    /// can leave what it does after a reply (the identity's files) until
    /// it has answered them all. A retried attempt sends them again, which
    /// is why only calls that may run twice belong here. The first
    /// follow-up that fails ends it with its error.
    pub async fn wait_ready_then(
        &self,
        timeout: Duration,
        follow_ups: &[FollowUp],
    ) -> Result<ReadyReplies, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let calls: Vec<Call> = follow_ups
            .iter()
            .map(|f| Call {
                method: f.method.to_owned(),
                parameters: Some(f.parameters.clone()),
            })
            .collect();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout {
                    method: proto::method::PING.into(),
                });
            }
            // The lock per attempt, not for the whole wait: a caller that
            // comes meanwhile gets its turn (and its own deadline).
            let mut guard = self.conn.lock().await;
            *guard = None;
            let attempt = self.connect_and_sync(&calls);
            match tokio::time::timeout(left.min(PING_ATTEMPT), attempt).await {
                Ok(Ok((mut conn, ping))) => {
                    let ready_at = std::time::Instant::now();
                    let replies = receive_follow_ups(&mut conn, follow_ups).await?;
                    *guard = Some(conn);
                    return Ok(ReadyReplies {
                        ping,
                        ready_at,
                        replies,
                    });
                }
                // Socket not there yet or QEMU not accepting: try again soon.
                Ok(Err(AgentError::Connect(_) | AgentError::Disconnected)) => {
                    drop(guard);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if left > PING_ATTEMPT => {}
                Err(_) => {
                    return Err(AgentError::Timeout {
                        method: proto::method::PING.into(),
                    })
                }
            }
        }
    }

    /// Drop the connection (the next call reconnects).
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    /// A new connection, synced by a `Ping` with a nonce; that Ping's reply.
    /// `follow_ups` go in the same write, after the Ping: their replies are
    /// the next ones on the connection.
    async fn connect_and_sync(
        &self,
        follow_ups: &[Call],
    ) -> Result<(Connection, proto::PingReply), AgentError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| AgentError::Connect(e.to_string()))?;
        let (read, writer) = stream.into_split();
        let mut conn = Connection {
            reader: BufReader::new(read),
            writer,
            in_flight: false,
        };
        let mut nonce_bytes = [0u8; 8];
        crate::ids::fill_random(&mut nonce_bytes);
        let nonce = u64::from_le_bytes(nonce_bytes);
        let request = proto::PingRequest { nonce: Some(nonce) };
        let call = Call {
            method: proto::method::PING.to_owned(),
            parameters: Some(
                serde_json::to_value(request).map_err(|e| AgentError::Protocol(e.to_string()))?,
            ),
        };
        // A lone NUL first ends any request a previous host left half-sent
        // (the agent keeps a partial frame for a moment across reconnects);
        // whatever it answers to that is skipped below with stale replies.
        // One write with the Ping: the guest wakes once for all.
        let calls: Vec<&Call> = std::iter::once(&call).chain(follow_ups).collect();
        send(&mut conn, &[0], &calls).await?;
        loop {
            let reply = receive(&mut conn).await?;
            let echoed = reply
                .parameters
                .as_ref()
                .and_then(|p| p.get("nonce"))
                .and_then(Value::as_u64);
            if reply.error.is_none() && echoed == Some(nonce) {
                let ping = serde_json::from_value(reply.parameters.unwrap_or_default())
                    .map_err(|e| AgentError::Protocol(e.to_string()))?;
                return Ok((conn, ping));
            }
            tracing::debug!(socket = %self.socket.display(), "skipping a stale agent reply");
        }
    }
}

/// The replies to the follow-ups of a sync, in order, each with when it
/// came. On an error the caller drops the connection.
async fn receive_follow_ups(
    conn: &mut Connection,
    follow_ups: &[FollowUp],
) -> Result<Vec<(Value, std::time::Instant)>, AgentError> {
    let mut replies = Vec::with_capacity(follow_ups.len());
    for follow_up in follow_ups {
        let reply = tokio::time::timeout(follow_up.timeout, receive(conn))
            .await
            .map_err(|_| AgentError::Timeout {
                method: follow_up.method.to_owned(),
            })??;
        replies.push((into_result(reply)?, std::time::Instant::now()));
    }
    Ok(replies)
}

async fn roundtrip(
    conn: &mut Connection,
    method: &str,
    parameters: Value,
) -> Result<Value, AgentError> {
    let call = Call {
        method: method.to_owned(),
        parameters: Some(parameters),
    };
    conn.in_flight = true;
    send(conn, &[], &[&call]).await?;
    let reply = receive(conn).await?;
    conn.in_flight = false;
    into_result(reply)
}

/// A reply's parameters, or its error as [`AgentError::Call`].
fn into_result(reply: Reply) -> Result<Value, AgentError> {
    match reply.error {
        None => Ok(reply
            .parameters
            .unwrap_or(Value::Object(Default::default()))),
        Some(name) => {
            // The human message, or else the one thing the error names
            // (`path` of NoSuchFile, `handle` of NoSuchProcess, `program`
            // of ExecFormatError, ...).
            let parameters = reply.parameters.as_ref();
            let field = |key: &str| parameters.and_then(|p| p.get(key));
            let message = match ["message", "path", "program", "handle", "id", "serial"]
                .into_iter()
                .find_map(field)
            {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            Err(AgentError::Call { name, message })
        }
    }
}

/// Writes the frames of `calls`, after `lead`, in one write.
async fn send(conn: &mut Connection, lead: &[u8], calls: &[&Call]) -> Result<(), AgentError> {
    let mut bytes = lead.to_vec();
    for call in calls {
        let frame = proto::encode(call).map_err(|e| AgentError::Protocol(e.to_string()))?;
        bytes.extend_from_slice(&frame);
    }
    conn.writer
        .write_all(&bytes)
        .await
        .map_err(|_| AgentError::Disconnected)
}

async fn receive(conn: &mut Connection) -> Result<Reply, AgentError> {
    let mut frame = Vec::new();
    let n = (&mut conn.reader)
        .take(proto::MAX_MESSAGE_BYTES as u64)
        .read_until(0, &mut frame)
        .await
        .map_err(|_| AgentError::Disconnected)?;
    if n == 0 {
        return Err(AgentError::Disconnected);
    }
    if frame.last() != Some(&0) {
        return Err(AgentError::Protocol("message too long or truncated".into()));
    }
    frame.pop();
    proto::decode(&frame).map_err(|e| AgentError::Protocol(e.to_string()))
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The next call, skipping empty frames (the client's leading NUL).
    async fn read_frame(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Call {
        loop {
            let mut buf = Vec::new();
            reader.read_until(0, &mut buf).await.expect("read");
            buf.pop();
            if !buf.is_empty() {
                return proto::decode(&buf).expect("call");
            }
        }
    }

    /// A fake agent that first sends a stale reply (as a guest would after a
    /// timed-out call), then answers the sync ping and one exec.
    #[tokio::test]
    async fn stale_replies_are_skipped_on_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let stale = proto::encode(&Reply {
                parameters: Some(serde_json::json!({"exitCode": 99, "stdout": "", "stderr": ""})),
                error: None,
            })
            .expect("encode");
            write.write_all(&stale).await.expect("write");
            answer_sync(&mut reader, &mut write).await;
            let exec = read_frame(&mut reader).await;
            assert_eq!(exec.method, proto::method::EXEC);
            let reply = Reply {
                parameters: Some(serde_json::json!({"exitCode": 0, "stdout": "ok", "stderr": ""})),
                error: None,
            };
            write
                .write_all(&proto::encode(&reply).expect("encode"))
                .await
                .expect("write");
        });
        let client = AgentClient::new(&path);
        let request = serde_json::json!(proto::ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        });
        let reply = client
            .call_json(proto::method::EXEC, request, Duration::from_secs(5))
            .await
            .expect("exec");
        let reply: proto::ExecReply = serde_json::from_value(reply).expect("an ExecReply");
        assert_eq!((reply.exit_code, reply.stdout.as_str()), (0, "ok"));
    }

    /// Answer the sync ping of a fresh connection.
    async fn answer_sync(
        reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
        write: &mut tokio::net::unix::OwnedWriteHalf,
    ) {
        let ping = read_frame(reader).await;
        assert_eq!(ping.method, proto::method::PING);
        let nonce = ping.parameters.expect("params")["nonce"].clone();
        let pong = serde_json::json!({"agentVersion": "t", "kernelRelease": "k", "bootId": "b",
            "hostname": "h", "uptimeMs": 1, "nonce": nonce});
        let reply = Reply {
            parameters: Some(pong),
            error: None,
        };
        write
            .write_all(&proto::encode(&reply).expect("encode"))
            .await
            .expect("write");
    }

    /// A call whose future is dropped after it was sent (its caller went
    /// away) leaves its reply on the way: the next call must not take it
    /// for its own, so it starts a fresh connection.
    #[tokio::test]
    async fn a_cancelled_call_does_not_hand_its_reply_to_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            for answer in [
                serde_json::json!({"bytes": 1}),
                serde_json::json!({"exitCode": 0, "stdout": "mine", "stderr": ""}),
            ] {
                let (stream, _) = listener.accept().await.expect("accept");
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                answer_sync(&mut reader, &mut write).await;
                read_frame(&mut reader).await;
                // Late: the first caller is gone by now.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let reply = Reply {
                    parameters: Some(answer),
                    error: None,
                };
                let _ = write
                    .write_all(&proto::encode(&reply).expect("encode"))
                    .await;
                // Keep the connection open, as a live agent does.
                tokio::spawn(async move {
                    let _keep = (reader, write);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        let client = AgentClient::new(&path);
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            client.call_json(
                "io.kiln.Agent.WriteFile",
                serde_json::json!({}),
                Duration::from_secs(5),
            ),
        )
        .await;
        assert!(cancelled.is_err(), "the first call was not cancelled");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = client
            .call_json(
                proto::method::EXEC,
                serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await
            .expect("exec");
        assert_eq!(reply["stdout"], "mine", "{reply}");
    }

    /// Follow-ups go out with the syncing Ping, before its reply: this
    /// agent reads all three calls before it answers any (a client that
    /// waited for the Ping's reply first would hang here), sends a stale
    /// reply first, then answers in order, failing the last call.
    #[tokio::test]
    async fn follow_ups_ride_on_the_sync_ping_and_are_answered_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let agent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let ping = read_frame(&mut reader).await;
            let identity = read_frame(&mut reader).await;
            let network = read_frame(&mut reader).await;
            let nonce = ping.parameters.expect("params")["nonce"].clone();
            let replies = [
                Reply {
                    parameters: Some(serde_json::json!({"stale": true})),
                    error: None,
                },
                Reply {
                    parameters: Some(serde_json::json!({"agentVersion": "t",
                        "kernelRelease": "k", "bootId": "b", "hostname": "h",
                        "uptimeMs": 1, "nonce": nonce})),
                    error: None,
                },
                Reply {
                    parameters: Some(serde_json::json!({"set": identity.method})),
                    error: None,
                },
                Reply {
                    parameters: Some(serde_json::json!({"message": "no such NIC"})),
                    error: Some("io.kiln.Agent.NetworkFailed".into()),
                },
            ];
            for reply in &replies {
                write
                    .write_all(&proto::encode(reply).expect("encode"))
                    .await
                    .expect("write");
            }
            (ping.method, network.method)
        });
        let client = AgentClient::new(&path);
        let follow_up = |method| FollowUp {
            method,
            parameters: serde_json::json!({}),
            timeout: Duration::from_secs(5),
        };
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            client.wait_ready_then(
                Duration::from_secs(5),
                &[
                    follow_up(proto::method::SET_IDENTITY),
                    follow_up(proto::method::CONFIGURE_NETWORK),
                ],
            ),
        )
        .await
        .expect("the follow-ups were not sent before the Ping's reply");
        let err = result.expect_err("the network call failed");
        assert!(err.is_call("io.kiln.Agent.NetworkFailed"), "{err:?}");
        let (first, last) = agent.await.expect("agent");
        assert_eq!(
            (first.as_str(), last.as_str()),
            (proto::method::PING, proto::method::CONFIGURE_NETWORK)
        );

        // All answered: the replies in order, the Ping's first.
        let listener = UnixListener::bind(dir.path().join("ok.sock")).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            answer_sync(&mut reader, &mut write).await;
            let call = read_frame(&mut reader).await;
            let reply = Reply {
                parameters: Some(serde_json::json!({"answered": call.method})),
                error: None,
            };
            write
                .write_all(&proto::encode(&reply).expect("encode"))
                .await
                .expect("write");
            let _keep = (reader, write);
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = AgentClient::new(dir.path().join("ok.sock"));
        let ready = client
            .wait_ready_then(
                Duration::from_secs(5),
                &[follow_up(proto::method::SET_IDENTITY)],
            )
            .await
            .expect("ready");
        assert_eq!(ready.ping.boot_id, "b");
        assert_eq!(ready.replies[0].0["answered"], proto::method::SET_IDENTITY);
        assert!(ready.replies[0].1 >= ready.ready_at);
    }

    #[tokio::test]
    async fn no_socket_is_a_connect_error_and_wait_ready_times_out() {
        let client = AgentClient::new("/nonexistent/agent.sock");
        assert!(matches!(
            client
                .call_json(
                    proto::method::PING,
                    serde_json::json!({}),
                    Duration::from_secs(1)
                )
                .await,
            Err(AgentError::Connect(_))
        ));
        let err = client
            .wait_ready(Duration::from_millis(50))
            .await
            .expect_err("timeout");
        assert!(matches!(err, AgentError::Timeout { .. }), "{err:?}");
    }
}
