//! Parameters of `io.kiln.Manager` methods, as the IDL declares them
//! (camelCase, unknown fields refused), and the engine calls they become.

use std::time::Duration;

use kiln_agent_proto::ExecRequest;
use std::collections::BTreeMap;

use kiln_engine::{PoolSpec, VmSpec};
use serde::Deserialize;

/// `{id}`: every per-VM method without other arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    pub id: String,
}

/// `CreateVM(name, spec?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: String,
    #[serde(default)]
    pub spec: Option<VmSpec>,
}

/// `StopVM(id, timeoutSec?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StopParams {
    pub id: String,
    #[serde(default)]
    pub timeout_sec: Option<u32>,
}

impl StopParams {
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_sec.map(|s| Duration::from_secs(u64::from(s)))
    }
}

/// `AttachNIC(id, address?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachNicParams {
    pub id: String,
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
}

/// `JoinNetns(id, netns, interface?, dns?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinNetnsParams {
    pub id: String,
    pub netns: String,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub dns: Option<Vec<String>>,
}

/// `DetachNIC(id, index)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachNicParams {
    pub id: String,
    pub index: u8,
}

/// `ExecVM(id, command, env?, stdin?, timeoutSec?, maxOutputBytes?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecParams {
    pub id: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_sec: Option<u32>,
    #[serde(default)]
    pub max_output_bytes: Option<u32>,
    #[serde(default)]
    pub container: Option<String>,
}

impl ExecParams {
    /// The VM id, the container (if any) and the request.
    pub fn into_request(self) -> (String, Option<String>, ExecRequest) {
        let request = ExecRequest {
            argv: self.command,
            env: self.env,
            stdin: self.stdin,
            timeout_ms: self.timeout_sec.map(|s| u64::from(s) * 1000),
            max_output_bytes: self.max_output_bytes,
        };
        (self.id, self.container, request)
    }
}

/// Methods without parameters accept `{}` and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `GetInterfaceDescription(interface)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceParams {
    pub interface: String,
}

/// `{name}`: pool methods without other arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

/// `CreatePool(name, spec)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolParams {
    pub name: String,
    pub spec: PoolSpec,
}

/// `ResizePool(name, warm, max?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizePoolParams {
    pub name: String,
    pub warm: u32,
    #[serde(default)]
    pub max: Option<u32>,
}

/// `Acquire(pool, timeoutMs?, labels?, ttlSec?, releaseOnDisconnect?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcquireParams {
    pub pool: String,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ttl_sec: Option<u64>,
    #[serde(default)]
    pub release_on_disconnect: bool,
    #[serde(default)]
    pub container: Option<kiln_engine::container::ContainerSpec>,
}

impl AcquireParams {
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

/// `Renew(id, ttlSec)`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewParams {
    pub id: String,
    pub ttl_sec: u64,
}

/// `Release(id, recycle?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseParams {
    pub id: String,
    #[serde(default)]
    pub recycle: bool,
}

/// `PullImage(reference)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImageParams {
    pub reference: String,
}

/// `ImportImage(path, reference?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImageParams {
    pub path: std::path::PathBuf,
    #[serde(default)]
    pub reference: Option<String>,
}

/// `ImportRootfs(layers, reference?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRootfsParams {
    pub layers: Vec<std::path::PathBuf>,
    #[serde(default)]
    pub reference: Option<String>,
}

/// `{image}`: a reference or digest (`DescribeImage`, `RemoveImage`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageParams {
    pub image: String,
}

/// `AddContainer(id, spec)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddContainerParams {
    pub id: String,
    pub spec: kiln_engine::container::ContainerSpec,
}

/// `{id, name}`: a VM's container (`RemoveContainer`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerParams {
    pub id: String,
    pub name: String,
}

/// `ContainerLogs(id, name, since?, maxBytes?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerLogsParams {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub since: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u32>,
}

/// `SnapshotVM(id, name, keepPaused?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotParams {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub keep_paused: bool,
}

/// `RestoreVM(snapshot, name?, sameIdentity?, into?)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestoreParams {
    pub snapshot: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub same_identity: bool,
    #[serde(default)]
    pub into: Option<String>,
}

/// `ForkVM(id, count)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkParams {
    pub id: String,
    pub count: u32,
}
