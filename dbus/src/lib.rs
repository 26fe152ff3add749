//! Kiln's D-Bus adapter: `io.kiln.Kiln1` over zbus.
//!
//! Thin by design (STYLE.md 1): decode and validate, authorize the *caller*
//! (polkit `io.kiln.manage`, or root/owner on a private bus), send one
//! engine command, map the error with the one [`KilnError`] mapping.
//!
//! Objects (names fixed by DESIGN.md §1):
//! - `/io/kiln/Kiln1`: `org.freedesktop.DBus.ObjectManager`
//! - `/io/kiln/Kiln1/Manager`: `io.kiln.Kiln1.Manager`
//! - `/io/kiln/Kiln1/vm/<id>`: `io.kiln.Kiln1.VM`, added and removed as the
//!   engine reports VMs (InterfacesAdded/Removed), PropertiesChanged on
//!   every change;
//! - `/io/kiln/Kiln1/pool/<escaped name>`: `io.kiln.Kiln1.Pool`, the same
//!   way for pools;
//! - `/io/kiln/Kiln1/gpu/<name>`: `io.kiln.Kiln1.Gpu`, one per host render
//!   node, with its holders.
//!
//! Stored images are not objects: the Manager's `ListImages` and
//! `DescribeImage` return them as structs (`image`, which says why).
//!
//! One task mirrors engine events onto the object server; handlers hold no
//! locks across engine calls.
//!
//! Modules, each importing only those above it (no cycles; a unit test
//! checks): `names` (bus name, paths, interfaces), `error`, `auth`, `spec`,
//! `image` (images' wire structs), `mirror` (what the mirrored objects
//! share), the objects `vm`, `pool`, `gpu`, then `objects` (the event task)
//! and `manager`.
//!
//! The interfaces are committed as `dbus/io.kiln.Kiln1.*.xml`; a daemon test
//! compares them with what the live service introspects.

mod auth;
mod container;
mod error;
mod gpu;
mod holders;
mod image;
mod manager;
mod mirror;
mod names;
mod objects;
mod pool;
mod process;
mod snapshot;
mod spec;
mod vm;

use kiln_engine::EngineHandle;
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::info;
use zbus::{connection, fdo::ObjectManager, Connection};

pub use auth::{Authorizer, ACTION_MANAGE};
pub use error::KilnError;
pub use names::{
    BUS_NAME, ERROR_PREFIX, GPU_INTERFACE, GPU_PATH_PREFIX, MANAGER_INTERFACE, MANAGER_PATH,
    POOL_INTERFACE, POOL_PATH_PREFIX, ROOT_PATH, VM_INTERFACE, VM_PATH_PREFIX,
};

/// Which bus to serve on (`dbus` config key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    /// The system bus (production).
    System,
    /// The user's session bus.
    Session,
    /// A bus address, e.g. `unix:path=/tmp/bus.sock` (tests).
    Address(String),
}

impl Bus {
    /// The `dbus` config value: `system`, `session`, `none` (→ `None`) or
    /// an address.
    pub fn from_config(value: &str) -> Option<Self> {
        match value {
            "none" => None,
            "system" => Some(Self::System),
            "session" => Some(Self::Session),
            address => Some(Self::Address(address.to_owned())),
        }
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::System => f.write_str("system bus"),
            Self::Session => f.write_str("session bus"),
            Self::Address(a) => write!(f, "bus {a}"),
        }
    }
}

/// Adapter errors.
#[derive(Debug, Error)]
pub enum DbusError {
    /// The bus could not be reached.
    #[error("cannot connect to the {bus}")]
    Connect {
        /// Which bus.
        bus: Bus,
        /// Cause.
        #[source]
        source: zbus::Error,
    },
    /// The objects could not be exported.
    #[error("cannot export objects")]
    Export(#[source] zbus::Error),
    /// The well-known name could not be taken.
    #[error("cannot own {BUS_NAME}")]
    Name(#[source] zbus::Error),
    /// The bus connection closed: the bus went away or its socket failed.
    #[error("the D-Bus connection was lost")]
    ConnectionLost,
    /// The task mirroring engine events onto the bus ended: the engine went
    /// away.
    #[error("the D-Bus adapter stopped following the engine")]
    Stopped,
    /// The task mirroring engine events onto the bus panicked.
    #[error("the D-Bus adapter failed")]
    Failed(#[source] tokio::task::JoinError),
}

/// The running adapter. Dropping it disconnects from the bus.
#[derive(Debug)]
pub struct Service {
    connection: Connection,
    /// The task following engine events; `None` once it has ended.
    task: Option<JoinHandle<()>>,
    /// The task ending leases of callers that left the bus.
    holders: JoinHandle<()>,
}

impl Service {
    /// The bus connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Resolves with why the adapter stopped serving: the connection was
    /// lost ([`DbusError::ConnectionLost`]), or it stopped following the
    /// engine ([`DbusError::Stopped`], [`DbusError::Failed`]). Cancel-safe
    /// (it can wait in a `select!`); once the task has ended only a lost
    /// connection resolves it again.
    pub async fn finished(&mut self) -> DbusError {
        let follower = async {
            let Some(task) = self.task.as_mut() else {
                return std::future::pending().await;
            };
            let ended = task.await;
            self.task = None;
            match ended {
                Ok(()) => DbusError::Stopped,
                Err(e) => DbusError::Failed(e),
            }
        };
        tokio::select! {
            why = follower => why,
            () = self.connection.closed() => DbusError::ConnectionLost,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        self.holders.abort();
    }
}

/// Connect to `bus`, export the manager and every existing VM, then take
/// the name `io.kiln.Kiln1` (so a client that sees the name sees the VMs).
pub async fn serve(bus: Bus, engine: EngineHandle, auth: Authorizer) -> Result<Service, DbusError> {
    let connect = |source| DbusError::Connect {
        bus: bus.clone(),
        source,
    };
    let builder = match &bus {
        Bus::System => connection::Builder::system(),
        Bus::Session => connection::Builder::session(),
        Bus::Address(address) => connection::Builder::address(address.as_str()),
    }
    .map_err(connect)?;
    let connection = builder
        .serve_at(ROOT_PATH, ObjectManager)
        .and_then(|b| {
            b.serve_at(
                MANAGER_PATH,
                manager::Manager::new(engine.clone(), auth.clone()),
            )
        })
        .map_err(DbusError::Export)?
        .build()
        .await
        .map_err(connect)?;
    // Subscribe before listing so no change falls between the two.
    let events = engine.subscribe();
    let mut exported = objects::Exported::default();
    let server = connection.object_server().clone();
    let context = mirror::Context { engine, auth };
    objects::resync(&server, &context, &mut exported).await;
    connection
        .request_name(BUS_NAME)
        .await
        .map_err(DbusError::Name)?;
    info!(bus = %bus, name = BUS_NAME, "dbus: serving");
    let holders = tokio::spawn(holders::follow(connection.clone(), context.engine.clone()));
    let task = tokio::spawn(objects::follow(server, context, events, exported));
    Ok(Service {
        connection,
        task: Some(task),
        holders,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::time::Duration;

    use kiln_testkit::{PrivateBus, Sandbox};
    use tokio::time::timeout;
    use zbus::object_server::Interface;

    use super::*;

    /// What `text` names after each `crate::`: the first path element,
    /// also inside `crate::{a, b::c}` groups.
    fn crate_references(text: &str) -> BTreeSet<String> {
        let ident = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let mut found = BTreeSet::new();
        for after in text.split("crate::").skip(1) {
            if let Some(group) = after.strip_prefix('{') {
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(ident(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                found.insert(ident(&item));
            } else {
                found.insert(ident(after));
            }
        }
        found.remove("");
        found
    }

    /// STYLE.md 14: the modules import each other along a DAG, and none
    /// reaches back into the crate root (which declares and uses them all).
    #[test]
    fn modules_import_each_other_without_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let module = path.file_stem().unwrap().to_string_lossy().into_owned();
            if module != "lib" && path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                imports.insert(module, crate_references(&text));
            }
        }
        assert!(imports.len() >= 10, "{imports:?}");
        for (module, uses) in &imports {
            for used in uses {
                assert!(
                    imports.contains_key(used),
                    "{module}.rs uses crate::{used}, an item of the crate root: move it to a leaf module"
                );
            }
        }
        // Kahn: repeatedly drop modules whose imports are all dropped.
        let mut left = imports.clone();
        while !left.is_empty() {
            let free: Vec<String> = left
                .iter()
                .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
                .map(|(m, _)| m.clone())
                .collect();
            assert!(!free.is_empty(), "import cycle among {left:?}");
            for module in free {
                left.remove(&module);
            }
        }
    }

    #[test]
    fn references_are_read_from_paths_groups_and_docs() {
        let refs = crate_references(
            "use crate::a::X;\nuse crate::{b::{C, D}, c};\n/// [`crate::d`]\nfn f() { crate::e::g() }",
        );
        assert_eq!(
            refs.into_iter().collect::<Vec<_>>(),
            ["a", "b", "c", "d", "e"]
        );
    }

    /// A service on `bus` whose engine-following task is `task`.
    async fn service_on(bus: &PrivateBus, task: JoinHandle<()>) -> Service {
        let connection = connection::Builder::address(bus.address())
            .unwrap()
            .build()
            .await
            .unwrap();
        Service {
            connection,
            task: Some(task),
            holders: tokio::spawn(std::future::pending()),
        }
    }

    #[tokio::test]
    async fn finished_says_the_connection_was_lost() {
        let sandbox = Sandbox::new();
        let mut bus = PrivateBus::start(sandbox.path());
        let mut service = service_on(&bus, tokio::spawn(std::future::pending())).await;
        // Pacing, not a wait for a condition: nothing has ended, so
        // `finished` must still be pending after any time at all.
        let early = timeout(Duration::from_millis(50), service.finished()).await;
        assert!(early.is_err(), "finished while serving: {early:?}");
        bus.kill();
        let why = timeout(Duration::from_secs(10), service.finished())
            .await
            .expect("finished once the bus is gone");
        assert!(matches!(why, DbusError::ConnectionLost), "{why:?}");
        assert_eq!(why.to_string(), "the D-Bus connection was lost");
    }

    #[tokio::test]
    async fn finished_says_the_engine_follower_ended() {
        let sandbox = Sandbox::new();
        let bus = PrivateBus::start(sandbox.path());
        let mut stopped = service_on(&bus, tokio::spawn(async {})).await;
        let why = stopped.finished().await;
        assert!(matches!(why, DbusError::Stopped), "{why:?}");

        let mut failed = service_on(&bus, tokio::spawn(async { panic!("mirror failed") })).await;
        let why = failed.finished().await;
        assert!(matches!(why, DbusError::Failed(_)), "{why:?}");
        // The task is gone but the connection serves: no answer again.
        let again = timeout(Duration::from_millis(50), failed.finished()).await;
        assert!(again.is_err(), "{again:?}");
    }

    #[test]
    fn interface_names_match_the_served_interfaces() {
        assert_eq!(manager::Manager::name().as_str(), MANAGER_INTERFACE);
        assert_eq!(vm::Vm::name().as_str(), VM_INTERFACE);
        assert_eq!(pool::Pool::name().as_str(), POOL_INTERFACE);
        assert_eq!(gpu::Gpu::name().as_str(), GPU_INTERFACE);
    }
}
