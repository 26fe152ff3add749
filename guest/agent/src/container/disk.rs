//! Disks found by serial, never by `/dev/sdX` order.
//!
//! The serial is what the host gave QEMU: a `scsi-hd`'s `serial=` comes back
//! in the SCSI Unit Serial Number VPD page the kernel exposes as
//! `/sys/block/sdX/device/vpd_pg80` (a 4-byte header, then the serial); a
//! `virtio-blk` disk's as `/sys/block/vdX/serial`. There is no udev in the
//! guest: a hot-plugged disk is waited for by listening to kernel uevents
//! (`NETLINK_KOBJECT_UEVENT`) and rescanning `/sys/block` on each, plus a
//! slow periodic rescan in case an event was lost. The device node is made
//! by the agent from the disk's `major:minor`, so devtmpfs timing does not
//! matter either.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys;

/// Where block devices are listed.
pub const SYS_BLOCK: &str = "/sys/block";
/// Rescan interval when no uevent arrives (or no uevent socket exists).
const RESCAN: Duration = Duration::from_millis(250);

/// A disk the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`sda`).
    pub name: String,
    /// Device number.
    pub major: u32,
    /// Device number.
    pub minor: u32,
}

/// The serial in a VPD page 0x80 (`[qualifier, 0x80, len_hi, len_lo,
/// serial...]`), without the padding some devices add.
pub fn parse_vpd_pg80(page: &[u8]) -> Option<String> {
    let (&code, rest) = page.get(1..)?.split_first()?;
    if code != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let serial = rest.get(2..)?;
    let serial = serial.get(..len.min(serial.len()))?;
    let text = std::str::from_utf8(serial).ok()?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    (!text.is_empty()).then(|| text.to_owned())
}

/// The serial of the block device whose sysfs directory is `dir`.
fn serial_of(dir: &Path) -> Option<String> {
    if let Ok(page) = fs::read(dir.join("device/vpd_pg80")) {
        return parse_vpd_pg80(&page);
    }
    let serial = fs::read_to_string(dir.join("serial")).ok()?;
    let serial = serial.trim();
    (!serial.is_empty()).then(|| serial.to_owned())
}

/// `major:minor` as in a sysfs `dev` file.
pub fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Every disk under `sys_block` with its serial.
pub fn scan(sys_block: &Path) -> Vec<(String, Disk)> {
    let Ok(entries) = fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(serial) = serial_of(&dir) else {
            continue;
        };
        let Some((major, minor)) = fs::read_to_string(dir.join("dev"))
            .ok()
            .as_deref()
            .and_then(parse_dev)
        else {
            continue;
        };
        found.push((
            serial,
            Disk {
                name: entry.file_name().to_string_lossy().into_owned(),
                major,
                minor,
            },
        ));
    }
    found
}

/// Waits until a disk with each of `serials` is present, at most
/// `timeout`; `Err(serial)` names the first one still missing then. Two
/// disks with one serial: the lowest kernel name wins (and the host has a
/// bug).
pub fn wait_for(serials: &[&str], timeout: Duration) -> Result<Vec<Disk>, String> {
    let deadline = Instant::now() + timeout;
    // Listening before the first scan: a disk that appears in between
    // still wakes us.
    let events = UeventSocket::open().ok();
    loop {
        let mut all = scan(Path::new(SYS_BLOCK));
        all.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let mut disks = Vec::with_capacity(serials.len());
        let mut missing = None;
        for serial in serials {
            match all.iter().find(|(s, _)| s == serial) {
                Some((_, disk)) => disks.push(disk.clone()),
                None => {
                    missing.get_or_insert(*serial);
                }
            }
        }
        let Some(missing) = missing else {
            return Ok(disks);
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(missing.to_owned());
        }
        let pause = deadline.saturating_duration_since(now).min(RESCAN);
        match &events {
            Some(socket) => socket.wait(pause),
            None => std::thread::sleep(pause.min(Duration::from_millis(20))),
        }
    }
}

/// Makes a block device node for `disk` at `path` (replacing a stale one).
pub fn make_node(path: &Path, disk: &Disk) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    sys::mknod_block(path, disk.major, disk.minor)
}

/// Opens the disk behind `node` read-only, waiting up to `timeout` while
/// the kernel is still adding it: `/sys/block/sdX` appears when the disk
/// is registered, but opening it fails with `ENXIO` until the kernel has
/// set up the block device and scanned its partitions (tens of
/// milliseconds under TCG, seen right after a hot-plug).
pub fn open_when_ready(node: &Path, timeout: Duration) -> io::Result<File> {
    let deadline = Instant::now() + timeout;
    loop {
        match File::open(node) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// `EROFS_SUPER_MAGIC_V1` at byte 1024 (little endian).
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const EROFS_SUPER_OFFSET: u64 = 1024;

/// Whether `file` (a device or an image) starts with an erofs superblock.
pub fn is_erofs(file: &mut File) -> io::Result<bool> {
    file.seek(SeekFrom::Start(EROFS_SUPER_OFFSET))?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(u32::from_le_bytes(magic) == EROFS_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A kernel uevent listener, used only as a wake-up: the events are not
/// parsed (sysfs is the truth).
#[derive(Debug)]
struct UeventSocket(OwnedFd);

impl UeventSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let socket = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = 1; // the kernel's uevent multicast group
                            // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        let ret = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Sleeps until an event arrives or `timeout` passes, then drains the
    /// queued events.
    fn wait(&self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if sys::poll(&mut fds, Some(timeout)).is_err() {
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
            return;
        }
        let mut buf = [0u8; 4096];
        for _ in 0..64 {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vpd_page_0x80() {
        assert_eq!(
            parse_vpd_pg80(b"\x00\x80\x00\x07layer-0"),
            Some("layer-0".into())
        );
        assert_eq!(
            parse_vpd_pg80(b"\x00\x80\x00\x0a  abc   \x00\x00"),
            Some("abc".into())
        );
        // A length past the data is clamped; a wrong page code is refused.
        assert_eq!(parse_vpd_pg80(b"\x00\x80\x00\xffxy"), Some("xy".into()));
        assert_eq!(parse_vpd_pg80(b"\x00\x83\x00\x02xy"), None);
        assert_eq!(parse_vpd_pg80(b"\x00\x80\x00\x00"), None);
        assert_eq!(parse_vpd_pg80(b"\x00\x80"), None);
        assert_eq!(parse_vpd_pg80(b""), None);
    }

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev("8:16\n"), Some((8, 16)));
        assert_eq!(parse_dev("8"), None);
        assert_eq!(parse_dev("a:b"), None);
    }

    #[test]
    fn scans_a_fake_sysfs() {
        let dir = std::env::temp_dir().join(format!("kiln-agent-disk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let add = |name: &str, dev: &str, vpd: Option<&[u8]>, serial: Option<&str>| {
            let d = dir.join(name);
            fs::create_dir_all(d.join("device")).expect("mkdir");
            fs::write(d.join("dev"), dev).expect("dev");
            if let Some(vpd) = vpd {
                fs::write(d.join("device/vpd_pg80"), vpd).expect("vpd");
            }
            if let Some(serial) = serial {
                fs::write(d.join("serial"), serial).expect("serial");
            }
        };
        add("sda", "8:0\n", Some(b"\x00\x80\x00\x02l1"), None);
        add("sdb", "8:16\n", Some(b"\x00\x80\x00\x02l0"), None);
        add("vda", "254:0\n", None, Some("upper\n"));
        add("loop0", "7:0\n", None, None);
        let mut found = scan(&dir);
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<(&str, &str, u32, u32)> = found
            .iter()
            .map(|(s, d)| (s.as_str(), d.name.as_str(), d.major, d.minor))
            .collect();
        assert_eq!(
            names,
            [
                ("l0", "sdb", 8, 16),
                ("l1", "sda", 8, 0),
                ("upper", "vda", 254, 0)
            ]
        );
        assert!(scan(&dir.join("absent")).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn recognises_erofs() {
        let dir = std::env::temp_dir().join(format!("kiln-agent-erofs-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let mut image = vec![0u8; 2048];
        image[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        fs::write(dir.join("good"), &image).expect("write");
        fs::write(dir.join("bad"), vec![0u8; 2048]).expect("write");
        fs::write(dir.join("short"), b"tiny").expect("write");
        let check = |name: &str| {
            let mut file = open_when_ready(&dir.join(name), Duration::from_millis(10))?;
            is_erofs(&mut file)
        };
        assert!(check("good").expect("read"));
        assert!(!check("bad").expect("read"));
        assert!(!check("short").expect("read"));
        assert!(check("missing").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_serial_times_out_in_bounded_time() {
        let start = Instant::now();
        assert_eq!(
            wait_for(&["kiln-test-no-such-serial"], Duration::from_millis(300)),
            Err("kiln-test-no-such-serial".to_owned())
        );
        assert!(start.elapsed() < Duration::from_secs(3));
        assert_eq!(wait_for(&[], Duration::ZERO), Ok(Vec::new()));
    }
}
