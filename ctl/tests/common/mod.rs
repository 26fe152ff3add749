//! What the kilnctl integration tests share: the binary run against a
//! test kilnd, its output checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test file uses its own part of these.
#![allow(dead_code)]

use std::process::{Output, Stdio};

use kiln_testkit::{command_as, Daemon};
use serde_json::Value;

pub const KILNCTL: &str = env!("CARGO_BIN_EXE_kilnctl");

/// kilnctl as `uid` (None: ourselves) against `d`, found through
/// `KILN_ADDRESS`; never cut to a terminal's width.
pub fn kilnctl_as(d: &Daemon, uid: Option<u32>, args: &[&str]) -> Output {
    command_as(uid, KILNCTL)
        .args(args)
        .env("KILN_ADDRESS", d.address())
        .env_remove("COLUMNS")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn kilnctl(d: &Daemon, args: &[&str]) -> Output {
    kilnctl_as(d, None, args)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command that must succeed; its stdout.
pub fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = kilnctl(d, args);
    assert!(
        out.status.success(),
        "kilnctl {args:?}: {}\n{}\n{}",
        out.status,
        text(&out.stderr),
        d.log()
    );
    text(&out.stdout)
}

/// A command that must succeed with `--json`; its output parsed.
pub fn json(d: &Daemon, args: &[&str]) -> Value {
    // First, where a global option always goes (after `exec VM` it would
    // be the command's).
    let args = [&["--json"], args].concat();
    let out = ok(d, &args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kilnctl {args:?}: {e}: {out}"))
}

/// A command that must fail with exit `code` and one line on stderr
/// naming `error` (e.g. `io.kiln.Manager.NoSuchVM`); that line.
pub fn fails(d: &Daemon, uid: Option<u32>, args: &[&str], code: i32, error: &str) -> String {
    let out = kilnctl_as(d, uid, args);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "kilnctl {args:?}: {stderr}{}",
        text(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with(&format!("kilnctl: {error}")),
        "kilnctl {args:?}: {stderr:?}, expected {error}"
    );
    stderr
}

/// The rows of a table (after its header) whose first column is `key`.
pub fn row<'a>(table: &'a str, key: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&key))
}
