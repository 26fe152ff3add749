//! A task's stdio: containerd's FIFOs (or `file://` log URIs) fed from
//! kilnd's streams, and the pumps that do it, each on its own thread and
//! its own kilnd connection. A pump returns once everything was written,
//! so the caller closes the FIFOs before it records the exit: `ctr run`
//! must not return before it printed.
//!
//! - a container's main process: `ContainerLogs` followed (text: output
//!   that is not UTF-8 arrives with replacement characters), its exit
//!   code from `ListContainers`;
//! - an exec: the `StartProcess` stream (base64 output, then the exit), or
//!   with a terminal the descriptor kilnd passed, relayed both ways;
//! - an exec's stdin: the FIFO to `WriteProcess`, end of file closing it.
//!
//! A pump whose connection breaks (kilnd restarting) or whose read times
//! out (a busy guest agent) connects again and goes on from its cursor,
//! for up to [`RECONNECT_FOR`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_client::api::Manager;
use kiln_client::client::ClientError;
use serde_json::{json, Value};

use crate::kiln::{error_name, is_gone, Kiln};

/// How long a pump tries to get kilnd back.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// How long a terminal's output may trail its process's exit.
const TERMINAL_DRAIN: Duration = Duration::from_secs(2);

/// Bytes of stdin per `WriteProcess`.
const STDIN_CHUNK: usize = 64 * 1024;
/// How long `CloseIO` lets a stdin pump drain its FIFO first.
const STDIN_DRAIN: Duration = Duration::from_secs(5);

/// Where a process's stdio goes, as containerd named it (empty: not
/// wanted).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The open output ends of a process.
#[derive(Debug, Default)]
pub struct Outputs {
    stdout: Option<File>,
    stderr: Option<File>,
    /// A terminal has one stream: stderr goes to stdout.
    merged: bool,
}

impl Outputs {
    /// Open `stdio`'s stdout and stderr.
    pub fn open(stdio: &Stdio) -> io::Result<Self> {
        Ok(Self {
            stdout: open_output(&stdio.stdout)?,
            stderr: open_output(&stdio.stderr)?,
            merged: stdio.terminal,
        })
    }

    /// Write `bytes` of `stream` (`stdout`, `stderr`); a reader gone is its
    /// choice, so errors only end that stream.
    fn write(&mut self, stream: &str, bytes: &[u8]) {
        let target = match stream {
            "stderr" if !self.merged => &mut self.stderr,
            _ => &mut self.stdout,
        };
        if let Some(file) = target {
            if let Err(e) = file.write_all(bytes) {
                log::debug!("writing {stream}: {e}");
                *target = None;
            }
        }
    }
}

/// Open an output: a FIFO read-write (Linux never blocks that open, and no
/// `ENXIO` when the reader is not there yet), a `file://` URI appended to,
/// nothing for an empty path.
fn open_output(path: &str) -> io::Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(file) = path.strip_prefix("file://") {
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map(Some);
    }
    if path.contains("://") {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("log URI {path}: only FIFOs and file:// are supported"),
        ));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(Some)
}

/// Whether a pump should try `e` again: kilnd went away (restarting), or
/// the guest agent was busy past kilnd's deadline (it serves one call at a
/// time, and stopping a container can hold it for 10 s).
fn transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Lost(_) | ClientError::Connect { .. })
        || error_name(e) == Some("Timeout")
}

/// Follows kilnd through restarts: `attempt` runs until it returns
/// something other than a [`transient`] error, or those went on for
/// [`RECONNECT_FOR`] since the first.
fn with_reconnects<T>(
    what: &str,
    mut attempt: impl FnMut() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let mut pause = Duration::from_millis(100);
    let mut first_loss = None;
    loop {
        match attempt() {
            Err(e)
                if transient(&e)
                    && first_loss.get_or_insert_with(Instant::now).elapsed() < RECONNECT_FOR =>
            {
                log::warn!("{what}: {e}; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Write a container's output from its log until it exited; its exit code
/// (`None`: unknown, the container or its VM went first).
pub fn follow_container(kiln: &Kiln, vm: &str, name: &str, outputs: &mut Outputs) -> Option<i32> {
    let mut cursor = None;
    let followed = with_reconnects(&format!("following container {name}"), || {
        let mut ended = false;
        kiln.connect()?
            .follow_container_logs(vm, name, cursor, |reply| {
                for entry in reply["entries"].as_array().into_iter().flatten() {
                    let text = entry["text"].as_str().unwrap_or_default();
                    outputs.write(
                        entry["stream"].as_str().unwrap_or_default(),
                        text.as_bytes(),
                    );
                }
                cursor = reply["cursor"].as_u64().or(cursor);
                ended = reply["ended"].as_bool() == Some(true);
                true
            })?;
        if ended {
            Ok(())
        } else {
            Err(ClientError::Lost(io::Error::other(
                "the log stream stopped early",
            )))
        }
    });
    if let Err(e) = followed {
        if !is_gone(&e) {
            log::error!("following container {name}: {e}");
        }
        return None;
    }
    // The log ended with the process; the guest's state may trail by a
    // moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let listed = with_reconnects("listing containers", || kiln.connect()?.list_containers(vm));
        let container = listed.ok().and_then(|l| {
            l["containers"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == name).cloned())
        })?;
        if let Some(code) = container["exitCode"].as_i64() {
            return i32::try_from(code).ok();
        }
        if container["state"] == "failed" || Instant::now() > deadline {
            log::warn!("container {name} ended without an exit code: {container}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A started exec: the connection its `StartProcess` replies come on.
#[derive(Debug)]
pub struct ExecStream {
    pub manager: Manager,
    pub handle: u64,
    /// The guest pid.
    pub pid: u32,
    /// The terminal kilnd passed (with a tty).
    pub terminal: Option<OwnedFd>,
}

/// `StartProcess` with `more`, detached (kilnd restarting or this shim
/// going does not kill it): the first reply's handle, pid and terminal.
pub fn start_exec(kiln: &Kiln, vm: &str, process: &Value) -> Result<ExecStream, ClientError> {
    let mut manager = kiln.connect()?;
    manager.follow_process(vm, process, true)?;
    let first = manager.next_reply()?;
    let number = |key: &str| first.parameters[key].as_u64();
    let (handle, pid) = (number("handle"), number("pid").unwrap_or_default());
    let handle = handle.ok_or_else(|| {
        ClientError::Protocol(format!("StartProcess replied {}", first.parameters))
    })?;
    let terminal = if first
        .parameters
        .get("terminal")
        .is_some_and(|t| !t.is_null())
    {
        Some(first.take_fd("terminal")?)
    } else {
        None
    };
    Ok(ExecStream {
        manager,
        handle,
        pid: u32::try_from(pid).unwrap_or_default(),
        terminal,
    })
}

/// Follow process `handle` already running in VM `vm` (a container's main
/// process with a terminal or stdin): `AttachProcess` from the start.
pub fn attach_process(kiln: &Kiln, vm: &str, handle: u64) -> Result<ExecStream, ClientError> {
    let mut manager = kiln.connect()?;
    manager.follow_attach(vm, handle, None)?;
    Ok(ExecStream {
        manager,
        handle,
        pid: 0,
        terminal: None,
    })
}

/// Write an exec's output until it exited (with a terminal: relay it both
/// ways, stdin from `stdin`); its exit code (`None`: unknown).
pub fn follow_exec(
    kiln: &Kiln,
    vm: &str,
    stream: ExecStream,
    stdin: &str,
    mut outputs: Outputs,
) -> Option<i32> {
    let ExecStream {
        mut manager,
        handle,
        terminal,
        ..
    } = stream;
    let relayed = terminal.map(|fd| relay_terminal(fd, stdin, outputs.stdout.take()));
    let mut cursor = None;
    let mut first = true;
    let exit = with_reconnects(&format!("following process {handle}"), || {
        if !first {
            manager = kiln.connect()?;
            manager.follow_attach(vm, handle, cursor)?;
        }
        first = false;
        loop {
            let reply = manager.next_reply()?.parameters;
            for chunk in reply["output"].as_array().into_iter().flatten() {
                let data = chunk["data"].as_str().unwrap_or_default();
                match base64::engine::general_purpose::STANDARD.decode(data) {
                    Ok(bytes) => {
                        outputs.write(chunk["stream"].as_str().unwrap_or_default(), &bytes)
                    }
                    Err(e) => log::warn!("process {handle}: undecodable output: {e}"),
                }
            }
            cursor = reply["cursor"].as_u64().or(cursor);
            if let Some(code) = reply["exit"]["exitCode"].as_i64() {
                return Ok(i32::try_from(code).ok());
            }
        }
    });
    if let Some(done) = relayed {
        // kilnd closes the terminal once it delivered the last output.
        let _ = done.recv_timeout(TERMINAL_DRAIN);
    }
    exit.unwrap_or_else(|e| {
        log::error!("following process {handle}: {e}");
        None
    })
}

/// Relay a terminal: its output to `stdout` and `stdin` (a FIFO) into it;
/// the receiver hears when the output ended.
fn relay_terminal(terminal: OwnedFd, stdin: &str, stdout: Option<File>) -> mpsc::Receiver<()> {
    let (done, finished) = mpsc::channel();
    let mut output = File::from(terminal);
    match (stdin.is_empty(), output.try_clone()) {
        (true, _) => {}
        (false, Ok(mut input)) => {
            let path = stdin.to_owned();
            std::thread::spawn(move || {
                if let Ok(mut fifo) = File::open(&path) {
                    let _ = io::copy(&mut fifo, &mut input);
                }
            });
        }
        (false, Err(e)) => log::warn!("terminal input: {e}"),
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdout = stdout;
        loop {
            let n = match output.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(out) = &mut stdout {
                if out.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    stdout = None;
                }
            }
        }
        let _ = done.send(());
    });
    finished
}

/// Feed the FIFO at `path` to process `handle`'s stdin, closing it at end
/// of file (a thread; it ends with the FIFO's writer). The flag turns true
/// when it has ended.
pub fn feed_stdin(kiln: Kiln, vm: String, handle: u64, path: String) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&done);
    std::thread::spawn(move || {
        let result = (|| -> Result<(), ClientError> {
            let mut fifo = File::open(&path).map_err(ClientError::Lost)?;
            let mut manager = kiln.connect()?;
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let n = fifo.read(&mut buf).map_err(ClientError::Lost)?;
                if n == 0 {
                    manager.write_process(&vm, handle, None, true)?;
                    return Ok(());
                }
                let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
                manager.write_process(&vm, handle, Some(&data), false)?;
            }
        })();
        if let Err(e) = result {
            log::debug!("stdin of process {handle}: {e}");
        }
        ended.store(true, Ordering::SeqCst);
    });
    done
}

/// `CloseIO` of process `handle`'s stdin. A client such as `ctr` asks for
/// it right after its last write, while the pump may still be draining the
/// FIFO (and closes stdin itself at the FIFO's end): a close now would
/// cut the input short. So the pump gets [`STDIN_DRAIN`] to finish; only a
/// stdin it leaves open (its writer stays) is closed here.
pub fn close_stdin(kiln: Kiln, vm: String, handle: u64, pump: Option<Arc<AtomicBool>>) {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + STDIN_DRAIN;
        let pumping = || pump.as_ref().is_some_and(|d| !d.load(Ordering::SeqCst));
        while pumping() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pump.is_some() && !pumping() {
            return;
        }
        if let Err(e) = kiln
            .connect()
            .and_then(|mut m| m.write_process(&vm, handle, None, true))
        {
            log::debug!("closing stdin of process {handle}: {e}");
        }
    });
}

/// Wake a stdin pump still waiting for its FIFO's writer (the task is
/// deleted): open the FIFO for writing without blocking and close it.
pub fn unblock_stdin(path: &str) {
    if path.is_empty() || path.contains("://") {
        return;
    }
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// The `ProcessSpec` of an exec.
pub fn process_spec(
    argv: &[String],
    env: &[String],
    container: &str,
    window: Option<(u16, u16)>,
    stdin: bool,
) -> Value {
    // Optional fields left out rather than null: nulls nested in a
    // parameter are not dropped by the client.
    let mut spec = json!({ "argv": argv, "env": env, "container": container });
    if let Some((rows, cols)) = window {
        spec["tty"] = json!({ "rows": rows, "cols": cols });
    }
    if stdin {
        spec["stdin"] = json!(true);
    }
    spec
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn outputs_go_to_fifos_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let log = dir.path().join("log");
        let stdio = Stdio {
            stdout: fifo.to_str().unwrap().into(),
            stderr: format!("file://{}", log.display()),
            ..Stdio::default()
        };
        // Opening the FIFO does not wait for a reader.
        let mut outputs = Outputs::open(&stdio).unwrap();
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        outputs.write("stdout", b"out\n");
        outputs.write("stderr", b"err\n");
        drop(outputs);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "out\n");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "err\n");
        let binary = Stdio {
            stdout: "binary:///usr/bin/logger".into(),
            ..Stdio::default()
        };
        assert_eq!(
            Outputs::open(&binary).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
    }

    #[test]
    fn a_terminal_merges_stderr_and_no_stderr_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut stdio = Stdio {
            stdout: format!("file://{}", log.display()),
            ..Stdio::default()
        };
        let mut outputs = Outputs::open(&stdio).unwrap();
        outputs.write("stdout", b"a");
        outputs.write("stderr", b"b");
        stdio.terminal = true;
        let mut terminal = Outputs::open(&stdio).unwrap();
        terminal.write("stderr", b"c");
        drop((outputs, terminal));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "ac");
    }

    #[test]
    fn exec_specs_leave_out_what_is_not_asked() {
        let spec = process_spec(&["tty".into()], &[], "t2", Some((24, 80)), false);
        assert_eq!(spec["tty"], json!({ "rows": 24, "cols": 80 }));
        assert!(spec.get("stdin").is_none());
        let spec = process_spec(&["cat".into()], &[], "t2", None, true);
        assert!(spec.get("tty").is_none());
        assert_eq!(spec["stdin"], true);
    }
}
