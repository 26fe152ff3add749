//! The engine's error type and its wire names.
//!
//! [`ErrorName`] is the one list of error names clients can see, on both
//! wires: the D-Bus adapter prefixes a name with `io.kiln.Kiln1.Error.`, the
//! varlink adapter with `io.kiln.Manager.`, and the committed varlink IDL
//! declares exactly [`ErrorName::ALL`] (a daemon test checks it). Every
//! [`EngineError`] has its name ([`EngineError::error_name`], an exhaustive
//! match). Clients match on the name; the message is for humans.

use kiln_image::{ImageError, InvalidReason};
use thiserror::Error;

use crate::agent::AgentError;
use crate::pool::PoolSpecError;
use crate::process::ProcessError;
use crate::qemu::QmpError;
use crate::spec::SpecError;
use crate::state::VmState;
use crate::store::StoreError;

/// Declares [`ErrorName`] with its `ALL` list and `as_str` spellings from
/// one list of variants, so neither can miss a name.
macro_rules! error_names {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// An error name as clients see it: the last element of
        /// `io.kiln.Kiln1.Error.<Name>` (D-Bus) and `io.kiln.Manager.<Name>`
        /// (varlink).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorName {
            $($(#[$doc])* $name,)*
        }

        impl ErrorName {
            /// Every name, in declaration order.
            pub const ALL: &'static [ErrorName] = &[$(Self::$name,)*];

            /// The name's wire spelling (the variant's own name).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name),)*
                }
            }
        }
    };
}

error_names! {
    /// No VM has this id.
    NoSuchVM,
    /// A VM or pool with this name exists.
    AlreadyExists,
    /// The name is not acceptable.
    InvalidName,
    /// The spec (of a VM, a pool, a network) is not acceptable.
    InvalidSpec,
    /// A call argument is out of bounds.
    InvalidArgument,
    /// Not valid in the VM's current state.
    InvalidState,
    /// Another operation on this VM is still running.
    Busy,
    /// A deadline passed.
    Timeout,
    /// QEMU could not be started.
    LaunchFailed,
    /// The VM never became ready.
    BootFailed,
    /// The QEMU monitor failed.
    VmmFailed,
    /// The guest agent failed.
    AgentFailed,
    /// The command could not be started in the guest.
    ExecFailed,
    /// State could not be persisted.
    StorageFailed,
    /// No pool has this name.
    NoSuchPool,
    /// The pool owns `max` VMs and none can come free.
    PoolExhausted,
    /// No render node can serve the VM's GPU request.
    NoGpuAvailable,
    /// kilnd is shutting down.
    ShuttingDown,
    /// The address is taken (or the subnet is full).
    AddressInUse,
    /// The host port is already forwarded to another VM.
    PortInUse,
    /// The host network failed.
    NetworkFailed,
    /// The VM has no such NIC.
    NoSuchNIC,
    /// The VM has no free hot-plug slot.
    NoHotplugSlot,
    /// The caller holds as many leases as `max_leases_per_caller` allows.
    QuotaExceeded,
    /// No stored image by that reference or digest (or, for an import,
    /// no such file or no such image in it).
    ImageNotFound,
    /// The registry could not be reached or refused the pull.
    ImagePullFailed,
    /// The image is refused: a bad manifest or config, a digest or size
    /// mismatch, an unsupported media type or platform, an unsafe layer,
    /// over the size limit.
    InvalidImage,
    /// The image has users (VMs, pools, templates) and cannot be removed.
    ImageInUse,
    /// The VM has no container by that name.
    NoSuchContainer,
    /// The VM already has a container by that name.
    ContainerExists,
    /// The VM runs as many containers as it may.
    TooManyContainers,
    /// The guest could not start the container (a layer disk that never
    /// showed up, a program that is missing or not for this machine, a
    /// user the image does not have).
    ContainerStartFailed,
    /// No process of the VM has this handle (it was released, or the guest
    /// rebooted).
    NoSuchProcess,
    /// The guest keeps as many processes as it may, all running.
    TooManyProcesses,
    /// No such file or directory in the guest.
    NoSuchFile,
    /// A copy is larger than its limit.
    FileTooLarge,
    /// Another file failure in the guest: no space, not a directory, a
    /// file kind that cannot be copied, a malformed archive.
    FileFailed,
    /// No snapshot has this name.
    NoSuchSnapshot,
    /// The VM cannot be saved: it has host devices (GPUs), hot-plugged
    /// NICs or a writable container disk.
    NotSnapshottable,
    /// The caller may not do this: refused by the adapters' authorization
    /// (they know the caller), or by the guest for a file.
    PermissionDenied,
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// The caller already holds `max_leases_per_caller` leases.
    #[error("{holder} already holds {limit} leases, the most allowed per caller")]
    QuotaExceeded {
        /// The caller.
        holder: String,
        /// The limit.
        limit: u32,
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
    /// The VM has no container by that name.
    #[error("no container named {0:?}")]
    NoSuchContainer(String),
    /// The VM already has a container by that name.
    #[error("a container named {0:?} exists")]
    ContainerExists(String),
    /// The VM runs as many containers as it may.
    #[error("too many containers: {0}")]
    TooManyContainers(String),
    /// The guest could not start the container.
    #[error("container failed to start: {0}")]
    ContainerStartFailed(String),
    /// No process of the VM has this handle.
    #[error("no process with handle {0}")]
    NoSuchProcess(u64),
    /// The guest runs as many processes as it may.
    #[error("too many processes in the guest (at most {0})")]
    TooManyProcesses(u64),
    /// No such file or directory in the guest.
    #[error("no such file or directory: {0}")]
    NoSuchFile(String),
    /// A copy is over its limit.
    #[error("file too large: {0}")]
    FileTooLarge(String),
    /// The guest refused access to a file.
    #[error("permission denied in the guest: {0}")]
    GuestPermissionDenied(String),
    /// Another file failure.
    #[error("file: {0}")]
    FileFailed(String),
    /// No snapshot has this name.
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),
    /// The VM cannot be saved.
    #[error("cannot snapshot: {0}")]
    NotSnapshottable(String),
    /// The image store failed or refused. One variant for the store's one
    /// typed error, so what it says (the registry's reason, why an image
    /// is invalid, who uses it) reaches the wire whole; its names are
    /// `ImageNotFound`, `ImagePullFailed`, `InvalidImage`, `ImageInUse` and
    /// `StorageFailed` ([`ImageError::name`]). A reference that does not
    /// parse is the caller's input: it becomes `InvalidArgument` on the way
    /// in (`From<ImageError>`).
    #[error(transparent)]
    Image(ImageError),
}

impl EngineError {
    /// The stable error name used on both wires.
    pub fn error_name(&self) -> ErrorName {
        match self {
            Self::NoSuchVM(_) => ErrorName::NoSuchVM,
            Self::AlreadyExists(_) => ErrorName::AlreadyExists,
            Self::InvalidName(_) => ErrorName::InvalidName,
            Self::InvalidSpec(_) | Self::InvalidPool(_) => ErrorName::InvalidSpec,
            Self::InvalidArgument(_) => ErrorName::InvalidArgument,
            Self::InvalidState { .. } => ErrorName::InvalidState,
            Self::Busy { .. } => ErrorName::Busy,
            Self::Timeout(_) => ErrorName::Timeout,
            Self::LaunchFailed(_) => ErrorName::LaunchFailed,
            Self::BootFailed(_) => ErrorName::BootFailed,
            Self::VmmFailed(_) => ErrorName::VmmFailed,
            Self::AgentFailed(_) => ErrorName::AgentFailed,
            Self::ExecFailed(_) => ErrorName::ExecFailed,
            Self::StorageFailed(_) => ErrorName::StorageFailed,
            Self::NoSuchPool(_) => ErrorName::NoSuchPool,
            Self::PoolExhausted { .. } => ErrorName::PoolExhausted,
            Self::NoGpuAvailable(_) => ErrorName::NoGpuAvailable,
            Self::ShuttingDown => ErrorName::ShuttingDown,
            Self::AddressInUse(_) => ErrorName::AddressInUse,
            Self::PortInUse(_) => ErrorName::PortInUse,
            Self::NetworkFailed(_) => ErrorName::NetworkFailed,
            Self::NoSuchNIC(_) => ErrorName::NoSuchNIC,
            Self::NoHotplugSlot(_) => ErrorName::NoHotplugSlot,
            Self::QuotaExceeded { .. } => ErrorName::QuotaExceeded,
            Self::NoSuchContainer(_) => ErrorName::NoSuchContainer,
            Self::ContainerExists(_) => ErrorName::ContainerExists,
            Self::TooManyContainers(_) => ErrorName::TooManyContainers,
            Self::ContainerStartFailed(_) => ErrorName::ContainerStartFailed,
            Self::NoSuchProcess(_) => ErrorName::NoSuchProcess,
            Self::TooManyProcesses(_) => ErrorName::TooManyProcesses,
            Self::NoSuchFile(_) => ErrorName::NoSuchFile,
            Self::FileTooLarge(_) => ErrorName::FileTooLarge,
            Self::GuestPermissionDenied(_) => ErrorName::PermissionDenied,
            Self::FileFailed(_) => ErrorName::FileFailed,
            Self::NoSuchSnapshot(_) => ErrorName::NoSuchSnapshot,
            Self::NotSnapshottable(_) => ErrorName::NotSnapshottable,
            Self::Image(e) => match e {
                ImageError::ImageNotFound { .. } => ErrorName::ImageNotFound,
                ImageError::ImagePullFailed { .. } => ErrorName::ImagePullFailed,
                ImageError::InvalidImage { .. } => ErrorName::InvalidImage,
                ImageError::ImageInUse { .. } => ErrorName::ImageInUse,
                ImageError::StorageFailed { .. } => ErrorName::StorageFailed,
            },
        }
    }

    /// [`EngineError::error_name`] spelled out.
    pub fn name(&self) -> &'static str {
        self.error_name().as_str()
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

impl From<ImageError> for EngineError {
    /// A reference or digest that does not parse is bad input
    /// (`InvalidArgument`); everything else keeps the store's own name.
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::InvalidImage {
                reason: InvalidReason::BadReference(what),
                ..
            } => Self::InvalidArgument(format!("{what:?} is not an image reference or digest")),
            other => Self::Image(other),
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
        use kiln_agent_proto::error as agent;
        match e {
            AgentError::Timeout { method } => Self::Timeout(format!("guest agent call {method}")),
            AgentError::Call { name, message } => match name.as_str() {
                agent::EXEC_FAILED => Self::ExecFailed(message),
                agent::NO_SUCH_CONTAINER => Self::NoSuchContainer(message),
                agent::CONTAINER_NOT_RUNNING => {
                    Self::ExecFailed(format!("the container is not running: {message}"))
                }
                agent::NO_SUCH_PROCESS => Self::NoSuchProcess(message.parse().unwrap_or(0)),
                agent::TOO_MANY_PROCESSES => {
                    Self::TooManyProcesses(kiln_agent_proto::MAX_PROCESSES as u64)
                }
                agent::PROCESS_NOT_INTERACTIVE => Self::InvalidArgument(
                    "the process has no terminal, or its stdin is closed".into(),
                ),
                agent::NO_SUCH_FILE => Self::NoSuchFile(message),
                agent::PERMISSION_DENIED => Self::GuestPermissionDenied(message),
                agent::NOT_A_DIRECTORY => Self::FileFailed(format!("not a directory: {message}")),
                agent::IS_A_DIRECTORY => Self::FileFailed(format!("is a directory: {message}")),
                agent::FILE_FAILED => Self::FileFailed(message),
                _ => Self::AgentFailed(AgentError::Call { name, message }),
            },
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
    use std::collections::BTreeSet;

    use super::*;

    /// One error of every kind the engine can return.
    fn one_of_each() -> Vec<EngineError> {
        let text = || String::from("x");
        vec![
            EngineError::NoSuchVM(text()),
            EngineError::AlreadyExists(text()),
            EngineError::NoSuchContainer(text()),
            EngineError::ContainerExists(text()),
            EngineError::TooManyContainers(text()),
            EngineError::ContainerStartFailed(text()),
            EngineError::InvalidName(SpecError::InvalidName(text())),
            EngineError::InvalidSpec(SpecError::Cmdline),
            EngineError::InvalidArgument(text()),
            EngineError::InvalidState {
                id: text(),
                state: VmState::Created,
                operation: "pause",
            },
            EngineError::Busy { id: text() },
            EngineError::Timeout(text()),
            EngineError::LaunchFailed(ProcessError::QemuRefused { message: text() }),
            EngineError::BootFailed(text()),
            EngineError::VmmFailed(QmpError::Disconnected),
            EngineError::AgentFailed(AgentError::Disconnected),
            EngineError::ExecFailed(text()),
            EngineError::StorageFailed(StoreError::Io {
                path: "/x".into(),
                source: std::io::Error::other("disk full"),
            }),
            EngineError::NoSuchPool(text()),
            EngineError::PoolExhausted {
                pool: text(),
                max: 1,
            },
            EngineError::NoGpuAvailable(text()),
            EngineError::ShuttingDown,
            EngineError::AddressInUse(text()),
            EngineError::PortInUse(text()),
            EngineError::NetworkFailed(kiln_net::NetError::BridgeMissing { name: text() }),
            EngineError::NoSuchNIC(text()),
            EngineError::NoHotplugSlot(text()),
            EngineError::QuotaExceeded {
                holder: text(),
                limit: 1,
            },
            EngineError::NoSuchProcess(1),
            EngineError::TooManyProcesses(64),
            EngineError::NoSuchFile(text()),
            EngineError::FileTooLarge(text()),
            EngineError::GuestPermissionDenied(text()),
            EngineError::FileFailed(text()),
            EngineError::NoSuchSnapshot(text()),
            EngineError::NotSnapshottable(text()),
            EngineError::Image(ImageError::ImageNotFound { what: text() }),
            EngineError::Image(ImageError::ImagePullFailed {
                reference: text(),
                reason: text(),
            }),
            EngineError::Image(ImageError::InvalidImage {
                image: text(),
                reason: InvalidReason::TooLarge { limit: 1 },
            }),
            EngineError::Image(ImageError::ImageInUse {
                digest: text(),
                users: vec![text()],
            }),
        ]
    }

    /// `ALL` has no name the engine cannot produce, so the IDL, which
    /// declares `ALL`, declares no dead error.
    #[test]
    fn every_engine_name_is_produced_and_no_other() {
        let produced: BTreeSet<ErrorName> =
            one_of_each().iter().map(EngineError::error_name).collect();
        let all: BTreeSet<ErrorName> = ErrorName::ALL.iter().copied().collect();
        assert_eq!(produced, all);
    }

    #[test]
    fn names_are_unique_identifiers() {
        let spelled: BTreeSet<&str> = ErrorName::ALL.iter().map(|n| n.as_str()).collect();
        assert_eq!(spelled.len(), ErrorName::ALL.len());
        for name in spelled {
            // A varlink error name element and a D-Bus name element.
            assert!(
                name.starts_with(|c: char| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}"
            );
        }
        assert_eq!(ErrorName::NoSuchVM.to_string(), "NoSuchVM");
        assert_eq!(
            EngineError::InvalidPool(PoolSpecError::Concurrency(0)).name(),
            "InvalidSpec"
        );
    }

    #[test]
    fn image_errors_keep_the_store_names_and_a_bad_reference_is_bad_input() {
        let io = ImageError::StorageFailed {
            action: "write",
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        let e = EngineError::from(io);
        assert_eq!(e.name(), "StorageFailed");
        assert_eq!(e.message(), "image store: cannot write /x: disk full");
        let invalid = EngineError::from(ImageError::InvalidImage {
            image: "r".into(),
            reason: InvalidReason::TooLarge { limit: 5 },
        });
        assert_eq!(invalid.name(), "InvalidImage");
        assert_eq!(
            invalid.message(),
            "invalid image r: larger than the limit of 5 bytes"
        );
        let bad = EngineError::from(ImageError::InvalidImage {
            image: "a b".into(),
            reason: InvalidReason::BadReference("a b".into()),
        });
        assert_eq!(bad.name(), "InvalidArgument");
    }

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
