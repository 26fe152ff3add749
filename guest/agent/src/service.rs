//! The varlink service: turns one frame into one reply. Interfaces served:
//! `io.kiln.Agent` and `org.varlink.service` (introspection).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_agent_proto::{
    error, method, Call, ConfigureNetworkRequest, ContainerIdRequest, ContainerLogsRequest,
    ContainerReply, ExecFormatParameters, ExecInRequest, FailureParameters, FileLocation,
    ListContainersReply, MakeDirectoryRequest, MakeSymlinkRequest, NoSuchInterfaceParameters,
    NoSuchProcessParameters, PingReply, PingRequest, ProcessHandleRequest, ReadFileRequest,
    ReadProcessReply, ReadProcessRequest, RemoveContainerReply, Reply, ResizeProcessRequest,
    SetIdentityRequest, SignalProcessRequest, SpawnProcessRequest, StartContainerRequest,
    StopContainerRequest, TooManyProcessesParameters, WriteFileRequest, WriteProcessRequest,
    INTERFACE, MAX_PROCESSES,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cmdline::BootOptions;
use crate::container::{ContainerError, Containers};
use crate::exec::{self, Plan, SpawnFailed};
use crate::files::{self, FileError, Target};
use crate::frame::Frame;
use crate::identity::{Identity, IdentityFiles};
use crate::network::{NetworkFailure, NetworkPlan, NetworkState};
use crate::params::{self, InvalidParameter};
use crate::session::{self, SessionError, Sessions};
use crate::{log, sys};

/// How often a waiting `ReadProcess` reaps children, to see exits.
const READ_WAIT_SLICE: Duration = Duration::from_millis(10);

/// The IDL of `io.kiln.Agent`, served by `GetInterfaceDescription`.
pub const AGENT_IDL: &str = include_str!("../../io.kiln.Agent.varlink");
/// The IDL of `org.varlink.service` (from the varlink specification).
pub const SERVICE_IDL: &str = kiln_agent_proto::VARLINK_SERVICE_IDL;
const SERVICE_INTERFACE: &str = "org.varlink.service";
const GET_INFO: &str = "org.varlink.service.GetInfo";
const GET_INTERFACE_DESCRIPTION: &str = "org.varlink.service.GetInterfaceDescription";
const INTERFACE_NOT_FOUND: &str = "org.varlink.service.InterfaceNotFound";

/// Version of this agent, reported by `Ping` and `GetInfo`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the main loop must do once the reply has been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// `sync` and power off.
    PowerOff,
    /// `sync` and reboot.
    Reboot,
}

/// Result of handling one frame.
#[derive(Debug)]
pub struct Response {
    /// Encoded reply, NUL included; `None` for `oneway` calls.
    pub bytes: Option<Vec<u8>>,
    /// Action to take after the reply is sent.
    pub after: After,
}

/// The agent's state: what outlives one call.
#[derive(Debug)]
pub struct Agent {
    containers: Containers,
    sessions: Sessions,
    network: NetworkState,
    /// The files of the last `SetIdentity`, not written yet: see
    /// [`Agent::catch_up`].
    identity_files_due: Option<IdentityFiles>,
    /// `/dev/random`, kept open for `SetIdentity` (`identity::open_random`).
    random: Option<std::fs::File>,
}

impl Agent {
    /// A fresh agent configured by `options`.
    pub fn new(options: &BootOptions) -> Self {
        let mut containers = Containers::new(options.max_containers);
        if options.container_modules_at_boot {
            if let Err(e) = containers.load_modules() {
                log::error!("container modules: {e}");
            }
        }
        Self {
            containers,
            sessions: Sessions::default(),
            network: NetworkState::default(),
            identity_files_due: None,
            random: crate::identity::open_random()
                .map_err(|e| log::error!("/dev/random: {e}"))
                .ok(),
        }
    }

    /// Reaps every exited child; a container's process updates its
    /// container, a streamed process its session. Call only while no
    /// `Exec` child is being waited for.
    pub fn reap(&mut self) {
        let (containers, sessions) = (&mut self.containers, &mut self.sessions);
        sys::reap_children(|pid, status| {
            containers.child_exited(pid, status);
            sessions.child_exited(pid, status);
        });
    }

    /// Does the work left until the agent has answered every call it has
    /// read: writing the last identity's files and turning IPv6 on where
    /// the last `ConfigureNetwork` asked for it. kilnd sends a fresh
    /// clone's `SetIdentity` and `ConfigureNetwork` together, and each is
    /// guest code TCG translates afresh (the first file writes ~10 ms,
    /// IPv6 ~4 ms): left until both are answered, neither delays the
    /// clone. A call that could see the result does the work first
    /// ([`Agent::catch_up_before`]).
    pub fn catch_up(&mut self) {
        self.write_identity_files();
        self.network.catch_up();
    }

    /// The part of [`Agent::catch_up`] a call to `method` could see: all
    /// of it, but for the identity's files before a `Ping` or a
    /// `ConfigureNetwork` (neither reads them) and IPv6 before a `Ping` or
    /// a `SetIdentity`.
    fn catch_up_before(&mut self, method: &str) {
        if !matches!(method, method::PING | method::CONFIGURE_NETWORK) {
            self.write_identity_files();
        }
        if !matches!(method, method::PING | method::SET_IDENTITY) {
            self.network.catch_up();
        }
    }

    fn write_identity_files(&mut self) {
        if let Some(files) = self.identity_files_due.take() {
            files.write();
        }
    }

    /// Handles one frame from the port.
    pub fn handle_frame(&mut self, frame: &Frame) -> Response {
        let message = match frame {
            Frame::TooLarge => {
                return respond(
                    invalid_parameter(&InvalidParameter::new("parameters")),
                    After::Continue,
                )
            }
            Frame::Message(message) => message,
        };
        let value: Value = match serde_json::from_slice(message) {
            Ok(value) => value,
            Err(_) => {
                return respond(
                    invalid_parameter(&InvalidParameter::new("method")),
                    After::Continue,
                )
            }
        };
        let oneway = value
            .get("oneway")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let call: Call = match serde_json::from_value(value) {
            Ok(call) => call,
            Err(_) => {
                return respond(
                    invalid_parameter(&InvalidParameter::new("method")),
                    After::Continue,
                )
            }
        };
        self.catch_up_before(&call.method);
        // Container methods see exits that happened while the host was idle.
        self.reap();
        let (reply, after) = self.dispatch(&call);
        let mut response = respond(reply, after);
        if oneway {
            response.bytes = None;
        }
        response
    }

    /// Dispatches a decoded call.
    pub fn dispatch(&mut self, call: &Call) -> (Reply, After) {
        let params = call.parameters.as_ref();
        let containers = &mut self.containers;
        let reply = match call.method.as_str() {
            method::EXEC => params::decode::<ExecInRequest>(params)
                .and_then(|req| Ok((Plan::new(req.exec)?, req.container)))
                .map(|(plan, container)| run_exec(containers, plan, container)),
            method::START_CONTAINER => {
                params::decode::<StartContainerRequest>(params).map(|req| self.start_container(req))
            }
            method::CONTAINER_STATUS => params::decode::<ContainerIdRequest>(params).map(|req| {
                container_reply(
                    containers
                        .status(&req.id)
                        .map(|container| ContainerReply { container }),
                )
            }),
            method::LIST_CONTAINERS => Ok(ok(&ListContainersReply {
                containers: containers.list(),
            })),
            method::STOP_CONTAINER => params::decode::<StopContainerRequest>(params)
                .map(|req| container_reply(containers.stop(&req))),
            method::REMOVE_CONTAINER => params::decode::<ContainerIdRequest>(params).map(|req| {
                container_reply(
                    containers
                        .remove(&req.id)
                        .map(|result| RemoveContainerReply { result }),
                )
            }),
            method::CONTAINER_LOGS => params::decode::<ContainerLogsRequest>(params)
                .map(|req| container_reply(containers.logs(&req))),
            method::SPAWN_PROCESS => {
                params::decode::<SpawnProcessRequest>(params).map(|req| self.spawn_process(&req))
            }
            method::READ_PROCESS => params::decode::<ReadProcessRequest>(params)
                .map(|req| session_reply(self.read_process(&req))),
            method::WRITE_PROCESS => params::decode::<WriteProcessRequest>(params)
                .map(|req| session_reply(self.sessions.write(req.handle, &req.data, req.close))),
            method::SIGNAL_PROCESS => params::decode::<SignalProcessRequest>(params)
                .map(|req| session_reply(self.sessions.signal(req.handle, req.signal).map(empty))),
            method::RESIZE_PROCESS => params::decode::<ResizeProcessRequest>(params)
                .map(|req| session_reply(self.sessions.resize(req.handle, req.size).map(empty))),
            method::RELEASE_PROCESS => params::decode::<ProcessHandleRequest>(params)
                .map(|req| session_reply(self.sessions.release(req.handle).map(empty))),
            method::WRITE_FILE => params::decode::<WriteFileRequest>(params)
                .map(|req| self.file_call(&req.at, |t| files::write_file(t, &req).map(empty))),
            method::READ_FILE => params::decode::<ReadFileRequest>(params)
                .map(|req| self.file_call(&req.at, |t| files::read_file(t, &req))),
            method::MAKE_DIRECTORY => params::decode::<MakeDirectoryRequest>(params)
                .map(|req| self.file_call(&req.at, |t| files::make_directory(t, &req).map(empty))),
            method::MAKE_SYMLINK => params::decode::<MakeSymlinkRequest>(params)
                .map(|req| self.file_call(&req.at, |t| files::make_symlink(t, &req).map(empty))),
            method::STAT_PATH => params::decode::<FileLocation>(params)
                .map(|at| self.file_call(&at, files::stat_path)),
            method::LIST_DIRECTORY => params::decode::<FileLocation>(params)
                .map(|at| self.file_call(&at, files::list_directory)),
            method::SET_IDENTITY => params::decode::<SetIdentityRequest>(params)
                .and_then(Identity::new)
                .map(|identity| match identity.apply(self.random.as_ref()) {
                    Ok(files) => {
                        self.identity_files_due = Some(files);
                        ok(&json!({}))
                    }
                    Err(e) => failure(error::IDENTITY_FAILED, e.0),
                }),
            method::CONFIGURE_NETWORK => params::decode::<ConfigureNetworkRequest>(params)
                .and_then(NetworkPlan::new)
                .map(|plan| match plan.apply(&mut self.network) {
                    Ok(reply) => ok(&reply),
                    Err(NetworkFailure::NoSuchInterface(mac)) => error_reply(
                        error::NO_SUCH_INTERFACE,
                        json!(NoSuchInterfaceParameters { mac }),
                    ),
                    Err(NetworkFailure::Failed(message)) => failure(error::NETWORK_FAILED, message),
                }),
            _ => return dispatch(call),
        };
        // A container that collected its own streamed process's exit
        // (StopContainer) tells the session.
        for (pid, exit) in self.containers.attached_exits() {
            self.sessions.exited(pid, exit);
        }
        (
            reply.unwrap_or_else(|p| invalid_parameter(&p)),
            After::Continue,
        )
    }
}

impl Agent {
    /// What became of the OS image this guest booted (`os_root`).
    pub fn set_os_main(&mut self, outcome: Result<kiln_agent_proto::ContainerInfo, String>) {
        self.containers.set_os_main(outcome);
    }

    /// `StartContainer`; a process with a terminal or stdin becomes a
    /// streamed process, its handle in the reply.
    fn start_container(&mut self, req: StartContainerRequest) -> Reply {
        let id = req.id.clone();
        let (info, attached) = match self.containers.start(req) {
            Ok(started) => started,
            Err(e) => return container_error(&e),
        };
        let Some(mut attached) = attached else {
            return ok(&ContainerReply { container: info });
        };
        match self.sessions.adopt(&mut attached.child, attached.master) {
            Ok(spawned) => {
                let container = self
                    .containers
                    .set_handle(&id, spawned.handle)
                    .unwrap_or(info);
                ok(&ContainerReply { container })
            }
            Err(e) => {
                // Nobody could reach its stdio: do not leave it running.
                if let Err(r) = self.containers.remove(&id) {
                    log::error!("container {id}: removing it: {r:?}");
                }
                session_error(&e)
            }
        }
    }

    /// `SpawnProcess`, in the guest or in a container.
    fn spawn_process(&mut self, req: &SpawnProcessRequest) -> Reply {
        let plan = match Sessions::plan(req) {
            Ok(plan) => plan,
            Err(e) => return session_error(&e),
        };
        let enter = match &req.container {
            None => None,
            Some(id) => match self.containers.enter(id, plan.argv(), plan.env()) {
                Ok(enter) => Some(enter),
                Err(ContainerError::InvalidParameter(_)) => {
                    return invalid_parameter(&InvalidParameter::new("container"))
                }
                Err(e) => return container_error(&e),
            },
        };
        let in_container = enter.is_some();
        match self.sessions.spawn(req, &plan, enter) {
            Err(SessionError::Spawn(SpawnFailed {
                errno: Some(libc::ENOEXEC),
                ..
            })) if in_container => error_reply(
                error::EXEC_FORMAT_ERROR,
                json!(ExecFormatParameters {
                    program: plan.argv().first().cloned().unwrap_or_default(),
                }),
            ),
            result => session_reply(result),
        }
    }

    /// `ReadProcess`: waits (up to `waitMs`) while there is nothing new,
    /// reaping children meanwhile so an exit is seen at once.
    fn read_process(&mut self, req: &ReadProcessRequest) -> Result<ReadProcessReply, SessionError> {
        let deadline = Instant::now() + session::wait_limit(req)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(reply) = self.sessions.try_read(req, !left.is_zero())? {
                return Ok(reply);
            }
            self.sessions
                .wait_for_output(req.handle, left.min(READ_WAIT_SLICE));
            self.reap();
        }
    }

    /// A file call at `at`: in the guest's root or a running container's.
    fn file_call<T: Serialize>(
        &mut self,
        at: &FileLocation,
        call: impl FnOnce(&Target) -> Result<T, FileError>,
    ) -> Reply {
        let root = match &at.container {
            None => PathBuf::from("/"),
            Some(id) => match self.containers.root(id) {
                Ok(root) => root,
                Err(ContainerError::InvalidParameter(_)) => {
                    return invalid_parameter(&InvalidParameter::new("container"))
                }
                Err(e) => return container_error(&e),
            },
        };
        let result = Target::new(root, at)
            .map_err(FileError::from)
            .and_then(|target| call(&target));
        match result {
            Ok(value) => ok(&value),
            Err(e) => {
                let (name, parameters) = e.reply();
                error_reply(name, parameters)
            }
        }
    }
}

fn empty(_: ()) -> Value {
    json!({})
}

fn session_reply<T: Serialize>(result: Result<T, SessionError>) -> Reply {
    match result {
        Ok(value) => ok(&value),
        Err(e) => session_error(&e),
    }
}

fn session_error(e: &SessionError) -> Reply {
    match e {
        SessionError::InvalidParameter(p) => invalid_parameter(p),
        SessionError::NoSuchProcess(handle) => error_reply(
            error::NO_SUCH_PROCESS,
            json!(NoSuchProcessParameters { handle: *handle }),
        ),
        SessionError::TooManyProcesses => error_reply(
            error::TOO_MANY_PROCESSES,
            json!(TooManyProcessesParameters {
                max: MAX_PROCESSES as u64
            }),
        ),
        SessionError::NotInteractive => error_reply(error::PROCESS_NOT_INTERACTIVE, json!({})),
        SessionError::Spawn(SpawnFailed { message, .. }) => {
            failure(error::EXEC_FAILED, message.clone())
        }
    }
}

/// `Exec`, in the guest or in a container.
fn run_exec(containers: &mut Containers, plan: Plan, container: Option<String>) -> Reply {
    let Some(id) = container else {
        return match exec::run(plan, None) {
            Ok(reply) => ok(&reply),
            Err(SpawnFailed { message, .. }) => failure(error::EXEC_FAILED, message),
        };
    };
    let program = plan.argv().first().cloned().unwrap_or_default();
    let enter = match containers.enter(&id, plan.argv(), plan.env()) {
        Ok(enter) => enter,
        Err(ContainerError::InvalidParameter(_)) => {
            return invalid_parameter(&InvalidParameter::new("container"))
        }
        Err(e) => return container_error(&e),
    };
    match exec::run(plan, Some(enter)) {
        Ok(reply) => ok(&reply),
        Err(SpawnFailed {
            errno: Some(libc::ENOEXEC),
            ..
        }) => error_reply(
            error::EXEC_FORMAT_ERROR,
            json!(ExecFormatParameters { program }),
        ),
        Err(SpawnFailed { message, .. }) => failure(error::EXEC_FAILED, message),
    }
}

fn container_reply<T: Serialize>(result: Result<T, ContainerError>) -> Reply {
    match result {
        Ok(value) => ok(&value),
        Err(e) => container_error(&e),
    }
}

fn container_error(e: &ContainerError) -> Reply {
    let (name, parameters) = e.reply();
    error_reply(name, parameters)
}

fn respond(reply: Reply, after: After) -> Response {
    let bytes = kiln_agent_proto::encode(&reply).unwrap_or_else(|_| {
        // Unreachable in practice (serializing a Value cannot fail); keep
        // the call/reply pairing intact anyway.
        b"{\"error\":\"org.varlink.service.InvalidParameter\",\"parameters\":{\"parameter\":\"parameters\"}}\0"
            .to_vec()
    });
    Response {
        bytes: Some(bytes),
        after,
    }
}

/// Dispatches a call that needs no agent state.
fn dispatch(call: &Call) -> (Reply, After) {
    let params = call.parameters.as_ref();
    let reply = match call.method.as_str() {
        method::PING => params::decode::<PingRequest>(params).map(|req| ok(&ping(req))),
        method::SHUTDOWN => {
            return (ok(&json!({})), After::PowerOff);
        }
        method::REBOOT => {
            return (ok(&json!({})), After::Reboot);
        }
        GET_INFO => Ok(ok(&json!({
            "vendor": "Kiln",
            "product": "kiln-agent",
            "version": AGENT_VERSION,
            "url": "https://github.com/kiln-vm/kiln",
            "interfaces": [SERVICE_INTERFACE, INTERFACE],
        }))),
        GET_INTERFACE_DESCRIPTION => interface_description(params),
        other => Ok(error_reply(
            error::METHOD_NOT_FOUND,
            json!({ "method": other }),
        )),
    };
    (
        reply.unwrap_or_else(|p| invalid_parameter(&p)),
        After::Continue,
    )
}

fn interface_description(params: Option<&Value>) -> Result<Reply, InvalidParameter> {
    let name = params
        .and_then(|p| p.get("interface"))
        .and_then(Value::as_str)
        .ok_or_else(|| InvalidParameter::new("interface"))?;
    Ok(match name {
        INTERFACE => ok(&json!({ "description": AGENT_IDL })),
        SERVICE_INTERFACE => ok(&json!({ "description": SERVICE_IDL })),
        other => error_reply(INTERFACE_NOT_FOUND, json!({ "interface": other })),
    })
}

fn ping(req: PingRequest) -> PingReply {
    let (kernel_release, hostname) = sys::uname();
    // Read once: it is the boot's, and a clone's agent (its template's,
    // restored) has it already — a file read in a fresh clone's first
    // call is guest code TCG translates afresh.
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let boot_id = match BOOT_ID.get() {
        Some(id) => id.clone(),
        None => match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            Ok(text) => BOOT_ID.get_or_init(|| text.trim().to_owned()).clone(),
            Err(_) => String::new(),
        },
    };
    PingReply {
        agent_version: AGENT_VERSION.to_owned(),
        kernel_release,
        boot_id,
        hostname,
        uptime_ms: sys::boottime_ms(),
        nonce: req.nonce,
    }
}

fn ok<T: Serialize>(parameters: &T) -> Reply {
    let parameters = serde_json::to_value(parameters).unwrap_or_else(|_| json!({}));
    Reply {
        parameters: Some(parameters),
        error: None,
    }
}

fn error_reply(name: &str, parameters: Value) -> Reply {
    Reply {
        parameters: Some(parameters),
        error: Some(name.to_owned()),
    }
}

fn failure(name: &str, message: String) -> Reply {
    error_reply(name, json!(FailureParameters { message }))
}

fn invalid_parameter(p: &InvalidParameter) -> Reply {
    error_reply(error::INVALID_PARAMETER, json!({ "parameter": p.0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> Agent {
        Agent::new(&BootOptions::default())
    }

    fn call(frame: &str) -> (Value, After) {
        let response = agent().handle_frame(&Frame::Message(frame.as_bytes().to_vec()));
        let bytes = response.bytes.expect("a reply");
        assert_eq!(bytes.last(), Some(&0));
        let value =
            serde_json::from_slice(bytes.get(..bytes.len() - 1).expect("frame")).expect("json");
        (value, response.after)
    }

    #[test]
    fn ping_echoes_the_nonce() {
        let (reply, after) = call(r#"{"method":"io.kiln.Agent.Ping","parameters":{"nonce":42}}"#);
        assert_eq!(after, After::Continue);
        assert_eq!(reply["parameters"]["nonce"], 42);
        assert_eq!(reply["parameters"]["agentVersion"], AGENT_VERSION);
        assert!(reply.get("error").is_none());
    }

    fn frame(agent: &mut Agent, frame: &str) -> Value {
        let bytes = agent
            .handle_frame(&Frame::Message(frame.as_bytes().to_vec()))
            .bytes
            .expect("a reply");
        serde_json::from_slice(bytes.get(..bytes.len() - 1).expect("frame")).expect("json")
    }

    #[test]
    fn identity_files_wait_only_for_calls_that_cannot_read_them() {
        // An empty identity changes nothing in the kernel and has no file
        // to write: what is checked is when the agent would write them.
        let mut agent = agent();
        let reply = frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.SetIdentity","parameters":{}}"#,
        );
        assert!(reply.get("error").is_none(), "{reply}");
        assert!(agent.identity_files_due.is_some());
        frame(&mut agent, r#"{"method":"io.kiln.Agent.Ping"}"#);
        let reply = frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.ConfigureNetwork","parameters":{"interfaces":[{"mac":"zz"}]}}"#,
        );
        assert!(
            reply.get("error").is_some(),
            "rejected before the network is touched"
        );
        assert!(
            agent.identity_files_due.is_some(),
            "still due after Ping and ConfigureNetwork"
        );
        frame(&mut agent, r#"{"method":"io.kiln.Agent.ListContainers"}"#);
        assert!(
            agent.identity_files_due.is_none(),
            "written before another call"
        );

        frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.SetIdentity","parameters":{}}"#,
        );
        agent.catch_up();
        assert!(
            agent.identity_files_due.is_none(),
            "written once the agent is idle"
        );
        frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.SetIdentity","parameters":{"machineId":"x"}}"#,
        );
        assert!(
            agent.identity_files_due.is_none(),
            "nothing to write for a rejected call"
        );
    }

    #[test]
    fn ipv6_waits_only_for_calls_that_cannot_see_it() {
        // An interface that does not exist: turning IPv6 on there is a
        // no-op, what is checked is when the agent does it.
        let mut agent = agent();
        agent.network = NetworkState::with_ipv6_due(&["kiln-none0"]);
        frame(&mut agent, r#"{"method":"io.kiln.Agent.Ping"}"#);
        frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.SetIdentity","parameters":{}}"#,
        );
        assert!(
            agent.network.has_ipv6_due(),
            "still due after Ping and SetIdentity"
        );
        frame(
            &mut agent,
            r#"{"method":"io.kiln.Agent.StatPath","parameters":{"path":"/"}}"#,
        );
        assert!(!agent.network.has_ipv6_due(), "done before another call");
        agent.network = NetworkState::with_ipv6_due(&["kiln-none0"]);
        agent.catch_up();
        assert!(!agent.network.has_ipv6_due(), "done once the agent is idle");
    }

    #[test]
    fn unknown_method_is_method_not_found() {
        let (reply, _) = call(r#"{"method":"io.kiln.Agent.Fly"}"#);
        assert_eq!(reply["error"], error::METHOD_NOT_FOUND);
        assert_eq!(reply["parameters"]["method"], "io.kiln.Agent.Fly");
    }

    #[test]
    fn bad_parameters_name_the_parameter() {
        let (reply, _) = call(r#"{"method":"io.kiln.Agent.Exec","parameters":{"argv":[]}}"#);
        assert_eq!(reply["error"], error::INVALID_PARAMETER);
        assert_eq!(reply["parameters"]["parameter"], "argv");
        let (reply, _) =
            call(r#"{"method":"io.kiln.Agent.SetIdentity","parameters":{"machineId":"x"}}"#);
        assert_eq!(reply["parameters"]["parameter"], "machineId");
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.ConfigureNetwork","parameters":{"interfaces":[{"mac":"nope"}]}}"#,
        );
        assert_eq!(reply["error"], error::INVALID_PARAMETER);
        assert_eq!(reply["parameters"]["parameter"], "interfaces");
        let (reply, _) =
            call(r#"{"method":"io.kiln.Agent.ConfigureNetwork","parameters":{"dns":[]}}"#);
        assert_eq!(reply["parameters"]["parameter"], "interfaces");
    }

    #[test]
    fn exec_reports_spawn_failure() {
        let (reply, _) =
            call(r#"{"method":"io.kiln.Agent.Exec","parameters":{"argv":["/nonexistent/x"]}}"#);
        assert_eq!(reply["error"], error::EXEC_FAILED);
        assert!(reply["parameters"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/nonexistent/x")));
    }

    #[test]
    fn container_methods_answer_with_named_errors() {
        let (reply, _) =
            call(r#"{"method":"io.kiln.Agent.ContainerStatus","parameters":{"id":"nope"}}"#);
        assert_eq!(reply["error"], error::NO_SUCH_CONTAINER);
        assert_eq!(reply["parameters"]["id"], "nope");
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.StartContainer","parameters":{"id":"a","layers":["l0"],"process":{"args":["sh"],"cwd":"tmp"}}}"#,
        );
        assert_eq!(reply["error"], error::INVALID_PROCESS_SPEC);
        assert_eq!(reply["parameters"]["field"], "cwd");
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.StartContainer","parameters":{"id":"a","layers":[],"process":{"args":["sh"]}}}"#,
        );
        assert_eq!(reply["parameters"]["parameter"], "layers");
        let (reply, _) =
            call(r#"{"method":"io.kiln.Agent.RemoveContainer","parameters":{"id":"nope"}}"#);
        assert_eq!(reply["parameters"]["result"], "alreadyGone");
        let (reply, _) = call(r#"{"method":"io.kiln.Agent.ListContainers"}"#);
        assert_eq!(reply["parameters"]["containers"], json!([]));
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.Exec","parameters":{"argv":["true"],"container":"nope"}}"#,
        );
        assert_eq!(reply["error"], error::NO_SUCH_CONTAINER);
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.Exec","parameters":{"argv":["true"],"container":"../x"}}"#,
        );
        assert_eq!(reply["parameters"]["parameter"], "container");
        let (reply, _) = call(
            r#"{"method":"io.kiln.Agent.ContainerLogs","parameters":{"id":"a","maxBytes":0}}"#,
        );
        assert_eq!(reply["parameters"]["parameter"], "maxBytes");
    }

    #[test]
    fn shutdown_and_reboot_reply_then_act() {
        assert_eq!(
            call(r#"{"method":"io.kiln.Agent.Shutdown"}"#).1,
            After::PowerOff
        );
        assert_eq!(
            call(r#"{"method":"io.kiln.Agent.Reboot","parameters":{}}"#).1,
            After::Reboot
        );
    }

    #[test]
    fn serves_varlink_introspection() {
        let (info, _) = call(r#"{"method":"org.varlink.service.GetInfo"}"#);
        assert_eq!(
            info["parameters"]["interfaces"],
            json!(["org.varlink.service", "io.kiln.Agent"])
        );
        let (desc, _) = call(
            r#"{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"io.kiln.Agent"}}"#,
        );
        let text = desc["parameters"]["description"].as_str().expect("text");
        assert!(text.contains("interface io.kiln.Agent"));
        let (missing, _) = call(
            r#"{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"x.y"}}"#,
        );
        assert_eq!(missing["error"], INTERFACE_NOT_FOUND);
    }

    #[test]
    fn idl_names_every_method() {
        for m in [
            method::PING,
            method::EXEC,
            method::SET_IDENTITY,
            method::SHUTDOWN,
            method::REBOOT,
            method::CONFIGURE_NETWORK,
            method::START_CONTAINER,
            method::CONTAINER_STATUS,
            method::LIST_CONTAINERS,
            method::STOP_CONTAINER,
            method::REMOVE_CONTAINER,
            method::CONTAINER_LOGS,
        ] {
            let short = m.rsplit('.').next().unwrap_or_default();
            assert!(AGENT_IDL.contains(&format!("method {short}(")), "{m}");
        }
    }

    #[test]
    fn oneway_calls_get_no_reply() {
        let r = agent().handle_frame(&Frame::Message(
            br#"{"method":"io.kiln.Agent.Ping","oneway":true}"#.to_vec(),
        ));
        assert!(r.bytes.is_none());
    }

    #[test]
    fn malformed_and_oversized_frames_still_get_a_reply() {
        let (reply, _) = call("not json");
        assert_eq!(reply["error"], error::INVALID_PARAMETER);
        let r = agent().handle_frame(&Frame::TooLarge);
        assert!(r.bytes.is_some());
    }
}
