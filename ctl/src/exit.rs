//! kilnctl's exit codes: one per class of error, so scripts can tell "not
//! there" from "not allowed" from "try later" without parsing messages.
//! docs/kilnctl.md and kilnctl(1) list them; a test checks every error the
//! committed IDL declares is classified here.

use std::io;

use crate::client::ClientError;

/// What went wrong, by what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Anything else: kilnd or the guest failed.
    Failure = 1,
    /// Bad command line (clap's own code), or a VM reference that matches
    /// several VMs.
    Usage = 2,
    /// No such VM, pool or NIC.
    NotFound = 3,
    /// The caller may not do this (not root, not in the kiln group).
    PermissionDenied = 4,
    /// A deadline passed.
    Timeout = 5,
    /// The request is invalid, or not valid in the current state.
    Invalid = 6,
    /// A pool, quota or GPU has nothing left for this caller.
    Exhausted = 7,
    /// kilnd could not be reached, or the connection broke.
    Unreachable = 8,
}

/// `exec`: kilnctl's own failure (the guest command did not run), as
/// podman and docker exit (125), so a guest command's codes stay apart.
pub const EXEC_FAILED: i32 = 125;
/// `exec`: the command could not be started in the guest (`ExecFailed`).
pub const EXEC_NOT_STARTED: i32 = 126;

impl Class {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The class of a varlink error name (`io.kiln.Manager.NoSuchVM`, ...).
    pub fn of_error_name(name: &str) -> Self {
        let (interface, short) = name.rsplit_once('.').unwrap_or(("", name));
        match (interface, short) {
            ("io.kiln.Manager", kiln) => Self::of_kiln_error(kiln).unwrap_or(Self::Failure),
            ("org.varlink.service", "InvalidParameter" | "ExpectedMore") => Self::Invalid,
            _ => Self::Failure,
        }
    }

    /// Every `io.kiln.Manager` error kilnctl knows; None for a name it does
    /// not (a newer kilnd), which is a plain failure.
    fn of_kiln_error(short: &str) -> Option<Self> {
        Some(match short {
            "NoSuchVM" | "NoSuchPool" | "NoSuchNIC" | "ImageNotFound" | "NoSuchContainer"
            | "NoSuchProcess" | "NoSuchFile" | "NoSuchSnapshot" => Self::NotFound,
            "PermissionDenied" => Self::PermissionDenied,
            "Timeout" => Self::Timeout,
            "AlreadyExists" | "InvalidName" | "InvalidSpec" | "InvalidArgument"
            | "InvalidState" | "Busy" | "AddressInUse" | "PortInUse" | "NoHotplugSlot"
            | "InvalidImage" | "ImageInUse" | "ContainerExists" | "NotSnapshottable" => {
                Self::Invalid
            }
            "PoolExhausted" | "QuotaExceeded" | "NoGpuAvailable" | "TooManyContainers"
            | "TooManyProcesses" | "FileTooLarge" => Self::Exhausted,
            "LaunchFailed"
            | "BootFailed"
            | "VmmFailed"
            | "AgentFailed"
            | "ExecFailed"
            | "StorageFailed"
            | "NetworkFailed"
            | "ShuttingDown"
            | "ImagePullFailed"
            | "ContainerStartFailed"
            | "FileFailed" => Self::Failure,
            _ => return None,
        })
    }

    /// A local file or device: missing 3, not allowed 4, else a failure.
    pub fn of_io_error(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => Self::NotFound,
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            _ => Self::Failure,
        }
    }

    pub fn of_client_error(e: &ClientError) -> Self {
        match e {
            ClientError::Connect { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                Self::PermissionDenied
            }
            ClientError::Connect { .. } | ClientError::Lost(_) => Self::Unreachable,
            ClientError::Protocol(_) => Self::Failure,
            ClientError::Remote { name, .. } => Self::of_error_name(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new error in the IDL gets a class here on purpose, not by default.
    #[test]
    fn every_idl_error_has_a_class() {
        let idl = include_str!("../../varlink/io.kiln.Manager.varlink");
        let names: Vec<&str> = idl
            .lines()
            .filter_map(|l| l.strip_prefix("error "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        assert!(names.contains(&"NoSuchVM"), "{names:?}");
        for name in names {
            assert!(
                Class::of_kiln_error(name).is_some(),
                "io.kiln.Manager.{name} has no exit code class in ctl/src/exit.rs"
            );
        }
    }

    #[test]
    fn classes_by_name() {
        let of = Class::of_error_name;
        assert_eq!(of("io.kiln.Manager.NoSuchPool").code(), 3);
        assert_eq!(of("io.kiln.Manager.PermissionDenied").code(), 4);
        assert_eq!(of("io.kiln.Manager.Timeout").code(), 5);
        assert_eq!(of("io.kiln.Manager.InvalidState").code(), 6);
        assert_eq!(of("io.kiln.Manager.QuotaExceeded").code(), 7);
        assert_eq!(of("io.kiln.Manager.SomethingNew").code(), 1);
        assert_eq!(of("org.varlink.service.InvalidParameter").code(), 6);
        assert_eq!(of("org.varlink.service.MethodNotFound").code(), 1);
    }
}
