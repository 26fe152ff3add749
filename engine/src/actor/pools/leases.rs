//! Handing pool VMs out: `Acquire` (a hot VM at once, or a place in the
//! queue until one boots or the caller's timeout), `Release` (destroy, or
//! recycle back to hot) and the lease itself, written with the `leased`
//! state in one atomic record write.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::Waiter;
use crate::actor::{Engine, Internal, Write};
use crate::api::{validate_acquire, Reply, DEFAULT_ACQUIRE_TIMEOUT};
use crate::error::EngineError;
use crate::ids::now_usec;
use crate::pool::PoolState;
use crate::state::VmState;
use crate::store::Durability;
use crate::vm::{Lease, VmInfo, VmRecord};

impl Engine {
    /// Hand out the oldest hot VM, or wait for one to boot.
    pub(in crate::actor) fn acquire(
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
        if let Some(pool) = self.pools.by_name.get_mut(&name) {
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
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.record.lease.is_none() {
            let state = entry.record.state();
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
            .is_some_and(|p| self.pools.by_name.contains_key(p));
        if !recycle || !pool_exists {
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
            let result = self.lease(&id, waiter.holder, waiter.labels);
            let _ = waiter.reply.send(result);
        }
    }

    /// Lease a hot VM: state and holder in one atomic write. Not synced to
    /// disk: the lease only means something while the VM's process runs,
    /// which a host crash ends; a crash of kilnd keeps the page cache.
    pub(super) fn lease(
        &mut self,
        id: &str,
        holder: String,
        labels: BTreeMap<String, String>,
    ) -> Result<VmInfo, EngineError> {
        let write = Write::Request(Durability::UntilHostCrash);
        let info = self.transition(id, VmState::Leased, write, |r| {
            r.lease = Some(Lease {
                holder: holder.clone(),
                labels,
                acquired_at: now_usec(),
            });
        })?;
        info!(vm = %id, holder = %holder, "VM acquired");
        Ok(info)
    }

    pub(super) fn hot_vms(&self, name: &str) -> Vec<String> {
        let mut hot: Vec<(u64, &String)> = self
            .vms
            .iter()
            .filter(|(_, e)| {
                e.record.pool.as_deref() == Some(name)
                    && e.record.lease.is_none()
                    && e.record.state() == VmState::Ready
                    && e.runtime.is_some()
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
