//! Who may call mutating methods: decided from the peer's credentials
//! (SO_PEERCRED), never from anything the caller says.

use std::ffi::CString;

/// Authorization policy for varlink callers.
#[derive(Debug, Clone)]
pub struct Authorizer {
    /// Members of this group may manage VMs (default: `kiln`).
    manage_gid: Option<u32>,
    /// The daemon's own uid: when kilnd runs unprivileged (development,
    /// tests), its owner manages it, like a user service.
    daemon_uid: u32,
}

impl Authorizer {
    /// Root, the daemon's own user, and members of `group` may manage.
    pub fn new(group: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        let daemon_uid = unsafe { libc::geteuid() };
        Self {
            manage_gid: group_id(group),
            daemon_uid,
        }
    }

    /// Whether a peer with these ids may call mutating methods.
    pub fn may_manage(&self, uid: u32, gids: impl IntoIterator<Item = u32>) -> bool {
        uid == 0
            || uid == self.daemon_uid
            || self
                .manage_gid
                .is_some_and(|g| gids.into_iter().any(|x| x == g))
    }
}

fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated string and returns a pointer
    // into static storage (or null); we read one field before any other
    // call could overwrite it.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    if group.is_null() {
        return None;
    }
    // SAFETY: non-null pointer returned by getgrnam.
    Some(unsafe { (*group).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_owner_and_group_members_may_manage() {
        let auth = Authorizer {
            manage_gid: Some(990),
            daemon_uid: 1000,
        };
        assert!(auth.may_manage(0, []));
        assert!(auth.may_manage(1000, []));
        assert!(auth.may_manage(1001, [100, 990]));
        assert!(!auth.may_manage(1001, [100]));
        let no_group = Authorizer {
            manage_gid: None,
            daemon_uid: 0,
        };
        assert!(!no_group.may_manage(65534, [65534]));
    }
}
