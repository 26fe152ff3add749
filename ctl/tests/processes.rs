//! `kilnctl exec`, `shell` and `cp` against a real kilnd and one real VM
//! (TCG here): output streamed as it is written, stdin streamed, exit
//! codes and signals passed on, `--timeout`, `--detach`, `--json` lines;
//! a shell on a real pseudo-terminal (openpty here, kilnctl its session
//! leader) with its size, a resize and raw mode restored; a tree with
//! modes, a symlink and a 5 MiB random file copied in and out with equal
//! SHA-256, named as `docker cp` names copies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{fails, kilnctl, ok, text, KILNCTL};
use kiln_testkit::{try_wait_until, wait_until, Daemon};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One VM for all of it: exec, shell, cp.
#[test]
fn exec_shell_and_cp_in_one_vm() {
    let d = Daemon::start();
    ok(&d, &["create", "box", "--start", "--memory", "256"]);
    exec(&d);
    shell(&d);
    cp(&d);
}

fn spawn(d: &Daemon, args: &[&str]) -> Child {
    Command::new(KILNCTL)
        .args(args)
        .env("KILN_ADDRESS", d.address())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `kilnctl exec box -- sh -c SCRIPT`'s arguments.
fn in_box(script: &str) -> [&str; 6] {
    ["exec", "box", "--", "sh", "-c", script]
}

/// The child's stdout, once its first line was `want`.
fn first_line(child: &mut Child, want: &str) -> BufReader<ChildStdout> {
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    assert_eq!(first, want);
    lines
}

fn exec(d: &Daemon) {
    // Each stream on its own; the command's status is kilnctl's.
    let out = kilnctl(d, &in_box("echo out; echo err >&2; exit 7"));
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out\n".into(), "err\n".into())
    );
    let out = kilnctl(d, &in_box("kill -9 $$"));
    assert_eq!(out.status.code(), Some(128 + 9), "a signal is 128+N");
    fails(
        d,
        None,
        &["exec", "box", "--", "/no/such/program"],
        126,
        "io.kiln.Manager.ExecFailed",
    );

    // Streamed: the first line arrives while the command still runs.
    let mut child = spawn(d, &in_box("echo first; sleep 3; echo second"));
    let mut lines = first_line(&mut child, "first\n");
    let seen = Instant::now();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first line came only with the end"
    );
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let lead = seen.elapsed();
    assert_eq!((rest.as_str(), status.code()), ("second\n", Some(0)));
    assert!(
        lead >= Duration::from_secs(2),
        "first line {lead:?} before the end"
    );
    println!("exec: the first line {lead:?} before the end");

    // -i: 200 000 bytes (several WriteProcess calls) into wc -c, then EOF.
    let mut child = spawn(d, &["exec", "-i", "box", "--", "wc", "-c"]);
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&vec![b'x'; 200_000]).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout).trim()),
        (Some(0), "200000"),
        "{}",
        text(&out.stderr)
    );
    let mut child = spawn(d, &["exec", "-i", "box", "--", "tr", "a-z", "A-Z"]);
    child.stdin.take().unwrap().write_all(b"piped\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "PIPED\n".into())
    );

    // --json: kilnd's replies a line each, the handle first, the exit last.
    let out = kilnctl(
        d,
        &[
            "--json",
            "exec",
            "box",
            "-e",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let replies: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(replies[0]["handle"].is_u64(), "{replies:?}");
    assert_eq!(replies.last().unwrap()["exit"]["exitCode"], 3);
    assert_eq!(stdout_of(&replies), b"hi\n");

    // --timeout: SIGKILL when it passes (137), said on stderr.
    let started = Instant::now();
    let out = kilnctl(d, &["exec", "--timeout", "2", "box", "--", "sleep", "60"]);
    assert_eq!(out.status.code(), Some(137));
    assert!(
        text(&out.stderr).contains("longer than --timeout"),
        "{}",
        text(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    // Ctrl-C (SIGINT to kilnctl) reaches the command, which decides.
    let mut child = spawn(
        d,
        &in_box("trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 0.1; done"),
    );
    let mut lines = first_line(&mut child, "ready\n");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    assert_eq!(
        (rest.as_str(), child.wait().unwrap().code()),
        ("got INT\n", Some(5))
    );

    // --detach: the handle printed, the command runs on.
    let handle = ok(
        d,
        &[
            "exec",
            "--detach",
            "box",
            "--",
            "sh",
            "-c",
            "sleep 1; touch /tmp/detached",
        ],
    );
    assert!(handle.trim().parse::<u64>().is_ok(), "{handle}");
    wait_until(Duration::from_secs(30), "the detached command", || {
        kilnctl(d, &["exec", "box", "--", "test", "-e", "/tmp/detached"])
            .status
            .success()
    });

    fails(
        d,
        None,
        &["--json", "exec", "-t", "box", "--", "true"],
        125,
        "--json: a terminal's output is not JSON",
    );
}

/// The stdout bytes of `--json` replies.
fn stdout_of(replies: &[Value]) -> Vec<u8> {
    replies
        .iter()
        .flat_map(|r| r["output"].as_array().cloned().unwrap_or_default())
        .filter(|chunk| chunk["stream"] == "stdout")
        .flat_map(|chunk| BASE64.decode(chunk["data"].as_str().unwrap()).unwrap())
        .collect()
}

/// kilnctl on a pseudo-terminal of its own, as a person's shell runs it:
/// the session leader with the terminal as its controlling one, so the
/// kernel sends it SIGWINCH.
struct Pty {
    master: fs::File,
    child: Child,
    screen: Arc<Mutex<String>>,
}

impl Pty {
    fn spawn(d: &Daemon, args: &[&str], rows: u16, cols: u16) -> Self {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: out-pointers to two ints; no name, default termios, and
        // a winsize that outlives the call.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two new descriptors nobody else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut command = Command::new(KILNCTL);
        command
            .args(args)
            .env("KILN_ADDRESS", d.address())
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe and touch no
        // memory of the parent; stdin is the pty's slave by now.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let master = fs::File::from(master);
        let screen = Arc::new(Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let seen = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last slave descriptor closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            master,
            child,
            screen,
        }
    }

    fn type_in(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Waits until the screen shows `want`; types `again` (if any) every
    /// second meanwhile.
    fn until(&mut self, want: &str, again: Option<&str>) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen.lock().unwrap().clone();
            if screen.contains(want) {
                return screen;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "never saw {want:?} on {screen:?}"
            );
            if let Some(keys) = again {
                self.type_in(keys);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The pty's local flags (shared by both ends).
    fn lflags(&self) -> libc::tcflag_t {
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a termios to fill.
        let rc = unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut termios) };
        assert_eq!(rc, 0);
        termios.c_lflag
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize; the kernel then sends
        // SIGWINCH to the terminal's foreground process group (kilnctl).
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0);
    }
}

fn shell(d: &Daemon) {
    let mut pty = Pty::spawn(d, &["shell", "box"], 33, 111);
    pty.type_in("tty; stty size\n");
    let screen = pty.until("33 111", None);
    assert!(screen.contains("/dev/pts/"), "{screen:?}");
    // Raw here: the guest's terminal echoes, this one does not.
    assert_eq!(pty.lflags() & (libc::ECHO | libc::ICANON), 0, "raw mode");
    pty.resize(40, 100);
    pty.until("40 100", Some("stty size\n"));
    pty.type_in("exit 3\n");
    let status = try_wait_until(Duration::from_secs(30), || pty.child.try_wait().unwrap())
        .unwrap_or_else(|t| panic!("shell did not end: {t}"));
    assert_eq!(status.code(), Some(3));
    let lflags = pty.lflags();
    assert_eq!(
        lflags & (libc::ECHO | libc::ICANON),
        libc::ECHO | libc::ICANON,
        "the terminal's settings are back"
    );

    // A command of one's own, in the guest, and its status.
    let mut pty = Pty::spawn(
        d,
        &["shell", "box", "--", "sh", "-c", "stty size; exit 4"],
        20,
        70,
    );
    pty.until("20 70", None);
    let status = try_wait_until(Duration::from_secs(30), || pty.child.try_wait().unwrap()).unwrap();
    assert_eq!(status.code(), Some(4));
}

fn sha256(path: &Path) -> String {
    hex(&Sha256::digest(fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn cp(d: &Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    let mut big = vec![0u8; 5 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in big.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    fs::write(tree.join("big.bin"), &big).unwrap();
    fs::set_permissions(tree.join("big.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(tree.join("sub/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(tree.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(tree.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("sub/run.sh", tree.join("link")).unwrap();
    let want = sha256(&tree.join("big.bin"));
    let tree_arg = tree.to_str().unwrap();

    // In: into an existing directory under its own name; a file under a
    // new name; a file into a directory.
    let out = kilnctl(d, &["cp", tree_arg, "box:/tmp/"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    assert_eq!(text(&out.stderr), "copied 5 entries, 5.0 MiB\n");
    let big_arg = tree.join("big.bin");
    ok(
        d,
        &["cp", big_arg.to_str().unwrap(), "box:/tmp/renamed.bin"],
    );
    ok(
        d,
        &[
            "cp",
            tree.join("sub/run.sh").to_str().unwrap(),
            "box:/tmp/tree",
        ],
    );
    let listing = ok(
        d,
        &in_box(
            "cd /tmp && stat -c '%n %a' tree/big.bin tree/sub tree/sub/run.sh tree/run.sh; \
           readlink tree/link; tree/link; sha256sum tree/big.bin renamed.bin",
        ),
    );
    for line in [
        "tree/big.bin 600",
        "tree/sub 750",
        "tree/sub/run.sh 755",
        "tree/run.sh 755",
        "sub/run.sh\nhi\n",
        &format!("{want}  tree/big.bin"),
        &format!("{want}  renamed.bin"),
    ] {
        assert!(listing.contains(line), "{line:?} not in {listing}");
    }

    // Out: into an existing directory, and under a new name (--json: the
    // stats).
    let back = tmp.path().join("back");
    fs::create_dir(&back).unwrap();
    let back_arg = back.to_str().unwrap();
    let out = kilnctl(d, &["cp", "box:/tmp/tree", back_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "copied 6 entries, 5.0 MiB\n");
    let got = back.join("tree");
    assert_eq!(sha256(&got.join("big.bin")), want);
    assert_eq!(mode(&got.join("big.bin")), 0o600);
    assert_eq!(mode(&got.join("sub")), 0o750);
    assert_eq!(mode(&got.join("sub/run.sh")), 0o755);
    assert_eq!(
        fs::read_link(got.join("link")).unwrap(),
        Path::new("sub/run.sh")
    );
    let copy = back.join("copy.bin");
    let stats = ok(
        d,
        &[
            "--json",
            "cp",
            "box:/tmp/renamed.bin",
            copy.to_str().unwrap(),
        ],
    );
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats, serde_json::json!({"entries": 1, "bytes": 5 << 20}));
    assert_eq!(sha256(&copy), want);

    // Refusals, by class.
    fails(
        d,
        None,
        &["cp", "box:/nonexistent", back_arg],
        3,
        "io.kiln.Manager.NoSuchFile",
    );
    fails(
        d,
        None,
        &["cp", tree_arg, "box:/tmp/renamed.bin"],
        6,
        "/tmp/renamed.bin exists and is not a directory",
    );
    ok(
        d,
        &["exec", "box", "--", "ln", "-s", "/tmp/tree", "/tmp/to-tree"],
    );
    fails(
        d,
        None,
        &["cp", big_arg.to_str().unwrap(), "box:/tmp/to-tree"],
        6,
        "/tmp/to-tree is a symlink in the guest",
    );
    fails(
        d,
        None,
        &["cp", "--max-bytes", "1M", tree_arg, "box:/tmp/small"],
        7,
        "io.kiln.Manager.FileTooLarge",
    );
    fails(
        d,
        None,
        &["cp", tree_arg, back_arg],
        2,
        "one of SRC and DEST must be VM:PATH",
    );
    let missing = tmp.path().join("missing");
    fails(
        d,
        None,
        &["cp", missing.to_str().unwrap(), "box:/tmp/"],
        3,
        &missing.display().to_string(),
    );
}
