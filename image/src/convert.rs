//! Converting one scanned layer to an erofs image with mkfs.erofs
//! (erofs-utils ≥ 1.7): `--tar=f` reads the tar from stdin without
//! unpacking it anywhere, `--aufs` turns OCI whiteouts (`.wh.name`,
//! `.wh..wh..opq`) into overlayfs ones (a 0/0 character device, the
//! `trusted.overlay.opaque` xattr), `--ungzip` decompresses gzip itself.
//! zstd it cannot read, so that stream is decoded here and piped in.
//! A directory whose whiteouts are overlayfs ones already (a containerd
//! snapshot) converts as it is.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::ImageError;
use crate::manifest::Compression;

/// At most this much of mkfs.erofs's stderr goes into an error.
const STDERR_TAIL: usize = 2048;

/// Write the erofs image of the layer blob at `blob` to `out` (a temp path;
/// the caller syncs and renames it). Blocking: run it on the blocking pool.
pub fn convert_layer(
    mkfs: &Path,
    blob: &Path,
    compression: Compression,
    out: &Path,
) -> Result<(), ImageError> {
    let input = File::open(blob).map_err(ImageError::io("read", blob))?;
    let mut cmd = Command::new(mkfs);
    // A fixed 4 KiB block size: the image must mount in a guest with 4 KiB
    // pages whatever the host's page size.
    cmd.args(["--quiet", "-b4096", "--tar=f", "--aufs"]);
    if compression == Compression::Gzip {
        cmd.arg("--ungzip");
    }
    cmd.arg(out);
    let zstd_input = match compression {
        Compression::Zstd => {
            cmd.stdin(Stdio::piped());
            Some(input)
        }
        Compression::None | Compression::Gzip => {
            cmd.stdin(input);
            None
        }
    };
    run_mkfs(mkfs, cmd, zstd_input, blob)
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
    run_mkfs(mkfs, cmd, None, dir)
}

/// Run a prepared mkfs.erofs (`zstd_input`: a zstd stream to decode into
/// its stdin); `what` names the input in errors.
fn run_mkfs(
    mkfs: &Path,
    mut cmd: Command,
    zstd_input: Option<File>,
    what: &Path,
) -> Result<(), ImageError> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the
    // parent. PR_SET_PDEATHSIG: if kilnd dies (kill -9), mkfs.erofs dies
    // with it instead of writing into tmp/ after the restart swept it. The
    // signal follows the spawning thread, which waits for the child below
    // and so outlives it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let failed = |source| ImageError::StorageFailed {
        action: "convert to erofs",
        path: what.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(failed)?;
    // Feed zstd's output from this thread; mkfs.erofs's stderr is read
    // after, which is safe as it writes little there until it exits.
    let fed = match (zstd_input, child.stdin.take()) {
        (Some(input), Some(mut stdin)) => zstd::stream::read::Decoder::new(input)
            .and_then(|mut decoder| std::io::copy(&mut decoder, &mut stdin))
            .map(|_| ()),
        _ => Ok(()),
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(failed)?;
    fed.map_err(failed)?;
    if !status.success() {
        let tail = stderr.trim();
        let start = tail.len().saturating_sub(STDERR_TAIL);
        let start = (start..tail.len())
            .find(|&i| tail.is_char_boundary(i))
            .unwrap_or(tail.len());
        let tail = &tail[start..];
        return Err(failed(std::io::Error::other(format!(
            "{} exited with {status}: {tail}",
            mkfs.display()
        ))));
    }
    Ok(())
}
