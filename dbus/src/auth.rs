//! Who may call mutating methods. Always decided for the *caller* named in
//! the message header, never for kilnd itself.

use std::collections::HashMap;

use zbus::message::Header;
use zbus::names::BusName;
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use kiln_engine::error::ErrorName;

use crate::error::KilnError;

/// polkit action for everything that changes state.
pub const ACTION_MANAGE: &str = "io.kiln.manage";

/// Who is calling, for the record (a lease's holder): the unique bus name
/// and, when the bus daemon tells, the caller's uid.
pub async fn caller(conn: &Connection, header: &Header<'_>) -> String {
    let Some(sender) = header.sender() else {
        return "dbus:unknown".into();
    };
    let uid = match zbus::fdo::DBusProxy::new(conn).await {
        Ok(proxy) => proxy
            .get_connection_unix_user(BusName::from(sender.to_owned()))
            .await
            .ok(),
        Err(_) => None,
    };
    match uid {
        Some(uid) => format!("uid:{uid} dbus:{sender}"),
        None => format!("dbus:{sender}"),
    }
}

/// A refusal, named `PermissionDenied`.
fn denied(message: impl Into<String>) -> KilnError {
    KilnError::new(ErrorName::PermissionDenied, message)
}

/// Authorization policy for D-Bus callers.
#[derive(Debug, Clone, Copy)]
pub enum Authorizer {
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
    /// polkit when `polkit`, else [`Authorizer::Local`] for this process.
    pub fn new(polkit: bool) -> Self {
        if polkit {
            Self::Polkit
        } else {
            // SAFETY: geteuid has no preconditions.
            let daemon_uid = unsafe { libc::geteuid() };
            Self::Local { daemon_uid }
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
        let allowed = match self {
            Self::Polkit => {
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
            Self::Local { daemon_uid } => {
                let uid = zbus::fdo::DBusProxy::new(conn)
                    .await?
                    .get_connection_unix_user(BusName::from(sender.to_owned()))
                    .await?;
                uid == 0 || uid == *daemon_uid
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
