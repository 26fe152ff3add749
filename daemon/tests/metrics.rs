//! kilnd's metrics and journal entries with the real kilnd and real QEMU
//! (TCG here): acquires over varlink (`varlinkctl`) and D-Bus (`busctl`)
//! counted per pool and transport, the exposition read from the unix
//! socket and checked by the real `promtool`, a real Prometheus scraping
//! the TCP address and answering queries on what it stored, and lifecycle
//! facts found by `MESSAGE_ID` in a real systemd-journald.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::busctl::{DbusKilnd, MANAGER, MANAGER_IF};
use kiln_testkit::{
    kilnd_exe, require_root, skip, try_wait_until, varlinkctl_call, wait_until, Kilnd,
};
use serde_json::{json, Value};

const POOL: &str = "mtr";

/// A port nothing listens on now (the kernel's pick, released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One HTTP/1.1 GET over `stream`: (status line and headers, body).
fn http_get(mut stream: impl Read + Write, path: &str, accept: &str) -> (String, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (head.to_owned(), body.to_owned())
}

fn get_unix(socket: &Path, accept: &str) -> (String, String) {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    http_get(stream, "/metrics", accept)
}

fn get_tcp(port: u16, path: &str, accept: &str) -> Result<(String, String), std::io::Error> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(http_get(stream, path, accept))
}

/// The samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad sample {l:?}")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

fn sample(all: &BTreeMap<String, f64>, series: &str) -> f64 {
    *all.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:#?}", all.keys().collect::<Vec<_>>()))
}

/// Whether `tool` runs; else skip (a failure in CI, where setup-host.sh
/// installs the `prometheus` package).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(&format!(
            "{tool} is not installed (Debian package prometheus)"
        ));
    }
    found
}

/// A process killed (and reaped) when the test ends, failed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn describe_pool(k: &DbusKilnd) -> Value {
    k.varlinkctl("DescribePool", json!({ "name": POOL }))["pool"].clone()
}

fn wait_pool(k: &DbusKilnd, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    try_wait_until(Duration::from_secs(240), || {
        let pool = describe_pool(k);
        if done(&pool) {
            Ok(pool)
        } else {
            Err(pool)
        }
    })
    .unwrap_or_else(|t| panic!("pool {POOL} never got {what}: {t}\n{}", k.log()))
}

/// The value of an instant query's one series, if Prometheus has it.
fn query(port: u16, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (head, body) = get_tcp(port, &format!("/api/v1/query?query={encoded}"), "*/*").ok()?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let reply: Value = serde_json::from_str(&body).ok()?;
    let result = reply["data"]["result"].as_array()?;
    match &result[..] {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

#[test]
fn acquires_are_counted_per_pool_and_transport_and_prometheus_scrapes_them() {
    if !have("promtool") || !have("prometheus") {
        return;
    }
    let started = Instant::now();
    let port = free_port();
    let k = DbusKilnd::start_with(false, &format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    let spec = json!({ "mode": "template", "warm": 2, "max": 4, "vm": { "memoryMiB": 128 } });
    k.varlinkctl("CreatePool", json!({ "name": POOL, "spec": spec }));
    wait_pool(&k, "2 hot VMs", |p| p["hot"] == 2 && p["booting"] == 0);

    // One hot acquire on each transport, and one of a pool that does not
    // exist (its name must not become a label value).
    let a = k.varlinkctl("Acquire", json!({ "pool": POOL, "timeoutMs": 0 }))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = k.call(
        MANAGER,
        MANAGER_IF,
        "Acquire",
        &["sa{sv}", POOL, "1", "timeoutMs", "t", "0"],
    );
    let b = b[0]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (error, _) = k
        .varlink(
            "Acquire",
            json!({ "pool": "no-such-pool-4711", "timeoutMs": 0 }),
        )
        .unwrap_err();
    assert_eq!(error, "io.kiln.Manager.NoSuchPool");
    wait_pool(&k, "2 leased and 2 hot again", |p| {
        p["leased"] == 2 && p["hot"] == 2 && p["booting"] == 0
    });

    // The unix socket, in the Prometheus text format.
    let socket = k.kilnd.dir.path().join("run/metrics");
    let scraped = Instant::now();
    let (head, text) = get_unix(&socket, "*/*");
    let scrape_ms = scraped.elapsed().as_millis();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    let m = samples(&text);
    let pool =
        |series: &str, labels: &str| sample(&m, &format!("{series}{{pool=\"{POOL}\"{labels}}}"));
    assert_eq!(pool("kiln_pool_vms", ",state=\"leased\""), 2.0);
    assert_eq!(pool("kiln_pool_vms", ",state=\"hot\""), 2.0);
    assert_eq!(pool("kiln_pool_vms", ",state=\"booting\""), 0.0);
    assert_eq!(pool("kiln_pool_waiting", ""), 0.0);
    assert_eq!(pool("kiln_pool_warm", ""), 2.0);
    assert_eq!(pool("kiln_pool_max", ""), 4.0);
    assert_eq!(pool("kiln_pool_template_ready", ""), 1.0);
    assert_eq!(pool("kiln_pool_state", ",state=\"ready\""), 1.0);
    assert_eq!(pool("kiln_pool_state", ",state=\"building-template\""), 0.0);
    for transport in ["varlink", "dbus"] {
        let series = format!("{{pool=\"{POOL}\",transport=\"{transport}\"");
        let count = sample(
            &m,
            &format!("kiln_acquire_duration_seconds_count{series}}}"),
        );
        assert_eq!(count, 1.0, "{transport}");
        let inf = sample(
            &m,
            &format!("kiln_acquire_duration_seconds_bucket{series},le=\"+Inf\"}}"),
        );
        assert_eq!(inf, 1.0, "{transport}");
        // A hot acquire: well under a second.
        let fast = sample(
            &m,
            &format!("kiln_acquire_duration_seconds_bucket{series},le=\"1\"}}"),
        );
        assert_eq!(fast, 1.0, "{transport}");
    }
    assert_eq!(
        sample(
            &m,
            "kiln_acquire_failures_total{pool=\"\",transport=\"varlink\",error=\"NoSuchPool\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "kiln_errors_total{transport=\"varlink\",error=\"NoSuchPool\"}"
        ),
        1.0
    );
    assert!(!text.contains("no-such-pool-4711"));
    // No VM id anywhere: VMs are never labels.
    assert!(!text.contains(&a) && !text.contains(&b), "{text}");
    // Two clones for the first fill, two refills after the acquires.
    assert_eq!(pool("kiln_vm_clone_duration_seconds_count", ""), 4.0);
    assert_eq!(pool("kiln_template_builds_total", ",result=\"ok\""), 1.0);
    assert_eq!(pool("kiln_template_build_duration_seconds_count", ""), 1.0);
    assert!(pool("kiln_template_build_duration_seconds_sum", "") > 0.0);
    assert_eq!(sample(&m, "kiln_vms{state=\"leased\"}"), 2.0);
    assert_eq!(sample(&m, "kiln_vms{state=\"ready\"}"), 2.0);
    assert_eq!(sample(&m, "kiln_vms{state=\"failed\"}"), 0.0);
    assert!(pool("kiln_vm_cpu_seconds", "") > 0.0);
    assert!(pool("kiln_vm_pss_bytes", "") > 0.0);
    assert!(pool("kiln_vm_memory_bytes", "") > 0.0);
    assert_eq!(sample(&m, "kiln_engine_responding"), 1.0);
    assert!(sample(&m, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&m, "process_open_fds") > 3.0);
    // Every histogram's buckets grow and end at its count.
    for (series, count) in m.iter().filter(|(s, _)| s.contains("_count")) {
        let family = series.split("_count").next().unwrap();
        let labels = series
            .split_once('{')
            .map_or("", |(_, l)| l.trim_end_matches('}'));
        let sep = if labels.is_empty() { "" } else { "," };
        let inf = format!("{family}_bucket{{{labels}{sep}le=\"+Inf\"}}");
        assert_eq!(m.get(&inf), Some(count), "{inf}");
    }
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(s, _)| {
            s.starts_with(&format!(
                "kiln_vm_clone_duration_seconds_bucket{{pool=\"{POOL}\""
            ))
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(
        buckets.len() > 5 && buckets.iter().all(|v| *v <= 4.0),
        "{buckets:?}"
    );

    // docs/metrics.md describes every metric kilnd exposes.
    let docs =
        std::fs::read_to_string(kiln_testkit::workspace_root().join("docs/metrics.md")).unwrap();
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
    {
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "docs/metrics.md does not describe {name}"
        );
    }

    // promtool lints the exposition (names, units, help, types).
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // TCP, in OpenMetrics for a client that asks for it.
    let (head, om) = get_tcp(
        port,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .unwrap();
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# UNIT kiln_acquire_duration_seconds seconds\n"),
        "{om}"
    );

    // A real Prometheus scraping the TCP address every second.
    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: kilnd\n    static_configs:\n      \
             - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let prometheus_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let wanted = [
        ("up{job=\"kilnd\"}".to_owned(), 1.0),
        (format!("kiln_pool_vms{{pool=\"{POOL}\",state=\"leased\"}}"), 2.0),
        (format!("kiln_pool_vms{{pool=\"{POOL}\",state=\"hot\"}}"), 2.0),
        (
            format!("kiln_acquire_duration_seconds_bucket{{pool=\"{POOL}\",transport=\"varlink\",le=\"+Inf\"}}"),
            1.0,
        ),
        (
            format!("kiln_acquire_duration_seconds_count{{pool=\"{POOL}\",transport=\"dbus\"}}"),
            1.0,
        ),
        (
            "sum(kiln_acquire_duration_seconds_count)".to_owned(),
            2.0,
        ),
    ];
    let queried = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "Prometheus to have kilnd's metrics",
        || {
            let got: Vec<(String, Option<f64>)> = wanted
                .iter()
                .map(|(q, _)| (q.clone(), query(web, q)))
                .collect();
            let all = got
                .iter()
                .zip(&wanted)
                .all(|((_, value), (_, want))| *value == Some(*want));
            all.then_some(())
                .ok_or_else(|| format!("{got:?}\n{}", prometheus_log()))
        },
    );
    eprintln!(
        "metrics: scrape over the unix socket {scrape_ms} ms, {} bytes text, {} bytes OpenMetrics; \
         Prometheus had the series {} ms after it started; the test took {:?}",
        text.len(),
        om.len(),
        queried.elapsed().as_millis(),
        started.elapsed()
    );
}

/// The journal's entries with `MESSAGE_ID=id`, as JSON objects.
fn journal(dir: &Path, id: &str) -> Vec<Value> {
    let out = Command::new("journalctl")
        .arg("-D")
        .arg(dir)
        .args(["--no-pager", "-o", "json"])
        .arg(format!("MESSAGE_ID={id}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The ids in daemon/src/journal.rs, repeated here on purpose: they are a
/// promise to operators and must not change.
const VM_CREATED: &str = "d0ebb79b4cae4a05b863b83ba8eec977";
const VM_STARTED: &str = "3a98116d83a542eb8a52f2fd9791453a";
const VM_ACQUIRED: &str = "66c8929c53874a5f8e8cc6967d194872";
const VM_RELEASED: &str = "4d26ab76111e4662beab6f2989bf0f87";
const VM_DELETED: &str = "0f7e66d9b3f448b5a1cdfda6df6e9e0d";
const TEMPLATE_BUILT: &str = "c939c7496f814ebfa7db1e1b7a39b557";
const POOL_ADDED: &str = "d78d1eeb7a5e479299c4b52f9dc616e1";

/// Runs `$@` (kilnd) in a mount namespace of its own with a real
/// systemd-journald: a tmpfs on /run for its sockets, its journal files
/// bound from `$JOURNAL_DIR` (so journalctl reads them from outside), its
/// config bound over /etc/systemd/journald.conf (volatile, no kmsg, no
/// forwarding). kilnd gets JOURNAL_STREAM, so it logs natively.
const UNDER_JOURNALD: &str = r#"
set -eu
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal
mount --bind "$JOURNAL_DIR" /run/log/journal
mount --bind "$JOURNAL_CONF" /etc/systemd/journald.conf
/usr/lib/systemd/systemd-journald &
echo $! > "$JOURNALD_PID"
i=0
while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
JOURNAL_STREAM=0:0 exec "$@"
"#;

#[test]
fn lifecycle_facts_reach_the_journal_with_their_message_ids() {
    if !require_root("a mount namespace with its own journald") {
        return;
    }
    if !Path::new("/usr/lib/systemd/systemd-journald").exists() {
        return skip("no /usr/lib/systemd/systemd-journald");
    }
    let mut kilnd = Kilnd::new("dbus = \"none\"\n");
    let sandbox = kilnd.dir.path().to_owned();
    let journal_dir = sandbox.join("journal");
    std::fs::create_dir_all(&journal_dir).unwrap();
    std::fs::write(
        sandbox.join("journald.conf"),
        "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n\
         ForwardToConsole=no\nRateLimitBurst=0\n",
    )
    .unwrap();
    let pid_file = sandbox.join("journald.pid");
    // journald is killed when the test ends, whatever happens.
    struct Journald(std::path::PathBuf);
    impl Drop for Journald {
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.0)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on the journald this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _journald = Journald(pid_file.clone());
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            UNDER_JOURNALD,
            "sh",
        ])
        .arg(kilnd_exe())
        .env("JOURNAL_DIR", &journal_dir)
        .env("JOURNAL_CONF", sandbox.join("journald.conf"))
        .env("JOURNALD_PID", &pid_file);
    let address = kilnd.varlink_address();
    kilnd.spawn_with(command, |_| {
        kiln_testkit::varlinkctl_ok(&address, "org.varlink.service.GetInfo")
    });
    let call = |method: &str, params: Value| {
        varlinkctl_call(
            None,
            &address,
            &format!("io.kiln.Manager.{method}"),
            &params.to_string(),
        )
        .unwrap_or_else(|e| panic!("{method}: {e:?}\n{}", kilnd.log()))
    };
    let spec = json!({ "mode": "template", "warm": 1, "max": 2, "vm": { "memoryMiB": 128 } });
    call("CreatePool", json!({ "name": POOL, "spec": spec }));
    try_wait_until(Duration::from_secs(240), || {
        let pool = call("DescribePool", json!({ "name": POOL }))["pool"].clone();
        (pool["hot"] == 1).then_some(()).ok_or(pool)
    })
    .unwrap_or_else(|t| panic!("no hot VM: {t}\n{}", kilnd.log()));
    let vm = call("Acquire", json!({ "pool": POOL, "timeoutMs": 0 }))["vm"].clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    call("Release", json!({ "id": id }));

    // Each kind of fact by its id, with its fields under their own names.
    let find = |message_id: &str, what: &str, want: &dyn Fn(&Value) -> bool| -> Value {
        try_wait_until(Duration::from_secs(30), || {
            let entries = journal(&journal_dir, message_id);
            let found = entries.iter().find(|e| want(e)).cloned();
            found.ok_or_else(|| format!("{} entries of that id: {entries:?}", entries.len()))
        })
        .unwrap_or_else(|t| panic!("no {what} entry in the journal: {t}\n{}", kilnd.log()))
    };
    let mine = |e: &Value| e["VM"] == id.as_str();
    let added = find(POOL_ADDED, "pool added", &|e| e["POOL"] == POOL);
    assert_eq!(added["MESSAGE"], "pool added");
    let built = find(TEMPLATE_BUILT, "template built", &|e| e["POOL"] == POOL);
    assert!(
        built["BUILD_MS"].as_str().unwrap().parse::<u64>().unwrap() > 0,
        "{built}"
    );
    find(VM_CREATED, "VM created", &mine);
    let started = find(VM_STARTED, "VM started", &mine);
    assert_eq!(started["POOL"], POOL, "{started}");
    assert_eq!(started["CLONED"], "true", "{started}");
    assert_eq!(started["SYSLOG_IDENTIFIER"], "kilnd", "{started}");
    let acquired = find(VM_ACQUIRED, "VM acquired", &mine);
    assert!(
        acquired["HOLDER"].as_str().unwrap().starts_with("uid:"),
        "{acquired}"
    );
    // tracing-journald's mapping: INFO is notice (5), WARN warning (4).
    assert_eq!(acquired["PRIORITY"], "5", "{acquired}");
    find(VM_RELEASED, "VM released", &mine);
    find(VM_DELETED, "VM deleted", &mine);
    // Told once each.
    assert_eq!(journal(&journal_dir, VM_ACQUIRED).len(), 1);
}
