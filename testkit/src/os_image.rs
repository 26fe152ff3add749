//! An OS image for `VMSpec.boot: "image"`: an OCI image that carries its
//! own kernel and boots systemd as init, built byte for byte from files on
//! this machine (nothing comes from the internet).
//!
//! Two layers, lowest first:
//!
//! - the kernel layer: the Debian generic kernel `make guest` unpacked for
//!   the GPU guest (`boot/vmlinuz-<release>`) and, under
//!   `usr/lib/modules/<release>/`, only the module files (`.ko.xz`, at
//!   their real paths) of the closure of [`MODULES`], with the index files
//!   depmod would write for them (`modules.dep`, `modules.softdep`,
//!   `modules.alias`) and the kernel's `modules.builtin`;
//! - the OS layer, merged-/usr Debian style: the host's systemd (PID 1,
//!   `systemd-executor`, `systemctl`) with every shared library `ldd`
//!   names, `usr/sbin/init -> ../lib/systemd/systemd`, busybox-static and
//!   a few applets, `/etc` basics (no `machine-id`: systemd writes one on a
//!   writable root), and the units of a boot that runs one service,
//!   `kiln-os-test.service`: it writes `ready` to `/run/kiln-os-test` and
//!   `kiln-os-test: ready` to the console.
//!
//! The image config has no Entrypoint or Cmd, only
//! `PATH=/usr/sbin:/usr/bin:/sbin:/bin`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::oci::{self, Layer};

/// Modules the kernel layer carries (with their dependencies): those
/// Kiln's initramfs loads for an OS image, `OS_MODULES` in
/// `engine/src/os_boot.rs` (an engine test keeps the two equal; testkit
/// links no Kiln crate). Those built into the generic kernel
/// (`virtio_pci`) are skipped.
pub const MODULES: &[&str] = &[
    // erofs (libcrc32c) and ext4 need the crypto API's crc32c, a soft
    // dependency modules.dep does not name (modules.softdep does; the
    // closure follows it too).
    "crc32c_generic",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "virtio_balloon",
    "virtio_scsi",
    "sd_mod",
    "erofs",
    "overlay",
    "ext4",
    "virtio_pci",
];

/// What `kiln-os-test.service` writes `ready` to.
pub const READY_FILE: &str = "/run/kiln-os-test";
/// The line `kiln-os-test.service` writes to the console.
pub const READY_LINE: &str = "kiln-os-test: ready";

const SYSTEMD_BINARIES: &[&str] = &[
    "/usr/lib/systemd/systemd",
    "/usr/lib/systemd/systemd-executor",
    "/usr/bin/systemctl",
];

const BUSYBOX_APPLETS: &[&str] = &["sh", "cat", "echo", "uname", "ls", "sleep", "mount"];

/// Kernel release the image carries (the Debian generic kernel of the GPU
/// guest image).
pub fn kernel_release() -> String {
    let path = crate::guest_dir().join("gpu/kernel-release");
    let release = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the GPU guest is not built: run `make guest`",
            path.display()
        )
    });
    release.trim().to_owned()
}

/// Layers of the OS image, lowest first: [kernel layer, os layer].
pub fn os_layers() -> Vec<Layer> {
    vec![kernel_layer(), os_layer()]
}

/// An OCI image layout dir (like [`oci::one_image`]) holding the OS image
/// tagged `tag`.
pub fn os_image(tag: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = oci::LayoutBuilder::new(dir.path());
    let config = serde_json::json!({"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]});
    let desc = layout.image_with_config("amd64", &os_layers(), config);
    layout.tag(desc, tag);
    dir
}

/// The unpacked generic kernel package: `make guest` leaves it in
/// `<guest dir>/cache/kernel-gpu-<version>/`.
fn kernel_tree(release: &str) -> PathBuf {
    let cache = crate::guest_dir().join("cache");
    let vmlinuz = format!("boot/vmlinuz-{release}");
    std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kernel-gpu-"))
        })
        .find(|p| p.join(&vmlinuz).is_file())
        .unwrap_or_else(|| {
            panic!(
                "no {}/kernel-gpu-*/{vmlinuz} (the unpacked GPU guest kernel): run `make guest`",
                cache.display()
            )
        })
}

/// `boot/vmlinuz-<release>`, the modules and their index files: shipped as
/// a plain tar (its files are compressed already).
fn kernel_layer() -> Layer {
    let release = kernel_release();
    let tree = kernel_tree(&release);
    let moddir = tree.join("usr/lib/modules").join(&release);
    let mut t = Tree::default();
    let vmlinuz = format!("boot/vmlinuz-{release}");
    t.file(&vmlinuz, read(&tree.join(&vmlinuz)), 0o644);
    let prefix = format!("usr/lib/modules/{release}");
    let modules = module_closure(&moddir, MODULES);
    for m in &modules {
        t.file(
            &format!("{prefix}/{}", m.path),
            read(&moddir.join(&m.path)),
            0o644,
        );
    }
    let index = [
        ("modules.dep", modules_dep(&modules)),
        ("modules.softdep", modules_softdep(&modules)),
        ("modules.alias", modules_alias(&modules)),
        (
            "modules.builtin",
            read_string(&moddir.join("modules.builtin")),
        ),
    ];
    for (name, text) in index {
        t.file(&format!("{prefix}/{name}"), text.into_bytes(), 0o644);
    }
    Layer {
        tar: t.tar(),
        media_type: oci::TAR,
    }
}

/// A module of the closure: its name, its path under
/// `lib/modules/<release>/` and its `.modinfo` fields.
#[derive(Debug)]
struct Module {
    name: String,
    path: String,
    /// `depends=`: the modules it needs (symbols).
    depends: Vec<String>,
    /// `softdep=` values, `pre: a b post: c`.
    softdeps: Vec<String>,
    aliases: Vec<String>,
}

/// The modules of the unpacked kernel package at `moddir`.
struct ModDir<'a> {
    moddir: &'a Path,
    /// Module name -> path under `moddir`.
    index: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

impl ModDir<'_> {
    fn module(&self, name: &str) -> Module {
        let path = self.index[name].clone();
        let elf = module_elf(&self.moddir.join(&path));
        Module {
            name: name.to_owned(),
            depends: modinfo(&elf, "depends")
                .iter()
                .flat_map(|d| d.split(','))
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect(),
            softdeps: modinfo(&elf, "softdep"),
            aliases: modinfo(&elf, "alias"),
            path,
        }
    }

    /// The modules a soft dependency `name` (a module name or an alias,
    /// `crc32c`, `crypto-crc32c`) loads. Aliases are looked up among the
    /// modules whose name starts with `name` (without `crypto-`): crypto
    /// algorithms, the only soft dependencies of [`MODULES`], are named so
    /// (`crc32c` is `crc32c_generic` and `crc32c-intel`).
    fn soft_targets(&self, name: &str) -> Vec<String> {
        let norm = name.replace('-', "_");
        if self.builtin.contains(&norm) {
            return Vec::new();
        }
        if self.index.contains_key(&norm) {
            return vec![norm];
        }
        let stem = norm.strip_prefix("crypto_").unwrap_or(&norm);
        let targets: Vec<String> = self
            .index
            .keys()
            .filter(|n| n.starts_with(stem))
            .filter(|n| self.module(n).aliases.iter().any(|a| a == name))
            .cloned()
            .collect();
        // No module has it: it must be built in under another name.
        let alias = format!(".alias={name}");
        assert!(
            !targets.is_empty()
                || read(&self.moddir.join("modules.builtin.modinfo"))
                    .split(|b| *b == 0)
                    .any(|e| e.ends_with(alias.as_bytes())),
            "soft dependency {name}: no module or built-in has this name or alias"
        );
        targets
    }

    fn visit(&self, name: &str, out: &mut Vec<Module>) {
        let name = name.replace('-', "_");
        if self.builtin.contains(&name) || out.iter().any(|m| m.name == name) {
            return;
        }
        assert!(
            self.index.contains_key(&name),
            "module {name} is neither shipped nor built in"
        );
        let m = self.module(&name);
        for dep in &m.depends {
            self.visit(dep, out);
        }
        for soft in softdep_names(&m.softdeps) {
            for target in self.soft_targets(soft) {
                self.visit(&target, out);
            }
        }
        if !out.iter().any(|o| o.name == name) {
            out.push(m);
        }
    }
}

/// `names` and what they need, dependencies first: what each module's
/// `.modinfo` names (Debian's kernel package ships no `modules.dep`, depmod
/// runs at install time), `depends=` and the modules of its `softdep=`s
/// (`libcrc32c` and `ext4` fail without a `crc32c` algorithm, a module of
/// the generic kernel). Built-in modules are skipped.
fn module_closure(moddir: &Path, names: &[&str]) -> Vec<Module> {
    let mut index = BTreeMap::new();
    let mut dirs = vec![moddir.join("kernel")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(name) = module_name(&path) {
                let rel = path.strip_prefix(moddir).unwrap();
                index.insert(name, rel.to_str().unwrap().to_owned());
            }
        }
    }
    let builtin = read_string(&moddir.join("modules.builtin"))
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    let dir = ModDir {
        moddir,
        index,
        builtin,
    };
    let mut out = Vec::new();
    for name in names {
        dir.visit(name, &mut out);
    }
    out
}

/// The module names of `softdep=` values (`pre: a b post: c`).
fn softdep_names(softdeps: &[String]) -> impl Iterator<Item = &str> {
    softdeps
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter(|w| !w.ends_with(':'))
}

/// `modules.dep` of `modules`, in depmod's format: each module's whole
/// dependency closure (`depends=`, not soft dependencies: those are in
/// `modules.softdep`), a module listed before its own dependencies
/// (modprobe loads the list from right to left).
fn modules_dep(modules: &[Module]) -> String {
    let by_name: BTreeMap<&str, &Module> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    fn load_order<'a>(m: &'a Module, by_name: &BTreeMap<&str, &'a Module>, out: &mut Vec<&'a str>) {
        for dep in &m.depends {
            let d = by_name[dep.as_str()];
            if !out.contains(&d.path.as_str()) {
                load_order(d, by_name, out);
                out.push(&d.path);
            }
        }
    }
    let mut text = String::new();
    for m in modules {
        let mut deps = Vec::new();
        load_order(m, &by_name, &mut deps);
        deps.reverse();
        text.push_str(&m.path);
        text.push(':');
        for d in deps {
            text.push(' ');
            text.push_str(d);
        }
        text.push('\n');
    }
    text
}

/// `modules.softdep` of `modules`, in depmod's format.
fn modules_softdep(modules: &[Module]) -> String {
    let mut text = String::from("# Soft dependencies extracted from modules themselves.\n");
    for m in modules {
        for s in &m.softdeps {
            text.push_str(&format!("softdep {} {s}\n", m.name));
        }
    }
    text
}

/// `modules.alias` of `modules`, in depmod's format.
fn modules_alias(modules: &[Module]) -> String {
    let mut text = String::from("# Aliases extracted from modules themselves.\n");
    for m in modules {
        for a in &m.aliases {
            text.push_str(&format!("alias {a} {}\n", m.name));
        }
    }
    text
}

/// The module name of a `.ko[.xz|.zst|.gz]` file (`-` read as `_`).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|s| file.strip_suffix(s))
        .map(|n| n.replace('-', "_"))
}

/// The plain ELF of a (compressed) module.
fn module_elf(path: &Path) -> Vec<u8> {
    let bytes = read(path);
    match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => {
            let out = Command::new("xz").arg("-dc").arg(path).output().unwrap();
            assert!(out.status.success(), "xz -dc {}", path.display());
            out.stdout
        }
        Some("zst") => zstd::decode_all(&bytes[..]).unwrap(),
        Some("gz") => {
            let mut elf = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut elf)
                .unwrap();
            elf
        }
        _ => bytes,
    }
}

/// The values of `key` in the `.modinfo` section of a 64-bit
/// little-endian ELF.
fn modinfo(elf: &[u8], key: &str) -> Vec<String> {
    assert!(elf.starts_with(b"\x7fELF\x02\x01"), "not a 64-bit LE ELF");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let section = |i: usize| {
        let base = shoff + i * shentsize;
        (u32_at(base), u64_at(base + 24), u64_at(base + 32))
    };
    let (_, strtab, _) = section(shstrndx);
    let prefix = format!("{key}=");
    for i in 0..shnum {
        let (name, offset, size) = section(i);
        let name = &elf[strtab + name..];
        if !name.starts_with(b".modinfo\0") {
            continue;
        }
        return elf[offset..offset + size]
            .split(|b| *b == 0)
            .filter_map(|e| std::str::from_utf8(e).ok()?.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect();
    }
    Vec::new()
}

/// systemd and its libraries, busybox, /etc and the units; zstd (a third
/// of gzip's time in a debug build).
fn os_layer() -> Layer {
    let mut t = Tree::default();
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        t.symlink(link, target);
    }
    // systemd taints a system whose /var/run is not this link.
    t.symlink("var/run", "../run");
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("usr/sbin", 0o755),
    ] {
        t.dir(dir, mode);
    }

    for binary in SYSTEMD_BINARIES {
        t.host_file(Path::new(binary));
    }
    for lib in shared_libraries(SYSTEMD_BINARIES) {
        t.host_file(&lib);
    }
    t.symlink("usr/sbin/init", "../lib/systemd/systemd");

    t.file("usr/bin/busybox", oci::busybox(), 0o755);
    for applet in BUSYBOX_APPLETS {
        t.symlink(&format!("usr/bin/{applet}"), "busybox");
    }

    let etc: &[(&str, &str)] = &[
        (
            "etc/os-release",
            "NAME=\"Kiln OS test\"\nID=kiln-os-test\nPRETTY_NAME=\"Kiln OS test\"\n\
             VERSION_ID=1\n",
        ),
        ("etc/hostname", "kiln-os-test\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ];
    for (path, text) in etc {
        t.file(path, text.as_bytes().to_vec(), 0o644);
    }

    let units = "usr/lib/systemd/system";
    for (name, text) in units_text() {
        t.file(&format!("{units}/{name}"), text.into_bytes(), 0o644);
    }
    t.symlink(
        &format!("{units}/default.target.wants/kiln-os-test.service"),
        "../kiln-os-test.service",
    );
    Layer {
        tar: t.tar(),
        media_type: oci::TAR_ZSTD,
    }
}

/// The units: the default target, the test service (wanted by it through
/// `default.target.wants/`; its output goes to the console, `TTYPath=`'s
/// default) and the targets every service depends on by default
/// (`DefaultDependencies=yes`). `sysinit.target` is the one a boot cannot
/// do without (measured): a service `Requires=` it, and with no unit file
/// systemd drops the service's start job and still reaches
/// `default.target`. `basic.target` (`After=`) and `shutdown.target`
/// (`Conflicts=`) are there as on any system.
fn units_text() -> Vec<(&'static str, String)> {
    let unit = |description: &str, rest: &str| format!("[Unit]\nDescription={description}\n{rest}");
    let service = format!(
        "\n[Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         StandardOutput=tty\n\
         ExecStart=/usr/bin/busybox sh -c 'echo ready > {READY_FILE}; echo {READY_LINE}'\n\
         \n[Install]\n\
         WantedBy=default.target\n"
    );
    vec![
        (
            "default.target",
            unit(
                "Kiln OS test",
                "Requires=basic.target\nAfter=basic.target\n",
            ),
        ),
        ("sysinit.target", unit("System Initialization", "")),
        (
            "basic.target",
            unit(
                "Basic System",
                "Requires=sysinit.target\nAfter=sysinit.target\n",
            ),
        ),
        (
            "shutdown.target",
            unit(
                "System Shutdown",
                "DefaultDependencies=no\nRefuseManualStart=yes\n",
            ),
        ),
        (
            "kiln-os-test.service",
            unit("Kiln OS test: systemd ran a unit", &service),
        ),
    ]
}

/// Every shared library `binaries` load (the dynamic loader included), as
/// `ldd` names them.
fn shared_libraries(binaries: &[&str]) -> BTreeSet<PathBuf> {
    let mut libs = BTreeSet::new();
    for binary in binaries {
        let out = Command::new("ldd").arg(binary).output().unwrap();
        assert!(out.status.success(), "ldd {binary}: {out:?}");
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            assert!(!line.contains("not found"), "ldd {binary}: {line}");
            let path = match line.split_once("=> ") {
                Some((_, rest)) => rest,
                None => line.trim_start(),
            };
            let path = path.split(" (").next().unwrap().trim();
            // linux-vdso.so.1 has no file.
            if path.starts_with('/') {
                libs.insert(PathBuf::from(path));
            }
        }
    }
    libs
}

/// Where host file `path` goes in the image: its directory resolved (the
/// host's `/lib` is `usr/lib` of a merged /usr), under the image's own
/// merged /usr (`lib/x` is `usr/lib/x`).
fn image_path(path: &Path) -> String {
    let dir = std::fs::canonicalize(path.parent().unwrap()).unwrap();
    let path = dir.join(path.file_name().unwrap());
    let path = path.to_str().unwrap().trim_start_matches('/');
    for top in ["bin/", "sbin/", "lib/", "lib64/"] {
        if path.starts_with(top) {
            return format!("usr/{path}");
        }
    }
    path.to_owned()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_string(path: &Path) -> String {
    String::from_utf8(read(path)).unwrap()
}

#[derive(Debug)]
enum Node {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(String),
}

/// A layer's files by path; each file's parent directories are added, and
/// [`tar`](Tree::tar) writes them sorted, so a directory comes before what
/// it holds. Paths of any length (GNU long names).
#[derive(Debug, Default)]
struct Tree(BTreeMap<String, Node>);

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.0
                .entry(path[..end].to_owned())
                .or_insert(Node::Dir(0o755));
            end += 1;
        }
    }

    fn insert(&mut self, path: &str, node: Node) {
        self.parents(path);
        let old = self.0.insert(path.to_owned(), node);
        assert!(
            matches!(old, None | Some(Node::Dir(_))),
            "{path} is in the layer twice"
        );
    }

    fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Node::Dir(mode));
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.insert(path, Node::File(data, mode));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()));
    }

    /// Host file `path` (its contents, symlinks followed, and mode) at
    /// [`image_path`].
    fn host_file(&mut self, path: &Path) {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        self.file(&image_path(path), read(path), mode);
    }

    fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, node) in &self.0 {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match node {
                Node::Dir(mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), &[][..]).unwrap();
                }
                Node::File(data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, &data[..]).unwrap();
                }
                Node::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// path -> (entry type, contents) of an uncompressed tar.
    fn entries(tar: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_str().unwrap().to_owned();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (path.trim_end_matches('/').to_owned(), (kind, data))
            })
            .collect()
    }

    #[test]
    fn layers_hold_kernel_modules_systemd_and_its_libraries() {
        let release = kernel_release();
        let layers = os_layers();
        assert_eq!(layers.len(), 2);
        let kernel = entries(&layers[0].tar);
        let os = entries(&layers[1].tar);
        let is_file = |m: &BTreeMap<String, (tar::EntryType, Vec<u8>)>, p: &str| {
            matches!(m.get(p), Some((tar::EntryType::Regular, _)))
        };

        assert!(is_file(&kernel, &format!("boot/vmlinuz-{release}")));
        let dep = format!("usr/lib/modules/{release}/modules.dep");
        assert!(is_file(&kernel, &dep));
        // Every module modules.dep names is in the layer, and a module's
        // dependencies are listed before it (load order).
        let dep = String::from_utf8(kernel[&dep].1.clone()).unwrap();
        let mut listed = Vec::new();
        for line in dep.lines() {
            let (module, deps) = line.split_once(':').unwrap();
            for d in deps.split_whitespace().chain([module]) {
                assert!(
                    is_file(&kernel, &format!("usr/lib/modules/{release}/{d}")),
                    "{d}"
                );
            }
            for d in deps.split_whitespace() {
                assert!(
                    listed.contains(&d),
                    "{module} is listed before its dependency {d}"
                );
            }
            listed.push(module);
        }
        // crc32c_generic: a soft dependency of libcrc32c (erofs) and ext4.
        for m in [
            "crc32c_generic",
            "virtio_mmio",
            "virtio_net",
            "virtio_scsi",
            "sd_mod",
            "erofs",
            "overlay",
            "ext4",
        ] {
            assert!(
                listed
                    .iter()
                    .any(|p| module_name(Path::new(p)).as_deref() == Some(m)),
                "{m} missing from {dep}"
            );
        }
        let softdep = &kernel[&format!("usr/lib/modules/{release}/modules.softdep")].1;
        assert!(String::from_utf8_lossy(softdep).contains("softdep libcrc32c pre: crc32c\n"));
        // A directory entry for each directory.
        for dir in ["boot", "usr", "usr/lib", "usr/lib/modules"] {
            assert!(
                matches!(kernel.get(dir), Some((tar::EntryType::Directory, _))),
                "{dir}"
            );
        }

        for binary in SYSTEMD_BINARIES {
            let path = binary.trim_start_matches('/');
            assert!(is_file(&os, path), "{path}");
        }
        for binary in SYSTEMD_BINARIES {
            for lib in shared_libraries(&[binary]) {
                let path = image_path(&lib);
                assert!(
                    is_file(&os, &path),
                    "{binary} needs {} at {path}",
                    lib.display()
                );
                assert_eq!(os[&path].1, std::fs::read(&lib).unwrap(), "{path}");
            }
        }
        assert!(is_file(&os, "usr/lib64/ld-linux-x86-64.so.2"));
        assert!(os
            .keys()
            .any(|p| p.starts_with("usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-")));
        assert!(matches!(
            os.get("usr/sbin/init"),
            Some((tar::EntryType::Symlink, _))
        ));
        assert!(!os.contains_key("etc/machine-id"));
        let units = "usr/lib/systemd/system";
        for unit in ["default.target", "sysinit.target", "kiln-os-test.service"] {
            assert!(is_file(&os, &format!("{units}/{unit}")), "{unit}");
        }
        assert_eq!(
            os[&format!("{units}/default.target.wants/kiln-os-test.service")],
            (tar::EntryType::Symlink, Vec::new())
        );
    }
}
