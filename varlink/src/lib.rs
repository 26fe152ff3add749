//! Kiln's varlink adapter: `io.kiln.Manager` on a unix socket.
//!
//! Thin by design (STYLE.md 1): decode and validate the parameters, check
//! the caller's credentials for mutating methods, send one engine command,
//! map the reply or error. No state, no locks.
//!
//! The service is a hand-written [`zlink::Service`] rather than the
//! `#[zlink::service]` macro, for two reasons measured with zlink 0.8: the
//! macro closes the connection on a wrong-typed or missing parameter (and on
//! unknown methods when `parameters` is present, as `varlinkctl` always
//! sends), where varlink clients expect `org.varlink.service.InvalidParameter`
//! / `MethodNotFound`; and it generates the IDL from Rust types, while Kiln
//! serves the committed, documented `io.kiln.Manager.varlink` verbatim. zlink
//! still does the framing, the connection handling, `more` streaming and peer
//! credentials.
//!
//! `zlink::Server` awaits each call inline, so one slow call (a VM boot) would
//! stall every other connection; we run one `Server` per connection on a
//! `LocalSet` (its future is `!Send`) in a thread of its own.

mod auth;
mod methods;
mod service;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_engine::EngineHandle;
use thiserror::Error;
use tracing::{info, warn};

pub use auth::Authorizer;

/// The committed interface description, served as-is.
pub const INTERFACE_DESCRIPTION: &str = include_str!("../io.kiln.Manager.varlink");
/// Interface name.
pub const INTERFACE: &str = "io.kiln.Manager";

/// Adapter errors.
#[derive(Debug, Error)]
pub enum VarlinkError {
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket-activated fd is unusable.
    #[error("socket from systemd is unusable")]
    Activation(#[source] std::io::Error),
    /// The server thread could not start.
    #[error("cannot start the varlink thread")]
    Thread(#[source] std::io::Error),
}

/// Where to listen.
#[derive(Debug)]
pub enum Endpoint {
    /// A listening socket passed by systemd.
    Activated(OwnedFd),
    /// Bind this path ourselves (mode 0666: who may *change* things is
    /// decided per call from the peer's credentials).
    Path(PathBuf),
}

impl Endpoint {
    /// The socket systemd passed with `FileDescriptorName=varlink`
    /// (`LISTEN_FDS`/`LISTEN_FDNAMES`), if any, else `path`.
    pub fn from_env_or(path: &Path) -> Self {
        match activated_fd("varlink") {
            Some(fd) => Self::Activated(fd),
            None => Self::Path(path.to_path_buf()),
        }
    }
}

/// Take the fd named `name` from systemd's socket-activation environment.
fn activated_fd(name: &str) -> Option<OwnedFd> {
    const SD_LISTEN_FDS_START: i32 = 3;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    let index =
        (0..count).find(|i| names.get(*i as usize).copied().unwrap_or("varlink") == name)?;
    let fd = SD_LISTEN_FDS_START + index;
    // Mark it close-on-exec so QEMU never inherits it.
    // SAFETY: fcntl on an fd number systemd handed us; no memory involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: systemd passed this fd to us (LISTEN_PID matched); nothing
    // else in the process owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Start serving `endpoint` on a thread of its own. Returns once the socket
/// listens; the thread runs until the process exits.
pub fn spawn(
    endpoint: Endpoint,
    engine: EngineHandle,
    auth: Authorizer,
) -> Result<(), VarlinkError> {
    let listener = match endpoint {
        Endpoint::Activated(fd) => {
            let std_listener = std::os::unix::net::UnixListener::from(fd);
            std_listener
                .set_nonblocking(true)
                .map_err(VarlinkError::Activation)?;
            info!("varlink: serving the socket passed by systemd");
            std_listener
        }
        Endpoint::Path(path) => bind(&path)?,
    };
    let thread = std::thread::Builder::new().name("varlink".into());
    thread
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return warn!(error = %e, "varlink: cannot build runtime"),
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, serve(listener, engine, auth));
        })
        .map_err(VarlinkError::Thread)?;
    Ok(())
}

fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, VarlinkError> {
    let listen_err = |source| VarlinkError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    // A socket left by a previous kilnd: nobody listens on it any more.
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    info!(path = %path.display(), "varlink: listening");
    Ok(listener)
}

async fn serve(listener: std::os::unix::net::UnixListener, engine: EngineHandle, auth: Authorizer) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "varlink: cannot register listener"),
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "varlink: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(socket) = zlink::tokio::unix::Stream::try_from(stream) else {
            continue;
        };
        let service = service::ManagerService::new(engine.clone(), auth.clone());
        let server = zlink::Server::new(zlink::ReadyListener::new(socket), service);
        tokio::task::spawn_local(async move {
            if let Err(e) = server.run().await {
                // Malformed JSON or a client that went away: only this
                // connection ends.
                tracing::debug!(error = %e, "varlink: connection closed");
            }
        });
    }
}
