//! A datagram socket that plays systemd's `NOTIFY_SOCKET` for kilnd.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `<dir>/notify`, bound: point kilnd's `NOTIFY_SOCKET` at [`path`] and
/// read what it sends (`READY=1`, `STATUS=...`, `WATCHDOG=1`,
/// `STOPPING=1`). What kilnd sent before it exited stays queued here.
///
/// [`path`]: NotifySocket::path
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Bind `<dir>/notify`.
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self { socket, path }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every message received within `timeout`, stopping early after the
    /// first one `until` accepts (`|_| false` drains what is queued;
    /// `|_| true` waits for the first message).
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut until: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok(n) = self.socket.recv(&mut buf) else {
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

/// Does one of `messages` hold `line` as a whole line (`READY=1`)?
pub fn has_line(messages: &[String], line: &str) -> bool {
    messages.iter().any(|m| m.lines().any(|l| l == line))
}
