//! Containers in VMs: container ls/add/rm, and logs.

use std::io::Write;

use serde_json::Value;

use super::{container_spec, CtlError, Ctx};
use crate::cli::{ContainerCommand, LogsArgs};
use crate::view::{self, CONTAINER_COLUMNS};

pub fn container(ctx: &mut Ctx, command: ContainerCommand) -> Result<i32, CtlError> {
    match command {
        ContainerCommand::Ls { vm } => {
            let id = ctx.resolve(&vm)?;
            let reply = ctx.api.list_containers(&id)?;
            if !ctx.json(&reply) {
                ctx.table(CONTAINER_COLUMNS, view::items(&reply, "containers"));
            }
        }
        ContainerCommand::Add(args) => {
            let id = ctx.resolve(&args.vm)?;
            let image = ctx.resolve_image(&args.image)?;
            let spec = container_spec(&args.name, &image, &args.container);
            let reply = ctx.api.add_container(&id, spec)?;
            if !ctx.json(&reply) {
                ctx.table(CONTAINER_COLUMNS, std::slice::from_ref(&reply["container"]));
            }
        }
        ContainerCommand::Rm { vm, names } => {
            let id = ctx.resolve(&vm)?;
            for name in names {
                let reply = ctx.api.remove_container(&id, &name)?;
                ctx.json(&reply);
            }
        }
    }
    Ok(0)
}

/// The guest keeps the last 1 MiB of a container's output: reading on past
/// that much without `-f` would be chasing what it writes meanwhile.
const KEPT_OUTPUT: u64 = 1 << 20;

/// `logs`: the output kept, read from the oldest on (kilnd answers up to
/// 64 KiB a call); with `-f`, every reply of a followed read until the
/// container ended.
pub fn logs(ctx: &mut Ctx, args: LogsArgs) -> Result<i32, CtlError> {
    let id = ctx.resolve(&args.vm)?;
    if args.follow {
        let json = ctx.json;
        ctx.api
            .follow_container_logs(&id, &args.container, None, |reply| {
                if json {
                    println!("{reply}");
                } else {
                    write_output(&reply);
                }
                true
            })?;
        return Ok(0);
    }
    let (mut since, mut read) = (None, 0);
    loop {
        let reply = ctx.api.container_logs(&id, &args.container, since)?;
        let entries = view::items(&reply, "entries");
        // A read that found nothing more is only printed when it is the
        // only one, so --json of a short log is one object.
        if (since.is_none() || !entries.is_empty()) && !ctx.json(&reply) {
            write_output(&reply);
        }
        read += entries
            .iter()
            .map(|e| view::text(e, "text").len() as u64)
            .sum::<u64>();
        let cursor = reply.get("cursor").and_then(Value::as_u64);
        let ended = reply.get("ended").and_then(Value::as_bool) == Some(true);
        if entries.is_empty() || ended || read >= KEPT_OUTPUT || cursor.is_none() {
            return Ok(0);
        }
        since = cursor;
    }
}

/// A `ContainerLogs` reply's entries, each on kilnctl's stream of the same
/// name, in the order the container wrote them.
fn write_output(reply: &Value) {
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    let dropped = reply.get("dropped").and_then(Value::as_u64).unwrap_or(0);
    if dropped > 0 {
        let _ = writeln!(
            stderr,
            "kilnctl: {dropped} bytes of output were lost here (the guest keeps the last 1 MiB)"
        );
    }
    // Best effort: a closed pipe on our side is the reader's choice. Each
    // entry is flushed before the next, so that a terminal showing both
    // streams shows them in order.
    for entry in view::items(reply, "entries") {
        let text = view::text(entry, "text");
        let _ = if view::text(entry, "stream") == "stderr" {
            stderr
                .write_all(text.as_bytes())
                .and_then(|()| stderr.flush())
        } else {
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
        };
    }
}
