//! Keeping kilnd's resident memory to what it uses (docs/benchmarks.md,
//! "Daemon cost").
//!
//! An idle kilnd's RSS was mostly pages it did not use:
//!
//! - **Text mapped around faults.** A fault on a file mapping maps the
//!   neighbouring pages that are in the page cache too (fault-around,
//!   whole large folios): start-up and each kind of request run scattered
//!   functions of kilnd's 7 MB of text, so most of it ended up mapped.
//! - **Pages used once.** Start-up code, the dynamic loader's relocation
//!   and symbol tables (OpenSSL's are large), code of calls made hours
//!   ago, and free heap memory glibc keeps in its arenas.
//!
//! [`settle`] unmaps the pages of read-only file mappings no one has
//! written to (they stay in the page cache; what runs next faults back in)
//! and gives free heap pages back (`malloc_trim`). [`settle_when_quiet`]
//! runs it once kilnd is ready and whenever the engine has been quiet for a
//! while (after start-up and after every burst of work), so a busy kilnd
//! never pays the faults back in the middle of a burst.
//! (`MADV_RANDOM` was tried first: on this kernel it does not stop a fault
//! from mapping its neighbours, only read-ahead.)

use std::time::Duration;

use kiln_engine::EngineEvent;
use tokio::sync::broadcast::{self, error::RecvError};

/// How long the engine must be quiet before kilnd settles again.
pub const QUIET_FOR: Duration = Duration::from_secs(5);

/// How long an idle blocking-pool thread lives: less than [`QUIET_FOR`].
pub const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// What one [`settle`] did, for the debug log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Read-only file mappings whose pages were unmapped.
    pub unmapped: usize,
    /// Resident KiB of those mappings before.
    pub unmapped_kib: u64,
}

/// One mapping of `/proc/self/smaps`, as far as settling needs it.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// `w` in the permissions.
    writable: bool,
    /// `p` (private, copy-on-write) rather than `s`.
    private: bool,
    /// Backed by a file (inode ≠ 0): not heap, stack, vdso.
    file_backed: bool,
    /// `Rss:` KiB.
    rss_kib: u64,
    /// `Anonymous:` KiB: pages copied on write (relocated data). Unmapping
    /// those would lose what was written, so such a mapping is kept.
    anonymous_kib: u64,
}

impl Mapping {
    /// Whether its resident pages are clean copies of the file: unmapping
    /// them loses nothing, the next access reads the page cache again.
    fn is_clean_file_copy(&self) -> bool {
        self.file_backed && self.private && !self.writable && self.anonymous_kib == 0
    }
}

/// Parses the mappings of an smaps text; lines it does not know are skipped.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            let (Some(last), Some(kib)) = (
                mappings.last_mut(),
                fields.next().and_then(|v| v.parse().ok()),
            ) else {
                continue;
            };
            match key {
                "Rss" => last.rss_kib = kib,
                "Anonymous" => last.anonymous_kib = kib,
                _ => {}
            }
            continue;
        }
        // A header: `start-end perms offset dev inode [path]`.
        let Some((start, end)) = first.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let perms = fields.next().unwrap_or("");
        let inode = fields.nth(2).unwrap_or("0");
        mappings.push(Mapping {
            start,
            end,
            writable: perms.contains('w'),
            private: perms.ends_with('p'),
            file_backed: inode != "0",
            rss_kib: 0,
            anonymous_kib: 0,
        });
    }
    mappings
}

/// Settles this process's memory (see the module docs). Best effort: a
/// mapping the kernel refuses to unmap is left as it is.
pub fn settle() -> std::io::Result<Settled> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut settled = Settled::default();
    let clean = parse_smaps(&smaps)
        .into_iter()
        .filter(|m| m.is_clean_file_copy() && m.rss_kib > 0);
    for m in clean {
        let (addr, len) = (m.start as *mut libc::c_void, m.end - m.start);
        // SAFETY: a whole mapping of this process as the kernel listed it,
        // private, read-only and without copied-on-write pages, so its
        // pages are the file's (see `is_clean_file_copy`): the next access
        // faults the same bytes back in.
        if unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } == 0 {
            settled.unmapped += 1;
            settled.unmapped_kib += m.rss_kib;
        }
    }
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    Ok(settled)
}

/// Settles now (start-up's pages) and after each quiet spell: [`QUIET_FOR`]
/// without an engine event, the first one counted from the call (start-up
/// is activity too: its blocking threads are still to exit). Any event
/// counts, not only a VM's change of state. Returns when the engine is
/// gone.
pub async fn settle_when_quiet(mut events: broadcast::Receiver<EngineEvent>) {
    settle_and_log();
    loop {
        loop {
            match tokio::time::timeout(QUIET_FOR, events.recv()).await {
                Err(_quiet) => break,
                Ok(Err(RecvError::Closed)) => return,
                // Lagging behind is activity too: many events came at once.
                Ok(_) => {}
            }
        }
        settle_and_log();
        if let Err(RecvError::Closed) = events.recv().await {
            return;
        }
    }
}

/// [`settle`] on the calling thread (a millisecond or two: reading smaps
/// and a few madvise calls), logged at debug.
pub fn settle_and_log() {
    match settle() {
        Ok(s) => tracing::debug!(
            unmapped = s.unmapped,
            unmapped_kib = s.unmapped_kib,
            "memory settled"
        ),
        Err(e) => tracing::debug!(error = %e, "cannot settle memory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:01 1311 /usr/bin/kilnd
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55d0c0b00000-55d0c1200000 r-xp 00100000 fd:01 1311 /usr/bin/kilnd
Rss:                4096 kB
Anonymous:             0 kB
55d0c1200000-55d0c1300000 r--p 00800000 fd:01 1311 /usr/bin/kilnd
Rss:                 300 kB
Anonymous:           120 kB
55d0c1300000-55d0c1310000 rw-p 00900000 fd:01 1311 /usr/bin/kilnd
Rss:                  64 kB
Anonymous:            64 kB
55d0c2000000-55d0c2400000 rw-p 00000000 00:00 0 [heap]
Rss:                2048 kB
Anonymous:          2048 kB
7f0000000000-7f0000001000 rw-s 00000000 00:01 77 /memfd:x (deleted)
Rss:                   4 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
";

    #[test]
    fn only_unwritten_read_only_file_pages_are_unmapped() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 7);
        let clean: Vec<(usize, u64)> = mappings
            .iter()
            .filter(|m| m.is_clean_file_copy())
            .map(|m| (m.start, m.rss_kib))
            .collect();
        // The headers and tables, and the text; not the relocated
        // read-only data (written before it was made read-only), the data,
        // the heap, a shared memfd or the vdso.
        assert_eq!(
            clean,
            vec![(0x55d0_c0a0_0000, 512), (0x55d0_c0b0_0000, 4096)]
        );
        assert_eq!(mappings.iter().filter(|m| m.file_backed).count(), 5);
    }

    #[tokio::test]
    async fn the_settler_ends_with_the_engine() {
        let (events, receiver) = broadcast::channel(4);
        let settler = tokio::spawn(settle_when_quiet(receiver));
        // Activity keeps it waiting; the engine going away ends it at
        // once, quiet spell or not.
        events
            .send(EngineEvent::PoolRemoved { name: "p".into() })
            .unwrap();
        drop(events);
        tokio::time::timeout(Duration::from_secs(2), settler)
            .await
            .expect("the settler outlived the engine")
            .unwrap();
    }

    #[test]
    fn unknown_and_broken_lines_are_skipped() {
        let mappings = parse_smaps("garbage\nRss: 4 kB\nzz-yy r--p 0 0:0 1 /x\n\n");
        assert!(mappings.is_empty());
    }

    #[test]
    fn settling_this_process_keeps_it_working() {
        // The test binary's own text and libraries are unmapped under it
        // and fault back in: it goes on running.
        let clean_kib = || -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            parse_smaps(&smaps)
                .iter()
                .filter(|m| m.is_clean_file_copy())
                .map(|m| m.rss_kib)
                .sum()
        };
        let before = clean_kib();
        let settled = settle().unwrap();
        assert!(settled.unmapped > 0, "{settled:?}");
        assert!(
            settled.unmapped_kib >= before / 2,
            "{settled:?}, {before} KiB"
        );
        let after = clean_kib();
        assert!(
            after < before,
            "{before} KiB resident before, {after} KiB after"
        );
        // Nothing written meanwhile: settling again finds the same kind
        // of mappings, and the process still runs.
        assert!(settle().is_ok());
    }
}
