//! Containers on D-Bus: plain structs returned by the VM's
//! `AddContainer` and `ListContainers`, not objects: a container lives and
//! dies with its VM, whose `PropertiesChanged` already follow it, and is
//! named by its VM and its name.

use kiln_agent_proto::ContainerLogsReply;
use kiln_engine::container::ContainerInfo;
use serde::Serialize;
use zbus::zvariant::Type;

use crate::mirror::wire_name;

/// One container: `(s name, s image, s digest, s state, u pid, i
/// exit_code, s error, as command, s restart_policy, u restarts, t
/// handle)`; `pid` 0 when not running, `exit_code` -1 until it exited,
/// `error` "" unless it failed to start, `handle` 0 unless it was started
/// with a terminal or stdin (then its process's, for `AttachProcess`…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Type)]
pub struct ContainerSummary {
    name: String,
    image: String,
    digest: String,
    state: String,
    pid: u32,
    exit_code: i32,
    error: String,
    command: Vec<String>,
    restart_policy: String,
    restarts: u32,
    handle: u64,
}

impl From<&ContainerInfo> for ContainerSummary {
    fn from(c: &ContainerInfo) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone(),
            digest: c.digest.clone(),
            state: wire_name(&c.state),
            pid: c.pid.unwrap_or(0),
            exit_code: c.exit_code.unwrap_or(-1),
            error: c.error.clone().unwrap_or_default(),
            command: c.command.clone(),
            restart_policy: wire_name(&c.restart_policy),
            restarts: c.restarts,
            handle: c.handle.unwrap_or(0),
        }
    }
}

/// `ContainerLogs`' reply: `(a(ss) entries, t cursor, t dropped, b
/// ended)`, each entry `(stream, text)`.
pub type LogsTuple = (Vec<(String, String)>, u64, u64, bool);

/// The wire form of one read.
pub fn logs_tuple(logs: ContainerLogsReply) -> LogsTuple {
    let entries = logs
        .entries
        .into_iter()
        .map(|e| (wire_name(&e.stream), without_nul(e.text)))
        .collect();
    (entries, logs.cursor, logs.dropped, logs.ended)
}

/// D-Bus strings cannot hold NUL: guest output gets U+FFFD instead.
pub(crate) fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}
