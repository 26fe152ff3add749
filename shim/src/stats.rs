//! `Stats`: the VM's usage figures (`DescribeVM`'s `usage`, measured on
//! its QEMU's cgroup) as containerd's cgroups v2 `Metrics`. The figures
//! are the whole VM's: a pod's sandbox and each of its containers report
//! the same (per-container figures need cgroups in the guest).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, NetworkStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message as _;
use serde_json::Value;

/// The type URL containerd's typeurl gives cgroups v2 metrics.
const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// `usage` (a varlink `Usage`) as metrics.
pub fn metrics(usage: &Value) -> Metrics {
    let n = |key: &str| usage[key].as_u64().unwrap_or_default();
    let mut m = Metrics::new();
    m.cpu = Some(CPUStat {
        usage_usec: n("cpuUsec"),
        ..Default::default()
    })
    .into();
    m.memory = Some(MemoryStat {
        usage: n("memoryBytes"),
        usage_limit: n("memoryLimitBytes"),
        ..Default::default()
    })
    .into();
    m.memory_events = Some(MemoryEvents {
        oom_kill: n("oomKills"),
        ..Default::default()
    })
    .into();
    m.io = Some(IOStat {
        usage: vec![IOEntry {
            rbytes: n("diskReadBytes"),
            wbytes: n("diskWriteBytes"),
            ..Default::default()
        }],
        ..Default::default()
    })
    .into();
    m.network = vec![NetworkStat {
        name: "eth0".to_owned(),
        rx_bytes: n("netRxBytes"),
        tx_bytes: n("netTxBytes"),
        ..Default::default()
    }];
    m
}

/// `metrics` packed as containerd expects them in a `StatsResponse`.
pub fn to_any(metrics: &Metrics) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any {
        type_url: METRICS_TYPE.to_owned(),
        value: metrics.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_becomes_v2_metrics() {
        let usage = json!({ "cpuUsec": 1500, "memoryBytes": 1 << 20, "memoryLimitBytes": 1 << 28,
            "rssBytes": 1, "pssBytes": 1, "diskReadBytes": 7, "diskWriteBytes": 8,
            "netRxBytes": 9, "netTxBytes": 10, "oomKills": 1 });
        let any = to_any(&metrics(&usage)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.cpu.usage_usec, 1500);
        assert_eq!(back.memory.usage_limit, 1 << 28);
        assert_eq!(back.memory_events.oom_kill, 1);
        assert_eq!((back.io.usage[0].rbytes, back.io.usage[0].wbytes), (7, 8));
        assert_eq!(back.network[0].tx_bytes, 10);
    }
}
