//! Warm pools: the part of the actor that keeps pools filled and hands
//! their VMs out.
//!
//! A pool owns VMs whose record names it. A pool VM is *hot* when it is
//! `ready` with no lease, *booting* while `created`/`booting`, and *leased*
//! once `Acquire` handed it out (the lease is written with the `leased`
//! state in one atomic record write). Everything here runs on the actor, so
//! "take the oldest hot VM and lease it" is atomic by construction: no VM
//! ever has two holders.
//!
//! Pool logic reacts to VM state changes through one door: every write of a
//! pool VM's state queues a [`PoolChange`], and [`Engine::settle_pools`]
//! runs after each command and internal event. It destroys pool VMs that
//! died or stopped while unleased (counting boot failures for back-off),
//! hands hot VMs to waiting `Acquire` calls, refills, and publishes counts.
//!
//! Refilling keeps `min(max, warm + waiting)` VMs hot or booting, with at
//! most `refillConcurrency` boots at once. Failed boots back off
//! exponentially (1 s, 2 s, … up to [`MAX_BACKOFF`]) from a timer, never a
//! loop, so a broken kernel costs one boot attempt per back-off period; after
//! [`FAILED_AFTER`] failures in a row the pool reports `failed` and waiting
//! callers get the error at once.
//!
//! A template whose clones fail [`SUSPECT_TEMPLATE_AFTER`] times in a row
//! while none of its clones has booted is taken for broken (a RAM or state file
//! damaged on disk, written by another QEMU): it is removed and built
//! again, under the same back-off.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
// tokio's clock: virtual in tests that pause time, so back-off runs instantly.
use tokio::time::Instant;
use tracing::{error, info, warn};

mod leases;

use super::{Engine, Internal};
use crate::api::{AcquireOptions, EngineEvent, Reply, FAILED_AFTER, MAX_BACKOFF};
use crate::container::ContainerRecord;
use crate::error::EngineError;
use crate::pool::template::{self, Template};
use crate::pool::{
    load_definitions, PoolDefinition, PoolFileError, PoolInfo, PoolMode, PoolSpec, PoolState,
};
use crate::qemu::GuestMemory;
use crate::spec::{ResolvedSpec, MAX_NAME_LEN};
use crate::state::VmState;
use crate::store::write_atomic;
use crate::vm::{VmInfo, VmRecord};

/// Clone failures in a row after which a template none of whose clones
/// booted is rebuilt (fewer than [`FAILED_AFTER`]: waiting callers get the
/// rebuilt template's clones, not the error).
const SUSPECT_TEMPLATE_AFTER: u32 = 3;

/// The containers a pool's members run, if known (see [`ImageSlot`]).
fn pool_containers(pool: &Pool) -> Option<Vec<ContainerRecord>> {
    match &pool.image {
        ImageSlot::NotNeeded => Some(Vec::new()),
        ImageSlot::Ready(container) => Some(vec![(**container).clone()]),
        ImageSlot::Unresolved | ImageSlot::Resolving => None,
    }
}

/// The actor's pool state.
#[derive(Debug, Default)]
pub(super) struct Pools {
    by_name: BTreeMap<String, Pool>,
    /// Pool files that were refused.
    pub(super) errors: Vec<PoolFileError>,
    /// Pool VM changes not yet acted on ([`Engine::settle_pools`]).
    changes: Vec<PoolChange>,
}

/// A pool's live state in the actor.
#[derive(Debug)]
pub(super) struct Pool {
    spec: PoolSpec,
    source: PathBuf,
    /// The member VM spec with defaults filled in, or why it cannot be.
    resolved: Result<ResolvedSpec, String>,
    template: TemplateSlot,
    /// Boot failures since the last boot that worked.
    failures: u32,
    /// The template was built again because its clones kept failing; not
    /// again before a boot works (a template that cannot be cloned at all
    /// would otherwise be rebuilt over and over).
    rebuilt_suspect: bool,
    last_error: Option<String>,
    /// No boots before this instant (back-off).
    retry_at: Option<Instant>,
    waiters: VecDeque<Waiter>,
    /// Last state published, to send events only on change.
    published: Option<PoolInfo>,
    /// A per-image pool's container, once its image is resolved.
    image: ImageSlot,
}

/// Where a per-image pool's image stands.
#[derive(Debug)]
pub(super) enum ImageSlot {
    /// The pool runs no image.
    NotNeeded,
    /// Not resolved (yet, or the last try failed: retried after back-off).
    Unresolved,
    /// A sub-task resolves it.
    Resolving,
    /// The container every member runs (slot 0, `main`).
    Ready(Box<ContainerRecord>),
}

#[derive(Debug)]
enum TemplateSlot {
    Missing,
    Building { generation: u64 },
    Ready { key: String, template: Template },
}

/// An `Acquire` waiting for a VM.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    options: AcquireOptions,
    reply: Reply<VmInfo>,
}

/// A pool VM's state or lease was written (or it was deleted: `to` None).
#[derive(Debug)]
pub(super) struct PoolChange {
    pub id: String,
    pub pool: String,
    pub from: VmState,
    pub to: Option<VmState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    hot: u32,
    booting: u32,
    leased: u32,
    owned: u32,
    /// Unleased VMs being destroyed (a shrink, a moved image tag): still
    /// owned until their QEMU is gone, then their slot is free again.
    dying: u32,
}

/// How a pool VM's process is made.
#[derive(Debug, Clone)]
pub(crate) enum BootSource {
    /// Boot the kernel.
    Cold,
    /// Restore from a template.
    Clone(Template),
    /// Restore from a snapshot (saved like a template); a fresh identity
    /// (hostname, machine id, RNG reseed) unless it keeps the saved one.
    Snapshot {
        saved: Template,
        fresh_identity: bool,
    },
}

impl BootSource {
    /// The saved machine a clone or a restore maps.
    pub(crate) fn saved(&self) -> Option<&Template> {
        match self {
            Self::Cold => None,
            Self::Clone(t) | Self::Snapshot { saved: t, .. } => Some(t),
        }
    }
}

impl Engine {
    // ----- loading ---------------------------------------------------------

    /// Load pool definitions and settle the pool VMs found at start-up:
    /// leased VMs stay with their holders, hot ones go back to their pool,
    /// anything else a pool owned (half-booted, stopped, failed, or of a
    /// pool that is gone) is destroyed. Then every pool refills.
    pub(super) fn load_pools(&mut self) {
        let (definitions, errors) = load_definitions(&self.config.pool_layers());
        for e in &errors {
            error!(path = %e.path.display(), reason = %e.reason, "pool definition refused");
        }
        self.pools.errors = errors;
        template::remove_unfinished(&self.config.state_dir.join("templates"));
        for (name, definition) in definitions {
            self.insert_pool(name, definition);
        }
        let mut leftovers = Vec::new();
        for (id, entry) in &self.vms {
            let Some(pool) = &entry.record.pool else {
                continue;
            };
            if entry.record.lease.is_some() {
                continue;
            }
            let hot =
                entry.record.state() == VmState::Ready && self.pools.by_name.contains_key(pool);
            if !hot {
                leftovers.push(id.clone());
            }
        }
        for id in leftovers {
            info!(vm = %id, "destroying a pool VM that was not hot when kilnd stopped");
            self.destroy_vm(&id);
        }
        let names: Vec<String> = self.pools.by_name.keys().cloned().collect();
        for name in &names {
            self.remove_unused_templates(name);
            self.refill(name);
            self.publish_pool(name);
        }
        info!(pools = names.len(), "pools loaded");
    }

    fn insert_pool(&mut self, name: String, definition: PoolDefinition) {
        let resolved = definition
            .spec
            .vm
            .resolve(&self.defaults, &self.limits)
            .map_err(|e| e.to_string());
        if let Err(reason) = &resolved {
            error!(pool = %name, %reason, "pool cannot make VMs");
        }
        let image = match &resolved {
            Ok(spec) if spec.container.is_some() => ImageSlot::Unresolved,
            _ => ImageSlot::NotNeeded,
        };
        let mut pool = Pool {
            spec: definition.spec,
            source: definition.source,
            resolved,
            template: TemplateSlot::Missing,
            failures: 0,
            rebuilt_suspect: false,
            last_error: None,
            retry_at: None,
            waiters: VecDeque::new(),
            published: None,
            image,
        };
        if let Err(reason) = &pool.resolved {
            pool.last_error = Some(reason.clone());
        }
        self.pools.by_name.insert(name.clone(), pool);
        self.adopt_template_on_disk(&name);
    }

    /// Take the pool's current template from disk if it is there (at
    /// start, or once a per-image pool's image is resolved).
    fn adopt_template_on_disk(&mut self, name: &str) {
        let Some(pool) = self.pools.by_name.get(name) else {
            return;
        };
        let (PoolMode::Template, Ok(spec), TemplateSlot::Missing) =
            (pool.spec.mode, &pool.resolved, &pool.template)
        else {
            return;
        };
        let Some(containers) = pool_containers(pool) else {
            return;
        };
        let key = self.template_key(spec, &containers);
        if let Some(found) = template::find(&self.config.templates_dir(name), &key) {
            info!(pool = %name, key = %key, "re-using the template on disk");
            if let Some(pool) = self.pools.by_name.get_mut(name) {
                pool.template = TemplateSlot::Ready {
                    key,
                    template: found,
                };
            }
        }
    }

    /// A per-image pool's image was resolved (or not): build or adopt its
    /// template, refill; a failure backs off like a failed boot and is
    /// retried.
    pub(super) fn pool_image_resolved(
        &mut self,
        name: &str,
        result: Result<ContainerRecord, EngineError>,
    ) {
        let Some(pool) = self.pools.by_name.get_mut(name) else {
            // Deleted meanwhile: let go of the image again.
            if let Ok(container) = result {
                self.release_pool_image(name, &container.digest);
            }
            return;
        };
        if let ImageSlot::Ready(current) = &pool.image {
            // A re-resolve after a pull: only a new digest changes anything
            // (a new template key, so a new template; the old one goes once
            // no clone maps it).
            match result {
                Ok(container) if container.digest != current.digest => {
                    let old = current.digest.clone();
                    info!(pool = %name, from = %old, to = %container.digest, "pool image tag moved");
                    pool.image = ImageSlot::Ready(Box::new(container));
                    self.release_pool_image(name, &old);
                    // Unleased VMs of the old image are not what the tag
                    // names any more: hot ones, and booting ones, which
                    // would turn hot with it; leased ones stay with their
                    // holders.
                    let stale = self.unleased_vms(name, |e| {
                        e.record.containers.first().is_some_and(|c| c.digest == old)
                    });
                    for id in stale {
                        self.destroy_vm(&id);
                    }
                    self.refill(name);
                    self.publish_pool(name);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(pool = %name, error = %e.message(), "cannot look up the pool image again")
                }
            }
            return;
        }
        match result {
            Ok(container) => {
                info!(pool = %name, image = %container.digest, "pool image resolved");
                pool.image = ImageSlot::Ready(Box::new(container));
                self.adopt_template_on_disk(name);
                self.refill(name);
            }
            Err(e) => {
                pool.image = ImageSlot::Unresolved;
                self.pool_boot_failed(name, format!("image: {}", e.message()));
            }
        }
        self.publish_pool(name);
    }

    // ----- commands --------------------------------------------------------

    pub(super) fn create_pool(
        &mut self,
        name: String,
        spec: PoolSpec,
    ) -> Result<PoolInfo, EngineError> {
        spec.validate(&name).map_err(EngineError::InvalidPool)?;
        if self.pools.by_name.contains_key(&name) {
            return Err(EngineError::AlreadyExists(name));
        }
        spec.vm
            .resolve(&self.defaults, &self.limits)
            .map_err(EngineError::InvalidSpec)?;
        let source = self.write_api_definition(&name, Some(&spec))?;
        info!(pool = %name, warm = spec.warm, max = spec.max, "pool created");
        self.insert_pool(
            name.clone(),
            PoolDefinition {
                name: name.clone(),
                spec,
                source,
            },
        );
        self.refill(&name);
        self.publish_pool(&name);
        self.pool_info(&name)
    }

    pub(super) fn resize_pool(
        &mut self,
        name: &str,
        warm: u32,
        max: Option<u32>,
    ) -> Result<PoolInfo, EngineError> {
        let pool = self.pool(name)?;
        let mut spec = pool.spec.clone();
        spec.warm = warm;
        spec.max = max.unwrap_or(spec.max);
        spec.validate(name).map_err(EngineError::InvalidPool)?;
        let source = self.write_api_definition(name, Some(&spec))?;
        let Some(pool) = self.pools.by_name.get_mut(name) else {
            return Err(EngineError::NoSuchPool(name.to_owned()));
        };
        pool.spec = spec;
        pool.source = source;
        // An operator acting on the pool is a reason to try again now.
        pool.failures = 0;
        pool.retry_at = None;
        info!(pool = %name, warm, max = pool.spec.max, "pool resized");
        self.trim(name);
        self.refill(name);
        self.publish_pool(name);
        self.pool_info(name)
    }

    pub(super) fn delete_pool(&mut self, name: &str) -> Result<(), EngineError> {
        self.pool(name)?;
        self.write_api_definition(name, None)?;
        let Some(mut pool) = self.pools.by_name.remove(name) else {
            return Ok(());
        };
        for waiter in pool.waiters.drain(..) {
            let _ = waiter
                .reply
                .send(Err(EngineError::NoSuchPool(name.to_owned())));
        }
        for id in self.unleased_vms(name, |_| true) {
            self.destroy_vm(&id);
        }
        self.remove_unused_templates(name);
        if let ImageSlot::Ready(container) = &pool.image {
            self.release_pool_image(name, &container.digest);
        }
        info!(pool = %name, "pool deleted; leased VMs stay with their holders");
        let _ = self.events.send(EngineEvent::PoolRemoved {
            name: name.to_owned(),
        });
        Ok(())
    }

    pub(super) fn list_pools(&self) -> Vec<PoolInfo> {
        self.pools
            .by_name
            .keys()
            .filter_map(|name| self.pool_info(name).ok())
            .collect()
    }

    // ----- reacting to VM changes -------------------------------------------

    /// Remember that a pool VM changed; [`Engine::settle_pools`] acts on it.
    pub(super) fn note_pool_change(&mut self, record: &VmRecord, from: VmState, deleted: bool) {
        if let Some(pool) = &record.pool {
            self.pools.changes.push(PoolChange {
                id: record.id.clone(),
                pool: pool.clone(),
                from,
                to: (!deleted).then_some(record.state()),
            });
        }
    }

    /// Act on the pool VM changes queued since the last call. Runs after
    /// every command and internal event.
    pub(super) fn settle_pools(&mut self) {
        while !self.pools.changes.is_empty() {
            let changes = std::mem::take(&mut self.pools.changes);
            let mut touched = BTreeSet::new();
            for change in changes {
                touched.insert(change.pool.clone());
                self.settle_vm(change);
            }
            for name in touched {
                self.serve_waiters(&name);
                // A clone that was booting when the pool shrank turns hot
                // beyond `warm`: it goes too.
                self.trim(&name);
                self.refill(&name);
                self.publish_pool(&name);
            }
        }
    }

    fn settle_vm(&mut self, change: PoolChange) {
        let Some(to) = change.to else {
            // Deleted: a template it mapped may now be unused.
            self.remove_unused_templates(&change.pool);
            return;
        };
        let Some(entry) = self.vms.get_mut(&change.id) else {
            return;
        };
        let recycle = entry.recycle;
        if entry.record.lease.is_some() || change.from == to {
            return;
        }
        let pool_exists = self.pools.by_name.contains_key(&change.pool);
        match to {
            VmState::Ready if change.from == VmState::Booting => {
                if let Some(pool) = self.pools.by_name.get_mut(&change.pool) {
                    pool.failures = 0;
                    pool.rebuilt_suspect = false;
                    pool.retry_at = None;
                }
                if !pool_exists {
                    self.destroy_vm(&change.id);
                }
            }
            VmState::Failed => {
                let reason = entry
                    .record
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "VM failed".into());
                if change.from != VmState::Stopping {
                    self.pool_boot_failed(&change.pool, reason);
                }
                self.destroy_vm(&change.id);
            }
            VmState::Stopped if recycle && pool_exists => {
                entry.recycle = false;
                match self.boot_source(&change.pool) {
                    Some(source) => self.begin_boot(&change.id, source, None),
                    None => self.destroy_vm(&change.id),
                }
            }
            VmState::Stopped => self.destroy_vm(&change.id),
            _ => {}
        }
    }

    /// A pool VM could not even be launched (no GPU free): it counts as a
    /// failed boot and goes.
    pub(super) fn pool_vm_not_started(&mut self, id: &str, error: EngineError) {
        let pool = self.vms.get(id).and_then(|e| e.record.pool.clone());
        if let Some(pool) = pool {
            self.pool_boot_failed(&pool, error.message());
        }
        self.destroy_vm(id);
    }

    fn pool_boot_failed(&mut self, name: &str, reason: String) {
        let Some(pool) = self.pools.by_name.get_mut(name) else {
            return;
        };
        pool.failures += 1;
        let exponent = pool.failures.saturating_sub(1).min(16);
        let delay = Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF);
        pool.retry_at = Some(Instant::now() + delay);
        warn!(pool = %name, failures = pool.failures, retry_in_s = delay.as_secs(), error = %reason, "pool boot failed");
        pool.last_error = Some(reason.clone());
        let suspect = pool.failures >= SUSPECT_TEMPLATE_AFTER && !pool.rebuilt_suspect;
        if pool.failures >= FAILED_AFTER {
            error!(pool = %name, "pool is failing: boots keep failing, retrying every few minutes");
            for waiter in pool.waiters.drain(..) {
                let _ = waiter.reply.send(Err(EngineError::BootFailed(format!(
                    "pool {name:?} is failing: {reason}"
                ))));
            }
        }
        if suspect {
            self.discard_suspect_template(name);
        }
        let tx = self.internal_tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::PoolTick { pool: name });
        });
    }

    /// The pool's ready template, if none of its clones got past booting:
    /// removed, so that the next refill builds it again. A template with
    /// clones that booted has worked, and the failures have another cause.
    fn discard_suspect_template(&mut self, name: &str) {
        let Some(pool) = self.pools.by_name.get(name) else {
            return;
        };
        let TemplateSlot::Ready { template, .. } = &pool.template else {
            return;
        };
        let dir = template.dir.clone();
        let booted_clone = self.vms.values().any(|e| {
            let booted = matches!(
                e.record.state(),
                VmState::Ready | VmState::Leased | VmState::Paused
            );
            booted && e.record.template.as_deref() == Some(dir.as_path())
        });
        if booted_clone {
            return;
        }
        warn!(pool = %name, dir = %dir.display(), "clones of the template keep failing: building it again");
        // Clones still booting from it keep their open files.
        crate::store::remove_tree(&dir);
        if let Some(pool) = self.pools.by_name.get_mut(name) {
            pool.template = TemplateSlot::Missing;
            pool.rebuilt_suspect = true;
        }
    }

    pub(super) fn pool_tick(&mut self, name: &str) {
        if let Some(pool) = self.pools.by_name.get_mut(name) {
            if pool.retry_at.is_some_and(|t| t <= Instant::now()) {
                pool.retry_at = None;
            }
        }
        self.refill(name);
        self.publish_pool(name);
    }

    pub(super) fn template_built(
        &mut self,
        name: &str,
        generation: u64,
        key: String,
        result: Result<Template, EngineError>,
    ) {
        let Some(pool) = self.pools.by_name.get_mut(name) else {
            self.remove_unused_templates(name);
            return;
        };
        if !matches!(pool.template, TemplateSlot::Building { generation: g } if g == generation) {
            return;
        }
        match result {
            Ok(template) => {
                pool.template = TemplateSlot::Ready { key, template };
                pool.failures = 0;
                pool.retry_at = None;
                self.remove_unused_templates(name);
            }
            Err(e) => {
                pool.template = TemplateSlot::Missing;
                self.pool_boot_failed(name, format!("template: {}", e.message()));
            }
        }
        self.refill(name);
        self.publish_pool(name);
    }

    // ----- filling -----------------------------------------------------------

    /// Start boots until `min(max, warm + waiting)` VMs are hot or booting.
    fn refill(&mut self, name: &str) {
        let Some(pool) = self.pools.by_name.get(name) else {
            return;
        };
        let Ok(spec) = pool.resolved.clone() else {
            return;
        };
        if pool.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let (mode, max, concurrency) =
            (pool.spec.mode, pool.spec.max, pool.spec.refill_concurrency);
        let target = max.min(pool.spec.warm + pool.waiters.len() as u32);
        let ready_key = match &pool.template {
            TemplateSlot::Ready { key, .. } => Some(key.clone()),
            _ => None,
        };
        let building = matches!(pool.template, TemplateSlot::Building { .. });
        let counts = self.counts(name);
        let wanted = target.saturating_sub(counts.hot + counts.booting);
        if wanted == 0 {
            return;
        }
        let Some(containers) = self.pool_containers_or_resolve(name) else {
            // Its image is being resolved: `pool_image_resolved` refills.
            return;
        };
        if mode == PoolMode::Template {
            // A changed spec, kernel, initramfs, QEMU or image makes a new
            // key: the old template stays for the clones that map it, new
            // clones wait for the new one.
            let key = self.template_key(&spec, &containers);
            let current = ready_key.as_deref() == Some(key.as_str());
            if !current && !building {
                self.build_template(name, spec, key, containers);
            }
            if !current {
                return;
            }
        }
        let room = concurrency
            .saturating_sub(counts.booting)
            .min(max.saturating_sub(counts.owned));
        for _ in 0..wanted.min(room) {
            if let Err(e) = self.spawn_pool_vm(name) {
                error!(pool = %name, error = %e.message(), "cannot create a pool VM");
                self.pool_boot_failed(name, e.message());
                return;
            }
        }
    }

    /// Destroy hot VMs beyond what the pool wants (after a resize or when a
    /// waiter gave up), newest first.
    fn trim(&mut self, name: &str) {
        let Some(pool) = self.pools.by_name.get(name) else {
            return;
        };
        let (warm, max, waiting) = (pool.spec.warm, pool.spec.max, pool.waiters.len() as u32);
        let counts = self.counts(name);
        let keep_hot = (warm + waiting).min(max);
        let over_target = (counts.hot + counts.booting).saturating_sub(keep_hot);
        let over_max = counts.owned.saturating_sub(max);
        let excess = over_target.max(over_max);
        if excess == 0 {
            return;
        }
        let mut hot = self.hot_vms(name);
        hot.reverse();
        for id in hot.into_iter().take(excess as usize) {
            info!(vm = %id, pool = %name, "pool shrinks, destroying a hot VM");
            self.destroy_vm(&id);
        }
    }

    fn spawn_pool_vm(&mut self, name: &str) -> Result<(), EngineError> {
        let Some(pool) = self.pools.by_name.get(name) else {
            return Ok(());
        };
        let Ok(spec) = pool.resolved.clone() else {
            return Ok(());
        };
        let Some(source) = self.boot_source(name) else {
            return Ok(());
        };
        let containers = pool_containers(pool).unwrap_or_default();
        let id = self.unused_vm_id();
        // `<pool>-<id>`, short enough for a VM name and a hostname.
        let prefix: String = name.chars().take(MAX_NAME_LEN - id.len() - 1).collect();
        let mut record = VmRecord::new(
            id.clone(),
            format!("{prefix}-{id}"),
            spec,
            Some(name.to_owned()),
        );
        record.containers = containers;
        self.insert_vm(record)?;
        self.begin_boot(&id, source, None);
        Ok(())
    }

    fn boot_source(&self, name: &str) -> Option<BootSource> {
        let pool = self.pools.by_name.get(name)?;
        match (&pool.spec.mode, &pool.template) {
            (PoolMode::Cold, _) => Some(BootSource::Cold),
            (PoolMode::Template, TemplateSlot::Ready { template, .. }) => {
                Some(BootSource::Clone(template.clone()))
            }
            (PoolMode::Template, _) => None,
        }
    }

    fn build_template(
        &mut self,
        name: &str,
        spec: ResolvedSpec,
        key: String,
        containers: Vec<ContainerRecord>,
    ) {
        let generation = self.next_generation();
        let builder_id = self.unused_vm_id();
        let runtime_dir = self.config.vm_runtime_dir(&builder_id);
        let mut launch = self.launch_for_spec(
            &builder_id,
            &spec,
            &runtime_dir,
            GuestMemory::Anonymous,
            &containers,
        );
        launch.user = self.qemu_user(None, &spec, &[]);
        let warmup = self
            .pools
            .by_name
            .get(name)
            .map_or(0, |p| p.spec.warmup_sec);
        let plan = template::BuildPlan {
            pool: name.to_owned(),
            key: key.clone(),
            pool_dir: self.config.templates_dir(name),
            launch,
            runtime_dir,
            qmp_timeout: self.config.qmp_timeout(),
            boot_timeout: self.config.boot_timeout(),
            container: containers.first().map(ContainerRecord::start_request),
            warmup: Duration::from_secs(u64::from(warmup)),
        };
        if let Some(pool) = self.pools.by_name.get_mut(name) {
            pool.template = TemplateSlot::Building { generation };
        }
        info!(pool = %name, key = %key, "building template");
        let tx = self.internal_tx.clone();
        let pool = name.to_owned();
        let build = self.vmm.build_template(plan);
        tokio::spawn(async move {
            let result = build.await;
            let _ = tx.send(Internal::TemplateBuilt {
                pool,
                generation,
                key,
                result,
            });
        });
    }

    /// Look the image of every per-image pool named by a tag up again (a
    /// pull may have moved the tag).
    pub(super) fn follow_pool_tags(&self) {
        for (name, pool) in &self.pools.by_name {
            let ImageSlot::Ready(current) = &pool.image else {
                continue;
            };
            if current.image.starts_with("sha256:") {
                continue;
            }
            if let Ok(Some(spec)) = pool.resolved.as_ref().map(|r| r.container.clone()) {
                self.resolve_pool_image(name, spec);
            }
        }
    }

    /// The digest of a per-image pool's current image (resolved).
    pub(super) fn pool_image_digest(&self, name: &str) -> Option<String> {
        match &self.pools.by_name.get(name)?.image {
            ImageSlot::Ready(container) => Some(container.digest.clone()),
            _ => None,
        }
    }

    /// The containers a pool's members run: none for a plain pool, the
    /// resolved one for a per-image pool; `None` while that is being
    /// resolved (a resolution is started if none runs).
    fn pool_containers_or_resolve(&mut self, name: &str) -> Option<Vec<ContainerRecord>> {
        let pool = self.pools.by_name.get_mut(name)?;
        if let Some(containers) = pool_containers(pool) {
            return Some(containers);
        }
        if matches!(pool.image, ImageSlot::Unresolved) {
            pool.image = ImageSlot::Resolving;
            let spec = pool.resolved.as_ref().ok()?.container.clone()?;
            self.resolve_pool_image(name, spec);
        }
        None
    }

    /// The key the template of a pool with `spec` (and, for a per-image
    /// pool, its container: the layers are on the command line) must have
    /// now.
    fn template_key(&self, spec: &ResolvedSpec, containers: &[ContainerRecord]) -> String {
        let placeholder = std::path::Path::new("/kiln");
        let mut launch = self.launch_for_spec(
            "000000000000",
            spec,
            placeholder,
            GuestMemory::TemplateClone(placeholder.join("memory")),
            containers,
        );
        // Only the caller's part of the command line: Kiln's TCG hint is
        // measured at every start and varies a little, and a guest that
        // has booted does not care.
        launch.cmdline = spec.cmdline.clone();
        template::template_key(&launch)
    }

    fn remove_unused_templates(&self, name: &str) {
        let current = self
            .pools
            .by_name
            .get(name)
            .and_then(|p| match &p.template {
                TemplateSlot::Ready { template, .. } => Some(template.dir.clone()),
                _ => None,
            });
        let in_use: HashSet<PathBuf> = self
            .vms
            .values()
            .filter(|e| e.record.state().has_process() || e.runtime.is_some())
            .filter_map(|e| e.record.template.clone())
            .collect();
        template::remove_unused(
            &self.config.templates_dir(name),
            current.as_deref(),
            &in_use,
        );
    }

    // ----- status ------------------------------------------------------------

    fn pool(&self, name: &str) -> Result<&Pool, EngineError> {
        self.pools
            .by_name
            .get(name)
            .ok_or_else(|| EngineError::NoSuchPool(name.chars().take(MAX_NAME_LEN + 8).collect()))
    }

    fn counts(&self, name: &str) -> Counts {
        let mut c = Counts::default();
        for e in self.vms.values() {
            if e.record.pool.as_deref() != Some(name) {
                continue;
            }
            c.owned += 1;
            if e.record.lease.is_some() {
                c.leased += 1;
                continue;
            }
            if !e.delete_waiters.is_empty() {
                c.dying += 1;
                continue;
            }
            match e.record.state() {
                VmState::Ready => c.hot += 1,
                VmState::Created | VmState::Booting => c.booting += 1,
                _ => {}
            }
        }
        c
    }

    fn pool_state(&self, name: &str, counts: Counts) -> PoolState {
        let Some(pool) = self.pools.by_name.get(name) else {
            return PoolState::Failed;
        };
        if pool.resolved.is_err() || pool.failures >= FAILED_AFTER {
            PoolState::Failed
        } else if pool.retry_at.is_some_and(|t| t > Instant::now()) {
            PoolState::Backoff
        } else if matches!(pool.template, TemplateSlot::Building { .. }) {
            PoolState::BuildingTemplate
        } else if counts.hot >= pool.spec.warm || counts.owned >= pool.spec.max {
            PoolState::Ready
        } else {
            PoolState::Filling
        }
    }

    pub(super) fn pool_info(&self, name: &str) -> Result<PoolInfo, EngineError> {
        let pool = self.pool(name)?;
        let counts = self.counts(name);
        Ok(PoolInfo {
            name: name.to_owned(),
            mode: pool.spec.mode,
            warm: pool.spec.warm,
            max: pool.spec.max,
            refill_concurrency: pool.spec.refill_concurrency,
            recycle_on_expiry: pool.spec.recycle_on_expiry,
            state: self.pool_state(name, counts),
            hot: counts.hot,
            booting: counts.booting,
            leased: counts.leased,
            failed: pool.failures,
            waiting: pool.waiters.len() as u32,
            template_ready: matches!(pool.template, TemplateSlot::Ready { .. }),
            last_error: pool.last_error.clone(),
            source: pool.source.clone(),
            vm: pool.spec.vm.clone(),
        })
    }

    /// Send `PoolChanged` if what callers see of the pool changed.
    fn publish_pool(&mut self, name: &str) {
        let Ok(info) = self.pool_info(name) else {
            return;
        };
        let Some(pool) = self.pools.by_name.get_mut(name) else {
            return;
        };
        if pool.published.as_ref() != Some(&info) {
            pool.published = Some(info.clone());
            let _ = self.events.send(EngineEvent::PoolChanged { pool: info });
        }
    }

    // ----- helpers -----------------------------------------------------------

    /// Ids of pool `name`'s VMs that no one holds (hot, booting or being
    /// destroyed) and that `which` picks.
    fn unleased_vms(&self, name: &str, which: impl Fn(&super::VmEntry) -> bool) -> Vec<String> {
        self.vms
            .iter()
            .filter(|(_, e)| e.record.pool.as_deref() == Some(name) && e.record.lease.is_none())
            .filter(|(_, e)| which(e))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Delete a VM without anyone waiting for the result.
    pub(super) fn destroy_vm(&mut self, id: &str) {
        let (reply, _ignored) = oneshot::channel();
        self.delete_vm(id, reply);
    }

    /// Write (or with `None`, remove or mask) the API layer's definition of
    /// a pool. Returns the file written.
    fn write_api_definition(
        &self,
        name: &str,
        spec: Option<&PoolSpec>,
    ) -> Result<PathBuf, EngineError> {
        let dir = self.config.api_pools_dir();
        crate::store::create_private_dir(&dir)?;
        let path = dir.join(format!("{name}.toml"));
        let bytes = match spec {
            Some(spec) => toml::to_string(spec)
                .map_err(|e| EngineError::InvalidArgument(format!("cannot write pool: {e}")))?
                .into_bytes(),
            None => {
                // A pool defined in a lower layer is masked with an empty
                // file; one that only the API defined is simply removed.
                let (lower, _) = load_definitions(&self.config.pool_dirs);
                if !lower.contains_key(name) {
                    return match std::fs::remove_file(&path) {
                        Ok(()) => Ok(path),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path),
                        Err(source) => Err(crate::store::StoreError::Io { path, source }.into()),
                    };
                }
                Vec::new()
            }
        };
        write_atomic(&path, &bytes)?;
        Ok(path)
    }
}
