//! kilnd as the shim uses it: a connection per job (calls, each stream on
//! its own), kilnd's errors as ttrpc statuses, the lease kept alive, and
//! `ImportRootfs`.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

use containerd_shim_protos::ttrpc::{self, Code};
use kiln_client::api::Manager;
use kiln_client::client::{socket_path, ClientError, Connection};
use serde_json::Value;

/// kilnd at one address.
#[derive(Debug, Clone)]
pub struct Kiln {
    pub address: String,
}

impl Kiln {
    pub fn new(address: String) -> Self {
        Self { address }
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Manager, ClientError> {
        Connection::open(&socket_path(&self.address)).map(Manager::new)
    }

    /// `ImportRootfs` of `layers` (lowest first): the image's digest and
    /// how many layers kilnd converted (the rest were cached).
    pub fn import_rootfs(&self, layers: &[String]) -> Result<(String, usize), ClientError> {
        let mut image = None;
        let mut converted = 0;
        self.connect()?.import_rootfs(layers, None, |reply| {
            if reply["progress"]["step"] == "converted" {
                converted += 1;
            }
            if let Some(digest) = reply["image"]["digest"].as_str() {
                image = Some(digest.to_owned());
            }
            true
        })?;
        let digest = image.ok_or_else(|| {
            ClientError::Protocol("ImportRootfs ended without an image".to_owned())
        })?;
        Ok((digest, converted))
    }
}

/// The short name of kilnd's error (`NoSuchVM`), if `e` is one.
pub fn error_name(e: &ClientError) -> Option<&str> {
    match e {
        ClientError::Remote { name, .. } => name.rsplit('.').next(),
        _ => None,
    }
}

/// Whether `e` says the thing is gone already (fine for a delete).
pub fn is_gone(e: &ClientError) -> bool {
    matches!(
        error_name(e),
        Some("NoSuchVM" | "NoSuchContainer" | "NoSuchProcess")
    )
}

/// kilnd's error as containerd should see it: the class by its name, the
/// message (the guest's reason for `ContainerStartFailed`) kept.
pub fn status(context: &str, e: &ClientError) -> ttrpc::Error {
    let code = match error_name(e) {
        Some("NoSuchVM" | "NoSuchContainer" | "NoSuchProcess" | "ImageNotFound" | "NoSuchPool") => {
            Code::NOT_FOUND
        }
        Some("InvalidSpec" | "InvalidArgument" | "InvalidParameter" | "InvalidName") => {
            Code::INVALID_ARGUMENT
        }
        Some("InvalidState") => Code::FAILED_PRECONDITION,
        Some("PoolExhausted" | "QuotaExceeded" | "TooManyContainers" | "TooManyProcesses") => {
            Code::RESOURCE_EXHAUSTED
        }
        Some("Timeout") => Code::DEADLINE_EXCEEDED,
        Some("PermissionDenied") => Code::PERMISSION_DENIED,
        Some("AlreadyExists" | "ContainerExists") => Code::ALREADY_EXISTS,
        Some("MethodNotFound") => Code::UNIMPLEMENTED,
        None => Code::UNAVAILABLE,
        Some(_) => Code::UNKNOWN,
    };
    rpc_error(code, format!("{context}: {e}"))
}

/// The guest's reason a container did not start, in the words containerd
/// users know from runc (`exec /bin/app: exec format error`), when kilnd's
/// `ContainerStartFailed` carries one that has such words. kilnd names the
/// guest's error only in its message (`...: ExecFormatError: ...`), so the
/// message is where it is read from.
pub fn start_failure(e: &ClientError, program: &str) -> Option<String> {
    let ClientError::Remote { parameters, .. } = e else {
        return None;
    };
    if error_name(e) != Some("ContainerStartFailed") {
        return None;
    }
    let message = parameters["message"].as_str()?;
    message
        .contains("ExecFormatError")
        .then(|| format!("exec {program}: exec format error"))
}

/// A ttrpc status error.
pub fn rpc_error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// Keeps a VM's lease alive: `Renew` every third of its lifetime until
/// dropped (the pod ended) or kilnd says the lease is gone.
#[derive(Debug)]
pub struct LeaseKeeper {
    stop: Option<Sender<()>>,
}

impl LeaseKeeper {
    /// Renew `vm`'s lease of `ttl_sec` (0: it has no lifetime, nothing to
    /// do).
    pub fn start(kiln: Kiln, vm: String, ttl_sec: u64) -> Self {
        if ttl_sec == 0 {
            return Self { stop: None };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let every = Duration::from_millis(ttl_sec * 1000 / 3);
        std::thread::spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let renewed = kiln.connect().and_then(|mut m| m.renew(&vm, ttl_sec));
            match renewed {
                Ok(_) => log::debug!("renewed the lease of VM {vm}"),
                Err(e) if is_gone(&e) || error_name(&e) == Some("InvalidState") => {
                    log::error!("the lease of VM {vm} is gone: {e}");
                    return;
                }
                // kilnd restarting: the next try may work, and the TTL
                // leaves two more.
                Err(e) => log::warn!("renewing the lease of VM {vm}: {e}"),
            }
        });
        Self { stop: Some(stop) }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `vm` object of a reply.
pub fn vm_of(reply: &Value) -> (String, u32) {
    let vm = &reply["vm"];
    let id = vm["id"].as_str().unwrap_or_default().to_owned();
    let pid = vm["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_default();
    (id, pid)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn remote(name: &str) -> ClientError {
        ClientError::Remote {
            name: format!("io.kiln.Manager.{name}"),
            parameters: json!({ "message": "the guest says: exec format error" }),
        }
    }

    fn code(e: ttrpc::Error) -> (Code, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_map_by_name_and_keep_the_message() {
        assert_eq!(code(status("x", &remote("NoSuchVM"))).0, Code::NOT_FOUND);
        assert_eq!(
            code(status("x", &remote("PoolExhausted"))).0,
            Code::RESOURCE_EXHAUSTED
        );
        let (c, message) = code(status("start", &remote("ContainerStartFailed")));
        assert_eq!(c, Code::UNKNOWN);
        assert!(message.contains("exec format error"), "{message}");
        let lost = ClientError::Lost(std::io::Error::other("gone"));
        assert_eq!(code(status("x", &lost)).0, Code::UNAVAILABLE);
        let bad = ClientError::Remote {
            name: "io.kiln.Manager.ContainerStartFailed".into(),
            parameters: json!({ "message": "container failed to start: ExecFormatError: " }),
        };
        assert_eq!(
            start_failure(&bad, "/bin/app").as_deref(),
            Some("exec /bin/app: exec format error")
        );
        assert_eq!(start_failure(&remote("ContainerStartFailed"), "/x"), None);
        assert_eq!(start_failure(&remote("Timeout"), "/x"), None);
        assert!(is_gone(&remote("NoSuchContainer")));
        assert!(!is_gone(&remote("Timeout")));
    }
}
