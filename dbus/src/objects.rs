//! The exported VM, pool and GPU objects follow the engine: one task turns
//! engine events into objects added (InterfacesAdded), updated
//! (PropertiesChanged) and removed (InterfacesRemoved). The object server is
//! the registry; the task only remembers what it exported, to drop leftovers
//! after it lagged. It imports the object modules; none of them imports it.

use std::collections::HashSet;

use kiln_engine::{EngineEvent, GpuInfo, PoolInfo, VmInfo};
use tokio::sync::broadcast;
use tracing::{debug, warn};
use zbus::ObjectServer;

use crate::gpu::Gpu;
use crate::manager::Manager;
use crate::mirror::{unexport, upsert, Context, Missing};
use crate::names::{gpu_path, vm_path, MANAGER_PATH};
use crate::pool::{unexport_pool, Pool};
use crate::vm::{unexport_vm, Vm};

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
        if let Ok(path) = gpu_path(name) {
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
            Ok(EngineEvent::LeaseExpired { id, holder, .. }) => {
                vm_signal(&server, &id, &holder, None).await
            }
            Ok(EngineEvent::Oom { id, limit_bytes }) => {
                vm_signal(&server, &id, "", Some(limit_bytes)).await
            }
            Ok(EngineEvent::ImageAdded { image }) => {
                image_signal(&server, &image.digest, Some(image.references.clone())).await
            }
            Ok(EngineEvent::ImageRemoved { digest }) => image_signal(&server, &digest, None).await,
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

/// A Manager signal about VM `id`: `LeaseExpired`, or `Oom` when
/// `oom_limit` (its memory cap) is given.
async fn vm_signal(
    server: &ObjectServer,
    id: &str,
    holder: &str,
    oom_limit: Option<u64>,
) -> Result<(), (String, zbus::Error)> {
    let failed = |e: zbus::Error| (id.to_owned(), e);
    let path = vm_path(id).map_err(|e| failed(e.into()))?;
    let manager = server
        .interface::<_, Manager>(MANAGER_PATH)
        .await
        .map_err(failed)?;
    let emitter = manager.signal_emitter();
    match oom_limit {
        Some(limit) => Manager::oom(emitter, path.as_ref(), limit).await,
        None => Manager::lease_expired(emitter, path.as_ref(), holder).await,
    }
    .map_err(failed)
}

/// The Manager's `ImageAdded` (with the references naming it) or
/// `ImageRemoved` signal.
async fn image_signal(
    server: &ObjectServer,
    digest: &str,
    added: Option<Vec<String>>,
) -> Result<(), (String, zbus::Error)> {
    let failed = |e: zbus::Error| (digest.to_owned(), e);
    let manager = server
        .interface::<_, Manager>(MANAGER_PATH)
        .await
        .map_err(failed)?;
    let emitter = manager.signal_emitter();
    match added {
        Some(references) => Manager::image_added(emitter, digest, references).await,
        None => Manager::image_removed(emitter, digest).await,
    }
    .map_err(failed)
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
