//! A container's stdout and stderr: a bounded ring buffer with a byte
//! cursor, filled by one collector thread per container and read by
//! `ContainerLogs`.
//!
//! The cursor counts every byte the container wrote (both streams, in the
//! order the collector read them), so a host follows by passing back the
//! cursor it got; bytes that fell out of the buffer are reported as
//! `dropped` instead of silently skipped.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::process::{ChildStderr, ChildStdout};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_agent_proto::{ContainerLogEntry, LogStream};

use crate::{log, sys};

/// Bytes of bookkeeping charged per record, so a flood of one-byte writes
/// cannot grow the buffer past its budget.
const RECORD_OVERHEAD: usize = 32;
/// Consecutive writes to one stream are merged into a record up to this size.
const MAX_RECORD_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Record {
    stream: LogStream,
    /// Cursor of `data[0]`.
    start: u64,
    data: Vec<u8>,
}

/// Output kept for one container.
#[derive(Debug)]
pub struct LogRing {
    records: VecDeque<Record>,
    /// Bytes charged (data plus [`RECORD_OVERHEAD`] per record).
    used: usize,
    budget: usize,
    /// Cursor after the last byte written.
    end: u64,
    /// Both streams reached end of file.
    closed: bool,
}

/// What [`LogRing::read`] returns.
#[derive(Debug, PartialEq, Eq)]
pub struct LogRead {
    /// Output from the cursor on, one entry per run of one stream.
    pub entries: Vec<ContainerLogEntry>,
    /// Cursor after the last returned byte.
    pub cursor: u64,
    /// Bytes between `since` and the oldest byte kept.
    pub dropped: u64,
    /// Nothing more will come and everything was returned.
    pub complete: bool,
}

impl LogRing {
    /// An empty buffer keeping about `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            records: VecDeque::new(),
            used: 0,
            budget: budget.max(RECORD_OVERHEAD + 1),
            end: 0,
            closed: false,
        }
    }

    /// Appends output of `stream`, evicting the oldest bytes as needed.
    pub fn push(&mut self, stream: LogStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        // More than fits at all: only its tail can be kept.
        let keep = data.len().min(self.budget - RECORD_OVERHEAD);
        let kept = data.get(data.len() - keep..).unwrap_or_default();
        let kept_start = self
            .end
            .saturating_add(len - u64::try_from(keep).unwrap_or(0));
        self.end = self.end.saturating_add(len);
        match self.records.back_mut() {
            Some(last)
                if last.stream == stream
                    && last.start + last.data.len() as u64 == kept_start
                    && last.data.len() + kept.len() <= MAX_RECORD_BYTES =>
            {
                last.data.extend_from_slice(kept);
                self.used += kept.len();
            }
            _ => {
                self.records.push_back(Record {
                    stream,
                    start: kept_start,
                    data: kept.to_vec(),
                });
                self.used += kept.len() + RECORD_OVERHEAD;
            }
        }
        self.evict();
    }

    fn evict(&mut self) {
        while self.used > self.budget {
            let Some(first) = self.records.front_mut() else {
                self.used = 0;
                return;
            };
            let excess = self.used - self.budget;
            if excess >= first.data.len() || first.data.len() <= 1 {
                self.used -= first.data.len() + RECORD_OVERHEAD;
                self.records.pop_front();
            } else {
                first.data.drain(..excess);
                first.start += excess as u64;
                self.used -= excess;
            }
        }
    }

    /// Marks both streams finished.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Cursor of the oldest byte kept.
    fn oldest(&self) -> u64 {
        self.records.front().map_or(self.end, |r| r.start)
    }

    /// Up to `max` bytes from cursor `since` (`None`: the oldest kept). A
    /// cut in the middle of a UTF-8 character is moved before it, so the
    /// next read starts with the whole character.
    pub fn read(&self, since: Option<u64>, max: usize) -> LogRead {
        let oldest = self.oldest();
        let since = since.unwrap_or(oldest).min(self.end);
        let from = since.max(oldest);
        let dropped = from - since;
        let mut entries: Vec<ContainerLogEntry> = Vec::new();
        let mut cursor = from;
        let mut budget = max;
        for record in &self.records {
            let record_end = record.start + record.data.len() as u64;
            if record_end <= cursor {
                continue;
            }
            if budget == 0 {
                break;
            }
            // Records are contiguous; should one ever start later, skip
            // to it rather than compute a negative offset.
            cursor = cursor.max(record.start);
            let offset = usize::try_from(cursor - record.start).unwrap_or(usize::MAX);
            let Some(rest) = record.data.get(offset..) else {
                break;
            };
            let mut take = rest.len().min(budget);
            let more_follows = take < rest.len();
            if more_follows {
                take = utf8_cut(rest, take);
            }
            let Some(bytes) = rest.get(..take) else {
                break;
            };
            if bytes.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(bytes);
            match entries.last_mut() {
                Some(last) if last.stream == record.stream => last.text.push_str(&text),
                _ => entries.push(ContainerLogEntry {
                    stream: record.stream,
                    text: text.into_owned(),
                }),
            }
            cursor += take as u64;
            budget -= take;
            if more_follows {
                break;
            }
        }
        LogRead {
            entries,
            cursor,
            dropped,
            complete: self.closed && cursor == self.end,
        }
    }
}

/// Where to cut `bytes` at or before `at` without splitting a UTF-8
/// character that is complete in `bytes`; `at` itself when that would
/// leave nothing or the bytes are not UTF-8 there anyway.
fn utf8_cut(bytes: &[u8], at: usize) -> usize {
    // A character is at most 4 bytes: look back at most 3 for its start.
    for back in 1..=3.min(at) {
        let i = at - back;
        let Some(&b) = bytes.get(i) else { break };
        if b & 0xC0 != 0x80 {
            // `b` starts a character (or is ASCII): does it end after `at`?
            let width = match b {
                0x00..=0x7F => 1,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if i + width > at && i > 0 { i } else { at };
        }
    }
    at
}

/// The buffer shared by a container's collector thread and the agent.
pub type SharedLog = Arc<Mutex<LogRing>>;

/// Locks `log`, also when a collector panicked while holding it.
pub fn lock(log: &SharedLog) -> MutexGuard<'_, LogRing> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the thread that copies a container's stdout and stderr into
/// `log` until both reach end of file (every process holding them exited).
pub fn spawn_collector(stdout: ChildStdout, stderr: ChildStderr, log: SharedLog) -> io::Result<()> {
    std::thread::Builder::new()
        .name("logs".to_owned())
        .stack_size(64 * 1024)
        .spawn(move || collect(Some(stdout), Some(stderr), &log))
        .map(drop)
}

fn collect(mut stdout: Option<ChildStdout>, mut stderr: Option<ChildStderr>, log: &SharedLog) {
    let mut buf = vec![0u8; 16 * 1024];
    while stdout.is_some() || stderr.is_some() {
        let mut fds = Vec::with_capacity(2);
        for fd in [
            stdout.as_ref().map(AsRawFd::as_raw_fd),
            stderr.as_ref().map(AsRawFd::as_raw_fd),
        ]
        .into_iter()
        .flatten()
        {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Err(e) = sys::poll(&mut fds, None) {
            log::error!("container logs: poll: {e}");
            break;
        }
        let ready = |fd: Option<i32>| fds.iter().any(|p| Some(p.fd) == fd && p.revents != 0);
        if ready(stdout.as_ref().map(AsRawFd::as_raw_fd))
            && !copy(&mut stdout, LogStream::Stdout, &mut buf, log)
        {
            stdout = None;
        }
        if ready(stderr.as_ref().map(AsRawFd::as_raw_fd))
            && !copy(&mut stderr, LogStream::Stderr, &mut buf, log)
        {
            stderr = None;
        }
    }
    lock(log).close();
}

/// One read from `pipe` into the log; false once the pipe is finished.
fn copy<R: Read>(pipe: &mut Option<R>, stream: LogStream, buf: &mut [u8], log: &SharedLog) -> bool {
    let Some(reader) = pipe.as_mut() else {
        return false;
    };
    match reader.read(buf) {
        Ok(0) => false,
        Ok(n) => {
            lock(log).push(stream, buf.get(..n).unwrap_or_default());
            true
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(read: &LogRead) -> Vec<(LogStream, &str)> {
        read.entries
            .iter()
            .map(|e| (e.stream, e.text.as_str()))
            .collect()
    }

    #[test]
    fn reads_interleaved_streams_in_order_and_follows_by_cursor() {
        let mut ring = LogRing::new(1024);
        ring.push(LogStream::Stdout, b"one\n");
        ring.push(LogStream::Stdout, b"two\n");
        ring.push(LogStream::Stderr, b"oops\n");
        let all = ring.read(None, 1000);
        assert_eq!(
            texts(&all),
            [
                (LogStream::Stdout, "one\ntwo\n"),
                (LogStream::Stderr, "oops\n")
            ]
        );
        assert_eq!((all.cursor, all.dropped, all.complete), (13, 0, false));
        let nothing = ring.read(Some(all.cursor), 1000);
        assert!(nothing.entries.is_empty());
        assert_eq!(nothing.cursor, 13);
        ring.push(LogStream::Stdout, b"three\n");
        ring.close();
        let next = ring.read(Some(13), 1000);
        assert_eq!(texts(&next), [(LogStream::Stdout, "three\n")]);
        assert!(next.complete);
        assert!(!ring.read(Some(13), 2).complete, "not everything returned");
    }

    #[test]
    fn max_bytes_splits_and_the_rest_follows() {
        let mut ring = LogRing::new(1024);
        ring.push(LogStream::Stdout, b"abcdef");
        ring.push(LogStream::Stderr, b"gh");
        let first = ring.read(Some(0), 4);
        assert_eq!(texts(&first), [(LogStream::Stdout, "abcd")]);
        let second = ring.read(Some(first.cursor), 4);
        assert_eq!(
            texts(&second),
            [(LogStream::Stdout, "ef"), (LogStream::Stderr, "gh")]
        );
        assert_eq!(second.cursor, 8);
    }

    #[test]
    fn evicts_the_oldest_bytes_and_reports_them_dropped() {
        let mut ring = LogRing::new(RECORD_OVERHEAD + 10);
        ring.push(LogStream::Stdout, b"0123456789");
        ring.push(LogStream::Stdout, b"abcde");
        let read = ring.read(Some(0), 100);
        assert_eq!(texts(&read), [(LogStream::Stdout, "56789abcde")]);
        assert_eq!((read.dropped, read.cursor), (5, 15));
        // A write larger than the whole buffer keeps its tail.
        ring.push(LogStream::Stderr, &[b'x'; 100]);
        let read = ring.read(Some(15), 1000);
        assert_eq!(read.cursor, 115);
        assert!(read.dropped > 0);
        assert!(ring.used <= ring.budget);
    }

    #[test]
    fn many_small_records_stay_within_budget() {
        let mut ring = LogRing::new(4096);
        for i in 0..10_000u32 {
            let stream = if i % 2 == 0 {
                LogStream::Stdout
            } else {
                LogStream::Stderr
            };
            ring.push(stream, b"x");
        }
        assert!(ring.used <= ring.budget);
        assert_eq!(ring.end, 10_000);
        let read = ring.read(None, usize::MAX);
        assert_eq!(read.cursor, 10_000);
        assert_eq!(
            read.dropped, 0,
            "reading from the oldest kept drops nothing"
        );
    }

    #[test]
    fn a_cursor_beyond_the_end_is_the_end() {
        let mut ring = LogRing::new(100);
        ring.push(LogStream::Stdout, b"ab");
        let read = ring.read(Some(99), 10);
        assert_eq!((read.cursor, read.dropped), (2, 0));
    }

    #[test]
    fn does_not_cut_a_character_in_two() {
        let mut ring = LogRing::new(1024);
        ring.push(LogStream::Stdout, "aé€b".as_bytes()); // 1 + 2 + 3 + 1 bytes
        let first = ring.read(Some(0), 2);
        assert_eq!(texts(&first), [(LogStream::Stdout, "a")]);
        let second = ring.read(Some(first.cursor), 4);
        assert_eq!(texts(&second), [(LogStream::Stdout, "é")]);
        let third = ring.read(Some(second.cursor), 100);
        assert_eq!(texts(&third), [(LogStream::Stdout, "€b")]);
        // Too small for even one character: the bytes come anyway.
        let tiny = ring.read(Some(3), 1);
        assert_eq!(tiny.cursor, 4);
    }

    #[test]
    fn utf8_cut_points() {
        let s = "aé".as_bytes();
        assert_eq!(utf8_cut(s, 2), 1);
        assert_eq!(utf8_cut(s, 1), 1);
        assert_eq!(utf8_cut(b"abc", 2), 2);
        assert_eq!(utf8_cut(&[0xff, 0xfe, 0xfd], 2), 2);
    }
}
