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

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::{Engine, EngineEvent, Internal, Reply};
use crate::error::EngineError;
use crate::ids::now_usec;
use crate::pool::{load_definitions, PoolDefinition, PoolInfo, PoolMode, PoolSpec, PoolState};
use crate::qemu::GuestMemory;
use crate::spec::{validate_name, ResolvedSpec, MAX_NAME_LEN};
use crate::state::VmState;
use crate::store::{write_atomic, Durability};
use crate::template::{self, Template};
use crate::vm::{Lease, VmInfo, VmRecord};

/// Consecutive boot failures after which a pool is `failed`.
pub const FAILED_AFTER: u32 = 5;
/// Longest wait between boot attempts of a failing pool.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest `Acquire` timeout.
pub const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(600);
/// `Acquire` timeout when the caller names none.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most labels one lease may carry.
pub const MAX_LABELS: usize = 32;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

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
    last_error: Option<String>,
    /// No boots before this instant (back-off).
    retry_at: Option<Instant>,
    waiters: VecDeque<Waiter>,
    /// Last state published, to send events only on change.
    published: Option<PoolInfo>,
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
    holder: String,
    labels: BTreeMap<String, String>,
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
}

/// How a pool VM's process is made.
#[derive(Debug, Clone)]
pub(super) enum BootSource {
    /// Boot the kernel.
    Cold,
    /// Restore from a template.
    Clone(Template),
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
        self.pool_errors = errors;
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
            let hot = entry.record.state == VmState::Ready && self.pools.contains_key(pool);
            if !hot {
                leftovers.push(id.clone());
            }
        }
        for id in leftovers {
            info!(vm = %id, "destroying a pool VM that was not hot when kilnd stopped");
            self.destroy_vm(&id);
        }
        let names: Vec<String> = self.pools.keys().cloned().collect();
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
        let mut pool = Pool {
            spec: definition.spec,
            source: definition.source,
            resolved,
            template: TemplateSlot::Missing,
            failures: 0,
            last_error: None,
            retry_at: None,
            waiters: VecDeque::new(),
            published: None,
        };
        if let (PoolMode::Template, Ok(spec)) = (pool.spec.mode, &pool.resolved) {
            let key = self.template_key(spec);
            if let Some(found) = template::find(&self.config.templates_dir(&name), &key) {
                info!(pool = %name, key = %key, "re-using the template on disk");
                pool.template = TemplateSlot::Ready {
                    key,
                    template: found,
                };
            }
        }
        if let Err(reason) = &pool.resolved {
            pool.last_error = Some(reason.clone());
        }
        self.pools.insert(name, pool);
    }

    // ----- commands --------------------------------------------------------

    pub(super) fn create_pool(
        &mut self,
        name: String,
        spec: PoolSpec,
    ) -> Result<PoolInfo, EngineError> {
        spec.validate(&name).map_err(EngineError::InvalidPool)?;
        if self.pools.contains_key(&name) {
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
        let Some(pool) = self.pools.get_mut(name) else {
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
        let Some(mut pool) = self.pools.remove(name) else {
            return Ok(());
        };
        for waiter in pool.waiters.drain(..) {
            let _ = waiter
                .reply
                .send(Err(EngineError::NoSuchPool(name.to_owned())));
        }
        let members: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| e.record.pool.as_deref() == Some(name) && e.record.lease.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in members {
            self.destroy_vm(&id);
        }
        self.remove_unused_templates(name);
        info!(pool = %name, "pool deleted; leased VMs stay with their holders");
        let _ = self.events.send(EngineEvent::PoolRemoved {
            name: name.to_owned(),
        });
        Ok(())
    }

    pub(super) fn list_pools(&self) -> Vec<PoolInfo> {
        self.pools
            .keys()
            .filter_map(|name| self.pool_info(name).ok())
            .collect()
    }

    /// Hand out the oldest hot VM, or wait for one to boot.
    pub(super) fn acquire(
        &mut self,
        name: String,
        timeout: Option<Duration>,
        holder: String,
        labels: BTreeMap<String, String>,
        reply: Reply<VmInfo>,
    ) {
        let timeout = timeout.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT);
        if let Err(e) = validate_acquire(timeout, &labels) {
            return drop(reply.send(Err(e)));
        }
        let pool = match self.pool(&name) {
            Ok(p) => p,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if let Some(id) = self.oldest_hot(&name) {
            let started = Instant::now();
            let result = self.lease(&id, holder, labels);
            // The engine's share of a hot acquire (the bench reads it from
            // the log): pick, atomic record write (no fsync: see
            // `Durability::UntilHostCrash`), events.
            let engine_us = started.elapsed().as_micros() as u64;
            debug!(vm = %id, engine_us, "hot acquire");
            self.publish_pool(&name);
            return drop(reply.send(result));
        }
        let counts = self.counts(&name);
        if self.pool_state(&name, counts) == PoolState::Failed {
            let reason = pool.last_error.clone().unwrap_or_default();
            return drop(reply.send(Err(EngineError::BootFailed(format!(
                "pool {name:?} is failing: {reason}"
            )))));
        }
        // VMs that may still become hot for this caller: those booting and
        // those the pool may yet create, minus what earlier callers wait for.
        let coming = counts.booting + pool.spec.max.saturating_sub(counts.owned);
        if coming as usize <= pool.waiters.len() {
            return drop(reply.send(Err(EngineError::PoolExhausted {
                pool: name,
                max: pool.spec.max,
            })));
        }
        if timeout.is_zero() {
            return drop(reply.send(Err(EngineError::Timeout(format!(
                "no hot VM in pool {name:?}"
            )))));
        }
        let ticket = self.next_generation();
        if let Some(pool) = self.pools.get_mut(&name) {
            pool.waiters.push_back(Waiter {
                ticket,
                holder,
                labels,
                reply,
            });
        }
        let tx = self.internal_tx.clone();
        let pool_name = name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Internal::AcquireTimeout {
                pool: pool_name,
                ticket,
                timeout,
            });
        });
        self.refill(&name);
        self.publish_pool(&name);
    }

    pub(super) fn acquire_timed_out(&mut self, name: &str, ticket: u64, timeout: Duration) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        let Some(index) = pool.waiters.iter().position(|w| w.ticket == ticket) else {
            return;
        };
        if let Some(waiter) = pool.waiters.remove(index) {
            let _ = waiter.reply.send(Err(EngineError::Timeout(format!(
                "no VM of pool {name:?} became ready within {} ms",
                timeout.as_millis()
            ))));
        }
        self.trim(name);
        self.publish_pool(name);
    }

    /// Give a leased VM back: destroy it, or with `recycle` reset it from
    /// the template (or reboot it, in a cold pool) and put it back hot.
    pub(super) fn release(&mut self, id: &str, recycle: bool, reply: Reply<()>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.record.lease.is_none() {
            let state = entry.record.state;
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "release",
            })));
        }
        let pool_exists = entry
            .record
            .pool
            .as_ref()
            .is_some_and(|p| self.pools.contains_key(p));
        if !recycle || !pool_exists {
            info!(vm = %id, "released, destroying");
            return self.delete_vm(id, reply);
        }
        let has_process = entry.runtime.is_some();
        // The lease goes first, in one write: if kilnd dies now the VM is an
        // unleased pool VM that is not hot, which start-up destroys.
        let result = self.update(id, |r| {
            r.lease = None;
            if has_process {
                r.state = VmState::Stopping;
            }
        });
        if let Err(e) = result {
            return drop(reply.send(Err(e)));
        }
        info!(vm = %id, "released for recycling");
        if let Some(entry) = self.vms.get_mut(id) {
            entry.recycle = true;
        }
        if has_process {
            self.kill_process(id);
        }
        let _ = reply.send(Ok(()));
    }

    // ----- reacting to VM changes -------------------------------------------

    /// Remember that a pool VM changed; [`Engine::settle_pools`] acts on it.
    pub(super) fn note_pool_change(&mut self, record: &VmRecord, from: VmState, deleted: bool) {
        if let Some(pool) = &record.pool {
            self.pool_changes.push(PoolChange {
                id: record.id.clone(),
                pool: pool.clone(),
                from,
                to: (!deleted).then_some(record.state),
            });
        }
    }

    /// Act on the pool VM changes queued since the last call. Runs after
    /// every command and internal event.
    pub(super) fn settle_pools(&mut self) {
        while !self.pool_changes.is_empty() {
            let changes = std::mem::take(&mut self.pool_changes);
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
        let pool_exists = self.pools.contains_key(&change.pool);
        match to {
            VmState::Ready if change.from == VmState::Booting => {
                if let Some(pool) = self.pools.get_mut(&change.pool) {
                    pool.failures = 0;
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
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        pool.failures += 1;
        let exponent = pool.failures.saturating_sub(1).min(16);
        let delay = Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF);
        pool.retry_at = Some(Instant::now() + delay);
        warn!(pool = %name, failures = pool.failures, retry_in_s = delay.as_secs(), error = %reason, "pool boot failed");
        pool.last_error = Some(reason.clone());
        if pool.failures >= FAILED_AFTER {
            error!(pool = %name, "pool is failing: boots keep failing, retrying every few minutes");
            for waiter in pool.waiters.drain(..) {
                let _ = waiter.reply.send(Err(EngineError::BootFailed(format!(
                    "pool {name:?} is failing: {reason}"
                ))));
            }
        }
        let tx = self.internal_tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::PoolTick { pool: name });
        });
    }

    pub(super) fn pool_tick(&mut self, name: &str) {
        if let Some(pool) = self.pools.get_mut(name) {
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
        let Some(pool) = self.pools.get_mut(name) else {
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
        let Some(pool) = self.pools.get(name) else {
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
        if mode == PoolMode::Template {
            // A changed spec, kernel, initramfs or QEMU makes a new key: the
            // old template stays for the clones that map it, new clones wait
            // for the new one.
            let key = self.template_key(&spec);
            let current = ready_key.as_deref() == Some(key.as_str());
            if !current && !building {
                self.build_template(name, spec, key);
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
        let Some(pool) = self.pools.get(name) else {
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
        let Some(pool) = self.pools.get(name) else {
            return Ok(());
        };
        let Ok(spec) = pool.resolved.clone() else {
            return Ok(());
        };
        let Some(source) = self.boot_source(name) else {
            return Ok(());
        };
        let id = self.unused_vm_id();
        // `<pool>-<id>`, short enough for a VM name and a hostname.
        let prefix: String = name.chars().take(MAX_NAME_LEN - id.len() - 1).collect();
        let record = VmRecord::new(
            id.clone(),
            format!("{prefix}-{id}"),
            spec,
            Some(name.to_owned()),
        );
        self.insert_vm(record)?;
        self.begin_boot(&id, source, None);
        Ok(())
    }

    fn boot_source(&self, name: &str) -> Option<BootSource> {
        let pool = self.pools.get(name)?;
        match (&pool.spec.mode, &pool.template) {
            (PoolMode::Cold, _) => Some(BootSource::Cold),
            (PoolMode::Template, TemplateSlot::Ready { template, .. }) => {
                Some(BootSource::Clone(template.clone()))
            }
            (PoolMode::Template, _) => None,
        }
    }

    fn build_template(&mut self, name: &str, spec: ResolvedSpec, key: String) {
        let generation = self.next_generation();
        let builder_id = self.unused_vm_id();
        let runtime_dir = self.config.vm_runtime_dir(&builder_id);
        let launch = self.launch_for_spec(&builder_id, &spec, &runtime_dir, GuestMemory::Anonymous);
        let plan = template::BuildPlan {
            pool: name.to_owned(),
            key: key.clone(),
            pool_dir: self.config.templates_dir(name),
            launch,
            runtime_dir,
            qmp_timeout: self.config.qmp_timeout(),
            boot_timeout: self.config.boot_timeout(),
        };
        if let Some(pool) = self.pools.get_mut(name) {
            pool.template = TemplateSlot::Building { generation };
        }
        info!(pool = %name, key = %key, "building template");
        let tx = self.internal_tx.clone();
        let pool = name.to_owned();
        tokio::spawn(async move {
            let result = template::build(plan).await;
            let _ = tx.send(Internal::TemplateBuilt {
                pool,
                generation,
                key,
                result,
            });
        });
    }

    /// The key the template of a pool with `spec` must have now.
    fn template_key(&self, spec: &ResolvedSpec) -> String {
        let placeholder = std::path::Path::new("/kiln");
        let mut launch = self.launch_for_spec(
            "000000000000",
            spec,
            placeholder,
            GuestMemory::TemplateClone(placeholder.join("memory")),
        );
        // Only the caller's part of the command line: Kiln's TCG hint is
        // measured at every start and varies a little, and a guest that
        // has booted does not care.
        launch.cmdline = spec.cmdline.clone();
        template::template_key(&launch)
    }

    fn remove_unused_templates(&self, name: &str) {
        let current = self.pools.get(name).and_then(|p| match &p.template {
            TemplateSlot::Ready { template, .. } => Some(template.dir.clone()),
            _ => None,
        });
        let in_use: HashSet<PathBuf> = self
            .vms
            .values()
            .filter(|e| e.record.state.has_process() || e.runtime.is_some())
            .filter_map(|e| e.record.template.clone())
            .collect();
        template::remove_unused(
            &self.config.templates_dir(name),
            current.as_deref(),
            &in_use,
        );
    }

    // ----- handing out -------------------------------------------------------

    fn serve_waiters(&mut self, name: &str) {
        loop {
            let Some(pool) = self.pools.get(name) else {
                return;
            };
            if pool.waiters.is_empty() {
                return;
            }
            let Some(id) = self.oldest_hot(name) else {
                return;
            };
            let Some(waiter) = self.pools.get_mut(name).and_then(|p| p.waiters.pop_front()) else {
                return;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            let result = self.lease(&id, waiter.holder, waiter.labels);
            let _ = waiter.reply.send(result);
        }
    }

    /// Lease a hot VM: state and holder in one atomic write. Not synced to
    /// disk: the lease only means something while the VM's process runs,
    /// which a host crash ends; a crash of kilnd keeps the page cache.
    fn lease(
        &mut self,
        id: &str,
        holder: String,
        labels: BTreeMap<String, String>,
    ) -> Result<VmInfo, EngineError> {
        let info = self.update_with(id, Durability::UntilHostCrash, |r| {
            r.state = VmState::Leased;
            r.lease = Some(Lease {
                holder: holder.clone(),
                labels,
                acquired_at: now_usec(),
            });
        })?;
        info!(vm = %id, holder = %holder, "VM acquired");
        Ok(info)
    }

    fn hot_vms(&self, name: &str) -> Vec<String> {
        let mut hot: Vec<(u64, &String)> = self
            .vms
            .iter()
            .filter(|(_, e)| {
                e.record.pool.as_deref() == Some(name)
                    && e.record.lease.is_none()
                    && e.record.state == VmState::Ready
                    && e.runtime.is_some()
                    && !e.busy
            })
            .map(|(id, e)| (e.record.ready_at.unwrap_or(0), id))
            .collect();
        hot.sort();
        hot.into_iter().map(|(_, id)| id.clone()).collect()
    }

    fn oldest_hot(&self, name: &str) -> Option<String> {
        self.hot_vms(name).into_iter().next()
    }

    // ----- status ------------------------------------------------------------

    fn pool(&self, name: &str) -> Result<&Pool, EngineError> {
        self.pools
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
            match e.record.state {
                VmState::Ready => c.hot += 1,
                VmState::Created | VmState::Booting => c.booting += 1,
                _ => {}
            }
        }
        c
    }

    fn pool_state(&self, name: &str, counts: Counts) -> PoolState {
        let Some(pool) = self.pools.get(name) else {
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
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if pool.published.as_ref() != Some(&info) {
            pool.published = Some(info.clone());
            let _ = self.events.send(EngineEvent::PoolChanged { pool: info });
        }
    }

    // ----- helpers -----------------------------------------------------------

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

fn validate_acquire(
    timeout: Duration,
    labels: &BTreeMap<String, String>,
) -> Result<(), EngineError> {
    if timeout > MAX_ACQUIRE_TIMEOUT {
        return Err(EngineError::InvalidArgument(format!(
            "timeout must be at most {} ms",
            MAX_ACQUIRE_TIMEOUT.as_millis()
        )));
    }
    if labels.len() > MAX_LABELS {
        return Err(EngineError::InvalidArgument(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (key, value) in labels {
        if validate_name(key).is_err() {
            return Err(EngineError::InvalidArgument(format!(
                "label key {:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -",
                key.chars().take(MAX_NAME_LEN + 8).collect::<String>()
            )));
        }
        if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(EngineError::InvalidArgument(format!(
                "label {key:?}: value must be at most {MAX_LABEL_VALUE_LEN} printable characters"
            )));
        }
    }
    Ok(())
}
