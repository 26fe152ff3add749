//! The engine's error type and its wire names.
//!
//! Every variant has a stable name ([`EngineError::name`]); the D-Bus
//! adapter prefixes it with `io.kiln.Kiln1.Error.`, the varlink adapter with
//! `io.kiln.Manager.`. Clients match on the name; the message is for humans.

use thiserror::Error;

use crate::agent::AgentError;
use crate::pool::PoolSpecError;
use crate::process::ProcessError;
use crate::qemu::QmpError;
use crate::spec::SpecError;
use crate::state::VmState;
use crate::store::StoreError;

/// Why an engine command failed.
#[derive(Debug, Error)]
pub enum EngineError {
    /// No VM has this id.
    #[error("no VM with id {0:?}")]
    NoSuchVM(String),
    /// A VM with this name exists.
    #[error("a VM named {0:?} already exists")]
    AlreadyExists(String),
    /// The name is not acceptable.
    #[error(transparent)]
    InvalidName(SpecError),
    /// The spec is not acceptable.
    #[error(transparent)]
    InvalidSpec(SpecError),
    /// A call argument is out of bounds (exec argv, timeouts, sizes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation is not valid in the VM's current state.
    #[error("cannot {operation} VM {id} while it is {state}")]
    InvalidState {
        /// VM id.
        id: String,
        /// Its state.
        state: VmState,
        /// What was asked.
        operation: &'static str,
    },
    /// Another operation on this VM is still running.
    #[error("VM {id} is busy with another operation")]
    Busy {
        /// VM id.
        id: String,
    },
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// QEMU could not be started.
    #[error("cannot start QEMU")]
    LaunchFailed(#[source] ProcessError),
    /// The VM never became ready (QEMU died or the agent never answered).
    #[error("boot failed: {0}")]
    BootFailed(String),
    /// QMP failed.
    #[error("QEMU monitor")]
    VmmFailed(#[source] QmpError),
    /// The guest agent failed.
    #[error("guest agent")]
    AgentFailed(#[source] AgentError),
    /// The command could not be started in the guest.
    #[error("command failed to start in the guest: {0}")]
    ExecFailed(String),
    /// State could not be written (disk full, permissions).
    #[error("cannot persist state")]
    StorageFailed(#[source] StoreError),
    /// No pool has this name.
    #[error("no pool named {0:?}")]
    NoSuchPool(String),
    /// The pool definition is not acceptable.
    #[error(transparent)]
    InvalidPool(PoolSpecError),
    /// The pool owns `max` VMs and none is free.
    #[error("pool {pool:?} is exhausted: all {max} VMs are leased or booting for earlier callers")]
    PoolExhausted {
        /// Pool name.
        pool: String,
        /// Its cap.
        max: u32,
    },
    /// No render node can serve the VM's GPU request.
    #[error("no GPU available: {0}")]
    NoGpuAvailable(String),
    /// The engine is shutting down.
    #[error("kilnd is shutting down")]
    ShuttingDown,
    /// The address (asked for, or the one the subnet has left) is taken.
    #[error("address in use: {0}")]
    AddressInUse(String),
    /// A host port is already forwarded to another VM.
    #[error("port in use: {0}")]
    PortInUse(String),
    /// The VM has no such NIC.
    #[error("no such NIC: {0}")]
    NoSuchNIC(String),
    /// The VM has no free hot-plug slot (or none at all).
    #[error("no hot-plug slot: {0}")]
    NoHotplugSlot(String),
    /// The host network failed (netlink, nftables, TAP ioctls, a foreign
    /// link in the way).
    #[error("host network")]
    NetworkFailed(#[source] kiln_net::NetError),
}

impl EngineError {
    /// The stable error name used on both wires.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NoSuchVM(_) => "NoSuchVM",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::InvalidName(_) => "InvalidName",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidArgument(_) => "InvalidArgument",
            Self::InvalidState { .. } => "InvalidState",
            Self::Busy { .. } => "Busy",
            Self::Timeout(_) => "Timeout",
            Self::LaunchFailed(_) => "LaunchFailed",
            Self::BootFailed(_) => "BootFailed",
            Self::VmmFailed(_) => "VmmFailed",
            Self::AgentFailed(_) => "AgentFailed",
            Self::ExecFailed(_) => "ExecFailed",
            Self::StorageFailed(_) => "StorageFailed",
            Self::NoSuchPool(_) => "NoSuchPool",
            Self::InvalidPool(_) => "InvalidSpec",
            Self::PoolExhausted { .. } => "PoolExhausted",
            Self::NoGpuAvailable(_) => "NoGpuAvailable",
            Self::ShuttingDown => "ShuttingDown",
            Self::AddressInUse(_) => "AddressInUse",
            Self::PortInUse(_) => "PortInUse",
            Self::NetworkFailed(_) => "NetworkFailed",
            Self::NoSuchNIC(_) => "NoSuchNIC",
            Self::NoHotplugSlot(_) => "NoHotplugSlot",
        }
    }

    /// The message with its whole cause chain, for the wire.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

impl From<kiln_net::NetError> for EngineError {
    /// Input problems are `InvalidSpec`, taken addresses and ports their own
    /// names, everything else `NetworkFailed`.
    fn from(e: kiln_net::NetError) -> Self {
        use kiln_net::{ErrorKind, FirewallError, IpamError, NetError};
        match &e {
            NetError::Ipam(IpamError::AddressInUse { .. } | IpamError::Exhausted { .. }) => {
                Self::AddressInUse(e.to_string())
            }
            NetError::Firewall(FirewallError::PortInUse { .. }) => Self::PortInUse(e.to_string()),
            _ if e.kind() == ErrorKind::InvalidInput => {
                Self::InvalidSpec(SpecError::Network(e.to_string()))
            }
            _ => Self::NetworkFailed(e),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        Self::StorageFailed(e)
    }
}

impl From<AgentError> for EngineError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Timeout { method } => Self::Timeout(format!("guest agent call {method}")),
            AgentError::Call { name, message } if name == kiln_agent_proto::error::EXEC_FAILED => {
                Self::ExecFailed(message)
            }
            other => Self::AgentFailed(other),
        }
    }
}

impl From<QmpError> for EngineError {
    fn from(e: QmpError) -> Self {
        match e {
            QmpError::Timeout { command } => Self::Timeout(format!("QMP command {command}")),
            other => Self::VmmFailed(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_carries_the_cause_chain_once() {
        let e = EngineError::VmmFailed(QmpError::Disconnected);
        assert_eq!(e.name(), "VmmFailed");
        assert_eq!(e.message(), "QEMU monitor: QMP connection closed");
        let t: EngineError = AgentError::Timeout {
            method: "io.kiln.Agent.Exec".into(),
        }
        .into();
        assert_eq!(t.name(), "Timeout");
    }
}
