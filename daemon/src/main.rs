//! kilnd: the Kiln node daemon.
//!
//! Wires the engine to its surroundings: config, logging, signals, the
//! D-Bus and varlink adapters, systemd notification and machined
//! registration, lifecycle facts to the journal, metrics. A `select!` here
//! supervises every long-running part; any of them ending starts an
//! orderly shutdown.

mod config;
mod journal;
mod lifecycle;
mod machined;
mod metrics;
mod notify;
mod residency;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_engine::Engine;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::DaemonConfig;

const USAGE: &str = "usage: kilnd [--config FILE] [--version] [--help]";

struct Args {
    config: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut config = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--version" | "-V") => {
                println!("kilnd {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Some("--config" | "-c") => {
                config = Some(PathBuf::from(args.next().context("--config needs a file")?));
            }
            _ => anyhow::bail!("unexpected argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(Some(Args { config }))
}

fn init_logging(default_filter: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Under systemd, stderr is connected to the journal: log natively with
    // structured fields instead of text. Fields keep their own names (no
    // `F_` prefix), so `message_id` is the journal's `MESSAGE_ID=`
    // (`journal.rs`) and `vm` is `VM=`.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer().map(|l| l.with_field_prefix(None)) {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a person at a terminal, not in log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line: what the journal and
            // `systemctl status` show.
            eprintln!("kilnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let config = DaemonConfig::load(args.config.as_deref())?;
    init_logging(&config.daemon.log_level);
    raise_fd_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Shorter than residency::QUIET_FOR: an idle blocking thread has
        // exited (running libc's exit paths) before kilnd settles, not
        // after, which left those pages mapped to the end of a run.
        .thread_keep_alive(residency::BLOCKING_THREAD_KEEP_ALIVE)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(config))
}

/// Every VM holds a few descriptors in kilnd (QMP, agent, pidfd, TAP
/// while it starts), so 200 VMs pass the usual soft limit of 1024. Raise
/// it to the hard limit, as systemd advises for programs that need many
/// (none of kilnd's own code uses select(2)); the unit's LimitNOFILE sets
/// the hard one. Children inherit it: QEMU and the erofs tools poll too.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
            && {
                let wanted = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
            }
    };
    if raised {
        tracing::debug!(
            from = limit.rlim_cur,
            to = limit.rlim_max,
            "descriptor limit raised"
        );
    }
}

/// The long-running parts besides the engine that `supervise` watches.
/// Dropping them disconnects D-Bus and ends the tasks; the varlink thread
/// serves on until the process exits.
#[derive(Default)]
struct Parts {
    varlink: Option<kiln_varlink::Server>,
    dbus: Option<kiln_dbus::Service>,
    /// `STATUS=` and `WATCHDOG=1` (only under a service manager).
    notifier: Option<AbortOnDrop>,
    /// machined registration (only on a system booted with systemd).
    machined: Option<AbortOnDrop>,
    /// Lifecycle facts to the journal and the metrics.
    lifecycle: Option<AbortOnDrop>,
    /// The metrics endpoint.
    metrics: Option<AbortOnDrop>,
    /// Gives back memory kilnd no longer uses once it is quiet.
    settler: Option<AbortOnDrop>,
}

async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (engine, engine_task) = Engine::start(config.engine.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))
        .context("cannot start the engine")?;
    // `None` once it has ended (a JoinHandle must not be awaited twice).
    let mut engine_task = Some(AbortOnDrop(engine_task));

    // From here on the engine runs: every way out, an API that fails to
    // start included, goes through the orderly shutdown below.
    let mut parts = Parts::default();
    // Following events from the start, before any caller can change things.
    let metrics = metrics::Metrics::new();
    metrics.learn_pools(&engine).await;
    let counted = metrics.clone();
    parts.lifecycle = Some(AbortOnDrop(lifecycle::spawn(engine.clone(), move |fact| {
        journal::log(fact);
        counted.record(fact);
    })));
    // A signal also ends a start that hangs (a bus that never answers).
    let started = tokio::select! {
        started = start(&config, &engine, &metrics, &mut parts) => started.map(|()| true),
        _ = sigterm.recv() => Ok(false),
        _ = sigint.recv() => Ok(false),
    };
    let outcome = match started {
        Ok(true) => {
            // State is reconciled and both APIs serve: tell systemd.
            notify::ready(&engine).await;
            parts.notifier = notify::spawn(engine.clone()).map(AbortOnDrop);
            // Start-up's pages are not needed any more (residency.rs).
            parts.settler = Some(AbortOnDrop(tokio::spawn(residency::settle_when_quiet(
                engine.subscribe(),
            ))));
            supervise(&mut engine_task, &mut parts, &mut sigterm, &mut sigint).await
        }
        Ok(false) => {
            info!("stop requested during start-up");
            Ok(())
        }
        // No READY=1: systemd sees a start that failed.
        Err(e) => Err(e),
    };

    let status = match &outcome {
        Ok(()) => "stopping".to_owned(),
        // A newline would end the STATUS= assignment.
        Err(e) => format!("stopping: {e:#}").replace('\n', " "),
    };
    notify::stopping(&status);
    drop(parts);
    if engine_task.is_some() {
        // A failure keeps the VMs whatever `stop_vms_on_exit` says: the
        // restart that follows re-adopts them.
        let stop_vms = outcome.is_ok() && config.daemon.stop_vms_on_exit;
        if let Err(e) = engine.shutdown(stop_vms).await {
            warn!(error = %e.message(), "engine shutdown failed");
        }
        let _ = ended(&mut engine_task).await;
    }
    info!("kilnd stopped");
    outcome
}

/// Serve varlink, D-Bus and metrics and follow the engine for machined.
/// An error names the part that could not start. Each adapter's engine
/// handle tells `metrics` of its calls.
async fn start(
    config: &DaemonConfig,
    engine: &kiln_engine::EngineHandle,
    metrics: &metrics::Metrics,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let endpoint = kiln_varlink::Endpoint::from_env_or(&config.daemon.varlink_socket);
    let authorizer = kiln_varlink::Authorizer::new(&config.daemon.manage_group);
    let observed = engine.observed(metrics.observer("varlink"));
    parts.varlink =
        Some(kiln_varlink::spawn(endpoint, observed, authorizer).context("cannot serve varlink")?);
    let observed = engine.observed(metrics.observer("dbus"));
    parts.dbus = start_dbus(config, &observed).await?;
    let listeners = metrics::http::Listeners::bind(
        &config.engine.runtime_dir.join("metrics"),
        config.daemon.metrics_listen,
    )
    .await
    .context("cannot serve metrics")?;
    let (metrics, scraped) = (metrics.clone(), engine.clone());
    parts.metrics = Some(AbortOnDrop(tokio::spawn(metrics::http::serve(
        listeners,
        move |format| {
            let (metrics, engine) = (metrics.clone(), scraped.clone());
            async move { metrics.scrape(&engine, format).await }
        },
    ))));
    let status = engine
        .status()
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))
        .context("the engine does not answer")?;
    info!(version = %status.version, accel = %status.accel, vms = status.vms, varlink = %config.daemon.varlink_socket.display(), "kilnd running");
    parts.machined = machined::spawn(engine.clone()).map(AbortOnDrop);
    Ok(())
}

/// Wait until a signal asks kilnd to stop (`Ok`) or a long-running part
/// ends or fails (`Err` naming it): the engine, the varlink server, the
/// D-Bus adapter (its connection included), the notifier, machined
/// registration, the lifecycle follower, the metrics server, the memory
/// settler.
async fn supervise(
    engine_task: &mut Option<AbortOnDrop>,
    parts: &mut Parts,
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> anyhow::Result<()> {
    tokio::select! {
        // The engine first: when it ends, the parts that follow it end too,
        // and the error should name the cause.
        biased;
        r = ended(engine_task) => return Err(part_ended("the engine", r)),
        _ = sigterm.recv() => info!("SIGTERM received"),
        _ = sigint.recv() => info!("SIGINT received"),
        e = if_present(parts.varlink.as_mut().map(|v| v.finished())) => {
            return Err(anyhow::Error::new(e).context("the varlink server stopped"));
        }
        // Its message names D-Bus: "the D-Bus connection was lost".
        e = if_present(parts.dbus.as_mut().map(|d| d.finished())) => return Err(e.into()),
        r = ended(&mut parts.notifier) => return Err(part_ended("the service notifier", r)),
        r = ended(&mut parts.machined) => return Err(part_ended("machined registration", r)),
        r = ended(&mut parts.lifecycle) => return Err(part_ended("the lifecycle follower", r)),
        r = ended(&mut parts.metrics) => return Err(part_ended("the metrics server", r)),
        r = ended(&mut parts.settler) => return Err(part_ended("the memory settler", r)),
    }
    Ok(())
}

fn part_ended(part: &str, result: Result<(), tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(()) => anyhow::anyhow!("{part} stopped unexpectedly"),
        Err(e) => anyhow::Error::new(e).context(format!("{part} failed")),
    }
}

/// Resolves with what `finished` resolves with; never when the part is
/// absent (not configured, or not running here).
async fn if_present<F: std::future::Future>(finished: Option<F>) -> F::Output {
    match finished {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A background task that ends with the scope that owns it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when the task ends and leaves `None` behind; never resolves
/// when there is no task.
async fn ended(task: &mut Option<AbortOnDrop>) -> Result<(), tokio::task::JoinError> {
    let Some(t) = task.as_mut() else {
        return std::future::pending().await;
    };
    let result = (&mut t.0).await;
    *task = None;
    result
}

/// Serve D-Bus per the `dbus` key. No system bus is a warning (development
/// machines and containers have none); an explicit bus must work.
async fn start_dbus(
    config: &DaemonConfig,
    engine: &kiln_engine::EngineHandle,
) -> anyhow::Result<Option<kiln_dbus::Service>> {
    let Some(bus) = kiln_dbus::Bus::from_config(&config.daemon.dbus) else {
        info!("dbus: disabled by config");
        return Ok(None);
    };
    let auth = kiln_dbus::Authorizer::new(config.daemon.polkit);
    match kiln_dbus::serve(bus.clone(), engine.clone(), auth).await {
        Ok(service) => Ok(Some(service)),
        Err(e) if bus == kiln_dbus::Bus::System => {
            warn!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "dbus: continuing without D-Bus"
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::from(e).context("cannot serve D-Bus")),
    }
}
