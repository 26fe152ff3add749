//! kilnd: the Kiln node daemon.
//!
//! Wires the engine to its surroundings: config, logging, signals, the
//! D-Bus and varlink adapters, systemd notification and machined
//! registration. A `select!` here supervises every long-running part; any
//! of them ending starts an orderly shutdown.

mod config;
mod machined;
mod notify;

use std::path::PathBuf;

use anyhow::Context;
use kiln_engine::Engine;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

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
    // structured fields instead of text.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
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

fn main() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let config = DaemonConfig::load(args.config.as_deref())?;
    init_logging(&config.daemon.log_level);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(config))
}

async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (engine, mut engine_task) = Engine::start(config.engine.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))
        .context("cannot start the engine")?;
    let endpoint = kiln_varlink::Endpoint::from_env_or(&config.daemon.varlink_socket);
    let authorizer = kiln_varlink::Authorizer::new(&config.daemon.manage_group);
    kiln_varlink::spawn(endpoint, engine.clone(), authorizer).context("cannot serve varlink")?;
    let mut dbus = start_dbus(&config, &engine).await?;
    let status = engine
        .status()
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))?;
    info!(version = %status.version, accel = %status.accel, vms = status.vms, varlink = %config.daemon.varlink_socket.display(), "kilnd running");
    let _machined = machined::spawn(engine.clone()).map(AbortOnDrop);
    // State is reconciled and both APIs serve: tell systemd.
    notify::ready(&engine).await;
    let _notifier = notify::spawn(engine.clone()).map(AbortOnDrop);

    let dbus_stopped = async {
        match dbus.as_mut() {
            Some(d) => d.finished().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received"),
        _ = sigint.recv() => info!("SIGINT received"),
        _ = &mut engine_task => anyhow::bail!("engine stopped unexpectedly"),
        _ = dbus_stopped => anyhow::bail!("D-Bus adapter stopped unexpectedly"),
    }
    notify::stopping();
    drop(dbus);
    engine.shutdown(config.daemon.stop_vms_on_exit).await.ok();
    let _ = engine_task.await;
    info!("kilnd stopped");
    Ok(())
}

/// A background task that ends with the scope that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "dbus: continuing without D-Bus"
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::from(e).context("cannot serve D-Bus")),
    }
}
