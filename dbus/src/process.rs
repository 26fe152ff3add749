//! The D-Bus side of streamed processes and copies: file descriptors.
//!
//! D-Bus has no replies that keep coming, and a signal per output chunk
//! would be broadcast through the bus daemon to every matching listener;
//! what D-Bus services that stream do (machined's `OpenMachinePTY`,
//! portals, logind's `TakeDevice`) is hand the caller a file descriptor.
//! So `StartProcess` returns the client's ends of pipes (or of a terminal
//! socket) and kilnd relays them to the guest in a background task.

use std::os::fd::OwnedFd;

use kiln_engine::stream::{pipe, pump, socket_pair, ClientStdio};
use kiln_engine::{EngineError, EngineHandle};

use crate::error::KilnError;

fn fd_error(e: std::io::Error) -> KilnError {
    EngineError::ExecFailed(format!("cannot make the client's descriptors: {e}")).into()
}

/// Makes the descriptors for process `handle` (a terminal, or pipes with
/// stdin when `stdin`), starts relaying them in the background, and
/// returns the client's ends: `[terminal]` or `[stdout, stderr(, stdin)]`.
pub fn relay(
    engine: &EngineHandle,
    id: &str,
    handle: u64,
    since: Option<u64>,
    terminal: bool,
    stdin: bool,
    detach: bool,
) -> Result<Vec<OwnedFd>, KilnError> {
    let (ours, theirs) = if terminal {
        let (ours, theirs) = socket_pair().map_err(fd_error)?;
        (ClientStdio::Terminal(ours), vec![theirs])
    } else {
        let (out_read, out_write) = pipe().map_err(fd_error)?;
        let (err_read, err_write) = pipe().map_err(fd_error)?;
        let mut theirs = vec![out_read, err_read];
        let stdin = if stdin {
            let (in_read, in_write) = pipe().map_err(fd_error)?;
            theirs.push(in_write);
            Some(in_read)
        } else {
            None
        };
        (
            ClientStdio::Pipes {
                stdin,
                stdout: out_write,
                stderr: err_write,
            },
            theirs,
        )
    };
    let (engine, id) = (engine.clone(), id.to_owned());
    tokio::spawn(async move {
        if let Err(e) = pump(engine, &id, handle, since, ours, detach).await {
            tracing::debug!(vm = %id, handle, error = %e, "relaying a process ended");
        }
    });
    Ok(theirs)
}
