//! main's supervision, on the real kilnd binary with a datagram socket that
//! plays systemd's `NOTIFY_SOCKET`: an API that cannot start means no
//! `READY=1`, an orderly shutdown (`STOPPING=1`) and a non-zero exit with one
//! line naming what failed; with both APIs up (a private, real
//! `dbus-daemon`), `READY=1` comes once both serve; a signal ends a start
//! that hangs.
//!
//! Self-contained on purpose (no `common`): no VMs are made here, so the
//! fixture is a temp dir, a config and a child killed on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A temp dir with a kilnd.toml (state, runtime, pools inside it) and a
/// notify socket, and the processes started in it (SIGKILLed on drop).
struct Sandbox {
    dir: tempfile::TempDir,
    notify: UnixDatagram,
    kilnd: Option<Child>,
    bus: Option<Child>,
}

impl Sandbox {
    fn new(extra_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-t")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("kilnd.toml"),
            format!(
                "state_dir = \"{d}/state\"\nruntime_dir = \"{d}/run\"\n\
                 pool_dirs = [\"{d}/pools.d\"]\n{extra_config}"
            ),
        )
        .unwrap();
        let notify = UnixDatagram::bind(dir.path().join("notify")).unwrap();
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
            .env("NOTIFY_SOCKET", self.path().join("notify"))
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

    /// Every notification received within `timeout`, stopping early at
    /// the first one `until` accepts.
    fn notifications(&self, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.notify
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok(n) = self.notify.recv(&mut buf) else {
                break;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = until(&message);
            seen.push(message);
            if stop {
                break;
            }
        }
        seen
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in [&mut self.kilnd, &mut self.bus].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn has_line(messages: &[String], line: &str) -> bool {
    messages.iter().any(|m| m.lines().any(|l| l == line))
}

/// kilnd fails to start: non-zero exit, exactly one `kilnd: ` error line
/// naming `part` and `detail`, `STOPPING=1` with that reason, no `READY=1`.
fn assert_failed_start(sandbox: &mut Sandbox, part: &str, detail: &str) {
    sandbox.spawn_kilnd();
    let status = sandbox.wait_exit();
    let stderr = sandbox.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kilnd: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].starts_with(&format!("kilnd: {part}: ")) && errors[0].contains(detail),
        "{errors:?}"
    );
    // kilnd has exited: whatever it sent is queued on the socket.
    let messages = sandbox.notifications(Duration::from_millis(200), |_| false);
    assert!(!has_line(&messages, "READY=1"), "{messages:?}");
    assert!(has_line(&messages, "STOPPING=1"), "{messages:?}");
    assert!(
        messages
            .iter()
            .flat_map(|m| m.lines())
            .any(|l| l.starts_with(&format!("STATUS=stopping: {part}: "))),
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

const BUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=@DIR@/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"#;

impl Sandbox {
    /// A private dbus-daemon (killed on drop); its address.
    fn start_bus(&mut self) -> String {
        let conf = self.path().join("bus.conf");
        std::fs::write(
            &conf,
            BUS_CONF.replace("@DIR@", &self.path().display().to_string()),
        )
        .unwrap();
        let mut bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(bus.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.bus = Some(bus);
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
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
    let varlink: PathBuf = sandbox.path().join("varlink");
    sandbox.append_config(&format!("varlink_socket = \"{}\"\n", varlink.display()));
    let address = sandbox.start_bus();
    sandbox.append_config(&format!("dbus = \"{address}\"\n"));
    sandbox.spawn_kilnd();

    let first = sandbox.notifications(Duration::from_secs(30), |_| true);
    let first = first
        .first()
        .unwrap_or_else(|| panic!("no READY=1:\n{}", sandbox.stderr()));
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // By READY=1 both APIs serve.
    UnixStream::connect(&varlink).expect("varlink serves before READY=1");
    assert!(name_owned(&address), "io.kiln.Kiln1 owned before READY=1");

    let pid = sandbox.kilnd.as_ref().unwrap().id();
    // SAFETY: kill(2) with our child's pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = sandbox.wait_exit();
    assert!(status.success(), "{}", sandbox.stderr());
    let rest = sandbox.notifications(Duration::from_millis(200), |_| false);
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
    let messages = sandbox.notifications(Duration::from_millis(200), |_| false);
    assert!(!has_line(&messages, "READY=1"), "{messages:?}");
    assert!(has_line(&messages, "STOPPING=1"), "{messages:?}");
}
