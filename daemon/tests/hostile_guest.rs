//! A guest that misbehaves on purpose, against the real kilnd and QEMU:
//! its console log, which the guest alone decides the size of and which
//! lives in RAM (the runtime directory), stays bounded while the VM and
//! the API keep working.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kiln_testkit::{wait_until, Daemon};
use serde_json::json;

#[test]
fn a_guest_flooding_its_console_keeps_the_log_bounded() {
    let d = Daemon::start();
    let id = d.ok("CreateVM", json!({ "name": "noisy" }))["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok("StartVM", json!({ "id": id }));
    let log = d
        .kilnd
        .dir
        .path()
        .join("run/vms")
        .join(&id)
        .join("console.log");
    // 3 MiB through the emulated UART, three times kilnd's bound.
    let flood = d.ok(
        "ExecVM",
        json!({ "id": id, "timeoutSec": 300, "command": ["sh", "-c",
                "head -c 3145728 /dev/zero | tr '\\000' x > /dev/ttyS0; echo flooded"] }),
    );
    assert_eq!(flood["stdout"], "flooded\n", "{flood}");
    // The last check may be up to a second behind the flood's end.
    wait_until(Duration::from_secs(10), "the console log cut back", || {
        let len = std::fs::metadata(&log).unwrap().len();
        (len <= 1024 * 1024)
            .then_some(())
            .ok_or(format!("{len} bytes"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("[kiln: console log over 1 MiB"),
        "the cut is marked"
    );
    assert!(
        d.log().contains("the guest floods its console"),
        "and logged"
    );
    // The VM and the API carry on.
    let r = d.ok("ExecVM", json!({ "id": id, "command": ["echo", "still"] }));
    assert_eq!(r["stdout"], "still\n");
}
