//! Who may call mutating methods. Always decided for the *caller* named in
//! the message header, never for kilnd itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use kiln_engine::access;
use kiln_engine::error::ErrorName;

use crate::error::KilnError;

/// polkit action for everything that changes state.
pub const ACTION_MANAGE: &str = "io.kiln.manage";

/// Who is calling, as a lease records it.
#[derive(Debug)]
pub struct Caller {
    /// The unique bus name with the uid (`uid:1000 dbus::1.42`).
    pub holder: String,
    /// The uid, when the bus daemon tells it.
    pub uid: Option<u32>,
    /// The unique bus name, when the message has a sender.
    pub name: Option<String>,
}

/// A refusal, named `PermissionDenied`.
fn denied(message: impl Into<String>) -> KilnError {
    KilnError::new(ErrorName::PermissionDenied, message)
}

/// Authorization for D-Bus callers, and who they are.
///
/// A caller's uid is asked of the bus daemon once per unique name and then
/// kept: a unique name is never reused while the bus runs, so the answer
/// cannot go stale (a round trip saved on every mutating call).
#[derive(Debug, Clone)]
pub struct Authorizer {
    policy: Policy,
    uids: Arc<Mutex<HashMap<String, u32>>>,
}

/// Most unique names whose uid is kept; the table starts afresh beyond it
/// (names of callers that left are never asked for again).
const MAX_CACHED_UIDS: usize = 4096;

/// Who decides.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// Ask polkit (`io.kiln.manage`) about the calling bus name.
    Polkit,
    /// No polkit (tests, development on a private bus): root and the
    /// daemon's own user may manage, resolved from the bus daemon's
    /// `GetConnectionUnixUser` for the caller.
    Local {
        /// kilnd's effective uid.
        daemon_uid: u32,
    },
}

impl Authorizer {
    /// polkit when `polkit`, else local rules: root and this process's uid.
    pub fn new(polkit: bool) -> Self {
        let policy = if polkit {
            Policy::Polkit
        } else {
            // SAFETY: geteuid has no preconditions.
            let daemon_uid = unsafe { libc::geteuid() };
            Policy::Local { daemon_uid }
        };
        Self {
            policy,
            uids: Arc::default(),
        }
    }

    /// The uid of the unique bus name `sender` (asked once, then kept).
    async fn uid_of(&self, conn: &Connection, sender: &UniqueName<'_>) -> zbus::Result<u32> {
        let key = sender.as_str();
        if let Some(uid) = self.lock_uids().get(key) {
            return Ok(*uid);
        }
        let uid = zbus::fdo::DBusProxy::new(conn)
            .await?
            .get_connection_unix_user(BusName::from(sender.to_owned()))
            .await?;
        let mut uids = self.lock_uids();
        if uids.len() >= MAX_CACHED_UIDS {
            uids.clear();
        }
        uids.insert(key.to_owned(), uid);
        Ok(uid)
    }

    fn lock_uids(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding it cannot leave the map inconsistent.
        self.uids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who is calling, for the record (a lease's holder): the unique bus
    /// name and, when the bus daemon tells, the caller's uid.
    pub async fn caller(&self, conn: &Connection, header: &Header<'_>) -> Caller {
        let Some(sender) = header.sender() else {
            return Caller {
                holder: "dbus:unknown".into(),
                uid: None,
                name: None,
            };
        };
        let uid = self.uid_of(conn, sender).await.ok();
        let holder = match uid {
            Some(uid) => format!("uid:{uid} dbus:{sender}"),
            None => format!("dbus:{sender}"),
        };
        Caller {
            holder,
            uid,
            name: Some(sender.to_string()),
        }
    }

    /// Ok if the caller could read `path` itself (kilnd reads what
    /// `ImportImage` names with its own rights). Its uid and groups come
    /// from the bus daemon (`GetConnectionCredentials`); a caller the bus
    /// cannot tell about is refused.
    pub async fn check_read(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        path: &std::path::Path,
    ) -> Result<(), KilnError> {
        let sender = header
            .sender()
            .ok_or_else(|| denied("the call has no sender"))?;
        let credentials = zbus::fdo::DBusProxy::new(conn)
            .await?
            .get_connection_credentials(BusName::from(sender.to_owned()))
            .await?;
        let uid = credentials
            .unix_user_id()
            .ok_or_else(|| denied("the bus does not tell the caller's uid"))?;
        let caller = access::Caller {
            uid,
            gids: credentials.unix_group_ids().cloned().unwrap_or_default(),
        };
        if caller.may_read(path).await {
            return Ok(());
        }
        tracing::info!(uid, path = %path.display(), "dbus: refused an import the caller may not read");
        Err(denied(format!(
            "the caller may not read {}",
            path.display()
        )))
    }

    /// Ok if the caller is root: `method` reads whatever it is given with
    /// kilnd's rights (`ImportRootfs`, for the containerd shim).
    pub async fn check_root(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        method: &str,
    ) -> Result<(), KilnError> {
        self.check_manage(conn, header, method).await?;
        match self.caller(conn, header).await.uid {
            Some(0) => Ok(()),
            uid => {
                tracing::info!(?uid, method, "dbus: refused a root-only call");
                Err(denied(format!("{method} is for root alone")))
            }
        }
    }

    /// Ok if the sender of `header` may call the mutating `method`.
    pub async fn check_manage(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        method: &str,
    ) -> Result<(), KilnError> {
        let sender = header
            .sender()
            .ok_or_else(|| denied("the call has no sender"))?;
        let allowed = match self.policy {
            Policy::Polkit => {
                let subject = Subject::new_for_message_header(header)
                    .map_err(|e| denied(format!("no polkit subject: {e}")))?;
                let authority = AuthorityProxy::builder(conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await?;
                let result = authority
                    .check_authorization(
                        &subject,
                        ACTION_MANAGE,
                        &HashMap::new(),
                        CheckAuthorizationFlags::AllowUserInteraction.into(),
                        "",
                    )
                    .await
                    .map_err(|e| {
                        // Fail closed: no polkit answer, no change.
                        tracing::warn!(error = %e, "dbus: polkit check failed");
                        denied(format!("cannot check authorization: {e}"))
                    })?;
                result.is_authorized
            }
            Policy::Local { daemon_uid } => {
                let uid = self.uid_of(conn, sender).await?;
                uid == 0 || uid == daemon_uid
            }
        };
        if allowed {
            Ok(())
        } else {
            tracing::info!(method, sender = %sender, "dbus: refused unauthorized caller");
            Err(denied(format!(
                "{method} needs authorization for {ACTION_MANAGE}"
            )))
        }
    }
}
