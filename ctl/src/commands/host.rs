//! NICs, GPUs and the event stream.

use serde_json::Value;

use super::{CtlError, Ctx};
use crate::cli::{GpuCommand, NicCommand};
use crate::client::ClientError;
use crate::output::bytes;
use crate::view::{self, text, GPU_COLUMNS, NIC_COLUMNS};

pub fn nic(ctx: &mut Ctx, command: NicCommand) -> Result<i32, CtlError> {
    match command {
        NicCommand::Ls { vm } => {
            let id = ctx.resolve(&vm)?;
            let reply = ctx.api.list_nics(&id)?;
            if !ctx.json(&reply) {
                ctx.table(NIC_COLUMNS, view::items(&reply, "nics"));
            }
        }
        NicCommand::Attach { vm, ip } => {
            let id = ctx.resolve(&vm)?;
            let reply = ctx.api.attach_nic(&id, ip.as_deref())?;
            if !ctx.json(&reply) {
                ctx.table(NIC_COLUMNS, std::slice::from_ref(&reply["nic"]));
            }
        }
        NicCommand::Detach { vm, index } => {
            let id = ctx.resolve(&vm)?;
            let reply = ctx.api.detach_nic(&id, index)?;
            ctx.json(&reply);
        }
    }
    Ok(0)
}

pub fn gpu(ctx: &mut Ctx, command: GpuCommand) -> Result<i32, CtlError> {
    let GpuCommand::Ls = command;
    let reply = ctx.api.list_gpus()?;
    if !ctx.json(&reply) {
        ctx.table(GPU_COLUMNS, view::items(&reply, "gpus"));
    }
    Ok(0)
}

/// Print every event until kilnd ends the stream (it is shutting down:
/// exit 8, as for any lost connection) or kilnctl is interrupted.
pub fn watch(ctx: &mut Ctx) -> Result<i32, CtlError> {
    let json = ctx.json;
    ctx.api.watch(|reply| {
        if json {
            println!("{reply}");
        } else {
            println!("{}", event_line(&reply["event"]));
        }
        true
    })?;
    Err(CtlError::Client(ClientError::Lost(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "kilnd ended the event stream",
    ))))
}

/// One event as one line: its type, what it is about, what changed.
pub fn event_line(event: &Value) -> String {
    let kind = text(event, "type");
    let (vm, pool) = (&event["vm"], &event["pool"]);
    let count = |key: &str| text(pool, key);
    match kind.as_str() {
        "vmAdded" | "vmChanged" if vm.is_object() => {
            let in_pool = match text(vm, "pool") {
                p if p.is_empty() => p,
                p => format!(" pool={p}"),
            };
            let (id, name, state) = (text(vm, "id"), text(vm, "name"), text(vm, "state"));
            format!("{kind} {id} {name} {state}{in_pool}")
        }
        "poolChanged" if pool.is_object() => format!(
            "{kind} {} {} hot={} booting={} leased={} failed={} waiting={}",
            count("name"),
            count("state"),
            count("hot"),
            count("booting"),
            count("leased"),
            count("failed"),
            count("waiting")
        ),
        "gpusChanged" => format!("{kind} {} render nodes", view::items(event, "gpus").len()),
        "leaseExpired" => format!(
            "{kind} {} pool={} holder={}",
            text(event, "id"),
            text(event, "poolName"),
            text(event, "holder")
        ),
        "imageAdded" => {
            let references = view::items(&event["image"], "references")
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",");
            format!("{kind} {} {references}", text(event, "id"))
                .trim_end()
                .to_owned()
        }
        "oom" => match event.get("memoryLimitBytes").and_then(Value::as_u64) {
            Some(cap) if cap > 0 => {
                format!(
                    "{kind} {} at its memory cap of {}",
                    text(event, "id"),
                    bytes(cap)
                )
            }
            _ => format!("{kind} {}", text(event, "id")),
        },
        "ready" | "lagged" => kind,
        _ => format!("{kind} {}", text(event, "id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_line_each() {
        use serde_json::json;
        let cases = [
            (json!({"type": "ready", "id": ""}), "ready"),
            (
                json!({"type": "vmChanged", "id": "3fa2c1d0e4b5",
                       "vm": {"id": "3fa2c1d0e4b5", "name": "web", "state": "leased", "pool": "p"}}),
                "vmChanged 3fa2c1d0e4b5 web leased pool=p",
            ),
            (
                json!({"type": "vmRemoved", "id": "3fa2c1d0e4b5"}),
                "vmRemoved 3fa2c1d0e4b5",
            ),
            (
                json!({"type": "poolChanged", "id": "p", "pool": {"name": "p", "state": "ready",
                       "hot": 2, "booting": 0, "leased": 0, "failed": 0, "waiting": 0}}),
                "poolChanged p ready hot=2 booting=0 leased=0 failed=0 waiting=0",
            ),
            (
                json!({"type": "leaseExpired", "id": "ab", "poolName": "p", "holder": "uid:0"}),
                "leaseExpired ab pool=p holder=uid:0",
            ),
            (
                json!({"type": "gpusChanged", "id": "", "gpus": [{}, {}]}),
                "gpusChanged 2 render nodes",
            ),
            (
                json!({"type": "imageAdded", "id": "sha256:ab",
                       "image": {"digest": "sha256:ab", "references": ["a:1", "b:2"]}}),
                "imageAdded sha256:ab a:1,b:2",
            ),
            (
                json!({"type": "imageRemoved", "id": "sha256:ab"}),
                "imageRemoved sha256:ab",
            ),
            (
                json!({"type": "oom", "id": "3fa2c1d0e4b5", "memoryLimitBytes": 314_572_800}),
                "oom 3fa2c1d0e4b5 at its memory cap of 300.0 MiB",
            ),
            (
                json!({"type": "oom", "id": "3fa2c1d0e4b5"}),
                "oom 3fa2c1d0e4b5",
            ),
            (json!({"type": "somethingNew", "id": "x"}), "somethingNew x"),
        ];
        for (json, line) in cases {
            assert_eq!(event_line(&json), line);
        }
    }
}
