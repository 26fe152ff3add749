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
//! One task mirrors engine events onto the object server; handlers hold no
//! locks across engine calls.
//!
//! The interfaces are committed as `dbus/io.kiln.Kiln1.*.xml`; a daemon test
//! compares them with what the live service introspects.

mod auth;
mod error;
mod gpu;
mod manager;
mod objects;
mod pool;
mod spec;
mod vm;

use kiln_engine::EngineHandle;
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::info;
use zbus::{connection, fdo::ObjectManager, Connection};

pub use auth::{Authorizer, ACTION_MANAGE};
pub use error::KilnError;

/// Well-known bus name.
pub const BUS_NAME: &str = "io.kiln.Kiln1";
/// ObjectManager root.
pub const ROOT_PATH: &str = "/io/kiln/Kiln1";
/// The manager object.
pub const MANAGER_PATH: &str = "/io/kiln/Kiln1/Manager";
/// Parent of the VM objects.
pub const VM_PATH_PREFIX: &str = "/io/kiln/Kiln1/vm";
/// Manager interface name.
pub const MANAGER_INTERFACE: &str = "io.kiln.Kiln1.Manager";
pub use gpu::{GPU_INTERFACE, GPU_PATH_PREFIX};
pub use pool::{POOL_INTERFACE, POOL_PATH_PREFIX};
pub use vm::VM_INTERFACE;

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
}

/// The running adapter. Dropping it disconnects from the bus.
#[derive(Debug)]
pub struct Service {
    connection: Connection,
    task: JoinHandle<()>,
}

impl Service {
    /// The bus connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Resolves when the adapter stops following the engine (the engine
    /// went away).
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
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
        .and_then(|b| b.serve_at(MANAGER_PATH, manager::Manager::new(engine.clone(), auth)))
        .map_err(DbusError::Export)?
        .build()
        .await
        .map_err(connect)?;
    // Subscribe before listing so no change falls between the two.
    let events = engine.subscribe();
    let mut exported = objects::Exported::default();
    let server = connection.object_server().clone();
    let context = objects::Context { engine, auth };
    objects::resync(&server, &context, &mut exported).await;
    connection
        .request_name(BUS_NAME)
        .await
        .map_err(DbusError::Name)?;
    info!(bus = %bus, name = BUS_NAME, "dbus: serving");
    let task = tokio::spawn(objects::follow(server, context, events, exported));
    Ok(Service { connection, task })
}
