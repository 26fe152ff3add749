//! The virtio-serial port `io.kiln.agent.0`: discovery, reading across host
//! disconnects, and writing replies.
//!
//! Behaviour of the Linux `virtio_console` driver this relies on:
//! - `read` returns 0 while the host side is not connected (no data queued);
//!   `poll` reports `POLLHUP` then. There is no way to sleep until the host
//!   connects except `O_ASYNC`: the driver sends `SIGIO` to the owner on
//!   every host connect/disconnect and on incoming data. The agent blocks
//!   `SIGIO` and waits for it with `sigtimedwait` (1 s timeout, so a missed
//!   signal only costs a second).
//! - a blocking `write` sleeps until the host connects; the descriptor is
//!   therefore non-blocking and a reply to a host that went away is dropped
//!   after a short grace period (a reconnecting host resynchronizes with
//!   `Ping`'s nonce).
//! - data from a host that just connected can be readable before the driver
//!   has processed the "host connected" message (data is handled in the
//!   interrupt, control messages in a work queue), so the port may look
//!   disconnected while the reply to that data is written: hence the grace.
//! - a snapshot taken while the agent waits here and restored in a clone
//!   looks to the guest like a host disconnect followed by a connect.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{log, sys};

/// Where virtio-serial ports are listed.
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";
/// How long to sleep waiting for the host to (re)connect before re-checking.
const HOST_WAIT: Duration = Duration::from_secs(1);
/// How long a reply waits for a host that looks disconnected.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Finds the device node of the port called `name` under `sysfs_dir`.
pub fn find_port(sysfs_dir: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = fs::read_dir(sysfs_dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|entry| {
        let port_name = fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim_end_matches('\n') == name)
            .then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// The open port.
#[derive(Debug)]
pub struct Port {
    file: File,
    path: PathBuf,
}

/// Result of one read attempt.
#[derive(Debug)]
pub enum Incoming {
    /// Bytes from the host.
    Data(usize),
    /// The host is not connected (or just disconnected).
    HostGone,
}

impl Port {
    /// Opens the port named `name`, waiting (forever, with back-off) until
    /// its driver and device node are there: modules may still be loading.
    pub fn open_waiting(name: &str) -> Self {
        let start = Instant::now();
        let mut attempt: u32 = 0;
        let mut next_report: u32 = 100;
        loop {
            let result = find_port(Path::new(SYSFS_PORTS), name)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "port not listed in sysfs"))
                .and_then(|path| Self::open(&path));
            match result {
                Ok(port) => {
                    log::info!(
                        "port {name} is {} (found after {} ms)",
                        port.path.display(),
                        start.elapsed().as_millis()
                    );
                    return port;
                }
                Err(e) => {
                    // 10 ms steps for the first second, then every second;
                    // complain after a second, then once a minute.
                    if attempt == 100 || attempt == next_report {
                        next_report = attempt.saturating_add(60);
                        log::error!("waiting for virtio port {name}: {e}");
                    }
                    let pause = if attempt < 100 { 10 } else { 1000 };
                    std::thread::sleep(Duration::from_millis(pause));
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    fn open(path: &Path) -> io::Result<Self> {
        // std opens with O_CLOEXEC: commands never inherit the port.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        sys::set_async_owner(&file)?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Reopens the same device (after an I/O error such as a hot-unplug).
    pub fn reopen(&mut self, name: &str) {
        *self = Self::open_waiting(name);
    }

    /// Reads what the host sent, sleeping until there is something.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Incoming> {
        loop {
            match self.file.read(buf) {
                Ok(0) => return Ok(Incoming::HostGone),
                Ok(n) => return Ok(Incoming::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Connected, nothing queued: sleep until data or hang-up.
                    let mut fds = [self.pollfd(libc::POLLIN)];
                    sys::poll(&mut fds, Some(Duration::from_secs(60)))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps until the host may have connected (`SIGIO`) or a second
    /// passed; false on timeout.
    pub fn wait_for_host(&self) -> bool {
        sys::wait_signal(libc::SIGIO, HOST_WAIT)
    }

    /// Writes a whole reply. Returns `Ok(false)` if the host is (still)
    /// not connected after [`REPLY_GRACE`]; the rest of the reply is then
    /// dropped.
    ///
    /// The grace period matters right after a connect: the driver handles
    /// incoming data in the interrupt but the "host connected" control
    /// message in a work queue, so a request can be read while the port
    /// still looks disconnected. Dropping the reply then would leave the
    /// new client waiting forever.
    pub fn write_reply(&mut self, mut bytes: &[u8]) -> io::Result<bool> {
        let mut host_gone_since: Option<Instant> = None;
        while !bytes.is_empty() {
            match self.file.write(bytes) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    bytes = bytes.get(n..).unwrap_or_default();
                    host_gone_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [self.pollfd(libc::POLLOUT)];
                    sys::poll(&mut fds, Some(HOST_WAIT))?;
                    if fds[0].revents & libc::POLLHUP != 0 {
                        let since = *host_gone_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= REPLY_GRACE {
                            return Ok(false);
                        }
                        // SIGIO comes with the next connection change.
                        sys::wait_signal(libc::SIGIO, Duration::from_millis(50));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn pollfd(&self, events: libc::c_short) -> libc::pollfd {
        use std::os::fd::AsRawFd;
        libc::pollfd {
            fd: self.file.as_raw_fd(),
            events,
            revents: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let dir = std::env::temp_dir().join(format!("kiln-agent-port-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (entry, name) in [
            ("vport0p1", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "io.kiln.agent.0\n"),
        ] {
            fs::create_dir_all(dir.join(entry)).expect("mkdir");
            fs::write(dir.join(entry).join("name"), name).expect("write");
        }
        fs::create_dir_all(dir.join("vport2p1")).expect("mkdir without name");
        assert_eq!(
            find_port(&dir, "io.kiln.agent.0"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_port(&dir, "missing"), None);
        assert_eq!(find_port(&dir.join("absent"), "io.kiln.agent.0"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
