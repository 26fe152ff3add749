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
//! `LocalSet` (its future is `!Send`) in a thread of its own. That thread is
//! not detached and forgotten: [`spawn`] hands back a [`Server`] whose
//! [`Server::finished`] says why it stopped, for kilnd's supervision.

mod auth;
mod methods;
mod processes;
mod service;

use std::cell::Cell;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use kiln_engine::EngineHandle;
use thiserror::Error;
use tokio::sync::oneshot;
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
    /// The server thread could not build its async runtime.
    #[error("cannot start the varlink runtime")]
    Runtime(#[source] std::io::Error),
    /// The listening socket could not be registered with the thread's
    /// runtime.
    #[error("cannot register the varlink socket")]
    Register(#[source] std::io::Error),
    /// The server thread panicked.
    #[error("the varlink thread panicked")]
    Panicked,
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
/// listens; the thread serves until the process exits, unless it fails
/// (which the returned [`Server`] reports).
pub fn spawn(
    endpoint: Endpoint,
    engine: EngineHandle,
    auth: Authorizer,
) -> Result<Server, VarlinkError> {
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
    Server::watch(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return VarlinkError::Runtime(e),
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, serve(listener, engine, auth))
    })
}

/// The varlink server's thread, watched. Dropping it stops the watching,
/// not the server.
#[derive(Debug)]
#[must_use = "a server nobody watches stops unnoticed"]
pub struct Server {
    /// Why the thread stopped: sent by the thread as it returns, dropped
    /// unsent when it panics. `None` once [`Server::finished`] has said.
    stopped: Option<oneshot::Receiver<VarlinkError>>,
}

impl Server {
    /// Run `body` on the `varlink` thread; what it returns is why it
    /// stopped.
    fn watch(body: impl FnOnce() -> VarlinkError + Send + 'static) -> Result<Self, VarlinkError> {
        let (report, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("varlink".into())
            .spawn(move || {
                // A panic unwinds past this send and drops `report`, which
                // is how `finished` learns of it. Nobody listening is fine.
                let _ = report.send(body());
            })
            .map_err(VarlinkError::Thread)?;
        Ok(Self {
            stopped: Some(stopped),
        })
    }

    /// Resolves with why the server stopped. It never stops of its own
    /// accord, so any answer is a failure. Cancel-safe (it can wait in a
    /// `select!`); once it has answered it never resolves again.
    pub async fn finished(&mut self) -> VarlinkError {
        let Some(stopped) = self.stopped.as_mut() else {
            return std::future::pending().await;
        };
        let why = stopped.await.unwrap_or(VarlinkError::Panicked);
        self.stopped = None;
        why
    }
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

/// Accept connections until the process exits; what it returns is why it
/// could not.
async fn serve(
    listener: std::os::unix::net::UnixListener,
    engine: EngineHandle,
    auth: Authorizer,
) -> VarlinkError {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return VarlinkError::Register(e),
    };
    let mut connections: u64 = 0;
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
        connections += 1;
        let connection = connections;
        let bound = Rc::new(Cell::new(false));
        let service =
            service::ManagerService::new(engine.clone(), auth.clone(), connection, bound.clone());
        let server = zlink::Server::new(zlink::ReadyListener::new(socket), service);
        let engine = engine.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = server.run().await {
                // Malformed JSON or a client that went away: only this
                // connection ends.
                tracing::debug!(error = %e, "varlink: connection closed");
            }
            // Leases acquired with releaseOnDisconnect end with it.
            if bound.get() {
                let who = kiln_engine::api::Disconnect::Connection(connection);
                if let Err(e) = engine.disconnected(who).await {
                    warn!(error = %e.message(), "varlink: cannot end the leases of a closed connection");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn finished_says_why_the_thread_stopped() {
        let mut server =
            Server::watch(|| VarlinkError::Register(std::io::Error::other("no reactor"))).unwrap();
        let why = server.finished().await;
        assert!(matches!(why, VarlinkError::Register(_)), "{why:?}");
        assert_eq!(why.to_string(), "cannot register the varlink socket");
    }

    #[tokio::test]
    async fn a_panic_on_the_thread_is_reported() {
        let mut server = Server::watch(|| panic!("serve failed")).unwrap();
        let why = server.finished().await;
        assert!(matches!(why, VarlinkError::Panicked), "{why:?}");
    }

    #[tokio::test]
    async fn finished_waits_while_the_thread_serves() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let mut server = Server::watch(move || {
            let _ = stopped.recv();
            VarlinkError::Runtime(std::io::Error::other("told to stop"))
        })
        .unwrap();
        // Pacing, not a wait for a condition: the thread serves until told,
        // so `finished` must still be pending after any time at all.
        let early = tokio::time::timeout(Duration::from_millis(50), server.finished()).await;
        assert!(early.is_err(), "finished while serving: {early:?}");
        stop.send(()).unwrap();
        let why = server.finished().await;
        assert!(matches!(why, VarlinkError::Runtime(_)), "{why:?}");
        // It has answered; asking again waits forever.
        let again = tokio::time::timeout(Duration::from_millis(10), server.finished()).await;
        assert!(again.is_err(), "{again:?}");
    }
}
