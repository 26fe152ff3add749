//! A VM as persisted ([`VmRecord`]) and as shown to callers ([`VmInfo`]).

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::spec::ResolvedSpec;
use crate::state::VmState;

/// Schema version of [`VmRecord`]; bumped on incompatible changes.
pub const RECORD_VERSION: u32 = 1;

/// Facts the guest agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    /// Agent version.
    pub agent_version: String,
    /// Guest kernel release.
    pub kernel_release: String,
    /// Guest boot id (changes on reboot).
    pub boot_id: String,
}

/// One VM's persisted record (`<state_dir>/vms/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Opaque id.
    pub id: String,
    /// Caller-chosen unique name.
    pub name: String,
    /// What it runs with.
    pub spec: ResolvedSpec,
    /// Lifecycle state.
    pub state: VmState,
    /// QEMU pid while a process exists.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Creation time (µs since epoch).
    pub created_at: u64,
    /// Last start (µs since epoch).
    #[serde(default)]
    pub started_at: Option<u64>,
    /// When the agent last became ready (µs since epoch).
    #[serde(default)]
    pub ready_at: Option<u64>,
    /// QEMU version of the running process.
    #[serde(default)]
    pub qemu_version: Option<String>,
    /// What the guest agent reported.
    #[serde(default)]
    pub guest: Option<GuestInfo>,
    /// Last failure, for operators.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A VM as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    /// Opaque id.
    pub id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
    /// Accelerator.
    pub accel: Accel,
    /// QEMU pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Creation time (µs since epoch).
    pub created_at: u64,
    /// Last start (µs since epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Last time the guest became ready (µs since epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<u64>,
    /// QEMU version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// Guest agent version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Guest kernel release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// Guest boot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<&VmRecord> for VmInfo {
    fn from(r: &VmRecord) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            state: r.state,
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            accel: r.spec.accel,
            pid: r.pid,
            created_at: r.created_at,
            started_at: r.started_at,
            ready_at: r.ready_at,
            qemu_version: r.qemu_version.clone(),
            agent_version: r.guest.as_ref().map(|g| g.agent_version.clone()),
            kernel_release: r.guest.as_ref().map(|g| g.kernel_release.clone()),
            boot_id: r.guest.as_ref().map(|g| g.boot_id.clone()),
            last_error: r.last_error.clone(),
        }
    }
}
