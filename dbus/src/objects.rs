//! The exported VM objects follow the engine: one task turns engine events
//! into objects added (InterfacesAdded), updated (PropertiesChanged) and
//! removed (InterfacesRemoved). The object server is the registry; the task
//! only remembers which ids it exported, to drop leftovers after it lagged.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use kiln_engine::{EngineEvent, EngineHandle, VmInfo};
use tokio::sync::broadcast;
use tracing::{debug, warn};
use zbus::fdo::Properties;
use zbus::names::InterfaceName;
use zbus::zvariant::OwnedObjectPath;
use zbus::ObjectServer;

use crate::auth::Authorizer;
use crate::vm::{properties, Vm, VM_INTERFACE};
use crate::VM_PATH_PREFIX;

/// `/io/kiln/Kiln1/vm/<id>` (ids are lowercase hex: valid path elements).
pub fn vm_path(id: &str) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
    OwnedObjectPath::try_from(format!("{VM_PATH_PREFIX}/{id}"))
}

/// Whether [`upsert`] may create a missing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Export it (a VM that was just created, or listed).
    Export,
    /// Leave it missing: a change event can be older than a `Delete` that
    /// already removed the object, which must not come back.
    Ignore,
}

/// Update the view of `info`'s object (emitting PropertiesChanged for what
/// differs) or export it.
pub async fn upsert(
    server: &ObjectServer,
    engine: &EngineHandle,
    auth: Authorizer,
    info: VmInfo,
    missing: Missing,
) -> zbus::Result<()> {
    let path = vm_path(&info.id)?;
    match server.interface::<_, Vm>(&path).await {
        Ok(iface) => {
            let view = iface.get().await.view();
            let old = view.send_replace(info);
            let new = properties(&view.borrow());
            let old = properties(&old);
            let changed: HashMap<&str, zbus::zvariant::Value<'_>> = new
                .into_iter()
                .zip(old)
                .filter(|((_, n), (_, o))| n != o)
                .map(|((name, n), _)| (name, n))
                .collect();
            if !changed.is_empty() {
                Properties::properties_changed(
                    iface.signal_emitter(),
                    InterfaceName::from_static_str_unchecked(VM_INTERFACE),
                    changed,
                    Cow::Borrowed(&[]),
                )
                .await?;
            }
            Ok(())
        }
        Err(zbus::Error::InterfaceNotFound) if missing == Missing::Ignore => Ok(()),
        Err(zbus::Error::InterfaceNotFound) => {
            // Ok(false) means another caller exported it in between:
            // nothing to do, the next event updates it.
            server
                .at(&path, Vm::new(info, engine.clone(), auth))
                .await
                .map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Remove a VM's object if it is exported.
pub async fn unexport(server: &ObjectServer, id: &str) {
    let Ok(path) = vm_path(id) else { return };
    match server.remove::<Vm, _>(&path).await {
        Ok(_) | Err(zbus::Error::InterfaceNotFound) => {}
        Err(e) => warn!(vm = id, error = %e, "dbus: cannot remove VM object"),
    }
}

/// Export every VM the engine has and drop objects of VMs it no longer has.
pub async fn resync(
    server: &ObjectServer,
    engine: &EngineHandle,
    auth: Authorizer,
    known: &mut HashSet<String>,
) {
    let vms = match engine.list_vms().await {
        Ok(vms) => vms,
        Err(e) => return warn!(error = %e.message(), "dbus: cannot list VMs"),
    };
    let live: HashSet<String> = vms.iter().map(|vm| vm.id.clone()).collect();
    for id in known.difference(&live) {
        unexport(server, id).await;
    }
    for vm in vms {
        let id = vm.id.clone();
        if let Err(e) = upsert(server, engine, auth, vm, Missing::Export).await {
            warn!(vm = %id, error = %e, "dbus: cannot export VM");
        }
    }
    *known = live;
}

/// Mirror the engine's VMs on the bus until the engine goes away. `events`
/// must be subscribed before the initial listing so nothing is missed.
pub async fn follow(
    server: ObjectServer,
    engine: EngineHandle,
    auth: Authorizer,
    mut events: broadcast::Receiver<EngineEvent>,
    // Ids exported so far, only to know what to drop after a lag.
    mut known: HashSet<String>,
) {
    loop {
        let result = match events.recv().await {
            Ok(EngineEvent::VmAdded { vm }) => {
                let id = vm.id.clone();
                known.insert(id.clone());
                upsert(&server, &engine, auth, vm, Missing::Export)
                    .await
                    .map_err(|e| (id, e))
            }
            Ok(EngineEvent::VmChanged { vm }) => {
                let id = vm.id.clone();
                upsert(&server, &engine, auth, vm, Missing::Ignore)
                    .await
                    .map_err(|e| (id, e))
            }
            Ok(EngineEvent::VmRemoved { id }) => {
                known.remove(&id);
                unexport(&server, &id).await;
                Ok(())
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(missed = n, "dbus: fell behind engine events; re-listing");
                resync(&server, &engine, auth, &mut known).await;
                Ok(())
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Err((id, e)) = result {
            warn!(vm = %id, error = %e, "dbus: cannot update VM object");
        }
    }
}
