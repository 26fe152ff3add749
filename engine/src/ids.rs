//! Opaque VM ids and timestamps.
//!
//! Ids are 12 lowercase hex characters (48 random bits): short enough to
//! name a TAP device (`kt` + id fits the 15-byte limit), valid as a D-Bus
//! object path element, and never derived from the user-chosen name.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a VM id in characters.
pub const VM_ID_LEN: usize = 12;

/// A fresh random VM id.
pub fn new_vm_id() -> String {
    let mut bytes = [0u8; VM_ID_LEN / 2];
    fill_random(&mut bytes);
    hex(&bytes)
}

/// `bytes` as lowercase hex, two digits each.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` has the shape of a VM id (checked before it touches a path).
pub fn is_vm_id(id: &str) -> bool {
    id.len() == VM_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            filled += n as usize;
        }
        // n < 0 is EINTR (the only failure possible for flags 0 on a
        // kernel >= 3.17 once the pool is initialised): try again.
    }
}

/// Microseconds since the Unix epoch (the unit systemd uses on its APIs).
pub fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_distinct() {
        let a = new_vm_id();
        let b = new_vm_id();
        assert!(is_vm_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_vm_id("../etc/passwd"));
        assert!(!is_vm_id("ABCDEF012345"));
    }
}
