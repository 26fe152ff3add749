//! The one rule for names callers choose (VMs, pools, containers), a leaf
//! so every module that checks a name can use it.

/// Longest VM, pool or container name.
pub const MAX_NAME_LEN: usize = 64;

/// 1 to [`MAX_NAME_LEN`] characters of `A-Z a-z 0-9 _ . -`, not starting
/// with `.` or `-` (so a name is a safe file name and never an option).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
