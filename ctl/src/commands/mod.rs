//! The subcommands: each turns its arguments into one or two API calls and
//! prints the reply, as a table or as the JSON kilnd sent.

mod containers;
mod copy;
mod deploy;
mod host;
mod images;
mod pools;
mod processes;
mod snapshots;
mod vms;

use std::io;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::api::{Manager, VmAction};
use crate::archive::ArchiveError;
use crate::cli::{whole_seconds, Command, ContainerArgs};
use crate::client::ClientError;
use crate::exit::Class;
use crate::output;
use crate::sla::SlaError;
use crate::view::{self, Field};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A VM reference that is the id prefix of several VMs, or an image
    /// reference that is the digest prefix of several images.
    #[error("{reference:?} matches several {what}: {}", candidates.join(", "))]
    Ambiguous {
        reference: String,
        /// `VMs` or `images`.
        what: &'static str,
        candidates: Vec<String>,
    },
    /// Arguments clap cannot check (a `--spec` that is not JSON, ...).
    #[error("{0}")]
    Usage(String),
    /// An SLA field kilnctl refuses or cannot read (`deploy`).
    #[error("{file}: {error}")]
    Sla { file: String, error: SlaError },
    /// A microservice's VM runs otherwise than its SLA now asks (`deploy`).
    #[error("{vm} runs {has}; {field} asks for {wants} (undeploy it first)")]
    Conflict {
        vm: String,
        has: String,
        /// The SLA field (or option) that asks otherwise.
        field: String,
        wants: String,
    },
    /// kilnd's answer to a call made for one VM of several (`deploy`).
    #[error("{error} (VM {vm})")]
    ForVm { vm: String, error: ClientError },
    /// A state kilnctl cannot act on (`cp` of a directory over a file).
    #[error("{0}")]
    Invalid(String),
    /// A copy's archive could not be made or unpacked here (`cp`).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Something on this machine failed: a file to copy, the terminal.
    #[error("{what}: {source}")]
    Local {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl CtlError {
    pub fn class(&self) -> Class {
        match self {
            Self::Client(e) | Self::ForVm { error: e, .. } => Class::of_client_error(e),
            Self::Ambiguous { .. } | Self::Usage(_) => Class::Usage,
            Self::Sla { .. } | Self::Conflict { .. } | Self::Invalid(_) => Class::Invalid,
            Self::Archive(ArchiveError::Local { source, .. }) | Self::Local { source, .. } => {
                Class::of_io_error(source)
            }
            Self::Archive(_) => Class::Failure,
        }
    }

    /// The varlink error name, when kilnd answered with one.
    pub fn error_name(&self) -> Option<&str> {
        match self {
            Self::Client(ClientError::Remote { name, .. })
            | Self::ForVm {
                error: ClientError::Remote { name, .. },
                ..
            } => Some(name),
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

    /// The image `reference` names. A digest prefix (hex, with or without
    /// `sha256:`, as `image ls` shows digests) that fits one stored image
    /// names it; anything else goes to kilnd as given, which normalises
    /// references (`busybox` is `docker.io/library/busybox:latest`) and
    /// answers `ImageNotFound` itself.
    fn resolve_image(&mut self, reference: &str) -> Result<String, CtlError> {
        let bare = !reference.starts_with("sha256:");
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let digest_like = (1..=64).contains(&hex.len())
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !digest_like || (!bare && hex.len() == 64) {
            return Ok(reference.to_owned());
        }
        // Bare hex can be a repository too (`cafe` is
        // docker.io/library/cafe:latest): a stored image of that name
        // wins, as in docker.
        if bare && self.api.describe_image(reference).is_ok() {
            return Ok(reference.to_owned());
        }
        let images = self.api.list_images()?;
        pick_image(view::items(&images, "images"), reference)
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
        Command::Exec(args) => processes::exec(ctx, args),
        Command::Shell(args) => processes::shell(ctx, args),
        Command::Cp(args) => copy::cp(ctx, args),
        Command::Logs(args) => containers::logs(ctx, args),
        Command::Container(command) => containers::container(ctx, command),
        Command::Image(command) => images::image(ctx, command),
        Command::Pool(command) => pools::pool(ctx, command),
        Command::Acquire(args) => pools::acquire(ctx, args),
        Command::Release { vms: r, recycle } => pools::release(ctx, &r.vms, recycle),
        Command::Renew { vm, ttl } => pools::renew(ctx, &vm, ttl),
        Command::Snapshot(command) => snapshots::snapshot(ctx, command),
        Command::Restore(args) => snapshots::restore(ctx, args),
        Command::Fork { vm, count } => snapshots::fork(ctx, &vm, count),
        Command::Nic(command) => host::nic(ctx, command),
        Command::Gpu(command) => host::gpu(ctx, command),
        Command::Watch => host::watch(ctx),
        Command::Deploy(args) => deploy::deploy(ctx, &args),
        Command::Undeploy { sla } => deploy::undeploy(ctx, &sla),
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
            what: "VMs",
            candidates: many
                .iter()
                .map(|(id, name)| format!("{id} ({name})"))
                .collect(),
        }),
    }
}

/// The image whose digest starts with the hex of `reference` (`sha256:`
/// optional): its digest; none is `reference` as given, several an error
/// naming them.
fn pick_image(images: &[Value], reference: &str) -> Result<String, CtlError> {
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    let matches: Vec<&Value> = images
        .iter()
        .filter(|i| {
            view::text(i, "digest")
                .strip_prefix("sha256:")
                .is_some_and(|d| d.starts_with(hex))
        })
        .collect();
    match matches.as_slice() {
        [] => Ok(reference.to_owned()),
        [image] => Ok(view::text(image, "digest")),
        many => Err(CtlError::Ambiguous {
            reference: reference.to_owned(),
            what: "images",
            candidates: many
                .iter()
                .map(|i| {
                    let digest = output::short_digest(&view::text(i, "digest"));
                    match view::items(i, "references").first().and_then(Value::as_str) {
                        Some(name) => format!("{digest} ({name})"),
                        None => digest,
                    }
                })
                .collect(),
        }),
    }
}

/// The process keys VMSpec and ContainerSpec share, for the options given
/// (kilnd checks them, and refuses them without an image).
fn process_keys(o: &ContainerArgs) -> Map<String, Value> {
    let mut keys = Map::new();
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            keys.insert(key.to_owned(), v);
        }
    };
    set("command", (!o.command.is_empty()).then(|| json!(o.command)));
    // `--entrypoint ""` clears the image's, as in docker run.
    let entrypoint = o.entrypoint.as_deref().map(|program| match program {
        "" => json!([]),
        program => json!([program]),
    });
    set("entrypoint", entrypoint);
    set("env", (!o.env.is_empty()).then(|| json!(o.env)));
    set("workdir", o.workdir.clone().map(Value::from));
    set("user", o.user.clone().map(Value::from));
    set("storageMiB", o.storage.map(Value::from));
    set("storageDisk", o.storage_disk.then_some(Value::Bool(true)));
    set("restartPolicy", o.restart.clone().map(Value::from));
    keys
}

/// A ContainerSpec: `name` running `image` (already resolved) as the
/// options say.
fn container_spec(name: &str, image: &str, o: &ContainerArgs) -> Value {
    let mut spec = Map::new();
    spec.insert("name".into(), Value::from(name));
    spec.insert("image".into(), Value::from(image));
    spec.extend(process_keys(o));
    Value::Object(spec)
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
    fn images_resolve_by_unique_digest_prefix() {
        let image = |digest: &str, name: &str| {
            let digest = format!("sha256:{digest}");
            json!({ "digest": digest, "references": [name] })
        };
        let images = [
            image("3fa2c1d0e4b5ff", "app:v1"),
            image("3f00aa11bb22ff", "db:v2"),
        ];
        assert_eq!(pick_image(&images, "3fa").unwrap(), "sha256:3fa2c1d0e4b5ff");
        assert_eq!(
            pick_image(&images, "sha256:3f00").unwrap(),
            "sha256:3f00aa11bb22ff"
        );
        assert_eq!(pick_image(&images, "ab").unwrap(), "ab");
        let err = pick_image(&images, "3f").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"3f\" matches several images: 3fa2c1d0e4b5 (app:v1), 3f00aa11bb22 (db:v2)"
        );
        assert_eq!(err.class(), Class::Usage);
    }

    #[test]
    fn container_options_become_spec_keys() {
        let options = ContainerArgs {
            entrypoint: Some(String::new()),
            env: vec!["A=1".into()],
            storage: Some(64),
            storage_disk: true,
            restart: Some("always".into()),
            command: vec!["sleep".into(), "1".into()],
            ..ContainerArgs::default()
        };
        assert_eq!(
            container_spec("side", "app:v1", &options),
            json!({"name": "side", "image": "app:v1", "entrypoint": [], "env": ["A=1"],
                   "storageMiB": 64, "storageDisk": true, "restartPolicy": "always",
                   "command": ["sleep", "1"]})
        );
        assert!(process_keys(&ContainerArgs::default()).is_empty());
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
