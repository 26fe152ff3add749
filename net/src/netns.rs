//! Running network work inside a given network namespace.
//!
//! A network namespace belongs to a *thread* (`setns(2)` changes only the
//! calling thread), and every kernel object Kiln makes lands in the
//! namespace of the thread that makes it: a TAP in the namespace current
//! when `/dev/net/tun` was opened, a netlink socket in the one current at
//! `socket(2)`, and an `nft` child process inherits the forking thread's.
//! So [`NsExec`] is either "the caller's namespace" (blocking work goes to
//! tokio's blocking pool, whose threads share kilnd's namespace) or one
//! dedicated thread that entered the namespace once and runs every job
//! given to it. The tokio executor threads never change namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use thiserror::Error;
use tokio::sync::oneshot;

/// Namespace errors.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// The namespace file (e.g. `/run/netns/NAME`) cannot be opened.
    #[error("cannot open network namespace {path:?}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `setns(2)` refused (not a network namespace, or no `CAP_SYS_ADMIN`).
    #[error("cannot enter network namespace {path:?}")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The namespace thread could not be started or went away.
    #[error("network namespace worker thread is gone")]
    WorkerGone,
}

type Job = Box<dyn FnOnce() + Send>;

/// Where blocking network work runs. See the module docs.
#[derive(Debug)]
pub enum NsExec {
    /// The caller's (kilnd's) namespace, via tokio's blocking pool.
    Current,
    /// A thread that lives in another namespace.
    Thread {
        /// The namespace file it entered.
        path: PathBuf,
        /// Jobs for it; dropping the sender ends the thread.
        jobs: mpsc::Sender<Job>,
    },
}

impl NsExec {
    /// An executor for `netns` (a path such as `/run/netns/NAME` or
    /// `/proc/PID/ns/net`), or for the current namespace if `None`. Fails
    /// at once if the namespace cannot be entered.
    pub fn new(netns: Option<&Path>) -> Result<Self, NetnsError> {
        let Some(path) = netns else {
            return Ok(Self::Current);
        };
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
        let thread_name = format!(
            "kiln-netns-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                // SAFETY: `file` is an open namespace file descriptor for
                // the duration of the call; setns only affects this thread.
                let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if ret == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                drop(file);
                let ok = entered.is_ok();
                if ready_tx.send(entered).is_err() || !ok {
                    return;
                }
                while let Ok(job) = queue.recv() {
                    job();
                }
            })
            .map_err(|_| NetnsError::WorkerGone)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self::Thread {
                path: path.to_path_buf(),
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(NetnsError::WorkerGone),
        }
    }

    /// The namespace file, if not the current namespace.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Current => None,
            Self::Thread { path, .. } => Some(path),
        }
    }

    /// Runs blocking `f` in the namespace and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self {
            Self::Current => tokio::task::spawn_blocking(f)
                .await
                .map_err(|_| NetnsError::WorkerGone),
            Self::Thread { jobs, .. } => {
                let (tx, rx) = oneshot::channel();
                jobs.send(Box::new(move || {
                    let _ = tx.send(f());
                }))
                .map_err(|_| NetnsError::WorkerGone)?;
                rx.await.map_err(|_| NetnsError::WorkerGone)
            }
        }
    }
}
