//! What happened to VMs, pools and images, each told once: the facts an
//! operator looks for (a VM started, was acquired, released, failed; a
//! template was built; an image stored).
//!
//! The engine's events say what things *are* now (`VmChanged` with the
//! whole VM); a [`Tracker`] remembers what it saw before and turns each
//! event into the facts it means. A follower task ([`spawn`]) feeds it and
//! hands every fact to its caller: kilnd logs them to the journal with
//! their MESSAGE_ID and counts them in its metrics.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kiln_engine::{
    EngineEvent, EngineHandle, ImageInfo, PoolInfo, PoolMode, PoolState, VmInfo, VmState,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tracing::warn;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// A VM was defined (`CreateVM`, a pool's new member, a restore).
    VmCreated {
        vm: String,
        name: String,
        pool: Option<String>,
    },
    /// A VM's guest answers after a launch: `took` from the launch to the
    /// agent's answer. `cloned`: restored from its pool's template.
    VmStarted {
        vm: String,
        name: String,
        pool: Option<String>,
        took: Duration,
        cloned: bool,
    },
    /// A VM stopped (asked to).
    VmStopped {
        vm: String,
        name: String,
        pool: Option<String>,
    },
    /// A VM failed: its QEMU died or never came up.
    VmFailed {
        vm: String,
        name: String,
        pool: Option<String>,
        error: Option<String>,
    },
    /// A VM was deleted.
    VmDeleted {
        vm: String,
        name: String,
        pool: Option<String>,
    },
    /// A pool VM was leased to `holder`.
    VmAcquired {
        vm: String,
        name: String,
        pool: Option<String>,
        holder: String,
    },
    /// A lease ended other than by expiry: `Release`, the holder went
    /// away, the VM was deleted.
    VmReleased {
        vm: String,
        name: String,
        pool: Option<String>,
        holder: String,
    },
    /// A lease reached its deadline.
    LeaseExpired {
        vm: String,
        pool: Option<String>,
        holder: String,
    },
    /// A VM's QEMU was killed by the OOM killer at its memory cap.
    VmOomKilled {
        vm: String,
        pool: Option<String>,
        limit_bytes: u64,
    },
    /// A pool appeared (loaded from a file after start, or `CreatePool`).
    PoolAdded { pool: String },
    /// A pool was deleted.
    PoolRemoved { pool: String },
    /// A pool's template is built; `took` when the build was seen to start.
    TemplateBuilt {
        pool: String,
        took: Option<Duration>,
    },
    /// A template build failed (the pool backs off).
    TemplateFailed { pool: String, error: Option<String> },
    /// An image was stored (pulled or imported), by manifest digest.
    ImageStored {
        digest: String,
        references: Vec<String>,
    },
    /// An image was removed.
    ImageRemoved { digest: String },
}

/// What the tracker remembers of a VM.
#[derive(Debug, Clone)]
struct SeenVm {
    name: String,
    pool: Option<String>,
    state: VmState,
    holder: Option<String>,
    /// The launch (`startedAt`) whose start was told.
    told_start: Option<u64>,
}

/// What the tracker remembers of a pool.
#[derive(Debug, Clone)]
struct SeenPool {
    mode: PoolMode,
    template_ready: bool,
    /// When its template build was first seen running.
    building_since: Option<Instant>,
}

/// Turns engine events into [`Fact`]s.
#[derive(Debug, Default)]
pub struct Tracker {
    vms: HashMap<String, SeenVm>,
    pools: HashMap<String, SeenPool>,
    images: HashSet<String>,
    /// VMs whose lease expired: the lease's end that follows is no release.
    expired: HashSet<String>,
}

impl Tracker {
    /// Remember what exists when following starts (or starts again after
    /// missed events), telling nothing of it: VMs already up are not
    /// started again, leases already held not acquired again. A template
    /// build under way is timed from `now`.
    pub fn seed(&mut self, vms: &[VmInfo], pools: &[PoolInfo], images: &[ImageInfo], now: Instant) {
        self.vms = vms
            .iter()
            .map(|vm| {
                let up = vm.ready_at.is_some()
                    && matches!(vm.state, VmState::Ready | VmState::Leased | VmState::Paused);
                let mut seen = seen_vm(vm, None);
                seen.told_start = if up { vm.started_at } else { None };
                (vm.id.clone(), seen)
            })
            .collect();
        let old = std::mem::take(&mut self.pools);
        self.pools = pools
            .iter()
            .map(|p| {
                let building_since = (p.state == PoolState::BuildingTemplate).then(|| {
                    old.get(&p.name)
                        .and_then(|o| o.building_since)
                        .unwrap_or(now)
                });
                let seen = SeenPool {
                    mode: p.mode,
                    template_ready: p.template_ready,
                    building_since,
                };
                (p.name.clone(), seen)
            })
            .collect();
        self.images = images.iter().map(|i| i.digest.clone()).collect();
        self.expired.retain(|id| self.vms.contains_key(id));
    }

    /// The facts `event` means, in the order they happened.
    pub fn apply(&mut self, event: &EngineEvent, now: Instant) -> Vec<Fact> {
        let mut facts = Vec::new();
        match event {
            EngineEvent::VmAdded { vm } => self.vm(vm, true, &mut facts),
            EngineEvent::VmChanged { vm } => self.vm(vm, false, &mut facts),
            EngineEvent::VmRemoved { id } => {
                let seen = self.vms.remove(id);
                let expired = self.expired.remove(id);
                if let Some(seen) = seen {
                    if let (Some(holder), false) = (seen.holder.clone(), expired) {
                        facts.push(Fact::VmReleased {
                            vm: id.clone(),
                            name: seen.name.clone(),
                            pool: seen.pool.clone(),
                            holder,
                        });
                    }
                    facts.push(Fact::VmDeleted {
                        vm: id.clone(),
                        name: seen.name,
                        pool: seen.pool,
                    });
                }
            }
            EngineEvent::LeaseExpired { id, pool, holder } => {
                self.expired.insert(id.clone());
                facts.push(Fact::LeaseExpired {
                    vm: id.clone(),
                    pool: pool.clone(),
                    holder: holder.clone(),
                });
            }
            EngineEvent::Oom { id, limit_bytes } => facts.push(Fact::VmOomKilled {
                vm: id.clone(),
                pool: self.vms.get(id).and_then(|v| v.pool.clone()),
                limit_bytes: *limit_bytes,
            }),
            EngineEvent::PoolChanged { pool } => self.pool(pool, now, &mut facts),
            EngineEvent::PoolRemoved { name } => {
                if self.pools.remove(name).is_some() {
                    facts.push(Fact::PoolRemoved { pool: name.clone() });
                }
            }
            EngineEvent::ImageAdded { image } => {
                if self.images.insert(image.digest.clone()) {
                    facts.push(Fact::ImageStored {
                        digest: image.digest.clone(),
                        references: image.references.clone(),
                    });
                }
            }
            EngineEvent::ImageRemoved { digest } => {
                if self.images.remove(digest) {
                    facts.push(Fact::ImageRemoved {
                        digest: digest.clone(),
                    });
                }
            }
            EngineEvent::GpusChanged { .. } => {}
        }
        facts
    }

    fn vm(&mut self, vm: &VmInfo, added: bool, facts: &mut Vec<Fact>) {
        let before = self.vms.get(&vm.id).cloned();
        let mut seen = seen_vm(vm, before.as_ref().and_then(|b| b.told_start));
        let fact_vm = || (vm.id.clone(), vm.name.clone(), vm.pool.clone());
        if before.is_none() && added {
            let (vm, name, pool) = fact_vm();
            facts.push(Fact::VmCreated { vm, name, pool });
        }
        if matches!(vm.state, VmState::Ready | VmState::Leased) {
            if let (Some(started), Some(ready)) = (vm.started_at, vm.ready_at) {
                // A reboot keeps `startedAt`: only a new launch is a start.
                if seen.told_start != Some(started) {
                    seen.told_start = Some(started);
                    let cloned = vm
                        .pool
                        .as_ref()
                        .and_then(|p| self.pools.get(p))
                        .is_some_and(|p| p.mode == PoolMode::Template);
                    let (vm, name, pool) = fact_vm();
                    facts.push(Fact::VmStarted {
                        vm,
                        name,
                        pool,
                        took: Duration::from_micros(ready.saturating_sub(started)),
                        cloned,
                    });
                }
            }
        }
        // Only changes seen happening: a VM first met in a state is no news.
        if let Some(before) = &before {
            if before.state != vm.state && vm.state == VmState::Stopped {
                let (vm, name, pool) = fact_vm();
                facts.push(Fact::VmStopped { vm, name, pool });
            }
            if before.state != vm.state && vm.state == VmState::Failed {
                let (id, name, pool) = fact_vm();
                facts.push(Fact::VmFailed {
                    vm: id,
                    name,
                    pool,
                    error: vm.last_error.clone(),
                });
            }
            match (&before.holder, &vm.leased_by) {
                (None, Some(holder)) => {
                    let (vm, name, pool) = fact_vm();
                    facts.push(Fact::VmAcquired {
                        vm,
                        name,
                        pool,
                        holder: holder.clone(),
                    });
                }
                // An expired lease was told as such.
                (Some(holder), None) if !self.expired.remove(&vm.id) => {
                    let (vm, name, pool) = fact_vm();
                    facts.push(Fact::VmReleased {
                        vm,
                        name,
                        pool,
                        holder: holder.clone(),
                    });
                }
                _ => {}
            }
        }
        self.vms.insert(vm.id.clone(), seen);
    }

    fn pool(&mut self, pool: &PoolInfo, now: Instant, facts: &mut Vec<Fact>) {
        let building = pool.state == PoolState::BuildingTemplate;
        let Some(before) = self.pools.get(&pool.name).cloned() else {
            facts.push(Fact::PoolAdded {
                pool: pool.name.clone(),
            });
            self.pools.insert(
                pool.name.clone(),
                SeenPool {
                    mode: pool.mode,
                    template_ready: pool.template_ready,
                    building_since: building.then_some(now),
                },
            );
            return;
        };
        let mut seen = SeenPool {
            mode: pool.mode,
            template_ready: pool.template_ready,
            building_since: before.building_since.or(building.then_some(now)),
        };
        // While a build runs the pool has no template (`templateReady` is
        // false); it gets one when the build succeeds. A failed build
        // backs off ("backoff", or "failed" after several).
        if !before.template_ready && pool.template_ready {
            facts.push(Fact::TemplateBuilt {
                pool: pool.name.clone(),
                took: before
                    .building_since
                    .map(|t| now.saturating_duration_since(t)),
            });
            seen.building_since = None;
        } else if before.building_since.is_some()
            && !pool.template_ready
            && matches!(pool.state, PoolState::Backoff | PoolState::Failed)
        {
            facts.push(Fact::TemplateFailed {
                pool: pool.name.clone(),
                error: pool.last_error.clone(),
            });
            seen.building_since = None;
        }
        self.pools.insert(pool.name.clone(), seen);
    }
}

fn seen_vm(vm: &VmInfo, told_start: Option<u64>) -> SeenVm {
    SeenVm {
        name: vm.name.clone(),
        pool: vm.pool.clone(),
        state: vm.state,
        holder: vm.leased_by.clone(),
        told_start,
    }
}

/// Follow the engine: seed a [`Tracker`] with what exists, then hand
/// `tell` every fact of every event. Missed events (a slow follower) are
/// reported and the tracker seeded again. Ends when the engine does.
/// Subscribes before it returns, so no event after the call is missed;
/// those that come while it lists what exists are already in the lists,
/// so their facts are folded into the seed rather than told.
pub fn spawn(engine: EngineHandle, mut tell: impl FnMut(&Fact) + Send + 'static) -> JoinHandle<()> {
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        let mut tracker = Tracker::default();
        seed(&engine, &mut tracker).await;
        loop {
            match events.recv().await {
                Ok(event) => {
                    for fact in tracker.apply(&event, Instant::now()) {
                        tell(&fact);
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "lifecycle: events were missed; their facts are not told"
                    );
                    seed(&engine, &mut tracker).await;
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

async fn seed(engine: &EngineHandle, tracker: &mut Tracker) {
    let listed = async {
        Ok::<_, kiln_engine::EngineError>((
            engine.list_vms().await?,
            engine.list_pools().await?,
            engine.list_images().await?,
        ))
    };
    match listed.await {
        Ok((vms, pools, images)) => tracker.seed(&vms, &pools, &images, Instant::now()),
        Err(e) => warn!(error = %e.message(), "lifecycle: cannot list what exists"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn vm(id: &str, state: VmState) -> VmInfo {
        let json = serde_json::json!({
            "id": id, "name": format!("n-{id}"), "state": state, "vcpus": 1,
            "memoryMiB": 128, "accel": "tcg", "createdAt": 1, "display": "none",
        });
        serde_json::from_value(json).expect("a VmInfo")
    }

    fn pool(name: &str, state: PoolState, template_ready: bool) -> PoolInfo {
        let json = serde_json::json!({
            "name": name, "mode": "template", "warm": 1, "max": 2,
            "refillConcurrency": 1, "recycleOnExpiry": false, "state": state,
            "hot": 0, "booting": 0, "leased": 0, "failed": 0, "waiting": 0,
            "templateReady": template_ready, "source": "/p.toml", "vm": {},
        });
        serde_json::from_value(json).expect("a PoolInfo")
    }

    fn changed(vm: &VmInfo) -> EngineEvent {
        EngineEvent::VmChanged { vm: vm.clone() }
    }

    #[test]
    fn a_pool_vm_is_created_started_acquired_released_and_deleted() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let p = pool("web", PoolState::Ready, true);
        assert_eq!(
            t.apply(&EngineEvent::PoolChanged { pool: p }, now),
            [Fact::PoolAdded { pool: "web".into() }]
        );
        let mut v = vm("a", VmState::Created);
        v.pool = Some("web".into());
        let facts = t.apply(&EngineEvent::VmAdded { vm: v.clone() }, now);
        assert!(matches!(&facts[..], [Fact::VmCreated { pool: Some(p), .. }] if p == "web"));
        v.state = VmState::Booting;
        v.started_at = Some(1_000_000);
        assert!(t.apply(&changed(&v), now).is_empty());
        v.state = VmState::Ready;
        v.ready_at = Some(1_250_000);
        let facts = t.apply(&changed(&v), now);
        assert_eq!(
            facts,
            [Fact::VmStarted {
                vm: "a".into(),
                name: "n-a".into(),
                pool: Some("web".into()),
                took: Duration::from_millis(250),
                cloned: true,
            }]
        );
        // The same launch seen again (another change) is no new start.
        assert!(t.apply(&changed(&v), now).is_empty());
        v.state = VmState::Leased;
        v.leased_by = Some("uid:0".into());
        let facts = t.apply(&changed(&v), now);
        assert!(matches!(&facts[..], [Fact::VmAcquired { holder, .. }] if holder == "uid:0"));
        let facts = t.apply(&EngineEvent::VmRemoved { id: "a".into() }, now);
        assert!(
            matches!(
                &facts[..],
                [Fact::VmReleased { .. }, Fact::VmDeleted { .. }]
            ),
            "{facts:?}"
        );
    }

    #[test]
    fn an_expired_lease_is_no_release_and_a_reboot_no_start() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let mut v = vm("b", VmState::Leased);
        v.started_at = Some(10);
        v.ready_at = Some(20);
        v.leased_by = Some("uid:1".into());
        // Seeded: up and leased already, nothing to tell.
        t.seed(std::slice::from_ref(&v), &[], &[], now);
        assert!(t.apply(&changed(&v), now).is_empty());
        // A reboot: booting, then ready again with the same launch.
        v.state = VmState::Booting;
        v.ready_at = None;
        assert!(t.apply(&changed(&v), now).is_empty());
        v.state = VmState::Leased;
        v.ready_at = Some(90);
        assert!(t.apply(&changed(&v), now).is_empty());
        let expired = EngineEvent::LeaseExpired {
            id: "b".into(),
            pool: None,
            holder: "uid:1".into(),
        };
        assert!(matches!(
            &t.apply(&expired, now)[..],
            [Fact::LeaseExpired { .. }]
        ));
        v.state = VmState::Stopping;
        v.leased_by = None;
        assert!(t.apply(&changed(&v), now).is_empty());
        v.state = VmState::Failed;
        v.last_error = Some("boom".into());
        let facts = t.apply(&changed(&v), now);
        assert!(
            matches!(&facts[..], [Fact::VmFailed { error: Some(e), .. }] if e == "boom"),
            "{facts:?}"
        );
        let facts = t.apply(&EngineEvent::VmRemoved { id: "b".into() }, now);
        assert!(matches!(&facts[..], [Fact::VmDeleted { .. }]), "{facts:?}");
    }

    #[test]
    fn template_builds_are_timed_from_their_start_and_failures_told() {
        let mut t = Tracker::default();
        let start = Instant::now();
        let later = start + Duration::from_secs(3);
        t.seed(
            &[],
            &[pool("ci", PoolState::BuildingTemplate, false)],
            &[],
            start,
        );
        let built = EngineEvent::PoolChanged {
            pool: pool("ci", PoolState::Filling, true),
        };
        assert_eq!(
            t.apply(&built, later),
            [Fact::TemplateBuilt {
                pool: "ci".into(),
                took: Some(Duration::from_secs(3)),
            }]
        );
        // A new build (new key: no template meanwhile) that fails.
        let building = EngineEvent::PoolChanged {
            pool: pool("ci", PoolState::BuildingTemplate, false),
        };
        assert!(t.apply(&building, later).is_empty());
        let mut failed = pool("ci", PoolState::Backoff, false);
        failed.last_error = Some("template: no kernel".into());
        let facts = t.apply(
            &EngineEvent::PoolChanged {
                pool: failed.clone(),
            },
            later,
        );
        assert!(matches!(
            &facts[..],
            [Fact::TemplateFailed { error: Some(_), .. }]
        ));
        // Told once.
        assert!(t
            .apply(&EngineEvent::PoolChanged { pool: failed }, later)
            .is_empty());
        let removed = EngineEvent::PoolRemoved { name: "ci".into() };
        assert_eq!(
            t.apply(&removed, later),
            [Fact::PoolRemoved { pool: "ci".into() }]
        );
    }
}
