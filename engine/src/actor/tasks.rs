//! Sub-task bodies: the slow work the actor hands off (launching QEMU and
//! waiting for the guest, waiting for a reboot, watching a process, a
//! graceful stop), shared with the template builder. They never touch the
//! actor's state; they report back as [`Internal`] events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{self as proto, PingReply};
use tokio::sync::mpsc;

use super::network::{NetPlan, TapHome, TAP_FD};
use super::Internal;
use crate::agent::{AgentError, FollowUp};
use crate::error::EngineError;
use crate::ids::{fill_random, hex};
use crate::process::bound_console_log;
use crate::qemu::{QemuLaunch, QmpEvent};
use crate::store::{create_private_dir, remove_tree};
use crate::vmm::{GuestAgent, Monitor, Process, Vmm};

/// How a boot sub-task launches a VM.
#[derive(Debug)]
pub(super) struct BootPlan {
    pub(super) launch: QemuLaunch,
    pub(super) runtime_dir: PathBuf,
    /// Template state to load (a clone).
    pub(super) restore: Option<PathBuf>,
    /// The VM's NIC (bridge mode).
    pub(super) net: Option<NetPlan>,
    /// Identity the agent sets before the VM counts as ready (pool VMs).
    pub(super) identity: Option<proto::SetIdentityRequest>,
    pub(super) qmp_timeout: Duration,
    pub(super) boot_timeout: Duration,
    /// Writable container disks (path, MiB) to make before QEMU opens
    /// them (a container's first start).
    pub(super) upper_disks: Vec<(PathBuf, u64)>,
}

/// Launch QEMU, connect QMP, start the monitor, restore a template's state
/// if cloning, wait for the agent and give the guest its identity.
pub(super) async fn boot(
    id: &str,
    generation: u64,
    plan: &BootPlan,
    vmm: &dyn Vmm,
    agent: Arc<dyn GuestAgent>,
    tx: &mpsc::UnboundedSender<Internal>,
) -> Result<PingReply, EngineError> {
    let mut steps = BootSteps::start();
    remove_tree(&plan.runtime_dir);
    create_private_dir(&plan.runtime_dir)?;
    for (path, mib) in &plan.upper_disks {
        super::containers::make_upper_disk(path.clone(), *mib).await?;
    }
    let log = plan.runtime_dir.join("qemu.log");
    // The TAP first (about 3 ms): QEMU inherits it as fd 3.
    let tap = match &plan.net {
        Some(n) => {
            let tap = n.home.create_tap(id).await?;
            let _ = tx.send(Internal::NicUp {
                id: id.to_owned(),
                generation,
                ifindex: tap.index,
            });
            Some(tap)
        }
        None => None,
    };
    let inherit: Vec<_> = tap.into_iter().map(|t| (t.fd, TAP_FD)).collect();
    steps.done("prepare");
    let started = vmm
        .launch(plan.launch.clone(), inherit, log, plan.qmp_timeout)
        .await?;
    let (process, qmp) = (started.process, started.monitor);
    tokio::spawn(monitor(
        id.to_owned(),
        generation,
        process.clone(),
        started.events,
        tx.clone(),
        plan.launch.console_log.clone(),
    ));
    let qemu = process.clone();
    let _ = tx.send(Internal::Launched {
        id: id.to_owned(),
        generation,
        process,
        qmp: qmp.clone(),
        qemu_version: started.version,
    });
    steps.done("launch");
    if let Some(state) = &plan.restore {
        // The clone runs by itself once loaded: the agent's answer below
        // is the end of the restore.
        qmp.restore_clone(state).await?;
        steps.done("restore");
    }
    // Identity and network ride on the Ping that finds the agent: one
    // write, one wake-up of a guest whose code is not translated yet, and
    // the agent leaves what follows its replies (the identity's files,
    // IPv6) until it has answered them all.
    let mut follow_ups = Vec::new();
    if let Some(identity) = &plan.identity {
        follow_ups.push(FollowUp {
            method: proto::method::SET_IDENTITY,
            parameters: to_parameters(identity)?,
            timeout: plan.qmp_timeout,
        });
    }
    if let Some(n) = &plan.net {
        follow_ups.push(FollowUp {
            method: proto::method::CONFIGURE_NETWORK,
            parameters: to_parameters(&n.guest)?,
            timeout: CONFIGURE_NETWORK_TIMEOUT,
        });
    }
    let ready = until_qemu_exits(Some(&qemu), async {
        Ok(agent.wait_ready_then(plan.boot_timeout, follow_ups).await?)
    })
    .await?;
    steps.done_at("agent", ready.ready_at);
    if plan.identity.is_some() {
        // Its reply is the first follow-up's.
        let at = ready.replies.first().map_or(ready.ready_at, |(_, at)| *at);
        steps.done_at("identity", at);
    }
    if let Some(n) = &plan.net {
        // Forwards only once the guest has its address.
        if let TapHome::Bridge(net) = &n.home {
            for forward in &n.forwards {
                net.add_forward(forward.clone()).await?;
            }
        }
        steps.done("network");
    }
    tracing::debug!(vm = %id, clone = plan.restore.is_some(), steps = %steps, "boot steps");
    Ok(ready.ping)
}

/// A request as the JSON parameters of an agent call.
fn to_parameters(request: &impl serde::Serialize) -> Result<serde_json::Value, EngineError> {
    serde_json::to_value(request).map_err(|e| AgentError::Protocol(e.to_string()).into())
}

/// How long each step of a boot took, logged at debug (`boot steps`) for
/// the benchmark's per-step table of clones (docs/benchmarks.md).
struct BootSteps {
    last: std::time::Instant,
    done: Vec<(&'static str, Duration)>,
}

impl BootSteps {
    fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    /// Step `name` ended now.
    fn done(&mut self, name: &'static str) {
        self.done_at(name, std::time::Instant::now());
    }

    /// Step `name` ended at `at`.
    fn done_at(&mut self, name: &'static str, at: std::time::Instant) {
        self.done
            .push((name, at.saturating_duration_since(self.last)));
        self.last = at;
    }
}

/// `prepare_us=812 launch_us=20113 …`: one field per step, in order.
impl std::fmt::Display for BootSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.done.iter().enumerate() {
            let gap = if i == 0 { "" } else { " " };
            write!(f, "{gap}{name}_us={}", took.as_micros())?;
        }
        Ok(())
    }
}

/// A hostname, a machine id and fresh host entropy: what makes a pool VM
/// (above all a clone, which starts with its template's RNG state) its own.
pub(super) fn fresh_identity(name: &str) -> proto::SetIdentityRequest {
    let mut machine_id = [0u8; 16];
    fill_random(&mut machine_id);
    let mut entropy = [0u8; 32];
    fill_random(&mut entropy);
    proto::SetIdentityRequest {
        hostname: Some(name.to_owned()),
        machine_id: Some(hex(&machine_id)),
        entropy_hex: Some(hex(&entropy)),
    }
}

/// A wait for the guest's next boot: used by reboot, a guest-initiated
/// reset and a re-adopted VM that was booting.
pub(super) struct NextBoot {
    pub(super) id: String,
    pub(super) generation: u64,
    pub(super) agent: Arc<dyn GuestAgent>,
    /// The VM's QEMU: its exit ends the wait at once (rather than polling
    /// the agent socket until the deadline).
    pub(super) qemu: Option<Arc<dyn Process>>,
    /// Wait for a boot other than this one (any boot when None).
    pub(super) old_boot_id: Option<String>,
    /// Configure the network again once it answers.
    pub(super) guest_net: Option<proto::ConfigureNetworkRequest>,
    pub(super) timeout: Duration,
}

impl NextBoot {
    /// Start afresh with the agent, wait until it answers from a new boot,
    /// configure its network, and report that as `BootDone`.
    pub(super) async fn report(self, tx: &mpsc::UnboundedSender<Internal>) {
        let agent = &self.agent;
        agent.disconnect().await;
        let waited = wait_for_new_boot(agent.as_ref(), self.old_boot_id.as_deref(), self.timeout);
        let mut result = until_qemu_exits(self.qemu.as_ref(), waited).await;
        // A new boot starts with the NIC unconfigured (and a clone's NIC
        // with the template's MAC again: QEMU resets the device to its own
        // MAC).
        if let (Ok(_), Some(request)) = (&result, &self.guest_net) {
            if let Err(e) = agent
                .configure_network(request, CONFIGURE_NETWORK_TIMEOUT)
                .await
            {
                result = Err(e.into());
            }
        }
        let _ = tx.send(Internal::BootDone {
            id: self.id,
            generation: self.generation,
            result,
        });
    }
}

/// `wait` for the guest agent, cut short when `qemu` (if known) exits: a
/// QEMU killed or crashed mid-boot ends the wait at once, rather than
/// leaving a task polling the agent socket until the boot deadline.
pub(super) async fn until_qemu_exits<T>(
    qemu: Option<&Arc<dyn Process>>,
    wait: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    let Some(qemu) = qemu else {
        return wait.await;
    };
    tokio::select! {
        result = wait => result,
        () = qemu.exited() => Err(EngineError::BootFailed(
            "QEMU exited before the guest agent answered".into(),
        )),
    }
}

/// Wait until the agent answers from a boot other than `old_boot_id`.
pub(super) async fn wait_for_new_boot(
    agent: &dyn GuestAgent,
    old_boot_id: Option<&str>,
    timeout: Duration,
) -> Result<PingReply, EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ping = agent.wait_ready(left).await?;
        if old_boot_id != Some(ping.boot_id.as_str()) {
            return Ok(ping);
        }
        // Still the old boot (the reboot has not happened yet).
        agent.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often a VM's console log is checked against its bound.
const CONSOLE_CHECK: Duration = Duration::from_secs(1);

/// Deadline of the guest's `ConfigureNetwork` after a boot, a clone, a
/// restore or a reboot: the agent itself waits up to 5 s for the
/// interface to appear (`APPEAR_TIMEOUT`), then configures it.
const CONFIGURE_NETWORK_TIMEOUT: Duration = Duration::from_secs(15);

/// Watch one QEMU: its exit, its QMP events, and the size of the console
/// log its guest writes.
pub(super) async fn monitor(
    id: String,
    generation: u64,
    process: Arc<dyn Process>,
    mut events: mpsc::Receiver<QmpEvent>,
    tx: mpsc::UnboundedSender<Internal>,
    console_log: PathBuf,
) {
    let mut events_open = true;
    let mut console_check = tokio::time::interval(CONSOLE_CHECK);
    loop {
        tokio::select! {
            _ = console_check.tick() => {
                let log = console_log.clone();
                let cut = tokio::task::spawn_blocking(move || bound_console_log(&log)).await;
                if let Ok(Ok(true)) = cut {
                    tracing::warn!(vm = %id, "the guest floods its console, log cut back");
                }
            }
            () = process.exited() => {
                let _ = tx.send(Internal::Exited { id, generation });
                return;
            }
            event = events.recv(), if events_open => match event {
                Some(event) => {
                    let _ = tx.send(Internal::Qmp { id: id.clone(), generation, event });
                }
                None => events_open = false,
            },
        }
    }
}

/// Agent shutdown, then ACPI power button, then SIGKILL.
pub(super) async fn stop_gracefully(
    process: Arc<dyn Process>,
    qmp: Option<Arc<dyn Monitor>>,
    agent: Arc<dyn GuestAgent>,
    guest_answers: bool,
    timeout: Duration,
) {
    let exited_within = |d: Duration| {
        let p = process.clone();
        async move { tokio::time::timeout(d, p.exited()).await.is_ok() }
    };
    if guest_answers {
        let asked: Result<serde_json::Value, _> = agent
            .call(proto::method::SHUTDOWN, &serde_json::json!({}), timeout / 2)
            .await;
        if asked.is_ok() && exited_within(timeout / 2).await {
            return;
        }
    }
    if let Some(qmp) = qmp {
        if qmp.system_powerdown().await.is_ok() && exited_within(timeout / 4).await {
            return;
        }
    }
    let _ = process.kill();
}
