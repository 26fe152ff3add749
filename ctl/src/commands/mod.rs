//! The subcommands: each turns its arguments into one or two API calls and
//! prints the reply, as a table or as the JSON kilnd sent.

mod host;
mod pools;
mod vms;

use std::time::Duration;

use serde_json::Value;

use crate::api::{Manager, VmAction};
use crate::cli::{whole_seconds, Command};
use crate::client::ClientError;
use crate::exit::Class;
use crate::output;
use crate::view::{self, Field};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A VM reference that is the id prefix of several VMs.
    #[error("{reference:?} matches several VMs: {}", candidates.join(", "))]
    Ambiguous {
        reference: String,
        candidates: Vec<String>,
    },
    /// Arguments clap cannot check (a `--spec` that is not JSON, ...).
    #[error("{0}")]
    Usage(String),
}

impl CtlError {
    pub fn class(&self) -> Class {
        match self {
            Self::Client(e) => Class::of_client_error(e),
            Self::Ambiguous { .. } | Self::Usage(_) => Class::Usage,
        }
    }

    /// The varlink error name, when kilnd answered with one.
    pub fn error_name(&self) -> Option<&str> {
        match self {
            Self::Client(ClientError::Remote { name, .. }) => Some(name),
            _ => None,
        }
    }
}

/// What every command works with: the API, the output format, and the VM
/// list once a reference had to be resolved.
#[derive(Debug)]
pub struct Ctx {
    api: Manager,
    json: bool,
    width: Option<usize>,
    vms: Option<Vec<Value>>,
}

impl Ctx {
    pub fn new(api: Manager, json: bool) -> Self {
        Self {
            api,
            json,
            width: output::terminal_width(),
            vms: None,
        }
    }

    /// The id of the VM `reference` names (see [`pick`]); the VM list is
    /// fetched once per run.
    fn resolve(&mut self, reference: &str) -> Result<String, CtlError> {
        let vms = match &self.vms {
            Some(vms) => vms,
            None => self
                .vms
                .insert(view::items(&self.api.list_vms()?, "vms").to_vec()),
        };
        pick(vms, reference)
    }

    /// `--json`: the reply as kilnd sent it.
    fn json(&self, raw: &Value) -> bool {
        if self.json {
            output::print_json(raw);
        }
        self.json
    }

    /// `objects` as a table of `fields`, fitted to the terminal.
    fn table(&self, fields: &[Field], objects: &[Value]) {
        let table = view::table(fields, objects, output::now_us());
        print!("{}", table.render(self.width));
    }

    /// `object` as `Key: value` lines.
    fn block(&self, fields: &[Field], object: &Value) {
        print!("{}", view::block(fields, object, output::now_us()).render());
    }
}

/// Run `command`; Ok(exit code).
pub fn run(ctx: &mut Ctx, command: Command) -> Result<i32, CtlError> {
    match command {
        Command::Status => vms::status(ctx),
        Command::List { quiet } => vms::list(ctx, quiet),
        Command::Show { vm } => vms::show(ctx, &vm),
        Command::Create(args) => vms::create(ctx, *args),
        Command::Start(r) => vms::act(ctx, VmAction::Start, &r.vms),
        Command::Stop { vms: r, timeout } => vms::stop(ctx, &r.vms, timeout),
        Command::Kill(r) => vms::act(ctx, VmAction::Kill, &r.vms),
        Command::Pause(r) => vms::act(ctx, VmAction::Pause, &r.vms),
        Command::Resume(r) => vms::act(ctx, VmAction::Resume, &r.vms),
        Command::Reboot(r) => vms::act(ctx, VmAction::Reboot, &r.vms),
        Command::Rm(r) => vms::remove(ctx, &r.vms),
        Command::Exec(args) => vms::exec(ctx, args),
        Command::Pool(command) => pools::pool(ctx, command),
        Command::Acquire(args) => pools::acquire(ctx, args),
        Command::Release { vms: r, recycle } => pools::release(ctx, &r.vms, recycle),
        Command::Renew { vm, ttl } => pools::renew(ctx, &vm, ttl),
        Command::Nic(command) => host::nic(ctx, command),
        Command::Gpu(command) => host::gpu(ctx, command),
        Command::Watch => host::watch(ctx),
        // Answered without kilnd, in main.
        Command::Completions { .. } => Ok(0),
    }
}

/// The VM `reference` names: an exact id, else an exact name, else the one
/// VM whose id starts with it. Anything else is passed on as given, so
/// kilnd answers `NoSuchVM` itself; several prefix matches are an error
/// naming them.
pub fn pick(vms: &[Value], reference: &str) -> Result<String, CtlError> {
    let ids: Vec<(String, String)> = vms
        .iter()
        .map(|v| (view::text(v, "id"), view::text(v, "name")))
        .collect();
    if ids.iter().any(|(id, _)| id == reference) {
        return Ok(reference.to_owned());
    }
    if let Some((id, _)) = ids.iter().find(|(_, name)| name == reference) {
        return Ok(id.clone());
    }
    let matches: Vec<&(String, String)> = ids
        .iter()
        .filter(|(id, _)| !reference.is_empty() && id.starts_with(reference))
        .collect();
    match matches.as_slice() {
        [] => Ok(reference.to_owned()),
        [(id, _)] => Ok(id.clone()),
        many => Err(CtlError::Ambiguous {
            reference: reference.to_owned(),
            candidates: many
                .iter()
                .map(|(id, name)| format!("{id} ({name})"))
                .collect(),
        }),
    }
}

/// A duration option in the API's whole seconds.
fn seconds(duration: Option<Duration>, option: &str) -> Result<Option<u64>, CtlError> {
    duration
        .map(|d| whole_seconds(d, option))
        .transpose()
        .map_err(CtlError::Usage)
}

/// `--spec`: JSON text, or `@FILE` holding it; must be an object.
fn spec_object(spec: Option<&str>) -> Result<serde_json::Map<String, Value>, CtlError> {
    let Some(spec) = spec else {
        return Ok(serde_json::Map::new());
    };
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CtlError::Usage(format!("--spec: cannot read {path}: {e}")))?,
        None => spec.to_owned(),
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(CtlError::Usage("--spec: not a JSON object".into())),
        Err(e) => Err(CtlError::Usage(format!("--spec: not JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, name: &str) -> Value {
        serde_json::json!({ "id": id, "name": name })
    }

    #[test]
    fn references_resolve_by_id_name_then_unique_prefix() {
        let vms = [
            vm("3fa2c1d0e4b5", "web"),
            vm("3f00aa11bb22", "db"),
            vm("77aa00000000", "3fa2c1d0e4b5x"),
        ];
        assert_eq!(pick(&vms, "3fa2c1d0e4b5").unwrap(), "3fa2c1d0e4b5");
        assert_eq!(pick(&vms, "db").unwrap(), "3f00aa11bb22");
        assert_eq!(pick(&vms, "3fa").unwrap(), "3fa2c1d0e4b5");
        assert_eq!(pick(&vms, "77").unwrap(), "77aa00000000");
        // Unknown: passed on for kilnd to refuse by name.
        assert_eq!(pick(&vms, "nope").unwrap(), "nope");
        assert_eq!(pick(&vms, "").unwrap(), "");
        let err = pick(&vms, "3f").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"3f\" matches several VMs: 3fa2c1d0e4b5 (web), 3f00aa11bb22 (db)"
        );
        assert_eq!(err.class(), Class::Usage);
    }

    #[test]
    fn specs_are_json_objects() {
        assert!(spec_object(None).unwrap().is_empty());
        assert_eq!(spec_object(Some(r#"{"vcpus":2}"#)).unwrap()["vcpus"], 2);
        assert!(spec_object(Some("[1]")).is_err());
        assert!(spec_object(Some("{")).is_err());
        assert!(spec_object(Some("@/nonexistent/spec.json")).is_err());
    }
}
