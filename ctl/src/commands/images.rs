//! Images: image ls/show/pull/import/rm, and the progress of a pull or an
//! import.

use std::io::Write;

use serde_json::Value;

use super::{CtlError, Ctx};
use crate::cli::ImageCommand;
use crate::client::ClientError;
use crate::output::{self, bytes, fit, short_digest, Fields};
use crate::view::{self, text, IMAGE_COLUMNS, IMAGE_FIELDS, LAYER_COLUMNS, PROCESS_FIELDS};

pub fn image(ctx: &mut Ctx, command: ImageCommand) -> Result<i32, CtlError> {
    match command {
        ImageCommand::Ls { quiet } => {
            let reply = ctx.api.list_images()?;
            if ctx.json(&reply) {
                return Ok(0);
            }
            let images = view::items(&reply, "images");
            if quiet {
                for image in images {
                    println!("{}", text(image, "digest"));
                }
            } else {
                ctx.table(IMAGE_COLUMNS, images);
            }
        }
        ImageCommand::Show { image } => {
            let image = ctx.resolve_image(&image)?;
            let reply = ctx.api.describe_image(&image)?;
            if !ctx.json(&reply) {
                show(ctx, &reply["image"]);
            }
        }
        ImageCommand::Pull { reference } => {
            let json = ctx.json;
            return transfer(json, |each| ctx.api.pull_image(&reference, each));
        }
        ImageCommand::Import { path, tag } => {
            // kilnd wants an absolute path; the operator may type a
            // relative one.
            let path = std::path::absolute(&path)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?;
            let path = path.to_string_lossy().into_owned();
            let json = ctx.json;
            return transfer(json, |each| {
                ctx.api.import_image(&path, tag.as_deref(), each)
            });
        }
        ImageCommand::Rm { images } => {
            for image in images {
                let image = ctx.resolve_image(&image)?;
                let reply = ctx.api.remove_image(&image)?;
                ctx.json(&reply);
            }
        }
    }
    Ok(0)
}

/// An image's fields and its process as one block, then its layers.
fn show(ctx: &Ctx, image: &Value) {
    let now = output::now_us();
    let mut block: Fields = view::block(IMAGE_FIELDS, image, now);
    view::add_to_block(&mut block, PROCESS_FIELDS, &image["process"], now);
    print!("{}", block.render());
    let layers = view::items(image, "layers");
    if !layers.is_empty() {
        println!();
        ctx.table(LAYER_COLUMNS, layers);
    }
}

/// A pull or an import (`call` makes it with `more`): kilnd's progress on
/// stderr, then the image's digest on stdout, so `$(kilnctl image pull
/// …)` is the digest; with `--json`, every reply as a JSON line on stdout.
fn transfer(
    json: bool,
    call: impl FnOnce(&mut dyn FnMut(Value) -> bool) -> Result<(), ClientError>,
) -> Result<i32, CtlError> {
    let image = receive(json, call)?;
    if !json {
        println!("{}", text(&image, "digest"));
    }
    Ok(0)
}

/// `reference` pulled as `image pull` shows it (progress on stderr), for a
/// command that needs it stored; the image.
pub(super) fn pull(ctx: &mut Ctx, reference: &str) -> Result<Value, CtlError> {
    receive(false, |each| ctx.api.pull_image(reference, each))
}

/// The replies of a pull or an import: progress on stderr, or with `json`
/// each reply as a JSON line on stdout; the image of the last.
fn receive(
    json: bool,
    call: impl FnOnce(&mut dyn FnMut(Value) -> bool) -> Result<(), ClientError>,
) -> Result<Value, CtlError> {
    let mut progress = Progress::on_stderr();
    let mut image = Value::Null;
    let result = call(&mut |reply| {
        if json {
            println!("{reply}");
        } else if reply["progress"].is_object() {
            progress.report(&reply["progress"]);
        }
        if reply["image"].is_object() {
            image = reply["image"].clone();
        }
        true
    });
    // Before an error is printed, so that it gets a line of its own.
    progress.finish();
    result?;
    Ok(image)
}

/// Progress reports on stderr: on a terminal one line, rewritten in place
/// and cut to its width; otherwise (a log, a pipe) a line each.
struct Progress {
    /// The terminal's width; None when stderr is not one.
    terminal: Option<usize>,
    /// A rewritten line is on screen without its newline.
    open_line: bool,
}

impl Progress {
    fn on_stderr() -> Self {
        Self {
            terminal: output::stderr_width(),
            open_line: false,
        }
    }

    fn report(&mut self, progress: &Value) {
        let line = progress_line(progress);
        let mut stderr = std::io::stderr().lock();
        // Best effort, as for any diagnostics.
        let _ = match self.terminal {
            // One column short: a line that fills the terminal would wrap
            // on some, and `\r` would then rewrite only its second half.
            Some(width) => {
                self.open_line = true;
                write!(stderr, "\r{}\x1b[K", fit(&line, width.saturating_sub(1)))
            }
            None => writeln!(stderr, "{line}"),
        };
        let _ = stderr.flush();
    }

    fn finish(&mut self) {
        if std::mem::take(&mut self.open_line) {
            eprintln!();
        }
    }
}

/// One `ImageProgress` as a line: what happened, to which layer (or to the
/// image as a whole), and the bytes done of all.
fn progress_line(p: &Value) -> String {
    let number = |key: &str| p.get(key).and_then(Value::as_u64).unwrap_or(0);
    let step = text(p, "step");
    let done = format!(
        "{} / {}",
        bytes(number("doneBytes")),
        bytes(number("totalBytes"))
    );
    let layers = number("layers");
    match number("layer") {
        0 => {
            let plural = if layers == 1 { "" } else { "s" };
            let digest = short_digest(&text(p, "digest"));
            format!("{step} {digest} ({layers} layer{plural})  {done}")
        }
        layer => format!("{step} layer {layer}/{layers}  {done}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_reads_as_one_line() {
        let report = |step, layer| {
            json!({"step": step, "digest": "sha256:3fa2c1d0e4b5ffff", "layer": layer,
                   "layers": 3, "doneBytes": 1_572_864, "totalBytes": 4_194_304})
        };
        assert_eq!(
            progress_line(&report("downloading", 2)),
            "downloading layer 2/3  1.5 MiB / 4.0 MiB"
        );
        assert_eq!(
            progress_line(&report("resolved", 0)),
            "resolved 3fa2c1d0e4b5 (3 layers)  1.5 MiB / 4.0 MiB"
        );
        let one = json!({"step": "stored", "digest": "sha256:ab", "layer": 0, "layers": 1,
                         "doneBytes": 10, "totalBytes": 10});
        assert_eq!(progress_line(&one), "stored ab (1 layer)  10 B / 10 B");
    }
}
