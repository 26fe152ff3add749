//! The exported VM and pool objects follow the engine: one task turns
//! engine events into objects added (InterfacesAdded), updated
//! (PropertiesChanged) and removed (InterfacesRemoved). The object server is
//! the registry; the task only remembers what it exported, to drop leftovers
//! after it lagged.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kiln_engine::{EngineEvent, EngineHandle, GpuInfo, PoolInfo, VmInfo};
use tokio::sync::{broadcast, watch};
use tracing::{debug, warn};
use zbus::fdo::Properties;
use zbus::names::InterfaceName;
use zbus::object_server::Interface;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::ObjectServer;

use crate::auth::Authorizer;
use crate::gpu::Gpu;
use crate::pool::Pool;
use crate::vm::Vm;
use crate::VM_PATH_PREFIX;

/// `/io/kiln/Kiln1/vm/<id>` (ids are lowercase hex: valid path elements).
pub fn vm_path(id: &str) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
    OwnedObjectPath::try_from(format!("{VM_PATH_PREFIX}/{id}"))
}

/// What objects need to serve methods.
#[derive(Debug, Clone)]
pub struct Context {
    /// The engine.
    pub engine: EngineHandle,
    /// The authorization policy.
    pub auth: Authorizer,
}

/// An object that mirrors one engine value (a VM, a pool): its properties
/// read a view that only the event task writes.
pub trait Mirror: Interface + Sized {
    /// The engine value.
    type Info: Clone + Send + Sync + 'static;
    /// Interface name, for PropertiesChanged.
    const INTERFACE: &'static str;
    /// A new object showing `info`.
    fn new_object(info: Self::Info, context: &Context) -> Self;
    /// The view the event task updates.
    fn view(&self) -> Arc<watch::Sender<Self::Info>>;
    /// Where the object lives.
    fn path(info: &Self::Info) -> Result<OwnedObjectPath, zbus::zvariant::Error>;
    /// Every property as (D-Bus name, value), for PropertiesChanged diffs.
    fn properties(info: &Self::Info) -> Vec<(&'static str, Value<'static>)>;
}

/// The wire spelling of an engine enum (`template`, `building-template`,
/// `virtio-gpu`, …), as varlink shows it.
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
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
pub async fn upsert<T: Mirror>(
    server: &ObjectServer,
    context: &Context,
    info: T::Info,
    missing: Missing,
) -> zbus::Result<()> {
    let path = T::path(&info)?;
    match server.interface::<_, T>(&path).await {
        Ok(iface) => {
            let view = iface.get().await.view();
            let old = view.send_replace(info);
            let new = T::properties(&view.borrow());
            let old = T::properties(&old);
            let changed: HashMap<&str, Value<'_>> = new
                .into_iter()
                .zip(old)
                .filter(|((_, n), (_, o))| n != o)
                .map(|((name, n), _)| (name, n))
                .collect();
            if !changed.is_empty() {
                Properties::properties_changed(
                    iface.signal_emitter(),
                    InterfaceName::from_static_str_unchecked(T::INTERFACE),
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
                .at(&path, T::new_object(info, context))
                .await
                .map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Remove an object if it is exported.
pub async fn unexport<T: Mirror>(server: &ObjectServer, path: OwnedObjectPath) {
    match server.remove::<T, _>(&path).await {
        Ok(_) | Err(zbus::Error::InterfaceNotFound) => {}
        Err(e) => warn!(path = %path, error = %e, "dbus: cannot remove object"),
    }
}

/// Remove a VM's object if it is exported.
pub async fn unexport_vm(server: &ObjectServer, id: &str) {
    if let Ok(path) = vm_path(id) {
        unexport::<Vm>(server, path).await;
    }
}

/// Remove a pool's object if it is exported.
pub async fn unexport_pool(server: &ObjectServer, name: &str) {
    if let Ok(path) = crate::pool::pool_path(name) {
        unexport::<Pool>(server, path).await;
    }
}

/// What the event task exported, to drop leftovers after a lag.
#[derive(Debug, Default)]
pub struct Exported {
    vms: HashSet<String>,
    pools: HashSet<String>,
    gpus: HashSet<String>,
}

/// Export every VM and pool the engine has and drop objects of those it no
/// longer has.
pub async fn resync(server: &ObjectServer, context: &Context, exported: &mut Exported) {
    match context.engine.list_vms().await {
        Ok(vms) => {
            let live: HashSet<String> = vms.iter().map(|vm| vm.id.clone()).collect();
            for id in exported.vms.difference(&live) {
                unexport_vm(server, id).await;
            }
            for vm in vms {
                let id = vm.id.clone();
                if let Err(e) = upsert::<Vm>(server, context, vm, Missing::Export).await {
                    warn!(vm = %id, error = %e, "dbus: cannot export VM");
                }
            }
            exported.vms = live;
        }
        Err(e) => warn!(error = %e.message(), "dbus: cannot list VMs"),
    }
    match context.engine.list_pools().await {
        Ok(pools) => {
            let live: HashSet<String> = pools.iter().map(|p| p.name.clone()).collect();
            for name in exported.pools.difference(&live) {
                unexport_pool(server, name).await;
            }
            for pool in pools {
                let name = pool.name.clone();
                if let Err(e) = upsert::<Pool>(server, context, pool, Missing::Export).await {
                    warn!(pool = %name, error = %e, "dbus: cannot export pool");
                }
            }
            exported.pools = live;
        }
        Err(e) => warn!(error = %e.message(), "dbus: cannot list pools"),
    }
    match context.engine.list_gpus().await {
        Ok(gpus) => sync_gpus(server, context, gpus, exported).await,
        Err(e) => warn!(error = %e.message(), "dbus: cannot list GPUs"),
    }
}

/// Make the GPU objects match `gpus` (the whole inventory).
async fn sync_gpus(
    server: &ObjectServer,
    context: &Context,
    gpus: Vec<GpuInfo>,
    exported: &mut Exported,
) {
    let live: HashSet<String> = gpus.iter().map(|g| g.node.name.clone()).collect();
    for name in exported.gpus.difference(&live) {
        if let Ok(path) = crate::gpu::gpu_path(name) {
            unexport::<Gpu>(server, path).await;
        }
    }
    for gpu in gpus {
        let name = gpu.node.name.clone();
        if let Err(e) = upsert::<Gpu>(server, context, gpu, Missing::Export).await {
            warn!(gpu = %name, error = %e, "dbus: cannot export GPU");
        }
    }
    exported.gpus = live;
}

/// Mirror the engine's VMs and pools on the bus until the engine goes
/// away. `events` must be subscribed before the initial listing so nothing
/// is missed.
pub async fn follow(
    server: ObjectServer,
    context: Context,
    mut events: broadcast::Receiver<EngineEvent>,
    mut exported: Exported,
) {
    loop {
        let result = match events.recv().await {
            Ok(EngineEvent::VmAdded { vm }) => {
                exported.vms.insert(vm.id.clone());
                update_vm(&server, &context, vm, Missing::Export).await
            }
            Ok(EngineEvent::VmChanged { vm }) => {
                update_vm(&server, &context, vm, Missing::Ignore).await
            }
            Ok(EngineEvent::VmRemoved { id }) => {
                exported.vms.remove(&id);
                unexport_vm(&server, &id).await;
                Ok(())
            }
            Ok(EngineEvent::PoolChanged { pool }) => {
                exported.pools.insert(pool.name.clone());
                update_pool(&server, &context, pool).await
            }
            Ok(EngineEvent::PoolRemoved { name }) => {
                exported.pools.remove(&name);
                unexport_pool(&server, &name).await;
                Ok(())
            }
            Ok(EngineEvent::GpusChanged { gpus }) => {
                sync_gpus(&server, &context, gpus, &mut exported).await;
                Ok(())
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(missed = n, "dbus: fell behind engine events; re-listing");
                resync(&server, &context, &mut exported).await;
                Ok(())
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Err((what, e)) = result {
            warn!(object = %what, error = %e, "dbus: cannot update object");
        }
    }
}

async fn update_vm(
    server: &ObjectServer,
    context: &Context,
    vm: VmInfo,
    missing: Missing,
) -> Result<(), (String, zbus::Error)> {
    let id = vm.id.clone();
    upsert::<Vm>(server, context, vm, missing)
        .await
        .map_err(|e| (id, e))
}

async fn update_pool(
    server: &ObjectServer,
    context: &Context,
    pool: PoolInfo,
) -> Result<(), (String, zbus::Error)> {
    let name = pool.name.clone();
    upsert::<Pool>(server, context, pool, Missing::Export)
        .await
        .map_err(|e| (name, e))
}
