//! `io.kiln.Agent.Exec`: run one command, feed its stdin, capture its output
//! (capped), enforce its timeout.
//!
//! Everything happens in one `poll(2)` loop over the stdin/stdout/stderr
//! pipes and a pidfd of the child, so there is no reader thread that could
//! block forever and no concurrent `waitpid` that could steal the status of
//! the child (PID 1 reaps orphans only between calls).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_proto::{
    ExecReply, ExecRequest, DEFAULT_MAX_OUTPUT_BYTES, LIMIT_MAX_OUTPUT_BYTES, MAX_MESSAGE_BYTES,
};

use crate::container::Enter;
use crate::params::InvalidParameter;
use crate::{log, sys};

/// `PATH` of every command (and of the agent itself).
pub const BASE_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// `HOME` of every command.
pub const BASE_HOME: &str = "/root";

/// How long output is still collected after the command exited, for
/// processes it left in the background that still hold its stdout/stderr.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// Poll interval when the kernel has no pidfd (before Linux 5.3).
const FALLBACK_TICK: Duration = Duration::from_millis(10);

/// The command could not be started (`io.kiln.Agent.ExecFailed`, or
/// `ExecFormatError` in a container).
#[derive(Debug)]
pub struct SpawnFailed {
    /// `argv0: reason`.
    pub message: String,
    /// The error number, when the system gave one.
    pub errno: Option<i32>,
}

/// A validated `Exec` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
    max_output: usize,
}

impl Plan {
    /// Checks a request: non-empty `argv` without NUL bytes, `KEY=VALUE`
    /// environment entries, an output cap within the protocol's limit.
    pub fn new(req: ExecRequest) -> Result<Self, InvalidParameter> {
        if req.argv.is_empty()
            || req.argv.iter().any(|a| a.contains('\0'))
            || req.argv[0].is_empty()
        {
            return Err(InvalidParameter::new("argv"));
        }
        let mut env = Vec::with_capacity(req.env.len());
        for entry in &req.env {
            match entry.split_once('=') {
                Some((key, value)) if !key.is_empty() && !entry.contains('\0') => {
                    env.push((key.to_owned(), value.to_owned()));
                }
                _ => return Err(InvalidParameter::new("env")),
            }
        }
        let max_output = req.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
        if max_output > LIMIT_MAX_OUTPUT_BYTES {
            return Err(InvalidParameter::new("maxOutputBytes"));
        }
        Ok(Self {
            argv: req.argv,
            env,
            stdin: req.stdin.map(String::into_bytes),
            timeout: req.timeout_ms.map(Duration::from_millis),
            max_output: usize::try_from(max_output).unwrap_or(usize::MAX),
        })
    }

    /// Program and arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// Extra environment entries.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }
}

/// Output of one stream, kept up to a cap; the rest is read and dropped.
#[derive(Debug)]
pub struct Capture {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    /// An empty capture keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Appends what fits of `data`.
    pub fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Captured text (invalid UTF-8 replaced) and whether it was cut.
    pub fn finish(self) -> (String, bool) {
        (
            String::from_utf8_lossy(&self.buf).into_owned(),
            self.truncated,
        )
    }
}

/// Shortens `text` to at most `max` bytes, at a character boundary.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

/// Shrinks the captured output until the encoded reply (plus the frame
/// terminator) fits in [`MAX_MESSAGE_BYTES`]. JSON escaping can blow binary
/// output up six-fold, so the caps alone do not guarantee it.
pub fn fit_reply(reply: &mut ExecReply) {
    loop {
        let size = serde_json::to_vec(reply).map_or(usize::MAX, |v| v.len());
        if size < MAX_MESSAGE_BYTES {
            return;
        }
        let (text, flag) = if reply.stdout.len() >= reply.stderr.len() {
            (&mut reply.stdout, &mut reply.stdout_truncated)
        } else {
            (&mut reply.stderr, &mut reply.stderr_truncated)
        };
        if text.is_empty() {
            return;
        }
        let half = text.len() / 2;
        cut(text, half);
        *flag = true;
    }
}

/// Runs the command described by `plan` and waits for it; with `enter`,
/// inside that container (which then decides root, working directory,
/// user, environment and program lookup).
pub fn run(plan: Plan, enter: Option<Enter>) -> Result<ExecReply, SpawnFailed> {
    let mut cmd = Command::new(&plan.argv[0]);
    cmd.args(&plan.argv[1..])
        .env_clear()
        .env("PATH", BASE_PATH)
        .env("HOME", BASE_HOME)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/");
    // Own process group, so a timeout kills the whole pipeline.
    piped(&mut cmd, plan.stdin.is_some());
    let spawned = match enter {
        Some(enter) => enter.spawn(&mut cmd),
        None => cmd.spawn(),
    };
    let mut child = spawned.map_err(|e| SpawnFailed {
        message: format!("{}: {e}", plan.argv[0]),
        errno: e.raw_os_error(),
    })?;
    let mut running = Running::new(&mut child, plan.stdin, plan.max_output);
    let outcome = running.wait(&mut child, plan.timeout);
    let Running {
        stdout,
        stderr,
        out,
        err,
        ..
    } = running;
    // Whatever still holds the pipes (a background process) keeps them; a
    // drainer reads and drops its output so it never blocks or gets EPIPE.
    drain_in_background(stdout);
    drain_in_background(stderr);
    let (status, timed_out) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // Could not wait: make sure the child is gone, then collect it.
            let _ = sys::kill(-pid_of(&child), libc::SIGKILL);
            (
                child.wait().map_err(|e2| SpawnFailed {
                    message: format!("wait: {e}; {e2}"),
                    errno: e2.raw_os_error(),
                })?,
                false,
            )
        }
    };
    let (stdout, stdout_truncated) = out.finish();
    let (stderr, stderr_truncated) = err.finish();
    let mut reply = ExecReply {
        exit_code: exit_code(status),
        signal: status.signal(),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
    };
    fit_reply(&mut reply);
    Ok(reply)
}

/// Pipes for stdout and stderr, for stdin when `stdin` (else
/// `/dev/null`), and a process group of its own.
pub fn piped(cmd: &mut Command, stdin: bool) {
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
}

/// `code`, or `128 + signal` for a command killed by a signal.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX)
}

struct Running {
    stdin: Option<ChildStdin>,
    stdin_data: Vec<u8>,
    stdin_written: usize,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out: Capture,
    err: Capture,
    pidfd: Option<OwnedFd>,
}

impl Running {
    fn new(child: &mut Child, stdin_data: Option<Vec<u8>>, cap: usize) -> Self {
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in [
            stdin.as_ref().map(AsRawFd::as_raw_fd),
            stdout.as_ref().map(AsRawFd::as_raw_fd),
        ]
        .into_iter()
        .chain([stderr.as_ref().map(AsRawFd::as_raw_fd)])
        .flatten()
        {
            if let Err(e) = sys::set_nonblocking(&fd, true) {
                log::error!("exec: O_NONBLOCK: {e}");
            }
        }
        let pidfd = sys::pidfd_open(child.id()).ok();
        Self {
            stdin,
            stdin_data: stdin_data.unwrap_or_default(),
            stdin_written: 0,
            stdout,
            stderr,
            out: Capture::new(cap),
            err: Capture::new(cap),
            pidfd,
        }
    }

    /// Pumps the pipes until the child has exited and its output is read.
    fn wait(
        &mut self,
        child: &mut Child,
        timeout: Option<Duration>,
    ) -> io::Result<(ExitStatus, bool)> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let mut status: Option<ExitStatus> = None;
        let mut drain_until: Option<Instant> = None;
        let mut timed_out = false;
        if self.stdin_data.is_empty() {
            self.stdin = None;
        }
        loop {
            let now = Instant::now();
            if status.is_none() {
                if let Some(s) = child.try_wait()? {
                    status = Some(s);
                    drain_until = Some(now + DRAIN_GRACE);
                    self.stdin = None;
                }
            }
            if let Some(s) = status {
                let drained = self.stdout.is_none() && self.stderr.is_none();
                if drained || drain_until.is_some_and(|d| now >= d) {
                    return Ok((s, timed_out));
                }
            }
            if status.is_none() && !timed_out && deadline.is_some_and(|d| now >= d) {
                if let Err(e) = sys::kill(-pid_of(child), libc::SIGKILL) {
                    log::error!("exec: kill: {e}");
                    let _ = child.kill();
                }
                timed_out = true;
            }

            let mut wait = None::<Duration>;
            let mut shorten = |d: Duration| wait = Some(wait.map_or(d, |w: Duration| w.min(d)));
            if status.is_none() {
                if let (Some(d), false) = (deadline, timed_out) {
                    shorten(d.saturating_duration_since(now));
                }
                if self.pidfd.is_none() {
                    shorten(FALLBACK_TICK);
                }
            }
            if let Some(d) = drain_until {
                shorten(d.saturating_duration_since(now));
            }

            let mut fds = Vec::with_capacity(4);
            let slot = |fds: &mut Vec<libc::pollfd>, fd: Option<i32>, events: libc::c_short| {
                fd.map(|fd| {
                    fds.push(libc::pollfd {
                        fd,
                        events,
                        revents: 0,
                    });
                    fds.len() - 1
                })
            };
            let i_in = slot(
                &mut fds,
                self.stdin.as_ref().map(AsRawFd::as_raw_fd),
                libc::POLLOUT,
            );
            let i_out = slot(
                &mut fds,
                self.stdout.as_ref().map(AsRawFd::as_raw_fd),
                libc::POLLIN,
            );
            let i_err = slot(
                &mut fds,
                self.stderr.as_ref().map(AsRawFd::as_raw_fd),
                libc::POLLIN,
            );
            let pidfd = if status.is_none() {
                self.pidfd.as_ref().map(AsRawFd::as_raw_fd)
            } else {
                None
            };
            slot(&mut fds, pidfd, libc::POLLIN);
            sys::poll(&mut fds, wait)?;
            let ready =
                |i: Option<usize>| i.and_then(|i| fds.get(i)).is_some_and(|p| p.revents != 0);

            if ready(i_in) {
                self.feed_stdin();
            }
            if ready(i_out) && pump(&mut self.stdout, &mut self.out) {
                self.stdout = None;
            }
            if ready(i_err) && pump(&mut self.stderr, &mut self.err) {
                self.stderr = None;
            }
        }
    }

    fn feed_stdin(&mut self) {
        let Some(pipe) = self.stdin.as_mut() else {
            return;
        };
        let pending = self
            .stdin_data
            .get(self.stdin_written..)
            .unwrap_or_default();
        match pipe.write(pending) {
            Ok(n) => {
                self.stdin_written += n;
                if self.stdin_written >= self.stdin_data.len() {
                    // Closing stdin signals end of input to the command.
                    self.stdin = None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the command closed its stdin; the rest is not wanted.
            Err(_) => self.stdin = None,
        }
    }
}

/// Reads what is available from `pipe` into `capture`; true at end of file
/// or on error (the pipe is then done).
fn pump<R: Read>(pipe: &mut Option<R>, capture: &mut Capture) -> bool {
    let Some(reader) = pipe.as_mut() else {
        return true;
    };
    let mut buf = [0u8; 16 * 1024];
    // Bounded, so one chatty stream cannot starve the other.
    for _ in 0..16 {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => capture.push(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    false
}

/// Keeps reading (and dropping) a pipe that a background process still
/// holds, until it closes it.
fn drain_in_background<R: Read + AsRawFd + Send + 'static>(pipe: Option<R>) {
    let Some(mut reader) = pipe else { return };
    if sys::set_nonblocking(&reader, false).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("drain".to_owned())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("exec: cannot start output drainer: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_plain(plan: Plan) -> Result<ExecReply, SpawnFailed> {
        run(plan, None)
    }

    fn plan(argv: &[&str]) -> Plan {
        Plan::new(ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecRequest::default()
        })
        .expect("valid plan")
    }

    #[test]
    fn capture_keeps_up_to_the_cap_and_flags_the_rest() {
        let mut c = Capture::new(5);
        c.push(b"abc");
        c.push(b"def");
        c.push(b"ghi");
        assert_eq!(c.finish(), ("abcde".to_owned(), true));
        let mut c = Capture::new(3);
        c.push(b"abc");
        assert_eq!(c.finish(), ("abc".to_owned(), false));
        let mut c = Capture::new(0);
        c.push(b"");
        assert_eq!(c.finish(), (String::new(), false));
    }

    #[test]
    fn capture_output_is_lossy_utf8() {
        let mut c = Capture::new(10);
        c.push(&[b'a', 0xff, b'b']);
        assert_eq!(c.finish().0, "a\u{fffd}b");
    }

    #[test]
    fn plan_validates_parameters() {
        let bad = |req: ExecRequest| Plan::new(req).err().map(|e| e.0);
        assert_eq!(bad(ExecRequest::default()), Some("argv".to_owned()));
        let base = ExecRequest {
            argv: vec!["true".into()],
            ..ExecRequest::default()
        };
        assert_eq!(
            bad(ExecRequest {
                argv: vec![String::new()],
                ..base.clone()
            }),
            Some("argv".into())
        );
        assert_eq!(
            bad(ExecRequest {
                env: vec!["NOEQUALS".into()],
                ..base.clone()
            }),
            Some("env".into())
        );
        assert_eq!(
            bad(ExecRequest {
                env: vec!["=x".into()],
                ..base.clone()
            }),
            Some("env".into())
        );
        assert_eq!(
            bad(ExecRequest {
                max_output_bytes: Some(LIMIT_MAX_OUTPUT_BYTES + 1),
                ..base.clone()
            }),
            Some("maxOutputBytes".into())
        );
        let ok = Plan::new(ExecRequest {
            env: vec!["A=b=c".into()],
            ..base
        })
        .expect("ok");
        assert_eq!(ok.env, [("A".to_owned(), "b=c".to_owned())]);
        assert_eq!(ok.max_output, DEFAULT_MAX_OUTPUT_BYTES as usize);
    }

    #[test]
    fn fit_reply_shrinks_oversized_output() {
        let mut reply = ExecReply {
            stdout: "\u{1}".repeat(MAX_MESSAGE_BYTES / 4),
            stderr: "é".repeat(10),
            ..ExecReply::default()
        };
        fit_reply(&mut reply);
        assert!(serde_json::to_vec(&reply).expect("json").len() < MAX_MESSAGE_BYTES);
        assert!(reply.stdout_truncated);
        assert!(!reply.stderr_truncated);
        assert_eq!(reply.stderr.len(), 20);
    }

    #[test]
    fn cut_respects_char_boundaries() {
        let mut s = "aé".to_owned();
        cut(&mut s, 2);
        assert_eq!(s, "a");
    }

    #[test]
    fn runs_a_command_and_captures_both_streams() {
        let reply = run_plain(plan(&["sh", "-c", "echo out; echo err >&2; exit 3"])).expect("ran");
        assert_eq!(reply.exit_code, 3);
        assert_eq!(reply.stdout, "out\n");
        assert_eq!(reply.stderr, "err\n");
        assert_eq!(reply.signal, None);
        assert!(!reply.timed_out);
    }

    #[test]
    fn feeds_stdin_and_passes_env() {
        let mut p = plan(&["sh", "-c", "cat; echo \"$FOO\""]);
        p.stdin = Some(b"hello\n".to_vec());
        p.env = vec![("FOO".into(), "bar".into())];
        let reply = run_plain(p).expect("ran");
        assert_eq!(reply.stdout, "hello\nbar\n");
        assert_eq!(reply.exit_code, 0);
    }

    #[test]
    fn caps_output_but_keeps_draining() {
        let mut p = plan(&["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"]);
        p.max_output = 1000;
        let reply = run_plain(p).expect("ran");
        assert_eq!(reply.stdout.len(), 1000);
        assert!(reply.stdout_truncated);
        assert_eq!(reply.stderr, "done\n");
        assert_eq!(reply.exit_code, 0);
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let mut p = plan(&["sh", "-c", "sleep 30; echo never"]);
        p.timeout = Some(Duration::from_millis(200));
        let start = Instant::now();
        let reply = run_plain(p).expect("ran");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(reply.timed_out);
        assert_eq!(reply.signal, Some(libc::SIGKILL));
        assert_eq!(reply.exit_code, 128 + libc::SIGKILL);
    }

    #[test]
    fn background_processes_holding_stdout_do_not_block() {
        let start = Instant::now();
        let reply = run_plain(plan(&["sh", "-c", "sleep 3 & echo started"])).expect("ran");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(reply.stdout, "started\n");
    }

    #[test]
    fn missing_program_is_a_spawn_failure() {
        assert!(matches!(
            run_plain(plan(&["/nonexistent/kiln-test"])),
            Err(SpawnFailed {
                errno: Some(libc::ENOENT),
                ..
            })
        ));
    }
}
