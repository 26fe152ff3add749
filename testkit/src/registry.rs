//! A real registry for image tests: Debian's `docker-registry` on
//! 127.0.0.1 with its own config and storage dir (anonymous, htpasswd
//! basic auth, or bearer tokens from a token server the test runs), images
//! pushed with real `skopeo`, and `containers-auth.json` files.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::run;

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

/// How a test registry authenticates.
#[derive(Debug)]
enum Auth {
    None,
    /// htpasswd (bcrypt) with HTTP basic auth.
    Basic,
    /// Bearer tokens from a token server the test runs.
    Token(TokenServer),
}

/// A real registry (Debian's docker-registry) on 127.0.0.1, killed on drop.
#[derive(Debug)]
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
        crate::wait_until(Duration::from_secs(20), "docker-registry listening", || {
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

const TOKEN_SERVICE: &str = "kiln-test-registry";
const TOKEN_ISSUER: &str = "kiln-test-issuer";

/// A token server for the registry's bearer auth (the distribution token
/// spec): `GET /token?service=…&scope=repository:NAME:ACTIONS` answers a
/// JWT signed RS256 with a self-signed key the registry trusts (`x5c`);
/// with the right basic credentials it grants the scopes asked for,
/// anonymously none. Signing is `openssl dgst`, so no crypto crate.
#[derive(Debug)]
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
