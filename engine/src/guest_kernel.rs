//! The built-in guest's kernel as an uncompressed ELF for direct (PVH)
//! boot, derived once from the bzImage kilnd ships.
//!
//! A bzImage boots through its own decompressor: under TCG the guest
//! spends about a second of every cold boot inflating its kernel (raw
//! QEMU, same argv otherwise: 4.6–5.2 s with the bzImage, 3.6–3.7 s with
//! the ELF; docs/benchmarks.md "Cold boots"). QEMU boots an ELF kernel
//! that carries a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, Debian's
//! kernels have `CONFIG_PVH=y`) directly, with nothing to decompress.
//!
//! The ELF is the bzImage's payload (`payload_offset`/`payload_length` in
//! the boot header, zstd or gzip), decompressed into
//! `<state_dir>/guest-kernels/vmlinux-<sha256 of the bzImage>` (written to
//! a temporary file and renamed, so a crash leaves no half kernel), checked
//! to be an x86-64 ELF with the PVH note. A bzImage that is not such a
//! kernel (another compression, no PVH note) is booted as it is. The path
//! goes into each VM's resolved spec, so a VM or snapshot saved with one
//! form of the kernel is restored with the same one.
//!
//! The initramfs booted with it must be a whole number of pages. For a PVH
//! kernel QEMU puts the initrd as high in low RAM as it fits, only its start
//! page-aligned, and the microvm firmware keeps the ACPI tables in the top
//! KiB of low RAM: a partial last page overlaps them and the guest finds no
//! devices (docs/benchmarks.md "Direct (PVH) boot"). `guest/image-tool.py`
//! pads the images it builds; an older image boots its bzImage.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{debug, info};

/// Kernel arguments for the built-in guest's kernels: boot work a Kiln
/// guest does not use, which under TCG was most of its kernel's time to
/// `/init` (raw QEMU, 256 MiB, 1 vCPU, PVH, guest clock; docs/benchmarks.md
/// "Kernel arguments"):
///
/// - `cryptomgr.notests`, `crypto_kdf108_init`, `jent_mod_init`: the
///   crypto self-tests and the jitter-entropy RNG's start-up sampling
///   (FIPS-mode assurances; the guest's RNG is seeded by virtio-rng and
///   by kilnd's entropy): about a second;
/// - `load_system_certificate_list`: Debian's module-signing certificates.
///   Nothing enforces module signatures in the guest (no lockdown, no
///   `module.sig_enforce`), and without them each module's RSA check is
///   skipped too: ~140 ms plus ~35 ms per module. The kernel then logs
///   "module verification failed" once and marks itself tainted (`E`);
/// - `bpf_dummy_struct_ops_init` (a BPF self-test), `bpf_tcp_ca_kfunc_init`
///   (BPF TCP congestion-control programs, which a guest then cannot
///   load) and `trace_eval_init` (enum names in trace event formats):
///   ~100 ms each.
///
/// Only for kernels kilnd ships: a caller's or an image's kernel boots
/// with its own defaults.
pub const BOOT_ARGS: &str = "cryptomgr.notests initcall_blacklist=\
    crypto_kdf108_init,jent_mod_init,load_system_certificate_list,\
    bpf_dummy_struct_ops_init,bpf_tcp_ca_kfunc_init,trace_eval_init";

/// Where derived kernels live, under the state directory.
pub const CACHE_DIR: &str = "guest-kernels";

/// The initramfs's length must be a multiple of this (see above).
const INITRD_ALIGNMENT: u64 = 4096;

/// Largest kernel hashed (a bzImage) and written (its ELF).
const MAX_BZIMAGE_BYTES: u64 = 64 << 20;
const MAX_ELF_BYTES: u64 = 512 << 20;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point.
const PVH_NOTE_TYPE: u32 = 18;

/// Why a bzImage gave no direct-boot kernel.
#[derive(Debug, thiserror::Error)]
pub enum GuestKernelError {
    /// Reading the bzImage or writing the ELF failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not a kernel this can unpack (the reason says what).
    #[error("{0}")]
    Unsupported(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> GuestKernelError + '_ {
    move |source| GuestKernelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The built-in guest's kernel `bzimage` as kilnd boots it with `initrd`:
/// unpacked for direct boot when it can be (`crate::guest_kernel`), else as
/// it is.
pub async fn as_booted(bzimage: PathBuf, initrd: &Path, state_dir: &Path) -> PathBuf {
    if !bzimage.is_file() {
        return bzimage;
    }
    let (image, initrd, state) = (
        bzimage.clone(),
        initrd.to_path_buf(),
        state_dir.to_path_buf(),
    );
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || direct_boot_kernel(&image, &initrd, &state)).await {
        Ok(Ok(elf)) => {
            debug!(kernel = %bzimage.display(), elf = %elf.display(), ms = started.elapsed().as_millis() as u64, "direct-boot kernel");
            elf
        }
        Ok(Err(e)) => {
            info!(kernel = %bzimage.display(), reason = %e, "booting the kernel as it is (no direct boot)");
            bzimage
        }
        Err(_) => bzimage,
    }
}

/// The direct-boot ELF of `bzimage` for booting with `initrd`, made under
/// `state_dir` if it is not there yet. Blocking: call off the executor.
pub fn direct_boot_kernel(
    bzimage: &Path,
    initrd: &Path,
    state_dir: &Path,
) -> Result<PathBuf, GuestKernelError> {
    let initrd_bytes = std::fs::metadata(initrd).map_err(io_error(initrd))?.len();
    if initrd_bytes % INITRD_ALIGNMENT != 0 {
        return Err(GuestKernelError::Unsupported(format!(
            "{} is {initrd_bytes} bytes, not a whole number of {INITRD_ALIGNMENT}-byte pages: \
             booted directly, its last page would overlap the ACPI tables",
            initrd.display()
        )));
    }
    // Streamed, never held whole: kilnd's heap keeps what it once held
    // (glibc returns little of it), and a bzImage is ~12 MB, its ELF ~58.
    let mut image = File::open(bzimage).map_err(io_error(bzimage))?;
    let mut hasher = Sha256::new();
    io::copy(&mut (&image).take(MAX_BZIMAGE_BYTES), &mut hasher).map_err(io_error(bzimage))?;
    let digest = crate::ids::hex(&hasher.finalize());
    let dir = state_dir.join(CACHE_DIR);
    let target = dir.join(format!("vmlinux-{digest}"));
    if target.is_file() {
        return Ok(target);
    }
    let payload = payload_of(&image, bzimage)?;
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let partial = dir.join(format!(".vmlinux-{digest}.partial"));
    // Read back too: the PVH note is checked in the file written.
    let made = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(io_error(&partial))
        .and_then(|mut elf| {
            image
                .seek(SeekFrom::Start(payload.offset))
                .map_err(io_error(bzimage))?;
            unpack(&payload, (&image).take(payload.length), &mut elf)?;
            check_pvh_elf(&elf)?;
            elf.sync_all().map_err(io_error(&partial))
        })
        .and_then(|()| std::fs::rename(&partial, &target).map_err(io_error(&target)));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(target)
}

/// Whether `kernel` is one this module made under `state_dir`.
pub fn is_unpacked(kernel: &Path, state_dir: &Path) -> bool {
    kernel.starts_with(state_dir.join(CACHE_DIR))
}

/// Remove derived kernels other than `keep` (and half-written ones).
pub fn remove_unused(state_dir: &Path, keep: &[&Path]) -> Vec<PathBuf> {
    let dir = state_dir.join(CACHE_DIR);
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if keep.iter().any(|k| *k == path) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Where a bzImage's compressed kernel is, and how it is compressed.
struct Payload {
    offset: u64,
    length: u64,
    compression: Compression,
}

enum Compression {
    /// The kernel build appends the decompressed size (4 bytes), which is
    /// no zstd frame.
    Zstd,
    Gzip,
}

/// The payload named by the boot header (`payload_offset`,
/// `payload_length`, protocol 2.08+).
fn payload_of(image: &File, path: &Path) -> Result<Payload, GuestKernelError> {
    let unsupported = |why: &str| GuestKernelError::Unsupported(why.to_owned());
    let mut header = [0u8; 0x250];
    match image.read_exact_at(&mut header, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(unsupported("not a bzImage (no HdrS boot header)"))
        }
        Err(e) => return Err(io_error(path)(e)),
    }
    if header.get(0x202..0x206) != Some(b"HdrS") {
        return Err(unsupported("not a bzImage (no HdrS boot header)"));
    }
    let version = u16_at(&header, 0x206).unwrap_or(0);
    if version < 0x208 {
        return Err(unsupported(
            "boot protocol older than 2.08 (no payload fields)",
        ));
    }
    let setup_sectors = match header.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let offset = (setup_sectors + 1) * 512 + u64::from(u32_at(&header, 0x248).unwrap_or(0));
    let length = u64::from(u32_at(&header, 0x24c).unwrap_or(0));
    let size = image.metadata().map_err(io_error(path))?.len();
    if length < 4 || offset.saturating_add(length) > size {
        return Err(unsupported("payload outside the file"));
    }
    let mut magic = [0u8; 4];
    image
        .read_exact_at(&mut magic, offset)
        .map_err(io_error(path))?;
    let (compression, length) = match magic {
        [0x28, 0xb5, 0x2f, 0xfd] => (Compression::Zstd, length - 4),
        [0x1f, 0x8b, ..] => (Compression::Gzip, length),
        _ => return Err(unsupported("payload is neither zstd nor gzip")),
    };
    Ok(Payload {
        offset,
        length,
        compression,
    })
}

/// Decompress `payload`, read from `compressed`, into `elf`.
fn unpack(
    payload: &Payload,
    compressed: impl Read,
    elf: &mut File,
) -> Result<(), GuestKernelError> {
    let too_big = || {
        GuestKernelError::Unsupported(format!(
            "the kernel unpacks to more than {MAX_ELF_BYTES} bytes"
        ))
    };
    let copied = match payload.compression {
        Compression::Zstd => zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| io::copy(&mut d.take(MAX_ELF_BYTES + 1), elf))
            .map_err(|e| GuestKernelError::Unsupported(format!("zstd payload: {e}")))?,
        Compression::Gzip => io::copy(
            &mut flate2::read::GzDecoder::new(compressed).take(MAX_ELF_BYTES + 1),
            elf,
        )
        .map_err(|e| GuestKernelError::Unsupported(format!("gzip payload: {e}")))?,
    };
    if copied > MAX_ELF_BYTES {
        return Err(too_big());
    }
    Ok(())
}

/// An x86-64 ELF with a PVH entry note, read in the few places that say
/// so (header, program headers, note segments).
fn check_pvh_elf(elf: &File) -> Result<(), GuestKernelError> {
    let unsupported = |why: &str| GuestKernelError::Unsupported(why.to_owned());
    let read_at = |offset: u64, length: u64| -> Option<Vec<u8>> {
        let mut bytes = vec![0u8; usize::try_from(length).ok()?];
        elf.read_exact_at(&mut bytes, offset).ok()?;
        Some(bytes)
    };
    let header =
        read_at(0, 64).ok_or_else(|| unsupported("payload is not a 64-bit little-endian ELF"))?;
    if header.get(..4) != Some(b"\x7fELF") || header.get(4) != Some(&2) || header.get(5) != Some(&1)
    {
        return Err(unsupported("payload is not a 64-bit little-endian ELF"));
    }
    if u16_at(&header, 18) != Some(62) {
        return Err(unsupported("payload is not an x86-64 ELF"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(&header, 32),
        u16_at(&header, 54),
        u16_at(&header, 56),
    ) else {
        return Err(unsupported("truncated ELF header"));
    };
    let (phentsize, phnum) = (u64::from(phentsize), u64::from(phnum));
    let headers = read_at(phoff, phentsize * phnum)
        .ok_or_else(|| unsupported("truncated ELF program headers"))?;
    const PT_NOTE: u32 = 4;
    /// Larger note segments are not a kernel's.
    const MAX_NOTES_BYTES: u64 = 1 << 20;
    for ph in (0..phnum).map(|i| (i * phentsize) as usize) {
        if u32_at(&headers, ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(offset), Some(size)) = (u64_at(&headers, ph + 8), u64_at(&headers, ph + 32))
        else {
            continue;
        };
        let Some(notes) = read_at(offset, size.min(MAX_NOTES_BYTES)) else {
            continue;
        };
        let mut at = 0;
        while at + 12 <= notes.len() {
            let (Some(namesz), Some(descsz), Some(kind)) = (
                u32_at(&notes, at),
                u32_at(&notes, at + 4),
                u32_at(&notes, at + 8),
            ) else {
                break;
            };
            let name = notes
                .get(at + 12..at + 12 + namesz as usize)
                .unwrap_or_default();
            if kind == PVH_NOTE_TYPE && name.starts_with(b"Xen") {
                return Ok(());
            }
            let align4 = |n: u32| (n as usize + 3) & !3;
            at += 12 + align4(namesz) + align4(descsz);
        }
    }
    Err(unsupported("the kernel has no PVH entry note (CONFIG_PVH)"))
}

/// `N` bytes at `at`, if `bytes` has them: the ELF fields are read with it.
fn bytes_at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    bytes_at(bytes, at).map(u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes_at(bytes, at).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes_at(bytes, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A minimal ELF with one PT_NOTE holding `notes`.
    fn elf_with_notes(notes: &[(u32, &[u8])]) -> Vec<u8> {
        let mut note_bytes = Vec::new();
        for (kind, name) in notes {
            note_bytes.extend((name.len() as u32).to_le_bytes());
            note_bytes.extend(4u32.to_le_bytes());
            note_bytes.extend(kind.to_le_bytes());
            note_bytes.extend(*name);
            while note_bytes.len() % 4 != 0 {
                note_bytes.push(0);
            }
            note_bytes.extend([1, 2, 3, 4]);
        }
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(note_bytes.len() as u64).to_le_bytes());
        elf.extend(note_bytes);
        elf
    }

    /// `bytes` as the kernel build packs them: zstd, then the size.
    fn zstd_payload(bytes: &[u8]) -> Vec<u8> {
        let mut payload = zstd::encode_all(bytes, 3).unwrap();
        payload.extend((bytes.len() as u32).to_le_bytes());
        payload
    }

    /// A bzImage-shaped file whose payload is `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 5 * 512];
        image[0x1f1] = 4;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend([0u8; 16]);
        image.extend(payload);
        image
    }

    #[test]
    fn a_zstd_bzimage_with_a_pvh_note_becomes_its_elf_once() {
        let elf = elf_with_notes(&[(6, b"Xen\0"), (PVH_NOTE_TYPE, b"Xen\0")]);
        let payload = zstd_payload(&elf);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, bzimage(&payload)).unwrap();
        let state = dir.path().join("state");
        let initrd = dir.path().join("initramfs");
        std::fs::write(&initrd, vec![0u8; 2 * 4096]).unwrap();
        let derived = direct_boot_kernel(&kernel, &initrd, &state).unwrap();
        assert_eq!(std::fs::read(&derived).unwrap(), elf);
        assert!(derived.starts_with(state.join(CACHE_DIR)));
        // Cached: the same path, not rewritten.
        let modified = std::fs::metadata(&derived).unwrap().modified().unwrap();
        assert_eq!(
            direct_boot_kernel(&kernel, &initrd, &state).unwrap(),
            derived
        );
        assert_eq!(
            std::fs::metadata(&derived).unwrap().modified().unwrap(),
            modified
        );
        // Another kernel gets its own file; the unused one can go.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let other = dir.path().join("vmlinuz-2");
        std::fs::write(&other, bzimage(&gz.finish().unwrap())).unwrap();
        let second = direct_boot_kernel(&other, &initrd, &state).unwrap();
        assert_ne!(second, derived);
        assert_eq!(remove_unused(&state, &[&second]), vec![derived.clone()]);
        assert!(!derived.exists() && second.exists());
    }

    #[test]
    fn kernels_it_cannot_boot_directly_are_refused_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let initrd = dir.path().join("initramfs");
        std::fs::write(&initrd, vec![0u8; 4096]).unwrap();
        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("plain", b"not a kernel at all".repeat(100), "no HdrS"),
            (
                "xz",
                bzimage(b"\xfd7zXZ\0 xz data"),
                "neither zstd nor gzip",
            ),
            (
                "no-pvh",
                bzimage(&zstd_payload(&elf_with_notes(&[(6, b"Xen\0")]))),
                "no PVH entry note",
            ),
            (
                "not-elf",
                bzimage(&zstd_payload(b"garbage")),
                "not a 64-bit",
            ),
        ];
        for (name, bytes, why) in cases {
            let kernel = dir.path().join(name);
            std::fs::write(&kernel, bytes).unwrap();
            let error = direct_boot_kernel(&kernel, &initrd, &state)
                .unwrap_err()
                .to_string();
            assert!(error.contains(why), "{name}: {error}");
        }
        // A good kernel with an initramfs that ends inside a page.
        let good = dir.path().join("good");
        let elf = elf_with_notes(&[(PVH_NOTE_TYPE, b"Xen\0")]);
        std::fs::write(&good, bzimage(&zstd_payload(&elf))).unwrap();
        let ragged = dir.path().join("ragged");
        std::fs::write(&ragged, vec![0u8; 4096 + 2560]).unwrap();
        let error = direct_boot_kernel(&good, &ragged, &state)
            .unwrap_err()
            .to_string();
        assert!(error.contains("6656 bytes, not a whole number"), "{error}");
        assert!(std::fs::read_dir(state.join(CACHE_DIR)).map_or(true, |mut d| d.next().is_none()));
        assert!(matches!(
            direct_boot_kernel(&dir.path().join("missing"), &initrd, &state),
            Err(GuestKernelError::Io { .. })
        ));
    }
}
