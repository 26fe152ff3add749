//! TAP devices through `/dev/net/tun` (the kernel refuses to create them
//! over rtnetlink).
//!
//! These are blocking system calls that act in the calling thread's network
//! namespace; [`crate::Network`] runs them through [`crate::netns::NsExec`].
//! Listing and deleting TAPs is netlink work and lives in [`crate::link`].
//!
//! Every TAP is `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (Ethernet frames with
//! a virtio-net header, what QEMU's `-netdev tap,fd=` expects; QEMU probes
//! the flag with `TUNGETIFF` and negotiates offloads itself), persistent
//! (`TUNSETPERSIST`: it outlives the descriptor, so kilnd can restart while
//! QEMU holds it, and QEMU can be restarted on the same TAP), and optionally
//! owned by a uid/gid (`TUNSETOWNER`/`TUNSETGROUP`) so an unprivileged
//! process may attach to it by name.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use crate::names::{validate_ifname, NameError};

/// The clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Flags of every Kiln TAP.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// TAP errors.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_DEVICE}")]
    OpenTun(#[source] io::Error),
    /// A link of that name exists and is not a TAP Kiln can use (another
    /// kind of device, a TUN, or a multi-queue TAP). It is left alone.
    #[error("interface {name} exists and is not a Kiln TAP")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The TAP exists and another process (a running QEMU) holds it.
    #[error("TAP {name} is in use by another process")]
    Busy {
        /// The name.
        name: String,
    },
    /// Not allowed: no `CAP_NET_ADMIN`, or the TAP belongs to another user.
    #[error("not permitted to create or open TAP {name}")]
    PermissionDenied {
        /// The name.
        name: String,
    },
    /// Another ioctl failed.
    #[error("{op} on TAP {name}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Who may attach to a TAP besides root (both optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOwner {
    /// `TUNSETOWNER`: this uid may open the TAP by name.
    pub uid: Option<u32>,
    /// `TUNSETGROUP`: members of this gid may open the TAP by name.
    pub gid: Option<u32>,
}

/// Whether [`open_or_create`] made the TAP or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapOutcome {
    /// A new TAP.
    Created,
    /// An existing persistent TAP of ours, reattached (e.g. after kilnd or
    /// QEMU restarted).
    Reopened,
}

fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags fit in the short the kernel reads (IFF_TUN_EXCL is 0x8000,
    // the sign bit, which is how the kernel's own headers use it).
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TapError::OpenTun)?;
    Ok(OwnedFd::from(file))
}

fn set_iff(fd: &OwnedFd, name: &str, flags: libc::c_int) -> io::Result<()> {
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is,
    // alive for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_value(fd: &OwnedFd, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the TUNSET{PERSIST,OWNER,GROUP} requests take their argument
    // by value, not as a pointer; nothing is read from or written to memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn attach_error(name: &str, err: io::Error) -> TapError {
    let name = name.to_owned();
    match err.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy { name },
        Some(libc::EINVAL) => TapError::NameTaken { name },
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { name },
        _ => TapError::Ioctl {
            op: "TUNSETIFF",
            name,
            source: err,
        },
    }
}

/// Creates the persistent TAP `name`, or reattaches to it if it already
/// exists as a TAP with Kiln's flags and nobody holds it. Returns the
/// descriptor to hand to QEMU (close-on-exec: clear it, or `dup2` it, in
/// the child that must inherit it).
///
/// A new TAP is made persistent only after its owner is set, so when any
/// step fails the descriptor is dropped and the kernel removes the
/// half-made TAP: nothing is left behind.
pub fn open_or_create(name: &str, owner: TapOwner) -> Result<(OwnedFd, TapOutcome), TapError> {
    validate_ifname(name)?;
    let fd = open_tun()?;
    let outcome = match set_iff(&fd, name, TAP_FLAGS | libc::IFF_TUN_EXCL) {
        Ok(()) => TapOutcome::Created,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // Exists. Attach to it if it is a single-queue TAP nobody holds.
            set_iff(&fd, name, TAP_FLAGS).map_err(|e| attach_error(name, e))?;
            TapOutcome::Reopened
        }
        Err(e) => return Err(attach_error(name, e)),
    };
    let ioctl = |op, request, value| {
        ioctl_value(&fd, request, value).map_err(|source| TapError::Ioctl {
            op,
            name: name.to_owned(),
            source,
        })
    };
    if let Some(uid) = owner.uid {
        ioctl("TUNSETOWNER", libc::TUNSETOWNER, libc::c_ulong::from(uid))?;
    }
    if let Some(gid) = owner.gid {
        ioctl("TUNSETGROUP", libc::TUNSETGROUP, libc::c_ulong::from(gid))?;
    }
    ioctl("TUNSETPERSIST", libc::TUNSETPERSIST, 1)?;
    Ok((fd, outcome))
}

/// A new TAP that lives only as long as its descriptors (not persistent),
/// named by the kernel (`tapN`), on no bridge: a device for a QEMU that
/// must have a TAP backend but sends nothing (a snapshot's loader, whose
/// saved virtio-net state asks for the virtio-net header only a TAP
/// offers). Gone when the last descriptor closes, crash or not.
pub fn transient() -> Result<OwnedFd, TapError> {
    let fd = open_tun()?;
    set_iff(&fd, "", TAP_FLAGS).map_err(|source| TapError::Ioctl {
        op: "TUNSETIFF",
        name: String::new(),
        source,
    })?;
    Ok(fd)
}

/// Index of interface `name` in the calling thread's network namespace
/// (`if_nametoindex` asks through a socket, which is made in the thread's
/// namespace, unlike `/sys/class/net`, which shows the mounter's).
pub fn index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Removes the persistent TAP `name` of the calling thread's namespace
/// without netlink: attach, clear `TUNSETPERSIST`, close (the kernel then
/// deletes it). Returns false if there is no such interface. A TAP some
/// process still holds is [`TapError::Busy`]; an interface that is not a
/// single-queue TAP with Kiln's flags is [`TapError::NameTaken`].
pub fn remove(name: &str) -> Result<bool, TapError> {
    validate_ifname(name)?;
    if index(name).is_none() {
        return Ok(false);
    }
    let fd = open_tun()?;
    set_iff(&fd, name, TAP_FLAGS).map_err(|e| attach_error(name, e))?;
    ioctl_value(&fd, libc::TUNSETPERSIST, 0).map_err(|source| TapError::Ioctl {
        op: "TUNSETPERSIST",
        name: name.to_owned(),
        source,
    })?;
    Ok(true)
}

/// The `TUNGETIFF` flags of an open TAP descriptor (for checks and tests).
pub fn flags(fd: &OwnedFd) -> io::Result<libc::c_int> {
    let mut req = ifreq("", 0);
    // SAFETY: TUNGETIFF writes one `struct ifreq`, which `req` is.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // The kernel's flags are an unsigned short carried in a C short.
    Ok(libc::c_int::from(flags as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_fail_before_any_syscall() {
        assert!(matches!(
            open_or_create("much-too-long-name0", TapOwner::default()),
            Err(TapError::Name(NameError::InvalidInterfaceName { .. }))
        ));
    }

    #[test]
    fn ifreq_carries_name_and_flags() {
        let req = ifreq("kt0123456789ab0", TAP_FLAGS);
        let name: Vec<u8> = req.ifr_name.iter().map(|&c| c as u8).collect();
        assert_eq!(&name[..15], b"kt0123456789ab0");
        assert_eq!(name[15], 0);
        // SAFETY: the flags member was written by `ifreq`.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        assert_eq!(libc::c_int::from(flags), 0x5002);
    }
}
