//! The VM state machine.
//!
//! ```text
//!   created ──start──▶ booting ──agent ready──▶ ready ──acquire──▶ leased
//!                        ▲  │                    │ ▲                 │
//!            reboot/reset│  │                 pause resume           │
//!                        │  ▼                    ▼ │                 │
//!   stopped ◀──exit── stopping ◀──stop──── paused ◀──────────────────┘
//!      │                                     (any running state ──crash──▶ failed)
//!      └──start──▶ booting                   failed ──start──▶ booting
//! ```
//!
//! A VM that holds a lease comes back from pause, reboot or reset as
//! `leased`, never `ready` (`booting → leased`, `paused → leased`).
//!
//! [`VmState::check_transition`] is the only place that decides whether a
//! change is allowed. Every state write goes through `VmRecord::set_state`,
//! which asks it (and keeps a leased VM out of `ready`), called only by the
//! actor's one writer (`Engine::transition`); a test walks the whole table.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started: no process.
    Created,
    /// QEMU is running; the guest agent has not answered yet.
    Booting,
    /// The guest agent answers; the VM is idle (or in a pool, hot).
    Ready,
    /// Handed out from a pool to a holder.
    Leased,
    /// vCPUs stopped (QMP `stop`).
    Paused,
    /// A stop is in progress (agent shutdown, then ACPI, then kill).
    Stopping,
    /// No process; can be started again.
    Stopped,
    /// QEMU died unexpectedly or never came up; no process.
    Failed,
}

/// Every state, for tables and tests.
pub const ALL_STATES: [VmState; 8] = [
    VmState::Created,
    VmState::Booting,
    VmState::Ready,
    VmState::Leased,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Failed,
];

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// Current state.
    pub from: VmState,
    /// Requested state.
    pub to: VmState,
}

impl VmState {
    /// Check that moving from `self` to `to` is allowed.
    pub fn check_transition(self, to: VmState) -> Result<(), InvalidTransition> {
        use VmState::*;
        let allowed = match (self, to) {
            // Start (again).
            (Created | Stopped | Failed, Booting) => true,
            // Boot outcome (`leased` again for a leased VM that rebooted), or
            // a guest/QMP reset sending a running VM back to boot.
            (Booting, Ready | Leased) => true,
            (Ready | Leased | Paused, Booting) => true,
            // Pool hand-out and give-back.
            (Ready, Leased) | (Leased, Ready) => true,
            // Pause and resume; a paused VM remembers whether it was leased.
            (Ready | Leased, Paused) | (Paused, Ready | Leased) => true,
            // Stop: graceful via Stopping, or straight to Stopped (kill, guest
            // powered itself off).
            (Booting | Ready | Leased | Paused, Stopping) => true,
            (Booting | Ready | Leased | Paused | Stopping, Stopped) => true,
            // Crash of any running VM; a boot that never came up.
            (Booting | Ready | Leased | Paused | Stopping, Failed) => true,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }

    /// Whether a QEMU process is expected to exist in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Booting | Self::Ready | Self::Leased | Self::Paused | Self::Stopping
        )
    }

    /// Whether the guest agent is expected to answer (exec allowed).
    pub fn guest_answers(self) -> bool {
        matches!(self, Self::Ready | Self::Leased)
    }

    /// Lowercase name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Booting => "booting",
            Self::Ready => "ready",
            Self::Leased => "leased",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::*;
    use super::*;

    /// The whole table, written out: a change here must be a deliberate
    /// edit of this list.
    const ALLOWED: &[(VmState, VmState)] = &[
        (Created, Booting),
        (Stopped, Booting),
        (Failed, Booting),
        (Booting, Ready),
        (Booting, Leased),
        (Booting, Stopping),
        (Booting, Stopped),
        (Booting, Failed),
        (Ready, Booting),
        (Ready, Leased),
        (Ready, Paused),
        (Ready, Stopping),
        (Ready, Stopped),
        (Ready, Failed),
        (Leased, Booting),
        (Leased, Ready),
        (Leased, Paused),
        (Leased, Stopping),
        (Leased, Stopped),
        (Leased, Failed),
        (Paused, Booting),
        (Paused, Ready),
        (Paused, Leased),
        (Paused, Stopping),
        (Paused, Stopped),
        (Paused, Failed),
        (Stopping, Stopped),
        (Stopping, Failed),
    ];

    #[test]
    fn transition_table_is_exactly_the_allowed_list() {
        for from in ALL_STATES {
            for to in ALL_STATES {
                let expected = ALLOWED.contains(&(from, to));
                let got = from.check_transition(to);
                assert_eq!(got.is_ok(), expected, "{from} -> {to}: got {got:?}");
                if let Err(e) = got {
                    assert_eq!(e, InvalidTransition { from, to });
                }
            }
        }
    }

    #[test]
    fn states_with_a_process_are_those_that_can_crash() {
        for state in ALL_STATES {
            assert_eq!(
                state.has_process(),
                state.check_transition(Failed).is_ok(),
                "{state}"
            );
        }
    }

    #[test]
    fn wire_names_match_serde() {
        for state in ALL_STATES {
            let json = serde_json::to_string(&state).expect("serialize");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }
}
