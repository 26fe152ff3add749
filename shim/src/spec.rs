//! What the shim reads of an OCI runtime spec: the bundle's `config.json`
//! (the task's role in its pod, the process to run, the pod's network
//! namespace and the `/etc/resolv.conf` CRI made for it) and an exec's
//! process. Only these fields; the rest (other mounts and namespaces,
//! capabilities, seccomp, rlimits, cgroups) is the host runtime's business
//! and means nothing inside a Kiln VM (docs/kubernetes.md says what is
//! ignored).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sha2::Digest as _;

/// CRI's annotation: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation: the pod's sandbox id (the sandbox task's own id).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Longest Kiln container name.
const MAX_NAME_LEN: usize = 64;

/// Why a spec could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid runtime spec")]
    Parse(#[source] serde_json::Error),
    #[error("the spec has no process to run")]
    NoProcess,
    #[error("a {CONTAINER_TYPE} of {0:?} needs {SANDBOX_ID}")]
    NoSandboxId(String),
    #[error("the pod's network namespace {0} is not in /run/netns, where Kiln takes one from")]
    NetnsOutsideRunNetns(String),
}

/// Where CNI runtimes (containerd's CRI among them) keep named network
/// namespaces; `/var/run` is `/run` on every systemd host.
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Most name servers taken from a pod's `resolv.conf` (glibc's MAXNS).
const MAX_NAME_SERVERS: usize = 3;

/// The fields of `config.json` the shim uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

/// The `linux` part: only its namespaces.
#[derive(Debug, Default, Deserialize)]
pub struct Linux {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
}

/// A namespace of the spec: a `path` means "join this one".
#[derive(Debug, Default, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
}

/// A mount: only where it goes and what it is of.
#[derive(Debug, Default, Deserialize)]
pub struct Mount {
    pub destination: String,
    #[serde(default)]
    pub source: Option<String>,
}

/// A runtime-spec `process` (also what an exec carries).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

/// A task's place in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// CRI's pod sandbox ("pause"): the pod's VM, running nothing itself.
    Sandbox,
    /// A container of the pod whose sandbox id this is.
    Container(String),
    /// A task without a pod (`ctr run`): its own VM.
    Standalone,
}

impl Role {
    /// The name kept in the bundle record.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Container(_) => "container",
            Self::Standalone => "standalone",
        }
    }
}

impl Spec {
    /// `config.json` of the bundle at `bundle`.
    pub fn read(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| SpecError::Read { path, source })?;
        serde_json::from_slice(&bytes).map_err(SpecError::Parse)
    }

    /// The role of task `id` by CRI's annotations (which `ctr run
    /// --annotation` can set too).
    pub fn role(&self, id: &str) -> Result<Role, SpecError> {
        let sandbox = self.annotations.get(SANDBOX_ID);
        match self.annotations.get(CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Ok(Role::Sandbox),
            Some(kind) => match sandbox {
                Some(pod) if pod != id => Ok(Role::Container(pod.clone())),
                _ => Err(SpecError::NoSandboxId(kind.to_owned())),
            },
            None => Ok(Role::Standalone),
        }
    }

    /// The pod task `id` belongs to: one shim (and one VM) per pod.
    pub fn pod(&self, id: &str) -> String {
        match self.role(id) {
            Ok(Role::Container(pod)) => pod,
            _ => id.to_owned(),
        }
    }

    /// The name (under `/run/netns`) of the network namespace the task is
    /// to join: a pod's, made by CRI and wired by its CNI plugins. `None`
    /// for a task with a network namespace of its own (`ctr run`) or the
    /// host's.
    pub fn pod_netns(&self) -> Result<Option<String>, SpecError> {
        let Some(path) = self
            .linux
            .iter()
            .flat_map(|l| &l.namespaces)
            .find(|n| n.kind == "network")
            .and_then(|n| n.path.as_deref())
        else {
            return Ok(None);
        };
        let path = Path::new(path);
        let in_netns_dir = path
            .parent()
            .is_some_and(|dir| NETNS_DIRS.iter().any(|d| dir == Path::new(d)));
        match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if in_netns_dir => Ok(Some(name.to_owned())),
            _ => Err(SpecError::NetnsOutsideRunNetns(path.display().to_string())),
        }
    }

    /// The name servers of the `resolv.conf` CRI mounts into the pod (from
    /// the pod's DNS config): what the guest is given. None if there is no
    /// such mount or it cannot be read.
    pub fn name_servers(&self) -> Vec<String> {
        let Some(source) = self
            .mounts
            .iter()
            .find(|m| m.destination == "/etc/resolv.conf")
            .and_then(|m| m.source.as_deref())
        else {
            return Vec::new();
        };
        std::fs::read_to_string(source)
            .map(|text| parse_name_servers(&text))
            .unwrap_or_default()
    }

    /// The process of the task.
    pub fn process(&self) -> Result<&Process, SpecError> {
        self.process
            .as_ref()
            .filter(|p| !p.args.is_empty())
            .ok_or(SpecError::NoProcess)
    }
}

impl Process {
    /// An exec's process spec (JSON in the request's `Any`).
    pub fn parse(bytes: &[u8]) -> Result<Self, SpecError> {
        let process: Self = serde_json::from_slice(bytes).map_err(SpecError::Parse)?;
        if process.args.is_empty() {
            return Err(SpecError::NoProcess);
        }
        Ok(process)
    }

    /// `uid:gid` for the container's `user`.
    pub fn user(&self) -> String {
        format!("{}:{}", self.user.uid, self.user.gid)
    }

    /// The terminal's size in rows and columns (24x80 unless asked).
    pub fn window(&self) -> (u16, u16) {
        self.console_size
            .filter(|s| s.height > 0 && s.width > 0)
            .map_or((24, 80), |s| (s.height, s.width))
    }
}

/// The `nameserver` addresses of a `resolv.conf` (at most
/// [`MAX_NAME_SERVERS`], as the resolver reads no more).
fn parse_name_servers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .take(MAX_NAME_SERVERS)
        .map(str::to_owned)
        .collect()
}

/// Kiln's name for the container of task `id`: the id itself when Kiln
/// takes it (1 to 64 of A-Z a-z 0-9 _ . -), else `c-` and 40 hex digits of
/// its SHA-256 (containerd allows 76 characters).
pub fn container_name(id: &str) -> String {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !id.is_empty() && id.len() <= MAX_NAME_LEN && id.chars().all(valid) {
        return id.to_owned();
    }
    let hash = format!("{:x}", sha2::Sha256::digest(id.as_bytes()));
    format!("c-{}", hash.get(..40).unwrap_or(&hash))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_pods_netns_is_a_name_in_run_netns() {
        let pod = spec(
            r#"{"linux": {"namespaces": [{"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"}]}}"#,
        );
        assert_eq!(pod.pod_netns().unwrap().as_deref(), Some("cni-1234"));
        let own = spec(r#"{"linux": {"namespaces": [{"type": "network"}]}}"#);
        assert_eq!(own.pod_netns().unwrap(), None);
        assert_eq!(spec("{}").pod_netns().unwrap(), None);
        let elsewhere =
            spec(r#"{"linux": {"namespaces": [{"type": "network", "path": "/proc/7/ns/net"}]}}"#);
        assert!(elsewhere
            .pod_netns()
            .unwrap_err()
            .to_string()
            .contains("/proc/7/ns/net"));
        let sneaky = spec(
            r#"{"linux": {"namespaces": [{"type": "network", "path": "/run/netns/../x/y"}]}}"#,
        );
        assert!(sneaky.pod_netns().is_err());
    }

    #[test]
    fn name_servers_from_resolv_conf() {
        let text = "search svc.local\nnameserver 10.96.0.10\n# nameserver 1.1.1.1\n\
                    nameserver   fd00::a\nnameserver junk\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(
            parse_name_servers(text),
            ["10.96.0.10", "fd00::a", "10.0.0.2"]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.99.0.1\n").unwrap();
        let pod = spec(&format!(
            r#"{{"mounts": [{{"destination": "/etc/hosts", "source": "/x"}},
                {{"destination": "/etc/resolv.conf", "source": "{}"}}]}}"#,
            file.display()
        ));
        assert_eq!(pod.name_servers(), ["10.99.0.1"]);
        assert!(spec("{}").name_servers().is_empty());
    }

    #[test]
    fn roles_come_from_cri_annotations() {
        let plain = spec(r#"{"process": {"args": ["sh"]}}"#);
        assert_eq!(plain.role("t1").unwrap(), Role::Standalone);
        assert_eq!(plain.pod("t1"), "t1");
        let sandbox = spec(
            r#"{"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                                 "io.kubernetes.cri.sandbox-id": "p1"}}"#,
        );
        assert_eq!(sandbox.role("p1").unwrap(), Role::Sandbox);
        assert_eq!(sandbox.pod("p1"), "p1");
        let member = spec(
            r#"{"annotations": {"io.kubernetes.cri.container-type": "container",
                                 "io.kubernetes.cri.sandbox-id": "p1"}}"#,
        );
        assert_eq!(member.role("c1").unwrap(), Role::Container("p1".into()));
        assert_eq!(member.pod("c1"), "p1");
        let orphan = spec(r#"{"annotations": {"io.kubernetes.cri.container-type": "container"}}"#);
        assert!(matches!(orphan.role("c1"), Err(SpecError::NoSandboxId(_))));
    }

    #[test]
    fn processes_read_what_kiln_applies() {
        let s = spec(
            r#"{"ociVersion": "1.0.2", "process": {"terminal": false, "user": {"uid": 5, "gid": 6},
                "args": ["/bin/sh", "-c", "true"], "env": ["PATH=/bin"], "cwd": "/srv",
                "consoleSize": {"height": 40, "width": 100}, "rlimits": []},
                "linux": {"namespaces": []}}"#,
        );
        let p = s.process().unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", "true"]);
        assert_eq!(p.user(), "5:6");
        assert_eq!(p.window(), (40, 100));
        assert_eq!(p.cwd, "/srv");
        assert!(matches!(spec("{}").process(), Err(SpecError::NoProcess)));
        assert!(Process::parse(br#"{"args": []}"#).is_err());
        assert_eq!(
            Process::parse(br#"{"args": ["x"]}"#).unwrap().window(),
            (24, 80)
        );
    }

    #[test]
    fn long_or_odd_ids_get_hashed_names() {
        assert_eq!(container_name("t1"), "t1");
        let long = "a".repeat(70);
        let named = container_name(&long);
        assert!(named.starts_with("c-") && named.len() == 42, "{named}");
        assert_ne!(container_name("a:b"), "a:b");
    }
}
