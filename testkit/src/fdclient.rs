//! A varlink client that passes file descriptors (SCM_RIGHTS) both ways,
//! for the calls `varlinkctl` cannot make: a terminal handed out by
//! `StartProcess`, the archives of `CopyIn` and `CopyOut`.

use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

/// One connection to a varlink service.
#[derive(Debug)]
pub struct FdClient {
    stream: UnixStream,
    pending: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// One read's worth, kept: the load test runs hundreds of clients.
    buf: Vec<u8>,
}

impl FdClient {
    /// Connects to `address` (`unix:PATH` or a path).
    pub fn connect(address: &str) -> Self {
        let path = address.strip_prefix("unix:").unwrap_or(address);
        let stream = UnixStream::connect(path).expect("connect to the varlink socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .expect("timeout");
        Self {
            stream,
            pending: Vec::new(),
            fds: Vec::new(),
            buf: vec![0u8; 256 * 1024],
        }
    }

    /// Sends a call of `method` with `parameters`, `more` as asked, and
    /// `fds` passed along.
    pub fn call(&mut self, method: &str, parameters: Value, more: bool, fds: &[BorrowedFd<'_>]) {
        let mut message = json!({ "method": method, "parameters": parameters });
        if more {
            message["more"] = json!(true);
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        if fds.is_empty() {
            self.stream.write_all(&bytes).expect("send");
            return;
        }
        // kilnctl's and the shim's descriptor passing (kiln-client).
        let sent = kiln_client::fds::send(&self.stream, &bytes, fds).expect("sendmsg");
        self.stream.write_all(&bytes[sent..]).expect("send");
    }

    /// The next reply, with the descriptors that came with it (or before).
    pub fn reply(&mut self) -> (Value, Vec<OwnedFd>) {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == 0) {
                let message: Vec<u8> = self.pending.drain(..=end).collect();
                let value: Value =
                    serde_json::from_slice(&message[..message.len() - 1]).expect("reply json");
                return (value, std::mem::take(&mut self.fds));
            }
            let (n, fds) = kiln_client::fds::receive(&self.stream, &mut self.buf).expect("recvmsg");
            assert!(n > 0, "the service closed the connection");
            self.pending.extend_from_slice(&self.buf[..n]);
            self.fds.extend(fds);
        }
    }

    /// Closes the connection (kilnd sees the client go away).
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
