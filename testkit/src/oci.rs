//! Test images built by the tests themselves, byte for byte: tar layers
//! of busybox-static and small files (names written raw, so a test can
//! build what a careful tar writer would refuse), gzip and zstd, and OCI
//! image layouts written file by file. No image comes from the internet.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// The busybox-static binary (setup-host.sh installs it).
pub fn busybox() -> Vec<u8> {
    std::fs::read("/usr/bin/busybox")
        .or_else(|_| std::fs::read("/bin/busybox"))
        .expect("busybox-static is not installed: run scripts/setup-host.sh")
}

/// `len` bytes that do not compress (xorshift, the same every run): a
/// layer of them takes measurable time to download and convert, so a test
/// can catch a pull in the middle.
pub fn noise(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    bytes
}

/// One tar entry. Names are written raw, so a test can build what the
/// `tar` crate's own checks would refuse (`../x`, `/etc/x`).
#[derive(Clone, Debug)]
pub enum Entry {
    Dir(&'static str),
    File(&'static str, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
}

pub fn file(path: &'static str, data: &[u8]) -> Entry {
    Entry::File(path, data.to_vec(), 0o644)
}

/// An uncompressed tar of `entries`.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (name, data, link): (&str, &[u8], Option<&str>) = match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, &[], None)
            }
            Entry::File(p, d, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, d, None)
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                (p, &[], Some(t))
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                (p, &[], Some(t))
            }
        };
        assert!(name.len() < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A layer: its uncompressed tar and how it is shipped.
#[derive(Clone, Debug)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub media_type: &'static str,
}

impl Layer {
    pub fn gzip(entries: &[Entry]) -> Self {
        Self {
            tar: tar(entries),
            media_type: TAR_GZIP,
        }
    }
    pub fn plain(entries: &[Entry]) -> Self {
        Self {
            tar: tar(entries),
            media_type: TAR,
        }
    }
    pub fn zstd(entries: &[Entry]) -> Self {
        Self {
            tar: tar(entries),
            media_type: TAR_ZSTD,
        }
    }
    pub fn blob(&self) -> Vec<u8> {
        match self.media_type {
            TAR_GZIP => gzip(&self.tar),
            TAR_ZSTD => zstd::encode_all(&self.tar[..], 3).unwrap(),
            _ => self.tar.clone(),
        }
    }
    pub fn diff_id(&self) -> String {
        sha256(&self.tar)
    }
}

/// The base layer of every test image: busybox with a few applets and
/// `/etc/hello`.
pub fn busybox_layer() -> Layer {
    Layer::gzip(&[
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", busybox(), 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
        Entry::Dir("etc/"),
        file("etc/hello", b"hello from the base layer\n"),
    ])
}

/// An OCI image layout written file by file.
#[derive(Debug)]
pub struct LayoutBuilder {
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

impl LayoutBuilder {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        Self {
            dir: dir.to_owned(),
            index: Vec::new(),
        }
    }

    /// Store a blob; its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let digest = sha256(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// An image for `arch` with `layers`; its manifest descriptor.
    pub fn image(&self, arch: &str, layers: &[Layer]) -> serde_json::Value {
        let config = serde_json::json!({
            "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "cat /etc/hello"],
            "Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/etc", "User": "0:0"
        });
        self.image_with_config(arch, layers, config)
    }

    /// [`image`](Self::image) with `config` as the image config's
    /// `config` object (Entrypoint, Cmd, Env, ...).
    pub fn image_with_config(
        &self,
        arch: &str,
        layers: &[Layer],
        config: serde_json::Value,
    ) -> serde_json::Value {
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "created": "2024-05-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers",
                       "diff_ids": layers.iter().map(Layer::diff_id).collect::<Vec<_>>()}
        });
        let config = self.blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
        let layers: Vec<_> = layers
            .iter()
            .map(|l| self.blob(l.media_type, &l.blob()))
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers
        });
        let mut desc = self.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
        desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        desc
    }

    /// An index over `manifests`; its descriptor.
    pub fn index(&self, manifests: &[serde_json::Value]) -> serde_json::Value {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests
        });
        self.blob(OCI_INDEX, &serde_json::to_vec(&index).unwrap())
    }

    /// List `desc` in index.json under `name`.
    pub fn tag(&mut self, mut desc: serde_json::Value, name: &str) -> &mut Self {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
        self.index.push(desc);
        self.write();
        self
    }

    fn write(&self) {
        std::fs::write(
            self.dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index
        });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// A layout holding one linux/amd64 image of `layers`, tagged `tag`.
pub fn one_image(layers: &[Layer], tag: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let desc = layout.image("amd64", layers);
    layout.tag(desc, tag);
    dir
}

/// A layout with one two-layer image (busybox; `/srv/app.txt`) tagged
/// `v1`, and its layers.
pub fn two_layers() -> (tempfile::TempDir, Vec<Layer>) {
    let layers = vec![
        busybox_layer(),
        Layer::gzip(&[Entry::Dir("srv/"), file("srv/app.txt", b"app layer\n")]),
    ];
    (one_image(&layers, "v1"), layers)
}

/// Write image `tag` of the layout at `layout` as an OCI archive at
/// `archive` (tagged `tag` inside), with real skopeo.
pub fn oci_archive(layout: &Path, tag: &str, archive: &Path) {
    crate::run(
        std::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("oci-archive:{}:{tag}", archive.display())),
    );
}
