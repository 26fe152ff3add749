//! main's supervision, on the real kilnd binary with a datagram socket that
//! plays systemd's `NOTIFY_SOCKET`: an API that cannot start means no
//! `READY=1`, an orderly shutdown (`STOPPING=1`) and a non-zero exit with one
//! line naming what failed; with both APIs up (a private, real
//! `dbus-daemon`), `READY=1` comes once both serve; a signal ends a start
//! that hangs; losing the bus later is the same orderly failure.
//!
//! No `Kilnd` fixture: it waits for kilnd to serve and wants the guest
//! image, and no VMs are made here. The fixture is a temp dir, a config, a
//! notify socket and a child killed on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{has_line, NotifySocket, PrivateBus};

/// A temp dir with a kilnd.toml (state, runtime, pools inside it) and a
/// notify socket, and the processes started in it (killed on drop).
struct Sandbox {
    dir: kiln_testkit::Sandbox,
    notify: NotifySocket,
    kilnd: Option<Child>,
    bus: Option<PrivateBus>,
}

impl Sandbox {
    fn new(extra_config: &str) -> Self {
        let dir = kiln_testkit::Sandbox::new();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("kilnd.toml"),
            format!(
                "state_dir = \"{d}/state\"\nruntime_dir = \"{d}/run\"\n\
                 pool_dirs = [\"{d}/pools.d\"]\n{extra_config}"
            ),
        )
        .unwrap();
        let notify = NotifySocket::new(dir.path());
        Self {
            dir,
            notify,
            kilnd: None,
            bus: None,
        }
    }

    fn append_config(&self, lines: &str) {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.path().join("kilnd.toml"))
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start kilnd with `NOTIFY_SOCKET` pointing at our socket; its stderr
    /// goes to `kilnd.err`.
    fn spawn_kilnd(&mut self) {
        let err = std::fs::File::create(self.path().join("kilnd.err")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
            .arg("--config")
            .arg(self.path().join("kilnd.toml"))
            .env("NOTIFY_SOCKET", self.notify.path())
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        self.kilnd = Some(child);
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path().join("kilnd.err")).unwrap_or_default()
    }

    /// kilnd's exit status, waiting at most 30 s.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.kilnd.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kilnd did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // kilnd first, so it does not see the bus go; the bus and the
        // temp dir go with the fields.
        if let Some(mut kilnd) = self.kilnd.take() {
            let _ = kilnd.kill();
            let _ = kilnd.wait();
        }
    }
}

/// kilnd fails to start: non-zero exit, exactly one `kilnd: ` error line
/// naming `part` and `detail`, `STOPPING=1` with that reason, no `READY=1`.
fn assert_failed_start(sandbox: &mut Sandbox, part: &str, detail: &str) {
    sandbox.spawn_kilnd();
    assert_failed(sandbox, &format!("{part}: "), detail);
}

/// kilnd stops on a failure: exit 1, exactly one `kilnd: ` error line
/// starting with `reason` and containing `detail`; after what was read
/// before, `STOPPING=1` with `STATUS=stopping: <reason>...` and no
/// `READY=1`; the engine shut down in order, VMs kept.
fn assert_failed(sandbox: &mut Sandbox, reason: &str, detail: &str) {
    let status = sandbox.wait_exit();
    let stderr = sandbox.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kilnd: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].starts_with(&format!("kilnd: {reason}")) && errors[0].contains(detail),
        "{errors:?}"
    );
    // kilnd has exited: whatever it sent is queued on the socket.
    let messages = sandbox
        .notify
        .collect_until(Duration::from_millis(200), |_| false);
    assert!(!has_line(&messages, "READY=1"), "{messages:?}");
    assert!(has_line(&messages, "STOPPING=1"), "{messages:?}");
    assert!(
        messages
            .iter()
            .flat_map(|m| m.lines())
            .any(|l| l.starts_with(&format!("STATUS=stopping: {reason}"))),
        "{messages:?}"
    );
    // The engine was started and shut down in order, VMs kept.
    assert!(
        stderr.contains("shutting down, VMs keep running"),
        "{stderr}"
    );
}

#[test]
fn unbindable_varlink_socket_fails_start_without_ready() {
    let dir = tempfile::Builder::new()
        .prefix("kiln-t")
        .tempdir_in("/tmp")
        .unwrap();
    // The socket's directory is a regular file.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let socket = blocker.join("varlink");
    let mut sandbox = Sandbox::new(&format!(
        "varlink_socket = \"{}\"\ndbus = \"none\"\n",
        socket.display()
    ));
    assert_failed_start(
        &mut sandbox,
        "cannot serve varlink",
        &socket.display().to_string(),
    );
}

#[test]
fn unreachable_bus_fails_start_without_ready() {
    let mut sandbox = Sandbox::new("dbus = \"unix:path=/nonexistent\"\n");
    let varlink = sandbox.path().join("varlink");
    sandbox.append_config(&format!("varlink_socket = \"{}\"\n", varlink.display()));
    assert_failed_start(&mut sandbox, "cannot serve D-Bus", "unix:path=/nonexistent");
}

impl Sandbox {
    /// A private dbus-daemon (killed on drop); its address.
    fn start_bus(&mut self) -> String {
        let bus = PrivateBus::start(self.path());
        let address = bus.address().to_owned();
        self.bus = Some(bus);
        address
    }

    /// kilnd serving varlink on `<dir>/varlink` and D-Bus on a private bus
    /// (its address returned); returns once kilnd sent its first
    /// notification, asserted to be `READY=1`.
    fn spawn_kilnd_with_both_apis(&mut self) -> String {
        let varlink = self.path().join("varlink");
        self.append_config(&format!("varlink_socket = \"{}\"\n", varlink.display()));
        let address = self.start_bus();
        self.append_config(&format!("dbus = \"{address}\"\n"));
        self.spawn_kilnd();
        let first = self.notify.collect_until(Duration::from_secs(30), |_| true);
        let first = first
            .first()
            .unwrap_or_else(|| panic!("no READY=1:\n{}", self.stderr()));
        assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
        address
    }
}

/// `io.kiln.Kiln1` has an owner on `address` (asked with the real busctl).
fn name_owned(address: &str) -> bool {
    let out = Command::new("busctl")
        .arg(format!("--address={address}"))
        .args([
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            "io.kiln.Kiln1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "busctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim() == "b true"
}

#[test]
fn ready_once_varlink_and_dbus_serve_and_stopping_on_sigterm() {
    let mut sandbox = Sandbox::new("polkit = false\n");
    let address = sandbox.spawn_kilnd_with_both_apis();
    let varlink: PathBuf = sandbox.path().join("varlink");
    // By READY=1 both APIs serve.
    UnixStream::connect(&varlink).expect("varlink serves before READY=1");
    assert!(name_owned(&address), "io.kiln.Kiln1 owned before READY=1");

    let pid = sandbox.kilnd.as_ref().unwrap().id();
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = sandbox.wait_exit();
    assert!(status.success(), "{}", sandbox.stderr());
    let rest = sandbox
        .notify
        .collect_until(Duration::from_millis(200), |_| false);
    assert!(has_line(&rest, "STOPPING=1"), "{rest:?}");
    assert!(has_line(&rest, "STATUS=stopping"), "{rest:?}");
    assert!(!has_line(&rest, "READY=1"), "READY=1 only once: {rest:?}");
}

#[test]
fn sigterm_ends_a_start_that_hangs_on_the_bus() {
    let mut sandbox = Sandbox::new("");
    let varlink = sandbox.path().join("varlink");
    // A "bus" that takes the connection and never answers the handshake.
    let bus_path = sandbox.path().join("silent-bus");
    let _silent_bus = std::os::unix::net::UnixListener::bind(&bus_path).unwrap();
    sandbox.append_config(&format!(
        "varlink_socket = \"{}\"\ndbus = \"unix:path={}\"\n",
        varlink.display(),
        bus_path.display()
    ));
    sandbox.spawn_kilnd();
    // varlink comes first, so once it accepts kilnd waits on the bus.
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&varlink).is_err() {
        assert!(Instant::now() < deadline, "{}", sandbox.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = sandbox.kilnd.as_ref().unwrap().id();
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = sandbox.wait_exit();
    assert!(status.success(), "{}", sandbox.stderr());
    let messages = sandbox
        .notify
        .collect_until(Duration::from_millis(200), |_| false);
    assert!(!has_line(&messages, "READY=1"), "{messages:?}");
    assert!(has_line(&messages, "STOPPING=1"), "{messages:?}");
}

#[test]
fn a_lost_bus_stops_kilnd_with_an_error_naming_d_bus() {
    let mut sandbox = Sandbox::new("polkit = false\n");
    sandbox.spawn_kilnd_with_both_apis();
    // The bus crashes under a running kilnd.
    sandbox.bus.as_mut().unwrap().kill();
    assert_failed(&mut sandbox, "the D-Bus connection was lost", "D-Bus");
}
