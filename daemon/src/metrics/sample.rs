//! What a scrape reads now: the engine's lists (pools, VMs, images), each
//! running VM's use of the host (what `DescribeVM` shows as `usage`), and
//! kilnd's own process from `/proc/self`. Gauges come from here, so they
//! are never stale and nothing has to keep them up to date between
//! scrapes.

use std::time::Duration;

use kiln_engine::api::EngineStatus;
use kiln_engine::procfs;
use kiln_engine::vm::VmUsage;
use kiln_engine::{EngineError, EngineHandle, ImageInfo, PoolInfo, VmInfo};
use tracing::warn;

/// One scrape's reading.
#[derive(Debug, Default)]
pub struct Sample {
    /// `None` when the engine did not answer within the deadline.
    pub engine: Option<EngineSample>,
    /// kilnd's own process.
    pub process: ProcessSample,
    /// How long reading took.
    pub took: Duration,
}

/// What the engine says.
#[derive(Debug, Default)]
pub struct EngineSample {
    /// Version, accelerator, counts.
    pub status: Option<EngineStatus>,
    /// Every pool.
    pub pools: Vec<PoolInfo>,
    /// Every VM.
    pub vms: Vec<VmInfo>,
    /// Each running VM's pool and usage.
    pub usage: Vec<(Option<String>, VmUsage)>,
    /// Every stored image.
    pub images: Vec<ImageInfo>,
}

/// kilnd's own process, from `/proc/self`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit of open file descriptors.
    pub max_fds: u64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// When the process started, seconds since the epoch.
    pub start_time_seconds: f64,
}

/// Read everything, the engine's part within `deadline`.
pub async fn take(engine: &EngineHandle, deadline: Duration) -> Sample {
    let started = std::time::Instant::now();
    let engine = match tokio::time::timeout(deadline, engine_sample(engine)).await {
        Ok(Ok(sample)) => Some(sample),
        Ok(Err(e)) => {
            warn!(error = %e.message(), "metrics: the engine refused a list");
            None
        }
        Err(_) => {
            warn!(
                deadline_ms = deadline.as_millis() as u64,
                "metrics: the engine did not answer in time"
            );
            None
        }
    };
    // Small /proc reads, but reads: off the async threads.
    let process = tokio::task::spawn_blocking(ProcessSample::read)
        .await
        .unwrap_or_default();
    Sample {
        engine,
        process,
        took: started.elapsed(),
    }
}

async fn engine_sample(engine: &EngineHandle) -> Result<EngineSample, EngineError> {
    let status = engine.status().await?;
    let pools = engine.list_pools().await?;
    let vms = engine.list_vms().await?;
    let mut usage = Vec::new();
    for vm in vms.iter().filter(|vm| vm.pid.is_some()) {
        // Gone since the list: nothing to count.
        if let Ok(described) = engine.describe_vm(&vm.id).await {
            if let Some(u) = described.usage {
                usage.push((described.pool, u));
            }
        }
    }
    let images = engine.list_images().await?;
    Ok(EngineSample {
        status: Some(status),
        pools,
        vms,
        usage,
        images,
    })
}

impl ProcessSample {
    /// Read `/proc/self`; what cannot be read is 0.
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| procfs::field(&status, key) * 1024;
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let max_fds = procfs::field(&limits, "Max open files");
        let (cpu_seconds, start_time_seconds) = cpu_and_start();
        Self {
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds,
            max_fds,
            cpu_seconds,
            start_time_seconds,
        }
    }
}

/// CPU seconds (utime + stime) and start time (seconds since the epoch)
/// from `/proc/self/stat` and the boot time in `/proc/stat`.
fn cpu_and_start() -> (f64, f64) {
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which may hold spaces and ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // man 5 proc: utime is field 14, stime 15, starttime 22; `fields`
    // starts at field 3.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    ((field(14) + field(15)) / ticks, boot + field(22) / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_sample_reads_this_process() {
        let s = ProcessSample::read();
        assert!(
            s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes,
            "{s:?}"
        );
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // Started in the last hour (a test process), not at the epoch.
        assert!(
            s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 3600.0,
            "{s:?}"
        );
        assert!(s.cpu_seconds >= 0.0, "{s:?}");
    }
}
