//! A varlink client that passes file descriptors (SCM_RIGHTS) both ways,
//! for the calls `varlinkctl` cannot make: a terminal handed out by
//! `StartProcess`, the archives of `CopyIn` and `CopyOut`.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

/// One connection to a varlink service.
#[derive(Debug)]
pub struct FdClient {
    stream: UnixStream,
    pending: Vec<u8>,
    fds: Vec<OwnedFd>,
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
        }
    }

    /// Sends a call of `method` with `parameters`, `more` as asked, and
    /// `fds` passed along.
    pub fn call(&mut self, method: &str, parameters: Value, more: bool, fds: &[RawFd]) {
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
        send_with_fds(&self.stream, &bytes, fds).expect("sendmsg");
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
            let mut buf = vec![0u8; 256 * 1024];
            let (n, fds) = recv_with_fds(&self.stream, &mut buf).expect("recvmsg");
            assert!(n > 0, "the service closed the connection");
            self.pending.extend_from_slice(&buf[..n]);
            self.fds.extend(fds);
        }
    }

    /// Closes the connection (kilnd sees the client go away).
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one header with these fds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    // SAFETY: msg describes valid buffers.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let sent = sent as usize;
    if sent < bytes.len() {
        (&*stream).write_all(&bytes[sent..])?;
    }
    Ok(())
}

fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u8; 256];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in send_with_fds.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: msg describes valid buffers.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fds))
}
