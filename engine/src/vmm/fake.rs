//! An in-memory VMM for the actor's unit tests: VMs that "boot" after a
//! set delay, answer the agent's calls, pause, reset and die when told,
//! and fail on purpose where a test asks. It behaves like QEMU where the
//! actor can tell (QMP events for stop/resume/reset/shutdown, a clone loads
//! paused, a killed process ends its event stream), and nothing more.
//!
//! Time is tokio's, so tests that pause the clock run boots, back-off and
//! timeouts instantly.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_agent_proto::{self as proto, PingReply};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{BoxFuture, GuestAgent, Monitor, Process, Reconnected, Started, Vmm};
use crate::agent::{AgentError, FollowUp, ReadyReplies};
use crate::error::EngineError;
use crate::pool::template::{BuildPlan, Template};
use crate::process::ProcessError;
use crate::qemu::{QemuLaunch, QmpError, QmpEvent};

/// How the next launches go. Tests change it between steps.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// The process refuses to start (`LaunchFailed`).
    pub launch_fails: bool,
    /// Time from launch (or reset) until the agent answers.
    pub boot_delay: Duration,
    /// The agent never answers (a broken guest).
    pub agent_silent: bool,
    /// Template builds fail.
    pub template_fails: bool,
    /// The monitor call that fails (`"getfd"`, `"netdev_add"`,
    /// `"device_add"`, ...), for undo tests.
    pub failing_monitor_call: Option<&'static str>,
    /// The agent method that fails (full name), for undo tests.
    pub failing_agent_call: Option<&'static str>,
    /// How long a killed process takes to die (a QEMU whose SIGKILL has
    /// not taken effect yet: its agent may still answer meanwhile).
    pub kill_delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            launch_fails: false,
            boot_delay: Duration::from_millis(50),
            agent_silent: false,
            template_fails: false,
            failing_monitor_call: None,
            failing_agent_call: None,
            kill_delay: Duration::ZERO,
        }
    }
}

/// The fake VMM; clones share one set of VMs (a "host" that outlives an
/// engine, for restart tests).
#[derive(Debug, Clone, Default)]
pub struct FakeVmm {
    host: Arc<Mutex<Host>>,
}

#[derive(Debug, Default)]
struct Host {
    behaviour: Behaviour,
    next_pid: u32,
    /// By VM id: its latest process.
    vms: HashMap<String, FakeVm>,
    launches: u32,
    template_builds: u32,
}

#[derive(Debug)]
struct FakeVm {
    pid: u32,
    alive: watch::Sender<bool>,
    events: Option<mpsc::Sender<QmpEvent>>,
    running: bool,
    /// The agent answers from this instant on.
    answers_at: Instant,
    agent_silent: bool,
    boot: u32,
    devices: BTreeSet<String>,
    block_nodes: BTreeSet<String>,
    /// Containers the fake agent runs, in start order.
    containers: Vec<proto::ContainerInfo>,
}

impl FakeVmm {
    /// A fake host with default behaviour.
    pub fn new() -> Self {
        Self::default()
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        // A panicking test poisons nothing we care about.
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change how the next launches go.
    pub fn set_behaviour(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.host().behaviour);
    }

    /// Processes started so far (template builds not counted).
    pub fn launches(&self) -> u32 {
        self.host().launches
    }

    /// What VM `id`'s process has plugged: device ids and block nodes.
    pub fn plugged(&self, id: &str) -> (Vec<String>, Vec<String>) {
        self.host().vms.get(id).map_or_else(Default::default, |vm| {
            (
                vm.devices.iter().cloned().collect(),
                vm.block_nodes.iter().cloned().collect(),
            )
        })
    }

    /// Template builds started so far.
    pub fn template_builds(&self) -> u32 {
        self.host().template_builds
    }

    /// VMs whose process runs.
    pub fn live(&self) -> Vec<String> {
        let host = self.host();
        let mut ids: Vec<String> = host
            .vms
            .iter()
            .filter(|(_, vm)| *vm.alive.borrow())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The process of VM `id` dies on its own (a QEMU crash).
    pub fn crash(&self, id: &str) {
        if let Some(vm) = self.host().vms.get_mut(id) {
            vm.die();
        }
    }

    /// Devices plugged into VM `id` by name.
    pub fn devices(&self, id: &str) -> Vec<String> {
        self.host()
            .vms
            .get(id)
            .map(|vm| vm.devices.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl FakeVm {
    fn die(&mut self) {
        let _ = self.alive.send(false);
        self.events = None;
        self.running = false;
    }

    fn emit(&self, event: &str) {
        if let Some(events) = &self.events {
            let _ = events.try_send(QmpEvent {
                event: event.to_owned(),
                data: Value::Null,
            });
        }
    }

    fn reboot(&mut self, delay: Duration) {
        self.boot += 1;
        // A new boot runs no containers; the plugged disks stay.
        self.containers.clear();
        self.answers_at = Instant::now() + delay;
    }
}

fn vm_id_of(runtime_dir: &Path) -> String {
    runtime_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Vmm for FakeVmm {
    fn launch(
        &self,
        launch: QemuLaunch,
        _inherit: Vec<(OwnedFd, RawFd)>,
        _log: PathBuf,
        _monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Started, EngineError>> {
        let fake = self.clone();
        Box::pin(async move {
            let mut host = fake.host();
            host.launches += 1;
            if host.behaviour.launch_fails {
                return Err(EngineError::LaunchFailed(ProcessError::QemuRefused {
                    message: "fake: launch refused".into(),
                }));
            }
            host.next_pid += 1;
            let pid = 10_000 + host.next_pid;
            if let crate::qemu::GuestMemory::TemplateSource(ram) = &launch.memory {
                // QEMU creates the shared RAM file of a template or snapshot.
                let _ = std::fs::write(ram, b"fake ram");
            }
            let (alive, _) = watch::channel(true);
            let (events_tx, events) = mpsc::channel(64);
            let vm = FakeVm {
                pid,
                alive,
                events: Some(events_tx),
                // A clone waits for its state, paused, like `-incoming defer`.
                running: !launch.incoming,
                answers_at: Instant::now() + host.behaviour.boot_delay,
                agent_silent: host.behaviour.agent_silent,
                boot: 1,
                devices: BTreeSet::new(),
                block_nodes: BTreeSet::new(),
                containers: Vec::new(),
            };
            let process = FakeProcess {
                id: launch.vm_id.clone(),
                pid,
                alive: vm.alive.subscribe(),
                fake: fake.clone(),
            };
            host.vms.insert(launch.vm_id.clone(), vm);
            drop(host);
            Ok(Started {
                process: Arc::new(process),
                monitor: Arc::new(FakeMonitor {
                    id: launch.vm_id,
                    fake,
                }),
                events,
                version: "fake 1.0".into(),
            })
        })
    }

    fn find(
        &self,
        id: &str,
        _recorded_pid: Option<u32>,
        _runtime_dir: &Path,
    ) -> Option<Arc<dyn Process>> {
        let host = self.host();
        let vm = host.vms.get(id).filter(|vm| *vm.alive.borrow())?;
        Some(Arc::new(FakeProcess {
            id: id.to_owned(),
            pid: vm.pid,
            alive: vm.alive.subscribe(),
            fake: self.clone(),
        }))
    }

    fn reconnect(
        &self,
        runtime_dir: PathBuf,
        _monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Reconnected, EngineError>> {
        let fake = self.clone();
        Box::pin(async move {
            let id = vm_id_of(&runtime_dir);
            let (events_tx, events) = mpsc::channel(64);
            match fake.host().vms.get_mut(&id) {
                Some(vm) if *vm.alive.borrow() => vm.events = Some(events_tx),
                _ => return Err(EngineError::VmmFailed(QmpError::Disconnected)),
            }
            Ok(Reconnected {
                monitor: Arc::new(FakeMonitor { id, fake }),
                events,
                version: "fake 1.0".to_owned(),
            })
        })
    }

    fn agent(&self, runtime_dir: &Path) -> Arc<dyn GuestAgent> {
        Arc::new(FakeAgent {
            id: vm_id_of(runtime_dir),
            fake: self.clone(),
        })
    }

    fn build_template(&self, plan: BuildPlan) -> BoxFuture<'static, Result<Template, EngineError>> {
        let fake = self.clone();
        Box::pin(async move {
            let (fails, delay) = {
                let mut host = fake.host();
                host.template_builds += 1;
                (host.behaviour.template_fails, host.behaviour.boot_delay)
            };
            tokio::time::sleep(delay).await;
            let build = plan.begin()?;
            if fails {
                build.discard();
                return Err(EngineError::BootFailed(
                    "fake: template VM never answered".into(),
                ));
            }
            for file in [build.memory(), build.state()] {
                std::fs::write(&file, b"fake").map_err(|source| {
                    EngineError::StorageFailed(crate::store::StoreError::Io { path: file, source })
                })?;
            }
            Ok(build.finish(&plan, delay.as_millis() as u64)?)
        })
    }
}

/// A fake process: alive until killed or crashed.
#[derive(Debug)]
struct FakeProcess {
    id: String,
    pid: u32,
    alive: watch::Receiver<bool>,
    fake: FakeVmm,
}

impl Process for FakeProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn kill(&self) -> Result<(), ProcessError> {
        let delay = self.fake.host().behaviour.kill_delay;
        let (fake, id, pid) = (self.fake.clone(), self.id.clone(), self.pid);
        let die = move || {
            if let Some(vm) = fake.host().vms.get_mut(&id) {
                if vm.pid == pid {
                    vm.die();
                }
            }
        };
        if delay.is_zero() {
            die();
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                die();
            });
        }
        Ok(())
    }
    fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        let mut alive = self.alive.clone();
        Box::pin(async move {
            let _ = alive.wait_for(|alive| !*alive).await;
        })
    }
}

/// A fake monitor: state changes with QEMU's events.
#[derive(Debug)]
struct FakeMonitor {
    id: String,
    fake: FakeVmm,
}

impl FakeMonitor {
    /// Run `f` on the VM if it is alive and `call` is not set to fail.
    fn with_vm<T>(
        &self,
        call: &'static str,
        f: impl FnOnce(&mut FakeVm, &Behaviour) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        let mut host = self.fake.host();
        let behaviour = host.behaviour.clone();
        if behaviour.failing_monitor_call == Some(call) {
            return Err(QmpError::Command {
                command: call.into(),
                class: "GenericError".into(),
                desc: "fake: failing on purpose".into(),
            });
        }
        match host.vms.get_mut(&self.id) {
            Some(vm) if *vm.alive.borrow() => f(vm, &behaviour),
            _ => Err(QmpError::Disconnected),
        }
    }

    fn done<T: Send + 'static>(
        result: Result<T, QmpError>,
    ) -> BoxFuture<'static, Result<T, QmpError>> {
        Box::pin(std::future::ready(result))
    }
}

impl Monitor for FakeMonitor {
    fn stop(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("stop", |vm, _| {
            vm.running = false;
            vm.emit("STOP");
            Ok(())
        }))
    }
    fn cont(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("cont", |vm, _| {
            vm.running = true;
            vm.emit("RESUME");
            Ok(())
        }))
    }
    fn system_reset(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("system_reset", |vm, b| {
            vm.reboot(b.boot_delay);
            vm.emit("RESET");
            Ok(())
        }))
    }
    fn system_powerdown(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("system_powerdown", |vm, _| {
            vm.emit("SHUTDOWN");
            vm.die();
            Ok(())
        }))
    }
    fn is_running(&self) -> BoxFuture<'_, Result<bool, QmpError>> {
        Self::done(self.with_vm("query-status", |vm, _| Ok(vm.running)))
    }
    fn restore_clone(&self, _state: &Path) -> BoxFuture<'_, Result<(), QmpError>> {
        // Like QEMU's autostart once a template's state is loaded.
        Self::done(self.with_vm("migrate-incoming", |vm, _| {
            vm.running = true;
            vm.emit("RESUME");
            Ok(())
        }))
    }
    fn save_state(
        &self,
        path: &Path,
        _ignore_shared: bool,
        _timeout: Duration,
    ) -> BoxFuture<'_, Result<(), QmpError>> {
        let path = path.to_path_buf();
        Self::done(self.with_vm("migrate", |_, _| {
            std::fs::write(&path, b"fake state").map_err(|e| QmpError::Command {
                command: "migrate".into(),
                class: "GenericError".into(),
                desc: e.to_string(),
            })
        }))
    }
    fn load_state(&self, _path: &Path, _timeout: Duration) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("migrate-incoming", |_, _| Ok(())))
    }
    fn quit(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("quit", |vm, _| {
            vm.die();
            Ok(())
        }))
    }
    fn getfd(&self, _name: &str, _fd: OwnedFd) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("getfd", |_, _| Ok(())))
    }
    fn closefd(&self, _name: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("closefd", |_, _| Ok(())))
    }
    fn netdev_add(&self, _arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("netdev_add", |_, _| Ok(())))
    }
    fn netdev_del(&self, _id: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        Self::done(self.with_vm("netdev_del", |_, _| Ok(())))
    }
    fn device_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        let id = arguments["id"].as_str().unwrap_or_default().to_owned();
        Self::done(self.with_vm("device_add", |vm, _| {
            vm.devices.insert(id);
            Ok(())
        }))
    }
    fn device_del(&self, id: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let id = id.to_owned();
        Self::done(self.with_vm("device_del", |vm, _| {
            vm.devices.remove(&id);
            Ok(())
        }))
    }
    fn peripheral_ids(&self) -> BoxFuture<'_, Result<Vec<String>, QmpError>> {
        Self::done(self.with_vm("qom-list", |vm, _| Ok(vm.devices.iter().cloned().collect())))
    }
    fn blockdev_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        let node = arguments["node-name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Self::done(self.with_vm("blockdev-add", |vm, _| {
            vm.block_nodes.insert(node);
            Ok(())
        }))
    }
    fn blockdev_del(&self, node: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let node = node.to_owned();
        Self::done(self.with_vm("blockdev-del", |vm, _| {
            if vm.block_nodes.remove(&node) {
                Ok(())
            } else {
                Err(QmpError::Command {
                    command: "blockdev-del".into(),
                    class: "GenericError".into(),
                    desc: format!("Failed to find node with node-name='{node}'"),
                })
            }
        }))
    }
}

/// A fake guest agent.
#[derive(Debug)]
struct FakeAgent {
    id: String,
    fake: FakeVmm,
}

impl FakeAgent {
    /// The ping reply if the guest answers now; `Err` when it never will.
    fn answer(&self) -> Result<Option<PingReply>, AgentError> {
        let host = self.fake.host();
        let Some(vm) = host.vms.get(&self.id).filter(|vm| *vm.alive.borrow()) else {
            return Err(AgentError::Disconnected);
        };
        if vm.agent_silent || !vm.running || Instant::now() < vm.answers_at {
            return Ok(None);
        }
        Ok(Some(PingReply {
            agent_version: "fake".into(),
            kernel_release: "fake".into(),
            boot_id: format!("{}-boot-{}", self.id, vm.boot),
            hostname: "fake".into(),
            uptime_ms: 1,
            nonce: None,
        }))
    }
}

impl GuestAgent for FakeAgent {
    fn call_json(
        &self,
        method: &str,
        parameters: Value,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Value, AgentError>> {
        let method = method.to_owned();
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let failing = self.fake.host().behaviour.failing_agent_call;
            loop {
                if let Some(ping) = self.answer()? {
                    if failing == Some(method.as_str()) {
                        return Err(AgentError::Call {
                            name: "io.kiln.Agent.Failed".into(),
                            message: "fake: failing on purpose".into(),
                        });
                    }
                    return self.reply(&method, parameters, ping);
                }
                if Instant::now() >= deadline {
                    return Err(AgentError::Timeout { method });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }

    fn wait_ready_then(
        &self,
        timeout: Duration,
        follow_ups: Vec<FollowUp>,
    ) -> BoxFuture<'_, Result<ReadyReplies, AgentError>> {
        Box::pin(async move {
            let value = self
                .call_json(proto::method::PING, json!({}), timeout)
                .await?;
            let ping =
                serde_json::from_value(value).map_err(|e| AgentError::Protocol(e.to_string()))?;
            let ready_at = std::time::Instant::now();
            let mut replies = Vec::new();
            for f in follow_ups {
                let reply = self.call_json(f.method, f.parameters, f.timeout).await?;
                replies.push((reply, std::time::Instant::now()));
            }
            Ok(ReadyReplies {
                ping,
                ready_at,
                replies,
            })
        })
    }

    fn disconnect(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

impl FakeAgent {
    fn reply(&self, method: &str, parameters: Value, ping: PingReply) -> Result<Value, AgentError> {
        let protocol = |e: serde_json::Error| AgentError::Protocol(e.to_string());
        match method {
            proto::method::PING => serde_json::to_value(ping).map_err(protocol),
            proto::method::EXEC => {
                let request: proto::ExecRequest =
                    serde_json::from_value(parameters).map_err(protocol)?;
                let reply = proto::ExecReply {
                    exit_code: 0,
                    signal: None,
                    stdout: format!("{}\n", request.argv.join(" ")),
                    stderr: String::new(),
                    stdout_truncated: false,
                    stderr_truncated: false,
                    timed_out: false,
                };
                serde_json::to_value(reply).map_err(protocol)
            }
            proto::method::REBOOT => {
                let mut host = self.fake.host();
                let delay = host.behaviour.boot_delay;
                if let Some(vm) = host.vms.get_mut(&self.id) {
                    vm.reboot(delay);
                    vm.emit("RESET");
                }
                Ok(json!({}))
            }
            proto::method::SHUTDOWN => {
                if let Some(vm) = self.fake.host().vms.get_mut(&self.id) {
                    vm.emit("SHUTDOWN");
                    vm.die();
                }
                Ok(json!({}))
            }
            proto::method::START_CONTAINER
            | proto::method::LIST_CONTAINERS
            | proto::method::STOP_CONTAINER
            | proto::method::CONTAINER_STATUS
            | proto::method::REMOVE_CONTAINER => self.container_call(method, parameters),
            _ => Ok(json!({})),
        }
    }

    /// The container methods: a container starts only when every layer's
    /// disk is plugged (serial `kiln-S-L` is device `kiln-disk-S-L`) and
    /// runs until removed.
    fn container_call(&self, method: &str, parameters: Value) -> Result<Value, AgentError> {
        let protocol = |e: serde_json::Error| AgentError::Protocol(e.to_string());
        let mut host = self.fake.host();
        let Some(vm) = host.vms.get_mut(&self.id) else {
            return Err(AgentError::Disconnected);
        };
        let call_error = |name: &str, message: String| AgentError::Call {
            name: name.into(),
            message,
        };
        match method {
            proto::method::START_CONTAINER => {
                let request: proto::StartContainerRequest =
                    serde_json::from_value(parameters).map_err(protocol)?;
                if vm.containers.iter().any(|c| c.id == request.id) {
                    return Err(call_error(proto::error::CONTAINER_EXISTS, request.id));
                }
                for serial in &request.layers {
                    let device = serial.replacen("kiln-", "kiln-disk-", 1);
                    if !vm.devices.contains(&device) {
                        return Err(call_error(proto::error::DISK_NOT_FOUND, serial.clone()));
                    }
                }
                let info = proto::ContainerInfo {
                    id: request.id,
                    state: proto::ContainerState::Running,
                    pid: 100 + vm.containers.len() as u32,
                    exit_code: None,
                    signal: None,
                    started_at_ms: 1,
                    exited_at_ms: None,
                    layers: request.layers,
                    upper_disk: None,
                    hostname: "fake".into(),
                    handle: None,
                };
                vm.containers.push(info.clone());
                serde_json::to_value(proto::ContainerReply { container: info }).map_err(protocol)
            }
            proto::method::LIST_CONTAINERS => serde_json::to_value(proto::ListContainersReply {
                containers: vm.containers.clone(),
            })
            .map_err(protocol),
            proto::method::CONTAINER_STATUS => {
                let request: proto::ContainerIdRequest =
                    serde_json::from_value(parameters).map_err(protocol)?;
                let Some(c) = vm.containers.iter().find(|c| c.id == request.id) else {
                    return Err(call_error(proto::error::NO_SUCH_CONTAINER, request.id));
                };
                serde_json::to_value(proto::ContainerReply {
                    container: c.clone(),
                })
                .map_err(protocol)
            }
            proto::method::STOP_CONTAINER => {
                let request: proto::StopContainerRequest =
                    serde_json::from_value(parameters).map_err(protocol)?;
                let Some(c) = vm.containers.iter_mut().find(|c| c.id == request.id) else {
                    return Err(call_error(proto::error::NO_SUCH_CONTAINER, request.id));
                };
                c.state = proto::ContainerState::Exited;
                c.exit_code = Some(128 + request.signal.unwrap_or(15));
                let reply = proto::StopContainerReply {
                    container: c.clone(),
                    killed: false,
                };
                serde_json::to_value(reply).map_err(protocol)
            }
            _ => {
                let request: proto::ContainerIdRequest =
                    serde_json::from_value(parameters).map_err(protocol)?;
                let before = vm.containers.len();
                vm.containers.retain(|c| c.id != request.id);
                let result = if vm.containers.len() < before {
                    proto::RemoveResult::Removed
                } else {
                    proto::RemoveResult::AlreadyGone
                };
                serde_json::to_value(proto::RemoveContainerReply { result }).map_err(protocol)
            }
        }
    }
}
