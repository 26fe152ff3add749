//! A blocking varlink client: one unix socket, JSON messages each ended by a
//! NUL byte (the varlink wire format), calls answered in order, and file
//! descriptors passed both ways (`SCM_RIGHTS`, client/src/fds.rs) for the calls
//! that take or hand out one (a terminal, a copy's archive). Enough for a
//! command line that makes a few calls and exits, and for the streams
//! (`Watch`, `StartProcess`, ...), which block on the socket reading `more`
//! replies.

use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::fds;

/// Where kilnd serves varlink when neither `--address` nor `KILN_ADDRESS`
/// says otherwise.
pub const DEFAULT_ADDRESS: &str = "/run/kiln/io.kiln.Manager";

/// Bytes asked of the socket at a time.
const READ_SIZE: usize = 64 * 1024;

/// Why a call did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be opened.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection broke or closed before the reply.
    #[error("connection to kilnd lost: {0}")]
    Lost(#[source] io::Error),
    /// kilnd sent something that is not a varlink reply.
    #[error("not a varlink reply: {0}")]
    Protocol(String),
    /// kilnd answered with a varlink error.
    #[error("{name}: {}", describe_error(name, parameters))]
    Remote { name: String, parameters: Value },
}

/// `unix:PATH` (as `varlinkctl` takes it) or a plain path.
pub fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.strip_prefix("unix:").unwrap_or(address))
}

/// One connection to kilnd.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// The socket, for [`Connection::reopen`].
    path: PathBuf,
    /// Bytes received and not yet returned as a reply.
    pending: Vec<u8>,
    /// Descriptors received, each with the offset in `pending` of the
    /// message it came with.
    fds: Vec<(usize, OwnedFd)>,
}

/// One reply: its parameters, whether more follow, and the descriptors
/// passed with it.
#[derive(Debug)]
pub struct Reply {
    pub parameters: Value,
    pub continues: bool,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The descriptor passed with this reply whose index the parameter
    /// `key` holds (`terminal`, `archive`).
    pub fn take_fd(self, key: &str) -> Result<OwnedFd, ClientError> {
        let index = self
            .parameters
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok());
        let fd = index.and_then(|i| self.fds.into_iter().nth(i));
        fd.ok_or_else(|| {
            ClientError::Protocol(format!(
                "no {key} descriptor passed with {}",
                self.parameters
            ))
        })
    }
}

impl Connection {
    /// Connect to the socket at `path`.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::over(stream, path.to_owned()))
    }

    fn over(stream: UnixStream, path: PathBuf) -> Self {
        Self {
            stream,
            path,
            pending: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Another connection to the same socket: for calls made while this
    /// one is busy with a stream (`WriteProcess` while `StartProcess`
    /// replies keep coming).
    pub fn reopen(&self) -> Result<Self, ClientError> {
        Self::open(&self.path)
    }

    /// Call `method` (fully qualified) and return the reply's parameters.
    pub fn call(&mut self, method: &str, parameters: Value) -> Result<Value, ClientError> {
        self.send(method, parameters, false, &[])?;
        let reply = self.receive()?;
        Ok(reply.parameters)
    }

    /// Call `method` with the `more` flag: `each` gets every reply's
    /// parameters until kilnd says the stream ends (`continues` false) or
    /// `each` returns false.
    pub fn call_more(
        &mut self,
        method: &str,
        parameters: Value,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        self.send(method, parameters, true, &[])?;
        loop {
            let reply = self.receive()?;
            if !each(reply.parameters) || !reply.continues {
                return Ok(());
            }
        }
    }

    /// Send a call of `method` (fully qualified), with the `more` flag as
    /// asked and `fds` passed along; the replies come from
    /// [`Connection::receive`].
    pub fn send(
        &mut self,
        method: &str,
        parameters: Value,
        more: bool,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let mut call = json!({ "method": method, "parameters": without_nulls(parameters) });
        if more {
            call["more"] = Value::Bool(true);
        }
        let mut bytes =
            serde_json::to_vec(&call).map_err(|e| ClientError::Protocol(e.to_string()))?;
        bytes.push(0);
        let sent = if fds.is_empty() {
            0
        } else {
            fds::send(&self.stream, &bytes, fds).map_err(ClientError::Lost)?
        };
        (&self.stream)
            .write_all(bytes.get(sent..).unwrap_or_default())
            .map_err(ClientError::Lost)
    }

    /// The next reply (a varlink error is `Err(Remote)`).
    pub fn receive(&mut self) -> Result<Reply, ClientError> {
        let end = loop {
            if let Some(end) = self.pending.iter().position(|b| *b == 0) {
                break end;
            }
            let start = self.pending.len();
            self.pending.resize(start + READ_SIZE, 0);
            let received = fds::receive(&self.stream, &mut self.pending[start..]);
            let (n, fds) = match received {
                Ok(got) => got,
                Err(e) => {
                    self.pending.truncate(start);
                    return Err(ClientError::Lost(e));
                }
            };
            self.pending.truncate(start + n);
            if n == 0 {
                return Err(ClientError::Lost(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "kilnd closed the connection",
                )));
            }
            let owner = message_start(&self.pending);
            self.fds.extend(fds.into_iter().map(|fd| (owner, fd)));
        };
        let message: Vec<u8> = self.pending.drain(..=end).collect();
        let (mine, later): (Vec<_>, Vec<_>) =
            self.fds.drain(..).partition(|(offset, _)| *offset <= end);
        self.fds = later
            .into_iter()
            .map(|(offset, fd)| (offset - end - 1, fd))
            .collect();
        let fds = mine.into_iter().map(|(_, fd)| fd).collect();
        parse_reply(message.get(..end).unwrap_or_default(), fds)
    }
}

/// Where the message that descriptors just received belong to starts in
/// `pending` (which ends with what was just read): the last message that
/// starts in it. Linux ends a read after the bytes descriptors came with,
/// and kilnd (zlink) sends a message's descriptors with its first bytes,
/// so that is theirs. A NUL as the very last byte ends a message and
/// starts none.
fn message_start(pending: &[u8]) -> usize {
    let before_last = pending.len().saturating_sub(1);
    pending
        .get(..before_last)
        .unwrap_or_default()
        .iter()
        .rposition(|b| *b == 0)
        .map_or(0, |nul| nul + 1)
}

/// One message (without its NUL) as a reply.
fn parse_reply(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, ClientError> {
    let mut message: Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(format!("{e}")))?;
    let parameters = match message.remove("parameters") {
        Some(Value::Null) | None => Value::Object(Map::new()),
        Some(p) => p,
    };
    if let Some(error) = message.get("error") {
        let name = error
            .as_str()
            .ok_or_else(|| ClientError::Protocol(format!("error name {error}")))?;
        return Err(ClientError::Remote {
            name: name.to_owned(),
            parameters,
        });
    }
    let continues = message.get("continues").and_then(Value::as_bool) == Some(true);
    Ok(Reply {
        parameters,
        continues,
        fds,
    })
}

/// An absent optional parameter and a null one mean the same in varlink;
/// absent is what every server accepts.
fn without_nulls(parameters: Value) -> Value {
    match parameters {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

/// The human part of a varlink error: its `message`, or what the standard
/// and Kiln errors without one carry.
fn describe_error(name: &str, parameters: &Value) -> String {
    let field = |key: &str| parameters.get(key).and_then(Value::as_str);
    if let Some(message) = field("message") {
        return message.to_owned();
    }
    let short = name.rsplit('.').next().unwrap_or(name);
    match (short, field("id"), field("parameter"), field("method")) {
        ("NoSuchVM", Some(id), _, _) => format!("no VM with id {id}"),
        ("InvalidParameter", _, Some(p), _) => format!("invalid parameter {p}"),
        ("MethodNotFound", _, _, Some(m)) => {
            format!("kilnd does not know {m} (is it older than this client?)")
        }
        _ if parameters.as_object().is_some_and(|m| !m.is_empty()) => parameters.to_string(),
        _ => "no details".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn addresses_take_unix_prefix_or_plain_path() {
        assert_eq!(socket_path("unix:/run/x"), PathBuf::from("/run/x"));
        assert_eq!(socket_path("/run/x"), PathBuf::from("/run/x"));
        assert_eq!(socket_path("rel/sock"), PathBuf::from("rel/sock"));
    }

    #[test]
    fn errors_read_as_one_line_with_their_name() {
        let e = ClientError::Remote {
            name: "io.kiln.Manager.NoSuchVM".into(),
            parameters: json!({ "id": "abc" }),
        };
        assert_eq!(e.to_string(), "io.kiln.Manager.NoSuchVM: no VM with id abc");
        let e = ClientError::Remote {
            name: "io.kiln.Manager.Timeout".into(),
            parameters: json!({ "message": "no hot VM" }),
        };
        assert_eq!(e.to_string(), "io.kiln.Manager.Timeout: no hot VM");
        let e = ClientError::Remote {
            name: "org.varlink.service.InvalidParameter".into(),
            parameters: json!({ "parameter": "spec.vcpus" }),
        };
        assert_eq!(
            e.to_string(),
            "org.varlink.service.InvalidParameter: invalid parameter spec.vcpus"
        );
    }

    #[test]
    fn null_parameters_are_left_out() {
        assert_eq!(
            without_nulls(json!({ "id": "a", "timeoutSec": null })),
            json!({ "id": "a" })
        );
    }

    #[test]
    fn descriptors_belong_to_the_last_message_begun() {
        assert_eq!(message_start(b"{}\0"), 0);
        assert_eq!(message_start(b"{\"a\":1}\0{}\0"), 8);
        assert_eq!(message_start(b"{}\0{\"b\""), 3);
        assert_eq!(message_start(b"partial"), 0);
    }

    /// Three replies sent before the client reads, the second with a
    /// descriptor (as zlink sends it: with that message's first bytes):
    /// the descriptor comes with the second, whatever one read held.
    #[test]
    fn descriptors_come_with_their_reply() {
        use std::os::fd::AsFd;
        let (client, server) = UnixStream::pair().unwrap();
        let mut conn = Connection::over(client, PathBuf::from("/fake"));
        let (mut pipe_r, pipe_w) = std::io::pipe().unwrap();
        (&server)
            .write_all(b"{\"parameters\":{\"n\":1},\"continues\":true}\0")
            .unwrap();
        let second = b"{\"parameters\":{\"n\":2,\"archive\":0},\"continues\":true}\0";
        let sent = fds::send(&server, second, &[pipe_w.as_fd()]).unwrap();
        (&server).write_all(&second[sent..]).unwrap();
        (&server)
            .write_all(b"{\"parameters\":{\"n\":3}}\0")
            .unwrap();
        drop(pipe_w);
        let replies: Vec<Reply> = (0..3).map(|_| conn.receive().unwrap()).collect();
        let fds: Vec<usize> = replies.iter().map(|r| r.fds.len()).collect();
        assert_eq!(fds, [0, 1, 0]);
        assert_eq!(replies[1].parameters["n"], 2);
        assert!(!replies[2].continues);
        let mut passed = std::fs::File::from(replies.into_iter().nth(1).unwrap().fds.remove(0));
        passed.write_all(b"ok").unwrap();
        drop(passed);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut pipe_r, &mut got).unwrap();
        assert_eq!(got, "ok");
    }

    /// A fake server on a socket pair: framing, errors, `more` streams.
    #[test]
    fn talks_varlink_framing() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut conn = Connection::over(client, PathBuf::from("/fake"));
        let fake = std::thread::spawn(move || {
            let mut reader = BufReader::new(server.try_clone().unwrap());
            let mut server = server;
            let mut calls = Vec::new();
            for replies in [
                vec![r#"{"parameters":{"vms":[]}}"#],
                vec![r#"{"error":"io.kiln.Manager.NoSuchVM","parameters":{"id":"x"}}"#],
                vec![
                    r#"{"parameters":{"event":{"type":"ready"}},"continues":true}"#,
                    r#"{"parameters":{"event":{"type":"vmAdded"}},"continues":true}"#,
                    r#"{"parameters":{"event":{"type":"vmRemoved"}}}"#,
                ],
            ] {
                let mut call = Vec::new();
                reader.read_until(0, &mut call).unwrap();
                call.pop();
                calls.push(serde_json::from_slice::<Value>(&call).unwrap());
                for r in replies {
                    server.write_all(r.as_bytes()).unwrap();
                    server.write_all(b"\0").unwrap();
                }
            }
            calls
        });
        assert_eq!(
            conn.call("io.kiln.Manager.ListVMs", json!({})).unwrap(),
            json!({"vms": []})
        );
        let err = conn
            .call("io.kiln.Manager.DescribeVM", json!({"id": "x"}))
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Remote { ref name, .. } if name == "io.kiln.Manager.NoSuchVM")
        );
        let mut types = Vec::new();
        conn.call_more("io.kiln.Manager.Watch", json!({}), |p| {
            types.push(p["event"]["type"].as_str().unwrap().to_owned());
            true
        })
        .unwrap();
        assert_eq!(types, ["ready", "vmAdded", "vmRemoved"]);
        let calls = fake.join().unwrap();
        assert_eq!(
            calls[0],
            json!({"method": "io.kiln.Manager.ListVMs", "parameters": {}})
        );
        assert_eq!(calls[2]["more"], true);
        assert!(matches!(
            conn.call("io.kiln.Manager.ListVMs", json!({})),
            Err(ClientError::Lost(_))
        ));
    }
}
