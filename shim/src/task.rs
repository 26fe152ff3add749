//! The task service (containerd.task.v2) over kilnd: a pod is one VM
//! acquired from a pool under a lease the shim renews, its containers are
//! Kiln containers in it (`AddContainer`), execs are `StartProcess` in
//! them. The shim keeps only what containerd asks back (status, exits,
//! stdio paths, handles); kilnd owns everything else.
//!
//! The state lock is never held across a kilnd call or a wait: handlers
//! copy what they need, call, then record the result.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::Code;
use containerd_shim_protos::types::task::ProcessInfo;
use serde_json::json;

use crate::config::{ShimConfig, POOL_ANNOTATION};
use crate::events::Events;
use crate::io::{self as stdio, Outputs, Stdio};
use crate::kiln::{is_gone, rpc_error, start_failure, status, vm_of, Kiln, LeaseKeeper};
use crate::rootfs;
use crate::spec::{container_name, Process, Role, Spec};
use crate::state::{BundleRecord, Exit, ExitCell};
use crate::stats;

/// An exit whose code nobody could tell (the VM went first).
/// How long after `Kill` returns the exit of a task with no process is
/// reported (a sandbox's comes after its VM is given back instead).
const EXIT_AFTER_KILL: std::time::Duration = std::time::Duration::from_millis(50);
const UNKNOWN_EXIT: u32 = 255;

/// The signals a container's main process can be sent today: kilnd stops
/// a container (`RemoveContainer`: SIGTERM, SIGKILL after 10 s), it cannot
/// signal it otherwise yet.
const STOPPING_SIGNALS: [u32; 4] = [
    libc::SIGKILL as u32,
    libc::SIGTERM as u32,
    libc::SIGINT as u32,
    libc::SIGQUIT as u32,
];

/// The task service of one shim.
#[derive(Debug, Clone)]
pub struct TaskService {
    shared: Arc<Shared>,
}

struct Shared {
    events: Events,
    exit: Arc<ExitSignal>,
    namespace: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("events", &self.events)
            .field("namespace", &self.namespace)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    /// By pod id (the sandbox's or standalone task's id).
    pods: HashMap<String, Pod>,
    tasks: HashMap<String, Task>,
}

/// A pod's VM.
#[derive(Debug)]
struct Pod {
    kiln: Kiln,
    vm: String,
    qemu_pid: u32,
    recycle: bool,
    /// Renews the lease; dropped when the VM is given back.
    lease: Option<LeaseKeeper>,
}

#[derive(Debug)]
struct Task {
    bundle: String,
    role: Role,
    pod: String,
    /// The Kiln container (not for a sandbox).
    name: String,
    /// The image `ImportRootfs` made of its rootfs (not for a sandbox).
    image: Option<String>,
    process: Process,
    stdio: Stdio,
    storage_mib: Option<u64>,
    started: bool,
    /// The container's pid in the guest.
    guest_pid: u32,
    /// Its process's handle when it has a terminal or stdin (streamed
    /// like an exec's).
    handle: Option<u64>,
    /// The stdin pumps of its processes (`""`: the main one), true once
    /// ended.
    stdin_pumps: HashMap<String, Arc<AtomicBool>>,
    exit: Arc<ExitCell>,
    /// The signal `Kill` stopped it with (0: none).
    killed: Arc<AtomicU32>,
    execs: HashMap<String, ExecProcess>,
}

#[derive(Debug)]
struct ExecProcess {
    process: Process,
    stdio: Stdio,
    started: bool,
    handle: Option<u64>,
    guest_pid: u32,
    exit: Arc<ExitCell>,
}

impl Task {
    /// The streamed-process handle of exec `exec_id`, or of the main
    /// process (`""`) when it has a terminal or stdin.
    fn process_handle(&self, exec_id: &str) -> Option<u64> {
        if exec_id.is_empty() {
            return self.handle;
        }
        self.execs.get(exec_id).and_then(|e| e.handle)
    }
}

impl Pod {
    /// What a handler needs of it.
    fn reference(&self) -> PodRef {
        PodRef {
            kiln: self.kiln.clone(),
            vm: self.vm.clone(),
            qemu_pid: self.qemu_pid,
        }
    }

    /// What giving the VM back takes, once: the lease stops being renewed
    /// now, the `Release` call is made by [`Giveback::run`] (outside the
    /// state lock).
    fn giveback(&mut self) -> Option<Giveback> {
        let lease = self.lease.take()?;
        Some(Giveback {
            kiln: self.kiln.clone(),
            vm: self.vm.clone(),
            recycle: self.recycle,
            _lease: lease,
        })
    }
}

/// A VM to give back.
#[derive(Debug)]
struct Giveback {
    kiln: Kiln,
    vm: String,
    recycle: bool,
    _lease: LeaseKeeper,
}

impl Giveback {
    fn run(self) {
        match self
            .kiln
            .connect()
            .and_then(|mut m| m.release(&self.vm, self.recycle))
        {
            Ok(_) => log::info!("gave VM {} back", self.vm),
            Err(e) if is_gone(&e) => {}
            Err(e) => log::error!("giving VM {} back: {e}", self.vm),
        }
    }
}

/// What a handler needs of a task's pod.
#[derive(Debug, Clone)]
struct PodRef {
    kiln: Kiln,
    vm: String,
    qemu_pid: u32,
}

fn not_found(what: &str) -> containerd_shim_protos::ttrpc::Error {
    rpc_error(Code::NOT_FOUND, format!("{what} not found"))
}

/// A `SystemTime` as protobuf's.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or_default(),
        ..Default::default()
    }
}

fn status_of(started: bool, exit: Option<Exit>) -> Status {
    match (started, exit) {
        (_, Some(_)) => Status::STOPPED,
        (true, None) => Status::RUNNING,
        (false, None) => Status::CREATED,
    }
}

impl TaskService {
    pub fn new(events: Events, exit: Arc<ExitSignal>, namespace: String) -> Self {
        Self {
            shared: Arc::new(Shared {
                events,
                exit,
                namespace,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The pod of task `id`, with the task's own record read by `read`.
    fn pod_of<T>(
        &self,
        id: &str,
        read: impl FnOnce(&mut Task) -> TtrpcResult<T>,
    ) -> TtrpcResult<(PodRef, T)> {
        let mut state = self.lock();
        let task = state.tasks.get_mut(id).ok_or_else(|| not_found(id))?;
        let pod_id = task.pod.clone();
        let value = read(task)?;
        let pod = state.pods.get(&pod_id).ok_or_else(|| {
            rpc_error(
                Code::FAILED_PRECONDITION,
                format!("the VM of pod {pod_id} was given back"),
            )
        })?;
        Ok((pod.reference(), value))
    }

    /// Lease a VM for pod `pod` from the config's pool (or the one the
    /// annotations name).
    fn acquire(&self, pod: &str, spec: &Spec, config: &ShimConfig) -> TtrpcResult<Pod> {
        let kiln = Kiln::new(config.address());
        let pool = spec
            .annotations
            .get(POOL_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| config.pool.clone());
        let labels = [
            ("io.containerd.namespace", self.shared.namespace.as_str()),
            ("io.containerd.pod", pod),
            ("io.kiln.shim", "containerd"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let netns = spec
            .pod_netns()
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let ttl = (config.lease_ttl_sec > 0).then_some(config.lease_ttl_sec);
        let reply = kiln
            .connect()
            .and_then(|mut m| m.acquire(&pool, Some(config.acquire_timeout_ms), &labels, ttl, None))
            .map_err(|e| status(&format!("acquiring a VM from pool {pool}"), &e))?;
        let (vm, qemu_pid) = vm_of(&reply);
        log::info!("pod {pod}: VM {vm} from pool {pool}");
        let lease = LeaseKeeper::start(kiln.clone(), vm.clone(), config.lease_ttl_sec);
        let mut owned = Pod {
            kiln,
            vm,
            qemu_pid,
            // A VM in a pod's network is destroyed on release anyway.
            recycle: config.recycle && netns.is_none(),
            lease: Some(lease),
        };
        if let Some(netns) = netns {
            // The pod's network, wired by CNI before the sandbox task:
            // the VM takes over its interface.
            let dns = spec.name_servers();
            let joined = owned
                .kiln
                .connect()
                .and_then(|mut m| m.join_netns(&owned.vm, &netns, None, &dns));
            if let Err(e) = joined {
                Self::release(&mut owned);
                return Err(status(
                    &format!("moving VM {} into pod network {netns}", owned.vm),
                    &e,
                ));
            }
            log::info!("pod {pod}: VM {} in network namespace {netns}", owned.vm);
        }
        Ok(owned)
    }

    /// Give a pod's VM back (gone already is fine).
    fn release(pod: &mut Pod) {
        if let Some(giveback) = pod.giveback() {
            giveback.run();
        }
    }

    fn publish_exit(&self, id: &str, exec_id: &str, pid: u32, exit: Exit) {
        self.shared.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: id.to_owned(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_owned(),
                pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            },
        );
    }

    /// Start the container of a created task.
    fn start_container(&self, id: &str) -> TtrpcResult<StartResponse> {
        let (pod, (role, name, image, process, io, storage, exit, killed)) =
            self.pod_of(id, |t| {
                if t.started || t.exit.get().is_some() {
                    return Err(rpc_error(
                        Code::FAILED_PRECONDITION,
                        format!("{id} was started"),
                    ));
                }
                Ok((
                    t.role.clone(),
                    t.name.clone(),
                    t.image.clone(),
                    t.process.clone(),
                    t.stdio.clone(),
                    t.storage_mib,
                    Arc::clone(&t.exit),
                    Arc::clone(&t.killed),
                ))
            })?;
        if role == Role::Sandbox {
            self.mark_started(id, 0);
            return Ok(StartResponse {
                pid: pod.qemu_pid,
                ..Default::default()
            });
        }
        let mut outputs = Outputs::open(&io)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("opening stdio: {e}")))?;
        // The image has no process config: the whole argv is the
        // entrypoint. Optional fields left out rather than null.
        let mut spec = json!({
            "name": name,
            "image": image,
            "entrypoint": process.args,
            "env": process.env,
            "user": process.user(),
        });
        if !process.cwd.is_empty() {
            spec["workdir"] = json!(process.cwd);
        }
        if let Some(mib) = storage {
            spec["storageMiB"] = json!(mib);
        }
        // A terminal or stdin: the main process is streamed like an
        // exec's, by its handle.
        let takes_stdin = !io.stdin.is_empty();
        if io.terminal {
            let (rows, cols) = process.window();
            spec["terminal"] = json!({ "rows": rows, "cols": cols });
        } else if takes_stdin {
            spec["stdin"] = json!(true);
        }
        let added = pod
            .kiln
            .connect()
            .and_then(|mut m| m.add_container(&pod.vm, spec));
        let added = match added {
            Ok(reply) => reply,
            Err(e) => {
                // Failed to start: stopped, so that Wait returns and Delete
                // works; containerd reports the error.
                exit.set(Exit::now(UNKNOWN_EXIT));
                let program = process.args.first().map_or("", String::as_str);
                let context = match start_failure(&e, program) {
                    Some(reason) => format!("starting the container: {reason}"),
                    None => "starting the container".to_owned(),
                };
                return Err(status(&context, &e));
            }
        };
        let guest_pid = added["container"]["pid"].as_u64().unwrap_or_default();
        let handle = added["container"]["handle"].as_u64();
        log::info!("{id}: started in VM {} as guest pid {guest_pid}", pod.vm);
        if let Some(task) = self.lock().tasks.get_mut(id) {
            task.handle = handle;
        }
        self.mark_started(id, u32::try_from(guest_pid).unwrap_or_default());
        if let (Some(handle), true) = (handle, takes_stdin) {
            let pump =
                stdio::feed_stdin(pod.kiln.clone(), pod.vm.clone(), handle, io.stdin.clone());
            self.keep_stdin_pump(id, "", pump);
        }
        let service = self.clone();
        let id = id.to_owned();
        std::thread::spawn(move || {
            let code = match handle {
                Some(handle) => stdio::attach_process(&pod.kiln, &pod.vm, handle)
                    .map_err(|e| log::error!("{id}: following its process: {e}"))
                    .ok()
                    .and_then(|stream| stdio::follow_exec(&pod.kiln, &pod.vm, stream, "", outputs)),
                None => {
                    let code = stdio::follow_container(&pod.kiln, &pod.vm, &name, &mut outputs);
                    drop(outputs);
                    code
                }
            };
            let status = match (code, killed.load(Ordering::SeqCst)) {
                (Some(code), _) => u32::try_from(code).unwrap_or(UNKNOWN_EXIT),
                (None, 0) => UNKNOWN_EXIT,
                (None, signal) => 128 + signal,
            };
            let done = Exit::now(status);
            if exit.set(done) {
                service.publish_exit(&id, "", pod.qemu_pid, done);
            }
        });
        Ok(StartResponse {
            pid: pod.qemu_pid,
            ..Default::default()
        })
    }

    fn keep_stdin_pump(&self, id: &str, exec_id: &str, pump: Arc<AtomicBool>) {
        if let Some(task) = self.lock().tasks.get_mut(id) {
            task.stdin_pumps.insert(exec_id.to_owned(), pump);
        }
    }

    fn mark_started(&self, id: &str, guest_pid: u32) {
        let pid = {
            let mut state = self.lock();
            let Some(task) = state.tasks.get_mut(id) else {
                return;
            };
            task.started = true;
            task.guest_pid = guest_pid;
            let pod = task.pod.clone();
            state.pods.get(&pod).map_or(0, |p| p.qemu_pid)
        };
        self.shared.events.publish(
            topics::TASK_START_EVENT_TOPIC,
            TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            },
        );
    }

    /// Start an added exec.
    fn start_exec(&self, id: &str, exec_id: &str) -> TtrpcResult<StartResponse> {
        let (pod, (name, process, io, exit)) = self.pod_of(id, |t| {
            if !t.started || t.exit.get().is_some() {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("{id} is not running"),
                ));
            }
            let name = t.name.clone();
            let e = t.execs.get(exec_id).ok_or_else(|| not_found(exec_id))?;
            if e.started {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("{exec_id} was started"),
                ));
            }
            Ok((
                name,
                e.process.clone(),
                e.stdio.clone(),
                Arc::clone(&e.exit),
            ))
        })?;
        let outputs = Outputs::open(&io)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("opening stdio: {e}")))?;
        let window = io.terminal.then(|| process.window());
        let takes_stdin = !io.stdin.is_empty() && !io.terminal;
        let spec = stdio::process_spec(&process.args, &process.env, &name, window, takes_stdin);
        let stream = match stdio::start_exec(&pod.kiln, &pod.vm, &spec) {
            Ok(stream) => stream,
            Err(e) => {
                exit.set(Exit::now(UNKNOWN_EXIT));
                return Err(status("starting the process", &e));
            }
        };
        let (handle, guest_pid) = (stream.handle, stream.pid);
        if let Some(e) = self
            .lock()
            .tasks
            .get_mut(id)
            .and_then(|t| t.execs.get_mut(exec_id))
        {
            e.started = true;
            e.handle = Some(handle);
            e.guest_pid = guest_pid;
        }
        if takes_stdin {
            let pump =
                stdio::feed_stdin(pod.kiln.clone(), pod.vm.clone(), handle, io.stdin.clone());
            self.keep_stdin_pump(id, exec_id, pump);
        }
        self.shared.events.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid: pod.qemu_pid,
                ..Default::default()
            },
        );
        let service = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        let kiln = pod.kiln.clone();
        let vm = pod.vm.clone();
        let terminal_stdin = if io.terminal {
            io.stdin.clone()
        } else {
            String::new()
        };
        std::thread::spawn(move || {
            let code = stdio::follow_exec(&kiln, &vm, stream, &terminal_stdin, outputs);
            let done = Exit::now(
                code.and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(UNKNOWN_EXIT),
            );
            if exit.set(done) {
                service.publish_exit(&id, &exec_id, pod.qemu_pid, done);
            }
        });
        Ok(StartResponse {
            pid: pod.qemu_pid,
            ..Default::default()
        })
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> TtrpcResult<DeleteResponse> {
        let (pod, (handle, exit, stdin)) = self.pod_of(id, |t| {
            let e = t.execs.get(exec_id).ok_or_else(|| not_found(exec_id))?;
            if e.started && e.exit.get().is_none() {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("{exec_id} is running"),
                ));
            }
            let removed = t.execs.remove(exec_id);
            Ok(removed.map_or((None, None, String::new()), |e| {
                (e.handle, e.exit.get(), e.stdio.stdin)
            }))
        })?;
        stdio::unblock_stdin(&stdin);
        if let Some(handle) = handle {
            if let Err(e) = pod
                .kiln
                .connect()
                .and_then(|mut m| m.release_process(&pod.vm, handle))
            {
                log::debug!("releasing process {handle}: {e}");
            }
        }
        let exit = exit.unwrap_or_else(|| Exit::now(0));
        Ok(DeleteResponse {
            pid: pod.qemu_pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    /// `Kill` of a task's main process.
    fn kill_task(&self, id: &str, signal: u32) -> TtrpcResult<()> {
        let (pod, (role, name, started, exit, killed, handle)) = self.pod_of(id, |t| {
            Ok((
                t.role.clone(),
                t.name.clone(),
                t.started,
                Arc::clone(&t.exit),
                Arc::clone(&t.killed),
                t.handle,
            ))
        })?;
        if exit.get().is_some() {
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("{id}: process already finished"),
            ));
        }
        if role == Role::Sandbox || !started {
            // Nothing runs in a sandbox: killing it ends the pod's VM
            // (which frees its network namespace).
            let giveback = (role == Role::Sandbox)
                .then(|| {
                    let mut state = self.lock();
                    let pod_id = state.tasks.get(id).map(|t| t.pod.clone());
                    pod_id
                        .and_then(|p| state.pods.get_mut(&p))
                        .and_then(Pod::giveback)
                })
                .flatten();
            // The exit comes after Kill's reply, as a real process's
            // would: containerd answers an exit with Delete and Shutdown,
            // and a Shutdown before the reply fails the Kill ("ttrpc:
            // closed"). Seen with CRI's StopPodSandbox.
            let (service, id) = (self.clone(), id.to_owned());
            std::thread::spawn(move || {
                match giveback {
                    Some(giveback) => giveback.run(),
                    None => std::thread::sleep(EXIT_AFTER_KILL),
                }
                let by_signal = Exit::now(128 + signal);
                if exit.set(by_signal) {
                    service.publish_exit(&id, "", pod.qemu_pid, by_signal);
                }
            });
            return Ok(());
        }
        // A streamed main process takes any signal, as an exec does.
        if let Some(handle) = handle {
            killed.store(signal, Ordering::SeqCst);
            let signal = i32::try_from(signal).unwrap_or(libc::SIGKILL);
            return match pod
                .kiln
                .connect()
                .and_then(|mut m| m.signal_process(&pod.vm, handle, signal))
            {
                Ok(_) => Ok(()),
                Err(e) if is_gone(&e) => Ok(()),
                Err(e) => Err(status("signalling the container's process", &e)),
            };
        }
        if !STOPPING_SIGNALS.contains(&signal) {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                format!("signal {signal} to a container: kilnd can only stop one (SIGTERM, then SIGKILL)"),
            ));
        }
        killed.store(signal, Ordering::SeqCst);
        // Like kill(2), Kill returns once the stop is under way, not when
        // the process is gone: the exit is published by the output pump,
        // and CRI answers it with Delete and Shutdown, which would close
        // the connection of a Kill still waiting (StopPodSandbox then
        // fails with "ttrpc: closed").
        std::thread::spawn(move || {
            match pod
                .kiln
                .connect()
                .and_then(|mut m| m.remove_container(&pod.vm, &name))
            {
                Ok(_) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => log::warn!("stopping container {name}: {e}"),
            }
        });
        Ok(())
    }
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let invalid = |e: &dyn std::fmt::Display| rpc_error(Code::INVALID_ARGUMENT, e.to_string());
        let bundle = Path::new(&req.bundle);
        let spec = Spec::read(bundle).map_err(|e| invalid(&e))?;
        let role = spec.role(&req.id).map_err(|e| invalid(&e))?;
        let config = ShimConfig::from_options(req.options.as_ref()).map_err(|e| invalid(&e))?;
        let process = match role {
            Role::Sandbox => spec.process.clone().unwrap_or_default(),
            _ => spec.process().map_err(|e| invalid(&e))?.clone(),
        };
        if self.lock().tasks.contains_key(&req.id) {
            return Err(rpc_error(Code::ALREADY_EXISTS, format!("task {}", req.id)));
        }
        let pod_id = spec.pod(&req.id);
        // The pod's VM: a new lease for a sandbox or a standalone task.
        let mut owned = match role {
            Role::Sandbox | Role::Standalone => Some(self.acquire(&pod_id, &spec, &config)?),
            Role::Container(_) => None,
        };
        let pod = match &owned {
            Some(p) => p.reference(),
            None => {
                let state = self.lock();
                let p = state.pods.get(&pod_id).filter(|p| p.lease.is_some());
                let p = p.ok_or_else(|| {
                    rpc_error(
                        Code::FAILED_PRECONDITION,
                        format!("pod {pod_id} has no running sandbox in this shim"),
                    )
                })?;
                p.reference()
            }
        };
        let name = container_name(&req.id);
        let record = BundleRecord {
            address: pod.kiln.address.clone(),
            vm: pod.vm.clone(),
            qemu_pid: pod.qemu_pid,
            role: role.as_str().to_owned(),
            container: (role != Role::Sandbox).then(|| name.clone()),
            recycle: config.recycle,
        };
        let prepared = record
            .write(bundle)
            .map_err(|e| rpc_error(Code::INTERNAL, format!("writing the bundle record: {e}")))
            .and_then(|()| match role {
                Role::Sandbox => Ok(None),
                _ => {
                    let layers = rootfs::layer_dirs(&req.rootfs)
                        .map_err(|e| rpc_error(Code::FAILED_PRECONDITION, e.to_string()))?;
                    let (digest, converted) = pod
                        .kiln
                        .import_rootfs(&layers)
                        .map_err(|e| status("importing the rootfs", &e))?;
                    log::info!(
                        "{}: rootfs of {} layers is {digest} ({converted} converted, {} cached)",
                        req.id,
                        layers.len(),
                        layers.len().saturating_sub(converted)
                    );
                    Ok(Some(digest))
                }
            });
        let image = match prepared {
            Ok(image) => image,
            Err(e) => {
                if let Some(p) = &mut owned {
                    Self::release(p);
                }
                return Err(e);
            }
        };
        let io = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut state = self.lock();
            if let Some(p) = owned {
                state.pods.insert(pod_id.clone(), p);
            }
            state.tasks.insert(
                req.id.clone(),
                Task {
                    bundle: req.bundle.clone(),
                    role,
                    pod: pod_id,
                    name,
                    image,
                    process,
                    stdio: io.clone(),
                    storage_mib: config.storage_mib,
                    started: false,
                    guest_pid: 0,
                    handle: None,
                    stdin_pumps: HashMap::new(),
                    exit: Arc::default(),
                    killed: Arc::default(),
                    execs: HashMap::new(),
                },
            );
        }
        self.shared.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: io.stdin,
                    stdout: io.stdout,
                    stderr: io.stderr,
                    terminal: io.terminal,
                    ..Default::default()
                })
                .into(),
                pid: pod.qemu_pid,
                ..Default::default()
            },
        );
        Ok(CreateTaskResponse {
            pid: pod.qemu_pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        if req.exec_id.is_empty() {
            self.start_container(&req.id)
        } else {
            self.start_exec(&req.id, &req.exec_id)
        }
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let state = self.lock();
        let t = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let (started, exit, io) = if req.exec_id.is_empty() {
            (t.started, t.exit.get(), &t.stdio)
        } else {
            let e = t
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&req.exec_id))?;
            (e.started, e.exit.get(), &e.stdio)
        };
        Ok(StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: t.bundle.clone(),
            pid: state.pods.get(&t.pod).map_or(0, |p| p.qemu_pid),
            status: status_of(started, exit).into(),
            stdin: io.stdin.clone(),
            stdout: io.stdout.clone(),
            stderr: io.stderr.clone(),
            terminal: io.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let cell = {
            let state = self.lock();
            let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if req.exec_id.is_empty() {
                Arc::clone(&task.exit)
            } else {
                let e = task
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&req.exec_id))?;
                Arc::clone(&e.exit)
            }
        };
        let exit = cell.wait();
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        if req.exec_id.is_empty() {
            self.kill_task(&req.id, req.signal)?;
            return Ok(Empty::new());
        }
        let (pod, handle) = self.pod_of(&req.id, |t| {
            let e = t
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&req.exec_id))?;
            match (e.handle, e.exit.get()) {
                (Some(handle), None) => Ok(handle),
                _ => Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("{}: process not running", req.exec_id),
                )),
            }
        })?;
        let signal = i32::try_from(req.signal).unwrap_or(libc::SIGKILL);
        pod.kiln
            .connect()
            .and_then(|mut m| m.signal_process(&pod.vm, handle, signal))
            .map_err(|e| status("signalling the process", &e))?;
        Ok(Empty::new())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        if !req.exec_id.is_empty() {
            return self.delete_exec(&req.id, &req.exec_id);
        }
        let (task, pod) = {
            let mut state = self.lock();
            let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.started && task.exit.get().is_none() {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("{} is running: kill it first", req.id),
                ));
            }
            let Some(task) = state.tasks.remove(&req.id) else {
                return Err(not_found(&req.id));
            };
            // The pod ends with its owner.
            let pod = match task.role {
                Role::Sandbox | Role::Standalone => state.pods.remove(&task.pod),
                Role::Container(_) => None,
            };
            let member = state.pods.get(&task.pod).map(Pod::reference);
            (task, pod.map(Ok).or(member.map(Err)))
        };
        for e in task.execs.values() {
            stdio::unblock_stdin(&e.stdio.stdin);
        }
        stdio::unblock_stdin(&task.stdio.stdin);
        let qemu_pid = match pod {
            Some(Ok(mut owned)) => {
                Self::release(&mut owned);
                owned.qemu_pid
            }
            Some(Err(member)) => {
                if task.started {
                    if let Err(e) = member
                        .kiln
                        .connect()
                        .and_then(|mut m| m.remove_container(&member.vm, &task.name))
                    {
                        if !is_gone(&e) {
                            log::error!("removing container {}: {e}", task.name);
                        }
                    }
                }
                member.qemu_pid
            }
            None => 0,
        };
        let exit = task.exit.get().unwrap_or_else(|| Exit::now(0));
        self.shared.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: qemu_pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            },
        );
        Ok(DeleteResponse {
            pid: qemu_pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let state = self.lock();
        let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let pids = std::iter::once(task.guest_pid)
            .chain(task.execs.values().map(|e| e.guest_pid))
            .filter(|pid| *pid != 0);
        Ok(PidsResponse {
            processes: pids
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let process = Process::parse(&req.spec.value)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        {
            let mut state = self.lock();
            let task = state
                .tasks
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            if task.role == Role::Sandbox {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    "a pod sandbox runs no container to exec in",
                ));
            }
            if task.execs.contains_key(&req.exec_id) {
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("exec {}", req.exec_id),
                ));
            }
            task.execs.insert(
                req.exec_id.clone(),
                ExecProcess {
                    process,
                    stdio: Stdio {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    started: false,
                    handle: None,
                    guest_pid: 0,
                    exit: Arc::default(),
                },
            );
        }
        self.shared.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (pod, handle) = self.pod_of(&req.id, |t| Ok(t.process_handle(&req.exec_id)))?;
        // A size of 0 (ctr on a terminal that has none) is no size.
        let Some(handle) = handle.filter(|_| req.width > 0 && req.height > 0) else {
            return Ok(Empty::new());
        };
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        pod.kiln
            .connect()
            .and_then(|mut m| m.resize_process(&pod.vm, handle, rows, cols))
            .map_err(|e| status("resizing the terminal", &e))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let (pod, (handle, pump)) = self.pod_of(&req.id, |t| {
            Ok((
                t.process_handle(&req.exec_id),
                t.stdin_pumps.get(&req.exec_id).cloned(),
            ))
        })?;
        if let Some(handle) = handle {
            stdio::close_stdin(pod.kiln, pod.vm, handle, pump);
        }
        Ok(Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let (pod, ()) = self.pod_of(&req.id, |_| Ok(()))?;
        let reply = pod
            .kiln
            .connect()
            .and_then(|mut m| m.describe_vm(&pod.vm))
            .map_err(|e| status("reading the VM's usage", &e))?;
        let usage = &reply["vm"]["usage"];
        if usage.is_null() {
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("VM {} is not running", pod.vm),
            ));
        }
        let any = stats::to_any(&stats::metrics(usage))
            .map_err(|e| rpc_error(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .pod_of(&req.id, |_| Ok(()))
            .map_or(0, |(pod, ())| pod.qemu_pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        let givebacks: Vec<Giveback> = {
            let mut state = self.lock();
            if !state.tasks.is_empty() && !req.now {
                return Ok(Empty::new());
            }
            state.pods.values_mut().filter_map(Pod::giveback).collect()
        };
        givebacks.into_iter().for_each(Giveback::run);
        self.shared.exit.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_start_and_exit() {
        assert_eq!(status_of(false, None), Status::CREATED);
        assert_eq!(status_of(true, None), Status::RUNNING);
        assert_eq!(status_of(true, Some(Exit::now(0))), Status::STOPPED);
        assert_eq!(status_of(false, Some(Exit::now(137))), Status::STOPPED);
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let at = UNIX_EPOCH + std::time::Duration::new(5, 7);
        let t = timestamp(at);
        assert_eq!((t.seconds, t.nanos), (5, 7));
    }
}
