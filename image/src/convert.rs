//! Converting layers to erofs images with mkfs.erofs (erofs-utils ≥ 1.7).
//!
//! A pulled or imported layer: `--tar=f` reads the tar from stdin without
//! unpacking it anywhere, `--aufs` turns OCI whiteouts (`.wh.name`,
//! `.wh..wh..opq`) into overlayfs ones (a 0/0 character device, the
//! `trusted.overlay.opaque` xattr). The tar comes from the safety scan,
//! which decompresses the blob (gzip or zstd) once and feeds the converter
//! as it walks: the two run side by side, and what mkfs.erofs wrote is
//! thrown away unless the scan passes. A directory whose whiteouts are
//! overlayfs ones already (a containerd snapshot) converts as it is.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::error::ImageError;

/// At most this much of mkfs.erofs's stderr goes into an error.
const STDERR_TAIL: usize = 2048;

/// Write the erofs image of the plain layer tar that `feed` writes (the
/// scan, see `scan::scan_layer`) to `out` (a temp path; the caller syncs
/// and renames it), and return what `feed` returned. When `feed` fails,
/// mkfs.erofs is stopped and the error is `feed`'s. Blocking.
pub fn convert_fed<T>(
    mkfs: &Path,
    out: &Path,
    what: &Path,
    feed: impl FnOnce(&mut dyn Write) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let mut cmd = Command::new(mkfs);
    // A fixed 4 KiB block size: the image must mount in a guest with 4 KiB
    // pages whatever the host's page size.
    cmd.args(["--quiet", "-b4096", "--tar=f", "--aufs"])
        .arg(out)
        .stdin(Stdio::piped());
    let mut child = spawn(cmd, what)?;
    // Read stderr beside the feed: mkfs.erofs must never block on a full
    // stderr pipe while this thread blocks on its full stdin.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    });
    let fed = match child.stdin.take() {
        Some(mut stdin) => feed(&mut stdin),
        None => Err(failed(what, std::io::Error::other("no stdin"))),
    };
    if fed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| failed(what, e));
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let value = fed?;
    check(mkfs, status?, &stderr, what)?;
    Ok(value)
}

/// Write the erofs image of directory `dir`, one layer's files with their
/// owners, modes and xattrs, and its whiteouts already in overlayfs form
/// (a committed containerd overlayfs snapshot), to `out`. Blocking.
pub fn convert_dir(mkfs: &Path, dir: &Path, out: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new(mkfs);
    cmd.args(["--quiet", "-b4096"])
        .arg(out)
        .arg(dir)
        .stdin(Stdio::null());
    let mut child = spawn(cmd, dir)?;
    // Little goes to stderr before it exits: reading after is safe.
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| failed(dir, e))?;
    check(mkfs, status, &stderr, dir)
}

fn failed(what: &Path, source: std::io::Error) -> ImageError {
    ImageError::StorageFailed {
        action: "convert to erofs",
        path: what.to_owned(),
        source,
    }
}

/// Start a prepared mkfs.erofs, its stderr piped, dying with its parent.
fn spawn(mut cmd: Command, what: &Path) -> Result<Child, ImageError> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| failed(what, e))
}

/// `cmd`, once spawned, gets SIGKILL when its parent thread ends
/// (`PR_SET_PDEATHSIG`): if kilnd dies (kill -9), an erofs tool dies with
/// it instead of writing into `tmp/` after the restart swept it. The
/// signal follows the spawning thread, which waits for the child and so
/// outlives it.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the
    // parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Ok if mkfs.erofs succeeded, else its exit and the tail of its stderr.
fn check(mkfs: &Path, status: ExitStatus, stderr: &str, what: &Path) -> Result<(), ImageError> {
    if status.success() {
        return Ok(());
    }
    let tail = stderr.trim();
    let start = tail.len().saturating_sub(STDERR_TAIL);
    let start = (start..tail.len())
        .find(|&i| tail.is_char_boundary(i))
        .unwrap_or(tail.len());
    Err(failed(
        what,
        std::io::Error::other(format!(
            "{} exited with {status}: {}",
            mkfs.display(),
            &tail[start..]
        )),
    ))
}
