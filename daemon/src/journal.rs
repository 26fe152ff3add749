//! Lifecycle facts in the log, each kind with a stable `MESSAGE_ID`, so
//! that `journalctl MESSAGE_ID=…` finds every VM start, acquire, release
//! or failure (the table is in `docs/metrics.md`, "Journal").
//!
//! The ids were made once with `systemd-id128 new` and never change: a
//! new kind of fact gets a new id. Under systemd the journald layer writes
//! fields without a prefix (`main.rs`), so the `message_id` field becomes
//! `MESSAGE_ID=` and `vm`, `pool`, … become `VM=`, `POOL=`, ….

use tracing::{info, warn};

use crate::lifecycle::Fact;

/// A VM was defined.
pub const VM_CREATED: &str = "d0ebb79b4cae4a05b863b83ba8eec977";
/// A VM's guest answered after a boot or a clone.
pub const VM_STARTED: &str = "3a98116d83a542eb8a52f2fd9791453a";
/// A VM stopped.
pub const VM_STOPPED: &str = "146153db8f9d4a9e8580e58f0831bfc1";
/// A VM failed.
pub const VM_FAILED: &str = "35f461c4b1624e5894fb50652d013392";
/// A VM was deleted.
pub const VM_DELETED: &str = "0f7e66d9b3f448b5a1cdfda6df6e9e0d";
/// A pool VM was leased.
pub const VM_ACQUIRED: &str = "66c8929c53874a5f8e8cc6967d194872";
/// A lease ended (release, holder gone, VM deleted).
pub const VM_RELEASED: &str = "4d26ab76111e4662beab6f2989bf0f87";
/// A lease reached its deadline.
pub const LEASE_EXPIRED: &str = "9e978daf5e4c47f6941859d2f3de9055";
/// A VM's QEMU was OOM-killed at its memory cap.
pub const VM_OOM_KILLED: &str = "21bc93c50a5143268e6f4f37c6ff53fd";
/// A pool appeared.
pub const POOL_ADDED: &str = "d78d1eeb7a5e479299c4b52f9dc616e1";
/// A pool was deleted.
pub const POOL_REMOVED: &str = "650bd4c166bb4e52be21d85bb21dfff5";
/// A pool template was built.
pub const TEMPLATE_BUILT: &str = "c939c7496f814ebfa7db1e1b7a39b557";
/// A pool template build failed.
pub const TEMPLATE_FAILED: &str = "120c5dfc09ce40d6957104aea0d17bdb";
/// An image was stored (pulled or imported).
pub const IMAGE_STORED: &str = "2db32e83ccf644e48fbdfb35c0cc8f18";
/// An image was removed.
pub const IMAGE_REMOVED: &str = "3f1794a3e1b541359b4bca6b2d35cd46";

/// Every id with its constant's name (the tests check them and the
/// table in `docs/metrics.md`).
#[cfg(test)]
pub const ALL: &[(&str, &str)] = &[
    ("VM_CREATED", VM_CREATED),
    ("VM_STARTED", VM_STARTED),
    ("VM_STOPPED", VM_STOPPED),
    ("VM_FAILED", VM_FAILED),
    ("VM_DELETED", VM_DELETED),
    ("VM_ACQUIRED", VM_ACQUIRED),
    ("VM_RELEASED", VM_RELEASED),
    ("LEASE_EXPIRED", LEASE_EXPIRED),
    ("VM_OOM_KILLED", VM_OOM_KILLED),
    ("POOL_ADDED", POOL_ADDED),
    ("POOL_REMOVED", POOL_REMOVED),
    ("TEMPLATE_BUILT", TEMPLATE_BUILT),
    ("TEMPLATE_FAILED", TEMPLATE_FAILED),
    ("IMAGE_STORED", IMAGE_STORED),
    ("IMAGE_REMOVED", IMAGE_REMOVED),
];

/// The `MESSAGE_ID` of a fact's kind.
pub fn message_id(fact: &Fact) -> &'static str {
    match fact {
        Fact::VmCreated { .. } => VM_CREATED,
        Fact::VmStarted { .. } => VM_STARTED,
        Fact::VmStopped { .. } => VM_STOPPED,
        Fact::VmFailed { .. } => VM_FAILED,
        Fact::VmDeleted { .. } => VM_DELETED,
        Fact::VmAcquired { .. } => VM_ACQUIRED,
        Fact::VmReleased { .. } => VM_RELEASED,
        Fact::LeaseExpired { .. } => LEASE_EXPIRED,
        Fact::VmOomKilled { .. } => VM_OOM_KILLED,
        Fact::PoolAdded { .. } => POOL_ADDED,
        Fact::PoolRemoved { .. } => POOL_REMOVED,
        Fact::TemplateBuilt { .. } => TEMPLATE_BUILT,
        Fact::TemplateFailed { .. } => TEMPLATE_FAILED,
        Fact::ImageStored { .. } => IMAGE_STORED,
        Fact::ImageRemoved { .. } => IMAGE_REMOVED,
    }
}

/// One journal entry: its message and the fields a fact has (`None`:
/// left out of the entry).
#[derive(Debug, Default, PartialEq, Eq)]
struct Entry<'a> {
    message: &'static str,
    /// A failure: logged as a warning.
    failure: bool,
    vm: Option<&'a str>,
    name: Option<&'a str>,
    pool: Option<&'a str>,
    holder: Option<&'a str>,
    error: Option<&'a str>,
    boot_ms: Option<u64>,
    cloned: Option<bool>,
    build_ms: Option<u64>,
    limit_bytes: Option<u64>,
    digest: Option<&'a str>,
    references: Option<String>,
}

impl<'a> Entry<'a> {
    fn of(fact: &'a Fact) -> Self {
        let vm = |message, vm: &'a str, name: &'a str, pool: &'a Option<String>| Entry {
            message,
            vm: Some(vm),
            name: Some(name),
            pool: pool.as_deref(),
            ..Entry::default()
        };
        let pool = |message, pool: &'a str| Entry {
            message,
            pool: Some(pool),
            ..Entry::default()
        };
        match fact {
            Fact::VmCreated { vm: id, name, pool } => vm("VM created", id, name, pool),
            Fact::VmStarted {
                vm: id,
                name,
                pool,
                took,
                cloned,
            } => Entry {
                boot_ms: Some(took.as_millis() as u64),
                cloned: Some(*cloned),
                ..vm("VM started", id, name, pool)
            },
            Fact::VmStopped { vm: id, name, pool } => vm("VM stopped", id, name, pool),
            Fact::VmFailed {
                vm: id,
                name,
                pool,
                error,
            } => Entry {
                failure: true,
                error: error.as_deref(),
                ..vm("VM failed", id, name, pool)
            },
            Fact::VmDeleted { vm: id, name, pool } => vm("VM deleted", id, name, pool),
            Fact::VmAcquired {
                vm: id,
                name,
                pool,
                holder,
            }
            | Fact::VmReleased {
                vm: id,
                name,
                pool,
                holder,
            } => {
                let message = match fact {
                    Fact::VmAcquired { .. } => "VM acquired",
                    _ => "VM released",
                };
                Entry {
                    holder: Some(holder),
                    ..vm(message, id, name, pool)
                }
            }
            Fact::LeaseExpired {
                vm: id,
                pool,
                holder,
            } => Entry {
                message: "lease expired",
                vm: Some(id),
                pool: pool.as_deref(),
                holder: Some(holder),
                ..Entry::default()
            },
            Fact::VmOomKilled {
                vm: id,
                pool,
                limit_bytes,
            } => Entry {
                message: "VM OOM-killed at its memory cap",
                failure: true,
                vm: Some(id),
                pool: pool.as_deref(),
                limit_bytes: Some(*limit_bytes),
                ..Entry::default()
            },
            Fact::PoolAdded { pool: p } => pool("pool added", p),
            Fact::PoolRemoved { pool: p } => pool("pool removed", p),
            Fact::TemplateBuilt { pool: p, took } => Entry {
                build_ms: took.map(|t| t.as_millis() as u64),
                ..pool("pool template built", p)
            },
            Fact::TemplateFailed { pool: p, error } => Entry {
                failure: true,
                error: error.as_deref(),
                ..pool("pool template build failed", p)
            },
            Fact::ImageStored { digest, references } => Entry {
                message: "image stored",
                digest: Some(digest),
                references: Some(references.join(" ")),
                ..Entry::default()
            },
            Fact::ImageRemoved { digest } => Entry {
                message: "image removed",
                digest: Some(digest),
                ..Entry::default()
            },
        }
    }
}

/// Log `fact`: failures as warnings, the rest as info.
pub fn log(fact: &Fact) {
    let message_id = message_id(fact);
    let e = Entry::of(fact);
    // One field list for both levels (a tracing level must be constant).
    macro_rules! entry {
        ($level:ident) => {
            $level!(
                message_id,
                vm = e.vm,
                name = e.name,
                pool = e.pool,
                holder = e.holder,
                error = e.error,
                boot_ms = e.boot_ms,
                cloned = e.cloned,
                build_ms = e.build_ms,
                limit_bytes = e.limit_bytes,
                digest = e.digest,
                references = e.references,
                "{}",
                e.message
            )
        };
    }
    if e.failure {
        entry!(warn);
    } else {
        entry!(info);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// 128-bit ids as journald wants them: 32 lowercase hex digits, no
    /// dashes; UUID version 4 like `systemd-id128 new` makes; all distinct.
    #[test]
    fn message_ids_are_well_formed_and_unique() {
        let mut seen = HashSet::new();
        for (name, id) in ALL {
            assert_eq!(id.len(), 32, "{name}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{name}: {id}"
            );
            assert_eq!(&id[12..13], "4", "{name}: not a version 4 id");
            assert!("89ab".contains(&id[16..17]), "{name}: not a variant 1 id");
            assert!(seen.insert(*id), "{name}: {id} used twice");
        }
    }

    /// The table in docs/metrics.md shows every id by its constant's name.
    #[test]
    fn the_docs_list_every_id() {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
                .expect("docs/metrics.md");
        for (name, id) in ALL {
            let row = format!("| `{id}` | `{name}` |");
            assert!(docs.contains(&row), "docs/metrics.md has no row {row}");
        }
    }

    #[test]
    fn entries_carry_the_facts_fields_and_failures_warn() {
        let started = Fact::VmStarted {
            vm: "a1".into(),
            name: "web-a1".into(),
            pool: Some("web".into()),
            took: std::time::Duration::from_millis(180),
            cloned: true,
        };
        assert_eq!(
            Entry::of(&started),
            Entry {
                message: "VM started",
                vm: Some("a1"),
                name: Some("web-a1"),
                pool: Some("web"),
                boot_ms: Some(180),
                cloned: Some(true),
                ..Entry::default()
            }
        );
        let failed = Fact::VmFailed {
            vm: "a1".into(),
            name: "n".into(),
            pool: None,
            error: Some("QEMU exited".into()),
        };
        let entry = Entry::of(&failed);
        assert!(entry.failure && entry.pool.is_none());
        assert_eq!(entry.error, Some("QEMU exited"));
    }

    /// Every kind of fact has its id in `ALL` (the table the docs show).
    #[test]
    fn every_fact_has_a_listed_id() {
        let facts = [
            Fact::VmCreated {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
            },
            Fact::VmStarted {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
                took: std::time::Duration::ZERO,
                cloned: false,
            },
            Fact::VmStopped {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
            },
            Fact::VmFailed {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
                error: None,
            },
            Fact::VmDeleted {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
            },
            Fact::VmAcquired {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
                holder: "h".into(),
            },
            Fact::VmReleased {
                vm: "a".into(),
                name: "n".into(),
                pool: None,
                holder: "h".into(),
            },
            Fact::LeaseExpired {
                vm: "a".into(),
                pool: None,
                holder: "h".into(),
            },
            Fact::VmOomKilled {
                vm: "a".into(),
                pool: None,
                limit_bytes: 1,
            },
            Fact::PoolAdded { pool: "p".into() },
            Fact::PoolRemoved { pool: "p".into() },
            Fact::TemplateBuilt {
                pool: "p".into(),
                took: None,
            },
            Fact::TemplateFailed {
                pool: "p".into(),
                error: None,
            },
            Fact::ImageStored {
                digest: "d".into(),
                references: Vec::new(),
            },
            Fact::ImageRemoved { digest: "d".into() },
        ];
        let ids: HashSet<&str> = facts.iter().map(message_id).collect();
        assert_eq!(ids.len(), ALL.len());
        assert!(ALL.iter().all(|(_, id)| ids.contains(id)));
    }
}
