//! Streamed processes: `SpawnProcess`, `ReadProcess`, `WriteProcess`,
//! `SignalProcess`, `ResizeProcess`, `ReleaseProcess`.
//!
//! A process runs on pipes or on a pseudo-terminal. One collector thread
//! per process copies its output into an [`Outbox`] that holds at most
//! [`PROCESS_BUFFER_BYTES`] the host has not acknowledged; while it is full
//! the collector stops reading, so a slow reader makes the process block
//! on its writes (back-pressure) instead of growing memory. The host
//! acknowledges by reading on from a later cursor.
//!
//! Exit statuses come from PID 1's reaping ([`Sessions::child_exited`]),
//! never from a `waitpid` of our own, so they cannot be stolen.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_agent_proto::{
    decode_bytes, encode_bytes, ExecRequest, LogStream, ProcessExit, ProcessOutput,
    ReadProcessReply, ReadProcessRequest, SpawnProcessReply, SpawnProcessRequest, WindowSize,
    WriteProcessReply, DEFAULT_PROCESS_READ_BYTES, LIMIT_PROCESS_READ_BYTES, LIMIT_PROCESS_WAIT_MS,
    MAX_PROCESSES, MAX_WRITE_BYTES, PROCESS_BUFFER_BYTES,
};

use crate::container::Enter;
use crate::exec::{self, Plan, SpawnFailed, BASE_HOME, BASE_PATH};
use crate::params::InvalidParameter;
use crate::{log, sys};

/// After the process exited, how long output from processes it left in the
/// background (still holding its pipes) is waited for before the stream
/// counts as ended.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// `TERM` of a process on a terminal that names none.
const DEFAULT_TERM: &str = "TERM=xterm-256color";
/// End-of-file character of a terminal in canonical mode (^D).
const VEOF: u8 = 0x04;

/// Why a process call failed.
#[derive(Debug)]
pub enum SessionError {
    /// A parameter is malformed.
    InvalidParameter(InvalidParameter),
    /// No process has the handle.
    NoSuchProcess(u64),
    /// The table is full of running processes.
    TooManyProcesses,
    /// The process has no terminal, or no open stdin.
    NotInteractive,
    /// The command could not be started.
    Spawn(SpawnFailed),
}

impl From<InvalidParameter> for SessionError {
    fn from(e: InvalidParameter) -> Self {
        Self::InvalidParameter(e)
    }
}

/// Output not yet acknowledged by the host, shared with the collector.
#[derive(Debug, Default)]
struct Outbox {
    chunks: VecDeque<(LogStream, Vec<u8>)>,
    /// Cursor of the first byte of `chunks`.
    start: u64,
    /// Bytes held in `chunks`.
    held: usize,
    /// Every output descriptor reached end of file.
    closed: bool,
    /// The host released the process: the collector stops.
    released: bool,
}

impl Outbox {
    fn end(&self) -> u64 {
        self.start + self.held as u64
    }

    /// Frees everything before `cursor`.
    fn acknowledge(&mut self, cursor: u64) {
        while self.start < cursor {
            let Some((_, data)) = self.chunks.front_mut() else {
                break;
            };
            let drop = usize::try_from(cursor - self.start)
                .unwrap_or(usize::MAX)
                .min(data.len());
            data.drain(..drop);
            self.start += drop as u64;
            self.held -= drop;
            if data.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    fn push(&mut self, stream: LogStream, data: &[u8]) {
        match self.chunks.back_mut() {
            Some((last, bytes)) if *last == stream => bytes.extend_from_slice(data),
            _ => self.chunks.push_back((stream, data.to_vec())),
        }
        self.held += data.len();
    }

    /// Up to `max` bytes from the first kept one.
    fn peek(&self, max: usize) -> (Vec<ProcessOutput>, u64) {
        let mut output = Vec::new();
        let mut left = max;
        let mut cursor = self.start;
        for (stream, data) in &self.chunks {
            if left == 0 {
                break;
            }
            let take = data.len().min(left);
            output.push(ProcessOutput {
                stream: *stream,
                data: encode_bytes(data.get(..take).unwrap_or_default()),
            });
            cursor += take as u64;
            left -= take;
        }
        (output, cursor)
    }
}

#[derive(Debug, Default)]
struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled on new output, end of file and release (collector →
    /// readers) and on acknowledgements (readers → a waiting collector).
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where the host's bytes go.
#[derive(Debug)]
enum Input {
    /// stdin is `/dev/null` or was closed.
    Closed,
    /// The write end of the stdin pipe (non-blocking).
    Pipe(File),
    /// The terminal's master (non-blocking).
    Terminal(File),
}

#[derive(Debug)]
struct Session {
    pid: libc::pid_t,
    input: Input,
    /// The terminal's master, for window sizes.
    terminal: Option<File>,
    shared: Arc<Shared>,
    exit: Option<(ProcessExit, Instant)>,
}

impl Session {
    fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// Whether the host has everything: exited, and the output drained
    /// (or nothing came for [`DRAIN_GRACE`] after the exit).
    fn ended(&self, outbox: &Outbox) -> bool {
        self.exit.is_some_and(|(_, at)| {
            outbox.held == 0 && (outbox.closed || at.elapsed() >= DRAIN_GRACE)
        })
    }
}

/// A terminal's master as a process's input and its one output stream.
fn terminal_ends(master: &File) -> io::Result<(Input, Vec<(LogStream, File)>)> {
    Ok((
        Input::Terminal(master.try_clone()?),
        vec![(LogStream::Stdout, master.try_clone()?)],
    ))
}

/// stdin (if piped) and the output pipes of a spawned `child`.
fn take_pipes(child: &mut std::process::Child) -> (Input, Vec<(LogStream, File)>) {
    let input = child
        .stdin
        .take()
        .map_or(Input::Closed, |p| Input::Pipe(File::from(OwnedFd::from(p))));
    let mut outputs = Vec::new();
    if let Some(out) = child.stdout.take() {
        outputs.push((LogStream::Stdout, File::from(OwnedFd::from(out))));
    }
    if let Some(err) = child.stderr.take() {
        outputs.push((LogStream::Stderr, File::from(OwnedFd::from(err))));
    }
    (input, outputs)
}

/// Every streamed process of this guest.
#[derive(Debug, Default)]
pub struct Sessions {
    table: BTreeMap<u64, Session>,
    next_handle: u64,
}

impl Sessions {
    /// A child of the agent was reaped: if it is one of ours, it exited.
    pub fn child_exited(&mut self, pid: libc::pid_t, status: ExitStatus) {
        let exit = ProcessExit {
            exit_code: status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            signal: status.signal(),
        };
        self.exited(pid, exit);
    }

    /// The validated command of `req`.
    pub fn plan(req: &SpawnProcessRequest) -> Result<Plan, SessionError> {
        if let Some(size) = req.tty {
            check_size(size)?;
        }
        Ok(Plan::new(ExecRequest {
            argv: req.argv.clone(),
            env: req.env.clone(),
            ..ExecRequest::default()
        })?)
    }

    /// `SpawnProcess`: starts `plan` (inside the container `enter`, if
    /// any) with the stdio `req` asks for.
    pub fn spawn(
        &mut self,
        req: &SpawnProcessRequest,
        plan: &Plan,
        enter: Option<Enter>,
    ) -> Result<SpawnProcessReply, SessionError> {
        self.make_room()?;
        let argv = plan.argv();
        let mut cmd = Command::new(argv.first().map_or("", String::as_str));
        cmd.args(argv.get(1..).unwrap_or_default())
            .env_clear()
            .env("PATH", BASE_PATH)
            .env("HOME", BASE_HOME)
            .current_dir("/");
        if req.tty.is_some() && !plan.env().iter().any(|(k, _)| k == "TERM") {
            if let Some((key, value)) = DEFAULT_TERM.split_once('=') {
                cmd.env(key, value);
            }
        }
        cmd.envs(plan.env().iter().map(|(k, v)| (k, v)));
        let spawn_failed = |e: io::Error| {
            SessionError::Spawn(SpawnFailed {
                message: format!("{}: {e}", argv.first().map_or("", String::as_str)),
                errno: e.raw_os_error(),
            })
        };
        let (input, terminal, outputs) = match req.tty {
            Some(size) => {
                let (master, slave) = open_pty(size).map_err(spawn_failed)?;
                let stdio = |f: &File| f.try_clone().map(Stdio::from);
                cmd.stdin(stdio(&slave).map_err(spawn_failed)?)
                    .stdout(stdio(&slave).map_err(spawn_failed)?)
                    .stderr(Stdio::from(slave));
                // SAFETY: setsid and ioctl are async-signal-safe system
                // calls on descriptors that exist in the child.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let (input, outputs) = terminal_ends(&master).map_err(spawn_failed)?;
                (input, Some(master), outputs)
            }
            None => {
                exec::piped(&mut cmd, req.stdin);
                (Input::Closed, None, Vec::new())
            }
        };
        let mut child = match enter {
            Some(enter) => enter.spawn(&mut cmd),
            None => cmd.spawn(),
        }
        .map_err(spawn_failed)?;
        // The command holds its copies of the terminal's slave now.
        drop(cmd);
        let (input, outputs) = if terminal.is_some() {
            (input, outputs)
        } else {
            take_pipes(&mut child)
        };
        self.register(child.id(), input, terminal, outputs)
            .map_err(spawn_failed)
    }

    /// A container's main process started with a terminal (`master`, its
    /// other end the process's stdio) or with pipes (taken from `child`):
    /// from now on a streamed process like `SpawnProcess`'s, by the
    /// returned handle. The container keeps its own record of the exit.
    pub fn adopt(
        &mut self,
        child: &mut std::process::Child,
        master: Option<File>,
    ) -> Result<SpawnProcessReply, SessionError> {
        self.make_room()?;
        let failed = |e: io::Error| {
            SessionError::Spawn(SpawnFailed {
                message: format!("container process: {e}"),
                errno: e.raw_os_error(),
            })
        };
        let (input, outputs) = match &master {
            Some(m) => terminal_ends(m).map_err(failed)?,
            None => take_pipes(child),
        };
        self.register(child.id(), input, master, outputs)
            .map_err(failed)
    }

    /// Starts the output collector of process `pid` and puts it in the
    /// table under a new handle.
    fn register(
        &mut self,
        child_id: u32,
        input: Input,
        terminal: Option<File>,
        outputs: Vec<(LogStream, File)>,
    ) -> io::Result<SpawnProcessReply> {
        if let Input::Pipe(f) | Input::Terminal(f) = &input {
            if let Err(e) = sys::set_nonblocking(f, true) {
                log::error!("process stdin: O_NONBLOCK: {e}");
            }
        }
        let pid = libc::pid_t::try_from(child_id).unwrap_or(libc::pid_t::MAX);
        let shared = Arc::new(Shared::default());
        let collector = Arc::clone(&shared);
        let started = std::thread::Builder::new()
            .name("process".to_owned())
            .stack_size(64 * 1024)
            .spawn(move || collect(outputs, &collector));
        if let Err(e) = started {
            // Nobody would read its output: do not leave it running.
            let _ = sys::kill(-pid, libc::SIGKILL);
            return Err(e);
        }
        self.next_handle += 1;
        let handle = self.next_handle;
        self.table.insert(
            handle,
            Session {
                pid,
                input,
                terminal,
                shared,
                exit: None,
            },
        );
        Ok(SpawnProcessReply {
            handle,
            pid: child_id,
        })
    }

    /// A process of ours ended, its status collected by someone else (a
    /// container waiting for its own process).
    pub fn exited(&mut self, pid: libc::pid_t, exit: ProcessExit) {
        if let Some(s) = self
            .table
            .values_mut()
            .find(|s| s.running() && s.pid == pid)
        {
            s.exit = Some((exit, Instant::now()));
            s.shared.changed.notify_all();
        }
    }

    /// Makes room for one more process by forgetting the oldest that
    /// exited; refuses when all are running.
    fn make_room(&mut self) -> Result<(), SessionError> {
        if self.table.len() < MAX_PROCESSES {
            return Ok(());
        }
        let oldest_exited = self
            .table
            .iter()
            .find(|(_, s)| !s.running())
            .map(|(h, _)| *h);
        match oldest_exited {
            Some(handle) => {
                self.release(handle)?;
                Ok(())
            }
            None => Err(SessionError::TooManyProcesses),
        }
    }

    fn find(&mut self, handle: u64) -> Result<&mut Session, SessionError> {
        self.table
            .get_mut(&handle)
            .ok_or(SessionError::NoSuchProcess(handle))
    }

    /// `ReadProcess` without waiting: `None` when there is nothing new
    /// yet and the caller should wait (then call again).
    pub fn try_read(
        &mut self,
        req: &ReadProcessRequest,
        may_wait: bool,
    ) -> Result<Option<ReadProcessReply>, SessionError> {
        let max = req.max_bytes.unwrap_or(DEFAULT_PROCESS_READ_BYTES);
        if max == 0 || max > LIMIT_PROCESS_READ_BYTES {
            return Err(InvalidParameter::new("maxBytes").into());
        }
        let session = self.find(req.handle)?;
        let mut outbox = session.shared.lock();
        if let Some(since) = req.since {
            if since > outbox.end() {
                return Err(InvalidParameter::new("since").into());
            }
            outbox.acknowledge(since);
            session.shared.changed.notify_all();
        }
        let ended = session.ended(&outbox);
        if outbox.held == 0 && !ended && may_wait {
            return Ok(None);
        }
        let (output, cursor) = outbox.peek(usize::try_from(max).unwrap_or(usize::MAX));
        Ok(Some(ReadProcessReply {
            output,
            cursor,
            exit: session.exit.map(|(exit, _)| exit),
            ended,
        }))
    }

    /// Blocks up to `slice` for new output of `handle` (or a change).
    pub fn wait_for_output(&self, handle: u64, slice: Duration) {
        let Some(session) = self.table.get(&handle) else {
            return;
        };
        let outbox = session.shared.lock();
        if outbox.held > 0 || outbox.closed {
            return;
        }
        let _ = session.shared.changed.wait_timeout(outbox, slice);
    }

    /// `WriteProcess`.
    pub fn write(
        &mut self,
        handle: u64,
        data: &str,
        close: bool,
    ) -> Result<WriteProcessReply, SessionError> {
        let bytes = decode_bytes(data).ok_or_else(|| InvalidParameter::new("data"))?;
        if bytes.len() > MAX_WRITE_BYTES {
            return Err(InvalidParameter::new("data").into());
        }
        let session = self.find(handle)?;
        let written = match &mut session.input {
            Input::Closed => return Err(SessionError::NotInteractive),
            Input::Pipe(f) | Input::Terminal(f) => write_some(f, &bytes),
        };
        if close && written == bytes.len() {
            match &mut session.input {
                Input::Terminal(f) => {
                    write_some(f, &[VEOF]);
                }
                input => *input = Input::Closed,
            }
        }
        Ok(WriteProcessReply {
            written: written as u64,
        })
    }

    /// `SignalProcess`: to the process's group (its session on a terminal).
    pub fn signal(&mut self, handle: u64, signal: i32) -> Result<(), SessionError> {
        if !(1..=64).contains(&signal) {
            return Err(InvalidParameter::new("signal").into());
        }
        let session = self.find(handle)?;
        if session.running() {
            if let Err(e) = sys::kill(-session.pid, signal) {
                // The group leader may be gone while the process lingers
                // unreaped: signal the process itself then.
                if e.raw_os_error() == Some(libc::ESRCH) {
                    let _ = sys::kill(session.pid, signal);
                }
            }
        }
        Ok(())
    }

    /// `ResizeProcess`.
    pub fn resize(&mut self, handle: u64, size: WindowSize) -> Result<(), SessionError> {
        check_size(size)?;
        let session = self.find(handle)?;
        let terminal = session
            .terminal
            .as_ref()
            .ok_or(SessionError::NotInteractive)?;
        set_window_size(terminal, size).map_err(|e| {
            SessionError::Spawn(SpawnFailed {
                message: format!("TIOCSWINSZ: {e}"),
                errno: e.raw_os_error(),
            })
        })
    }

    /// `ReleaseProcess`: kills a running process's group and forgets it.
    pub fn release(&mut self, handle: u64) -> Result<(), SessionError> {
        let session = self
            .table
            .remove(&handle)
            .ok_or(SessionError::NoSuchProcess(handle))?;
        if session.running() {
            let _ = sys::kill(-session.pid, libc::SIGKILL);
            let _ = sys::kill(session.pid, libc::SIGKILL);
        }
        session.shared.lock().released = true;
        session.shared.changed.notify_all();
        Ok(())
    }
}

fn check_size(size: WindowSize) -> Result<(), InvalidParameter> {
    if size.rows == 0 || size.cols == 0 {
        return Err(InvalidParameter::new("tty"));
    }
    Ok(())
}

/// Writes what the descriptor takes now; the count.
fn write_some(f: &mut File, bytes: &[u8]) -> usize {
    let mut written = 0;
    while written < bytes.len() {
        match f.write(bytes.get(written..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Full (try again later) or closed by the process (EPIPE):
            // either way, what was taken is the answer.
            Err(_) => break,
        }
    }
    written
}

/// A new pseudo-terminal of `size`: (master, slave).
pub fn open_pty(size: WindowSize) -> io::Result<(File, File)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: both out-pointers are valid ints; name and termios are null
    // (allowed), winsize points to a valid struct for the call's duration.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: F_SETFD on an open descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn set_window_size(terminal: &File, size: WindowSize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    sys::ioctl_ptr(
        terminal,
        libc::TIOCSWINSZ as libc::c_ulong,
        std::ptr::from_ref(&winsize).cast(),
    )
}

/// The collector: copies `outputs` into the outbox until each reaches end
/// of file (a terminal's master reads `EIO` once every slave is closed) or
/// the process is released; waits while the outbox is full.
fn collect(mut outputs: Vec<(LogStream, File)>, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    while !outputs.is_empty() {
        {
            let mut outbox = shared.lock();
            while outbox.held >= PROCESS_BUFFER_BYTES && !outbox.released {
                outbox = shared
                    .changed
                    .wait(outbox)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if outbox.released {
                return;
            }
        }
        let mut fds: Vec<libc::pollfd> = outputs
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // A timeout, so a release is noticed even while the process is
        // silent.
        if let Err(e) = sys::poll(&mut fds, Some(Duration::from_millis(500))) {
            log::error!("process output: poll: {e}");
            break;
        }
        let mut finished = Vec::new();
        for (i, pfd) in fds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let Some((stream, file)) = outputs.get_mut(i) else {
                continue;
            };
            let room = PROCESS_BUFFER_BYTES.saturating_sub(shared.lock().held);
            let want = buf.len().min(room.max(1));
            match file.read(buf.get_mut(..want).unwrap_or_default()) {
                Ok(0) => finished.push(i),
                Ok(n) => {
                    let mut outbox = shared.lock();
                    outbox.push(*stream, buf.get(..n).unwrap_or_default());
                    shared.changed.notify_all();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: a terminal whose every slave is closed.
                Err(_) => finished.push(i),
            }
        }
        for i in finished.into_iter().rev() {
            outputs.remove(i);
        }
    }
    shared.lock().closed = true;
    shared.changed.notify_all();
}

/// How long one `ReadProcess` may wait.
pub fn wait_limit(req: &ReadProcessRequest) -> Result<Duration, InvalidParameter> {
    let wait = req.wait_ms.unwrap_or(0);
    if wait > LIMIT_PROCESS_WAIT_MS {
        return Err(InvalidParameter::new("waitMs"));
    }
    Ok(Duration::from_millis(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(sessions: &mut Sessions, req: &SpawnProcessRequest) -> u64 {
        let plan = Sessions::plan(req).unwrap();
        sessions.spawn(req, &plan, None).unwrap().handle
    }

    fn request(argv: &[&str]) -> SpawnProcessRequest {
        SpawnProcessRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..SpawnProcessRequest::default()
        }
    }

    /// Reads until ended, reaping like PID 1 would; all stdout bytes and
    /// the exit.
    fn drain(sessions: &mut Sessions, handle: u64) -> (Vec<u8>, ProcessExit) {
        let mut out = Vec::new();
        let mut since = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "process did not end");
            // Only our own children: other tests run in this process too.
            let pids: Vec<_> = sessions.table.values().map(|s| s.pid).collect();
            for pid in pids {
                if let Ok(Some(status)) = sys::try_wait(pid) {
                    sessions.child_exited(pid, status);
                }
            }
            let req = ReadProcessRequest {
                handle,
                since,
                ..ReadProcessRequest::default()
            };
            let Some(reply) = sessions.try_read(&req, true).unwrap() else {
                sessions.wait_for_output(handle, Duration::from_millis(10));
                continue;
            };
            for chunk in &reply.output {
                if chunk.stream == LogStream::Stdout {
                    out.extend(decode_bytes(&chunk.data).unwrap());
                }
            }
            since = Some(reply.cursor);
            if reply.ended {
                return (out, reply.exit.unwrap());
            }
        }
    }

    #[test]
    fn output_and_exit_arrive() {
        let mut sessions = Sessions::default();
        let handle = spawn(&mut sessions, &request(&["sh", "-c", "echo hi; exit 3"]));
        let (out, exit) = drain(&mut sessions, handle);
        assert_eq!(out, b"hi\n");
        assert_eq!(exit.exit_code, 3);
        sessions.release(handle).unwrap();
        assert!(matches!(
            sessions.release(handle),
            Err(SessionError::NoSuchProcess(_))
        ));
    }

    #[test]
    fn stdin_is_streamed_and_closed() {
        let mut sessions = Sessions::default();
        let mut req = request(&["wc", "-c"]);
        req.stdin = true;
        let handle = spawn(&mut sessions, &req);
        let reply = sessions
            .write(handle, &encode_bytes(&[7u8; 1000]), true)
            .unwrap();
        assert_eq!(reply.written, 1000);
        let (out, exit) = drain(&mut sessions, handle);
        assert_eq!(String::from_utf8_lossy(&out).trim(), "1000");
        assert_eq!(exit.exit_code, 0);
    }

    #[test]
    fn a_full_outbox_stops_the_process_until_read() {
        let mut sessions = Sessions::default();
        // Four times the buffer: the writer must wait for acknowledgements.
        let total = PROCESS_BUFFER_BYTES * 4;
        let handle = spawn(
            &mut sessions,
            &request(&["head", "-c", &total.to_string(), "/dev/zero"]),
        );
        std::thread::sleep(Duration::from_millis(300));
        {
            let session = sessions.table.get(&handle).unwrap();
            assert!(session.shared.lock().held <= PROCESS_BUFFER_BYTES);
        }
        let (out, exit) = drain(&mut sessions, handle);
        assert_eq!(out.len(), total);
        assert_eq!(exit.exit_code, 0);
    }

    #[test]
    fn a_terminal_reports_its_size_and_takes_input() {
        let mut sessions = Sessions::default();
        let mut req = request(&["sh"]);
        req.tty = Some(WindowSize { rows: 33, cols: 77 });
        let handle = spawn(&mut sessions, &req);
        sessions
            .resize(handle, WindowSize { rows: 40, cols: 90 })
            .unwrap();
        let script = encode_bytes(b"stty size; exit 5\n");
        assert!(sessions.write(handle, &script, false).unwrap().written > 0);
        let (out, exit) = drain(&mut sessions, handle);
        assert!(
            String::from_utf8_lossy(&out).contains("40 90"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(exit.exit_code, 5);
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut sessions = Sessions::default();
        assert!(matches!(
            sessions.write(99, "", false),
            Err(SessionError::NoSuchProcess(99))
        ));
        let handle = spawn(&mut sessions, &request(&["true"]));
        assert!(matches!(
            sessions.write(handle, "AA==", false),
            Err(SessionError::NotInteractive)
        ));
        assert!(matches!(
            sessions.resize(handle, WindowSize { rows: 1, cols: 1 }),
            Err(SessionError::NotInteractive)
        ));
        assert!(matches!(
            sessions.signal(handle, 0),
            Err(SessionError::InvalidParameter(_))
        ));
        let req = ReadProcessRequest {
            handle,
            since: Some(1 << 40),
            ..ReadProcessRequest::default()
        };
        assert!(matches!(
            sessions.try_read(&req, false),
            Err(SessionError::InvalidParameter(_))
        ));
        sessions.release(handle).unwrap();
    }
}
