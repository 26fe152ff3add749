//! Property tests of the decoders a client or a guest reaches through the
//! engine: VM specs (JSON from varlink, `a{sv}` turned into the same
//! serde type on D-Bus), pool definitions (TOML files and API bodies), and
//! the agent client reading whatever a guest sends. Each must answer with a
//! value or a named error: never a panic, never a hang. No QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use kiln_engine::agent::AgentClient;
use kiln_engine::spec::{Limits, SpecDefaults};
use kiln_engine::vmm::GuestAgent;
use kiln_engine::{Accel, PoolSpec, VmSpec};
use proptest::prelude::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Any JSON value, a few levels deep, with the keys specs use mixed in so
/// the decoder gets past the first field often.
fn json() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        Just("vcpus".to_owned()),
        Just("memoryMiB".to_owned()),
        Just("kernel".to_owned()),
        Just("cmdline".to_owned()),
        Just("network".to_owned()),
        Just("mode".to_owned()),
        Just("hotplugSlots".to_owned()),
        Just("gpus".to_owned()),
        Just("display".to_owned()),
        Just("warm".to_owned()),
        Just("max".to_owned()),
        Just("vm".to_owned()),
        "[a-zA-Z]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("/nonexistent/../etc/passwd")),
        Just(Value::from("bridge")),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn defaults(dir: &Path) -> SpecDefaults {
    for file in ["vmlinuz", "initramfs"] {
        std::fs::write(dir.join(file), b"k").unwrap();
    }
    SpecDefaults {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs"),
        accel: Accel::Tcg,
        gpu_kernel: dir.join("vmlinuz"),
        gpu_initrd: dir.join("initramfs"),
    }
}

/// `default` cases, or `PROPTEST_CASES` when set (`make stress` raises it).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// A VM spec from any JSON: decoded and resolved, or refused with a
    /// named error.
    #[test]
    fn vm_specs_from_any_json_decode_or_are_refused(value in json()) {
        let dir = tempfile::tempdir().unwrap();
        let defaults = defaults(dir.path());
        if let Ok(spec) = serde_json::from_value::<VmSpec>(value) {
            let _ = spec.resolve(&defaults, &Limits::for_host());
        }
    }

    /// A pool from any JSON body (CreatePool) or TOML text (pools.d).
    #[test]
    fn pool_specs_from_any_input_decode_or_are_refused(value in json(), text in ".{0,200}") {
        if let Ok(spec) = serde_json::from_value::<PoolSpec>(value) {
            let _ = spec.validate("p");
        }
        if let Ok(spec) = toml::from_str::<PoolSpec>(&text) {
            let _ = spec.validate("p");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(100)))]

    /// Whatever a guest writes on the agent port (garbage, NULs, valid
    /// JSON that is not a reply, a frame with no end), a call returns
    /// within its deadline with an answer or an error.
    #[test]
    fn the_agent_client_survives_any_guest_bytes(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..6),
        hang_up in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("agent.sock");
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let guest = tokio::spawn(async move {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                for chunk in chunks {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                if !hang_up {
                    // A guest that stops talking but keeps the port open.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
            let client = AgentClient::new(&socket);
            let started = std::time::Instant::now();
            let agent: &dyn GuestAgent = &client;
            let _ = agent.ping(Duration::from_millis(100)).await;
            assert!(started.elapsed() < Duration::from_secs(2), "the call outlived its deadline");
            guest.abort();
        });
    }
}
