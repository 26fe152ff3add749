//! Registration of VMs with systemd-machined, so each QEMU gets a scope of
//! its own (`machine-kiln\x2d<id>.scope`) and shows in `machinectl list`.
//!
//! A follower task, like the D-Bus object tree: it subscribes to engine
//! events and registers a VM as soon as it has a QEMU pid, and unregisters
//! it when the process is gone or the VM is deleted. It never touches a
//! running VM otherwise: stopping kilnd leaves the machines registered, and
//! the next kilnd finds them registered already (`MachineExists` is
//! success).
//!
//! Transport: `io.systemd.Machine.Register` over varlink at
//! [`VARLINK_SOCKET`] with `allocateUnit: true` (systemd 257), else D-Bus
//! `org.freedesktop.machine1.Manager.CreateMachine`, which also starts
//! machined when only its bus activation is in place. Without systemd (no
//! `/run/systemd/system`), the task is not started at all.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_engine::cgroup::CgroupLimits;
use kiln_engine::{EngineEvent, EngineHandle, VmInfo};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// machined's varlink socket.
pub const VARLINK_SOCKET: &str = "/run/systemd/machine/io.systemd.Machine";
/// `service` of every machine Kiln registers.
pub const SERVICE: &str = "kiln";
/// Deadline of one call to machined.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest varlink reply we accept.
const MAX_REPLY: usize = 64 * 1024;

/// The machine name of a VM: `kiln-<id>` (ids are 12 hex characters, so
/// the name is a valid hostname, as machined requires).
pub fn machine_name(vm_id: &str) -> String {
    format!("kiln-{vm_id}")
}

/// Outcome of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// machined took the new machine.
    Created,
    /// A machine of that name exists (registered by an earlier kilnd).
    AlreadyExists,
}

/// Outcome of an unregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unregistered {
    /// The machine was dropped.
    Removed,
    /// machined had no such machine (it drops machines whose scope empties).
    AlreadyGone,
}

/// Failures talking to machined.
#[derive(Debug, Error)]
pub enum MachinedError {
    /// Neither the varlink socket nor the bus service is there.
    #[error("systemd-machined is not available")]
    Absent,
    /// The varlink socket failed mid-call.
    #[error("varlink I/O with machined failed")]
    Io(#[source] std::io::Error),
    /// machined did not answer in time.
    #[error("machined did not answer within {0:?}")]
    Timeout(Duration),
    /// machined answered with an error.
    #[error("machined refused: {0}")]
    Refused(String),
    /// The reply was not varlink.
    #[error("malformed reply from machined")]
    Malformed,
    /// D-Bus failed.
    #[error("D-Bus call to machined failed")]
    Dbus(#[source] zbus::Error),
}

/// One machine to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Machine name ([`machine_name`]).
    pub name: String,
    /// QEMU pid, the machine's leader.
    pub leader: u32,
    /// The limits its scope gets (kilnd cannot write the cgroup tree
    /// under systemd's `ProtectControlGroups=`; systemd can).
    pub limits: Option<CgroupLimits>,
}

/// The scope unit machined makes for machine `name`: `machine-` and the
/// name, escaped the systemd way (`-` is `\x2d`; Kiln's names have no
/// other character that needs it).
pub fn scope_unit(name: &str) -> String {
    format!("machine-{}.scope", name.replace('-', "\\x2d"))
}

/// systemd's properties for `limits`: the same cgroup files kilnd writes
/// itself where it may (`memory.max`, `memory.swap.max`, `cpu.max`,
/// `cpu.weight`, `io.weight`).
fn scope_properties(limits: &CgroupLimits) -> Vec<(&'static str, zbus::zvariant::Value<'static>)> {
    let mut properties = vec![
        ("MemoryMax", limits.memory_bytes.into()),
        ("MemorySwapMax", 0u64.into()),
    ];
    if let Some(milli) = limits.milli_cpus {
        properties.push(("CPUQuotaPerSecUSec", (u64::from(milli) * 1000).into()));
    }
    if let Some(weight) = limits.cpu_weight {
        properties.push(("CPUWeight", u64::from(weight).into()));
    }
    if let Some(weight) = limits.io_weight {
        properties.push(("IOWeight", u64::from(weight).into()));
    }
    properties
}

/// What the follower needs from machined (a trait so the follow logic is
/// unit-tested; the real thing is tested under systemd in
/// `tests/system/`).
pub trait Registry {
    /// Register `machine` in a scope of its own.
    fn register(
        &mut self,
        machine: &Machine,
    ) -> impl Future<Output = Result<Registered, MachinedError>> + Send;
    /// Drop the registration of `name` without touching its processes.
    fn unregister(
        &mut self,
        name: &str,
    ) -> impl Future<Output = Result<Unregistered, MachinedError>> + Send;
}

/// machined over varlink, or D-Bus when its varlink socket is missing.
#[derive(Debug)]
pub struct Machined {
    socket: PathBuf,
    bus: Option<zbus::Connection>,
}

impl Machined {
    /// machined at its standard addresses.
    pub fn system() -> Self {
        Self {
            socket: VARLINK_SOCKET.into(),
            bus: None,
        }
    }

    async fn varlink(&self, method: &str, parameters: Value) -> Result<Value, MachinedError> {
        let call = json!({ "method": method, "parameters": parameters });
        tokio::time::timeout(CALL_TIMEOUT, varlink_call(&self.socket, &call))
            .await
            .map_err(|_| MachinedError::Timeout(CALL_TIMEOUT))?
    }

    async fn bus(&mut self) -> Result<zbus::Connection, MachinedError> {
        if let Some(bus) = &self.bus {
            return Ok(bus.clone());
        }
        let bus = zbus::Connection::system()
            .await
            .map_err(|_| MachinedError::Absent)?;
        self.bus = Some(bus.clone());
        Ok(bus)
    }

    async fn dbus_call<B>(&mut self, method: &str, body: &B) -> Result<(), MachinedError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.manager_call("org.freedesktop.machine1", method, body)
            .await
    }

    /// `method` of the `Manager` of `service` (machine1 or systemd1).
    async fn manager_call<B>(
        &mut self,
        service: &str,
        method: &str,
        body: &B,
    ) -> Result<(), MachinedError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let bus = self.bus().await?;
        let path = format!("/{}", service.replace('.', "/"));
        let interface = format!("{service}.Manager");
        let call = bus.call_method(
            Some(service),
            path.as_str(),
            Some(interface.as_str()),
            method,
            body,
        );
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Err(_) => Err(MachinedError::Timeout(CALL_TIMEOUT)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(zbus::Error::MethodError(name, text, _))) => {
                let name = name.as_str();
                if name == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name == "org.freedesktop.DBus.Error.NameHasNoOwner"
                {
                    Err(MachinedError::Absent)
                } else {
                    // machined's error names end like the varlink ones.
                    let short = name.rsplit('.').next().unwrap_or(name);
                    Err(MachinedError::Refused(format!(
                        "{short}: {}",
                        text.unwrap_or_default()
                    )))
                }
            }
            Ok(Err(e)) => Err(MachinedError::Dbus(e)),
        }
    }
}

impl Machined {
    /// Puts `limits` on machine `name`'s scope (runtime properties: they
    /// go with the scope). A failure is logged: the VM runs, unlimited.
    async fn limit_scope(&mut self, name: &str, limits: &CgroupLimits) {
        let unit = scope_unit(name);
        let set = self
            .manager_call(
                "org.freedesktop.systemd1",
                "SetUnitProperties",
                &(unit.as_str(), true, scope_properties(limits)),
            )
            .await;
        match set {
            Ok(()) => debug!(%unit, ?limits, "machined: limits set on the VM's scope"),
            Err(e) => {
                warn!(%unit, error = %error_chain(&e), "cannot set the VM's limits on its scope")
            }
        }
    }
}

/// Whether `e` means the varlink socket is not there (machined not
/// running, or older than its varlink API): try D-Bus instead.
fn socket_missing(e: &MachinedError) -> bool {
    matches!(e, MachinedError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    ))
}

/// The short error name machined answered with, if any.
fn refused_as(e: &MachinedError) -> Option<&str> {
    match e {
        MachinedError::Refused(text) => Some(text.split(':').next().unwrap_or(text)),
        _ => None,
    }
}

impl Registry for Machined {
    async fn register(&mut self, machine: &Machine) -> Result<Registered, MachinedError> {
        let varlink = self
            .varlink(
                "io.systemd.Machine.Register",
                json!({
                    "name": machine.name,
                    "service": SERVICE,
                    "class": "vm",
                    "leader": machine.leader,
                    "allocateUnit": true,
                }),
            )
            .await;
        let result = match varlink {
            Err(e) if socket_missing(&e) => {
                debug!(name = %machine.name, "machined: no varlink socket, using D-Bus");
                let no_scope_properties: Vec<(String, zbus::zvariant::Value<'_>)> = Vec::new();
                self.dbus_call(
                    "CreateMachine",
                    &(
                        machine.name.as_str(),
                        Vec::<u8>::new(),
                        SERVICE,
                        "vm",
                        machine.leader,
                        "",
                        no_scope_properties,
                    ),
                )
                .await
                .map(|()| "D-Bus")
            }
            other => other.map(|_| "varlink"),
        };
        match result {
            Ok(via) => {
                info!(machine = %machine.name, leader = machine.leader, via, "machined: registered VM");
                if let Some(limits) = &machine.limits {
                    self.limit_scope(&machine.name, limits).await;
                }
                Ok(Registered::Created)
            }
            Err(e) if refused_as(&e) == Some("MachineExists") => Ok(Registered::AlreadyExists),
            Err(e) => Err(e),
        }
    }

    async fn unregister(&mut self, name: &str) -> Result<Unregistered, MachinedError> {
        let result = match self
            .varlink("io.systemd.Machine.Unregister", json!({ "name": name }))
            .await
        {
            Err(e) if socket_missing(&e) => self.dbus_call("UnregisterMachine", &(name,)).await,
            other => other.map(|_| ()),
        };
        match result {
            Ok(()) => Ok(Unregistered::Removed),
            Err(e) if refused_as(&e) == Some("NoSuchMachine") => Ok(Unregistered::AlreadyGone),
            Err(e) => Err(e),
        }
    }
}

/// One varlink call on a fresh connection: the request and the reply are
/// NUL-terminated JSON objects. An `error` reply becomes
/// [`MachinedError::Refused`] with the error's short name first.
async fn varlink_call(socket: &Path, call: &Value) -> Result<Value, MachinedError> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(MachinedError::Io)?;
    let mut request = serde_json::to_vec(call).map_err(|_| MachinedError::Malformed)?;
    request.push(0);
    stream
        .write_all(&request)
        .await
        .map_err(MachinedError::Io)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(MachinedError::Io)?;
        if n == 0 {
            return Err(MachinedError::Malformed);
        }
        reply.extend_from_slice(&chunk[..n]);
        if let Some(end) = reply.iter().position(|b| *b == 0) {
            reply.truncate(end);
            break;
        }
        if reply.len() > MAX_REPLY {
            return Err(MachinedError::Malformed);
        }
    }
    let reply: Value = serde_json::from_slice(&reply).map_err(|_| MachinedError::Malformed)?;
    if let Some(error) = reply.get("error").and_then(Value::as_str) {
        let short = error.rsplit('.').next().unwrap_or(error);
        let detail = reply
            .get("parameters")
            .filter(|p| p.as_object().is_some_and(|o| !o.is_empty()))
            .map(Value::to_string)
            .unwrap_or_default();
        return Err(MachinedError::Refused(format!("{short}: {detail}")));
    }
    Ok(reply.get("parameters").cloned().unwrap_or(Value::Null))
}

/// Whether kilnd runs on a system booted with systemd.
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Start following the engine, registering its VMs with machined. `None`
/// when the system was not booted with systemd.
pub fn spawn(engine: EngineHandle) -> Option<JoinHandle<()>> {
    if !systemd_booted() {
        debug!("machined: not booted with systemd, VMs are not registered");
        return None;
    }
    Some(tokio::spawn(follow(engine, Machined::system())))
}

/// Registrations this follower made (or found), by VM id.
#[derive(Debug, Default)]
pub struct Follower<R> {
    registry: R,
    /// VM id → leader pid registered for it.
    registered: HashMap<String, u32>,
    /// Set once machined was found absent, so that is said once.
    absent_logged: bool,
}

impl<R: Registry> Follower<R> {
    /// A follower with nothing registered yet.
    pub fn new(registry: R) -> Self {
        Self {
            registry,
            registered: HashMap::new(),
            absent_logged: false,
        }
    }

    /// Bring machined in line with one VM's current facts.
    pub async fn apply(&mut self, vm: &VmInfo) {
        let current = self.registered.get(&vm.id).copied();
        match (current, vm.pid) {
            (Some(old), Some(new)) if old == new => {}
            (old, Some(pid)) => {
                if old.is_some() {
                    self.drop_vm(&vm.id).await;
                }
                let machine = Machine {
                    name: machine_name(&vm.id),
                    leader: pid,
                    limits: vm.cgroup_limits,
                };
                match self.registry.register(&machine).await {
                    Ok(_) => {
                        self.registered.insert(vm.id.clone(), pid);
                    }
                    Err(e) => self.failed("register", &machine.name, &e),
                }
            }
            (Some(_), None) => self.drop_vm(&vm.id).await,
            (None, None) => {}
        }
    }

    /// The VM is gone: drop its machine.
    pub async fn drop_vm(&mut self, id: &str) {
        if self.registered.remove(id).is_none() {
            return;
        }
        let name = machine_name(id);
        match self.registry.unregister(&name).await {
            Ok(_) => debug!(machine = %name, "machined: unregistered VM"),
            Err(e) => self.failed("unregister", &name, &e),
        }
    }

    /// Re-read every VM (at start, and after missing events).
    pub async fn resync(&mut self, vms: &[VmInfo]) {
        let live: Vec<String> = self.registered.keys().cloned().collect();
        for id in live {
            if !vms.iter().any(|vm| vm.id == id) {
                self.drop_vm(&id).await;
            }
        }
        for vm in vms {
            self.apply(vm).await;
        }
    }

    fn failed(&mut self, what: &str, name: &str, e: &MachinedError) {
        if matches!(e, MachinedError::Absent) {
            if !self.absent_logged {
                info!("machined: not available, VMs are not registered");
                self.absent_logged = true;
            }
            return;
        }
        warn!(machine = %name, error = %error_chain(e), "machined: cannot {what} VM");
    }

    /// VM ids with a registration, for tests.
    #[cfg(test)]
    pub fn registered(&self) -> &HashMap<String, u32> {
        &self.registered
    }
}

fn error_chain(e: &MachinedError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn follow<R: Registry>(engine: EngineHandle, registry: R) {
    // Subscribe before listing so no change falls between the two.
    let mut events = engine.subscribe();
    let mut follower = Follower::new(registry);
    if let Ok(vms) = engine.list_vms().await {
        follower.resync(&vms).await;
    }
    loop {
        match events.recv().await {
            // Only VM events matter here (pool events are ignored).
            Ok(event) => {
                if let EngineEvent::VmAdded { vm } | EngineEvent::VmChanged { vm } = &event {
                    follower.apply(vm).await;
                } else if let EngineEvent::VmRemoved { id } = &event {
                    follower.drop_vm(id).await;
                }
            }
            Err(RecvError::Lagged(missed)) => {
                debug!(missed, "machined: missed engine events, resyncing");
                if let Ok(vms) = engine.list_vms().await {
                    follower.resync(&vms).await;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Records calls; answers like machined would.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Vec<String>,
        machines: HashMap<String, u32>,
        absent: bool,
    }

    impl Registry for Recorder {
        async fn register(&mut self, m: &Machine) -> Result<Registered, MachinedError> {
            self.calls.push(format!("register {} {}", m.name, m.leader));
            if self.absent {
                return Err(MachinedError::Absent);
            }
            if self.machines.contains_key(&m.name) {
                return Ok(Registered::AlreadyExists);
            }
            self.machines.insert(m.name.clone(), m.leader);
            Ok(Registered::Created)
        }
        async fn unregister(&mut self, name: &str) -> Result<Unregistered, MachinedError> {
            self.calls.push(format!("unregister {name}"));
            Ok(match self.machines.remove(name) {
                Some(_) => Unregistered::Removed,
                None => Unregistered::AlreadyGone,
            })
        }
    }

    fn vm(id: &str, pid: Option<u32>) -> VmInfo {
        serde_json::from_value(json!({
            "id": id, "name": "n", "state": if pid.is_some() { "ready" } else { "stopped" },
            "vcpus": 1, "memoryMiB": 128, "accel": "tcg", "pid": pid, "createdAt": 1,
        }))
        .unwrap()
    }

    #[test]
    fn scopes_are_named_and_limited_the_systemd_way() {
        assert_eq!(
            scope_unit(&machine_name("0123456789ab")),
            "machine-kiln\\x2d0123456789ab.scope"
        );
        let limits = CgroupLimits {
            memory_bytes: 400 << 20,
            milli_cpus: Some(1500),
            cpu_weight: Some(200),
            io_weight: None,
        };
        // systemd takes each as `t` (uint64), nothing else.
        let properties: Vec<String> = scope_properties(&limits)
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        assert_eq!(
            properties,
            [
                "MemoryMax=uint64 419430400",
                "MemorySwapMax=uint64 0",
                "CPUQuotaPerSecUSec=uint64 1500000",
                "CPUWeight=uint64 200"
            ]
        );
    }

    #[tokio::test]
    async fn registers_on_pid_and_unregisters_when_it_goes() {
        let mut f = Follower::new(Recorder::default());
        f.apply(&vm("aaaaaaaaaaaa", None)).await;
        f.apply(&vm("aaaaaaaaaaaa", Some(10))).await;
        f.apply(&vm("aaaaaaaaaaaa", Some(10))).await; // a state change, same pid
        f.apply(&vm("aaaaaaaaaaaa", None)).await;
        f.apply(&vm("aaaaaaaaaaaa", Some(11))).await; // started again
        f.drop_vm("aaaaaaaaaaaa").await;
        f.drop_vm("aaaaaaaaaaaa").await; // already gone: no call
        assert_eq!(
            f.registry.calls,
            [
                "register kiln-aaaaaaaaaaaa 10",
                "unregister kiln-aaaaaaaaaaaa",
                "register kiln-aaaaaaaaaaaa 11",
                "unregister kiln-aaaaaaaaaaaa",
            ]
        );
        assert!(f.registered().is_empty());
    }

    #[tokio::test]
    async fn a_new_pid_replaces_the_old_registration() {
        let mut f = Follower::new(Recorder::default());
        f.apply(&vm("bbbbbbbbbbbb", Some(20))).await;
        f.apply(&vm("bbbbbbbbbbbb", Some(21))).await; // missed the stop
        assert_eq!(
            f.registry.calls,
            [
                "register kiln-bbbbbbbbbbbb 20",
                "unregister kiln-bbbbbbbbbbbb",
                "register kiln-bbbbbbbbbbbb 21",
            ]
        );
        assert_eq!(f.registered().get("bbbbbbbbbbbb"), Some(&21));
    }

    #[tokio::test]
    async fn resync_adopts_existing_machines_and_drops_deleted_vms() {
        let mut registry = Recorder::default();
        // Registered by the previous kilnd.
        registry.machines.insert("kiln-cccccccccccc".into(), 30);
        let mut f = Follower::new(registry);
        f.resync(&[vm("cccccccccccc", Some(30)), vm("dddddddddddd", Some(31))])
            .await;
        assert_eq!(
            f.registered().len(),
            2,
            "MachineExists counts as registered"
        );
        f.resync(&[vm("dddddddddddd", Some(31))]).await;
        assert_eq!(
            f.registry.calls.last().map(String::as_str),
            Some("unregister kiln-cccccccccccc")
        );
        assert_eq!(f.registered().len(), 1);
    }

    #[tokio::test]
    async fn absent_machined_is_skipped_and_retried_later() {
        let mut f = Follower::new(Recorder {
            absent: true,
            ..Recorder::default()
        });
        f.apply(&vm("eeeeeeeeeeee", Some(40))).await;
        assert!(f.registered().is_empty());
        f.registry.absent = false;
        f.apply(&vm("eeeeeeeeeeee", Some(40))).await;
        assert_eq!(f.registered().get("eeeeeeeeeeee"), Some(&40));
    }

    #[tokio::test]
    async fn varlink_client_speaks_nul_framed_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in [
                &b"{\"parameters\":{}}\0"[..],
                &b"{\"error\":\"io.systemd.Machine.MachineExists\",\"parameters\":{}}\0"[..],
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    s.read_exact(&mut byte).await.unwrap();
                    if byte[0] == 0 {
                        break;
                    }
                    buf.push(byte[0]);
                }
                seen.push(serde_json::from_slice::<Value>(&buf).unwrap());
                s.write_all(reply).await.unwrap();
            }
            seen
        });
        let mut machined = Machined {
            socket: path,
            bus: None,
        };
        let m = Machine {
            name: "kiln-ffffffffffff".into(),
            leader: 42,
            limits: None,
        };
        assert_eq!(machined.register(&m).await.unwrap(), Registered::Created);
        assert_eq!(
            machined.register(&m).await.unwrap(),
            Registered::AlreadyExists
        );
        let seen = server.await.unwrap();
        assert_eq!(seen[0]["method"], "io.systemd.Machine.Register");
        assert_eq!(
            seen[0]["parameters"],
            json!({"name": "kiln-ffffffffffff", "service": "kiln", "class": "vm", "leader": 42, "allocateUnit": true})
        );
    }
}
