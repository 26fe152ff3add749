//! deploy and undeploy: an Oakestra SLA's microservices as VMs (`sla`
//! reads the SLA into VM specs), made, started and removed with the calls
//! `create`, `start` and `rm` make. Deploying twice changes nothing: a VM
//! of the microservice's name that runs as asked is left alone.

use std::path::Path;

use serde_json::{json, Value};

use super::{images, CtlError, Ctx};
use crate::api::VmAction;
use crate::cli::DeployArgs;
use crate::client::ClientError;
use crate::output::{shell_words, short_digest, Column, Table};
use crate::sla::{self, Service, Sla};
use crate::view::{self, text};

/// VM states `deploy` starts: it wants every microservice running.
const NOT_RUNNING: &[&str] = &["created", "stopped", "failed"];

/// One microservice on its way: its spec, its VM once there is one, and
/// what was done.
struct Plan<'a> {
    service: &'a Service,
    spec: Value,
    vm: Option<Value>,
    result: &'static str,
}

/// `deploy SLA`: every microservice's VM created and started unless it
/// runs as asked already. Everything is checked before anything changes
/// (a missing image is pulled meanwhile); if a VM cannot be created or
/// started, the VMs this run created are removed again.
pub fn deploy(ctx: &mut Ctx, args: &DeployArgs) -> Result<i32, CtlError> {
    let (file, sla) = read(&args.sla)?;
    let bridge = args.network == "bridge";
    let specs = sla
        .services
        .iter()
        .map(|service| service.spec(bridge))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CtlError::Sla {
            file: file.clone(),
            error,
        })?;
    let vms = view::items(&ctx.api.list_vms()?, "vms").to_vec();
    let mut plans = Vec::new();
    for (service, spec) in sla.services.iter().zip(specs) {
        let image = stored_image(ctx, service)?;
        let vm = vms.iter().find(|vm| text(vm, "name") == service.name);
        if let Some(vm) = vm {
            check_runs_as_asked(service, bridge, &image, vm)?;
        }
        plans.push(Plan {
            service,
            spec,
            vm: vm.cloned(),
            result: "unchanged",
        });
    }
    let mut created = Vec::new();
    if let Err(e) = apply(ctx, &mut plans, &mut created) {
        for id in created.iter().rev() {
            // Best effort: the error that stopped the run is the one to
            // report; a VM left behind is listed by `ls`.
            let _ = ctx.api.delete_vm(id);
        }
        return Err(e);
    }
    for warning in &sla.warnings {
        eprintln!("kilnctl: {file}: {warning}");
    }
    let rows: Vec<Value> = plans
        .into_iter()
        .map(|p| {
            let vm = p.vm.unwrap_or_default();
            json!({ "name": p.service.name, "id": text(&vm, "id"), "result": p.result, "vm": vm })
        })
        .collect();
    print_results(ctx, rows);
    Ok(0)
}

/// Create the missing VMs, then start those not running; `created` gets
/// the ids of the VMs made here.
fn apply(ctx: &mut Ctx, plans: &mut [Plan], created: &mut Vec<String>) -> Result<(), CtlError> {
    for plan in plans.iter_mut().filter(|p| p.vm.is_none()) {
        let name = &plan.service.name;
        let reply = ctx
            .api
            .create_vm(name, plan.spec.clone())
            .map_err(|e| for_vm(name, e))?;
        created.push(text(&reply["vm"], "id"));
        plan.vm = Some(reply["vm"].clone());
        plan.result = "created";
    }
    for plan in plans.iter_mut() {
        let Some(vm) = &plan.vm else { continue };
        if !NOT_RUNNING.contains(&text(vm, "state").as_str()) {
            continue;
        }
        let reply = ctx
            .api
            .vm_action(VmAction::Start, &text(vm, "id"))
            .map_err(|e| for_vm(&plan.service.name, e))?;
        plan.vm = Some(reply["vm"].clone());
        if plan.result == "unchanged" {
            plan.result = "started";
        }
    }
    Ok(())
}

/// `undeploy SLA`: the VM of every microservice removed (`absent` when
/// there is none). Only VMs of exactly those names are touched.
pub fn undeploy(ctx: &mut Ctx, path: &Path) -> Result<i32, CtlError> {
    let (_, sla) = read(path)?;
    let vms = view::items(&ctx.api.list_vms()?, "vms").to_vec();
    let mut rows = Vec::new();
    for service in &sla.services {
        let row = match vms.iter().find(|vm| text(vm, "name") == service.name) {
            Some(vm) => {
                let id = text(vm, "id");
                ctx.api
                    .delete_vm(&id)
                    .map_err(|e| for_vm(&service.name, e))?;
                json!({ "name": service.name, "id": id, "result": "removed" })
            }
            None => json!({ "name": service.name, "id": "", "result": "absent" }),
        };
        rows.push(row);
    }
    print_results(ctx, rows);
    Ok(0)
}

/// The SLA at `path`: its name for messages, and what it asks for.
fn read(path: &Path) -> Result<(String, Sla), CtlError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError::Usage(format!("{file}: cannot read it: {e}")))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| CtlError::Usage(format!("{file}: not JSON: {e}")))?;
    let sla = sla::parse(&value).map_err(|error| CtlError::Sla {
        file: file.clone(),
        error,
    })?;
    Ok((file, sla))
}

/// The stored image the service runs, pulled first when kilnd has none of
/// that reference (as Oakestra's nodes pull a service's image).
fn stored_image(ctx: &mut Ctx, service: &Service) -> Result<Value, CtlError> {
    match ctx.api.describe_image(&service.image) {
        Ok(reply) => Ok(reply["image"].clone()),
        Err(ClientError::Remote { name, .. }) if name == "io.kiln.Manager.ImageNotFound" => {
            images::pull(ctx, &service.image).map_err(|e| match e {
                CtlError::Client(error) => for_vm(&service.name, error),
                other => other,
            })
        }
        Err(e) => Err(for_vm(&service.name, e)),
    }
}

fn for_vm(name: &str, error: ClientError) -> CtlError {
    CtlError::ForVm {
        vm: name.to_owned(),
        error,
    }
}

/// An error when `vm` (as `ListVMs` shows it) runs otherwise than
/// `service` asks, as far as a VM record shows: vcpus, memory, the image's
/// digest, the command, the restart policy, the network and its address,
/// and the GPUs while it runs. The env, the storage and the port forwards
/// are not in the record, so a change to them goes unseen.
fn check_runs_as_asked(
    service: &Service,
    bridge: bool,
    image: &Value,
    vm: &Value,
) -> Result<(), CtlError> {
    let conflict = |key: &str, has: String, wants: String| CtlError::Conflict {
        vm: service.name.clone(),
        has,
        field: if key.starts_with("--") {
            key.to_owned()
        } else {
            service.field(key)
        },
        wants,
    };
    let differ = |key: &str, what: &str, has: String, wants: String| {
        if has == wants {
            Ok(())
        } else {
            Err(conflict(
                key,
                format!("{what} {has}"),
                format!("{what} {wants}"),
            ))
        }
    };
    if let Some(pool) = vm.get("pool").and_then(Value::as_str) {
        return Err(CtlError::Conflict {
            vm: service.name.clone(),
            has: format!("as a member of pool {pool}"),
            field: service.at.clone(),
            wants: "a VM of its own".into(),
        });
    }
    if let Some(vcpus) = service.vcpus {
        differ("vcpus", "vcpus", text(vm, "vcpus"), vcpus.to_string())?;
    }
    if let Some(memory) = service.memory_mib {
        differ(
            "memory",
            "memoryMiB",
            text(vm, "memoryMiB"),
            memory.to_string(),
        )?;
    }
    let main = view::items(vm, "containers")
        .iter()
        .find(|c| text(c, "name") == "main");
    let Some(main) = main else {
        return Err(conflict(
            "image",
            "no container main".into(),
            format!("image {}", service.image),
        ));
    };
    let (has_digest, wants_digest) = (text(main, "digest"), text(image, "digest"));
    if has_digest != wants_digest {
        return Err(conflict(
            "image",
            format!("image {}", short_digest(&has_digest)),
            format!("image {} ({})", service.image, short_digest(&wants_digest)),
        ));
    }
    let argv = if service.argv.is_empty() {
        let process = &image["process"];
        let words = view::items(process, "entrypoint")
            .iter()
            .chain(view::items(process, "cmd"));
        words.map(|w| w.as_str().unwrap_or("").to_owned()).collect()
    } else {
        service.argv.clone()
    };
    let has_argv: Vec<String> = view::items(main, "command")
        .iter()
        .map(|w| w.as_str().unwrap_or("").to_owned())
        .collect();
    let words = |argv: &[String]| shell_words(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    differ("cmd", "command", words(&has_argv), words(&argv))?;
    differ(
        "one_shot",
        "restartPolicy",
        text(main, "restartPolicy"),
        service.restart_policy().to_owned(),
    )?;
    let nics = view::items(vm, "network");
    match (bridge, nics.first()) {
        (true, None) => {
            return Err(conflict(
                "--network",
                "without a network".into(),
                "bridge".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(conflict("--network", "on a network".into(), "none".into()))
        }
        (true, Some(nic)) => {
            if let Some(address) = service.address {
                differ(
                    "addresses.rr_ip",
                    "address",
                    text(nic, "address"),
                    address.to_string(),
                )?;
            }
        }
        (false, None) => {}
    }
    // Render nodes are leased while the VM runs: only then does the record
    // say how many it has.
    if vm.get("pid").is_some_and(|p| !p.is_null()) {
        let gpus = view::items(vm, "gpus").len().to_string();
        differ("vgpus", "GPUs", gpus, service.gpus.to_string())?;
    }
    Ok(())
}

/// One row per microservice: a table (name, VM id, what was done) or,
/// with `--json`, `{"microservices": [...]}`.
fn print_results(ctx: &Ctx, rows: Vec<Value>) {
    let reply = json!({ "microservices": rows });
    if ctx.json(&reply) {
        return;
    }
    let column = |header, shrink| Column { header, shrink };
    let mut table = Table::new(&[
        column("NAME", true),
        column("ID", false),
        column("RESULT", false),
    ]);
    for row in view::items(&reply, "microservices") {
        let id = text(row, "id");
        let id = if id.is_empty() { "-".into() } else { id };
        table.row(vec![text(row, "name"), id, text(row, "result")]);
    }
    print!("{}", table.render(ctx.width));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        let sla = json!({"sla_version": "v2.0", "applications": [{
            "application_name": "app", "application_namespace": "test",
            "microservices": [{"microservice_name": "web", "microservice_namespace": "test",
                "memory": 128, "code": "kiln.test/app:v1", "addresses": {"rr_ip": "10.30.0.9"}}]}]});
        sla::parse(&sla).unwrap().services.remove(0)
    }

    fn image() -> Value {
        json!({"digest": "sha256:3fa2c1d0e4b5ffff",
               "process": {"entrypoint": ["/bin/sh"], "cmd": ["-c", "cat /etc/hello"]}})
    }

    /// A VM as ListVMs shows one that runs `service()`.
    fn vm() -> Value {
        json!({"id": "0011aa22bb33", "name": "app.test.web.test", "state": "ready", "pid": 42,
               "vcpus": 1, "memoryMiB": 128, "gpus": [],
               "network": [{"index": 0, "address": "10.30.0.9"}],
               "containers": [{"name": "main", "digest": "sha256:3fa2c1d0e4b5ffff",
                               "command": ["/bin/sh", "-c", "cat /etc/hello"],
                               "restartPolicy": "always"}]})
    }

    fn check(vm: &Value, bridge: bool) -> Result<(), String> {
        check_runs_as_asked(&service(), bridge, &image(), vm).map_err(|e| e.to_string())
    }

    #[test]
    fn a_vm_that_runs_as_asked_passes() {
        assert_eq!(check(&vm(), true), Ok(()));
        // Stopped: no GPUs leased, which says nothing.
        let mut stopped = vm();
        stopped["pid"] = Value::Null;
        stopped["gpus"] = json!(["renderD128"]);
        assert_eq!(check(&stopped, true), Ok(()));
    }

    #[test]
    fn a_vm_that_runs_otherwise_is_named_with_the_field() {
        let at = "applications[0].microservices[0]";
        for (key, value, message) in [
            (
                "memoryMiB",
                json!(256),
                format!("runs memoryMiB 256; {at}.memory asks for memoryMiB 128"),
            ),
            (
                "pool",
                json!("ci"),
                format!("runs as a member of pool ci; {at} asks for a VM of its own"),
            ),
            (
                "network",
                json!([{"index": 0, "address": "10.30.0.2"}]),
                format!("runs address 10.30.0.2; {at}.addresses.rr_ip asks for address 10.30.0.9"),
            ),
            (
                "network",
                json!([]),
                "runs without a network; --network asks for bridge".into(),
            ),
            (
                "gpus",
                json!(["renderD128"]),
                format!("runs GPUs 1; {at}.vgpus asks for GPUs 0"),
            ),
            (
                "containers",
                json!([]),
                format!("runs no container main; {at}.image asks for image kiln.test/app:v1"),
            ),
        ] {
            let mut changed = vm();
            changed[key] = value;
            assert_eq!(
                check(&changed, true),
                Err(format!("app.test.web.test {message} (undeploy it first)")),
            );
        }
        let mut changed = vm();
        changed["containers"][0]["digest"] = json!("sha256:0000aaaa1111bbbb");
        let err = check(&changed, true).unwrap_err();
        assert!(
            err.contains("runs image 0000aaaa1111; applications[0].microservices[0].image asks for image kiln.test/app:v1 (3fa2c1d0e4b5)"),
            "{err}"
        );
        changed = vm();
        changed["containers"][0]["command"] = json!(["/bin/sh", "-c", "sleep 1"]);
        let err = check(&changed, true).unwrap_err();
        assert!(
            err.contains(&format!(
                "{at}.cmd asks for command /bin/sh -c 'cat /etc/hello'"
            )),
            "{err}"
        );
        changed = vm();
        changed["containers"][0]["restartPolicy"] = json!("no");
        assert!(check(&changed, true)
            .unwrap_err()
            .contains(".one_shot asks for restartPolicy always"));
        assert!(check(&vm(), false)
            .unwrap_err()
            .contains("runs on a network; --network asks for none"));
    }
}
