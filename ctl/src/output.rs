//! What kilnctl prints: tables that fit the terminal, `Key: value` blocks,
//! JSON as kilnd sent it, and times.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::terminal;

/// The width tables must fit: `COLUMNS` when set (as systemd's tools read
/// it), else the terminal's when stdout is one; None (never truncate) when
/// stdout is a pipe or a file, so scripts get whole values.
pub fn terminal_width() -> Option<usize> {
    if let Some(columns) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|&c| c > 0)
    {
        return Some(columns);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    window_columns(libc::STDOUT_FILENO)
}

/// The width of the terminal on stderr, where progress is drawn; None
/// when stderr is not a terminal.
pub fn stderr_width() -> Option<usize> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    window_columns(libc::STDERR_FILENO).or(Some(80))
}

/// The columns of the terminal on `fd`, if the kernel knows them.
fn window_columns(fd: libc::c_int) -> Option<usize> {
    terminal::size(fd).map(|size| usize::from(size.cols))
}

/// One column: its header, and whether it may be cut to fit (names,
/// errors) or must stay whole (ids, numbers, states).
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub shrink: bool,
}

/// Rows under headers, columns two spaces apart.
#[derive(Debug)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

/// A cut column keeps at least this many characters (the ellipsis
/// included).
const MIN_SHRUNK: usize = 6;
const GAP: usize = 2;

impl Table {
    pub fn new(columns: &[Column]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, fitted into `width` columns when given: the
    /// widest shrinkable column loses a character at a time until the
    /// table fits or every shrinkable column is at its minimum.
    pub fn render(&self, width: Option<usize>) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|cell| chars(cell))
                    .chain([chars(c.header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        if let Some(limit) = width {
            let total = |w: &[usize]| w.iter().sum::<usize>() + GAP * w.len().saturating_sub(1);
            while total(&widths) > limit {
                let widest = (0..widths.len())
                    .filter(|&i| {
                        self.columns[i].shrink
                            && widths[i] > MIN_SHRUNK.max(chars(self.columns[i].header))
                    })
                    .max_by_key(|&i| widths[i]);
                match widest {
                    Some(i) => widths[i] -= 1,
                    None => break,
                }
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.columns.iter().map(|c| c.header.to_owned()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = fit(row.get(i).map(String::as_str).unwrap_or(""), *width);
                if i + 1 < widths.len() {
                    line.push_str(&format!("{cell:<width$}"));
                    line.push_str(&" ".repeat(GAP));
                } else {
                    line.push_str(&cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// `text` cut to `width` characters, the cut marked with an ellipsis.
pub fn fit(text: &str, width: usize) -> String {
    if chars(text) <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `Key: value` lines, keys aligned; empty values are left out.
#[derive(Debug, Default)]
pub struct Fields {
    lines: Vec<(&'static str, String)>,
}

impl Fields {
    pub fn add(&mut self, key: &'static str, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() {
            self.lines.push((key, value));
        }
    }

    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(k, _)| chars(k)).max().unwrap_or(0);
        self.lines
            .iter()
            .map(|(k, v)| format!("{:>width$}: {v}\n", k))
            .collect()
    }
}

/// Print a reply as JSON: pretty for one object, as `varlinkctl` does.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A size in bytes for people, in at most four digits: `512 B`,
/// `1.5 KiB`, `4.0 MiB` (1000 KiB is `1.0 MiB`), `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // 999.95 and up would print as 1000.0.
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// CPU time (microseconds) for people: `0.84s`, `59.99s`, `5min 03s`,
/// `2h 05min`; cut, not rounded, so 59.999 s is not `60.00s`.
pub fn cpu_time(us: u64) -> String {
    let secs = us / 1_000_000;
    match secs {
        0..60 => format!("{secs}.{:02}s", us / 10_000 % 100),
        60..3600 => format!("{}min {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}min", secs / 3600, secs / 60 % 60),
    }
}

/// The 12 hex digits that stand for a digest in tables (as docker's image
/// ids): `sha256:3fa2c1d0e4b5…` is `3fa2c1d0e4b5`.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.chars().take(12).collect()
}

/// A command line as a shell would take it back: words that need it in
/// single quotes (`sh -c 'echo hi'`).
pub fn shell_words(words: &[&str]) -> String {
    let quote = |word: &&str| {
        let plain = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
        if plain {
            (*word).to_owned()
        } else {
            format!("'{}'", word.replace('\'', "'\\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Microseconds since the epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `2026-05-01 12:00:03 UTC` for a timestamp in microseconds.
pub fn utc(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day
/// count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How long ago (or from now) `us` is: `3s ago`, `5min ago`, `in 2h`.
pub fn relative(us: u64, now: u64) -> String {
    let (span, past) = if us <= now {
        (now - us, true)
    } else {
        (us - now, false)
    };
    let secs = span / 1_000_000;
    let text = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}min", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if past {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let column = |header, shrink| Column { header, shrink };
        let mut t = Table::new(&[
            column("ID", false),
            column("NAME", true),
            column("STATE", false),
            column("ERROR", true),
        ]);
        t.row(vec![
            "3fa2c1d0e4b5".into(),
            "a-rather-long-vm-name".into(),
            "ready".into(),
            "the template build failed because the kernel is missing".into(),
        ]);
        t.row(vec![
            "0011aa22bb33".into(),
            "db".into(),
            "stopped".into(),
            "-".into(),
        ]);
        t
    }

    #[test]
    fn tables_align_and_keep_whole_values_without_a_width() {
        let text = table().render(None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID            NAME                   STATE    ERROR"
        );
        assert!(lines[1].ends_with("kernel is missing"), "{text}");
        assert_eq!(lines[2], "0011aa22bb33  db                     stopped  -");
    }

    #[test]
    fn tables_fit_the_width_by_cutting_flexible_columns() {
        let text = table().render(Some(60));
        for line in text.lines() {
            assert!(line.chars().count() <= 60, "{line:?} in\n{text}");
        }
        assert!(text.contains("3fa2c1d0e4b5"), "ids stay whole:\n{text}");
        assert!(text.contains('…'), "{text}");
        // Too narrow for even the fixed columns: cut what can be cut, no panic.
        let text = table().render(Some(10));
        assert!(text.contains("3fa2c1d0e4b5"));
    }

    #[test]
    fn fit_marks_the_cut() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdefg", 6), "abcde…");
        assert_eq!(fit("äöüäöüä", 4), "äöü…");
    }

    #[test]
    fn times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199_000_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(utc(1_767_225_600_000_000), "2026-01-01 00:00:00 UTC");
        let now = 10_000_000_000;
        assert_eq!(relative(now - 3_000_000, now), "3s ago");
        assert_eq!(relative(now - 300_000_000, now), "5min ago");
        assert_eq!(relative(now + 7_200_000_000, now), "in 2h");
    }

    #[test]
    fn sizes_digests_and_words() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1000), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1_027_789), "1.0 MiB");
        assert_eq!(bytes(4 << 20), "4.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(cpu_time(840_000), "0.84s");
        assert_eq!(cpu_time(59_999_999), "59.99s");
        assert_eq!(cpu_time(183_000_000), "3min 03s");
        assert_eq!(cpu_time(7_500_000_000), "2h 05min");
        assert_eq!(short_digest("sha256:3fa2c1d0e4b5aabbcc"), "3fa2c1d0e4b5");
        assert_eq!(short_digest("abc"), "abc");
        assert_eq!(
            shell_words(&["/bin/sh", "-c", "echo it's $HOME", ""]),
            r#"/bin/sh -c 'echo it'\''s $HOME' ''"#
        );
    }

    #[test]
    fn fields_align_their_keys() {
        let mut f = Fields::default();
        f.add("Id", "abc");
        f.add("Pool", "");
        f.add("State", "ready");
        assert_eq!(f.render(), "   Id: abc\nState: ready\n");
    }
}
