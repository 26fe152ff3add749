//! Load held (issue 16, item 6): hundreds of clients read from a kilnd on
//! both transports at once — 500 varlink connections alternating
//! `ListVMs` and `DescribePool`, 100 D-Bus connections alternating
//! `GetManagedObjects` and the Manager's `ListVMs` — while 50 acquirers
//! cycle `Acquire`/`Release` on a template pool, and `Watch` consumers that
//! never read their socket sit through it all.
//!
//! Checked: every answer is a reply or one of Kiln's named errors; the p50
//! and p99 of the reads are printed; a stuck watcher costs kilnd nothing
//! (its events are dropped and it is told `lagged` once it reads again);
//! once the clients are gone kilnd's fd count is exactly what it was and
//! its RSS within 8 MiB of it; kilnd is alive throughout.
//!
//! The sizes come from `KILN_LOAD_VARLINK`, `KILN_LOAD_DBUS`,
//! `KILN_LOAD_ACQUIRERS`, `KILN_LOAD_WATCHERS` (stuck ones) and
//! `KILN_LOAD_SECS` (`make stress` raises them); `KILN_LOAD_PAUSE_MS` is
//! the longest pause a reader takes between two reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use kiln_testkit::busctl::{DbusKilnd, MANAGER, MANAGER_IF, NAME};
use kiln_testkit::fdclient::FdClient;
use kiln_testkit::{pid_alive, rss_kib, try_wait_until};
use serde_json::{json, Value};

/// How far kilnd's RSS may stay above its start once the load is over:
/// allocator slack, not buffers kept for clients that left.
const RSS_SLACK_KIB: u64 = 8 * 1024;
const POOL: &str = "load";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kiln's named errors, on either transport (docs/api.md): anything else
/// (a dropped connection, a bus error, a transport's own error) fails.
fn named(error: &str) -> bool {
    error.starts_with("io.kiln.Manager.") || error.starts_with("io.kiln.Kiln1.Error.")
}

/// Latencies of one kind of read, and the errors it met by name.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (name, n) in other.errors {
            *self.errors.entry(name).or_default() += n;
        }
    }

    /// "N reads, p50 …, p99 …, max …".
    fn summary(&mut self) -> String {
        self.latencies.sort();
        let at = |q: usize| {
            let i = (self.latencies.len() * q / 100).min(self.latencies.len().saturating_sub(1));
            self.latencies.get(i).copied().unwrap_or_default()
        };
        format!(
            "{} reads, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.latencies.len(),
            at(50).as_secs_f64() * 1e3,
            at(99).as_secs_f64() * 1e3,
            self.latencies
                .last()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
        )
    }
}

type Tallies = BTreeMap<&'static str, Tally>;

fn merge(into: &Mutex<Tallies>, tallies: Tallies) {
    let mut into = into.lock().unwrap();
    for (kind, tally) in tallies {
        into.entry(kind).or_default().add(tally);
    }
}

/// A pseudo-random pause of up to `max_ms` (a reader's think time), from
/// `seed`'s xorshift state.
fn pause(seed: &mut u64, max_ms: u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    Duration::from_millis(*seed % (max_ms + 1))
}

/// One varlink call on a kept connection: the reply's parameters, or the
/// error's name.
fn call(client: &mut FdClient, method: &str, parameters: Value) -> Result<Value, String> {
    client.call(&format!("io.kiln.Manager.{method}"), parameters, false, &[]);
    let (reply, _) = client.reply();
    match reply["error"].as_str() {
        Some(error) => Err(error.to_owned()),
        None => Ok(reply["parameters"].clone()),
    }
}

/// A varlink reader: connects, waits for everyone, then reads until told
/// to stop.
fn varlink_reader(
    address: &str,
    start: &Barrier,
    stop: &AtomicBool,
    n: u64,
    max_pause: u64,
) -> Tallies {
    let mut client = FdClient::connect(address);
    let mut tallies = Tallies::new();
    let mut seed = n * 2_654_435_761 + 1;
    start.wait();
    let mut i = n;
    while !stop.load(Ordering::Relaxed) {
        let (kind, method, parameters) = if i.is_multiple_of(2) {
            ("varlink ListVMs", "ListVMs", json!({}))
        } else {
            (
                "varlink DescribePool",
                "DescribePool",
                json!({ "name": POOL }),
            )
        };
        i += 1;
        let began = Instant::now();
        let result = call(&mut client, method, parameters);
        let tally = tallies.entry(kind).or_default();
        tally.latencies.push(began.elapsed());
        if let Err(error) = result {
            *tally.errors.entry(error).or_default() += 1;
        }
        std::thread::sleep(pause(&mut seed, max_pause));
    }
    tallies
}

/// The D-Bus readers: `count` connections of their own on a small tokio
/// runtime, each alternating `GetManagedObjects` and `ListVMs`.
fn dbus_readers(
    address: &str,
    count: usize,
    start: &Barrier,
    stop: &Arc<AtomicBool>,
    max_pause: u64,
) -> Tallies {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let connections = runtime.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..count {
            let connection = zbus::connection::Builder::address(address)
                .unwrap()
                .build()
                .await
                .expect("a D-Bus connection to the private bus");
            connections.push(connection);
        }
        connections
    });
    start.wait();
    runtime.block_on(async {
        let tasks: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(n, connection)| {
                tokio::spawn(dbus_reader(connection, n, stop.clone(), max_pause))
            })
            .collect();
        let mut all = Tallies::new();
        for task in tasks {
            for (kind, tally) in task.await.unwrap() {
                all.entry(kind).or_default().add(tally);
            }
        }
        all
    })
}

async fn dbus_reader(
    connection: zbus::Connection,
    n: usize,
    stop: Arc<AtomicBool>,
    max_pause: u64,
) -> Tallies {
    let mut tallies = Tallies::new();
    let mut seed = n as u64 * 40_503 + 7;
    let mut i = n;
    while !stop.load(Ordering::Relaxed) {
        let (kind, path, interface, method) = if i.is_multiple_of(2) {
            (
                "D-Bus GetManagedObjects",
                "/io/kiln/Kiln1",
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            )
        } else {
            ("D-Bus ListVMs", MANAGER, MANAGER_IF, "ListVMs")
        };
        i += 1;
        let began = Instant::now();
        let result = connection
            .call_method(Some(NAME), path, Some(interface), method, &())
            .await;
        let tally = tallies.entry(kind).or_default();
        tally.latencies.push(began.elapsed());
        let error = match result {
            Ok(_) => None,
            Err(zbus::Error::MethodError(name, _, _)) => Some(name.to_string()),
            Err(e) => Some(format!("D-Bus failure: {e}")),
        };
        if let Some(error) = error {
            *tally.errors.entry(error).or_default() += 1;
        }
        tokio::time::sleep(pause(&mut seed, max_pause)).await;
    }
    tallies
}

/// What the acquirers did.
#[derive(Debug, Default)]
struct Cycles {
    acquired: usize,
    released: usize,
    errors: BTreeMap<String, usize>,
}

/// An acquirer: takes a VM of the pool, holds it a moment, gives it back,
/// again and again until told to stop.
fn acquirer(address: &str, start: &Barrier, stop: &AtomicBool, n: u64) -> Cycles {
    let mut client = FdClient::connect(address);
    let mut cycles = Cycles::default();
    let mut seed = n * 6_364_136_223 + 3;
    start.wait();
    while !stop.load(Ordering::Relaxed) {
        let acquire =
            json!({ "pool": POOL, "timeoutMs": 3000, "labels": { "acquirer": n.to_string() } });
        match call(&mut client, "Acquire", acquire) {
            Ok(reply) => {
                cycles.acquired += 1;
                std::thread::sleep(pause(&mut seed, 300));
                match call(&mut client, "Release", json!({ "id": reply["vm"]["id"] })) {
                    Ok(_) => cycles.released += 1,
                    Err(e) => *cycles.errors.entry(format!("Release: {e}")).or_default() += 1,
                }
            }
            Err(e) => {
                *cycles.errors.entry(e).or_default() += 1;
                // PoolExhausted answers at once: don't spin on it.
                std::thread::sleep(pause(&mut seed, 300));
            }
        }
    }
    cycles
}

/// Events, cheaply and many: a VM is defined and deleted (never booted),
/// again and again until `enough` says so. Returns how many.
fn flood(address: &str, enough: impl Fn() -> bool) -> usize {
    let mut client = FdClient::connect(address);
    let mut n = 0;
    while !enough() {
        let spec = json!({ "name": format!("flood-{n}"), "spec": { "memoryMiB": 128 } });
        let vm = call(&mut client, "CreateVM", spec).unwrap();
        call(&mut client, "DeleteVM", json!({ "id": vm["vm"]["id"] })).unwrap();
        n += 1;
    }
    n
}

/// A varlink connection with a `Watch` call sent on it.
struct Watcher {
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl Watcher {
    fn start(path: &str) -> Self {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .write_all(b"{\"method\":\"io.kiln.Manager.Watch\",\"parameters\":{},\"more\":true}\0")
            .unwrap();
        Self {
            reader: BufReader::new(stream),
            partial: Vec::new(),
        }
    }

    /// The next event's `type` within `timeout`; None when none came or
    /// kilnd closed the connection.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
        // A read that times out keeps what it read so far in `partial`.
        match self.reader.read_until(0, &mut self.partial) {
            Ok(0) => None,
            Ok(_) if self.partial.last() == Some(&0) => {
                let frame: Vec<u8> = std::mem::take(&mut self.partial);
                let reply: Value = serde_json::from_slice(&frame[..frame.len() - 1]).unwrap();
                assert!(reply["error"].is_null(), "Watch failed: {reply}");
                Some(
                    reply["parameters"]["event"]["type"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            }
            Ok(_) => None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("reading a Watch: {e}"),
        }
    }
}

/// kilnd's open fds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// What kilnd's fds point at, sorted: says which one a count differs by.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    targets.sort();
    targets
}

/// Raise this process's soft fd limit to its hard one (kilnd and its bus,
/// started from here, inherit it): hundreds of clients need more than the
/// usual 1024. Returns the limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a pointer to a live rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// The pool at rest: `warm` hot VMs, none booting, none leased.
fn pool_at_rest(k: &DbusKilnd, warm: u64) -> Result<(), String> {
    let pool = k.varlinkctl("DescribePool", json!({ "name": POOL }))["pool"].clone();
    let at_rest = pool["hot"].as_u64() == Some(warm)
        && pool["booting"].as_u64() == Some(0)
        && pool["leased"].as_u64() == Some(0);
    if at_rest {
        Ok(())
    } else {
        Err(pool.to_string())
    }
}

/// How much load: from the environment, `make stress` raises it.
#[derive(Debug)]
struct Sizes {
    varlink: usize,
    dbus: usize,
    acquirers: usize,
    watchers: usize,
    secs: u64,
    warmup_secs: u64,
    max_pause: u64,
}

impl Sizes {
    fn from_env() -> Self {
        Self {
            varlink: env_or("KILN_LOAD_VARLINK", 500),
            dbus: env_or("KILN_LOAD_DBUS", 100),
            acquirers: env_or("KILN_LOAD_ACQUIRERS", 50),
            watchers: env_or("KILN_LOAD_WATCHERS", 20),
            secs: env_or("KILN_LOAD_SECS", 20),
            warmup_secs: env_or("KILN_LOAD_WARMUP_SECS", 5),
            max_pause: env_or("KILN_LOAD_PAUSE_MS", 200),
        }
    }
}

/// What one round of load did and saw.
#[derive(Debug, Default)]
struct Round {
    reads: Tallies,
    cycles: Cycles,
    fds_peak: usize,
    rss_peak: u64,
}

/// Every client at once for `secs`: the readers of both transports and
/// the acquirers, all connected before any starts.
fn round(k: &DbusKilnd, sizes: &Sizes, secs: u64) -> Round {
    let pid = k.kilnd.pid().unwrap();
    let address = k.kilnd.varlink_address();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Barrier::new(sizes.varlink + sizes.acquirers + 2);
    let reads = Mutex::new(Tallies::new());
    let mut out = Round::default();
    std::thread::scope(|scope| {
        let (address, start, stop, reads) = (&address, &start, &stop, &reads);
        let readers: Vec<_> = (0..sizes.varlink)
            .map(|n| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        let tallies =
                            varlink_reader(address, start, stop, n as u64, sizes.max_pause);
                        merge(reads, tallies);
                    })
                    .unwrap()
            })
            .collect();
        let bus = scope.spawn(move || {
            let tallies = dbus_readers(&k.address, sizes.dbus, start, stop, sizes.max_pause);
            merge(reads, tallies);
        });
        let acquiring: Vec<_> = (0..sizes.acquirers)
            .map(|n| scope.spawn(move || acquirer(address, start, stop, n as u64)))
            .collect();
        // Everyone has connected once the barrier opens (kilnd may take
        // a moment to accept them all: the peak fd count says).
        start.wait();
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            out.fds_peak = out.fds_peak.max(fds(pid));
            out.rss_peak = out.rss_peak.max(rss_kib(pid));
            assert!(pid_alive(pid), "kilnd died under load\n{}", k.log());
            std::thread::sleep(Duration::from_millis(250));
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        bus.join().unwrap();
        for acquiring in acquiring {
            let c = acquiring.join().unwrap();
            out.cycles.acquired += c.acquired;
            out.cycles.released += c.released;
            for (name, n) in c.errors {
                *out.cycles.errors.entry(name).or_default() += n;
            }
        }
    });
    out.reads = reads.into_inner().unwrap();
    out
}

/// Wait until the pool is at rest and kilnd's fds are `fds` again; its fd
/// count then.
fn settle(k: &DbusKilnd, warm: u64, fds_before: usize) -> usize {
    let pid = k.kilnd.pid().unwrap();
    try_wait_until(Duration::from_secs(120), || pool_at_rest(k, warm))
        .unwrap_or_else(|t| panic!("the pool never came back to rest: {t}\n{}", k.log()));
    try_wait_until(Duration::from_secs(30), || {
        let now = fds(pid);
        if now == fds_before {
            Ok(now)
        } else {
            Err(format!(
                "{now} fds, {fds_before} before: {:?}",
                fd_targets(pid)
            ))
        }
    })
    .unwrap_or_else(|t| panic!("kilnd's fds did not come back: {t}"))
}

/// A watcher that reads everything, counting the events that flow.
struct Counter {
    seen: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Counter {
    fn start(socket: &str) -> Self {
        let seen = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut watcher = Watcher::start(socket);
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if watcher.next(Duration::from_millis(200)).is_some() {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self { seen, stop, thread }
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.seen.load(Ordering::Relaxed)
    }
}

#[test]
fn hundreds_of_readers_and_acquirers_leave_kilnd_as_they_found_it() {
    let sizes = Sizes::from_env();
    println!("load: {sizes:?}");
    let limit = raise_fd_limit();
    let needed = (sizes.varlink + sizes.dbus + sizes.acquirers + sizes.watchers + 256) as u64;
    assert!(
        limit >= needed,
        "the fd limit ({limit}) is below what this load needs ({needed}): raise `ulimit -Hn`"
    );

    let k = DbusKilnd::start_with(false, "");
    let warm = 4;
    let spec = json!({ "mode": "template", "warm": warm, "max": 10, "vm": { "memoryMiB": 128 } });
    k.varlinkctl("CreatePool", json!({ "name": POOL, "spec": spec }));
    try_wait_until(Duration::from_secs(240), || pool_at_rest(&k, warm))
        .unwrap_or_else(|t| panic!("the pool never filled: {t}\n{}", k.log()));
    let pid = k.kilnd.pid().unwrap();
    let address = k.kilnd.varlink_address();
    let socket = address.strip_prefix("unix:").unwrap().to_owned();
    let fds_before = fds(pid);
    let rss_cold = rss_kib(pid);

    // A first, short round of the same load: the allocator grows to what
    // this many connections need and keeps that (glibc's arenas do not
    // shrink back), which is a high-water mark, not growth. What must not
    // happen is growth beyond it.
    round(&k, &sizes, sizes.warmup_secs);
    settle(&k, warm, fds_before);
    let rss_before = rss_kib(pid);

    // Watchers that send `Watch` and never read again sit through the
    // round; one that reads everything counts the events that pass them.
    let mut stuck: Vec<Watcher> = (0..sizes.watchers)
        .map(|_| Watcher::start(&socket))
        .collect();
    let counter = Counter::start(&socket);
    let mut load = round(&k, &sizes, sizes.secs);
    for (kind, tally) in &mut load.reads {
        println!("load: {kind}: {}", tally.summary());
    }
    println!(
        "load: {} acquired, {} released, refused: {:?}",
        load.cycles.acquired, load.cycles.released, load.cycles.errors
    );
    // Only Kiln's named errors, on reads and on the acquire cycle; and a
    // lease is always given back.
    for (kind, tally) in &load.reads {
        for name in tally.errors.keys() {
            assert!(named(name), "{kind}: {name}");
        }
    }
    for name in load.cycles.errors.keys() {
        assert!(named(name), "acquirers: {name}");
    }
    assert_eq!(
        load.cycles.acquired, load.cycles.released,
        "a lease was not given back"
    );
    assert!(load.cycles.acquired > 0, "no acquire got through the load");
    // Everyone was connected at once: a connection per varlink client and
    // per watcher (the counter's included).
    assert!(
        load.fds_peak > fds_before + sizes.varlink + sizes.watchers,
        "at most {} fds under load, {fds_before} before: the clients were never all connected",
        load.fds_peak
    );

    // Back at rest, the stuck watchers still stuck; then events flow past
    // them, twice what kilnd keeps for a watcher that falls behind (1024),
    // so that each has been dropped from. Kept for them instead, that
    // would be megabytes per watcher. A stream costs kilnd two fds: the
    // connection and the copy it watches for the client's hang-up.
    let fds_stuck = settle(&k, warm, fds_before + 2 * (sizes.watchers + 1));
    let rss_flood_before = rss_kib(pid);
    let target = counter.seen() + 2 * 1024;
    let flooded = flood(&address, || counter.seen() >= target);
    let rss_flood_after = rss_kib(pid);
    let events = counter.stop();
    let rss_after = try_wait_until(Duration::from_secs(20), || {
        let now = rss_kib(pid);
        if now <= rss_before + RSS_SLACK_KIB {
            Ok(now)
        } else {
            Err(format!("{now} KiB, {rss_before} KiB before"))
        }
    });

    // kilnd dropped their events and says so as soon as one reads again.
    let first = &mut stuck[0];
    let mut before_lagged = 0;
    let lagged = loop {
        match first.next(Duration::from_secs(5)) {
            Some(t) if t == "lagged" => break true,
            Some(_) => before_lagged += 1,
            None => break false,
        }
    };
    drop(stuck);
    let fds_after = settle(&k, warm, fds_before);
    println!(
        "load: {events} events passed {} stuck watchers ({flooded} VMs defined and deleted at the end); the first read {before_lagged} events, then `lagged`",
        sizes.watchers
    );
    println!(
        "load: kilnd fds {fds_before} before, {} at the peak, {fds_stuck} at rest with the watchers, {fds_after} after; RSS {rss_cold} KiB cold, {rss_before} KiB after the warm-up round, {} KiB at the peak, {rss_flood_before} → {rss_flood_after} KiB across the flood, {rss_after:?} at the end",
        load.fds_peak, load.rss_peak
    );
    assert!(
        lagged,
        "a watcher that read nothing through {events} events was never told `lagged` ({before_lagged} events read)"
    );
    rss_after.unwrap_or_else(|t| panic!("kilnd's RSS did not come back: {t}"));
    assert!(pid_alive(pid), "kilnd died\n{}", k.log());
    k.varlinkctl("GetStatus", json!({}));
}
