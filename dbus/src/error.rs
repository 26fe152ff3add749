//! The one mapping of engine errors to D-Bus error names
//! (`io.kiln.Kiln1.Error.<EngineError::name()>`).

use kiln_engine::EngineError;

/// Errors a Kiln method replies with. Every variant carries the message for
/// humans; clients match on the name.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.kiln.Kiln1.Error")]
pub enum KilnError {
    /// A bus-level failure (replied under zbus' own error name).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No VM has this id.
    NoSuchVM(String),
    /// A VM with this name exists.
    AlreadyExists(String),
    /// The name is not acceptable.
    InvalidName(String),
    /// The spec is not acceptable (also: a bad `a{sv}` key or type).
    InvalidSpec(String),
    /// A call argument is out of bounds.
    InvalidArgument(String),
    /// Not valid in the VM's current state.
    InvalidState(String),
    /// Another operation on this VM is still running.
    Busy(String),
    /// A deadline passed.
    Timeout(String),
    /// QEMU could not be started.
    LaunchFailed(String),
    /// The VM never became ready.
    BootFailed(String),
    /// The QEMU monitor failed.
    VmmFailed(String),
    /// The guest agent failed.
    AgentFailed(String),
    /// The command could not be started in the guest.
    ExecFailed(String),
    /// State could not be persisted.
    StorageFailed(String),
    /// No pool has this name.
    NoSuchPool(String),
    /// The pool owns `max` VMs and none can come free.
    PoolExhausted(String),
    /// No render node can serve the VM's GPU request.
    NoGpuAvailable(String),
    /// kilnd is shutting down.
    ShuttingDown(String),
    /// The caller may not do this.
    PermissionDenied(String),
    /// The address is taken (or the subnet is full).
    AddressInUse(String),
    /// The host port is already forwarded to another VM.
    PortInUse(String),
    /// The host network failed.
    NetworkFailed(String),
    /// The VM has no such NIC.
    NoSuchNIC(String),
    /// The VM has no free hot-plug slot.
    NoHotplugSlot(String),
}

impl From<EngineError> for KilnError {
    fn from(e: EngineError) -> Self {
        let message = e.message();
        match e {
            EngineError::NoSuchVM(_) => Self::NoSuchVM(message),
            EngineError::AlreadyExists(_) => Self::AlreadyExists(message),
            EngineError::InvalidName(_) => Self::InvalidName(message),
            EngineError::InvalidSpec(_) => Self::InvalidSpec(message),
            EngineError::InvalidArgument(_) => Self::InvalidArgument(message),
            EngineError::InvalidState { .. } => Self::InvalidState(message),
            EngineError::Busy { .. } => Self::Busy(message),
            EngineError::Timeout(_) => Self::Timeout(message),
            EngineError::LaunchFailed(_) => Self::LaunchFailed(message),
            EngineError::BootFailed(_) => Self::BootFailed(message),
            EngineError::VmmFailed(_) => Self::VmmFailed(message),
            EngineError::AgentFailed(_) => Self::AgentFailed(message),
            EngineError::ExecFailed(_) => Self::ExecFailed(message),
            EngineError::StorageFailed(_) => Self::StorageFailed(message),
            EngineError::NoSuchPool(_) => Self::NoSuchPool(message),
            EngineError::InvalidPool(_) => Self::InvalidSpec(message),
            EngineError::PoolExhausted { .. } => Self::PoolExhausted(message),
            EngineError::NoGpuAvailable(_) => Self::NoGpuAvailable(message),
            EngineError::ShuttingDown => Self::ShuttingDown(message),
            EngineError::AddressInUse(_) => Self::AddressInUse(message),
            EngineError::PortInUse(_) => Self::PortInUse(message),
            EngineError::NetworkFailed(_) => Self::NetworkFailed(message),
            EngineError::NoSuchNIC(_) => Self::NoSuchNIC(message),
            EngineError::NoHotplugSlot(_) => Self::NoHotplugSlot(message),
        }
    }
}

impl From<zbus::fdo::Error> for KilnError {
    fn from(e: zbus::fdo::Error) -> Self {
        Self::ZBus(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn engine_errors_keep_their_names() {
        let cases = [
            EngineError::NoSuchVM("x".into()),
            EngineError::AlreadyExists("x".into()),
            EngineError::InvalidArgument("x".into()),
            EngineError::Busy { id: "x".into() },
            EngineError::Timeout("x".into()),
            EngineError::BootFailed("x".into()),
            EngineError::ExecFailed("x".into()),
            EngineError::ShuttingDown,
            EngineError::AddressInUse("x".into()),
            EngineError::PortInUse("x".into()),
            EngineError::NoSuchNIC("x".into()),
            EngineError::NoHotplugSlot("x".into()),
        ];
        for e in cases {
            let want = format!("io.kiln.Kiln1.Error.{}", e.name());
            let message = e.message();
            let mapped = KilnError::from(e);
            assert_eq!(mapped.name().as_str(), want);
            assert_eq!(mapped.description(), Some(message.as_str()));
        }
    }
}
