//! kilnd's service notifications, read from a datagram socket that plays
//! systemd's `NOTIFY_SOCKET` (the real systemd is in `tests/system/`):
//! `READY=1` only once the varlink socket accepts, a `STATUS=` line,
//! `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_testkit::{has_line, Kilnd, NotifySocket};

#[test]
fn ready_status_watchdog_and_stopping_reach_the_service_manager() {
    let mut kilnd = Kilnd::new("dbus = \"none\"\n");
    let notify = NotifySocket::new(kilnd.dir.path());
    let varlink = kilnd.dir.path().join("varlink");
    let mut command = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    command
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "1000000");
    kilnd.spawn_with(command, |_| true);

    // The first message is READY=1, and by then varlink already answers.
    let first = notify.collect_until(Duration::from_secs(30), |_| true);
    let first = first
        .first()
        .unwrap_or_else(|| panic!("no READY=1:\n{}", kilnd.log()));
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    UnixStream::connect(&varlink).expect("varlink serves before READY=1");
    assert!(
        first.lines().any(|l| l == "STATUS=0 VMs, 0 running"),
        "{first:?}"
    );

    // WATCHDOG=1 every 0.5 s (half of 1 s): at least three in 2.2 s.
    let started = Instant::now();
    let mut pings = 0;
    notify.collect_until(Duration::from_millis(2200), |m| {
        if m.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
        false
    });
    assert!(
        (3..=6).contains(&pings),
        "{pings} WATCHDOG=1 in {:?}",
        started.elapsed()
    );

    // SIGTERM: STOPPING=1 before kilnd exits.
    let mut child = kilnd.take_child().unwrap();
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest = notify.collect_until(Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert!(has_line(&rest, "STOPPING=1"), "{rest:?}");
    assert!(child.wait().unwrap().success(), "{}", kilnd.log());
}

#[test]
fn no_notify_socket_means_no_notifications_and_no_failure() {
    let mut kilnd = Kilnd::new("dbus = \"none\"\n");
    let varlink = kilnd.dir.path().join("varlink");
    let mut command = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    command
        .env_remove("NOTIFY_SOCKET")
        .env("WATCHDOG_USEC", "1000000");
    kilnd.spawn_with(command, |_| UnixStream::connect(&varlink).is_ok());
    // Pacing, not a wait for a condition: without NOTIFY_SOCKET nothing
    // is sent, so there is no event to wait for; what is tested is that
    // kilnd outlives the first watchdog period (0.5 s) it would have fed.
    std::thread::sleep(Duration::from_millis(700));
    let mut child = kilnd.take_child().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "{}", kilnd.log());
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "{}", kilnd.log());
}
