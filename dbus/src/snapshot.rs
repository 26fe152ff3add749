//! Snapshots on D-Bus: one fixed tuple for `SnapshotInfo`.

use kiln_engine::snapshot::SnapshotInfo;

/// A snapshot on the wire, `(sssxuuxas)` spelled with unsigned times:
/// name, source VM id, source VM name, created at (µs), vCPUs, memory
/// (MiB), size on disk (bytes), container names.
pub type SnapshotTuple = (String, String, String, u64, u32, u32, u64, Vec<String>);

/// `info` as a [`SnapshotTuple`].
pub fn snapshot_tuple(info: &SnapshotInfo) -> SnapshotTuple {
    (
        info.name.clone(),
        info.source_id.clone(),
        info.source_name.clone(),
        info.created_at,
        info.vcpus,
        info.memory_mib,
        info.size_bytes,
        info.containers.clone(),
    )
}
