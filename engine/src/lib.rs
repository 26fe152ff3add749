//! Kiln's engine: everything kilnd does to VMs, with no IPC in sight.
//!
//! The D-Bus and varlink adapters (and tests) talk to one [`Engine`] actor
//! through an [`EngineHandle`]: each call is one [`Command`] with a typed
//! reply. The actor task owns every VM record; slow work (spawning QEMU,
//! waiting for the guest agent, stopping) runs in sub-tasks that report back
//! as internal events, so the actor never blocks.
//!
//! Module map (see `docs/architecture.md`):
//! - [`spec`]: what a caller may ask for, and its limits;
//! - [`state`]: the VM state machine and its one transition check;
//! - [`qemu`]: typed QEMU argv, the QMP client, process handling;
//! - [`agent`]: the `io.kiln.Agent` client;
//! - [`store`]: crash-safe records on disk;
//! - [`engine`]: the actor, its command enum and reconciliation.

pub mod accel;
pub mod agent;
pub mod config;
pub mod engine;
pub mod error;
pub mod ids;
pub mod pool;
pub mod process;
pub mod qemu;
pub mod spec;
pub mod state;
pub mod store;
pub mod template;
pub mod vm;

pub use accel::Accel;
pub use config::EngineConfig;
pub use engine::{Command, Engine, EngineEvent, EngineHandle, GpuInfo};
pub use error::EngineError;
pub use pool::{PoolInfo, PoolMode, PoolSpec, PoolState};
pub use spec::VmSpec;
pub use state::VmState;
pub use vm::{NicInfo, VmInfo};
