//! Leases bound to a bus name (`releaseOnDisconnect`): they end when the
//! name leaves the bus. A unique name outlives a kilnd restart, so at start
//! the names the engine still has leases for are checked once.

use futures_util::StreamExt;
use kiln_engine::api::Disconnect;
use kiln_engine::EngineHandle;
use tracing::{debug, warn};
use zbus::fdo::DBusProxy;
use zbus::names::BusName;
use zbus::Connection;

/// Follow `NameOwnerChanged` and tell the engine when a unique name goes.
/// Ends when the connection does.
pub async fn follow(connection: Connection, engine: EngineHandle) {
    let proxy = match DBusProxy::new(&connection).await {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "dbus: cannot follow bus names"),
    };
    // Subscribe first, so a name that goes during the check is not missed.
    let mut changes = match proxy.receive_name_owner_changed().await {
        Ok(s) => s,
        Err(e) => return warn!(error = %e, "dbus: cannot follow bus names"),
    };
    for name in engine.bound_bus_names().await.unwrap_or_default() {
        let Ok(bus_name) = BusName::try_from(name.as_str()) else {
            continue;
        };
        if !proxy.name_has_owner(bus_name).await.unwrap_or(true) {
            gone(&engine, name).await;
        }
    }
    while let Some(signal) = changes.next().await {
        let Ok(args) = signal.args() else {
            continue;
        };
        // Only unique names (":1.42") are holders; a lease is bound to one.
        if args.new_owner().is_none() && args.name().starts_with(':') {
            gone(&engine, args.name().to_string()).await;
        }
    }
}

async fn gone(engine: &EngineHandle, name: String) {
    match engine.disconnected(Disconnect::BusName(name.clone())).await {
        Ok(0) => {}
        Ok(ended) => debug!(name = %name, ended, "dbus: leases of a vanished caller ended"),
        Err(e) => {
            warn!(name = %name, error = %e.message(), "dbus: cannot end the leases of a vanished caller")
        }
    }
}
