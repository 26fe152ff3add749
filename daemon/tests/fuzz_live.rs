//! Mutated requests at both transports of a live kilnd (issue 16, item 5):
//! every answer is a reply or a named error, kilnd stays up, and what was
//! defined before the run is untouched. QEMU is `/bin/false` here, so a
//! mutation that happens to be a valid boot costs nothing.
//!
//! The generator is seeded (the seed is printed; `KILN_FUZZ_SEED` replays
//! a run) and `KILN_FUZZ_CASES` sets the number of cases per transport.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kiln_testkit::{Kilnd, PrivateBus};
use serde_json::{json, Value};
use zbus::zvariant::{ObjectPath, OwnedValue, Value as Variant};

const DEFAULT_CASES: usize = 10_000;
const BUS_NAME: &str = "io.kiln.Kiln1";

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A valid-looking request of every method, naming objects that do not
/// exist (so a mutation that stays valid harms nothing that was there).
fn seeds() -> Vec<(&'static str, Value)> {
    let ghost = json!({ "id": "0123456789ab" });
    vec![
        ("GetStatus", json!({})),
        ("ListVMs", json!({})),
        ("DescribeVM", ghost.clone()),
        (
            "CreateVM",
            json!({ "name": "fz-a", "spec": { "vcpus": 1, "memoryMiB": 64 } }),
        ),
        ("StartVM", ghost.clone()),
        ("StopVM", json!({ "id": "0123456789ab", "timeoutSec": 1 })),
        ("KillVM", ghost.clone()),
        ("PauseVM", ghost.clone()),
        ("ResumeVM", ghost.clone()),
        ("RebootVM", ghost.clone()),
        ("DeleteVM", ghost.clone()),
        (
            "ExecVM",
            json!({ "id": "0123456789ab", "command": ["true"], "timeoutSec": 1 }),
        ),
        (
            "CreatePool",
            json!({ "name": "fz-p", "spec": { "mode": "cold", "warm": 0, "max": 1 } }),
        ),
        ("ResizePool", json!({ "name": "fz-none", "warm": 0 })),
        ("DeletePool", json!({ "name": "fz-none" })),
        ("ListPools", json!({})),
        ("DescribePool", json!({ "name": "fz-none" })),
        (
            "Acquire",
            json!({ "pool": "fz-none", "timeoutMs": 0, "ttlSec": 5 }),
        ),
        ("Renew", json!({ "id": "0123456789ab", "ttlSec": 5 })),
        ("Release", ghost.clone()),
        ("ListGPUs", json!({})),
        ("ListNICs", ghost.clone()),
        ("AttachNIC", ghost.clone()),
        ("DetachNIC", json!({ "id": "0123456789ab", "index": 1 })),
    ]
}

/// A value of some other shape.
fn any_value(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::Null,
        1 => json!(rng.next().is_multiple_of(2)),
        2 => json!(rng.next() as i64),
        3 => json!(-1),
        4 => json!(f64::from(rng.below(1000) as u32) / 7.0),
        5 => json!("x".repeat(rng.below(200_000))),
        6 => json!(["a", 1, null]),
        7 => json!({ "nested": { "deeper": [1, 2, 3] } }),
        _ => json!("../../../etc/passwd\u{0}\u{202e}"),
    }
}

/// One mutated request, as the bytes of a varlink frame (NUL included).
fn mutate(rng: &mut Rng) -> Vec<u8> {
    let (method, params) = rng.pick(&seeds()).clone();
    let mut params = params;
    let mut method = format!("io.kiln.Manager.{method}");
    let mut extra = json!({});
    match rng.below(12) {
        0 => {
            if let Some(object) = params.as_object_mut() {
                let keys: Vec<String> = object.keys().cloned().collect();
                if !keys.is_empty() {
                    let key = rng.pick(&keys).clone();
                    object.insert(key, any_value(rng));
                }
            }
        }
        1 => {
            if let Some(object) = params.as_object_mut() {
                let keys: Vec<String> = object.keys().cloned().collect();
                if !keys.is_empty() {
                    object.remove(rng.pick(&keys));
                }
            }
        }
        2 => params["unknownKey"] = any_value(rng),
        3 => params = any_value(rng),
        4 => method = format!("io.kiln.Manager.{}", "Z".repeat(rng.below(300))),
        5 => method = "org.varlink.service.GetInterfaceDescription".into(),
        6 => extra = json!({ "more": true }),
        7 => extra = json!({ "oneway": true }),
        8 => {
            // Deep nesting.
            let mut deep = json!(1);
            for _ in 0..rng.below(300) {
                deep = json!([deep]);
            }
            params["spec"] = deep;
        }
        9 => {
            // A truncated frame.
            let mut bytes =
                serde_json::to_vec(&json!({ "method": method, "parameters": params })).unwrap();
            bytes.truncate(rng.below(bytes.len().max(1)));
            bytes.push(0);
            return bytes;
        }
        10 => {
            // Bytes that are not UTF-8.
            let mut bytes =
                b"{\"method\":\"io.kiln.Manager.ListVMs\",\"parameters\":{\"x\":\"".to_vec();
            bytes.extend((0..rng.below(64)).map(|_| 0x80 | (rng.next() as u8 & 0x7f)));
            bytes.extend(b"\"}}\0");
            return bytes;
        }
        _ => {}
    }
    let mut call = json!({ "method": method, "parameters": params });
    if let (Some(call), Some(extra)) = (call.as_object_mut(), extra.as_object()) {
        call.extend(extra.clone());
    }
    let mut bytes = serde_json::to_vec(&call).unwrap();
    bytes.push(0);
    bytes
}

/// How a varlink case ended.
#[derive(Debug, Default)]
struct Outcomes {
    replies: usize,
    errors: BTreeMap<String, usize>,
    closed: usize,
}

/// Send `frame`; read one reply frame (or see the connection closed).
fn exchange(socket: &str, stream: &mut Option<UnixStream>, frame: &[u8]) -> Option<Value> {
    if stream.is_none() {
        let s = UnixStream::connect(socket).expect("kilnd accepts connections");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        *stream = Some(s);
    }
    let s = stream.as_mut().unwrap();
    if s.write_all(frame).is_err() {
        *stream = None;
        return None;
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == 0 => break,
            Ok(1) => reply.push(byte[0]),
            Ok(_) => {
                *stream = None;
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A oneway call gets no reply; anything else must answer.
                *stream = None;
                return Some(json!({ "oneway": true }));
            }
            Err(_) => {
                *stream = None;
                return None;
            }
        }
    }
    Some(serde_json::from_slice(&reply).expect("kilnd replies with JSON"))
}

fn fuzz_varlink(socket: &str, rng: &mut Rng, cases: usize) -> Outcomes {
    let mut outcomes = Outcomes::default();
    let mut stream = None;
    for _ in 0..cases {
        let frame = mutate(rng);
        let oneway = String::from_utf8_lossy(&frame).contains("\"oneway\":true");
        if oneway {
            // No reply comes: do not wait for one.
            stream = None;
            let mut s = UnixStream::connect(socket).expect("kilnd accepts connections");
            let _ = s.write_all(&frame);
            outcomes.replies += 1;
            continue;
        }
        match exchange(socket, &mut stream, &frame) {
            None => outcomes.closed += 1,
            Some(reply) => {
                if let Some(name) = reply.get("error").and_then(Value::as_str) {
                    assert!(
                        name.starts_with("io.kiln.Manager.")
                            || name.starts_with("org.varlink.service."),
                        "unnamed error {name} for {}",
                        String::from_utf8_lossy(&frame)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    );
                    *outcomes.errors.entry(name.to_owned()).or_default() += 1;
                } else {
                    outcomes.replies += 1;
                }
                if reply.get("continues") == Some(&json!(true)) {
                    // A stream (Watch with more): start afresh.
                    stream = None;
                }
            }
        }
    }
    outcomes
}

/// One call with a body of some shape.
async fn dbus_call(
    conn: &zbus::Connection,
    rng: &mut Rng,
    path: &str,
    interface: &str,
    method: &str,
) -> Result<(), zbus::Error> {
    let mut spec: HashMap<String, OwnedValue> = HashMap::new();
    for _ in 0..rng.below(4) {
        let key =
            (*rng.pick(&["vcpus", "memoryMiB", "mode", "warm", "max", "vm", "bogus"])).to_owned();
        let value = match rng.below(5) {
            0 => Variant::from(rng.next() as u32),
            1 => Variant::from("x".repeat(rng.below(5000))),
            2 => Variant::from(rng.next().is_multiple_of(2)),
            3 => Variant::from(rng.next() as i64),
            _ => Variant::from(vec![1u32, 2]),
        };
        if let Ok(v) = OwnedValue::try_from(value) {
            spec.insert(key, v);
        }
    }
    let to = (path, interface, method);
    match rng.below(7) {
        0 => send(conn, to, &()).await,
        1 => send(conn, to, &("fz-d".to_owned(), spec)).await,
        2 => send(conn, to, &(rng.next() as u32,)).await,
        3 => {
            let vm = ObjectPath::try_from("/io/kiln/Kiln1/vm/0123456789ab").unwrap();
            send(conn, to, &(vm, true)).await
        }
        4 => send(conn, to, &("x".repeat(rng.below(3000)),)).await,
        5 => {
            let exec = (
                vec!["true".to_owned()],
                Vec::<String>::new(),
                String::new(),
                1u32,
                0u32,
            );
            send(conn, to, &exec).await
        }
        _ => send(conn, to, &(rng.next(),)).await,
    }
}

async fn send<B: serde::Serialize + zbus::zvariant::DynamicType>(
    conn: &zbus::Connection,
    (path, interface, method): (&str, &str, &str),
    body: &B,
) -> Result<(), zbus::Error> {
    conn.call_method(Some(BUS_NAME), path, Some(interface), method, body)
        .await
        .map(drop)
}

async fn fuzz_dbus(address: &str, rng: &mut Rng, cases: usize) -> BTreeMap<String, usize> {
    let conn = zbus::connection::Builder::address(address)
        .unwrap()
        .build()
        .await
        .unwrap();
    let targets = [
        ("/io/kiln/Kiln1/Manager", "io.kiln.Kiln1.Manager"),
        ("/io/kiln/Kiln1/vm/0123456789ab", "io.kiln.Kiln1.VM"),
        ("/io/kiln/Kiln1/pool/fz_2dnone", "io.kiln.Kiln1.Pool"),
        ("/io/kiln/Kiln1", "org.freedesktop.DBus.ObjectManager"),
    ];
    let methods = [
        "CreateVM",
        "ListVMs",
        "CreatePool",
        "ResizePool",
        "DeletePool",
        "ListPools",
        "Acquire",
        "Release",
        "ListGPUs",
        "Start",
        "Stop",
        "Kill",
        "Pause",
        "Resume",
        "Reboot",
        "Delete",
        "Exec",
        "Renew",
        "AttachNIC",
        "DetachNIC",
        "ListNICs",
        "GetManagedObjects",
        "Nope",
    ];
    let mut outcomes = BTreeMap::new();
    for _ in 0..cases {
        let (path, interface) = *rng.pick(&targets);
        let method = *rng.pick(&methods);
        let name = match dbus_call(&conn, rng, path, interface, method).await {
            Ok(()) => "reply".to_owned(),
            Err(zbus::Error::MethodError(name, _, _)) => {
                let name = name.to_string();
                assert!(
                    name.starts_with("io.kiln.Kiln1.Error.")
                        || name.starts_with("org.freedesktop.DBus.Error.")
                        || name.starts_with("org.freedesktop.zbus.Error"),
                    "unnamed error {name} for {interface}.{method}"
                );
                name
            }
            Err(e) => panic!("{interface}.{method}: the bus connection failed: {e}"),
        };
        *outcomes.entry(name).or_default() += 1;
    }
    outcomes
}

#[test]
fn mutated_requests_get_named_errors_and_change_nothing() {
    let cases: usize = std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let seed: u64 = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("fuzz seed {seed} (KILN_FUZZ_SEED={seed} replays it), {cases} cases per transport");
    let mut kilnd = Kilnd::new("qemu_binary = \"/bin/false\"\n");
    let bus = PrivateBus::start(kilnd.dir.path());
    kilnd.append_config(&format!("dbus = \"{}\"\npolkit = false\n", bus.address()));
    let socket = format!("{}/varlink", kilnd.dir.path().display());
    kilnd.spawn(|k| kiln_testkit::varlinkctl_ok(&k.varlink_address(), "io.kiln.Manager.ListVMs"));
    let varlink = |method: &str, params: Value| -> Value {
        let mut stream = None;
        let frame = [
            serde_json::to_vec(
                &json!({ "method": format!("io.kiln.Manager.{method}"), "parameters": params }),
            )
            .unwrap(),
            vec![0],
        ]
        .concat();
        exchange(&socket, &mut stream, &frame).expect("a reply")
    };
    // What must survive the run untouched.
    let reference = varlink(
        "CreateVM",
        json!({ "name": "reference", "spec": { "vcpus": 1, "memoryMiB": 64 } }),
    );
    assert!(reference.get("error").is_none(), "{reference}");
    let pool = varlink(
        "CreatePool",
        json!({ "name": "reference", "spec": { "mode": "cold", "warm": 0, "max": 1 } }),
    );
    assert!(pool.get("error").is_none(), "{pool}");
    let describe = |varlink: &dyn Fn(&str, Value) -> Value| {
        (
            varlink(
                "DescribeVM",
                json!({ "id": reference["parameters"]["vm"]["id"] }),
            ),
            varlink("DescribePool", json!({ "name": "reference" })),
        )
    };
    let before = describe(&varlink);

    let mut rng = Rng(seed);
    let started = std::time::Instant::now();
    let over_varlink = fuzz_varlink(&socket, &mut rng, cases);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let over_dbus = runtime.block_on(fuzz_dbus(bus.address(), &mut rng, cases));
    println!(
        "varlink: {cases} cases in {:.1} s: {} replies, {} connections closed by kilnd, errors {:?}",
        started.elapsed().as_secs_f64(),
        over_varlink.replies,
        over_varlink.closed,
        over_varlink.errors
    );
    println!("D-Bus: {cases} cases: {over_dbus:?}");

    // kilnd is alive, answers both transports, and nothing it had changed.
    let after = describe(&varlink);
    let vm = |v: &Value| {
        let mut vm = v["parameters"]["vm"].clone();
        vm.as_object_mut().map(|o| o.remove("lastError"));
        vm
    };
    assert_eq!(vm(&before.0), vm(&after.0), "the reference VM changed");
    assert_eq!(
        before.1["parameters"]["pool"]["warm"],
        after.1["parameters"]["pool"]["warm"]
    );
    assert!(kiln_testkit::varlinkctl_ok(
        &kilnd.varlink_address(),
        "io.kiln.Manager.GetStatus"
    ));
}
