//! Oakestra SLAs (`sla_version` v2.0) read as the Kiln VMs that run their
//! microservices: one VM per microservice, named
//! `<application_name>.<application_namespace>.<microservice_name>.<microservice_namespace>`
//! (Oakestra's own fully qualified service name), running the image as its
//! container `main`. Every field Oakestra defines is honoured, ignored for
//! a stated reason, or refused with an error naming it; docs/kilnctl.md
//! ("Oakestra SLAs") has the table. Nothing here talks to kilnd.

use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use crate::cli::Forward;

/// The one `sla_version` this reads (Oakestra's current).
const VERSION: &str = "v2.0";

/// The prefix Oakestra's crosvm runtime gives registry references.
const DOCKER_TRANSPORT: &str = "containers-docker://";

/// A field kilnctl cannot deploy, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SlaError {
    /// Its path: `applications[0].microservices[1].vtpus`.
    pub field: String,
    pub reason: String,
}

/// An SLA's microservices, in its order, and what was ignored on the way.
#[derive(Debug)]
pub struct Sla {
    pub services: Vec<Service>,
    /// Fields with a value that Kiln ignores (not refused: see the table).
    pub warnings: Vec<SlaError>,
}

/// One microservice as the VM that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Where it is in the SLA: `applications[0].microservices[1]`.
    pub at: String,
    /// The VM's name.
    pub name: String,
    /// A registry reference (`containers-docker://` taken off).
    pub image: String,
    /// Oakestra's `cmd`: the whole argv (entrypoint and arguments) when
    /// given, as Oakestra's runtimes apply it; empty: the image's.
    pub argv: Vec<String>,
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    pub gpus: u64,
    /// A writable ext4 disk of this size (MiB).
    pub storage_mib: Option<u64>,
    pub env: Vec<String>,
    pub forwards: Vec<Forward>,
    /// `addresses.rr_ip`: the VM's own address (its one instance).
    pub address: Option<Ipv4Addr>,
    /// Not restarted after a successful exit (Oakestra's `one_shot`).
    pub one_shot: bool,
}

impl Service {
    /// The path of one of its fields, for messages.
    pub fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.at)
    }

    /// Oakestra restarts a service that ended unless it is a one-shot
    /// that succeeded.
    pub fn restart_policy(&self) -> &'static str {
        if self.one_shot {
            "on-failure"
        } else {
            "always"
        }
    }

    /// The VMSpec that runs it: on kilnd's bridge, or with `bridge` false
    /// without a network (then it may not ask for ports or an address).
    pub fn spec(&self, bridge: bool) -> Result<Value, SlaError> {
        let mut spec = Map::new();
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(v) = value {
                spec.insert(key.to_owned(), v);
            }
        };
        set("vcpus", self.vcpus.map(Value::from));
        set("memoryMiB", self.memory_mib.map(Value::from));
        // Oakestra's crosvm runtime gives each vGPU a virtio-gpu device
        // rendering on the host's GPU, which other VMs share.
        set(
            "gpus",
            (self.gpus > 0).then(|| json!({ "count": self.gpus, "mode": "shared" })),
        );
        set("image", Some(Value::from(self.image.as_str())));
        if let Some((program, args)) = self.argv.split_first() {
            set("entrypoint", Some(json!([program])));
            set("command", (!args.is_empty()).then(|| json!(args)));
        }
        set("env", (!self.env.is_empty()).then(|| json!(self.env)));
        set("storageMiB", self.storage_mib.map(Value::from));
        set("storageDisk", self.storage_mib.map(|_| Value::Bool(true)));
        set("restartPolicy", Some(Value::from(self.restart_policy())));
        if bridge {
            let mut network = json!({ "mode": "bridge" });
            if let Some(address) = self.address {
                network["address"] = Value::from(address.to_string());
            }
            if !self.forwards.is_empty() {
                network["forwards"] = self.forwards.iter().map(Forward::to_spec).collect();
            }
            set("network", Some(network));
        } else {
            let needs = |key: &str| SlaError {
                field: self.field(key),
                reason: "needs a network (deploy without --network none)".into(),
            };
            if !self.forwards.is_empty() {
                return Err(needs("port"));
            }
            if self.address.is_some() {
                return Err(needs("addresses.rr_ip"));
            }
        }
        Ok(Value::Object(spec))
    }
}

/// The fields of one SLA object, read with its path for messages.
struct Fields<'a> {
    at: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// `value` (at `at`) as an object whose keys are all in `known`.
    fn new(value: &'a Value, at: String, known: &[&str]) -> Result<Self, SlaError> {
        let Some(map) = value.as_object() else {
            let field = if at.is_empty() { "the SLA".into() } else { at };
            return Err(SlaError {
                field,
                reason: "not a JSON object".into(),
            });
        };
        let fields = Self { at, map };
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(fields.error(key, "not a field of Oakestra's SLA v2.0"));
        }
        Ok(fields)
    }

    fn path(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn error(&self, key: &str, reason: impl Into<String>) -> SlaError {
        SlaError {
            field: self.path(key),
            reason: reason.into(),
        }
    }

    /// Present and not null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, SlaError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.error(key, "not a string")))
            .transpose()
    }

    fn required_string(&self, key: &str) -> Result<&'a str, SlaError> {
        self.string(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    /// A count (vcpus, MB, ...); 0 and absent are both None, Oakestra's
    /// "not asked for".
    fn count(&self, key: &str) -> Result<Option<u64>, SlaError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.as_u64() {
            Some(0) => Ok(None),
            Some(n) => Ok(Some(n)),
            None => Err(self.error(key, "not a whole number of 0 or more")),
        }
    }

    fn flag(&self, key: &str) -> Result<bool, SlaError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.error(key, "not true or false"))
            })
            .transpose()
            .map(|b| b.unwrap_or(false))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, SlaError> {
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        value
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .ok_or_else(|| self.error(key, "not a list of strings"))
    }

    fn array(&self, key: &str) -> Result<&'a [Value], SlaError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(v) => v
                .as_array()
                .map(Vec::as_slice)
                .ok_or_else(|| self.error(key, "not a list")),
        }
    }

    /// A field Kiln has nothing for: accepted only empty (`""`, `[]`,
    /// `{}`, `0`, `false`), as Oakestra's examples write them.
    fn refuse_unless_empty(&self, key: &str, reason: &str) -> Result<(), SlaError> {
        let empty = match self.get(key) {
            None | Some(Value::Bool(false)) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::Number(n)) => n.as_f64() == Some(0.0),
            Some(_) => false,
        };
        if empty {
            Ok(())
        } else {
            Err(self.error(key, reason))
        }
    }
}

const TOP_FIELDS: &[&str] = &["sla_version", "customerID", "applications", "args"];

const APPLICATION_FIELDS: &[&str] = &[
    "applicationID",
    "application_name",
    "application_namespace",
    "application_desc",
    "microservices",
];

const MICROSERVICE_FIELDS: &[&str] = &[
    "microserviceID",
    "microservice_name",
    "microservice_namespace",
    "virtualization",
    "memory",
    "vcpus",
    "vgpus",
    "vtpus",
    "bandwidth_in",
    "bandwidth_out",
    "storage",
    "image",
    "code",
    "cmd",
    "env",
    "environment",
    "port",
    "addresses",
    "one_shot",
    "privileged",
    "arch",
    "state",
    "added_files",
    "args",
    "constraints",
    "connectivity",
    "volumes",
    "sla_violation_strategy",
    "target_node",
];

const ADDRESS_FIELDS: &[&str] = &[
    "rr_ip",
    "rr_ip_v6",
    "closest_ip",
    "closest_ip_v6",
    "instances",
];

/// Read an SLA (already parsed as JSON).
pub fn parse(sla: &Value) -> Result<Sla, SlaError> {
    let top = Fields::new(sla, String::new(), TOP_FIELDS)?;
    let version = top.required_string("sla_version")?;
    if version != VERSION {
        return Err(top.error(
            "sla_version",
            format!("{version:?}: kilnctl reads {VERSION} only"),
        ));
    }
    top.refuse_unless_empty("args", "free-form arguments mean nothing to Kiln")?;
    let applications = top.array("applications")?;
    if applications.is_empty() {
        return Err(top.error("applications", "no application"));
    }
    let mut sla = Sla {
        services: Vec::new(),
        warnings: Vec::new(),
    };
    for (a, application) in applications.iter().enumerate() {
        let app = Fields::new(
            application,
            format!("applications[{a}]"),
            APPLICATION_FIELDS,
        )?;
        let app_name = name_part(&app, "application_name")?;
        let app_namespace = name_part(&app, "application_namespace")?;
        let microservices = app.array("microservices")?;
        if microservices.is_empty() {
            return Err(app.error("microservices", "no microservice"));
        }
        for (m, microservice) in microservices.iter().enumerate() {
            let at = format!("{}.microservices[{m}]", app.at);
            let ms = Fields::new(microservice, at, MICROSERVICE_FIELDS)?;
            let name = [
                app_name,
                app_namespace,
                name_part(&ms, "microservice_name")?,
                name_part(&ms, "microservice_namespace")?,
            ]
            .join(".");
            if let Some(twin) = sla.services.iter().find(|s| s.name == name) {
                return Err(SlaError {
                    field: ms.at,
                    reason: format!("the same names as {} ({name})", twin.at),
                });
            }
            let service = microservice_of(&ms, name, &mut sla.warnings)?;
            sla.services.push(service);
        }
    }
    Ok(sla)
}

/// One part of a VM name. Dots are what join the parts, so a part has
/// none: `A-Z a-z 0-9 _ -`, starting with a letter or digit (kilnd checks
/// the whole name's length).
fn name_part<'a>(fields: &Fields<'a>, key: &str) -> Result<&'a str, SlaError> {
    let part = fields.required_string(key)?;
    let ok = part.starts_with(|c: char| c.is_ascii_alphanumeric())
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(part)
    } else {
        Err(fields.error(
            key,
            format!(
                "{part:?}: a name is letters, digits, _ and -, starting with a letter or digit"
            ),
        ))
    }
}

fn microservice_of(
    ms: &Fields,
    name: String,
    warnings: &mut Vec<SlaError>,
) -> Result<Service, SlaError> {
    match ms.string("virtualization")?.unwrap_or("container") {
        "container" | "crosvm" | "vm" => {}
        other => {
            return Err(ms.error(
                "virtualization",
                format!("{other:?}: Kiln runs OCI images in VMs (container, crosvm or vm)"),
            ))
        }
    }
    ms.refuse_unless_empty("vtpus", "Kiln has no TPUs to give a VM")?;
    ms.refuse_unless_empty("privileged", "Kiln's containers have no privileged mode")?;
    ms.refuse_unless_empty("state", "Kiln cannot load a state file into a VM")?;
    ms.refuse_unless_empty(
        "added_files",
        "Kiln fetches no files into a VM (build them into the image)",
    )?;
    ms.refuse_unless_empty("volumes", "Kiln has no CSI volumes (storage gives a disk)")?;
    ms.refuse_unless_empty("args", "free-form arguments mean nothing to Kiln")?;
    for key in [
        "constraints",
        "connectivity",
        "target_node",
        "sla_violation_strategy",
    ] {
        ms.refuse_unless_empty(key, "Kiln runs everything on this node and places nothing")?;
    }
    check_arch(ms)?;

    let env = ms.strings("env")?;
    let environment = ms.strings("environment")?;
    if !env.is_empty() && !environment.is_empty() {
        return Err(ms.error("env", "give env or environment, not both"));
    }
    let port = ms.string("port")?.unwrap_or("");
    let forwards = forwards(port).map_err(|reason| ms.error("port", reason))?;
    let address = match ms.get("addresses") {
        None => None,
        Some(addresses) => address(ms, addresses, warnings)?,
    };
    Ok(Service {
        at: ms.at.clone(),
        name,
        image: image(ms)?,
        argv: ms.strings("cmd")?,
        vcpus: ms.count("vcpus")?,
        memory_mib: ms.count("memory")?,
        gpus: ms.count("vgpus")?.unwrap_or(0),
        storage_mib: ms.count("storage")?,
        env: if env.is_empty() { environment } else { env },
        forwards,
        address,
        one_shot: ms.flag("one_shot")?,
    })
}

/// `image` or `code` (Oakestra's older name; the same when both are
/// given): a registry reference, plain or as Oakestra's crosvm runtime
/// writes it.
fn image(ms: &Fields) -> Result<String, SlaError> {
    let reference = |key: &str| -> Result<Option<String>, SlaError> {
        let Some(text) = ms.string(key)? else {
            return Ok(None);
        };
        let plain = text.strip_prefix(DOCKER_TRANSPORT).unwrap_or(text);
        if plain.is_empty() || plain.contains("://") || plain.starts_with("containers-") {
            return Err(ms.error(
                key,
                format!("{text:?}: not an image reference (REGISTRY/REPOSITORY:TAG, optionally after {DOCKER_TRANSPORT})"),
            ));
        }
        Ok(Some(plain.to_owned()))
    };
    match (reference("image")?, reference("code")?) {
        (Some(image), Some(code)) if image != code => {
            Err(ms.error("code", format!("{code:?} is not the image {image:?}")))
        }
        (Some(image), _) | (None, Some(image)) => Ok(image),
        (None, None) => Err(ms.error("image", "missing: the image to run (image or code)")),
    }
}

/// Oakestra's `port`: `HOST[:VM][/tcp|/udp]` entries separated by `;`
/// (a lone port is the same on both sides), as its net manager reads them.
fn forwards(port: &str) -> Result<Vec<Forward>, String> {
    if port.is_empty() {
        return Ok(Vec::new());
    }
    port.split(';')
        .map(|entry| {
            let bad = || format!("{entry:?} is not HOST[:VM][/tcp|/udp] (e.g. 8080:80/tcp)");
            let (ports, protocol) = match entry.split_once('/') {
                Some((ports, p @ ("tcp" | "udp"))) => (ports, Some(p.to_owned())),
                Some(_) => return Err(bad()),
                None => (entry, None),
            };
            let (host, vm) = ports.split_once(':').unwrap_or((ports, ports));
            Ok(Forward {
                host_port: host.parse().map_err(|_| bad())?,
                vm_port: vm.parse().map_err(|_| bad())?,
                protocol,
            })
        })
        .collect()
}

/// `addresses`: `rr_ip` is the VM's address, since a microservice is one
/// VM; the other kinds of service address need several instances or
/// IPv6, which Kiln does not have.
fn address(
    ms: &Fields,
    addresses: &Value,
    warnings: &mut Vec<SlaError>,
) -> Result<Option<Ipv4Addr>, SlaError> {
    let fields = Fields::new(addresses, ms.path("addresses"), ADDRESS_FIELDS)?;
    fields.refuse_unless_empty("closest_ip", "Kiln gives a VM one address, rr_ip")?;
    fields.refuse_unless_empty("closest_ip_v6", "Kiln gives a VM one address, rr_ip")?;
    fields.refuse_unless_empty("instances", "Kiln runs one instance of a microservice")?;
    if fields.string("rr_ip_v6")?.is_some_and(|a| !a.is_empty()) {
        warnings.push(fields.error(
            "rr_ip_v6",
            "ignored: Kiln's networks are IPv4 only (the VM has rr_ip)",
        ));
    }
    match fields.string("rr_ip")? {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| fields.error("rr_ip", format!("{text:?} is not an IPv4 address"))),
    }
}

/// `arch`: the architectures the service may run on must include this
/// node's.
fn check_arch(ms: &Fields) -> Result<(), SlaError> {
    let arches = ms.strings("arch")?;
    let here = node_arch();
    if arches.is_empty() || arches.iter().any(|a| a == here) {
        Ok(())
    } else {
        Err(ms.error("arch", format!("this node is {here}")))
    }
}

/// This node's architecture as Oakestra (and OCI) name it.
fn node_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// One microservice with `key` set to `value` (null: removed) in the
    /// nginx fixture's nginx service.
    fn with(key: &str, value: Value) -> Value {
        let mut sla = fixture("nginx-client-server.json");
        let ms = &mut sla["applications"][0]["microservices"][1];
        match (key.split_once('.'), value) {
            (Some((outer, inner)), value) => ms[outer][inner] = value,
            (None, Value::Null) => {
                ms.as_object_mut().unwrap().remove(key);
            }
            (None, value) => ms[key] = value,
        }
        sla
    }

    fn refused(sla: &Value) -> String {
        parse(sla).unwrap_err().to_string()
    }

    #[test]
    fn the_crosvm_example_is_one_vm_with_a_gpu_a_disk_and_a_port() {
        let sla = parse(&fixture("crosvm-service.json")).unwrap();
        assert!(sla.warnings.is_empty());
        let [service] = sla.services.as_slice() else {
            panic!("{:?}", sla.services)
        };
        assert_eq!(service.name, "my-vm-app.default.my-vm-app.default");
        assert_eq!(service.at, "applications[0].microservices[0]");
        assert_eq!(
            service.spec(true).unwrap(),
            json!({"vcpus": 4, "memoryMiB": 4096, "gpus": {"count": 1, "mode": "shared"},
                   "image": "registry.example.com/my-app:latest", "env": ["MY_CONFIG_VALUE=hello"],
                   "storageMiB": 16384, "storageDisk": true, "restartPolicy": "always",
                   "network": {"mode": "bridge",
                               "forwards": [{"hostPort": 8080, "vmPort": 8080}]}})
        );
        assert_eq!(
            service.spec(false).unwrap_err().to_string(),
            "applications[0].microservices[0].port: needs a network (deploy without --network none)"
        );
    }

    #[test]
    fn the_nginx_example_is_two_vms_one_at_its_rr_ip() {
        let sla = parse(&fixture("nginx-client-server.json")).unwrap();
        let names: Vec<&str> = sla.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["clientsrvr.test.curlv4.test", "clientsrvr.test.nginx.test"]
        );
        assert_eq!(
            sla.services[0].spec(true).unwrap(),
            json!({"vcpus": 1, "memoryMiB": 100, "image": "docker.io/curlimages/curl:7.82.0",
                   "entrypoint": ["sh"], "command": ["-c", "curl 10.30.55.55 ; sleep 5"],
                   "restartPolicy": "always", "network": {"mode": "bridge"}})
        );
        assert_eq!(
            sla.services[1].spec(true).unwrap(),
            json!({"vcpus": 1, "memoryMiB": 100, "image": "docker.io/library/nginx:latest",
                   "restartPolicy": "always",
                   "network": {"mode": "bridge", "address": "10.30.55.55"}})
        );
        assert_eq!(
            sla.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["applications[0].microservices[1].addresses.rr_ip_v6: ignored: Kiln's networks are IPv4 only (the VM has rr_ip)"]
        );
        let none = sla.services[0].spec(false).unwrap();
        assert!(none.get("network").is_none(), "{none}");
    }

    #[test]
    fn ports_take_oakestras_forms() {
        let forward = |host, vm, protocol: Option<&str>| Forward {
            host_port: host,
            vm_port: vm,
            protocol: protocol.map(str::to_owned),
        };
        assert_eq!(forwards(""), Ok(vec![]));
        assert_eq!(forwards("80"), Ok(vec![forward(80, 80, None)]));
        assert_eq!(forwards("80:80"), Ok(vec![forward(80, 80, None)]));
        assert_eq!(
            forwards("8080:80/tcp"),
            Ok(vec![forward(8080, 80, Some("tcp"))])
        );
        assert_eq!(forwards("80/udp"), Ok(vec![forward(80, 80, Some("udp"))]));
        assert_eq!(
            forwards("6080:60/tcp;90:100/udp"),
            Ok(vec![
                forward(6080, 60, Some("tcp")),
                forward(90, 100, Some("udp"))
            ])
        );
        for bad in ["80:80-80", " ", "hello", "80;", "80/sctp", "70000", "1:2:3"] {
            assert!(forwards(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn options_of_a_microservice() {
        let one = |key: &str, value: Value| parse(&with(key, value)).unwrap().services[1].clone();
        // cmd is the whole argv; one word is a program without arguments.
        let spec = one("cmd", json!(["nginx"])).spec(true).unwrap();
        assert_eq!(
            (spec["entrypoint"].clone(), spec.get("command")),
            (json!(["nginx"]), None)
        );
        assert_eq!(one("one_shot", json!(true)).restart_policy(), "on-failure");
        assert_eq!(
            one("environment", json!(["A=1"])).env,
            ["A=1"],
            "the schema's name for env"
        );
        assert_eq!(
            one(
                "image",
                json!("containers-docker://docker.io/library/nginx:latest")
            )
            .image,
            "docker.io/library/nginx:latest",
            "image and code name the same image"
        );
        let no_code = with("code", Value::Null);
        assert!(refused(&no_code).ends_with(".image: missing: the image to run (image or code)"));
        assert_eq!(
            one("memory", json!(0)).memory_mib,
            None,
            "0: kilnd's default"
        );
        assert_eq!(
            one("virtualization", Value::Null).name,
            "clientsrvr.test.nginx.test"
        );
        assert_eq!(
            one("vgpus", json!(2)).spec(true).unwrap()["gpus"],
            json!({"count": 2, "mode": "shared"})
        );
    }

    #[test]
    fn what_kiln_cannot_honour_is_refused_naming_the_field() {
        let at = "applications[0].microservices[1]";
        for (key, value, message) in [
            ("vtpus", json!(1), "vtpus: Kiln has no TPUs to give a VM"),
            (
                "privileged",
                json!(true),
                "privileged: Kiln's containers have no privileged mode",
            ),
            (
                "state",
                json!("https://x/state.json"),
                "state: Kiln cannot load a state file into a VM",
            ),
            (
                "added_files",
                json!(["https://x/a.jpg"]),
                "added_files: Kiln fetches no files",
            ),
            (
                "volumes",
                json!([{"volume_id": "v", "csi_driver": "d"}]),
                "volumes: Kiln has no CSI volumes",
            ),
            (
                "constraints",
                json!([{"type": "direct", "node": "n1"}]),
                "constraints: Kiln runs everything",
            ),
            (
                "connectivity",
                json!([{"target_microservice_id": "1"}]),
                "connectivity: Kiln runs everything",
            ),
            (
                "target_node",
                json!("n1"),
                "target_node: Kiln runs everything",
            ),
            (
                "virtualization",
                json!("unikernel"),
                "virtualization: \"unikernel\": Kiln runs OCI images",
            ),
            (
                "port",
                json!("80:80-80"),
                "port: \"80:80-80\" is not HOST[:VM]",
            ),
            ("arch", json!(["riscv64"]), "arch: this node is"),
            (
                "code",
                json!("https://example.com/code.py"),
                "code: \"https://example.com/code.py\": not an image reference",
            ),
            (
                "image",
                json!("docker.io/library/httpd:2"),
                "code: \"docker.io/library/nginx:latest\" is not the image \"docker.io/library/httpd:2\"",
            ),
            (
                "image",
                json!("containers-oci:/srv/layout"),
                "image: \"containers-oci:/srv/layout\": not an image reference",
            ),
            ("memory", json!(-1), "memory: not a whole number"),
            ("vcpus", json!("2"), "vcpus: not a whole number"),
            ("cmd", json!("nginx"), "cmd: not a list of strings"),
            ("vcpu", json!(1), "vcpu: not a field of Oakestra's SLA v2.0"),
            (
                "addresses.closest_ip",
                json!("10.30.1.1"),
                "addresses.closest_ip: Kiln gives a VM one address",
            ),
            (
                "addresses.instances",
                json!([{"from": "1"}]),
                "addresses.instances: Kiln runs one instance",
            ),
            (
                "addresses.rr_ip",
                json!("10.30.300.1"),
                "addresses.rr_ip: \"10.30.300.1\" is not an IPv4 address",
            ),
            (
                "microservice_name",
                json!("ng.inx"),
                "microservice_name: \"ng.inx\": a name is letters",
            ),
            (
                "microservice_namespace",
                Value::Null,
                "microservice_namespace: missing",
            ),
        ] {
            let line = refused(&with(key, value.clone()));
            assert!(
                line.starts_with(&format!("{at}.{message}")),
                "{key} = {value}: {line}"
            );
        }
        assert_eq!(
            refused(&with("microservice_name", json!("curlv4"))),
            format!("{at}: the same names as applications[0].microservices[0] (clientsrvr.test.curlv4.test)")
        );
        let mut sla = fixture("crosvm-service.json");
        sla["sla_version"] = json!("v1.0");
        assert_eq!(
            refused(&sla),
            "sla_version: \"v1.0\": kilnctl reads v2.0 only"
        );
        sla["sla_version"] = json!("v2.0");
        sla["applications"][0]["microservices"][0]["env"] = json!(["A=1"]);
        sla["applications"][0]["microservices"][0]["environment"] = json!(["B=2"]);
        assert_eq!(
            refused(&sla),
            "applications[0].microservices[0].env: give env or environment, not both"
        );
        assert_eq!(refused(&json!([])), "the SLA: not a JSON object");
        assert_eq!(
            refused(&json!({"sla_version": "v2.0", "applications": []})),
            "applications: no application"
        );
    }
}
