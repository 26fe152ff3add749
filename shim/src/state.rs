//! What the shim remembers: a process's exit (set once, awaited by `Wait`)
//! and the record each task leaves in its bundle, which the `delete`
//! action reads when the shim is gone.

use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The bundle record's file name.
const RECORD_FILE: &str = "kiln-shim.json";

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }
}

/// A process's exit, once known; the first one set stays.
#[derive(Debug, Default)]
pub struct ExitCell {
    exit: Mutex<Option<Exit>>,
    changed: Condvar,
}

impl ExitCell {
    /// Record `exit` unless one is recorded; whether this one was.
    pub fn set(&self, exit: Exit) -> bool {
        let mut slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return false;
        }
        *slot = Some(exit);
        self.changed.notify_all();
        true
    }

    pub fn get(&self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Block until the exit is known.
    pub fn wait(&self) -> Exit {
        let mut slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(exit) = *slot {
                return exit;
            }
            slot = self
                .changed
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a task holds in kilnd, written to its bundle at `Create`: enough
/// for the `delete` action to give it back after the shim died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleRecord {
    /// kilnd's varlink address.
    pub address: String,
    /// The pod's VM.
    pub vm: String,
    /// The QEMU process of the VM.
    pub qemu_pid: u32,
    /// `sandbox`, `container` or `standalone` (spec::Role).
    pub role: String,
    /// The Kiln container name (not for a sandbox).
    pub container: Option<String>,
    /// Release the VM with recycle.
    pub recycle: bool,
}

impl BundleRecord {
    /// Write it into `bundle` (a temp file renamed: never half written).
    pub fn write(&self, bundle: &Path) -> std::io::Result<()> {
        let temp = bundle.join(format!(".{RECORD_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, bundle.join(RECORD_FILE))
    }

    /// The record in `bundle`, if the task got that far.
    pub fn read(bundle: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(bundle.join(RECORD_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_exit_stays_and_wakes_waiters() {
        let cell = Arc::new(ExitCell::default());
        let waiter = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.wait().status)
        };
        assert!(cell.set(Exit::now(3)));
        assert!(!cell.set(Exit::now(137)));
        assert_eq!(waiter.join().unwrap(), 3);
        assert_eq!(cell.get().unwrap().status, 3);
    }

    #[test]
    fn bundle_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(BundleRecord::read(dir.path()).unwrap(), None);
        let record = BundleRecord {
            address: "unix:/run/kiln/io.kiln.Manager".into(),
            vm: "0123456789ab".into(),
            qemu_pid: 42,
            role: "standalone".into(),
            container: Some("t1".into()),
            recycle: false,
        };
        record.write(dir.path()).unwrap();
        assert_eq!(BundleRecord::read(dir.path()).unwrap(), Some(record));
    }
}
