//! Writing `newc` cpio archives, the format the Linux kernel unpacks as an
//! initramfs. Kiln only ever appends small archives to its own initramfs
//! (the kernel unpacks concatenated archives in order, later entries over
//! earlier ones), so this writes directories and regular files, nothing
//! else: twenty lines of a format fixed since 1990, not worth a crate.

/// A `newc` archive being built in memory.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory (0755, root). Give parents before children: the kernel
    /// does not create missing parents.
    pub fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, &[]);
    }

    /// Every parent of `path` (relative, `/`-separated), outermost first.
    pub fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            self.dir(&path[..end]);
            end += 1;
        }
    }

    /// A regular file with `mode` (permission bits), owned by root.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | (mode & 0o7777), data);
    }

    /// The archive, with its `TRAILER!!!`.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.next_inode += 1;
        let name_size = path.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name_size,
            0, // check
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data are each padded to 4 bytes.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data) of each entry, read the way the kernel does.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let field = |at: usize, i: usize| {
            let hex = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).expect("hex");
            usize::from_str_radix(hex, 16).expect("field")
        };
        let (mut at, mut out) = (0, Vec::new());
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let (mode, size, name_size) = (field(at, 1), field(at, 6), field(at, 11));
            let name = &bytes[at + 110..at + 110 + name_size - 1];
            let data_at = (at + 110 + name_size).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            out.push((
                String::from_utf8(name.to_vec()).expect("name"),
                mode as u32,
                data,
            ));
            at = (data_at + size).next_multiple_of(4);
        }
        out
    }

    #[test]
    fn writes_parents_files_and_a_trailer() {
        let mut archive = Archive::new();
        archive.parents("etc/kiln/os.json");
        archive.file("etc/kiln/os.json", 0o644, b"{}\n");
        archive.file("etc/kiln/empty", 0o600, b"");
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        let got = entries(&bytes);
        let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/kiln",
                "etc/kiln/os.json",
                "etc/kiln/empty",
                "TRAILER!!!"
            ]
        );
        assert_eq!(got[0].1, 0o040_755);
        assert_eq!((got[2].1, got[2].2.as_slice()), (0o100_644, &b"{}\n"[..]));
    }
}
