//! Minimal logging to the kernel log (`/dev/kmsg`), falling back to stderr
//! (the console) before `/dev` is mounted or when not running as PID 1.
//! Never panics: a failed log write is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

static KMSG: Mutex<Option<File>> = Mutex::new(None);

/// Starts writing to `/dev/kmsg` (call once `/dev` is mounted).
pub fn use_kmsg() {
    if let Ok(file) = OpenOptions::new().write(true).open("/dev/kmsg") {
        if let Ok(mut guard) = KMSG.lock() {
            *guard = Some(file);
        }
    }
}

/// Syslog priority of a message.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    /// `KERN_ERR`: shown on the console even with `quiet`.
    Error,
    /// `KERN_INFO`: in `dmesg` only, under `quiet`.
    Info,
}

/// Writes one log record.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let prio = match level {
        Level::Error => 3,
        Level::Info => 6,
    };
    let line = format!("<{prio}>kiln-agent: {args}\n");
    if let Ok(mut guard) = KMSG.lock() {
        if let Some(kmsg) = guard.as_mut() {
            if kmsg.write_all(line.as_bytes()).is_ok() {
                return;
            }
        }
    }
    // Skip the "<N>" prefix on the console.
    let text = line.split_once('>').map_or(line.as_str(), |(_, rest)| rest);
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Logs at info level.
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Logs at error level.
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}

pub(crate) use {error, info};
