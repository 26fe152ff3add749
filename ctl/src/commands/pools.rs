//! Pools and their leases: pool ls/show/create/resize/rm, acquire,
//! release, renew.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::vms::apply_vm_options;
use super::{container_spec, seconds, spec_object, CtlError, Ctx};
use crate::cli::{whole_seconds, AcquireArgs, ContainerArgs, PoolCommand, PoolCreateArgs};
use crate::view::{self, text, POOL_COLUMNS, POOL_FIELDS};

pub fn pool(ctx: &mut Ctx, command: PoolCommand) -> Result<i32, CtlError> {
    match command {
        PoolCommand::Ls => {
            let reply = ctx.api.list_pools()?;
            if !ctx.json(&reply) {
                ctx.table(POOL_COLUMNS, view::items(&reply, "pools"));
            }
        }
        PoolCommand::Show { name } => {
            let reply = ctx.api.describe_pool(&name)?;
            if !ctx.json(&reply) {
                ctx.block(POOL_FIELDS, &reply["pool"]);
            }
        }
        PoolCommand::Create(mut args) => {
            if let Some(image) = args.vm.image.take() {
                args.vm.image = Some(ctx.resolve_image(&image)?);
            }
            let name = args.name.clone();
            let spec = pool_spec(*args)?;
            let reply = ctx.api.create_pool(&name, spec)?;
            ctx.json(&reply);
        }
        PoolCommand::Resize { name, warm, max } => {
            let reply = ctx.api.resize_pool(&name, warm, max)?;
            ctx.json(&reply);
        }
        PoolCommand::Rm { names } => {
            for name in names {
                let reply = ctx.api.delete_pool(&name)?;
                ctx.json(&reply);
            }
        }
    }
    Ok(0)
}

/// A PoolSpec object: `--spec`, then the options over it.
fn pool_spec(args: PoolCreateArgs) -> Result<Value, CtlError> {
    let mut spec = spec_object(args.spec.as_deref())?;
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            spec.insert(key.to_owned(), v);
        }
    };
    set("mode", args.mode.map(Value::from));
    set("warm", args.warm.map(Value::from));
    set("max", args.max.map(Value::from));
    set(
        "refillConcurrency",
        args.refill_concurrency.map(Value::from),
    );
    set(
        "recycleOnExpiry",
        args.recycle_on_expiry.then_some(Value::Bool(true)),
    );
    set(
        "warmupSec",
        seconds(args.warmup, "--warmup")?.map(Value::from),
    );
    let mut vm = match spec.remove("vm") {
        Some(Value::Object(vm)) => vm,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(CtlError::Usage("--spec: vm is not an object".into())),
    };
    apply_vm_options(&mut vm, &args.vm)?;
    if !vm.is_empty() {
        spec.insert("vm".into(), Value::Object(vm));
    }
    Ok(Value::Object(spec))
}

pub fn acquire(ctx: &mut Ctx, args: AcquireArgs) -> Result<i32, CtlError> {
    let ttl = seconds(args.ttl, "--ttl")?;
    let timeout_ms = args.timeout.map(|t| t.as_millis() as u64);
    let labels: BTreeMap<String, String> = args.labels.into_iter().collect();
    // The VM runs the image as `main`, as a VM created with one does.
    let container = match args.image {
        Some(image) => Some(container_spec(
            "main",
            &ctx.resolve_image(&image)?,
            &args.container,
        )),
        None if args.container != ContainerArgs::default() => {
            return Err(CtlError::Usage(
                "the container options of acquire need --image".into(),
            ))
        }
        None => None,
    };
    let reply = ctx
        .api
        .acquire(&args.pool, timeout_ms, &labels, ttl, container)?;
    if !ctx.json(&reply) {
        println!("{}", text(&reply["vm"], "id"));
    }
    Ok(0)
}

pub fn release(ctx: &mut Ctx, references: &[String], recycle: bool) -> Result<i32, CtlError> {
    for reference in references {
        let id = ctx.resolve(reference)?;
        let reply = ctx.api.release(&id, recycle)?;
        ctx.json(&reply);
    }
    Ok(0)
}

pub fn renew(ctx: &mut Ctx, reference: &str, ttl: Duration) -> Result<i32, CtlError> {
    let ttl = whole_seconds(ttl, "--ttl").map_err(CtlError::Usage)?;
    let id = ctx.resolve(reference)?;
    let reply = ctx.api.renew(&id, ttl)?;
    ctx.json(&reply);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use serde_json::json;

    fn parse(args: &[&str]) -> PoolCreateArgs {
        let cli = Cli::try_parse_from(args).expect("parse");
        match cli.command {
            Command::Pool(PoolCommand::Create(a)) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pool_specs_from_options_and_json() {
        let spec = pool_spec(parse(&[
            "kilnctl", "pool", "create", "web", "--warm", "2", "--max", "4", "--memory", "256",
        ]))
        .unwrap();
        assert_eq!(spec, json!({"warm": 2, "max": 4, "vm": {"memoryMiB": 256}}));
        let spec = pool_spec(parse(&[
            "kilnctl",
            "pool",
            "create",
            "web",
            "--spec",
            r#"{"mode": "cold", "warm": 1, "max": 2, "vm": {"vcpus": 2}}"#,
            "--max",
            "3",
            "--recycle-on-expiry",
        ]))
        .unwrap();
        assert_eq!(
            spec,
            json!({"mode": "cold", "warm": 1, "max": 3, "recycleOnExpiry": true, "vm": {"vcpus": 2}})
        );
        assert!(Cli::try_parse_from(["kilnctl", "pool", "create", "web"]).is_err());
    }
}
