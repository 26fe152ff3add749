//! VMs: status, list, show, create, the lifecycle verbs, rm.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{process_keys, seconds, spec_object, CtlError, Ctx};
use crate::api::VmAction;
use crate::cli::{CreateArgs, Forward, VmSpecArgs};
use crate::output::{self, Fields};
use crate::view::{
    self, text, CONTAINER_COLUMNS, NIC_COLUMNS, USAGE_FIELDS, VM_COLUMNS, VM_FIELDS,
};

pub fn status(ctx: &mut Ctx) -> Result<i32, CtlError> {
    let s = ctx.api.get_status()?;
    if ctx.json(&s) {
        return Ok(0);
    }
    let mut f = Fields::default();
    f.add("Version", text(&s, "version"));
    f.add("Accel", text(&s, "accel"));
    f.add(
        "VMs",
        format!("{} ({} running)", text(&s, "vms"), text(&s, "running")),
    );
    for e in view::items(&s, "poolErrors") {
        f.add(
            "Pool error",
            format!("{}: {}", text(e, "path"), text(e, "reason")),
        );
    }
    for b in view::items(&s, "brokenRecords") {
        let (key, path, reason) = (text(b, "key"), text(b, "path"), text(b, "reason"));
        f.add(
            "Broken record",
            format!("{key} (moved to {path}): {reason}"),
        );
    }
    print!("{}", f.render());
    Ok(0)
}

pub fn list(ctx: &mut Ctx, quiet: bool) -> Result<i32, CtlError> {
    let reply = ctx.api.list_vms()?;
    if ctx.json(&reply) {
        return Ok(0);
    }
    let vms = view::items(&reply, "vms");
    if quiet {
        for vm in vms {
            println!("{}", text(vm, "id"));
        }
    } else {
        ctx.table(VM_COLUMNS, vms);
    }
    Ok(0)
}

pub fn show(ctx: &mut Ctx, reference: &str) -> Result<i32, CtlError> {
    let id = ctx.resolve(reference)?;
    let reply = ctx.api.describe_vm(&id)?;
    if ctx.json(&reply) {
        return Ok(0);
    }
    let vm = &reply["vm"];
    // A running VM's usage (kilnd reads it for DescribeVM) under its
    // fields, as an image's process is.
    let now = output::now_us();
    let mut block = view::block(VM_FIELDS, vm, now);
    view::add_to_block(&mut block, USAGE_FIELDS, &vm["usage"], now);
    print!("{}", block.render());
    for (fields, items) in [
        (NIC_COLUMNS, view::items(vm, "network")),
        (CONTAINER_COLUMNS, view::items(vm, "containers")),
    ] {
        if !items.is_empty() {
            println!();
            ctx.table(fields, items);
        }
    }
    Ok(0)
}

pub fn create(ctx: &mut Ctx, mut args: CreateArgs) -> Result<i32, CtlError> {
    if let Some(image) = args.vm.image.take() {
        args.vm.image = Some(ctx.resolve_image(&image)?);
    }
    let mut spec = spec_object(args.spec.as_deref())?;
    apply_vm_options(&mut spec, &args.vm)?;
    let created = ctx.api.create_vm(&args.name, Value::Object(spec))?;
    let printed = ctx.json(&created);
    let id = text(&created["vm"], "id");
    if args.start {
        let started = ctx.api.vm_action(VmAction::Start, &id)?;
        ctx.json(&started);
    }
    if !printed {
        println!("{id}");
    }
    Ok(0)
}

/// Put the VM options given on the command line into a VMSpec object,
/// over what `--spec` set. Values go to kilnd as given; kilnd checks them.
pub fn apply_vm_options(spec: &mut Map<String, Value>, o: &VmSpecArgs) -> Result<(), CtlError> {
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            spec.insert(key.to_owned(), v);
        }
    };
    set("vcpus", o.vcpus.map(Value::from));
    set("memoryMiB", o.memory.map(Value::from));
    set("kernel", absolute(o.kernel.as_deref())?);
    set("initrd", absolute(o.initrd.as_deref())?);
    set("cmdline", o.cmdline.clone().map(Value::from));
    set("accel", o.accel.clone().map(Value::from));
    set("gpus", o.gpus.map(|n| json!({ "count": n })));
    set("display", o.display.clone().map(Value::from));
    set("image", o.image.clone().map(Value::from));
    spec.extend(process_keys(&o.container));

    let mut limits = Map::new();
    let mut limit = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            limits.insert(key.to_owned(), v);
        }
    };
    limit("memoryMiB", o.limits.memory_cap.map(Value::from));
    limit("milliCpus", o.limits.milli_cpus.map(Value::from));
    limit("cpuWeight", o.limits.cpu_weight.map(Value::from));
    limit("ioWeight", o.limits.io_weight.map(Value::from));
    merge(spec, "limits", limits)?;

    let mut network = Map::new();
    let mut net = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            network.insert(key.to_owned(), v);
        }
    };
    net("mode", o.network.clone().map(Value::from));
    net("bridge", o.bridge.clone().map(Value::from));
    net("netns", o.netns.clone().map(Value::from));
    net("address", o.ip.clone().map(Value::from));
    net("hotplugSlots", o.hotplug_slots.map(Value::from));
    if !o.forwards.is_empty() {
        let forwards = o.forwards.iter().map(Forward::to_spec).collect();
        network.insert("forwards".into(), Value::Array(forwards));
    }
    merge(spec, "network", network)
}

/// `keys` into the object `spec[key]` (made when absent), over what
/// `--spec` set there.
fn merge(
    spec: &mut Map<String, Value>,
    key: &str,
    keys: Map<String, Value>,
) -> Result<(), CtlError> {
    if keys.is_empty() {
        return Ok(());
    }
    let entry = spec.entry(key).or_insert_with(|| Value::Object(Map::new()));
    match entry {
        Value::Object(existing) => {
            existing.extend(keys);
            Ok(())
        }
        _ => Err(CtlError::Usage(format!("--spec: {key} is not an object"))),
    }
}

/// kilnd wants absolute paths; the operator may type relative ones.
fn absolute(path: Option<&std::path::Path>) -> Result<Option<Value>, CtlError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let path = std::path::absolute(path)
        .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?;
    Ok(Some(Value::from(path.to_string_lossy().into_owned())))
}

/// start, kill, pause, resume, reboot: each VM in turn, stopping at the
/// first error.
pub fn act(ctx: &mut Ctx, action: VmAction, references: &[String]) -> Result<i32, CtlError> {
    for reference in references {
        let id = ctx.resolve(reference)?;
        let reply = ctx.api.vm_action(action, &id)?;
        ctx.json(&reply);
    }
    Ok(0)
}

pub fn stop(
    ctx: &mut Ctx,
    references: &[String],
    timeout: Option<Duration>,
) -> Result<i32, CtlError> {
    let timeout = seconds(timeout, "--timeout")?;
    for reference in references {
        let id = ctx.resolve(reference)?;
        let reply = ctx.api.stop_vm(&id, timeout)?;
        ctx.json(&reply);
    }
    Ok(0)
}

pub fn remove(ctx: &mut Ctx, references: &[String]) -> Result<i32, CtlError> {
    for reference in references {
        let id = ctx.resolve(reference)?;
        let reply = ctx.api.delete_vm(&id)?;
        ctx.json(&reply);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_override_the_spec_and_fill_network() {
        let mut spec = spec_object(Some(
            r#"{"vcpus": 1, "cmdline": "quiet", "network": {"mode": "bridge", "hotplugSlots": 1}}"#,
        ))
        .unwrap();
        let options = VmSpecArgs {
            vcpus: Some(2),
            memory: Some(256),
            kernel: Some("vmlinuz".into()),
            ip: Some("10.77.0.9".into()),
            forwards: vec![Forward {
                host_port: 8080,
                vm_port: 80,
                protocol: None,
            }],
            gpus: Some(1),
            ..VmSpecArgs::default()
        };
        apply_vm_options(&mut spec, &options).unwrap();
        let spec = Value::Object(spec);
        assert_eq!(spec["vcpus"], 2);
        assert_eq!(spec["memoryMiB"], 256);
        assert_eq!(spec["cmdline"], "quiet");
        assert_eq!(spec["gpus"], json!({"count": 1}));
        assert!(spec["kernel"].as_str().unwrap().starts_with('/'), "{spec}");
        assert!(spec["kernel"].as_str().unwrap().ends_with("/vmlinuz"));
        assert_eq!(
            spec["network"],
            json!({"mode": "bridge", "hotplugSlots": 1, "address": "10.77.0.9",
                   "forwards": [{"hostPort": 8080, "vmPort": 80}]})
        );
    }

    #[test]
    fn image_options_fill_the_vm_spec() {
        let mut spec = spec_object(Some(r#"{"env": ["A=1"], "memoryMiB": 256}"#)).unwrap();
        let options = VmSpecArgs {
            image: Some("kiln.test/app:v1".into()),
            container: crate::cli::ContainerArgs {
                env: vec!["B=2".into()],
                command: vec!["-c".into(), "echo hi".into()],
                ..Default::default()
            },
            ..VmSpecArgs::default()
        };
        apply_vm_options(&mut spec, &options).unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({"memoryMiB": 256, "image": "kiln.test/app:v1", "env": ["B=2"],
                   "command": ["-c", "echo hi"]})
        );
    }

    #[test]
    fn limit_options_fill_the_spec_limits() {
        let mut spec = spec_object(Some(r#"{"limits": {"ioWeight": 7, "cpuWeight": 1}}"#)).unwrap();
        let options = VmSpecArgs {
            limits: crate::cli::LimitArgs {
                memory_cap: Some(300),
                milli_cpus: Some(500),
                cpu_weight: Some(50),
                io_weight: None,
            },
            ..VmSpecArgs::default()
        };
        apply_vm_options(&mut spec, &options).unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({"limits": {"memoryMiB": 300, "milliCpus": 500, "cpuWeight": 50, "ioWeight": 7}})
        );
        let mut spec = spec_object(Some(r#"{"limits": 3}"#)).unwrap();
        let err = apply_vm_options(&mut spec, &options).unwrap_err();
        assert_eq!(err.to_string(), "--spec: limits is not an object");
    }

    #[test]
    fn no_options_no_keys() {
        let mut spec = Map::new();
        apply_vm_options(&mut spec, &VmSpecArgs::default()).unwrap();
        assert!(spec.is_empty());
    }
}
