//! A blocking varlink client: one unix socket, JSON messages each ended by a
//! NUL byte (the varlink wire format), calls answered in order. Enough for
//! a command line that makes a few calls and exits, and for `Watch`, which
//! blocks on the socket reading `more` replies.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Where kilnd serves varlink when neither `--address` nor `KILN_ADDRESS`
/// says otherwise.
pub const DEFAULT_ADDRESS: &str = "/run/kiln/io.kiln.Manager";

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
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Connect to the socket at `path`.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(ClientError::Lost)?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Call `method` (fully qualified) and return the reply's parameters.
    pub fn call(&mut self, method: &str, parameters: Value) -> Result<Value, ClientError> {
        self.send(method, parameters, false)?;
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
        self.send(method, parameters, true)?;
        loop {
            let reply = self.receive()?;
            if !each(reply.parameters) || !reply.continues {
                return Ok(());
            }
        }
    }

    fn send(&mut self, method: &str, parameters: Value, more: bool) -> Result<(), ClientError> {
        let mut call = json!({ "method": method, "parameters": without_nulls(parameters) });
        if more {
            call["more"] = Value::Bool(true);
        }
        let mut bytes =
            serde_json::to_vec(&call).map_err(|e| ClientError::Protocol(e.to_string()))?;
        bytes.push(0);
        self.writer.write_all(&bytes).map_err(ClientError::Lost)
    }

    fn receive(&mut self) -> Result<Reply, ClientError> {
        let mut bytes = Vec::new();
        self.reader
            .read_until(0, &mut bytes)
            .map_err(ClientError::Lost)?;
        if bytes.pop() != Some(0) {
            return Err(ClientError::Lost(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "kilnd closed the connection",
            )));
        }
        let mut message: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{e}")))?;
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
        })
    }
}

struct Reply {
    parameters: Value,
    continues: bool,
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
            format!("kilnd does not know {m} (is it older than kilnctl?)")
        }
        _ if parameters.as_object().is_some_and(|m| !m.is_empty()) => parameters.to_string(),
        _ => "no details".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A fake server on a socket pair: framing, errors, `more` streams.
    #[test]
    fn talks_varlink_framing() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut conn = Connection {
            reader: BufReader::new(client.try_clone().unwrap()),
            writer: client,
        };
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
