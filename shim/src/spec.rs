//! What the shim reads of an OCI runtime spec: the bundle's `config.json`
//! (the task's role in its pod and the process to run) and an exec's
//! process. Only these fields; the rest (mounts, namespaces, capabilities,
//! seccomp, rlimits, cgroups) is the host runtime's business and means
//! nothing inside a Kiln VM (docs/kubernetes.md says what is ignored).

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
}

/// The fields of `config.json` the shim uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
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
