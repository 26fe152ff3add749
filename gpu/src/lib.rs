//! GPU render nodes for Kiln VMs: what the host has, who holds what, who
//! may open it, and how QEMU is told to use it (DESIGN.md §6, docs/gpu.md).
//!
//! The crate holds the building blocks; the engine owns the state and the
//! side effects' timing. Each piece is separately usable and tested:
//!
//! | module | job | side effects |
//! | --- | --- | --- |
//! | [`inventory`] | scan `<sysfs>/class/drm/renderD*` into [`RenderNode`]s | reads sysfs and `/dev` |
//! | [`watch`] | wake the engine when render nodes come, go or change | inotify |
//! | [`lease`] | [`LeaseTable`]: who holds which node, exclusive or shared | none (pure, serde); [`LeaseTable::save`]/[`LeaseTable::load`] optional |
//! | [`access`] | [`grant`]/[`revoke`] a uid's POSIX ACL entry on a node | `setxattr` on the node |
//! | [`qemu`] | the argv fragment of a GPU VM | none |
//!
//! How the engine is expected to drive it (one owner task, see
//! docs/gpu.md "Engine wiring"):
//!
//! 1. At start: `LeaseTable::load` (or its own store), `Inventory::scan`,
//!    `LeaseTable::reconcile(live VM ids, &inventory)`, [`revoke`] for the
//!    leases it dropped, [`grant`] again for every kept lease.
//! 2. On `CreateVM`/`StartVM` of a VM with GPUs: `acquire`, persist the
//!    table, `grant` the node to QEMU's uid, build the argv with
//!    [`qemu::qemu_args`] (q35 machine), launch.
//! 3. On stop/delete: `release`, persist, `revoke` (unless another lease on
//!    the node runs under the same uid).
//! 4. On every [`GpuWatcher`] wake-up: rescan, reconcile, re-`grant` (all
//!    idempotent: nothing is written when nothing changed).

pub mod access;
pub mod inventory;
pub mod lease;
pub mod qemu;
pub mod watch;

pub use access::{grant, granted_uids, revoke, AccessError, Granted, Revoked};
pub use inventory::{DevNum, Inventory, InventoryError, NodeFact, NodeProblem, PciId, RenderNode};
pub use lease::{
    DropReason, DroppedLease, GpuError, GpuLease, GpuRequest, LeaseMode, LeaseTable, NodeUsage,
};
pub use qemu::{qemu_args, GpuDevice, QemuGpuError, VirglOptions};
pub use watch::{GpuWatcher, WatchError};
