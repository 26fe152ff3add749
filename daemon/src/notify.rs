//! systemd service notification (`sd_notify`): `READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `STOPPING=1`.
//!
//! Everything here is a no-op when kilnd does not run under a service
//! manager (`NOTIFY_SOCKET` unset): development, tests, containers.
//!
//! The watchdog is fed only when the engine actor answers a `Status` call
//! within half the watchdog interval, so a hung engine (not merely a live
//! process) makes systemd restart kilnd.

use std::time::Duration;

use kiln_engine::EngineHandle;
use sd_notify::NotifyState;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How often `STATUS=` is refreshed when no watchdog sets the pace.
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// Fill of one pool, as `STATUS=` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFill {
    /// Pool name.
    pub name: String,
    /// Hot VMs ready to hand out.
    pub hot: usize,
    /// Hot VMs the pool keeps (`warm`).
    pub warm: usize,
}

/// The facts `STATUS=` is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusFacts {
    /// VM records.
    pub vms: usize,
    /// VMs with a QEMU process.
    pub running: usize,
    /// Pools, in the order they should be shown.
    pub pools: Vec<PoolFill>,
}

/// The `STATUS=` text: `"3 VMs, 2 running; default: 2/2 warm"`.
pub fn status_line(facts: &StatusFacts) -> String {
    let plural = if facts.vms == 1 { "" } else { "s" };
    let mut line = format!("{} VM{plural}, {} running", facts.vms, facts.running);
    for (i, pool) in facts.pools.iter().enumerate() {
        line.push_str(if i == 0 { "; " } else { ", " });
        line.push_str(&format!("{}: {}/{} warm", pool.name, pool.hot, pool.warm));
    }
    line
}

/// Ask the engine for the facts `STATUS=` shows, within `deadline`.
/// `None` when the engine does not answer in time (or is gone).
async fn status_facts(engine: &EngineHandle, deadline: Duration) -> Option<StatusFacts> {
    let facts = async {
        Ok::<_, kiln_engine::EngineError>((engine.status().await?, engine.list_pools().await?))
    };
    match tokio::time::timeout(deadline, facts).await {
        Ok(Ok((status, pools))) => Some(StatusFacts {
            vms: status.vms,
            running: status.running,
            pools: pools
                .into_iter()
                .map(|p| PoolFill {
                    name: p.name,
                    hot: p.hot as usize,
                    warm: p.warm as usize,
                })
                .collect(),
        }),
        Ok(Err(e)) => {
            warn!(error = %e.message(), "notify: engine status failed");
            None
        }
        Err(_) => {
            warn!(
                deadline_ms = deadline.as_millis() as u64,
                "notify: engine did not answer a status call"
            );
            None
        }
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "notify: cannot reach the service manager");
    }
}

/// Whether a service manager listens for notifications.
pub fn under_service_manager() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// `READY=1` with a first `STATUS=`. Call once state is reconciled and
/// both APIs serve.
pub async fn ready(engine: &EngineHandle) {
    if !under_service_manager() {
        return;
    }
    let facts = status_facts(engine, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let line = status_line(&facts);
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
}

/// `STOPPING=1`: shutdown has begun, with `status` (why) as `STATUS=`.
/// Also sent when kilnd gives up before `READY=1`.
pub fn stopping(status: &str) {
    if under_service_manager() {
        send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

/// Keep `STATUS=` current and feed the watchdog (`WATCHDOG_USEC`) at half
/// its interval, but only while the engine answers. `None` without a
/// service manager.
pub fn spawn(engine: EngineHandle) -> Option<JoinHandle<()>> {
    if !under_service_manager() {
        return None;
    }
    let watchdog = sd_notify::watchdog_enabled();
    Some(tokio::spawn(run(engine, watchdog)))
}

async fn run(engine: EngineHandle, watchdog: Option<Duration>) {
    let period = watchdog.map_or(STATUS_REFRESH, |w| w / 2);
    let mut events = engine.subscribe();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = String::new();
    loop {
        let feed_watchdog = tokio::select! {
            _ = tick.tick() => watchdog.is_some(),
            // Any change may change the counts: refresh STATUS=.
            event = events.recv() => match event {
                Ok(_) | Err(RecvError::Lagged(_)) => false,
                Err(RecvError::Closed) => return,
            },
        };
        // The engine answering within the period is the liveness proof.
        let Some(facts) = status_facts(&engine, period).await else {
            continue;
        };
        let line = status_line(&facts);
        let mut states = Vec::with_capacity(2);
        if feed_watchdog {
            states.push(NotifyState::Watchdog);
        }
        if line != last {
            states.push(NotifyState::Status(&line));
        }
        if !states.is_empty() {
            send(&states);
        }
        last = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_vms() {
        let facts = StatusFacts {
            vms: 3,
            running: 2,
            pools: Vec::new(),
        };
        assert_eq!(status_line(&facts), "3 VMs, 2 running");
        let one = StatusFacts {
            vms: 1,
            running: 0,
            pools: Vec::new(),
        };
        assert_eq!(status_line(&one), "1 VM, 0 running");
    }

    #[test]
    fn status_line_shows_pool_fill() {
        let facts = StatusFacts {
            vms: 4,
            running: 4,
            pools: vec![
                PoolFill {
                    name: "default".into(),
                    hot: 2,
                    warm: 2,
                },
                PoolFill {
                    name: "gpu".into(),
                    hot: 0,
                    warm: 1,
                },
            ],
        };
        assert_eq!(
            status_line(&facts),
            "4 VMs, 4 running; default: 2/2 warm, gpu: 0/1 warm"
        );
    }
}
