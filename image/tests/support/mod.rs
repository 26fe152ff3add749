//! What the image tests share: images built here (busybox-static and small
//! files, written as OCI layouts by hand so every byte is known), a real
//! `docker-registry` on 127.0.0.1 with its own config and storage, pushes
//! with real `skopeo`, and a store in a temp dir.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::{Image, ImageError, ImageStore, InvalidReason, Progress, StoreConfig};
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
            "architecture": arch, "os": "linux", "created": "2024-05-01T00:00:00Z",
            "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "cat /etc/hello"],
                       "Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/etc", "User": "0:0"},
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

/// A containers-auth.json with `user:password` for `key` (`host:port`, or
/// `host:port/namespace`).
pub fn auth_file(key: &str, user: &str, password: &str) -> tempfile::NamedTempFile {
    use base64::Engine as _;
    let f = tempfile::NamedTempFile::new().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = serde_json::json!({"auths": {key: {"auth": auth}}});
    std::fs::write(f.path(), json.to_string()).unwrap();
    f
}

/// The diff ids of a stored image's layers.
pub fn diff_ids(image: &Image) -> Vec<String> {
    image
        .record
        .layers
        .iter()
        .map(|l| l.diff_id.to_string())
        .collect()
}

/// Why an image was refused; panics on any other error.
pub fn reason(err: &ImageError) -> &InvalidReason {
    match err {
        ImageError::InvalidImage { reason, .. } => reason,
        other => panic!("not InvalidImage: {other:?}"),
    }
}

/// Run a command, panic with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How a test registry authenticates.
enum Auth {
    None,
    /// htpasswd (bcrypt) with HTTP basic auth.
    Basic,
    /// Bearer tokens from a token server the test runs.
    Token(TokenServer),
}

/// A real registry (Debian's docker-registry) on 127.0.0.1, killed on drop.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub creds: Option<(String, String)>,
    _auth: Auth,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(None, false)
    }

    /// With htpasswd (bcrypt) basic auth for `user:password`.
    pub fn with_auth(user: &str, password: &str) -> Self {
        Self::start_with(Some((user.into(), password.into())), false)
    }

    /// With bearer tokens from a token server that grants `user:password`
    /// what it asks for and anonymous callers nothing.
    pub fn with_token_auth(user: &str, password: &str) -> Self {
        Self::start_with(Some((user.into(), password.into())), true)
    }

    fn start_with(creds: Option<(String, String)>, token: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-reg")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        let auth = match (&creds, token) {
            (None, _) => Auth::None,
            (Some((user, password)), false) => {
                let line = run(Command::new("htpasswd").args(["-Bbn", user, password]));
                std::fs::write(dir.path().join("htpasswd"), line.trim()).unwrap();
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                ));
                Auth::Basic
            }
            (Some((user, password)), true) => {
                let server = TokenServer::start(dir.path(), user, password);
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.port,
                    dir.path().join("token.crt").display()
                ));
                Auth::Token(server)
            }
        };
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is not installed: run scripts/setup-host.sh");
        let registry = Self {
            child,
            dir,
            port,
            creds,
            _auth: auth,
        };
        kiln_testkit::wait_until(Duration::from_secs(20), "docker-registry listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        registry
    }

    /// The token server's requests so far (`<request line> authorized=…`).
    pub fn token_requests(&self) -> Vec<String> {
        match &self._auth {
            Auth::Token(server) => server.requests.lock().unwrap().clone(),
            _ => Vec::new(),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `host/name:tag`.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.host())
    }

    /// Push `tag` of the layout at `dir` as `name_tag`, with skopeo; every
    /// image of an index when `all`.
    pub fn push(&self, dir: &Path, tag: &str, name_tag: &str, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--quiet",
        ]);
        if all {
            cmd.arg("--all");
        }
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        // Keep the layers exactly as built (skopeo would otherwise be free
        // to recompress them).
        cmd.arg("--preserve-digests");
        cmd.arg(format!("oci:{}:{tag}", dir.display()));
        cmd.arg(format!("docker://{}", self.reference(name_tag)));
        run(&mut cmd);
    }

    /// How many blob GETs the registry has served so far.
    pub fn blob_gets(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// The file the registry keeps blob `digest` in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store in a temp dir that pulls from 127.0.0.1 registries over HTTP.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: ImageStore,
}

impl TestStore {
    pub fn new(registry: Option<&Registry>) -> Self {
        Self::with(registry, |_| {})
    }

    pub fn with(registry: Option<&Registry>, tweak: impl FnOnce(&mut StoreConfig)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-img")
            .tempdir()
            .unwrap();
        let mut config = StoreConfig::default();
        if let Some(r) = registry {
            config.insecure_registries.push(r.host());
        }
        tweak(&mut config);
        let store = ImageStore::open(dir.path().join("images"), config).unwrap();
        Self { dir, store }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Files in a store directory (`erofs/sha256`, `tmp`, ...).
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Import the image in `dir` (a layout or an archive), untagged.
    pub async fn import(&self, dir: &Path) -> Result<Image, ImageError> {
        self.store.import(dir, None, &kiln_image::no_progress).await
    }

    /// Pull `reference`, ignoring progress.
    pub async fn pull(&self, reference: &str) -> Result<Image, ImageError> {
        self.store.pull(reference, &kiln_image::no_progress).await
    }

    /// Nothing of a refused image anywhere: no record, no layer, no blob,
    /// nothing left in tmp/.
    pub fn assert_empty(&self) {
        for sub in ["images/sha256", "erofs/sha256", "blobs/sha256", "tmp"] {
            assert_eq!(self.files(sub), Vec::<String>::new(), "{sub} is not empty");
        }
    }
}

/// Progress events, recorded.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Progress>>>);

impl Events {
    pub fn sink(&self) -> impl Fn(Progress) + Send + Sync + 'static {
        let events = self.0.clone();
        move |p| events.lock().unwrap().push(p)
    }
    pub fn take(&self) -> Vec<Progress> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Count layer steps matching `f`.
pub fn count_steps(events: &[Progress], f: impl Fn(&kiln_image::LayerStep) -> bool) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Progress::Layer { step, .. } if f(step)))
        .count()
}

const TOKEN_SERVICE: &str = "kiln-test-registry";
const TOKEN_ISSUER: &str = "kiln-test-issuer";

/// A token server for the registry's bearer auth (the distribution token
/// spec): `GET /token?service=…&scope=repository:NAME:ACTIONS` answers a
/// JWT signed RS256 with a self-signed key the registry trusts (`x5c`);
/// with the right basic credentials it grants the scopes asked for,
/// anonymously none. Signing is `openssl dgst`, so no crypto crate.
pub struct TokenServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(dir: &Path, user: &str, password: &str) -> Self {
        let (key, crt) = (dir.join("token.key"), dir.join("token.crt"));
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=kiln-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&crt)
            .output()
            .unwrap()
            .stdout;
        use base64::Engine as _;
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (log, user) = (requests.clone(), user.to_owned());
        // Lives as long as the test process; each test has its own port.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve_token(stream, &basic, &user, &key, &x5c, &log);
            }
        });
        Self { port, requests }
    }
}

fn serve_token(
    mut stream: std::net::TcpStream,
    basic: &str,
    user: &str,
    key: &Path,
    x5c: &str,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use base64::Engine as _;
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            authorized |= name.eq_ignore_ascii_case("authorization") && value.trim() == basic;
        }
    }
    log.lock()
        .unwrap()
        .push(format!("{} authorized={authorized}", request_line.trim()));
    let path = request_line.split(' ').nth(1).unwrap_or("");
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut access = Vec::new();
    for pair in query.split('&') {
        let Some(scope) = pair.strip_prefix("scope=") else {
            continue;
        };
        let scope = scope
            .replace("%3A", ":")
            .replace("%2C", ",")
            .replace("%2F", "/");
        let parts: Vec<&str> = scope.splitn(3, ':').collect();
        if authorized && parts.len() == 3 {
            access.push(serde_json::json!({
                "type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()
            }));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let header = b64(&serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]}));
    let claims = b64(&serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": if authorized { user } else { "" }, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access,
    }));
    let signing_input = format!("{header}.{claims}");
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())?;
    let signature = openssl.wait_with_output()?.stdout;
    let token = format!(
        "{signing_input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
    );
    let body =
        serde_json::to_string(&serde_json::json!({"token": token, "expires_in": 300})).unwrap();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
