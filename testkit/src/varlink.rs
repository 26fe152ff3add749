//! kilnd over varlink with the real `varlinkctl`.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::process::json_output;
use crate::{command_as, Kilnd};

/// `varlinkctl call` of `method` with `params` (JSON) at `address`, as
/// `uid` (None: ourselves). Ok(reply) or Err((error name, error parameters)).
pub fn varlinkctl_call(
    uid: Option<u32>,
    address: &str,
    method: &str,
    params: &str,
) -> Result<Value, (String, Value)> {
    let out = command_as(uid, "varlinkctl")
        // No deadline of varlinkctl's own (45 s): a boot under TCG next to
        // other tests can take longer, and nextest bounds every test.
        .args([
            "call",
            "--json=short",
            "--timeout=infinity",
            address,
            method,
            params,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    if out.status.success() {
        return Ok(value);
    }
    Err((failed_name(&out.stderr), value))
}

/// `varlinkctl call --more` of `method` with `params` (JSON) at `address`,
/// as `uid`: every reply in order (the last without `continues`), or
/// Err((error name, the replies before the error)).
pub fn varlinkctl_more(
    uid: Option<u32>,
    address: &str,
    method: &str,
    params: &str,
) -> Result<Vec<Value>, (String, Vec<Value>)> {
    let out = command_as(uid, "varlinkctl")
        .args(["call", "--more", "--json=short", address, method, params])
        .output()
        .unwrap();
    let replies = json_seq(&String::from_utf8_lossy(&out.stdout));
    if out.status.success() {
        return Ok(replies);
    }
    Err((failed_name(&out.stderr), replies))
}

/// The JSON values of varlinkctl's output: one per line, each prefixed
/// with `\x1e` (JSON-SEQ) when stdout is a pipe and `--more` is given.
pub fn json_seq(text: &str) -> Vec<Value> {
    text.split(['\x1e', '\n'])
        .map(str::trim)
        .filter(|record| !record.is_empty())
        .filter_map(|record| serde_json::from_str(record).ok())
        .collect()
}

/// The error name of a failed `varlinkctl call`: it prints "Method call
/// <method>() failed: <error name>".
fn failed_name(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .rsplit("failed: ")
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// A `varlinkctl call --more` running in the background (`Watch`, a
/// `PullImage` with progress): its replies as they come. Killed on drop.
#[derive(Debug)]
pub struct VarlinkStream {
    child: Child,
    replies: mpsc::Receiver<Value>,
}

impl VarlinkStream {
    /// Call `method` with `params` (JSON) at `address`, with `more`.
    pub fn start(address: &str, method: &str, params: &str) -> Self {
        let mut child = Command::new("varlinkctl")
            .args(["call", "--more", "--json=short", address, method, params])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let replies = json_output(&mut child);
        Self { child, replies }
    }

    /// The next reply within `timeout`; None when none came in time or the
    /// call has ended.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        self.replies.recv_timeout(timeout).ok()
    }

    /// Stop varlinkctl now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VarlinkStream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `method` (no parameters) succeeds at `address`.
pub fn varlinkctl_ok(address: &str, method: &str) -> bool {
    Command::new("varlinkctl")
        .args(["call", address, method, "{}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A kilnd without D-Bus, driven through its varlink socket.
#[derive(Debug)]
pub struct Daemon {
    pub kilnd: Kilnd,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// kilnd with extra config lines.
    pub fn start_with(extra_config: &str) -> Self {
        let mut daemon = Self::new(extra_config);
        daemon.spawn();
        daemon
    }

    /// Not started yet (to add pool files or config first).
    pub fn new(extra_config: &str) -> Self {
        Self {
            kilnd: Kilnd::new(&format!("dbus = \"none\"\n{extra_config}")),
        }
    }

    /// Write `pools.d/NAME.toml` (before [`Daemon::spawn`], or for a
    /// restart to pick up).
    pub fn pool_file(&self, name: &str, toml: &str) {
        let dir = self.kilnd.dir.path().join("pools.d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.toml")), toml).unwrap();
    }

    /// Start kilnd; returns once varlink answers.
    pub fn spawn(&mut self) {
        self.spawn_with(Command::new(crate::kilnd::kilnd_exe()));
    }

    /// Start kilnd inside network namespace `ns` (`ip netns exec`);
    /// returns once varlink answers.
    pub fn spawn_in(&mut self, ns: &crate::Netns) {
        let kilnd = crate::kilnd::kilnd_exe();
        self.spawn_with(ns.command(&[kilnd.to_str().expect("a UTF-8 path to kilnd")]));
    }

    /// Start kilnd with `command` (kilnd itself, or what execs it; its
    /// `--config` is added); returns once varlink answers.
    pub fn spawn_with(&mut self, command: Command) {
        let address = self.address();
        self.kilnd.spawn_with(command, |_| {
            varlinkctl_ok(&address, "org.varlink.service.GetInfo")
        });
    }

    pub fn sigkill(&mut self) {
        self.kilnd.sigkill();
    }

    pub fn address(&self) -> String {
        self.kilnd.varlink_address()
    }

    pub fn log(&self) -> String {
        self.kilnd.log()
    }

    /// `varlinkctl call`; Ok(reply) or Err((error name, error parameters)).
    pub fn call(&self, method: &str, params: Value) -> Result<Value, (String, Value)> {
        self.call_as(None, method, &params.to_string())
    }

    pub fn call_as(
        &self,
        uid: Option<u32>,
        method: &str,
        params: &str,
    ) -> Result<Value, (String, Value)> {
        varlinkctl_call(uid, &self.address(), method, params)
    }

    /// `io.kiln.Manager.<method>` that must succeed; its reply.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        let method = format!("io.kiln.Manager.{method}");
        self.call(&method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params}: {e:?}\n{}", self.log()))
    }

    /// `varlinkctl call --more` of `io.kiln.Manager.<method>`; every reply,
    /// or Err((error name, the replies before it)).
    pub fn more(&self, method: &str, params: Value) -> Result<Vec<Value>, (String, Vec<Value>)> {
        let method = format!("io.kiln.Manager.{method}");
        varlinkctl_more(None, &self.address(), &method, &params.to_string())
    }

    /// `io.kiln.Manager.<method>` that must fail; the error's name.
    pub fn err(&self, method: &str, params: Value) -> String {
        let method = format!("io.kiln.Manager.{method}");
        match self.call(&method, params) {
            Ok(v) => panic!("{method} succeeded: {v}"),
            Err((name, _)) => name,
        }
    }
}
