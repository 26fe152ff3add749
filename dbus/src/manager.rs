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
use crate::image::{details, ImageSummary, LayerSummary, ProcessSummary};
use crate::mirror::{upsert, Context, Missing};
use crate::names::{gpu_path, pool_path, vm_path};
use crate::pool::{unexport_pool, Pool};
use crate::snapshot::{snapshot_tuple, SnapshotTuple};
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
    #[serde(default)]
    container: Option<kiln_engine::container::ContainerSpec>,
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
    /// to boot). `options`: `timeoutMs` (integer), `labels` (`a{ss}`),
    /// `ttlSec`, `releaseOnDisconnect`, `container` (an `a{sv}` as
    /// `AddContainer`'s: started before the reply).
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
            container: options.container,
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

    /// Pull an image from its registry into the store:
    /// `[registry/]repository[:tag|@sha256:digest]`. An image already
    /// stored is a cache hit. Returns its manifest digest once it is
    /// stored; `ImagePullProgress` signals report on the way.
    #[zbus(name = "PullImage", out_args("digest"))]
    async fn pull_image(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        reference: String,
    ) -> Result<String, KilnError> {
        self.auth.check_manage(conn, &header, "PullImage").await?;
        let mut job = self.engine.pull_image(&reference).await?;
        while let Some(p) = job.progress().await {
            let sent = Self::image_pull_progress(
                &emitter,
                &reference,
                p.done_bytes,
                p.total_bytes,
                p.layer,
                p.layers,
            )
            .await;
            if let Err(e) = sent {
                // A report, not the result: the pull goes on.
                tracing::debug!(error = %e, "dbus: cannot send ImagePullProgress");
            }
        }
        Ok(job.result().await?.digest)
    }

    /// Import an OCI layout directory, an OCI archive or a docker archive
    /// at the absolute `path` (which the caller must be able to read);
    /// `reference` (`""` = none) is recorded as its tag and picks the image
    /// when the source holds several. Returns its manifest digest.
    #[zbus(name = "ImportImage", out_args("digest"))]
    async fn import_image(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        path: String,
        reference: String,
    ) -> Result<String, KilnError> {
        self.auth.check_manage(conn, &header, "ImportImage").await?;
        let path = std::path::PathBuf::from(path);
        // A relative path is the engine's to refuse.
        if path.is_absolute() {
            self.auth.check_read(conn, &header, &path).await?;
        }
        let reference = (!reference.is_empty()).then_some(reference.as_str());
        let job = self.engine.import_image(&path, reference).await?;
        Ok(job.result().await?.digest)
    }

    /// Store the image made of the layer directories `layers` (absolute,
    /// lowest first: a containerd overlayfs snapshot's), each converted
    /// once; `reference` (`""` = none) is recorded as its tag. Root only.
    /// Returns its digest.
    #[zbus(name = "ImportRootfs", out_args("digest"))]
    async fn import_rootfs(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        layers: Vec<String>,
        reference: String,
    ) -> Result<String, KilnError> {
        self.auth.check_root(conn, &header, "ImportRootfs").await?;
        let layers: Vec<std::path::PathBuf> = layers.into_iter().map(Into::into).collect();
        let reference = (!reference.is_empty()).then_some(reference.as_str());
        let job = self.engine.import_rootfs(&layers, reference).await?;
        Ok(job.result().await?.digest)
    }

    /// Every snapshot, by name: `(name, source_id, source_name,
    /// created_at in µs, vcpus, memory_mib, size_bytes, containers)`.
    #[zbus(name = "ListSnapshots", out_args("snapshots"))]
    async fn list_snapshots(&self) -> Result<Vec<SnapshotTuple>, KilnError> {
        let snapshots = self.engine.list_snapshots().await?;
        Ok(snapshots.iter().map(snapshot_tuple).collect())
    }

    /// Remove a snapshot (VMs restored from it keep running).
    #[zbus(name = "DeleteSnapshot")]
    async fn delete_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "DeleteSnapshot")
            .await?;
        Ok(self.engine.delete_snapshot(&name).await?)
    }

    /// A new VM from a snapshot, like varlink's `RestoreVM` (`name` "" =
    /// after the snapshot). Returns its object path once its agent answers.
    #[zbus(name = "RestoreVM", out_args("vm"))]
    async fn restore_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        snapshot: String,
        name: String,
        same_identity: bool,
    ) -> Result<OwnedObjectPath, KilnError> {
        self.auth.check_manage(conn, &header, "RestoreVM").await?;
        let name = (!name.is_empty()).then_some(name);
        let vm = self
            .engine
            .restore_vm(&snapshot, name, same_identity)
            .await?;
        self.export_vm(conn, vm).await
    }

    /// `count` running copies of VM `id` sharing its memory copy-on-write,
    /// like varlink's `ForkVM`. Returns their object paths.
    #[zbus(name = "ForkVM", out_args("vms"))]
    async fn fork_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        count: u32,
    ) -> Result<Vec<OwnedObjectPath>, KilnError> {
        self.auth.check_manage(conn, &header, "ForkVM").await?;
        let vms = self.engine.fork_vm(&id, count).await?;
        let mut paths = Vec::with_capacity(vms.len());
        for vm in vms {
            paths.push(self.export_vm(conn, vm).await?);
        }
        Ok(paths)
    }

    /// Every stored image: `(digest, references, platform, size in bytes,
    /// layers, stored_at in µs, users)`.
    #[zbus(name = "ListImages", out_args("images"))]
    async fn list_images(&self) -> Result<Vec<ImageSummary>, KilnError> {
        let images = self.engine.list_images().await?;
        Ok(images.iter().map(ImageSummary::from).collect())
    }

    /// One stored image, by reference or digest: its summary (as in
    /// `ListImages`), its layers `(digest, media_type, diff_id, size,
    /// erofs_size)`, its config's process `(entrypoint, cmd, env,
    /// working_dir, user)`, where it came from, and its creation time
    /// (RFC 3339; `""` = unknown).
    #[zbus(
        name = "DescribeImage",
        out_args("image", "layers", "process", "source", "created")
    )]
    async fn describe_image(
        &self,
        image: String,
    ) -> Result<
        (
            ImageSummary,
            Vec<LayerSummary>,
            ProcessSummary,
            String,
            String,
        ),
        KilnError,
    > {
        // Spelled out: zbus makes separate out args of a literal tuple only.
        Ok(details(&self.engine.describe_image(&image).await?))
    }

    /// Remove a tag, or by digest an image with all its tags (a tag that
    /// was the image's last takes the image with it). `ImageInUse` while
    /// VMs or pools use the image.
    #[zbus(name = "RemoveImage")]
    async fn remove_image(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        image: String,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "RemoveImage").await?;
        self.engine.remove_image(&image).await?;
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

    /// A VM's QEMU was killed by the OOM killer at its memory cap of
    /// `limit_bytes` (the VM turns `failed`).
    #[zbus(signal)]
    pub async fn oom(
        emitter: &SignalEmitter<'_>,
        vm: ObjectPath<'_>,
        limit_bytes: u64,
    ) -> zbus::Result<()>;

    /// A `PullImage` of `reference` moved on: `done_bytes` of the layer
    /// blobs' `total_bytes` (a cached layer counts whole), at `layer`
    /// (from 1; 0 = the image as a whole) of `layers`. Best effort: some
    /// reports may be skipped, never the method's reply.
    #[zbus(signal)]
    pub async fn image_pull_progress(
        emitter: &SignalEmitter<'_>,
        reference: &str,
        done_bytes: u64,
        total_bytes: u64,
        layer: u32,
        layers: u32,
    ) -> zbus::Result<()>;

    /// An image was stored, pulled or imported again, or lost one of
    /// several tags: its digest and the references naming it now.
    #[zbus(signal)]
    pub async fn image_added(
        emitter: &SignalEmitter<'_>,
        digest: &str,
        references: Vec<String>,
    ) -> zbus::Result<()>;

    /// An image was removed.
    #[zbus(signal)]
    pub async fn image_removed(emitter: &SignalEmitter<'_>, digest: &str) -> zbus::Result<()>;
}
