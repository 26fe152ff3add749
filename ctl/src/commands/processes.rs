//! Processes in a VM: `exec` (output printed as it is written, standard
//! input passed on with -i, a terminal with -t, or left running with
//! --detach) and `shell` (a terminal).
//!
//! One connection follows the process (`StartProcess` with `more`); the
//! calls made meanwhile (`WriteProcess`, `SignalProcess`, `ResizeProcess`)
//! go over connections of their own, from the threads that make them:
//! varlink answers a connection's calls in order, and that one is busy
//! until the process ends.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{CtlError, Ctx};
use crate::api::Manager;
use crate::cli::{ExecArgs, ShellArgs};
use crate::client::{ClientError, Reply};
use crate::terminal::{self, RawMode, Signals, Size};

/// The signals passed on to the process's group instead of ending
/// kilnctl: Ctrl-C, Ctrl-\, `kill`, and a terminal that hangs up.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP];

/// Bytes of standard input per `WriteProcess` call.
const STDIN_CHUNK: usize = 64 * 1024;

/// What `shell` runs when given no command.
const DEFAULT_SHELL: &str = "/bin/sh";

/// ^D, what a terminal sends for the end of input.
const END_OF_INPUT: u8 = 0x04;

/// How long the terminal's last output may trail the exit reply (kilnd
/// closes its end before it sends that reply).
const DRAIN: Duration = Duration::from_secs(5);

/// `exec`.
pub fn exec(ctx: &mut Ctx, args: ExecArgs) -> Result<i32, CtlError> {
    if args.tty && ctx.json {
        return Err(CtlError::Usage(
            "--json: a terminal's output is not JSON (leave out -t)".into(),
        ));
    }
    let id = ctx.resolve(&args.vm)?;
    let spec = ProcessSpec {
        argv: &args.command,
        env: &args.env,
        container: args.container.as_deref(),
        // A terminal takes its input itself; pipes need asking for stdin.
        stdin: args.interactive && !args.tty,
        tty: args.tty.then(terminal::local_size),
    };
    if args.detach {
        let reply = ctx.api.start_process(&id, &spec.to_json(), true)?;
        if !ctx.json(&reply) {
            println!("{}", handle_of(&reply)?);
        }
        return Ok(0);
    }
    let run = Run {
        id: &id,
        spec: spec.to_json(),
        interactive: args.interactive,
        timeout: args.timeout,
    };
    if args.tty {
        on_terminal(ctx, &run)
    } else {
        streamed(ctx, &run)
    }
}

/// `shell`: `exec -it`, `/bin/sh` unless told otherwise.
pub fn shell(ctx: &mut Ctx, args: ShellArgs) -> Result<i32, CtlError> {
    if ctx.json {
        return Err(CtlError::Usage(
            "--json: a terminal's output is not JSON".into(),
        ));
    }
    let id = ctx.resolve(&args.vm)?;
    let argv = if args.command.is_empty() {
        vec![DEFAULT_SHELL.to_owned()]
    } else {
        args.command
    };
    let spec = ProcessSpec {
        argv: &argv,
        env: &[],
        container: args.container.as_deref(),
        stdin: false,
        tty: Some(terminal::local_size()),
    };
    let run = Run {
        id: &id,
        spec: spec.to_json(),
        interactive: true,
        timeout: None,
    };
    on_terminal(ctx, &run)
}

/// The API's ProcessSpec.
#[derive(Debug)]
struct ProcessSpec<'a> {
    argv: &'a [String],
    env: &'a [String],
    container: Option<&'a str>,
    stdin: bool,
    tty: Option<Size>,
}

impl ProcessSpec<'_> {
    fn to_json(&self) -> Value {
        let mut spec = json!({ "argv": self.argv });
        if !self.env.is_empty() {
            spec["env"] = json!(self.env);
        }
        if let Some(container) = self.container {
            spec["container"] = json!(container);
        }
        if self.stdin {
            spec["stdin"] = json!(true);
        }
        if let Some(size) = self.tty {
            spec["tty"] = json!({ "rows": size.rows, "cols": size.cols });
        }
        spec
    }
}

/// A process to run and follow.
#[derive(Debug)]
struct Run<'a> {
    id: &'a str,
    spec: Value,
    /// Pass kilnctl's standard input on.
    interactive: bool,
    /// SIGKILL after this long.
    timeout: Option<Duration>,
}

/// Output as it comes, each stream on kilnctl's own (with `--json`, each
/// reply as a JSON line); standard input passed on with `-i`.
fn streamed(ctx: &mut Ctx, run: &Run<'_>) -> Result<i32, CtlError> {
    // Before any thread starts, so that all of them leave these signals to
    // the forwarder.
    let signals = Signals::block(&FORWARDED).map_err(local("blocking signals"))?;
    ctx.api.follow_process(run.id, &run.spec, false)?;
    let first = ctx.api.next_reply()?;
    let handle = handle_of(&first.parameters)?;
    if ctx.json {
        println!("{}", first.parameters);
    }
    let ended = Arc::new(AtomicBool::new(false));
    let forwarder = Forwarder::new(ctx, run, handle, false, &ended)?;
    let timed_out = Arc::clone(&forwarder.timed_out);
    thread::spawn(move || forwarder.run(&signals));
    if run.interactive {
        let (api, id, ended) = (ctx.api.reconnect()?, run.id.to_owned(), Arc::clone(&ended));
        thread::spawn(move || feed_stdin(api, &id, handle, &ended));
    }
    let exit = loop {
        let reply = ctx.api.next_reply()?;
        let p = &reply.parameters;
        if ctx.json {
            // A read with nothing in it is kilnd checking the client is
            // still there, once a second of silence: not worth a line.
            let keepalive = p.get("exit").is_none()
                && p.get("output")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            if !keepalive {
                println!("{p}");
            }
        } else {
            write_output(p)?;
        }
        if let Some(exit) = p.get("exit") {
            break exit.clone();
        }
        if !reply.continues {
            return Err(no_exit());
        }
    };
    ended.store(true, Ordering::SeqCst);
    finish(ctx, run.id, handle, &exit, &timed_out)
}

/// A process on a terminal: its descriptor (from the first reply) copied
/// to stdout, and with `-i` stdin copied to it with the local terminal in
/// raw mode; resized with the local one.
fn on_terminal(ctx: &mut Ctx, run: &Run<'_>) -> Result<i32, CtlError> {
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGWINCH);
    let signals = Signals::block(&watched).map_err(local("blocking signals"))?;
    ctx.api.follow_process(run.id, &run.spec, false)?;
    let first = ctx.api.next_reply()?;
    let handle = handle_of(&first.parameters)?;
    let terminal = UnixStream::from(terminal_of(first)?);
    let ended = Arc::new(AtomicBool::new(false));
    let forwarder = Forwarder::new(ctx, run, handle, true, &ended)?;
    let timed_out = Arc::clone(&forwarder.timed_out);
    // Raw only once the process is there: an error before leaves the
    // terminal as it was.
    let raw = if run.interactive {
        RawMode::enter(libc::STDIN_FILENO).map_err(local("the terminal"))?
    } else {
        None
    };
    thread::spawn(move || forwarder.run(&signals));
    let (drained, output_done) = mpsc::channel();
    let from = terminal.try_clone().map_err(local("the terminal"))?;
    thread::spawn(move || {
        copy_to_stdout(from);
        let _ = drained.send(());
    });
    if run.interactive {
        let raw_mode = raw.is_some();
        thread::spawn(move || type_into(terminal, raw_mode));
    }
    let last = loop {
        let reply = ctx.api.next_reply()?;
        if reply.parameters.get("exit").is_some() || !reply.continues {
            break reply.parameters;
        }
    };
    ended.store(true, Ordering::SeqCst);
    let _ = output_done.recv_timeout(DRAIN);
    drop(raw);
    let exit = last.get("exit").cloned().ok_or_else(no_exit)?;
    finish(ctx, run.id, handle, &exit, &timed_out)
}

/// The process ended: forget it in the guest, say whether `--timeout`
/// killed it, and return its status as kilnctl's.
fn finish(
    ctx: &mut Ctx,
    id: &str,
    handle: u64,
    exit: &Value,
    timed_out: &AtomicBool,
) -> Result<i32, CtlError> {
    // Best effort: the guest forgets the oldest ended process anyway when
    // it needs room.
    let _ = ctx.api.release_process(id, handle);
    // On stderr with --json too: the replies only say SIGKILL.
    if timed_out.load(Ordering::SeqCst) {
        eprintln!("kilnctl: the command ran longer than --timeout and was killed");
    }
    let code = exit.get("exitCode").and_then(Value::as_i64).unwrap_or(0);
    Ok(code.clamp(0, 255) as i32)
}

/// The thread that takes the signals kilnctl would die of and passes them
/// on (SIGWINCH as a resize), and kills the process at `--timeout`.
struct Forwarder {
    api: Manager,
    id: String,
    handle: u64,
    deadline: Option<Instant>,
    /// Pass SIGWINCH on as `ResizeProcess`.
    resize: bool,
    /// The process ended: a call that fails now is no news.
    ended: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Forwarder {
    fn new(
        ctx: &Ctx,
        run: &Run<'_>,
        handle: u64,
        resize: bool,
        ended: &Arc<AtomicBool>,
    ) -> Result<Self, CtlError> {
        Ok(Self {
            api: ctx.api.reconnect()?,
            id: run.id.to_owned(),
            handle,
            deadline: run.timeout.map(|t| Instant::now() + t),
            resize,
            ended: Arc::clone(ended),
            timed_out: Arc::new(AtomicBool::new(false)),
        })
    }

    fn run(mut self, signals: &Signals) {
        loop {
            let result = match signals.wait(self.deadline) {
                None => {
                    self.deadline = None;
                    self.timed_out.store(true, Ordering::SeqCst);
                    self.signal(libc::SIGKILL)
                }
                Some(libc::SIGWINCH) if self.resize => {
                    let size = terminal::local_size();
                    self.api
                        .resize_process(&self.id, self.handle, size.rows, size.cols)
                        .map(drop)
                        .map_err(|e| ("resize the terminal".to_owned(), e))
                }
                Some(libc::SIGWINCH) => Ok(()),
                Some(signal) => self.signal(signal),
            };
            if let Err((what, e)) = result {
                if !self.ended.load(Ordering::SeqCst) {
                    eprintln!("kilnctl: cannot {what}: {e}");
                }
            }
        }
    }

    fn signal(&mut self, signal: libc::c_int) -> Result<(), (String, ClientError)> {
        self.api
            .signal_process(&self.id, self.handle, signal)
            .map(drop)
            .map_err(|e| (format!("pass {} on", terminal::signal_name(signal)), e))
    }
}

/// `-i` without a terminal: kilnctl's standard input to the process's, a
/// `WriteProcess` per read (at most 64 KiB), closed at its end.
fn feed_stdin(mut api: Manager, id: &str, handle: u64, ended: &AtomicBool) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut stdin = io::stdin().lock();
    let result = loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !ended.load(Ordering::SeqCst) {
                    eprintln!("kilnctl: standard input: {e}");
                }
                0
            }
        };
        let Some(bytes) = buf.get(..n).filter(|b| !b.is_empty()) else {
            break api.write_process(id, handle, None, true);
        };
        let data = BASE64.encode(bytes);
        if let Err(e) = api.write_process(id, handle, Some(&data), false) {
            break Err(e);
        }
    };
    if let Err(e) = result {
        // A command that ended (or closed its stdin) before reading it
        // all is not an error of the command's.
        if !ended.load(Ordering::SeqCst) {
            eprintln!("kilnctl: standard input not passed on: {e}");
        }
    }
}

/// Keys (or piped bytes) into the terminal. At the end of a piped input
/// a ^D, as a person would type it (closing the socket would hang the
/// terminal up, killing the process).
fn type_into(mut terminal: UnixStream, raw: bool) {
    terminal::no_sigpipe_in_this_thread();
    let mut buf = vec![0u8; 4096];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(n) if n > 0 => {
                if terminal
                    .write_all(buf.get(..n).unwrap_or_default())
                    .is_err()
                {
                    return;
                }
            }
            _ => {
                if !raw {
                    let _ = terminal.write_all(&[END_OF_INPUT]);
                }
                return;
            }
        }
    }
}

/// The terminal's output to stdout as it comes, until kilnd closes it.
fn copy_to_stdout(mut terminal: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdout = io::stdout().lock();
    loop {
        match terminal.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(n) if n > 0 => {
                let written = stdout
                    .write_all(buf.get(..n).unwrap_or_default())
                    .and_then(|()| stdout.flush());
                if written.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// A read's output chunks, each decoded onto kilnctl's stream of the same
/// name and flushed, so a terminal showing both shows them in order.
fn write_output(reply: &Value) -> Result<(), CtlError> {
    let chunks = reply.get("output").and_then(Value::as_array);
    for chunk in chunks.into_iter().flatten() {
        let data = chunk.get("data").and_then(Value::as_str).unwrap_or("");
        let bytes = BASE64
            .decode(data)
            .map_err(|e| ClientError::Protocol(format!("output data: {e}")))?;
        // Best effort on our side, as for every output: a reader that went
        // away ends kilnctl (SIGPIPE), which ends the process.
        let _ = if chunk.get("stream").and_then(Value::as_str) == Some("stderr") {
            let mut stderr = io::stderr().lock();
            stderr.write_all(&bytes).and_then(|()| stderr.flush())
        } else {
            let mut stdout = io::stdout().lock();
            stdout.write_all(&bytes).and_then(|()| stdout.flush())
        };
    }
    Ok(())
}

fn handle_of(reply: &Value) -> Result<u64, CtlError> {
    reply
        .get("handle")
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::Protocol(format!("no process handle in {reply}")).into())
}

/// The terminal's descriptor, passed with the first reply, blocking
/// whatever kilnd's side uses.
fn terminal_of(first: Reply) -> Result<OwnedFd, CtlError> {
    let fd = first.take_fd("terminal")?;
    set_blocking(&fd).map_err(local("the terminal"))?;
    Ok(fd)
}

fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn no_exit() -> CtlError {
    ClientError::Protocol("the process's replies ended without its exit status".into()).into()
}

/// An error of this machine's, about `what`.
fn local(what: &'static str) -> impl Fn(io::Error) -> CtlError {
    move |source| CtlError::Local {
        what: what.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_carry_what_was_asked() {
        let argv = ["sh".to_owned(), "-c".to_owned(), "true".to_owned()];
        let env = ["A=1".to_owned()];
        let spec = ProcessSpec {
            argv: &argv,
            env: &env,
            container: Some("main"),
            stdin: true,
            tty: None,
        };
        assert_eq!(
            spec.to_json(),
            json!({"argv": ["sh", "-c", "true"], "env": ["A=1"], "container": "main",
                   "stdin": true})
        );
        let spec = ProcessSpec {
            argv: &argv[..1],
            env: &[],
            container: None,
            stdin: false,
            tty: Some(Size {
                rows: 30,
                cols: 100,
            }),
        };
        assert_eq!(
            spec.to_json(),
            json!({"argv": ["sh"], "tty": {"rows": 30, "cols": 100}})
        );
    }

    #[test]
    fn terminals_come_by_index() {
        let (a, _b) = UnixStream::pair().unwrap();
        let reply = Reply {
            parameters: json!({"handle": 3, "pid": 40, "terminal": 0}),
            continues: true,
            fds: vec![OwnedFd::from(a)],
        };
        assert!(terminal_of(reply).is_ok());
        let reply = Reply {
            parameters: json!({"handle": 3, "pid": 40, "terminal": 1}),
            continues: true,
            fds: vec![],
        };
        assert!(terminal_of(reply).is_err());
        assert_eq!(handle_of(&json!({"handle": 7})).unwrap(), 7);
        assert!(handle_of(&json!({})).is_err());
    }
}
