//! QEMU: the typed command line and the QMP client.

pub mod argv;
pub mod qmp;

pub use argv::{GuestMemory, HotplugIds, Machine, NicArgs, NicBackend, QemuLaunch, SCSI_BUS};
pub use qmp::{Qmp, QmpError, QmpEvent};
