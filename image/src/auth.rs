//! Registry credentials from a `containers-auth.json`-style file
//! (containers-auth.json(5), Docker's `config.json`):
//! `{"auths": {"host:port": {"auth": base64("user:password")}}}`.
//! Keys may also name a repository namespace (`host/ns`; the longest match
//! wins) or carry Docker's legacy URL form (`https://host/v1/`).

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
}

/// The credentials in the file at `path` for `registry` (`host[:port]`) and
/// `repository` (`ns/name`). A missing file means no credentials; an
/// unreadable or malformed one is an error, returned as the reason the pull
/// fails (pulling anonymously instead would hide it).
pub fn lookup(
    path: &Path,
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read auth file {}: {e}", path.display())),
    };
    let malformed = |detail: String| format!("bad auth file {}: {detail}", path.display());
    let file: AuthFile = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    let wanted = |key: &str| {
        let key = normalise_key(key);
        let scope = format!("{registry}/{repository}");
        (key == registry
            || (scope.starts_with(&key) && scope.as_bytes().get(key.len()) == Some(&b'/')))
        .then_some(key.len())
    };
    let best = file
        .auths
        .iter()
        .filter_map(|(key, entry)| wanted(key).map(|len| (len, entry)))
        .max_by_key(|(len, _)| *len);
    let Some((_, entry)) = best else {
        return Ok(None);
    };
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| malformed(format!("auth of {registry}: {e}")))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| malformed(format!("auth of {registry} is not UTF-8")))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| malformed(format!("auth of {registry} is not user:password")))?;
    Ok(Some(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    }))
}

/// `https://index.docker.io/v1/` → `docker.io`; `host/` → `host`.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key
        .strip_suffix("/v1/")
        .or_else(|| key.strip_suffix("/v2/"))
        .unwrap_or(key);
    let key = key.trim_end_matches('/');
    match key {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), json).unwrap();
        f
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn host_port_and_namespace_keys() {
        let f = file(&format!(
            r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{}"}},
                           "127.0.0.1:5000/team": {{"auth": "{}"}},
                           "https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            b64("alice:pw"),
            b64("bob:pw2"),
            b64("hub:x:y")
        ));
        let user = |reg, repo| lookup(f.path(), reg, repo).unwrap().map(|c| c.username);
        assert_eq!(
            user("127.0.0.1:5000", "other/img").as_deref(),
            Some("alice")
        );
        assert_eq!(user("127.0.0.1:5000", "team/img").as_deref(), Some("bob"));
        assert_eq!(
            user("127.0.0.1:5000", "teamx/img").as_deref(),
            Some("alice")
        );
        assert_eq!(user("127.0.0.1:5001", "x"), None);
        let hub = lookup(f.path(), "docker.io", "library/busybox")
            .unwrap()
            .unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub", "x:y")
        );
    }

    #[test]
    fn missing_file_is_anonymous_and_bad_file_an_error() {
        assert_eq!(
            lookup(Path::new("/nonexistent/auth.json"), "h", "r").unwrap(),
            None
        );
        let f = file(r#"{"auths": {"h": {"auth": "!!"}}}"#);
        assert!(lookup(f.path(), "h", "r")
            .unwrap_err()
            .contains("bad auth file"));
    }
}
