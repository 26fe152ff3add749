//! The narrow port between the actor and a virtual machine monitor.
//!
//! The actor decides *what* happens to a VM; everything it asks of the
//! outside world to make it happen goes through four small traits:
//!
//! - [`Vmm`]: starts a VM's process, finds it again after a restart, gives
//!   the guest agent of a socket, builds pool templates;
//! - [`Process`]: one VMM process — its pid, its end, `SIGKILL`;
//! - [`Monitor`]: the VMM's control channel (QMP for QEMU): pause, resume,
//!   reset, power button, restoring a clone, NIC hot-plug;
//! - [`GuestAgent`]: the `io.kiln.Agent` client in the guest.
//!
//! [`qemu::QemuVmm`] is the real thing (QEMU, QMP, the agent over
//! virtio-serial). `fake::FakeVmm` (tests only) keeps VMs in memory so
//! the actor's rules — refill, back-off, waiters, leases, undo on failure —
//! are tested in milliseconds; the real-QEMU tests then prove the wiring.
//! Both are driven by the same actor code.

pub mod qemu;

#[cfg(test)]
pub mod fake;

use std::fmt::Debug;
use std::future::Future;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{self as proto, PingReply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::agent::{AgentError, FollowUp, ReadyReplies};
use crate::container::DiskAttachment;
use crate::error::EngineError;
use crate::pool::template::{BuildPlan, Template};
use crate::process::ProcessError;
use crate::qemu::{QemuLaunch, QmpError, QmpEvent, SCSI_BUS};

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A started (or re-adopted) VM: its process, its monitor, the monitor's
/// events and the VMM's version.
#[derive(Debug)]
pub struct Started {
    /// The process.
    pub process: Arc<dyn Process>,
    /// Its control channel.
    pub monitor: Arc<dyn Monitor>,
    /// Events from the monitor (QMP `STOP`, `RESUME`, `RESET`, ...).
    pub events: mpsc::Receiver<QmpEvent>,
    /// The VMM's version, for the record.
    pub version: String,
}

/// The monitor of a re-found process.
#[derive(Debug)]
pub struct Reconnected {
    /// Its control channel.
    pub monitor: Arc<dyn Monitor>,
    /// Events from the monitor.
    pub events: mpsc::Receiver<QmpEvent>,
    /// The VMM's version.
    pub version: String,
}

/// How the actor gets VMM processes.
pub trait Vmm: Send + Sync + Debug + 'static {
    /// Start the process `launch` describes (descriptors in `inherit` at
    /// fixed numbers, its output to `log`) and connect its monitor. Fails
    /// with the VMM's own message if it exits first.
    fn launch(
        &self,
        launch: QemuLaunch,
        inherit: Vec<(OwnedFd, RawFd)>,
        log: PathBuf,
        monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Started, EngineError>>;

    /// Find the live process of VM `id` after a restart (its pid as
    /// recorded, else from its pid file in `runtime_dir`). `None`: it is
    /// gone.
    fn find(
        &self,
        id: &str,
        recorded_pid: Option<u32>,
        runtime_dir: &Path,
    ) -> Option<Arc<dyn Process>>;

    /// Connect to the monitor of a re-found process.
    fn reconnect(
        &self,
        runtime_dir: PathBuf,
        monitor_timeout: Duration,
    ) -> BoxFuture<'static, Result<Reconnected, EngineError>>;

    /// The guest agent of a VM whose runtime files are in `runtime_dir`.
    fn agent(&self, runtime_dir: &Path) -> Arc<dyn GuestAgent>;

    /// Boot a template VM, save it, and move the finished template in place.
    fn build_template(&self, plan: BuildPlan) -> BoxFuture<'static, Result<Template, EngineError>>;
}

/// One VMM process.
pub trait Process: Send + Sync + Debug {
    /// Its pid.
    fn pid(&self) -> u32;
    /// `SIGKILL` it.
    fn kill(&self) -> Result<(), ProcessError>;
    /// Whether it still runs.
    fn is_alive(&self) -> bool;
    /// Resolves once it has exited.
    fn exited(&self) -> BoxFuture<'_, ()>;
}

/// A VMM's control channel; every call has the monitor's own deadline.
pub trait Monitor: Send + Sync + Debug {
    /// Stop the vCPUs.
    fn stop(&self) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Run the vCPUs.
    fn cont(&self) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Hard reset.
    fn system_reset(&self) -> BoxFuture<'_, Result<(), QmpError>>;
    /// ACPI power button.
    fn system_powerdown(&self) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Whether the vCPUs run.
    fn is_running(&self) -> BoxFuture<'_, Result<bool, QmpError>>;
    /// Start loading a template's device state into this clone (started
    /// with `-incoming defer`), RAM shared with the template. The guest
    /// runs by itself once the state is loaded (the template was saved
    /// without its run state); a state that does not load ends QEMU.
    fn restore_clone(&self, state: &Path) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Save the (paused) guest to `path`: device state, and all RAM
    /// unless `ignore_shared` (then RAM in a shared file is left there).
    fn save_state(
        &self,
        path: &Path,
        ignore_shared: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Load what [`Monitor::save_state`] wrote (without `ignore_shared`)
    /// into this VMM started to wait for it; the guest stays paused.
    fn load_state(&self, path: &Path, timeout: Duration) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Ask the VMM to exit.
    fn quit(&self) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Hand a descriptor to the VMM under `name`.
    fn getfd(&self, name: &str, fd: OwnedFd) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Forget a descriptor handed over with [`Monitor::getfd`].
    fn closefd(&self, name: &str) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Add a network backend.
    fn netdev_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Remove a network backend.
    fn netdev_del(&self, id: &str) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Plug a device.
    fn device_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Ask the guest to release a device.
    fn device_del(&self, id: &str) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Ids of the devices plugged by name (`/machine/peripheral`).
    fn peripheral_ids(&self) -> BoxFuture<'_, Result<Vec<String>, QmpError>>;
    /// Add a block node.
    fn blockdev_add(&self, arguments: Value) -> BoxFuture<'_, Result<(), QmpError>>;
    /// Remove a block node no device uses.
    fn blockdev_del(&self, node: &str) -> BoxFuture<'_, Result<(), QmpError>>;
}

/// How often a detach asks whether QEMU has let go of a disk's node.
const DETACH_POLL: Duration = Duration::from_millis(20);

impl dyn Monitor + '_ {
    /// Plug `disk` into the VM's SCSI controller: a `raw` node over the
    /// file (a layer read-only at both levels, so neither QEMU nor the
    /// guest can write the shared file), then a `scsi-hd` with Kiln's
    /// serial. A failed `device_add` removes the node again.
    pub async fn attach_disk(&self, disk: &DiskAttachment) -> Result<(), QmpError> {
        self.blockdev_add(serde_json::json!({
            "driver": "raw",
            "node-name": disk.node,
            "read-only": !disk.writable,
            "file": {
                "driver": "file",
                "filename": disk.path,
                "read-only": !disk.writable,
            },
        }))
        .await?;
        let plugged = self
            .device_add(serde_json::json!({
                "driver": "scsi-hd",
                "id": disk.device,
                "bus": SCSI_BUS,
                "scsi-id": disk.target,
                "lun": disk.lun,
                "serial": disk.serial,
                "drive": disk.node,
            }))
            .await;
        if let Err(e) = plugged {
            let _ = self.blockdev_del(&disk.node).await;
            return Err(e);
        }
        Ok(())
    }

    /// Unplug `disk`: `device_del` (a SCSI unplug completes at once in
    /// QEMU, the guest is told afterwards), then `blockdev-del` as soon as
    /// QEMU has let go of the node, within `timeout`. A disk that is not
    /// there is fine (undo after a partial attach, or a retry).
    pub async fn detach_disk(
        &self,
        disk: &DiskAttachment,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let _ = self.device_del(&disk.device).await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.blockdev_del(&disk.node).await {
                Ok(()) => return Ok(()),
                // QEMU's words for a node that is not there (never added,
                // or removed by an earlier try): nothing left to do.
                Err(QmpError::Command { desc, .. }) if desc.starts_with("Failed to find node") => {
                    return Ok(())
                }
                // Still in use by the device being deleted.
                Err(QmpError::Command { class, .. }) if class == "GenericError" => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            command: format!("blockdev-del {}", disk.node),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(DETACH_POLL).await;
        }
    }
}

/// The guest agent (`io.kiln.Agent`), one call at a time.
pub trait GuestAgent: Send + Sync + Debug {
    /// Call `method` with JSON parameters; the JSON reply.
    fn call_json(
        &self,
        method: &str,
        parameters: Value,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Value, AgentError>>;
    /// Ping on a new connection until the agent answers or `timeout`
    /// passes, with `follow_ups` sent behind the Ping in the same write
    /// (`AgentClient::wait_ready_then`).
    fn wait_ready_then(
        &self,
        timeout: Duration,
        follow_ups: Vec<FollowUp>,
    ) -> BoxFuture<'_, Result<ReadyReplies, AgentError>>;
    /// Drop the connection: the next call connects afresh.
    fn disconnect(&self) -> BoxFuture<'_, ()>;
}

impl dyn GuestAgent + '_ {
    /// Call `method` and decode its reply.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        parameters: &P,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let parameters =
            serde_json::to_value(parameters).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let value = self.call_json(method, parameters, timeout).await?;
        serde_json::from_value(value).map_err(|e| AgentError::Protocol(e.to_string()))
    }

    /// Ping on a new connection until the agent answers or `timeout`
    /// passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<PingReply, AgentError> {
        Ok(self.wait_ready_then(timeout, Vec::new()).await?.ping)
    }

    /// `Ping`: liveness and guest facts.
    pub async fn ping(&self, timeout: Duration) -> Result<PingReply, AgentError> {
        self.call(proto::method::PING, &proto::PingRequest::default(), timeout)
            .await
    }

    /// `ConfigureNetwork`: the guest's NICs as `request` says.
    pub async fn configure_network(
        &self,
        request: &proto::ConfigureNetworkRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let _: Value = self
            .call(proto::method::CONFIGURE_NETWORK, request, timeout)
            .await?;
        Ok(())
    }
}
