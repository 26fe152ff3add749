//! Containers: processes the agent runs on an overlay of read-only erofs
//! layer disks, each in its own mount, PID, UTS and IPC namespaces
//! (`StartContainer`, `ContainerStatus`, `ListContainers`, `StopContainer`,
//! `RemoveContainer`, `ContainerLogs`, and `Exec` with `container`).
//!
//! [`Containers`] is the one owner of their state; the agent's main loop
//! calls it for every container method and tells it about every child it
//! reaps. A container is `Running` until its process is reaped, then
//! `Exited` (exit status kept) until it is removed; nothing else changes
//! its state ([`Container::exited`] is the only transition).
//!
//! The modules containers need (SCSI disks, erofs, overlay) are loaded by
//! the first `StartContainer` unless the kernel command line asked for
//! them at boot (`cmdline.rs`).

mod disk;
mod logs;
mod mounts;
mod process;
mod spec;
mod user;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent_proto::{
    error, ContainerIdParameters, ContainerInfo, ContainerLogsReply, ContainerLogsRequest,
    ContainerState, DiskParameters, ExecFormatParameters, FailureParameters,
    InvalidProcessSpecParameters, RemoveResult, StartContainerRequest, StopContainerReply,
    StopContainerRequest, TooManyContainersParameters, DEFAULT_LOG_READ_BYTES,
    DEFAULT_STOP_TIMEOUT_MS, LIMIT_LOG_READ_BYTES, LIMIT_STOP_TIMEOUT_MS, LOG_BUFFER_BYTES,
};
use serde_json::{json, Value};

use self::logs::{LogRing, SharedLog};
use self::mounts::{Mounts, UpperSource};
pub use self::process::Enter;
use self::process::{Creds, ExecImage, Launch, Stage};
use self::spec::{merge_env, valid_id, Spec, Upper};
use self::user::Credentials;
use crate::{init, log, sys};

/// Wait for `spec`'s disks and mount its layers, writable layer and
/// overlay under sequence number `seq`; also returns how long the disks
/// took to show up.
fn mount_root(spec: &Spec, seq: u64) -> Result<(Mounts, Duration), ContainerError> {
    let t0 = Instant::now();
    let mut serials: Vec<&str> = spec.layers.iter().map(String::as_str).collect();
    if let Upper::Disk(serial) = &spec.upper {
        serials.push(serial);
    }
    let disks =
        disk::wait_for(&serials, spec.disk_timeout).map_err(ContainerError::DiskNotFound)?;
    let disks_took = t0.elapsed();
    let layer_disks: Vec<(&str, &disk::Disk)> = spec
        .layers
        .iter()
        .map(String::as_str)
        .zip(disks.iter())
        .collect();
    let upper = match (&spec.upper, disks.get(spec.layers.len())) {
        (Upper::Disk(serial), Some(d)) => UpperSource::Disk(serial, d),
        (Upper::Tmpfs(size), _) => UpperSource::Tmpfs(*size),
        (Upper::Disk(serial), None) => return Err(ContainerError::DiskNotFound(serial.clone())),
    };
    Ok((Mounts::set_up(seq, &layer_disks, &upper)?, disks_took))
}

/// An OS image's root, mounted (`os_root.rs`).
pub struct OsRoot {
    /// Where the overlay is.
    pub path: std::path::PathBuf,
    /// The init's argv.
    pub args: Vec<String>,
    /// The init's environment.
    pub env: Vec<(String, String)>,
    /// The container it is once the init runs as PID 1.
    pub info: ContainerInfo,
}

/// The root of an OS image, mounted as a container's would be, with the
/// init checked like a container's process. Its mounts stay for good.
pub fn mount_os_root(req: StartContainerRequest) -> Result<OsRoot, ContainerError> {
    let spec = Spec::new(req)?;
    let (mounts, _) = mount_root(&spec, 0)?;
    let info = ContainerInfo {
        id: OS_MAIN.to_owned(),
        state: ContainerState::Running,
        pid: 1,
        exit_code: None,
        signal: None,
        started_at_ms: sys::boottime_ms(),
        exited_at_ms: None,
        layers: spec.layers,
        upper_disk: match spec.upper {
            Upper::Disk(serial) => Some(serial),
            Upper::Tmpfs(_) => None,
        },
        hostname: spec.hostname,
        handle: None,
    };
    Ok(OsRoot {
        path: mounts.rootfs(),
        args: spec.process.args,
        env: spec.process.env,
        info,
    })
}

/// How long a killed container's process is waited for.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Largest image `/etc/passwd` or `/etc/group` read.
const MAX_ACCOUNT_FILE_BYTES: usize = 1024 * 1024;

/// Why a container method failed; [`ContainerError::reply`] is the one
/// mapping to varlink error names.
#[derive(Debug)]
pub enum ContainerError {
    /// A parameter other than the process is malformed (its wire name).
    InvalidParameter(&'static str),
    /// The process description is unusable.
    InvalidProcessSpec {
        /// `args`, `env`, `cwd` or `user`.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No disk with this serial appeared in time.
    DiskNotFound(String),
    /// The disk with this serial is not erofs.
    NotErofs(String),
    /// A mount failed.
    MountFailed(String),
    /// No container has this id.
    NoSuchContainer(String),
    /// A container has this id already.
    ContainerExists(String),
    /// The container has exited.
    ContainerNotRunning(String),
    /// The limit is reached.
    TooManyContainers(usize),
    /// The program cannot be executed here (`ENOEXEC`).
    ExecFormat(String),
    /// Anything else while starting the process.
    StartFailed(String),
}

impl ContainerError {
    /// The varlink error name and parameters.
    pub fn reply(&self) -> (&'static str, Value) {
        let id = |id: &str| json!(ContainerIdParameters { id: id.to_owned() });
        let disk = |serial: &str| {
            json!(DiskParameters {
                serial: serial.to_owned()
            })
        };
        let message = |message: &str| {
            json!(FailureParameters {
                message: message.to_owned()
            })
        };
        match self {
            Self::InvalidParameter(p) => (error::INVALID_PARAMETER, json!({ "parameter": p })),
            Self::InvalidProcessSpec { field, reason } => (
                error::INVALID_PROCESS_SPEC,
                json!(InvalidProcessSpecParameters {
                    field: (*field).to_owned(),
                    reason: reason.clone()
                }),
            ),
            Self::DiskNotFound(serial) => (error::DISK_NOT_FOUND, disk(serial)),
            Self::NotErofs(serial) => (error::NOT_EROFS, disk(serial)),
            Self::MountFailed(m) => (error::MOUNT_FAILED, message(m)),
            Self::NoSuchContainer(i) => (error::NO_SUCH_CONTAINER, id(i)),
            Self::ContainerExists(i) => (error::CONTAINER_EXISTS, id(i)),
            Self::ContainerNotRunning(i) => (error::CONTAINER_NOT_RUNNING, id(i)),
            Self::TooManyContainers(max) => (
                error::TOO_MANY_CONTAINERS,
                json!(TooManyContainersParameters {
                    max: u32::try_from(*max).unwrap_or(u32::MAX)
                }),
            ),
            Self::ExecFormat(program) => (
                error::EXEC_FORMAT_ERROR,
                json!(ExecFormatParameters {
                    program: program.clone()
                }),
            ),
            Self::StartFailed(m) => (error::CONTAINER_START_FAILED, message(m)),
        }
    }
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    code: i32,
    signal: Option<i32>,
    at_ms: u64,
}

#[derive(Debug)]
enum State {
    Running,
    Exited(Exit),
}

/// One container.
#[derive(Debug)]
struct Container {
    id: String,
    pid: u32,
    pidfd: Option<OwnedFd>,
    state: State,
    started_at_ms: u64,
    layers: Vec<String>,
    upper_disk: Option<String>,
    hostname: String,
    /// What an `Exec` in the container inherits.
    env: Vec<(String, String)>,
    cwd: String,
    creds: Credentials,
    mounts: Mounts,
    log: SharedLog,
    /// Its streamed-process handle (a terminal or stdin).
    handle: Option<u64>,
}

impl Container {
    /// The only state transition: `Running` → `Exited`. A second report
    /// (the status was collected twice) keeps the first.
    fn exited(&mut self, status: ExitStatus) {
        if let State::Running = self.state {
            let signal = status.signal();
            let code = match (status.code(), signal) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => -1,
            };
            self.state = State::Exited(Exit {
                code,
                signal,
                at_ms: sys::boottime_ms(),
            });
            self.pidfd = None;
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, State::Running)
    }

    fn info(&self) -> ContainerInfo {
        let exit = match self.state {
            State::Running => None,
            State::Exited(exit) => Some(exit),
        };
        ContainerInfo {
            id: self.id.clone(),
            state: if exit.is_some() {
                ContainerState::Exited
            } else {
                ContainerState::Running
            },
            pid: self.pid,
            exit_code: exit.map(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            started_at_ms: self.started_at_ms,
            exited_at_ms: exit.map(|e| e.at_ms),
            layers: self.layers.clone(),
            upper_disk: self.upper_disk.clone(),
            hostname: self.hostname.clone(),
            handle: self.handle,
        }
    }

    fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.pid).unwrap_or(libc::pid_t::MAX)
    }

    /// Collects the exit status if the process has exited.
    fn poll_exit(&mut self) {
        if self.running() {
            if let Ok(Some(status)) = sys::try_wait(self.pid()) {
                self.exited(status);
            }
        }
    }

    /// Sends `signal`; false if the process is gone already.
    fn signal(&self, signal: libc::c_int) -> bool {
        match &self.pidfd {
            Some(fd) => sys::pidfd_send_signal(fd, signal).is_ok(),
            None => false,
        }
    }

    /// Waits up to `timeout` for the process to end and collects it.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        if let Some(fd) = &self.pidfd {
            if let Err(e) = sys::pidfd_wait(fd, timeout) {
                log::error!("container {}: waiting: {e}", self.id);
            }
        }
        self.poll_exit();
        !self.running()
    }
}

/// The container name of an OS image's root (the engine's `main`).
pub const OS_MAIN: &str = "main";

/// Every container of the guest.
#[derive(Debug)]
pub struct Containers {
    list: Vec<Container>,
    /// The OS image's root, when this guest booted one.
    os_main: Option<Result<ContainerInfo, String>>,
    max: usize,
    next_seq: u64,
    modules_loaded: bool,
}

/// The mount point of a directory the image must have, made a directory if
/// it is missing or something else (a symlink in the image must not send
/// a mount elsewhere).
fn ensure_plain_dir(root: &Path, name: &str) -> io::Result<()> {
    let path = root.join(name);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(&path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::create_dir(&path)
}

fn read_account_file(root: &Path, name: &str) -> Option<String> {
    match sys::read_in_root(root, name, MAX_ACCOUNT_FILE_BYTES) {
        Ok(data) => data.map(|d| String::from_utf8_lossy(&d).into_owned()),
        Err(e) => {
            log::error!("reading the image's {name}: {e}");
            None
        }
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| ContainerError::StartFailed(format!("{what} contains NUL")))
}

/// A started process, before it becomes a [`Container`].
#[derive(Debug)]
struct Launched {
    pid: u32,
    pidfd: Option<OwnedFd>,
    log: SharedLog,
    env: Vec<(String, String)>,
    creds: Credentials,
    attached: Option<AttachedProcess>,
}

/// A container's process started with a terminal or stdin: its stdio is
/// a streamed process's ([`crate::session::Sessions::adopt`]), not the
/// log ring.
#[derive(Debug)]
pub struct AttachedProcess {
    /// The spawned process (its pipes, when it has no terminal).
    pub child: std::process::Child,
    /// The terminal's master.
    pub master: Option<std::fs::File>,
}

/// The stdio of `process`: a new terminal, pipes with stdin, or the log
/// ring's pipes; and the terminal's master.
fn process_stdio(
    process: &spec::ProcessSpec,
) -> Result<(process::ProcessStdio, Option<std::fs::File>), ContainerError> {
    let failed = |e: io::Error| ContainerError::StartFailed(format!("terminal: {e}"));
    match process.terminal {
        Some(size) => {
            let (master, slave) = crate::session::open_pty(size).map_err(failed)?;
            let stdio = process::ProcessStdio {
                stdin: slave.try_clone().map_err(failed)?.into(),
                stdout: slave.try_clone().map_err(failed)?.into(),
                stderr: slave.into(),
            };
            Ok((stdio, Some(master)))
        }
        None if process.stdin => Ok((
            process::ProcessStdio {
                stdin: Stdio::piped(),
                stdout: Stdio::piped(),
                stderr: Stdio::piped(),
            },
            None,
        )),
        None => Ok((process::ProcessStdio::logged(), None)),
    }
}

/// Starts the process of `spec` on the overlay at `root`.
fn launch(spec: &Spec, root: &Path) -> Result<Launched, ContainerError> {
    for dir in ["proc", "dev", "sys"] {
        ensure_plain_dir(root, dir).map_err(|e| {
            ContainerError::StartFailed(format!("making /{dir} in the container: {e}"))
        })?;
    }
    let user = &spec.process.user;
    let (passwd, group) = if user.needs_lookup() {
        (
            read_account_file(root, "etc/passwd"),
            read_account_file(root, "etc/group"),
        )
    } else {
        (None, None)
    };
    let creds = user
        .resolve(passwd.as_deref(), group.as_deref())
        .map_err(|reason| ContainerError::InvalidProcessSpec {
            field: "user",
            reason,
        })?;
    let mut env = spec.process.env.clone();
    let mut defaults = Vec::new();
    if !env.iter().any(|(k, _)| k == "PATH") {
        defaults.push(("PATH".to_owned(), spec::DEFAULT_PATH.to_owned()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        defaults.push((
            "HOME".to_owned(),
            creds.home.clone().unwrap_or_else(|| "/".to_owned()),
        ));
    }
    defaults.append(&mut env);
    let env = defaults;
    let image = ExecImage::new(&spec.process.args, &env)
        .map_err(|e| ContainerError::StartFailed(format!("program: {e}")))?;
    let launch = Launch {
        root: cstring(&root.display().to_string(), "root")?,
        steps: process::root_steps(root)
            .map_err(|e| ContainerError::StartFailed(format!("root: {e}")))?,
        hostname: cstring(&spec.hostname, "hostname")?,
        cwd_chain: Launch::cwd_chain(&spec.process.cwd)
            .map_err(|e| ContainerError::StartFailed(format!("cwd: {e}")))?,
        creds: Creds::from(&creds),
        image,
        keep_stdin: spec.process.attached(),
        controlling_terminal: spec.process.terminal.is_some(),
    };
    let (stdio, master) = process_stdio(&spec.process)?;
    let program = spec.process.args.first().cloned().unwrap_or_default();
    let mut child =
        process::start(launch, stdio).map_err(|e| match (e.stage, e.error.raw_os_error()) {
            (Stage::Exec, Some(libc::ENOEXEC)) => ContainerError::ExecFormat(program.clone()),
            (Stage::Exec, Some(libc::ENOENT)) => ContainerError::StartFailed(format!(
                "{program}: no such program in the container (or its interpreter is missing)"
            )),
            (stage, _) => {
                ContainerError::StartFailed(format!("{} ({program}): {}", stage.doing(), e.error))
            }
        })?;
    let pid = child.id();
    let pidfd = sys::pidfd_open(pid)
        .map_err(|e| log::error!("container {}: pidfd_open: {e}", spec.id))
        .ok();
    let log: SharedLog = Arc::new(Mutex::new(LogRing::new(LOG_BUFFER_BYTES)));
    if spec.process.attached() {
        return Ok(Launched {
            pid,
            pidfd,
            log,
            env,
            creds,
            attached: Some(AttachedProcess { child, master }),
        });
    }
    match (child.stdout.take(), child.stderr.take()) {
        (Some(out), Some(err)) => {
            if let Err(e) = logs::spawn_collector(out, err, Arc::clone(&log)) {
                // Without a reader the container would block on a full
                // pipe: better not to start it at all.
                if let Some(fd) = &pidfd {
                    let _ = sys::pidfd_send_signal(fd, libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(ContainerError::StartFailed(format!("log collector: {e}")));
            }
        }
        _ => log::error!("container {}: no output pipes", spec.id),
    }
    Ok(Launched {
        pid,
        pidfd,
        log,
        env,
        creds,
        attached: None,
    })
}

impl Containers {
    /// An empty table allowing `max` containers.
    pub fn new(max: usize) -> Self {
        Self {
            list: Vec::new(),
            os_main: None,
            max,
            next_seq: mounts::next_seq(Path::new(mounts::CONTAINERS_DIR)),
            modules_loaded: false,
        }
    }

    /// Loads the container modules (once; again after a failure).
    pub fn load_modules(&mut self) -> io::Result<()> {
        if !self.modules_loaded {
            init::load_module_list(init::CONTAINER_MODULES_LIST)?;
            self.modules_loaded = true;
        }
        Ok(())
    }

    /// A child of the agent was reaped: if it is a container's process,
    /// that container has exited.
    pub fn child_exited(&mut self, pid: libc::pid_t, status: ExitStatus) {
        if let Some(c) = self.list.iter_mut().find(|c| c.running() && c.pid() == pid) {
            c.exited(status);
        }
    }

    /// The container `id`; a malformed id is an invalid parameter.
    fn find(&mut self, id: &str) -> Result<&mut Container, ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidParameter("id"));
        }
        self.list
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| ContainerError::NoSuchContainer(id.to_owned()))
    }

    /// `StartContainer`.
    /// `StartContainer`; for a process with a terminal or stdin also its
    /// stdio, for the caller to make a streamed process of
    /// ([`Containers::set_handle`]).
    pub fn start(
        &mut self,
        req: StartContainerRequest,
    ) -> Result<(ContainerInfo, Option<AttachedProcess>), ContainerError> {
        let spec = Spec::new(req)?;
        if self.list.iter().any(|c| c.id == spec.id) {
            return Err(ContainerError::ContainerExists(spec.id));
        }
        if self.list.len() >= self.max {
            return Err(ContainerError::TooManyContainers(self.max));
        }
        let t0 = Instant::now();
        self.load_modules().map_err(|e| {
            ContainerError::MountFailed(format!("loading the container modules: {e}"))
        })?;
        let t_modules = t0.elapsed();

        let seq = self.next_seq;
        self.next_seq += 1;
        let (mut mounts, disks_took) = mount_root(&spec, seq)?;
        let t_disks = t_modules + disks_took;
        let t_mounts = t0.elapsed();

        let mut launched = match launch(&spec, &mounts.rootfs()) {
            Ok(launched) => launched,
            Err(e) => {
                mounts.unmount_all();
                return Err(e);
            }
        };
        let container = Container {
            id: spec.id,
            pid: launched.pid,
            pidfd: launched.pidfd,
            state: State::Running,
            started_at_ms: sys::boottime_ms(),
            upper_disk: match &spec.upper {
                Upper::Disk(serial) => Some(serial.clone()),
                Upper::Tmpfs(_) => None,
            },
            layers: spec.layers,
            hostname: spec.hostname,
            env: launched.env,
            cwd: spec.process.cwd,
            creds: launched.creds,
            mounts,
            log: launched.log,
            handle: None,
        };
        let attached = launched.attached.take();
        log::info!(
            "container {} started as pid {} ({} layers; modules {} ms, disks {} ms, mounts {} ms, started {} ms)",
            container.id,
            container.pid,
            container.layers.len(),
            t_modules.as_millis(),
            t_disks.saturating_sub(t_modules).as_millis(),
            t_mounts.saturating_sub(t_disks).as_millis(),
            t0.elapsed().as_millis()
        );
        let info = container.info();
        self.list.push(container);
        Ok((info, attached))
    }

    /// The streamed-process handle of container `id`'s process.
    pub fn set_handle(&mut self, id: &str, handle: u64) -> Option<ContainerInfo> {
        let c = self.list.iter_mut().find(|c| c.id == id)?;
        c.handle = Some(handle);
        Some(c.info())
    }

    /// The exits of streamed container processes, for the sessions: a
    /// container waiting for its own process (`StopContainer`) collects
    /// the status before PID 1's reaping can.
    pub fn attached_exits(&self) -> Vec<(libc::pid_t, kiln_agent_proto::ProcessExit)> {
        self.list
            .iter()
            .filter(|c| c.handle.is_some())
            .filter_map(|c| match c.state {
                State::Exited(exit) => Some((
                    c.pid(),
                    kiln_agent_proto::ProcessExit {
                        exit_code: exit.code,
                        signal: exit.signal,
                    },
                )),
                State::Running => None,
            })
            .collect()
    }

    /// `ContainerStatus`.
    pub fn status(&mut self, id: &str) -> Result<ContainerInfo, ContainerError> {
        if let Some(os) = self.os_main.as_ref().filter(|_| id == OS_MAIN) {
            return os.clone().map_err(ContainerError::StartFailed);
        }
        let c = self.find(id)?;
        c.poll_exit();
        Ok(c.info())
    }

    /// `ListContainers`.
    pub fn list(&mut self) -> Vec<ContainerInfo> {
        let os = self.os_main.iter().filter_map(|os| os.clone().ok());
        os.chain(self.list.iter_mut().map(|c| {
            c.poll_exit();
            c.info()
        }))
        .collect()
    }

    /// What became of the OS image's hand-over (`os_root`): its init runs
    /// as PID 1 (the container [`OS_MAIN`]), or why not. `ContainerStatus`
    /// of `main` answers with it.
    pub fn set_os_main(&mut self, outcome: Result<ContainerInfo, String>) {
        self.os_main = Some(outcome);
    }

    /// `StopContainer`.
    pub fn stop(
        &mut self,
        req: &StopContainerRequest,
    ) -> Result<StopContainerReply, ContainerError> {
        let signal = req.signal.unwrap_or(libc::SIGTERM);
        if !(1..=64).contains(&signal) {
            return Err(ContainerError::InvalidParameter("signal"));
        }
        let timeout_ms = req.timeout_ms.unwrap_or(DEFAULT_STOP_TIMEOUT_MS);
        if timeout_ms > LIMIT_STOP_TIMEOUT_MS {
            return Err(ContainerError::InvalidParameter("timeoutMs"));
        }
        let c = self.find(&req.id)?;
        c.poll_exit();
        let mut killed = false;
        if c.running() {
            c.signal(signal);
            if req.wait == Some(false) {
                // The host waits: this loop serves the VM's other calls.
                c.poll_exit();
            } else if !c.wait_exit(Duration::from_millis(timeout_ms)) {
                killed = c.signal(libc::SIGKILL);
                if !c.wait_exit(KILL_WAIT) {
                    log::error!("container {}: still running after SIGKILL", c.id);
                }
            }
        }
        Ok(StopContainerReply {
            container: c.info(),
            killed,
        })
    }

    /// `RemoveContainer`: kill, wait, unmount, forget.
    pub fn remove(&mut self, id: &str) -> Result<RemoveResult, ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidParameter("id"));
        }
        let Some(index) = self.list.iter().position(|c| c.id == id) else {
            return Ok(RemoveResult::AlreadyGone);
        };
        let mut c = self.list.remove(index);
        c.poll_exit();
        if c.running() {
            c.signal(libc::SIGKILL);
            if !c.wait_exit(KILL_WAIT) {
                log::error!(
                    "container {}: still running after SIGKILL; unmounting lazily",
                    c.id
                );
            }
        }
        c.mounts.unmount_all();
        Ok(RemoveResult::Removed)
    }

    /// `ContainerLogs`.
    pub fn logs(
        &mut self,
        req: &ContainerLogsRequest,
    ) -> Result<ContainerLogsReply, ContainerError> {
        let max = req.max_bytes.unwrap_or(DEFAULT_LOG_READ_BYTES);
        if max == 0 || max > LIMIT_LOG_READ_BYTES {
            return Err(ContainerError::InvalidParameter("maxBytes"));
        }
        let c = self.find(&req.id)?;
        c.poll_exit();
        let exited = !c.running();
        let read = logs::lock(&c.log).read(req.since, usize::try_from(max).unwrap_or(usize::MAX));
        Ok(ContainerLogsReply {
            entries: read.entries,
            cursor: read.cursor,
            dropped: read.dropped,
            ended: exited && read.complete,
        })
    }

    /// Where a running container's root is seen from the agent
    /// (`/proc/<pid>/root`), for the file calls.
    pub fn root(&mut self, id: &str) -> Result<std::path::PathBuf, ContainerError> {
        let c = self.find(id)?;
        c.poll_exit();
        if !c.running() {
            return Err(ContainerError::ContainerNotRunning(id.to_owned()));
        }
        Ok(std::path::PathBuf::from(format!("/proc/{}/root", c.pid)))
    }

    /// What `Exec` needs to run `argv` with extra `env` in container `id`.
    pub fn enter(
        &mut self,
        id: &str,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<Enter, ContainerError> {
        let c = self.find(id)?;
        c.poll_exit();
        if !c.running() {
            return Err(ContainerError::ContainerNotRunning(id.to_owned()));
        }
        let env = merge_env(&c.env, env);
        let image =
            ExecImage::new(argv, &env).map_err(|e| ContainerError::StartFailed(e.to_string()))?;
        Enter::open(c.pid, &c.cwd, Creds::from(&c.creds), image).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ContainerError::ContainerNotRunning(id.to_owned())
            } else {
                ContainerError::StartFailed(format!("entering the container: {e}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_and_parameters() {
        let cases = [
            (
                ContainerError::InvalidParameter("id"),
                error::INVALID_PARAMETER,
                json!({"parameter": "id"}),
            ),
            (
                ContainerError::InvalidProcessSpec {
                    field: "cwd",
                    reason: "relative".into(),
                },
                error::INVALID_PROCESS_SPEC,
                json!({"field": "cwd", "reason": "relative"}),
            ),
            (
                ContainerError::DiskNotFound("s".into()),
                error::DISK_NOT_FOUND,
                json!({"serial": "s"}),
            ),
            (
                ContainerError::NotErofs("s".into()),
                error::NOT_EROFS,
                json!({"serial": "s"}),
            ),
            (
                ContainerError::MountFailed("m".into()),
                error::MOUNT_FAILED,
                json!({"message": "m"}),
            ),
            (
                ContainerError::NoSuchContainer("c".into()),
                error::NO_SUCH_CONTAINER,
                json!({"id": "c"}),
            ),
            (
                ContainerError::ContainerExists("c".into()),
                error::CONTAINER_EXISTS,
                json!({"id": "c"}),
            ),
            (
                ContainerError::ContainerNotRunning("c".into()),
                error::CONTAINER_NOT_RUNNING,
                json!({"id": "c"}),
            ),
            (
                ContainerError::TooManyContainers(8),
                error::TOO_MANY_CONTAINERS,
                json!({"max": 8}),
            ),
            (
                ContainerError::ExecFormat("/x".into()),
                error::EXEC_FORMAT_ERROR,
                json!({"program": "/x"}),
            ),
            (
                ContainerError::StartFailed("m".into()),
                error::CONTAINER_START_FAILED,
                json!({"message": "m"}),
            ),
        ];
        for (err, name, params) in cases {
            assert_eq!(err.reply(), (name, params), "{err:?}");
        }
    }

    fn running(id: &str, pid: u32) -> Container {
        Container {
            id: id.to_owned(),
            pid,
            pidfd: None,
            state: State::Running,
            started_at_ms: 5,
            layers: vec!["l0".into()],
            upper_disk: None,
            hostname: id.to_owned(),
            env: Vec::new(),
            cwd: "/".into(),
            creds: Credentials {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: None,
            },
            mounts: Mounts::none(),
            log: Arc::new(Mutex::new(LogRing::new(1024))),
            handle: None,
        }
    }

    /// The whole transition table: Running -> Exited on the first report;
    /// an exited container stays as it exited.
    #[test]
    fn running_exits_once() {
        let mut c = running("a", 10);
        assert_eq!(c.info().state, ContainerState::Running);
        assert_eq!((c.info().exit_code, c.info().signal), (None, None));
        c.exited(ExitStatus::from_raw(3 << 8));
        let info = c.info();
        assert_eq!(info.state, ContainerState::Exited);
        assert_eq!((info.exit_code, info.signal), (Some(3), None));
        assert!(info.exited_at_ms.is_some());
        c.exited(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!(
            c.info().exit_code,
            Some(3),
            "a second report changes nothing"
        );
        let mut k = running("b", 11);
        k.exited(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!((k.info().exit_code, k.info().signal), (Some(137), Some(9)));
    }

    #[test]
    fn reaped_children_reach_their_container_only() {
        let mut table = Containers::new(8);
        table.list.push(running("a", 10));
        table.list.push(running("b", 11));
        table.child_exited(99, ExitStatus::from_raw(0));
        table.child_exited(11, ExitStatus::from_raw(0));
        let states: Vec<ContainerState> = table.list.iter().map(|c| c.info().state).collect();
        assert_eq!(states, [ContainerState::Running, ContainerState::Exited]);
        assert!(matches!(
            table.enter("b", &["true".into()], &[]),
            Err(ContainerError::ContainerNotRunning(_))
        ));
        let logs = table
            .logs(&ContainerLogsRequest {
                id: "b".into(),
                since: None,
                max_bytes: None,
            })
            .expect("logs");
        assert!(!logs.ended, "exited, but its output is not closed yet");
    }

    #[test]
    fn a_full_table_refuses_before_touching_anything() {
        let mut table = Containers::new(0);
        let req: StartContainerRequest = serde_json::from_value(json!({
            "id": "a", "layers": ["x"], "process": {"args": ["true"]}
        }))
        .expect("request");
        assert!(matches!(
            table.start(req),
            Err(ContainerError::TooManyContainers(0))
        ));
        assert!(matches!(
            table.status("a"),
            Err(ContainerError::NoSuchContainer(_))
        ));
        assert!(matches!(table.remove("a"), Ok(RemoveResult::AlreadyGone)));
        assert!(matches!(
            table.remove("../a"),
            Err(ContainerError::InvalidParameter("id"))
        ));
        assert!(matches!(
            table.status(&"x".repeat(100)),
            Err(ContainerError::InvalidParameter("id"))
        ));
        assert!(table.list().is_empty());
    }

    #[test]
    fn invalid_requests_fail_before_the_limit_check() {
        let mut table = Containers::new(0);
        let req: StartContainerRequest = serde_json::from_value(json!({
            "id": "a", "layers": ["x"], "process": {"args": []}
        }))
        .expect("request");
        assert!(matches!(
            table.start(req),
            Err(ContainerError::InvalidProcessSpec { field: "args", .. })
        ));
    }

    #[test]
    fn stop_and_logs_validate_their_limits() {
        let mut table = Containers::new(1);
        let stop = |signal, timeout_ms| StopContainerRequest {
            id: "a".into(),
            signal,
            timeout_ms,
            wait: None,
        };
        assert!(matches!(
            table.stop(&stop(Some(0), None)),
            Err(ContainerError::InvalidParameter("signal"))
        ));
        assert!(matches!(
            table.stop(&stop(None, Some(LIMIT_STOP_TIMEOUT_MS + 1))),
            Err(ContainerError::InvalidParameter("timeoutMs"))
        ));
        assert!(matches!(
            table.stop(&stop(None, None)),
            Err(ContainerError::NoSuchContainer(_))
        ));
        let logs = |max_bytes| ContainerLogsRequest {
            id: "a".into(),
            since: None,
            max_bytes,
        };
        assert!(matches!(
            table.logs(&logs(Some(0))),
            Err(ContainerError::InvalidParameter("maxBytes"))
        ));
        assert!(matches!(
            table.logs(&logs(Some(LIMIT_LOG_READ_BYTES + 1))),
            Err(ContainerError::InvalidParameter("maxBytes"))
        ));
        assert!(matches!(
            table.logs(&logs(None)),
            Err(ContainerError::NoSuchContainer(_))
        ));
    }
}
