//! File descriptors over a unix socket (`SCM_RIGHTS`), both ways: kilnd
//! hands out a terminal and a copy's archive with a reply, and takes an
//! archive with a call. std has no safe API for ancillary data, so this is
//! the one place the client calls `sendmsg` and `recvmsg`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message may bring; kilnd passes one.
const MAX_FDS: usize = 8;

/// Room for one `SCM_RIGHTS` header with [`MAX_FDS`] descriptors, aligned
/// as `cmsghdr` must be (a `Vec<u8>` would not promise that).
#[repr(C, align(8))]
struct Control([u8; 128]);

/// Sends `bytes` with `fds` attached to their first byte (one
/// `sendmsg`); returns how many bytes went (the caller writes the rest
/// without descriptors, as a stream socket may take a message in parts).
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "at most {MAX_FDS} descriptors a message"
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = size_of::<RawFd>() * raw.len();
    let mut control = Control([0; 128]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        debug_assert!(space <= control.0.len());
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `control`, which is aligned for
        // cmsghdr and has room for one header carrying MAX_FDS descriptors
        // (checked above), so CMSG_FIRSTHDR is non-null and the header and
        // its data lie inside the buffer; `raw` holds `raw.len()` ints.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points to `iov` (over `bytes`) and `control`, all of
        // which outlive the call; the kernel only reads them.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads what is there (at most `buf.len()` bytes) and the descriptors
/// that came with it, close-on-exec. Linux ends a read right after the
/// bytes a descriptor came with, so they belong to the last message that
/// starts in what was read (see `Connection::receive`).
pub fn receive(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = Control([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    let n = loop {
        // SAFETY: msg points to `iov` (over `buf`) and `control`, both
        // writable and alive for the call; the kernel writes at most their
        // lengths.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with msg_controllen bytes of
    // well-formed cmsghdrs; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside them and
    // return null at the end. Each SCM_RIGHTS header carries
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors, new in this
    // process and owned by nobody else, so each becomes one OwnedFd.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(format!(
            "kilnd passed more than {MAX_FDS} descriptors at once"
        )));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut pipe_r, pipe_w) = std::io::pipe().unwrap();
        let sent = send(&a, b"hello\0", &[pipe_w.as_fd()]).unwrap();
        assert_eq!(sent, 6);
        drop(pipe_w);
        let mut buf = [0u8; 64];
        let (n, fds) = receive(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello\0"[..], 1));
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        passed.write_all(b"through").unwrap();
        drop(passed);
        let mut got = String::new();
        pipe_r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through");
        // Without descriptors: plain bytes.
        assert_eq!(send(&a, b"x", &[]).unwrap(), 1);
        let (n, fds) = receive(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
    }
}
