//! Wire types of `io.kiln.Agent`, the interface kilnd speaks with the guest
//! agent over the virtio-serial port `io.kiln.agent.0`.
//!
//! The transport is varlink framing: one JSON object per message, each
//! terminated by a NUL byte. Calls are `{"method": "io.kiln.Agent.X",
//! "parameters": {...}}`; replies are `{"parameters": {...}}` or
//! `{"error": "io.kiln.Agent.Y", "parameters": {...}}`. One call is in flight
//! at a time on the port; replies come back in order. The full protocol is
//! described in `docs/agent-protocol.md` and `guest/io.kiln.Agent.varlink`.
//!
//! This crate is shared by the agent (sync, std only) and the host client
//! (tokio), so it holds only types and framing helpers, no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod container;
mod file;
mod process;

pub use container::*;
pub use file::*;
pub use process::*;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "io.kiln.agent.0";
/// Varlink interface name.
pub const INTERFACE: &str = "io.kiln.Agent";
/// In the initramfs of a VM that boots its image as a whole OS
/// (`VMSpec.boot: "image"`): a [`StartContainerRequest`] in JSON naming
/// the image's layer disks, the writable layer and the image's init. Its
/// presence makes the agent mount that root and hand PID 1 to the init.
pub const OS_ROOT_CONFIG: &str = "/etc/kiln/os.json";
/// Largest message either side accepts, in bytes (framing included).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Default and upper bound of captured bytes per output stream of `Exec`.
pub const DEFAULT_MAX_OUTPUT_BYTES: u32 = 1024 * 1024;
/// Upper bound a caller may ask for in [`ExecRequest::max_output_bytes`].
pub const LIMIT_MAX_OUTPUT_BYTES: u32 = 4 * 1024 * 1024;

/// The standard `org.varlink.service` interface description (from the
/// varlink specification), served by every varlink service in Kiln: the
/// guest agent and kilnd's `io.kiln.Manager`.
pub const VARLINK_SERVICE_IDL: &str = "\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
";

/// Fully qualified method names.
pub mod method {
    /// `Ping(PingRequest) -> PingReply`: liveness and guest facts.
    pub const PING: &str = "io.kiln.Agent.Ping";
    /// `Exec(ExecRequest) -> ExecReply`.
    pub const EXEC: &str = "io.kiln.Agent.Exec";
    /// `SetIdentity(SetIdentityRequest) -> ()`: hostname, machine id, entropy.
    pub const SET_IDENTITY: &str = "io.kiln.Agent.SetIdentity";
    /// `Shutdown() -> ()`: replies, syncs, then powers off.
    pub const SHUTDOWN: &str = "io.kiln.Agent.Shutdown";
    /// `Reboot() -> ()`: replies, syncs, then reboots.
    pub const REBOOT: &str = "io.kiln.Agent.Reboot";
    /// `ConfigureNetwork(ConfigureNetworkRequest) -> ConfigureNetworkReply`:
    /// MACs, addresses, MTU, default route and DNS of the guest's NICs.
    pub const CONFIGURE_NETWORK: &str = "io.kiln.Agent.ConfigureNetwork";
    /// `StartContainer(StartContainerRequest) -> ContainerReply`.
    pub const START_CONTAINER: &str = "io.kiln.Agent.StartContainer";
    /// `ContainerStatus(ContainerIdRequest) -> ContainerReply`.
    pub const CONTAINER_STATUS: &str = "io.kiln.Agent.ContainerStatus";
    /// `ListContainers() -> ListContainersReply`.
    pub const LIST_CONTAINERS: &str = "io.kiln.Agent.ListContainers";
    /// `StopContainer(StopContainerRequest) -> StopContainerReply`.
    pub const STOP_CONTAINER: &str = "io.kiln.Agent.StopContainer";
    /// `RemoveContainer(ContainerIdRequest) -> RemoveContainerReply`.
    pub const REMOVE_CONTAINER: &str = "io.kiln.Agent.RemoveContainer";
    /// `ContainerLogs(ContainerLogsRequest) -> ContainerLogsReply`.
    pub const CONTAINER_LOGS: &str = "io.kiln.Agent.ContainerLogs";
    /// `SpawnProcess(SpawnProcessRequest) -> SpawnProcessReply`.
    pub const SPAWN_PROCESS: &str = "io.kiln.Agent.SpawnProcess";
    /// `ReadProcess(ReadProcessRequest) -> ReadProcessReply`.
    pub const READ_PROCESS: &str = "io.kiln.Agent.ReadProcess";
    /// `WriteProcess(WriteProcessRequest) -> WriteProcessReply`.
    pub const WRITE_PROCESS: &str = "io.kiln.Agent.WriteProcess";
    /// `SignalProcess(SignalProcessRequest) -> ()`.
    pub const SIGNAL_PROCESS: &str = "io.kiln.Agent.SignalProcess";
    /// `ResizeProcess(ResizeProcessRequest) -> ()`.
    pub const RESIZE_PROCESS: &str = "io.kiln.Agent.ResizeProcess";
    /// `ReleaseProcess(ProcessHandleRequest) -> ()`.
    pub const RELEASE_PROCESS: &str = "io.kiln.Agent.ReleaseProcess";
    /// `WriteFile(WriteFileRequest) -> ()`.
    pub const WRITE_FILE: &str = "io.kiln.Agent.WriteFile";
    /// `ReadFile(ReadFileRequest) -> ReadFileReply`.
    pub const READ_FILE: &str = "io.kiln.Agent.ReadFile";
    /// `MakeDirectory(MakeDirectoryRequest) -> ()`.
    pub const MAKE_DIRECTORY: &str = "io.kiln.Agent.MakeDirectory";
    /// `MakeSymlink(MakeSymlinkRequest) -> ()`.
    pub const MAKE_SYMLINK: &str = "io.kiln.Agent.MakeSymlink";
    /// `StatPath(FileLocation) -> StatPathReply`.
    pub const STAT_PATH: &str = "io.kiln.Agent.StatPath";
    /// `ListDirectory(FileLocation) -> ListDirectoryReply`.
    pub const LIST_DIRECTORY: &str = "io.kiln.Agent.ListDirectory";
}

/// Fully qualified error names.
pub mod error {
    /// The command could not be started (no such file, not executable, …).
    pub const EXEC_FAILED: &str = "io.kiln.Agent.ExecFailed";
    /// A parameter is missing, malformed or out of range.
    pub const INVALID_PARAMETER: &str = "org.varlink.service.InvalidParameter";
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: &str = "org.varlink.service.MethodNotFound";
    /// Setting the identity failed (hostname, machine id or entropy).
    pub const IDENTITY_FAILED: &str = "io.kiln.Agent.IdentityFailed";
    /// No guest interface has the MAC (nor the previous MAC) asked for.
    pub const NO_SUCH_INTERFACE: &str = "io.kiln.Agent.NoSuchInterface";
    /// Configuring the network failed in a system call.
    pub const NETWORK_FAILED: &str = "io.kiln.Agent.NetworkFailed";
    /// No disk with the serial appeared in time (`DiskParameters`).
    pub const DISK_NOT_FOUND: &str = "io.kiln.Agent.DiskNotFound";
    /// The disk holds no erofs file system (`DiskParameters`).
    pub const NOT_EROFS: &str = "io.kiln.Agent.NotErofs";
    /// Mounting a layer, the upper layer or the overlay failed.
    pub const MOUNT_FAILED: &str = "io.kiln.Agent.MountFailed";
    /// No container has the id (`ContainerIdParameters`).
    pub const NO_SUCH_CONTAINER: &str = "io.kiln.Agent.NoSuchContainer";
    /// A container with the id exists (`ContainerIdParameters`).
    pub const CONTAINER_EXISTS: &str = "io.kiln.Agent.ContainerExists";
    /// The container has exited (`ContainerIdParameters`).
    pub const CONTAINER_NOT_RUNNING: &str = "io.kiln.Agent.ContainerNotRunning";
    /// The guest's container limit is reached (`TooManyContainersParameters`).
    pub const TOO_MANY_CONTAINERS: &str = "io.kiln.Agent.TooManyContainers";
    /// The container's process spec is unusable (`InvalidProcessSpecParameters`).
    pub const INVALID_PROCESS_SPEC: &str = "io.kiln.Agent.InvalidProcessSpec";
    /// The program cannot be executed here (`ExecFormatParameters`).
    pub const EXEC_FORMAT_ERROR: &str = "io.kiln.Agent.ExecFormatError";
    /// Setting up or starting the container's process failed.
    pub const CONTAINER_START_FAILED: &str = "io.kiln.Agent.ContainerStartFailed";
    /// No process has this handle (`NoSuchProcessParameters`).
    pub const NO_SUCH_PROCESS: &str = "io.kiln.Agent.NoSuchProcess";
    /// The guest keeps [`crate::MAX_PROCESSES`] already.
    pub const TOO_MANY_PROCESSES: &str = "io.kiln.Agent.TooManyProcesses";
    /// The process has no terminal (`ResizeProcess`) or its stdin is
    /// closed or was never open (`WriteProcess`).
    pub const PROCESS_NOT_INTERACTIVE: &str = "io.kiln.Agent.ProcessNotInteractive";
    /// No such file or directory (`PathParameters`).
    pub const NO_SUCH_FILE: &str = "io.kiln.Agent.NoSuchFile";
    /// The guest refused access (`PathParameters`).
    pub const PERMISSION_DENIED: &str = "io.kiln.Agent.PermissionDenied";
    /// A component of the path is not a directory (`PathParameters`).
    pub const NOT_A_DIRECTORY: &str = "io.kiln.Agent.NotADirectory";
    /// The path is a directory where a file was expected (`PathParameters`).
    pub const IS_A_DIRECTORY: &str = "io.kiln.Agent.IsADirectory";
    /// Another file-system failure (`FileFailedParameters`): no space, a
    /// write at the wrong offset, ...
    pub const FILE_FAILED: &str = "io.kiln.Agent.FileFailed";
}

/// A varlink call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Fully qualified method name.
    pub method: String,
    /// Method parameters; absent means `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// A varlink reply: either `parameters` or an `error` name with parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Reply parameters (or error parameters when `error` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Error name, when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Parameters of `Ping`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingRequest {
    /// Echoed back in [`PingReply::nonce`]. A host that reconnects sends a
    /// fresh nonce and discards replies until it sees it: a reply to a call
    /// an earlier connection gave up on (timeout) is then never mistaken for
    /// the answer to a new call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<u64>,
}

/// Reply of `Ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingReply {
    /// Version of the agent binary.
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// `/proc/sys/kernel/random/boot_id`: changes on every guest boot.
    pub boot_id: String,
    /// Current hostname.
    pub hostname: String,
    /// Guest uptime in milliseconds.
    pub uptime_ms: u64,
    /// The request's nonce, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<u64>,
}

/// Parameters of `Exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment entries, `KEY=VALUE`, added to the agent's base
    /// environment (`PATH`, `HOME`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Bytes written to the command's stdin, then stdin is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command (SIGKILL) after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Cap on captured bytes per stream (default [`DEFAULT_MAX_OUTPUT_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u32>,
}

/// Reply of `Exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecReply {
    /// Exit code, or `128 + signal` when the command was killed by a signal.
    pub exit_code: i32,
    /// Signal that ended the command, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
    /// Stdout was longer than the cap and was cut.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Stderr was longer than the cap and was cut.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// The command ran past `timeoutMs` and was killed.
    #[serde(default)]
    pub timed_out: bool,
}

/// Parameters of `SetIdentity`. Every field is optional; absent ones are
/// left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetIdentityRequest {
    /// New hostname (`sethostname`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// 32 lowercase hex characters, written to `/etc/machine-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Host entropy as hex; credited with `RNDADDENTROPY`, then the CRNG is
    /// reseeded (`RNDRESEEDCRNG`) so clones of one template diverge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_hex: Option<String>,
}

/// Largest number of interfaces one `ConfigureNetwork` call may name.
pub const MAX_NETWORK_INTERFACES: usize = 64;

/// One guest NIC in `ConfigureNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInterface {
    /// The MAC the interface must have (`02:6b:…`). The interface is found
    /// by this MAC or by [`NetworkInterface::previous_mac`].
    pub mac: String,
    /// A MAC the interface may still carry: a template clone's NIC keeps
    /// the template's MAC until it is told otherwise (the MAC is part of
    /// the migrated device state; see docs/networking.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_mac: Option<String>,
    /// IPv4 address (`10.77.0.5`); it replaces the interface's primary
    /// IPv4 address. Absent: the primary IPv4 address is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Prefix length of `address` (required with it), 1 to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<u8>,
    /// MTU, 68 to 65535; absent: left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// IPv6 on the interface (`disable_ipv6`): `false` turns it off before
    /// the interface comes up, `true` on once its MAC is set (so its
    /// link-local address is made from that MAC), after the reply: once
    /// the agent has answered every call it has read, and before any later
    /// call but `Ping` and `SetIdentity`; absent: left as it is.
    /// A template brings its NICs up with IPv6 off, so a clone sends
    /// nothing from the template's MAC before it has its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
}

/// Parameters of `ConfigureNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureNetworkRequest {
    /// The NICs to configure; each is given its MTU, address and MAC live
    /// (never set down), then set up; the MAC write or the "up" announces
    /// the address with a gratuitous ARP.
    pub interfaces: Vec<NetworkInterface>,
    /// Default gateway (IPv4); it must be inside the subnet of one of
    /// `interfaces`. Replaces any default route. Absent: no default route
    /// is added (reconfiguring an interface drops the routes through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Name servers (IPv4 or IPv6), written to `/etc/resolv.conf`. Absent:
    /// the file is left alone; empty: it is emptied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
}

/// A NIC as `ConfigureNetwork` left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredInterface {
    /// Interface name in the guest (`eth0`).
    pub name: String,
    /// Its MAC now.
    pub mac: String,
}

/// Reply of `ConfigureNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureNetworkReply {
    /// The interfaces, in request order.
    pub interfaces: Vec<ConfiguredInterface>,
}

/// Error parameters of `NoSuchInterface`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoSuchInterfaceParameters {
    /// The MAC asked for.
    pub mac: String,
}

/// Error parameters of `ExecFailed`, `IdentityFailed`, `NetworkFailed`,
/// `MountFailed` and `ContainerStartFailed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureParameters {
    /// Human-readable reason.
    pub message: String,
}

/// Serialize `message` and append the NUL terminator.
pub fn encode<T: Serialize>(message: &T) -> serde_json::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(message)?;
    bytes.push(0);
    Ok(bytes)
}

/// Decode one frame (without its NUL terminator).
pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> serde_json::Result<T> {
    serde_json::from_slice(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_round_trips_with_nul_terminator() {
        let call = Call {
            method: method::EXEC.to_owned(),
            parameters: Some(serde_json::json!({"argv": ["uname", "-r"]})),
        };
        let bytes = encode(&call).expect("encode");
        assert_eq!(bytes.last(), Some(&0));
        let back: Call = decode(&bytes[..bytes.len() - 1]).expect("decode");
        assert_eq!(back, call);
        let request: ExecRequest =
            serde_json::from_value(back.parameters.expect("parameters")).expect("request");
        assert_eq!(request.argv, ["uname", "-r"]);
        assert!(request.env.is_empty());
    }

    #[test]
    fn fields_are_camel_case_on_the_wire() {
        let reply = ExecReply {
            exit_code: 3,
            timed_out: true,
            ..ExecReply::default()
        };
        let json = serde_json::to_value(&reply).expect("json");
        assert_eq!(json["exitCode"], 3);
        assert_eq!(json["timedOut"], true);
    }

    #[test]
    fn configure_network_wire_form() {
        let req: ConfigureNetworkRequest = serde_json::from_value(serde_json::json!({
            "interfaces": [{"mac": "02:00:00:00:00:0b", "previousMac": "02:00:00:00:00:0a",
                            "address": "10.77.0.5", "prefixLength": 24, "mtu": 1400}],
            "gateway": "10.77.0.1",
            "dns": ["10.77.0.1"]
        }))
        .expect("request");
        assert_eq!(
            req.interfaces[0].previous_mac.as_deref(),
            Some("02:00:00:00:00:0a")
        );
        assert_eq!(req.interfaces[0].prefix_length, Some(24));
        let minimal: ConfigureNetworkRequest =
            serde_json::from_value(serde_json::json!({"interfaces": []})).expect("minimal");
        assert_eq!(minimal.dns, None);
        assert_eq!(minimal.gateway, None);
    }
}
