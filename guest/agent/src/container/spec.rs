//! Validation of `StartContainer` and `Exec`-in-container parameters: every
//! count and length from the host is checked here, before anything is
//! mounted or started.

use std::time::Duration;

use kiln_agent_proto::{
    ContainerProcess, StartContainerRequest, WindowSize, DEFAULT_DISK_TIMEOUT_MS,
    LIMIT_DISK_TIMEOUT_MS, MAX_CONTAINER_ID_BYTES, MAX_LAYERS, MAX_PATH_BYTES, MAX_PROCESS_STRINGS,
    MAX_PROCESS_STRING_BYTES, MAX_PROCESS_TOTAL_BYTES, MAX_SERIAL_BYTES, MAX_STORAGE_MIB,
    MAX_USER_BYTES,
};

use super::user::UserSpec;
use super::ContainerError;
use crate::identity::valid_hostname;

/// `PATH` of a container process whose environment has none (the OCI
/// runtime default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the container's writable layer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A tmpfs, with this size limit in MiB (`None`: the tmpfs default,
    /// half the RAM).
    Tmpfs(Option<u64>),
    /// The ext4 file system of the disk with this serial.
    Disk(String),
}

/// A validated process description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments (at least one, no NUL).
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`, later keys override earlier ones.
    pub env: Vec<(String, String)>,
    /// Absolute working directory.
    pub cwd: String,
    /// User, resolved once the image is mounted.
    pub user: UserSpec,
    /// A terminal of this size for its stdio.
    pub terminal: Option<WindowSize>,
    /// stdin kept open (pipes, streamed).
    pub stdin: bool,
}

impl ProcessSpec {
    /// Whether its stdio is streamed (a terminal or stdin) instead of
    /// logged.
    pub fn attached(&self) -> bool {
        self.terminal.is_some() || self.stdin
    }
}

/// A validated `StartContainer` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Container id.
    pub id: String,
    /// Layer serials, lowest first.
    pub layers: Vec<String>,
    /// Hostname in its UTS namespace.
    pub hostname: String,
    /// The writable layer.
    pub upper: Upper,
    /// How long to wait for each disk.
    pub disk_timeout: Duration,
    /// What to run.
    pub process: ProcessSpec,
}

/// 1 to 64 characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID_BYTES
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// 1 to 36 characters of `[A-Za-z0-9_.-]` (what QEMU reports in full).
pub fn valid_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_SERIAL_BYTES
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn invalid(parameter: &'static str) -> ContainerError {
    ContainerError::InvalidParameter(parameter)
}

fn bad_process(field: &'static str, reason: impl Into<String>) -> ContainerError {
    ContainerError::InvalidProcessSpec {
        field,
        reason: reason.into(),
    }
}

impl Spec {
    /// Checks a `StartContainer` request.
    pub fn new(req: StartContainerRequest) -> Result<Self, ContainerError> {
        if !valid_id(&req.id) {
            return Err(invalid("id"));
        }
        if req.layers.is_empty() || req.layers.len() > MAX_LAYERS {
            return Err(invalid("layers"));
        }
        for (i, serial) in req.layers.iter().enumerate() {
            if !valid_serial(serial) || req.layers.get(..i).is_some_and(|s| s.contains(serial)) {
                return Err(invalid("layers"));
            }
        }
        let hostname = req.hostname.unwrap_or_else(|| req.id.clone());
        if !valid_hostname(&hostname) {
            return Err(invalid("hostname"));
        }
        let upper = match (req.upper_disk, req.storage_mib) {
            (Some(_), Some(_)) => return Err(invalid("storageMiB")),
            (Some(serial), None) => {
                if !valid_serial(&serial) || req.layers.contains(&serial) {
                    return Err(invalid("upperDisk"));
                }
                Upper::Disk(serial)
            }
            (None, Some(mib)) if !(1..=MAX_STORAGE_MIB).contains(&mib) => {
                return Err(invalid("storageMiB"))
            }
            (None, mib) => Upper::Tmpfs(mib),
        };
        let timeout_ms = req.disk_timeout_ms.unwrap_or(DEFAULT_DISK_TIMEOUT_MS);
        if timeout_ms > LIMIT_DISK_TIMEOUT_MS {
            return Err(invalid("diskTimeoutMs"));
        }
        Ok(Self {
            id: req.id,
            layers: req.layers,
            hostname,
            upper,
            disk_timeout: Duration::from_millis(timeout_ms),
            process: ProcessSpec::new(req.process)?,
        })
    }
}

/// Checks `env` entries (`KEY=VALUE`, key not empty, no NUL) and splits them.
pub fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, String> {
    if env.len() > MAX_PROCESS_STRINGS {
        return Err(format!("more than {MAX_PROCESS_STRINGS} entries"));
    }
    env.iter()
        .map(|entry| match entry.split_once('=') {
            _ if entry.len() > MAX_PROCESS_STRING_BYTES => Err(format!(
                "an entry is longer than {MAX_PROCESS_STRING_BYTES} bytes"
            )),
            _ if entry.contains('\0') => Err("an entry contains a NUL byte".to_owned()),
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(format!("{entry:?} is not KEY=VALUE")),
        })
        .collect()
}

/// `base` with `overrides` applied by key, in order.
pub fn merge_env(
    base: &[(String, String)],
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = base.to_vec();
    for (key, value) in overrides {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1.clone_from(value),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

impl ProcessSpec {
    /// Checks a process description.
    pub fn new(p: ContainerProcess) -> Result<Self, ContainerError> {
        if p.args.is_empty() {
            return Err(bad_process("args", "no program given"));
        }
        if p.args.len() > MAX_PROCESS_STRINGS {
            return Err(bad_process(
                "args",
                format!("more than {MAX_PROCESS_STRINGS} arguments"),
            ));
        }
        if p.args.first().is_some_and(String::is_empty) {
            return Err(bad_process("args", "the program is an empty string"));
        }
        if p.args.iter().any(|a| a.contains('\0')) {
            return Err(bad_process("args", "an argument contains a NUL byte"));
        }
        if p.args.iter().any(|a| a.len() > MAX_PROCESS_STRING_BYTES) {
            return Err(bad_process(
                "args",
                format!("an argument is longer than {MAX_PROCESS_STRING_BYTES} bytes"),
            ));
        }
        let env = parse_env(&p.env).map_err(|reason| bad_process("env", reason))?;
        let total: usize = p.args.iter().chain(&p.env).map(|s| s.len() + 1).sum();
        if total > MAX_PROCESS_TOTAL_BYTES {
            return Err(bad_process(
                "args",
                format!("args and env together exceed {MAX_PROCESS_TOTAL_BYTES} bytes"),
            ));
        }
        let cwd = p.cwd.unwrap_or_else(|| "/".to_owned());
        if !cwd.starts_with('/') {
            return Err(bad_process("cwd", "not an absolute path"));
        }
        if cwd.len() > MAX_PATH_BYTES || cwd.contains('\0') {
            return Err(bad_process("cwd", "too long or contains a NUL byte"));
        }
        let user = match p.user.as_deref() {
            None => UserSpec::default(),
            Some(u) if u.len() > MAX_USER_BYTES => {
                return Err(bad_process("user", "too long"));
            }
            Some(u) => UserSpec::parse(u).map_err(|reason| bad_process("user", reason))?,
        };
        if p.terminal.is_some_and(|t| t.rows == 0 || t.cols == 0) {
            return Err(bad_process("terminal", "rows and cols must be 1 to 65535"));
        }
        Ok(Self {
            args: p.args,
            env,
            cwd,
            user,
            terminal: p.terminal,
            stdin: p.stdin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> StartContainerRequest {
        StartContainerRequest {
            id: "web-1".into(),
            layers: vec!["l0".into(), "l1".into()],
            process: ContainerProcess {
                args: vec!["/bin/sh".into()],
                ..ContainerProcess::default()
            },
            ..StartContainerRequest::default()
        }
    }

    fn culprit(req: StartContainerRequest) -> Option<String> {
        match Spec::new(req) {
            Ok(_) => None,
            Err(ContainerError::InvalidParameter(p)) => Some(p.to_owned()),
            Err(ContainerError::InvalidProcessSpec { field, .. }) => {
                Some(format!("process.{field}"))
            }
            Err(other) => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn a_minimal_request_gets_defaults() {
        let spec = Spec::new(request()).expect("valid");
        assert_eq!(spec.hostname, "web-1");
        assert_eq!(spec.upper, Upper::Tmpfs(None));
        assert_eq!(spec.disk_timeout, Duration::from_secs(10));
        assert_eq!(spec.process.cwd, "/");
        assert_eq!(spec.process.user, UserSpec::default());
    }

    #[test]
    fn checks_id_layers_and_hostname() {
        let with = |f: &dyn Fn(&mut StartContainerRequest)| {
            let mut r = request();
            f(&mut r);
            culprit(r)
        };
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(with(&|r| r.id = bad.into()), Some("id".into()), "{bad:?}");
        }
        assert_eq!(with(&|r| r.layers.clear()), Some("layers".into()));
        assert_eq!(
            with(&|r| r.layers = vec!["x".into(); 2]),
            Some("layers".into())
        );
        assert_eq!(
            with(&|r| r.layers = (0..65).map(|i| format!("l{i}")).collect()),
            Some("layers".into())
        );
        assert_eq!(
            with(&|r| r.layers = vec!["a b".into()]),
            Some("layers".into())
        );
        assert_eq!(
            with(&|r| r.layers = vec!["x".repeat(37)]),
            Some("layers".into())
        );
        assert_eq!(with(&|r| r.layers = vec!["x".repeat(36)]), None);
        assert_eq!(
            with(&|r| r.hostname = Some("bad host".into())),
            Some("hostname".into())
        );
        // An id that is no hostname needs an explicit hostname.
        assert_eq!(with(&|r| r.id = "a_b".into()), None);
    }

    #[test]
    fn checks_upper_and_timeout() {
        let with = |f: &dyn Fn(&mut StartContainerRequest)| {
            let mut r = request();
            f(&mut r);
            culprit(r)
        };
        assert_eq!(
            with(&|r| r.storage_mib = Some(0)),
            Some("storageMiB".into())
        );
        assert_eq!(
            with(&|r| r.storage_mib = Some(MAX_STORAGE_MIB + 1)),
            Some("storageMiB".into())
        );
        assert_eq!(with(&|r| r.storage_mib = Some(64)), None);
        assert_eq!(
            with(&|r| r.upper_disk = Some("l0".into())),
            Some("upperDisk".into())
        );
        assert_eq!(
            with(&|r| {
                r.upper_disk = Some("u".into());
                r.storage_mib = Some(1);
            }),
            Some("storageMiB".into())
        );
        assert_eq!(
            with(&|r| r.disk_timeout_ms = Some(LIMIT_DISK_TIMEOUT_MS + 1)),
            Some("diskTimeoutMs".into())
        );
        let mut r = request();
        r.upper_disk = Some("upper-0".into());
        assert_eq!(
            Spec::new(r).expect("valid").upper,
            Upper::Disk("upper-0".into())
        );
    }

    #[test]
    fn checks_the_process() {
        let with = |f: &dyn Fn(&mut ContainerProcess)| {
            let mut r = request();
            f(&mut r.process);
            culprit(r)
        };
        assert_eq!(with(&|p| p.args.clear()), Some("process.args".into()));
        assert_eq!(
            with(&|p| p.args = vec![String::new()]),
            Some("process.args".into())
        );
        assert_eq!(
            with(&|p| p.args.push("a\0b".into())),
            Some("process.args".into())
        );
        assert_eq!(
            with(&|p| p.args = vec!["x".into(); MAX_PROCESS_STRINGS + 1]),
            Some("process.args".into())
        );
        assert_eq!(
            with(&|p| p.args.push("x".repeat(MAX_PROCESS_STRING_BYTES + 1))),
            Some("process.args".into())
        );
        assert_eq!(
            with(&|p| p.args.extend(vec!["x".repeat(100_000); 11])),
            Some("process.args".into())
        );
        for bad in ["NOEQUALS", "=x", "A=\0"] {
            assert_eq!(
                with(&|p| p.env = vec![bad.into()]),
                Some("process.env".into())
            );
        }
        assert_eq!(
            with(&|p| p.cwd = Some("srv".into())),
            Some("process.cwd".into())
        );
        assert_eq!(
            with(&|p| p.cwd = Some("/a\0".into())),
            Some("process.cwd".into())
        );
        assert_eq!(
            with(&|p| p.user = Some("a b".into())),
            Some("process.user".into())
        );
        assert_eq!(
            with(&|p| p.user = Some("x".repeat(300))),
            Some("process.user".into())
        );
        assert_eq!(with(&|p| p.env = vec!["A=b=c".into(), "E=".into()]), None);
    }

    #[test]
    fn env_merges_by_key() {
        let base = parse_env(&["PATH=/bin".into(), "A=1".into()]).expect("env");
        let over = parse_env(&["A=2".into(), "B=3".into()]).expect("env");
        let merged = merge_env(&base, &over);
        let pairs: Vec<(&str, &str)> = merged
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(pairs, [("PATH", "/bin"), ("A", "2"), ("B", "3")]);
    }
}
