//! kilnd's metrics in the OpenMetrics and Prometheus text formats
//! (`docs/metrics.md` lists every one).
//!
//! Two kinds, kept apart:
//! - what *is* (pool fill, VMs by state, CPU and memory of VMs, the image
//!   store, kilnd's own process) is read at each scrape ([`sample`]) from
//!   the engine's lists, so it is never stale;
//! - what *happened* (acquires and their latency, errors by name, boots,
//!   clones, template builds, failures, pulls) is counted as it happens:
//!   lifecycle facts from the engine's events ([`Metrics::record`]) and
//!   what the adapters' observed engine handles report
//!   ([`Metrics::observer`]).
//!
//! Labels are bounded: pool names (a set the operator defines), transport,
//! error names (the engine's fixed list), states. No VM id is ever a
//! label; per-VM usage is summed per pool.
//!
//! [`http`] serves it all on a unix socket and, when configured, TCP.

pub mod http;
pub mod sample;

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln_engine::error::ErrorName;
use kiln_engine::observe::{CallObserver, ImageJobKind};
use kiln_engine::{EngineHandle, PoolState, VmState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};
use serde::Serialize;

use crate::lifecycle::Fact;
use sample::{EngineSample, ProcessSample, Sample};

/// How long a scrape waits for the engine's lists.
pub const ENGINE_DEADLINE: Duration = Duration::from_secs(5);

/// Bucket bounds of acquire latency, seconds: a hot acquire is
/// milliseconds, one that waits for a boot seconds.
const ACQUIRE_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds of boots and clones (launch to agent answer), seconds.
const BOOT_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket bounds of template builds, seconds.
const BUILD_BUCKETS: [f64; 10] = [1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text: what Prometheus asks for first.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: for everyone else (`curl`,
    /// `promtool check metrics`).
    Text,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcquireLabels {
    pool: String,
    transport: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcquireErrorLabels {
    pool: String,
    transport: String,
    error: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    transport: String,
    error: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    pool: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    pool: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfoLabels {
    version: String,
    accel: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A gauge's name, help and how its value is read from an `I`.
type Described<I, O> = (&'static str, &'static str, fn(&I) -> O);

/// What the running VMs of one pool use, summed.
#[derive(Debug, Default)]
struct PoolUsage {
    cpu_seconds: f64,
    memory_bytes: u64,
    pss_bytes: u64,
}

fn acquire_histogram() -> Histogram {
    Histogram::new(ACQUIRE_BUCKETS)
}
fn boot_histogram() -> Histogram {
    Histogram::new(BOOT_BUCKETS)
}
fn build_histogram() -> Histogram {
    Histogram::new(BUILD_BUCKETS)
}

/// What happened, counted. Cheap to clone (shared counters).
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    acquire_seconds: Histograms<AcquireLabels>,
    acquire_failures: Family<AcquireErrorLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    boot_seconds: Histograms<PoolLabels>,
    clone_seconds: Histograms<PoolLabels>,
    template_builds: Family<BuildLabels, Counter>,
    template_build_seconds: Histograms<PoolLabels>,
    vm_failures: Family<PoolLabels, Counter>,
    oom_kills: Family<PoolLabels, Counter>,
    lease_expiries: Family<PoolLabels, Counter>,
    image_pulls: Family<ResultLabels, Counter>,
    image_imports: Family<ResultLabels, Counter>,
    /// Pools that exist: an `Acquire` naming another one is counted with
    /// `pool=""`, so callers cannot mint label values.
    pools: RwLock<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Nothing counted yet.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                acquire_seconds: Family::new_with_constructor(acquire_histogram),
                acquire_failures: Family::default(),
                errors: Family::default(),
                boot_seconds: Family::new_with_constructor(boot_histogram),
                clone_seconds: Family::new_with_constructor(boot_histogram),
                template_builds: Family::default(),
                template_build_seconds: Family::new_with_constructor(build_histogram),
                vm_failures: Family::default(),
                oom_kills: Family::default(),
                lease_expiries: Family::default(),
                image_pulls: Family::default(),
                image_imports: Family::default(),
                pools: RwLock::new(HashSet::new()),
            }),
        }
    }

    /// Learn the pools that exist when kilnd starts (later ones come as
    /// facts and with each scrape).
    pub async fn learn_pools(&self, engine: &EngineHandle) {
        if let Ok(pools) = engine.list_pools().await {
            self.known_pools(pools.into_iter().map(|p| p.name));
        }
    }

    fn known_pools(&self, names: impl Iterator<Item = String>) {
        let mut known = self.inner.pools.write().unwrap_or_else(|p| p.into_inner());
        known.clear();
        known.extend(names);
    }

    fn pool_label(&self, pool: &str) -> String {
        let known = self.inner.pools.read().unwrap_or_else(|p| p.into_inner());
        match known.contains(pool) {
            true => pool.to_owned(),
            false => String::new(),
        }
    }

    /// Count a lifecycle fact.
    pub fn record(&self, fact: &Fact) {
        let m = &self.inner;
        let pool = |p: &Option<String>| PoolLabels {
            pool: p.clone().unwrap_or_default(),
        };
        match fact {
            Fact::VmStarted {
                pool: p,
                took,
                cloned,
                ..
            } => {
                let family = if *cloned {
                    &m.clone_seconds
                } else {
                    &m.boot_seconds
                };
                family.get_or_create(&pool(p)).observe(took.as_secs_f64());
            }
            Fact::VmFailed { pool: p, .. } => {
                m.vm_failures.get_or_create(&pool(p)).inc();
            }
            Fact::VmOomKilled { pool: p, .. } => {
                m.oom_kills.get_or_create(&pool(p)).inc();
            }
            Fact::LeaseExpired { pool: p, .. } => {
                m.lease_expiries.get_or_create(&pool(p)).inc();
            }
            Fact::TemplateBuilt { pool: p, took } => {
                let labels = BuildLabels {
                    pool: p.clone(),
                    result: "ok".into(),
                };
                m.template_builds.get_or_create(&labels).inc();
                if let Some(took) = took {
                    let labels = PoolLabels { pool: p.clone() };
                    m.template_build_seconds
                        .get_or_create(&labels)
                        .observe(took.as_secs_f64());
                }
            }
            Fact::TemplateFailed { pool: p, .. } => {
                let labels = BuildLabels {
                    pool: p.clone(),
                    result: "failed".into(),
                };
                m.template_builds.get_or_create(&labels).inc();
            }
            Fact::PoolAdded { pool: p } => {
                let mut known = m.pools.write().unwrap_or_else(|e| e.into_inner());
                known.insert(p.clone());
            }
            Fact::PoolRemoved { pool: p } => {
                let mut known = m.pools.write().unwrap_or_else(|e| e.into_inner());
                known.remove(p);
            }
            Fact::VmCreated { .. }
            | Fact::VmStopped { .. }
            | Fact::VmDeleted { .. }
            | Fact::VmAcquired { .. }
            | Fact::VmReleased { .. }
            | Fact::ImageStored { .. }
            | Fact::ImageRemoved { .. } => {}
        }
    }

    /// The observer of one adapter's engine handle (`transport`:
    /// `varlink`, `dbus`).
    pub fn observer(&self, transport: &'static str) -> Arc<dyn CallObserver> {
        Arc::new(Observer {
            metrics: self.clone(),
            transport,
        })
    }

    /// Read what is and render everything in `format`.
    pub async fn scrape(&self, engine: &EngineHandle, format: Format) -> String {
        let sample = sample::take(engine, ENGINE_DEADLINE).await;
        if let Some(engine) = &sample.engine {
            self.known_pools(engine.pools.iter().map(|p| p.name.clone()));
        }
        self.render(&sample, format)
    }

    /// Render the counters with `sample`'s gauges.
    pub fn render(&self, sample: &Sample, format: Format) -> String {
        let mut root = Registry::default();
        register_process(root.sub_registry_with_prefix("process"), &sample.process);
        let kiln = root.sub_registry_with_prefix("kiln");
        self.register_counted(kiln);
        let responding: Gauge = Gauge::default();
        responding.set(i64::from(sample.engine.is_some()));
        kiln.register(
            "engine_responding",
            "1 when the engine answered this scrape's lists in time, else 0 (and no engine gauges)",
            responding,
        );
        let took: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        took.set(sample.took.as_secs_f64());
        kiln.register_with_unit(
            "scrape_read",
            "How long this scrape took to read the engine and /proc",
            Unit::Seconds,
            took,
        );
        if let Some(engine) = &sample.engine {
            register_engine(kiln, engine);
        }
        let mut out = String::new();
        let encoded = match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &root),
            Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &root),
        };
        // Writing to a String cannot fail; an encoder error would be a bug.
        if let Err(e) = encoded {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        out
    }

    /// The counters and histograms (clones sharing their values).
    fn register_counted(&self, r: &mut Registry) {
        let m = &self.inner;
        r.register_with_unit(
            "acquire_duration",
            "Acquire calls that got a VM: time from the adapter's call to the engine's reply \
             (waiting for a boot included), by pool and transport",
            Unit::Seconds,
            m.acquire_seconds.clone(),
        );
        r.register(
            "acquire_failures",
            "Acquire calls that failed, by pool (\"\" for a pool that does not exist), transport \
             and error name",
            m.acquire_failures.clone(),
        );
        r.register(
            "errors",
            "Engine errors returned to calls over each transport, by error name",
            m.errors.clone(),
        );
        r.register(
            "template_builds",
            "Template builds that ended, by pool and result (ok, failed)",
            m.template_builds.clone(),
        );
        let per_pool_seconds = [
            (
                "vm_boot_duration",
                "Full boots (not clones): QEMU launched to guest agent answering, by pool \
                 (\"\": no pool)",
                &m.boot_seconds,
            ),
            (
                "vm_clone_duration",
                "Clones of a template pool's template: QEMU launched to guest agent answering, \
                 by pool",
                &m.clone_seconds,
            ),
            (
                "template_build_duration",
                "Successful template builds, by pool",
                &m.template_build_seconds,
            ),
        ];
        for (name, help, family) in per_pool_seconds {
            r.register_with_unit(name, help, Unit::Seconds, family.clone());
        }
        let per_pool = [
            (
                "vm_failures",
                "VMs that became failed (QEMU died or never came up), by pool (\"\": no pool)",
                &m.vm_failures,
            ),
            (
                "vm_oom_kills",
                "VMs whose QEMU the OOM killer ended at its memory cap, by pool",
                &m.oom_kills,
            ),
            (
                "lease_expiries",
                "Leases that reached their deadline, by pool",
                &m.lease_expiries,
            ),
        ];
        register_all(r, &per_pool);
        let image_jobs = [
            (
                "image_pulls",
                "PullImage jobs that ended, by result (ok or the error name)",
                &m.image_pulls,
            ),
            (
                "image_imports",
                "ImportImage jobs that ended, by result (ok or the error name)",
                &m.image_imports,
            ),
        ];
        register_all(r, &image_jobs);
    }
}

/// Register clones of `metrics` (name, help, metric) with `r`.
fn register_all<M: Metric + Clone>(r: &mut Registry, metrics: &[(&str, &str, &M)]) {
    for (name, help, metric) in metrics {
        r.register(*name, *help, (*metric).clone());
    }
}

/// Tells [`Metrics`] what an adapter's engine handle saw.
#[derive(Debug)]
struct Observer {
    metrics: Metrics,
    transport: &'static str,
}

impl CallObserver for Observer {
    fn failed(&self, name: ErrorName) {
        let labels = ErrorLabels {
            transport: self.transport.into(),
            error: name.to_string(),
        };
        self.metrics.inner.errors.get_or_create(&labels).inc();
    }

    fn acquired(&self, pool: &str, elapsed: Duration, outcome: Result<(), ErrorName>) {
        let m = &self.metrics.inner;
        match outcome {
            // It handed out a VM: the pool exists.
            Ok(()) => {
                let labels = AcquireLabels {
                    pool: pool.into(),
                    transport: self.transport.into(),
                };
                m.acquire_seconds
                    .get_or_create(&labels)
                    .observe(elapsed.as_secs_f64());
            }
            Err(name) => {
                let labels = AcquireErrorLabels {
                    pool: self.metrics.pool_label(pool),
                    transport: self.transport.into(),
                    error: name.to_string(),
                };
                m.acquire_failures.get_or_create(&labels).inc();
            }
        }
    }

    fn image_job(&self, kind: ImageJobKind, outcome: Result<(), ErrorName>) {
        let labels = ResultLabels {
            result: match outcome {
                Ok(()) => "ok".into(),
                Err(name) => name.to_string(),
            },
        };
        let family = match kind {
            ImageJobKind::Pull => &self.metrics.inner.image_pulls,
            ImageJobKind::Import => &self.metrics.inner.image_imports,
        };
        family.get_or_create(&labels).inc();
    }
}

/// A value's serde spelling (`building-template`, `leased`), as the APIs
/// show it.
fn spelling<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Every pool state, for the one-hot `kiln_pool_state`.
fn pool_states() -> [PoolState; 5] {
    // A new state makes this match fail to compile: add it below too.
    match PoolState::Ready {
        PoolState::Filling
        | PoolState::Ready
        | PoolState::BuildingTemplate
        | PoolState::Backoff
        | PoolState::Failed => {}
    }
    [
        PoolState::Filling,
        PoolState::Ready,
        PoolState::BuildingTemplate,
        PoolState::Backoff,
        PoolState::Failed,
    ]
}

/// A gauge family holding `values`.
fn gauges<L>(values: impl IntoIterator<Item = (L, i64)>) -> Family<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq + std::fmt::Debug + EncodeLabelSet + Send + Sync + 'static,
{
    let family: Family<L, Gauge> = Family::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(value);
    }
    family
}

fn register_engine(r: &mut Registry, e: &EngineSample) {
    if let Some(status) = &e.status {
        r.register(
            "build",
            "kilnd's version and default accelerator",
            Info::new(BuildInfoLabels {
                version: status.version.clone(),
                accel: status.accel.to_string(),
            }),
        );
    }
    let fill = e.pools.iter().flat_map(|p| {
        [("hot", p.hot), ("booting", p.booting), ("leased", p.leased)].map(|(state, n)| {
            let labels = PoolStateLabels {
                pool: p.name.clone(),
                state: state.into(),
            };
            (labels, i64::from(n))
        })
    });
    r.register(
        "pool_vms",
        "VMs a pool owns: hot (ready to hand out), booting (or being cloned), leased",
        gauges(fill),
    );
    let per_pool: [Described<kiln_engine::PoolInfo, u32>; 5] = [
        (
            "pool_waiting",
            "Acquire calls waiting for a VM of the pool",
            |p| p.waiting,
        ),
        (
            "pool_boot_failures",
            "Boots (or template builds) of the pool that failed since the last one that worked",
            |p| p.failed,
        ),
        (
            "pool_warm",
            "Hot VMs the pool keeps (its warm setting)",
            |p| p.warm,
        ),
        (
            "pool_max",
            "Most VMs the pool may own (its max setting)",
            |p| p.max,
        ),
        (
            "pool_template_ready",
            "1 when the pool's template is built and on disk (template pools), else 0",
            |p| u32::from(p.template_ready),
        ),
    ];
    for (name, help, value) in per_pool {
        let values = e.pools.iter().map(|p| {
            let labels = PoolLabels {
                pool: p.name.clone(),
            };
            (labels, i64::from(value(p)))
        });
        r.register(name, help, gauges(values));
    }
    let states = e.pools.iter().flat_map(|p| {
        pool_states().map(|s| {
            let labels = PoolStateLabels {
                pool: p.name.clone(),
                state: spelling(&s),
            };
            (labels, i64::from(p.state == s))
        })
    });
    r.register(
        "pool_state",
        "Where each pool stands: 1 for its current state, 0 for the others",
        gauges(states),
    );
    let by_state = kiln_engine::state::ALL_STATES.map(|s: VmState| {
        let n = e.vms.iter().filter(|vm| vm.state == s).count();
        (
            StateLabels {
                state: spelling(&s),
            },
            n as i64,
        )
    });
    r.register("vms", "VMs by state", gauges(by_state));

    // Per-pool sums of what running VMs use ("" for VMs in no pool).
    let mut cpu: std::collections::BTreeMap<String, PoolUsage> = Default::default();
    for pool in e.pools.iter().map(|p| p.name.clone()) {
        cpu.entry(pool).or_default();
    }
    for (pool, usage) in &e.usage {
        let entry = cpu.entry(pool.clone().unwrap_or_default()).or_default();
        entry.cpu_seconds += usage.cpu_usec as f64 / 1e6;
        // The cgroup's charge; the process's RSS where there is no cgroup.
        entry.memory_bytes += match usage.memory_bytes {
            0 => usage.rss_bytes,
            charged => charged,
        };
        entry.pss_bytes += usage.pss_bytes;
    }
    let cpu_seconds: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>> =
        Family::default();
    for (pool, sums) in &cpu {
        let labels = PoolLabels { pool: pool.clone() };
        cpu_seconds.get_or_create(&labels).set(sums.cpu_seconds);
    }
    r.register_with_unit(
        "vm_cpu",
        "CPU time used by the QEMU processes of the running VMs of each pool (\"\": no pool), \
         summed now: it drops when VMs go",
        Unit::Seconds,
        cpu_seconds,
    );
    let bytes: [Described<PoolUsage, u64>; 2] = [
        (
            "vm_memory",
            "Memory charged to the running VMs of each pool (their cgroups; RSS without one)",
            |sums| sums.memory_bytes,
        ),
        (
            "vm_pss",
            "Proportional set size of the running VMs' QEMUs of each pool: template pages \
             shared by clones counted once in all",
            |sums| sums.pss_bytes,
        ),
    ];
    for (name, help, value) in bytes {
        let values = cpu.iter().map(|(pool, sums)| {
            let labels = PoolLabels { pool: pool.clone() };
            (labels, value(sums) as i64)
        });
        r.register_with_unit(name, help, Unit::Bytes, gauges(values));
    }

    // The store: layers are shared between images, count each once.
    let mut layers: std::collections::HashMap<&str, u64> = Default::default();
    for layer in e.images.iter().flat_map(|i| &i.layers) {
        layers.insert(layer.diff_id.as_str(), layer.erofs_size);
    }
    let images: Gauge = Gauge::default();
    images.set(e.images.len() as i64);
    r.register("images", "Images in the image store", images);
    let layer_count: Gauge = Gauge::default();
    layer_count.set(layers.len() as i64);
    r.register(
        "image_layers",
        "Distinct layers of the stored images",
        layer_count,
    );
    let bytes: Gauge = Gauge::default();
    bytes.set(layers.values().sum::<u64>() as i64);
    r.register_with_unit(
        "image_store",
        "Bytes of the stored images' erofs layers, each layer once",
        Unit::Bytes,
        bytes,
    );
}

fn register_process(r: &mut Registry, p: &ProcessSample) {
    let gauge = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(v as i64);
        g
    };
    r.register_with_unit(
        "resident_memory",
        "kilnd's resident memory size",
        Unit::Bytes,
        gauge(p.resident_bytes),
    );
    r.register_with_unit(
        "virtual_memory",
        "kilnd's virtual memory size",
        Unit::Bytes,
        gauge(p.virtual_bytes),
    );
    r.register(
        "open_fds",
        "kilnd's open file descriptors",
        gauge(p.open_fds),
    );
    r.register(
        "max_fds",
        "kilnd's limit of open file descriptors",
        gauge(p.max_fds),
    );
    r.register_with_unit(
        "cpu",
        "kilnd's user and system CPU time",
        Unit::Seconds,
        ConstCounter::new(p.cpu_seconds),
    );
    let start: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    start.set(p.start_time_seconds);
    r.register_with_unit(
        "start_time",
        "When kilnd started, seconds since the epoch",
        Unit::Seconds,
        start,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn sample() -> Sample {
        Sample {
            engine: None,
            process: ProcessSample {
                resident_bytes: 4096,
                open_fds: 9,
                ..Default::default()
            },
            took: Duration::from_millis(2),
        }
    }

    #[test]
    fn facts_and_observations_are_counted_with_bounded_labels() {
        let m = Metrics::new();
        m.record(&Fact::PoolAdded { pool: "web".into() });
        m.record(&Fact::VmStarted {
            vm: "a".into(),
            name: "a".into(),
            pool: Some("web".into()),
            took: Duration::from_millis(300),
            cloned: true,
        });
        let varlink = m.observer("varlink");
        varlink.acquired("web", Duration::from_millis(3), Ok(()));
        varlink.acquired("web", Duration::from_secs(1), Err(ErrorName::PoolExhausted));
        // A pool nobody defined does not become a label value.
        varlink.acquired(
            "no-such-pool-1234",
            Duration::ZERO,
            Err(ErrorName::NoSuchPool),
        );
        varlink.failed(ErrorName::NoSuchPool);
        m.observer("dbus")
            .image_job(ImageJobKind::Pull, Err(ErrorName::ImagePullFailed));
        let text = m.render(&sample(), Format::Text);
        for line in [
            "kiln_vm_clone_duration_seconds_count{pool=\"web\"} 1",
            "kiln_vm_clone_duration_seconds_bucket{pool=\"web\",le=\"0.5\"} 1",
            "kiln_acquire_duration_seconds_bucket{pool=\"web\",transport=\"varlink\",le=\"0.005\"} 1",
            "kiln_acquire_failures_total{pool=\"web\",transport=\"varlink\",error=\"PoolExhausted\"} 1",
            "kiln_acquire_failures_total{pool=\"\",transport=\"varlink\",error=\"NoSuchPool\"} 1",
            "kiln_errors_total{transport=\"varlink\",error=\"NoSuchPool\"} 1",
            "kiln_image_pulls_total{result=\"ImagePullFailed\"} 1",
            "kiln_engine_responding 0",
            "process_resident_memory_bytes 4096",
            "process_open_fds 9",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("no-such-pool"), "{text}");
        let om = m.render(&sample(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            om.contains("# TYPE kiln_acquire_duration_seconds histogram"),
            "{om}"
        );
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::from_accept(None), Format::Text);
        assert!(Format::OpenMetrics
            .content_type()
            .starts_with("application/openmetrics-text; version=1.0.0"));
    }
}
