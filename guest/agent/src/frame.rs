//! Splits the byte stream of the port into NUL-terminated varlink frames.

/// One complete frame taken from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A message, without its NUL terminator. Never empty.
    Message(Vec<u8>),
    /// A message longer than the limit; its bytes were discarded up to and
    /// including its terminator.
    TooLarge,
}

/// Accumulates bytes and yields complete frames.
///
/// A message may use at most `max` bytes, its terminator included. Longer
/// ones are not buffered: their bytes are dropped as they arrive and a single
/// [`Frame::TooLarge`] is yielded when the terminator finally shows up, so the
/// caller can still answer that call in order. Empty frames (a lone NUL) are
/// skipped: a host may send one to terminate whatever partial frame an
/// earlier connection left behind.
#[derive(Debug)]
pub struct FrameSplitter {
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl FrameSplitter {
    /// A splitter accepting messages of at most `max` bytes, NUL included.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(1),
            discarding: false,
        }
    }

    /// Feeds `data`, appending every frame it completes to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while !data.is_empty() {
            let (chunk, terminated, rest) = match data.iter().position(|&b| b == 0) {
                Some(i) => (&data[..i], true, &data[i + 1..]),
                None => (data, false, &data[data.len()..]),
            };
            data = rest;
            if !self.discarding && self.buf.len() + chunk.len() < self.max {
                self.buf.extend_from_slice(chunk);
            } else {
                self.discarding = true;
                self.buf = Vec::new();
            }
            if terminated {
                if self.discarding {
                    out.push(Frame::TooLarge);
                } else if !self.buf.is_empty() {
                    out.push(Frame::Message(std::mem::take(&mut self.buf)));
                }
                self.discarding = false;
            }
        }
    }

    /// Drops any partial frame (the host disconnected in the middle of one).
    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.discarding = false;
    }

    /// Whether bytes of an unfinished frame are pending.
    pub fn has_partial(&self) -> bool {
        self.discarding || !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, pieces: &[&[u8]]) -> Vec<Frame> {
        let mut splitter = FrameSplitter::new(max);
        let mut out = Vec::new();
        for piece in pieces {
            splitter.push(piece, &mut out);
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_several_frames_in_one_read() {
        assert_eq!(
            split(100, &[b"{\"a\":1}\0{\"b\":2}\0"]),
            [msg("{\"a\":1}"), msg("{\"b\":2}")]
        );
    }

    #[test]
    fn joins_a_frame_split_across_reads() {
        assert_eq!(split(100, &[b"{\"a\"", b":1", b"}\0{"]), [msg("{\"a\":1}")]);
    }

    #[test]
    fn skips_empty_frames() {
        assert_eq!(split(100, &[b"\0\0x\0\0"]), [msg("x")]);
    }

    #[test]
    fn limit_counts_the_terminator() {
        // 4 bytes + NUL = 5 = max: accepted; 5 bytes + NUL: too large.
        assert_eq!(split(5, &[b"abcd\0"]), [msg("abcd")]);
        assert_eq!(split(5, &[b"abcde\0"]), [Frame::TooLarge]);
    }

    #[test]
    fn discards_an_oversized_frame_until_its_terminator() {
        let frames = split(5, &[b"abc", b"defgh", b"ijk\0ok\0"]);
        assert_eq!(frames, [Frame::TooLarge, msg("ok")]);
    }

    #[test]
    fn reset_drops_a_partial_frame() {
        let mut splitter = FrameSplitter::new(100);
        let mut out = Vec::new();
        splitter.push(b"{\"method\":\"io.ki", &mut out);
        assert!(splitter.has_partial());
        splitter.reset();
        assert!(!splitter.has_partial());
        splitter.push(b"x\0", &mut out);
        assert_eq!(out, [msg("x")]);
    }
}
