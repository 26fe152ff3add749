//! Following a guest process for a client: a pull-driven [`Follower`] of
//! its output (what varlink's `more` replies carry), a [`pump`] that joins
//! it to a client's file descriptors (D-Bus, and terminals on both
//! transports), and a [`ProcessGuard`] that kills the process when its
//! client goes away without asking to detach.
//!
//! Nothing here buffers more than one read: the next read is only made
//! once the last one was delivered, so a slow client makes the guest
//! process wait (the agent stops reading it) instead of growing memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_agent_proto::{LogStream, ProcessExit};
use tokio::io::unix::AsyncFd;

use crate::api::EngineHandle;
use crate::error::EngineError;
use crate::guest_io::ProcessRead;

/// How long a [`Follower`] stays silent at most: after this long without
/// output it returns an empty read, so its client's transport writes
/// something and notices a client that went away (zlink reads no
/// connection while it streams replies on it; a pipe's closed reader only
/// shows on a write or a poll).
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// Reads a process's output read after read, from a cursor on.
#[derive(Debug)]
pub struct Follower {
    engine: EngineHandle,
    id: String,
    handle: u64,
    since: Option<u64>,
    ended: bool,
    last_return: Instant,
}

impl Follower {
    /// Follows process `handle` of VM `id` from cursor `since` (`None`:
    /// the oldest byte the guest keeps).
    pub fn new(engine: EngineHandle, id: &str, handle: u64, since: Option<u64>) -> Self {
        Self {
            engine,
            id: id.to_owned(),
            handle,
            since,
            ended: false,
            last_return: Instant::now(),
        }
    }

    /// The next output, with the exit once everything was read (an empty
    /// read after [`KEEPALIVE`] of silence); `None` after the exit (or an
    /// error) was returned.
    pub async fn next(&mut self) -> Option<Result<ProcessRead, EngineError>> {
        if self.ended {
            return None;
        }
        loop {
            match self
                .engine
                .read_process(&self.id, self.handle, self.since)
                .await
            {
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                Ok(read) => {
                    self.since = Some(read.cursor);
                    self.ended = read.exit.is_some();
                    if self.ended
                        || !read.output.is_empty()
                        || self.last_return.elapsed() >= KEEPALIVE
                    {
                        self.last_return = Instant::now();
                        return Some(Ok(read));
                    }
                }
            }
        }
    }
}

/// Kills (releases) a guest process when dropped while armed: the client
/// that started it went away without asking to detach.
#[derive(Debug)]
pub struct ProcessGuard {
    engine: EngineHandle,
    id: String,
    handle: u64,
    armed: bool,
}

impl ProcessGuard {
    /// Guards process `handle` of VM `id`; `detach` leaves it unarmed.
    pub fn new(engine: EngineHandle, id: &str, handle: u64, detach: bool) -> Self {
        Self {
            engine,
            id: id.to_owned(),
            handle,
            armed: !detach,
        }
    }

    /// The process ended and was read to the end: nothing to kill.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (engine, id, handle) = (self.engine.clone(), self.id.clone(), self.handle);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = engine.release_process(&id, handle).await {
                    tracing::debug!(vm = %id, handle, error = %e, "releasing an abandoned process");
                }
            });
        }
    }
}

/// A client's end of a process's stdio.
#[derive(Debug)]
pub enum ClientStdio {
    /// A terminal: one bidirectional socket (the client holds its peer).
    Terminal(OwnedFd),
    /// Pipes: stdin's read end (when the process takes input), and the
    /// write ends of stdout and stderr.
    Pipes {
        /// Bytes for the process's stdin; end of file closes it.
        stdin: Option<OwnedFd>,
        /// Where the process's stdout goes.
        stdout: OwnedFd,
        /// Where the process's stderr goes.
        stderr: OwnedFd,
    },
}

/// How a [`pump`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpEnd {
    /// The process exited and all its output was delivered.
    Exited(ProcessExit),
    /// The client closed its end first.
    ClientGone,
}

/// Moves bytes between the client's descriptors and process `handle` of
/// VM `id` (its output from cursor `since`) until the process ended or
/// the client went away. A client gone from a process it did not detach
/// from kills the process (the guard).
pub async fn pump(
    engine: EngineHandle,
    id: &str,
    handle: u64,
    since: Option<u64>,
    stdio: ClientStdio,
    detach: bool,
) -> Result<PumpEnd, EngineError> {
    let mut guard = ProcessGuard::new(engine.clone(), id, handle, detach);
    let (input, terminal, stdout, stderr) = match stdio {
        ClientStdio::Terminal(socket) => {
            let input = socket.try_clone().map_err(io_failed)?;
            (Some(input), true, socket, None)
        }
        ClientStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => (stdin, false, stdout, Some(stderr)),
    };
    let stdout = async_fd(stdout).map_err(io_failed)?;
    let stderr = stderr.map(async_fd).transpose().map_err(io_failed)?;
    let input = input.map(async_fd).transpose().map_err(io_failed)?;

    let output = async {
        let mut follower = Follower::new(engine.clone(), id, handle, since);
        while let Some(read) = follower.next().await {
            let read = read?;
            if read.output.is_empty() && read.exit.is_none() && peer_gone(&stdout) {
                return Ok(PumpEnd::ClientGone);
            }
            for (stream, bytes) in &read.output {
                let target = match (stream, &stderr) {
                    (LogStream::Stderr, Some(err)) => err,
                    _ => &stdout,
                };
                if write_all(target, bytes).await.is_err() {
                    return Ok(PumpEnd::ClientGone);
                }
            }
            if let Some(exit) = read.exit {
                return Ok(PumpEnd::Exited(exit));
            }
        }
        Ok(PumpEnd::ClientGone)
    };
    let feed = async {
        let Some(input) = &input else {
            return std::future::pending::<Result<PumpEnd, EngineError>>().await;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // An error reading the client's end counts as its end.
            let n: usize = read_some(input, &mut buf).await.unwrap_or_default();
            if n == 0 {
                if terminal {
                    // The client hung up its terminal.
                    return Ok(PumpEnd::ClientGone);
                }
                engine.write_process(id, handle, &[], true).await?;
                return std::future::pending().await;
            }
            engine
                .write_process(id, handle, buf.get(..n).unwrap_or_default(), false)
                .await?;
        }
    };
    let end = tokio::select! {
        end = output => end,
        end = feed => end,
    }?;
    if matches!(end, PumpEnd::Exited(_)) {
        guard.disarm();
    }
    Ok(end)
}

/// Whether the reader of `fd` is gone: a pipe whose read end was closed
/// polls `POLLERR`, a socket whose peer closed `POLLHUP`.
fn peer_gone(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

fn io_failed(e: io::Error) -> EngineError {
    EngineError::InvalidArgument(format!("unusable file descriptor: {e}"))
}

fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<File>> {
    set_nonblocking(&fd)?;
    // SAFETY: the File owns the descriptor and lives inside the AsyncFd,
    // so it stays open and the same until the AsyncFd is dropped.
    unsafe { AsyncFd::register(File::from(fd)) }.map_err(io::Error::from)
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an open descriptor have no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

async fn read_some(fd: &AsyncFd<File>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = fd.readable().await?;
        match ready.try_io(|inner| inner.get_ref().read(buf)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all(fd: &AsyncFd<File>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|inner| inner.get_ref().write(bytes)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => bytes = bytes.get(n..).unwrap_or_default(),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// A connected pair of stream sockets: (kilnd's end, the client's end).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    Ok((OwnedFd::from(a), OwnedFd::from(b)))
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors nothing else owns.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    })
}
