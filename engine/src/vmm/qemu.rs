//! The real VMM: QEMU processes in their own session, QMP as the monitor,
//! the guest agent over its virtio-serial socket.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{BoxFuture, GuestAgent, Monitor, Process, Reconnected, Started, Vmm};
use crate::agent::{AgentClient, AgentError, FollowUp, ReadyReplies};
use crate::error::EngineError;
use crate::pool::template::{BuildPlan, Template};
use crate::process::{console_tail, is_qemu_of, read_pid_file, ProcessError, VmProcess};
use crate::qemu::qmp::QemuVersion;
use crate::qemu::{GuestMemory, QemuLaunch, Qmp, QmpError, QmpEvent};
use crate::store::remove_tree;

/// QEMU, as installed on the host.
#[derive(Debug, Default)]
pub struct QemuVmm;

impl Vmm for QemuVmm {
    fn launch(
        &self,
        launch: QemuLaunch,
        inherit: Vec<(OwnedFd, RawFd)>,
        log: PathBuf,
        monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Started, EngineError>> {
        Box::pin(async move {
            let borrowed: Vec<_> = inherit.iter().map(|(fd, at)| (fd.as_fd(), *at)).collect();
            let process =
                VmProcess::launch(&launch, &log, &borrowed).map_err(EngineError::LaunchFailed)?;
            // QEMU holds its copies now (a persistent TAP outlives ours).
            drop(borrowed);
            drop(inherit);
            // Its cgroup is made and joined while QEMU initialises, not
            // after: moving a process between cgroups waits for an RCU
            // grace period (8 ms for v1's memory controller here), which
            // was on every clone's critical path. Both are over before the
            // guest runs an instruction: launch returns once QMP is up and
            // the join is done, and the VM is resumed after that.
            let joining = launch.cgroup.clone().map(|(cgroup, limits)| {
                let pid = process.pid();
                tokio::task::spawn_blocking(move || {
                    let skipped = cgroup.create(&limits)?;
                    cgroup.attach(pid)?;
                    Ok::<_, std::io::Error>(skipped)
                })
            });
            let connected =
                connect_when_up(&process, &launch.qmp_socket, &log, monitor_timeout).await;
            if let Some(joining) = joining {
                // Limits protect the host; a VM whose cgroup cannot be made
                // runs without them, and says so.
                match joining.await.map_err(std::io::Error::other).and_then(|r| r) {
                    Ok(skipped) if skipped.is_empty() => {}
                    Ok(skipped) => {
                        info!(vm = %launch.vm_id, ?skipped, "some VM limits are not available here")
                    }
                    Err(e) => warn!(vm = %launch.vm_id, error = %e, "VM runs without its cgroup"),
                }
            }
            let (qmp, version, events) = match connected {
                Ok(c) => c,
                Err(e) => {
                    let _ = process.kill();
                    return Err(e);
                }
            };
            Ok(Started {
                process: Arc::new(process),
                monitor: Arc::new(qmp),
                events,
                version: version.0,
            })
        })
    }

    fn find(
        &self,
        id: &str,
        recorded_pid: Option<u32>,
        runtime_dir: &Path,
    ) -> Option<Arc<dyn Process>> {
        let pid = recorded_pid.or_else(|| read_pid_file(&runtime_dir.join("qemu.pid")))?;
        if !is_qemu_of(pid, id) {
            return None;
        }
        let process = VmProcess::attach(pid).ok()?;
        Some(Arc::new(process))
    }

    fn reconnect(
        &self,
        runtime_dir: PathBuf,
        monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Reconnected, EngineError>> {
        Box::pin(async move {
            let (qmp, version, events) =
                Qmp::connect(&runtime_dir.join("qmp.sock"), monitor_timeout).await?;
            Ok(Reconnected {
                monitor: Arc::new(qmp),
                events,
                version: version.0,
            })
        })
    }

    fn agent(&self, runtime_dir: &Path) -> Arc<dyn GuestAgent> {
        Arc::new(AgentClient::new(runtime_dir.join("agent.sock")))
    }

    fn build_template(&self, plan: BuildPlan) -> BoxFuture<'static, Result<Template, EngineError>> {
        Box::pin(build_template(plan))
    }
}

/// Boot the template VM with its RAM in the build's shared file, save it,
/// and have the pool side move the finished template in place. The
/// template VM's process is always gone when this returns.
async fn build_template(mut plan: BuildPlan) -> Result<Template, EngineError> {
    let build = plan.begin()?;
    plan.launch.memory = GuestMemory::TemplateSource(build.memory());
    plan.launch.incoming = false;
    let log = plan.runtime_dir.join("qemu.log");
    let process = match VmProcess::launch(&plan.launch, &log, &[]) {
        Ok(p) => p,
        Err(e) => {
            build.discard();
            return Err(EngineError::LaunchFailed(e));
        }
    };
    let result = boot_and_save(&plan, &process, &build.state()).await;
    // Whatever happened, the template VM's work is over.
    if process.is_alive() {
        let _ = process.kill();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), process.exited()).await;
    let console = console_tail(&plan.runtime_dir.join("console.log"));
    remove_tree(&plan.runtime_dir);
    match result {
        Ok(boot_ms) => Ok(build.finish(&plan, boot_ms)?),
        Err(e) => {
            build.discard();
            Err(match console {
                Some(tail) => EngineError::BootFailed(format!("{}; console: {tail}", e.message())),
                None => e,
            })
        }
    }
}

/// Wait for the template VM's agent, pause it and save its device state
/// (RAM stays in the shared file: `x-ignore-shared`). Returns how long the
/// guest took to answer (ms).
async fn boot_and_save(
    plan: &BuildPlan,
    process: &VmProcess,
    state: &Path,
) -> Result<u64, EngineError> {
    let started = std::time::Instant::now();
    let log = plan.runtime_dir.join("qemu.log");
    let (qmp, _version, _events) =
        connect_when_up(process, &plan.launch.qmp_socket, &log, plan.qmp_timeout).await?;
    let agent = AgentClient::new(plan.launch.agent_socket.clone());
    // A template VM that dies while it boots (killed, out of memory) is a
    // failed build at once, not after the whole boot deadline.
    tokio::select! {
        ready = agent.wait_ready(plan.boot_timeout) => {
            ready?;
        }
        () = process.exited() => {
            return Err(EngineError::BootFailed(
                "the template VM's QEMU exited while it booted".into(),
            ));
        }
    }
    if !plan.launch.nics.is_empty() {
        // Up, without an address and with IPv6 off: a guest's first "up"
        // of a NIC (receive rings filled, the device opened) is ~40 ms
        // under TCG, done here once and saved rather than in every clone
        // (docs/benchmarks.md, "Where a NIC clone's time goes"). Nothing
        // goes out from the template's MAC: no IPv4 address, no IPv6
        // (no link-local, no neighbour discovery), so a clone sends its
        // first frame once ConfigureNetwork gave it its own MAC.
        let agent: &dyn GuestAgent = &agent;
        let request = kiln_agent_proto::ConfigureNetworkRequest {
            interfaces: plan
                .launch
                .nics
                .iter()
                .map(|nic| kiln_agent_proto::NetworkInterface {
                    mac: nic.mac.clone(),
                    ipv6: Some(false),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        agent
            .configure_network(&request, plan.boot_timeout)
            .await
            .map_err(|e| EngineError::BootFailed(format!("template NIC up: {e}")))?;
    }
    if let Some(container) = &plan.container {
        // The workload starts here, once: clones resume it running.
        let agent: &dyn GuestAgent = &agent;
        let _: kiln_agent_proto::ContainerReply = agent
            .call(
                kiln_agent_proto::method::START_CONTAINER,
                container,
                plan.boot_timeout,
            )
            .await
            .map_err(|e| EngineError::ContainerStartFailed(format!("in the template: {e}")))?;
        tokio::time::sleep(plan.warmup).await;
    }
    let boot_ms = started.elapsed().as_millis() as u64;
    // Leave no host connection half-open in the saved state.
    agent.disconnect().await;
    qmp.stop().await?;
    qmp.enable_ignore_shared().await?;
    qmp.save_to_file(state, Duration::from_secs(60)).await?;
    qmp.quit().await?;
    if tokio::time::timeout(Duration::from_secs(10), process.exited())
        .await
        .is_err()
    {
        warn!(pool = %plan.pool, "template VM did not quit, killing it");
    }
    Ok(boot_ms)
}

/// Connect to QMP as soon as QEMU listens; fail with QEMU's own message if
/// it exits first.
pub(crate) async fn connect_when_up(
    process: &VmProcess,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(Qmp, QemuVersion, mpsc::Receiver<QmpEvent>), EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match Qmp::connect(socket, timeout).await {
            Ok(connected) => return Ok(connected),
            Err(QmpError::Connect(_)) if process.is_alive() => {
                if tokio::time::Instant::now() > deadline {
                    return Err(EngineError::Timeout(
                        "QEMU did not open its QMP socket".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) if process.is_alive() => return Err(e.into()),
            Err(_) => {
                let message = std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let message = if message.is_empty() {
                    "QEMU exited at start".to_owned()
                } else {
                    message
                };
                return Err(EngineError::LaunchFailed(ProcessError::QemuRefused {
                    message,
                }));
            }
        }
    }
}

impl Process for VmProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn kill(&self) -> Result<(), ProcessError> {
        VmProcess::kill(self)
    }
    fn is_alive(&self) -> bool {
        VmProcess::is_alive(self)
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        Box::pin(VmProcess::exited(self))
    }
}

impl Monitor for Qmp {
    fn stop(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::stop(self))
    }
    fn cont(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::cont(self))
    }
    fn system_reset(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::system_reset(self))
    }
    fn system_powerdown(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::system_powerdown(self))
    }
    fn is_running(&self) -> BoxFuture<'_, Result<bool, QmpError>> {
        Box::pin(async move { Ok(self.query_status().await?.running) })
    }
    fn restore_clone(&self, state: &Path) -> BoxFuture<'_, Result<(), QmpError>> {
        let state = state.to_path_buf();
        Box::pin(async move {
            self.enable_ignore_shared().await?;
            self.start_incoming(&state).await
        })
    }
    fn save_state(
        &self,
        path: &Path,
        ignore_shared: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), QmpError>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            self.set_ignore_shared(ignore_shared).await?;
            self.save_to_file(&path, timeout).await
        })
    }
    fn load_state(&self, path: &Path, timeout: Duration) -> BoxFuture<'_, Result<(), QmpError>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            self.set_ignore_shared(false).await?;
            self.restore_from_file(&path, timeout).await
        })
    }
    fn quit(&self) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::quit(self))
    }
    fn getfd(&self, name: &str, fd: OwnedFd) -> BoxFuture<'_, Result<(), QmpError>> {
        let name = name.to_owned();
        Box::pin(async move { Qmp::getfd(self, &name, fd).await })
    }
    fn closefd(&self, name: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let name = name.to_owned();
        Box::pin(async move { Qmp::closefd(self, &name).await })
    }
    fn netdev_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::netdev_add(self, arguments))
    }
    fn netdev_del(&self, id: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let id = id.to_owned();
        Box::pin(async move { Qmp::netdev_del(self, &id).await })
    }
    fn device_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::device_add(self, arguments))
    }
    fn device_del(&self, id: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let id = id.to_owned();
        Box::pin(async move { Qmp::device_del(self, &id).await })
    }
    fn peripheral_ids(&self) -> BoxFuture<'_, Result<Vec<String>, QmpError>> {
        Box::pin(Qmp::peripheral_ids(self))
    }
    fn blockdev_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>> {
        Box::pin(Qmp::blockdev_add(self, arguments))
    }
    fn blockdev_del(&self, node: &str) -> BoxFuture<'_, Result<(), QmpError>> {
        let node = node.to_owned();
        Box::pin(async move { Qmp::blockdev_del(self, &node).await })
    }
}

impl GuestAgent for AgentClient {
    fn call_json(
        &self,
        method: &str,
        parameters: Value,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Value, AgentError>> {
        let method = method.to_owned();
        Box::pin(async move { AgentClient::call_json(self, &method, parameters, timeout).await })
    }
    fn wait_ready_then(
        &self,
        timeout: Duration,
        follow_ups: Vec<FollowUp>,
    ) -> BoxFuture<'_, Result<ReadyReplies, AgentError>> {
        Box::pin(async move { AgentClient::wait_ready_then(self, timeout, &follow_ups).await })
    }
    fn disconnect(&self) -> BoxFuture<'_, ()> {
        Box::pin(AgentClient::disconnect(self))
    }
}
