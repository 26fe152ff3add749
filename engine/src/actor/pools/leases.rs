//! Handing pool VMs out: `Acquire` (a hot VM at once, or a place in the
//! queue until one boots or the caller's timeout), `Release` (destroy, or
//! recycle back to hot) and the lease itself, written with the `leased`
//! state in one atomic record write.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info};

use super::Waiter;
use crate::actor::{Engine, Internal, Write};
use crate::api::{
    validate_acquire, validate_ttl, AcquireOptions, EngineEvent, Reply, DEFAULT_ACQUIRE_TIMEOUT,
};
use crate::error::EngineError;
use crate::ids::now_usec;
use crate::pool::PoolState;
use crate::state::VmState;
use crate::store::Durability;
use crate::vm::{Disconnect, Lease, VmInfo, VmRecord};

impl Engine {
    /// Hand out the oldest hot VM, or wait for one to boot.
    pub(in crate::actor) fn acquire(
        &mut self,
        name: String,
        options: AcquireOptions,
        reply: Reply<VmInfo>,
    ) {
        let timeout = options.timeout.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT);
        if let Err(e) = validate_acquire(timeout, &options.labels, options.ttl) {
            return drop(reply.send(Err(e)));
        }
        if let Err(e) = self.check_quota(&options) {
            return drop(reply.send(Err(e)));
        }
        if let Some(Err(e)) = options.container.as_ref().map(|c| c.validate()) {
            return drop(reply.send(Err(EngineError::InvalidSpec(e.into()))));
        }
        let pool = match self.pool(&name) {
            Ok(p) => p,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if let Some(id) = self.oldest_hot(&name) {
            let started = Instant::now();
            self.hand_out(&id, options, reply);
            // The engine's share of a hot acquire (the bench reads it from
            // the log): pick, atomic record write (no fsync: see
            // `Durability::UntilHostCrash`), events.
            let engine_us = started.elapsed().as_micros() as u64;
            debug!(vm = %id, engine_us, "hot acquire");
            self.publish_pool(&name);
            return;
        }
        let counts = self.counts(&name);
        if self.pool_state(&name, counts) == PoolState::Failed {
            let reason = pool.last_error.clone().unwrap_or_default();
            return drop(reply.send(Err(EngineError::BootFailed(format!(
                "pool {name:?} is failing: {reason}"
            )))));
        }
        // VMs that may still become hot for this caller: those booting and
        // those the pool may yet create (in the slots of those being
        // destroyed too), minus what earlier callers wait for.
        let coming = counts.booting + counts.dying + pool.spec.max.saturating_sub(counts.owned);
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
        if let Some(pool) = self.pools.by_name.get_mut(&name) {
            pool.waiters.push_back(Waiter {
                ticket,
                options,
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

    pub(in crate::actor) fn acquire_timed_out(
        &mut self,
        name: &str,
        ticket: u64,
        timeout: Duration,
    ) {
        let Some(pool) = self.pools.by_name.get_mut(name) else {
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
    pub(in crate::actor) fn release(&mut self, id: &str, recycle: bool, reply: Reply<()>) {
        let entry = match self
            .entry(id)
            .and_then(|e| e.held_lease("release").map(|_| e))
        {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let pool_exists = entry
            .record
            .pool
            .as_ref()
            .is_some_and(|p| self.pools.by_name.contains_key(p));
        // A VM in a pod's network cannot go back to its pool's bridge.
        let joined = entry.record.pod_network.is_some();
        if !recycle || !pool_exists || joined {
            info!(vm = %id, "released, destroying");
            return self.delete_vm(id, reply);
        }
        let has_process = entry.runtime.is_some();
        // The lease goes first, in one write: if kilnd dies now the VM is an
        // unleased pool VM that is not hot, which start-up destroys.
        let drop_lease = |r: &mut VmRecord| r.lease = None;
        let result = if has_process {
            let write = Write::Request(Durability::Durable);
            self.transition(id, VmState::Stopping, write, drop_lease)
        } else {
            self.update(id, drop_lease)
        };
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

    pub(super) fn serve_waiters(&mut self, name: &str) {
        loop {
            let Some(pool) = self.pools.by_name.get(name) else {
                return;
            };
            if pool.waiters.is_empty() {
                return;
            }
            let Some(id) = self.oldest_hot(name) else {
                return;
            };
            let Some(waiter) = self
                .pools
                .by_name
                .get_mut(name)
                .and_then(|p| p.waiters.pop_front())
            else {
                return;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            self.hand_out(&id, waiter.options, waiter.reply);
        }
    }

    /// Lease hot VM `id` and reply; with a container asked for, reply once
    /// it runs (`start_leased_container`).
    fn hand_out(&mut self, id: &str, mut options: AcquireOptions, reply: Reply<VmInfo>) {
        let container = options.container.take();
        match (self.lease(id, options), container) {
            (Ok(_), Some(spec)) => self.start_leased_container(id, spec, reply),
            (result, _) => drop(reply.send(result)),
        }
    }

    /// Lease a hot VM: state and holder in one atomic write. Not synced to
    /// disk: the lease only means something while the VM's process runs,
    /// which a host crash ends; a crash of kilnd keeps the page cache.
    pub(super) fn lease(
        &mut self,
        id: &str,
        options: AcquireOptions,
    ) -> Result<VmInfo, EngineError> {
        let acquired_at = now_usec();
        let expires_at = options
            .ttl
            .map(|ttl| acquired_at.saturating_add(ttl.as_micros() as u64));
        let holder = options.holder;
        let write = Write::Request(Durability::UntilHostCrash);
        let info = self.transition(id, VmState::Leased, write, |r| {
            r.lease = Some(Lease {
                holder: holder.clone(),
                labels: options.labels,
                acquired_at,
                expires_at,
                uid: options.uid,
                release_on: options.release_on,
            });
        })?;
        if let Some(deadline) = expires_at {
            self.schedule_expiry(id, deadline);
        }
        info!(vm = %id, holder = %holder, ?expires_at, "VM acquired");
        Ok(info)
    }

    /// `max_leases_per_caller`: leases held and `Acquire` calls waiting,
    /// counted per uid (per holder when the transport gave no uid).
    fn check_quota(&self, options: &AcquireOptions) -> Result<(), EngineError> {
        let limit = self.config.max_leases_per_caller;
        if limit == 0 {
            return Ok(());
        }
        let same_caller = |holder: &str, uid: Option<u32>| match (options.uid, uid) {
            (Some(a), Some(b)) => a == b,
            _ => holder == options.holder,
        };
        let held = self
            .vms
            .values()
            .filter_map(|e| e.record.lease.as_ref())
            .filter(|l| same_caller(&l.holder, l.uid))
            .count();
        let waiting = self
            .pools
            .by_name
            .values()
            .flat_map(|p| &p.waiters)
            .filter(|w| same_caller(&w.options.holder, w.options.uid))
            .count();
        if held + waiting >= limit as usize {
            return Err(EngineError::QuotaExceeded {
                holder: options.holder.clone(),
                limit,
            });
        }
        Ok(())
    }

    /// Extend a lease to now + `ttl`.
    pub(in crate::actor) fn renew(&mut self, id: &str, ttl: Duration, reply: Reply<VmInfo>) {
        if let Err(e) = validate_ttl(ttl) {
            return drop(reply.send(Err(e)));
        }
        if let Err(e) = self
            .entry(id)
            .and_then(|e| e.held_lease("renew the lease of").map(drop))
        {
            return drop(reply.send(Err(e)));
        }
        let deadline = now_usec().saturating_add(ttl.as_micros() as u64);
        let result = self.update(id, |r| {
            if let Some(lease) = r.lease.as_mut() {
                lease.expires_at = Some(deadline);
            }
        });
        if result.is_ok() {
            self.schedule_expiry(id, deadline);
            info!(vm = %id, expires_at = deadline, "lease renewed");
        }
        let _ = reply.send(result);
    }

    /// Wake the actor when VM `id`'s lease reaches `deadline` (µs since
    /// the epoch). A timer whose deadline was renewed away finds a
    /// different deadline in the record and does nothing.
    fn schedule_expiry(&self, id: &str, deadline: u64) {
        let left = Duration::from_micros(deadline.saturating_sub(now_usec()));
        let tx = self.internal_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(left).await;
            let _ = tx.send(Internal::LeaseDue { id, deadline });
        });
    }

    /// A lease timer fired: end the lease if that is still its deadline.
    pub(in crate::actor) fn lease_due(&mut self, id: &str, deadline: u64) {
        let due = self
            .vms
            .get(id)
            .and_then(|e| e.record.lease.as_ref())
            .is_some_and(|l| l.expires_at == Some(deadline));
        if due {
            self.expire_lease(id);
        }
    }

    /// A holder went away: end every lease bound to it.
    pub(in crate::actor) fn disconnected(&mut self, who: &Disconnect) -> u32 {
        let bound = self.leased_where(|l| l.release_on.as_ref() == Some(who));
        for id in &bound {
            info!(vm = %id, holder = ?who, "lease holder went away");
            self.end_lease(id);
        }
        bound.len() as u32
    }

    /// The VMs whose lease satisfies `matches`.
    fn leased_where(&self, matches: impl Fn(&Lease) -> bool) -> Vec<String> {
        self.vms
            .iter()
            .filter(|(_, e)| e.record.lease.as_ref().is_some_and(&matches))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The D-Bus names leases are bound to.
    pub(in crate::actor) fn bound_bus_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .vms
            .values()
            .filter_map(|e| match e.record.lease.as_ref()?.release_on.as_ref()? {
                Disconnect::BusName(name) => Some(name.clone()),
                Disconnect::Connection(_) => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// End a lease nobody gave back: destroy the VM, or put it back hot if
    /// its pool says `recycleOnExpiry`.
    fn end_lease(&mut self, id: &str) {
        let recycle = self
            .vms
            .get(id)
            .and_then(|e| e.record.pool.as_ref())
            .and_then(|p| self.pools.by_name.get(p))
            .is_some_and(|p| p.spec.recycle_on_expiry);
        let (reply, _ignored) = oneshot::channel();
        self.release(id, recycle, reply);
    }

    /// End an expired lease: tell watchers, then [`Engine::end_lease`].
    fn expire_lease(&mut self, id: &str) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        let Some(lease) = &entry.record.lease else {
            return;
        };
        let pool = entry.record.pool.clone();
        let holder = lease.holder.clone();
        info!(vm = %id, holder = %holder, "lease expired");
        let _ = self.events.send(EngineEvent::LeaseExpired {
            id: id.to_owned(),
            pool,
            holder,
        });
        self.end_lease(id);
    }

    /// After a restart: leases whose deadline passed while kilnd was down
    /// end now, and so do leases bound to a connection to the old kilnd;
    /// the others get their timers back.
    pub(in crate::actor) fn resume_lease_deadlines(&mut self) {
        let orphaned =
            self.leased_where(|l| matches!(l.release_on, Some(Disconnect::Connection(_))));
        for id in &orphaned {
            info!(vm = %id, "lease was bound to a connection to the previous kilnd");
            self.end_lease(id);
        }
        let now = now_usec();
        let deadlines: Vec<(String, u64)> = self
            .vms
            .iter()
            .filter(|(id, _)| !orphaned.contains(id))
            .filter_map(|(id, e)| Some((id.clone(), e.record.lease.as_ref()?.expires_at?)))
            .collect();
        for (id, deadline) in deadlines {
            if deadline <= now {
                info!(vm = %id, "lease expired while kilnd was not running");
                self.expire_lease(&id);
            } else {
                self.schedule_expiry(&id, deadline);
            }
        }
    }

    /// The pool's VMs that may be handed out, oldest first: ready, not
    /// leased, not busy, and not on their way out (a stop, kill or delete
    /// in flight: a lease on such a VM would vanish with it).
    pub(super) fn hot_vms(&self, name: &str) -> Vec<String> {
        let mut hot: Vec<(u64, &String)> = self
            .vms
            .iter()
            .filter(|(_, e)| {
                e.record.pool.as_deref() == Some(name)
                    && e.record.lease.is_none()
                    && e.record.state() == VmState::Ready
                    && e.runtime.as_ref().is_some_and(|r| r.stop_intent.is_none())
                    && e.delete_waiters.is_empty()
                    && !e.busy
            })
            .map(|(id, e)| (e.record.ready_at.unwrap_or(0), id))
            .collect();
        hot.sort();
        hot.into_iter().map(|(_, id)| id.clone()).collect()
    }

    pub(super) fn oldest_hot(&self, name: &str) -> Option<String> {
        self.hot_vms(name).into_iter().next()
    }
}
