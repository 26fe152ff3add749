//! Interface names: what Kiln calls its links, and how it recognises them.
//!
//! A TAP is named `kt` + the 12-character VM id + one character for the
//! NIC index (`0`–`9`, then `a`–`z`): exactly 15 bytes, the kernel's limit
//! (`IFNAMSIZ` is 16 with the NUL). The full id is in the name, so reconcile
//! maps a TAP back to its VM without ambiguity; nothing else on a host is
//! expected to start with `kt` followed by 13 lowercase alphanumerics, and
//! Kiln only ever deletes links that match that shape *and* are TAPs.

use thiserror::Error;

/// Longest interface name the kernel accepts, in bytes (without the NUL).
pub const IFNAME_MAX: usize = 15;
/// Prefix of every Kiln TAP.
pub const TAP_PREFIX: &str = "kt";
/// Length of a VM id in characters (see `kiln-engine`'s `ids`).
pub const VM_ID_LEN: usize = 12;
/// Number of NICs a VM can have (one name character each: `0-9a-z`).
pub const MAX_NICS: u8 = 36;

/// A name Kiln refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Interface names are 1–15 bytes of printable ASCII without `/`, `:`
    /// or whitespace, and not `.` or `..`.
    #[error("invalid interface name {name:?}: 1 to 15 characters, no '/', ':' or whitespace")]
    InvalidInterfaceName {
        /// The name given.
        name: String,
    },
    /// VM ids are 12 lowercase ASCII letters or digits.
    #[error("invalid VM id {id:?}: 12 lowercase letters or digits")]
    InvalidVmId {
        /// The id given.
        id: String,
    },
    /// NIC indexes run from 0 to [`MAX_NICS`] - 1.
    #[error("NIC index {nic} out of range (0 to 35)")]
    InvalidNicIndex {
        /// The index given.
        nic: u8,
    },
}

/// Checks a Linux interface name (the rules of the kernel's `dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(NameError::InvalidInterfaceName {
            name: name.to_owned(),
        })
    }
}

/// Whether `id` has the shape of a VM id: 12 lowercase ASCII letters or digits.
pub fn is_vm_id(id: &str) -> bool {
    id.len() == VM_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Checks a VM id.
pub fn validate_vm_id(id: &str) -> Result<(), NameError> {
    if is_vm_id(id) {
        Ok(())
    } else {
        Err(NameError::InvalidVmId { id: id.to_owned() })
    }
}

fn nic_char(nic: u8) -> Option<char> {
    char::from_digit(u32::from(nic), u32::from(MAX_NICS))
}

/// Name of the TAP of NIC `nic` of VM `vm_id`: `kt<id><nic>`, 15 bytes.
pub fn tap_name(vm_id: &str, nic: u8) -> Result<String, NameError> {
    validate_vm_id(vm_id)?;
    let c = nic_char(nic).ok_or(NameError::InvalidNicIndex { nic })?;
    Ok(format!("{TAP_PREFIX}{vm_id}{c}"))
}

/// The VM id and NIC index a Kiln TAP name encodes, or `None` for any
/// other name.
pub fn parse_tap_name(name: &str) -> Option<(String, u8)> {
    let rest = name.strip_prefix(TAP_PREFIX)?;
    if rest.len() != VM_ID_LEN + 1 || !rest.is_ascii() {
        return None;
    }
    let (id, nic) = rest.split_at(VM_ID_LEN);
    if !is_vm_id(id) {
        return None;
    }
    let nic = nic.chars().next()?.to_digit(u32::from(MAX_NICS))?;
    let nic = u8::try_from(nic).ok()?;
    Some((id.to_owned(), nic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz_and_round_trip() {
        for nic in [0, 9, 10, 35] {
            let name = tap_name("0123456789ab", nic).unwrap();
            assert_eq!(name.len(), IFNAME_MAX, "{name}");
            validate_ifname(&name).unwrap();
            assert_eq!(parse_tap_name(&name), Some(("0123456789ab".into(), nic)));
        }
        assert_eq!(tap_name("0123456789ab", 0).unwrap(), "kt0123456789ab0");
        assert_eq!(tap_name("0123456789ab", 10).unwrap(), "kt0123456789aba");
    }

    #[test]
    fn bad_ids_and_indexes_are_named_errors() {
        assert!(matches!(
            tap_name("0123", 0),
            Err(NameError::InvalidVmId { .. })
        ));
        assert!(matches!(
            tap_name("0123456789AB", 0),
            Err(NameError::InvalidVmId { .. })
        ));
        assert!(matches!(
            tap_name("../../etc/pa", 0),
            Err(NameError::InvalidVmId { .. })
        ));
        assert_eq!(
            tap_name("0123456789ab", 36),
            Err(NameError::InvalidNicIndex { nic: 36 })
        );
    }

    #[test]
    fn other_names_are_not_kiln_taps() {
        for name in [
            "kiln0",
            "eth0",
            "kt",
            "kt0123456789ab",
            "kt0123456789abcd",
            "kt0123456789AB0",
            "kt0123456789ab-",
            "xt0123456789ab0",
        ] {
            assert_eq!(parse_tap_name(name), None, "{name}");
        }
    }

    #[test]
    fn validates_interface_names() {
        for good in ["kiln0", "br-lan", "a", "x234567890abcde"] {
            validate_ifname(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "x234567890abcdef", "é"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
