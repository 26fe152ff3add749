//! `io.kiln.Kiln1.Manager` at `/io/kiln/Kiln1/Manager`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kiln_engine::error::ErrorName;
use kiln_engine::{EngineHandle, PoolInfo, PoolSpec, VmInfo};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue};
use zbus::{fdo, interface, Connection};

use crate::auth::Authorizer;
use crate::error::KilnError;
use crate::mirror::{upsert, Context, Missing};
use crate::names::{gpu_path, pool_path, vm_path};
use crate::pool::{unexport_pool, Pool};
use crate::spec;
use crate::vm::Vm;

/// The manager object: a handle and a policy, nothing else.
#[derive(Debug)]
pub struct Manager {
    engine: EngineHandle,
    auth: Authorizer,
}

impl Manager {
    /// A manager driving `engine`.
    pub fn new(engine: EngineHandle, auth: Authorizer) -> Self {
        Self { engine, auth }
    }

    fn context(&self) -> Context {
        Context {
            engine: self.engine.clone(),
            auth: self.auth.clone(),
        }
    }

    /// Export an object now, not only when the event task gets to it, so a
    /// returned path answers as soon as the caller has it.
    async fn export_vm(&self, conn: &Connection, vm: VmInfo) -> Result<OwnedObjectPath, KilnError> {
        let path = vm_path(&vm.id)?;
        upsert::<Vm>(conn.object_server(), &self.context(), vm, Missing::Export).await?;
        Ok(path)
    }

    async fn export_pool(
        &self,
        conn: &Connection,
        pool: PoolInfo,
    ) -> Result<OwnedObjectPath, KilnError> {
        let path = pool_path(&pool.name)?;
        upsert::<Pool>(conn.object_server(), &self.context(), pool, Missing::Export).await?;
        Ok(path)
    }
}

/// The id in a VM object path (`/io/kiln/Kiln1/vm/<id>`).
fn vm_id(path: &OwnedObjectPath) -> Result<&str, KilnError> {
    crate::names::vm_id(path.as_str()).ok_or_else(|| {
        KilnError::new(
            ErrorName::NoSuchVM,
            format!("{} is not a VM object path", path.as_str()),
        )
    })
}

/// `Acquire` options: `timeoutMs` and `ttlSec` (any integer type) and
/// `labels` (`a{ss}`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AcquireOptions {
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ttl_sec: Option<u64>,
    #[serde(default)]
    release_on_disconnect: bool,
}

#[interface(name = "io.kiln.Kiln1.Manager")]
impl Manager {
    /// Define a VM (not started). `spec` takes the VMSpec keys (`vcpus`,
    /// `memoryMiB`, `kernel`, `initrd`, `cmdline`, `accel`); unknown keys or
    /// wrong types are `InvalidSpec`. Returns the VM's object path.
    #[zbus(name = "CreateVM", out_args("vm"))]
    async fn create_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        spec: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, KilnError> {
        self.auth.check_manage(conn, &header, "CreateVM").await?;
        let spec = spec::vm_spec(&spec)?;
        let vm = self.engine.create_vm(&name, spec).await?;
        self.export_vm(conn, vm).await
    }

    /// Define a pool and start filling it. `spec` takes the PoolSpec keys
    /// (`mode`, `warm`, `max`, `refillConcurrency`, and `vm` as an `a{sv}`
    /// of VMSpec keys). Returns the pool's object path.
    #[zbus(name = "CreatePool", out_args("pool"))]
    async fn create_pool(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        spec: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, KilnError> {
        self.auth.check_manage(conn, &header, "CreatePool").await?;
        let spec: PoolSpec = spec::decode(&spec)?;
        let pool = self.engine.create_pool(&name, spec).await?;
        self.export_pool(conn, pool).await
    }

    /// Change how many VMs a pool keeps hot, and its cap (`max` 0 = keep).
    #[zbus(name = "ResizePool")]
    async fn resize_pool(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        warm: u32,
        max: u32,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "ResizePool").await?;
        let max = (max > 0).then_some(max);
        let pool = self.engine.resize_pool(&name, warm, max).await?;
        self.export_pool(conn, pool).await.map(drop)
    }

    /// Delete a pool; leased VMs stay with their holders until released.
    #[zbus(name = "DeletePool")]
    async fn delete_pool(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "DeletePool").await?;
        self.engine.delete_pool(&name).await?;
        unexport_pool(conn.object_server(), &name).await;
        Ok(())
    }

    /// Object paths of all pools.
    #[zbus(name = "ListPools", out_args("pools"))]
    async fn list_pools(&self) -> Result<Vec<OwnedObjectPath>, KilnError> {
        let pools = self.engine.list_pools().await?;
        pools
            .iter()
            .map(|p| pool_path(&p.name).map_err(KilnError::from))
            .collect()
    }

    /// Object paths of the host's GPU render nodes.
    #[zbus(name = "ListGPUs", out_args("gpus"))]
    async fn list_gpus(&self) -> Result<Vec<OwnedObjectPath>, KilnError> {
        let gpus = self.engine.list_gpus().await?;
        gpus.iter()
            .map(|g| gpu_path(&g.node.name).map_err(KilnError::from))
            .collect()
    }

    /// Lease the oldest hot VM of `pool` (waiting up to `timeoutMs` for one
    /// to boot). `options`: `timeoutMs` (integer), `labels` (`a{ss}`).
    /// Returns the VM's object path.
    #[zbus(name = "Acquire", out_args("vm"))]
    async fn acquire(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pool: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, KilnError> {
        self.auth.check_manage(conn, &header, "Acquire").await?;
        let options: AcquireOptions = spec::decode(&options).map_err(|e| {
            KilnError::new(
                ErrorName::InvalidArgument,
                format!("Acquire options: {}", e.message()),
            )
        })?;
        let caller = self.auth.caller(conn, &header).await;
        let options = kiln_engine::api::AcquireOptions {
            timeout: options.timeout_ms.map(Duration::from_millis),
            holder: caller.holder,
            uid: caller.uid,
            labels: options.labels,
            ttl: options.ttl_sec.map(Duration::from_secs),
            release_on: match (options.release_on_disconnect, caller.name) {
                (true, Some(name)) => Some(kiln_engine::api::Disconnect::BusName(name)),
                _ => None,
            },
        };
        let vm = self.engine.acquire(&pool, options).await?;
        self.export_vm(conn, vm).await
    }

    /// Give an acquired VM back: destroyed, or with `recycle` reset from
    /// the pool's template and put back hot.
    #[zbus(name = "Release")]
    async fn release(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        vm: OwnedObjectPath,
        recycle: bool,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Release").await?;
        self.engine.release(vm_id(&vm)?, recycle).await?;
        Ok(())
    }

    /// Object paths of all VMs.
    #[zbus(name = "ListVMs", out_args("vms"))]
    async fn list_vms(&self) -> Result<Vec<OwnedObjectPath>, KilnError> {
        let vms = self.engine.list_vms().await?;
        vms.iter()
            .map(|vm| vm_path(&vm.id).map_err(KilnError::from))
            .collect()
    }

    /// kilnd version.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> fdo::Result<String> {
        let status = self
            .engine
            .status()
            .await
            .map_err(|e| fdo::Error::Failed(e.message()))?;
        Ok(status.version)
    }

    /// Accelerator VMs get by default (`kvm` or `tcg`).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn accel(&self) -> fdo::Result<String> {
        let status = self
            .engine
            .status()
            .await
            .map_err(|e| fdo::Error::Failed(e.message()))?;
        Ok(status.accel.to_string())
    }

    /// A lease reached its deadline (`ttlSec`): the VM is being destroyed,
    /// or put back hot if its pool has `recycleOnExpiry`.
    #[zbus(signal)]
    pub async fn lease_expired(
        emitter: &SignalEmitter<'_>,
        vm: ObjectPath<'_>,
        holder: &str,
    ) -> zbus::Result<()>;
}
