//! Snapshots: snapshot create/ls/rm, restore (a new VM, or `--into` a
//! stopped one), fork.

use super::{CtlError, Ctx};
use crate::cli::{RestoreArgs, SnapshotCommand};
use crate::view::{self, text, SNAPSHOT_COLUMNS};

pub fn snapshot(ctx: &mut Ctx, command: SnapshotCommand) -> Result<i32, CtlError> {
    match command {
        SnapshotCommand::Create {
            vm,
            name,
            keep_paused,
        } => {
            let id = ctx.resolve(&vm)?;
            let reply = ctx.api.snapshot_vm(&id, &name, keep_paused)?;
            if !ctx.json(&reply) {
                ctx.table(SNAPSHOT_COLUMNS, std::slice::from_ref(&reply["snapshot"]));
            }
        }
        SnapshotCommand::Ls { quiet } => {
            let reply = ctx.api.list_snapshots()?;
            if ctx.json(&reply) {
                return Ok(0);
            }
            let snapshots = view::items(&reply, "snapshots");
            if quiet {
                for snapshot in snapshots {
                    println!("{}", text(snapshot, "name"));
                }
            } else {
                ctx.table(SNAPSHOT_COLUMNS, snapshots);
            }
        }
        SnapshotCommand::Rm { names } => {
            for name in names {
                let reply = ctx.api.delete_snapshot(&name)?;
                ctx.json(&reply);
            }
        }
    }
    Ok(0)
}

/// A new VM from the snapshot: its id printed, as `create` prints one.
/// `--into` takes an existing VM back and prints nothing, as `start` does.
pub fn restore(ctx: &mut Ctx, args: RestoreArgs) -> Result<i32, CtlError> {
    let into = args.into.as_deref().map(|vm| ctx.resolve(vm)).transpose()?;
    let reply = ctx.api.restore_vm(
        &args.snapshot,
        args.name.as_deref(),
        args.same_identity,
        into.as_deref(),
    )?;
    if !ctx.json(&reply) && into.is_none() {
        println!("{}", text(&reply["vm"], "id"));
    }
    Ok(0)
}

/// The copies' ids, one a line.
pub fn fork(ctx: &mut Ctx, reference: &str, count: u32) -> Result<i32, CtlError> {
    let id = ctx.resolve(reference)?;
    let reply = ctx.api.fork_vm(&id, count)?;
    if !ctx.json(&reply) {
        for vm in view::items(&reply, "vms") {
            println!("{}", text(vm, "id"));
        }
    }
    Ok(0)
}
