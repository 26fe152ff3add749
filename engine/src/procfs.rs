//! Reading the `key: value` files of `/proc` (`status`, `smaps_rollup`,
//! `io`, `limits`).

/// The first number after `key` on the line that starts with it (`Rss:`,
/// `read_bytes:`, `Max open files`); 0 when there is none.
pub fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_the_first_number_after_their_key() {
        let status = "Name:\tkilnd\nVmRSS:\t   10240 kB\nThreads:\t4\n";
        assert_eq!(field(status, "VmRSS:"), 10240);
        assert_eq!(field(status, "Threads:"), 4);
        assert_eq!(field(status, "VmSwap:"), 0);
        assert_eq!(
            field("Max open files  1024  4096  files\n", "Max open files"),
            1024
        );
    }
}
