//! `gpu-probe`: kiln-gpu's inventory, watcher and access calls from the
//! command line. guest/tests/gpu-smoke.py builds it static and runs it
//! inside a VM with a virtio-gpu device: the one place on machines without
//! a GPU where a real DRM sysfs and a real render node exist.
//!
//! ```text
//! gpu-probe scan [SYSFS DEV]               inventory as JSON
//! gpu-probe watch SECONDS [SYSFS DEV]      "changed" or "timeout"
//! gpu-probe grant NODE UID                 grant, prints the outcome
//! gpu-probe revoke NODE UID                revoke, prints the outcome
//! gpu-probe open-as UID NODE               open NODE read-write as UID
//! ```
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

fn roots(args: &[String], at: usize) -> (PathBuf, PathBuf) {
    let get = |i: usize, default: &str| PathBuf::from(args.get(i).map_or(default, String::as_str));
    (get(at, "/sys"), get(at + 1, "/dev"))
}

fn parse_u32(s: Option<&String>, what: &str) -> Result<u32, String> {
    s.ok_or_else(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("scan") => {
            let (sys, dev) = roots(args, 1);
            let inv = kiln_gpu::Inventory::scan(&sys, &dev).map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&inv).map_err(|e| e.to_string())?;
            println!("{json}");
            Ok(())
        }
        Some("watch") => {
            let secs = parse_u32(args.get(1), "SECONDS")?;
            let (sys, dev) = roots(args, 2);
            let mut w = kiln_gpu::GpuWatcher::new(&sys, &dev).map_err(|e| e.to_string())?;
            // Tells the caller the watches are in place.
            println!("watching {:?}", w.watched());
            let changed = w
                .wait(Some(Duration::from_secs(secs.into())))
                .map_err(|e| e.to_string())?;
            println!("{}", if changed { "changed" } else { "timeout" });
            Ok(())
        }
        Some(op @ ("grant" | "revoke")) => {
            let node = Path::new(args.get(1).ok_or("missing NODE")?);
            let uid = parse_u32(args.get(2), "UID")?;
            let outcome = if op == "grant" {
                format!(
                    "{:?}",
                    kiln_gpu::grant(node, uid).map_err(|e| e.to_string())?
                )
            } else {
                format!(
                    "{:?}",
                    kiln_gpu::revoke(node, uid).map_err(|e| e.to_string())?
                )
            };
            println!("{outcome}");
            Ok(())
        }
        Some("open-as") => {
            let uid = parse_u32(args.get(1), "UID")?;
            let node = args.get(2).ok_or("missing NODE")?;
            // SAFETY: plain syscalls in a single-threaded program; results checked.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(format!("setuid: {}", std::io::Error::last_os_error()));
                }
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(node)
                .map_err(|e| format!("open {node}: {e}"))?;
            println!("opened");
            Ok(())
        }
        _ => Err("usage: gpu-probe scan|watch|grant|revoke|open-as …".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
