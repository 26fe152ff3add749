//! The `io.kiln.Manager` service: decode, authorize, call the engine, map.

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use kiln_engine::access::Caller;
use kiln_engine::api::{AcquireOptions, Disconnect};
use kiln_engine::error::ErrorName;
use kiln_engine::{EngineError, EngineEvent, EngineHandle, ImageJob};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use zlink::service::{HandleResult, MethodReply, ReplyStreamItem};
use zlink::{Call, Connection, Reply};

use crate::auth::Authorizer;
use crate::methods::*;
use crate::processes;
use crate::{INTERFACE, INTERFACE_DESCRIPTION};

type Sock = zlink::tokio::unix::Stream;

/// Any call: method name and raw parameters, decoded per method so a bad
/// parameter gets a named error instead of a dropped connection.
#[derive(Debug, Deserialize)]
pub struct RawCall {
    method: String,
    #[serde(default)]
    parameters: Option<Value>,
}

/// A varlink error reply: `{"error": name, "parameters": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorReply {
    error: String,
    parameters: Value,
}

impl ErrorReply {
    fn new(error: impl Into<String>, parameters: Value) -> Self {
        Self {
            error: error.into(),
            parameters,
        }
    }

    fn invalid_parameter(parameter: impl Into<String>) -> Self {
        Self::new(
            "org.varlink.service.InvalidParameter",
            json!({ "parameter": parameter.into() }),
        )
    }

    /// `io.kiln.Manager.<name>`: every name of the engine's one list
    /// ([`ErrorName`]), with the parameters the IDL declares for it.
    fn kiln(name: ErrorName, parameters: Value) -> Self {
        Self::new(format!("{INTERFACE}.{name}"), parameters)
    }

    fn permission_denied(method: &str) -> Self {
        Self::kiln(
            ErrorName::PermissionDenied,
            json!({ "message": format!("{method} needs root or membership in the kiln group") }),
        )
    }

    fn unreadable(path: &std::path::Path) -> Self {
        Self::kiln(
            ErrorName::PermissionDenied,
            json!({ "message": format!("the caller may not read {}", path.display()) }),
        )
    }
}

/// The one mapping of engine errors to varlink errors.
impl From<EngineError> for ErrorReply {
    fn from(e: EngineError) -> Self {
        let parameters = match &e {
            EngineError::NoSuchVM(id) => json!({ "id": id }),
            _ => json!({ "message": e.message() }),
        };
        Self::kiln(e.error_name(), parameters)
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = ReplyStreamItem<Value, ErrorReply>>>>;

pub(crate) enum Outcome {
    Single(Value),
    /// A reply that passes file descriptors (a terminal, an archive).
    SingleWithFds(Value, Vec<OwnedFd>),
    Stream(EventStream),
}

/// Per-connection service value: a handle and a policy, nothing else.
#[derive(Debug, Clone)]
pub struct ManagerService {
    engine: EngineHandle,
    auth: Authorizer,
    /// This connection, for leases that end with it (`releaseOnDisconnect`).
    connection: Disconnect,
    /// Set once a lease was bound to this connection: its end must be told.
    bound: Rc<Cell<bool>>,
}

impl ManagerService {
    /// The service of connection number `connection`; `bound` becomes true
    /// when a lease is bound to it.
    pub fn new(
        engine: EngineHandle,
        auth: Authorizer,
        connection: u64,
        bound: Rc<Cell<bool>>,
    ) -> Self {
        Self {
            engine,
            auth,
            connection: Disconnect::Connection(connection),
            bound,
        }
    }
}

/// Methods that change state; everything else is read-only.
const MUTATING: &[&str] = &[
    "CreateVM",
    "StartVM",
    "StopVM",
    "KillVM",
    "PauseVM",
    "ResumeVM",
    "RebootVM",
    "DeleteVM",
    "ExecVM",
    "StartProcess",
    "AttachProcess",
    "WriteProcess",
    "SignalProcess",
    "ResizeProcess",
    "WaitProcess",
    "ReleaseProcess",
    "SnapshotVM",
    "DeleteSnapshot",
    "RestoreVM",
    "ForkVM",
    "CopyIn",
    "CopyOut",
    "AddContainer",
    "RemoveContainer",
    "AttachNIC",
    "DetachNIC",
    "JoinNetns",
    "CreatePool",
    "ResizePool",
    "DeletePool",
    "Acquire",
    "Renew",
    "Release",
    "PullImage",
    "ImportImage",
    "ImportRootfs",
    "RemoveImage",
];

fn params<T: DeserializeOwned>(raw: &Option<Value>) -> Result<T, ErrorReply> {
    let value = raw.clone().unwrap_or_else(|| json!({}));
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let parameter = if path == "." {
            // Unknown or missing field: serde names it between backticks.
            let msg = e.inner().to_string();
            msg.split('`').nth(1).unwrap_or("parameters").to_owned()
        } else {
            path
        };
        ErrorReply::invalid_parameter(parameter)
    })
}

fn vm_reply(vm: kiln_engine::VmInfo) -> Result<Outcome, ErrorReply> {
    Ok(Outcome::Single(json!({ "vm": vm })))
}

fn pool_reply(pool: kiln_engine::PoolInfo) -> Result<Outcome, ErrorReply> {
    Ok(Outcome::Single(json!({ "pool": pool })))
}

impl ManagerService {
    async fn dispatch(
        &self,
        call: &Call<RawCall>,
        conn: &mut Connection<Sock>,
        fds: Vec<OwnedFd>,
    ) -> Result<Outcome, ErrorReply> {
        let method_name = call.method().method.as_str();
        let raw = &call.method().parameters;
        let Some(method) = method_name.strip_prefix("io.kiln.Manager.") else {
            return self.service_method(method_name, raw);
        };
        // The caller, from the socket's peer credentials (never from the
        // message): who is authorized, who holds what it acquires, and
        // whose rights an import's path is checked with.
        let mut caller = None;
        if MUTATING.contains(&method) {
            let creds = conn
                .peer_credentials()
                .await
                .map_err(|_| ErrorReply::permission_denied(method))?;
            let uid = creds.unix_user_id().as_raw();
            let gids: Vec<u32> = std::iter::once(creds.unix_primary_group_id().as_raw())
                .chain(
                    creds
                        .unix_supplementary_group_ids()
                        .iter()
                        .map(|g| g.as_raw()),
                )
                .collect();
            if !self.auth.may_manage(uid, gids.iter().copied()) {
                tracing::info!(method, uid, "varlink: refused unprivileged caller");
                return Err(ErrorReply::permission_denied(method));
            }
            caller = Some(Caller { uid, gids });
        }
        let caller_uid = caller.as_ref().map(|c| c.uid);
        let engine = &self.engine;
        match method {
            "CreateVM" => {
                let p: CreateParams = params(raw)?;
                vm_reply(
                    engine
                        .create_vm(&p.name, p.spec.unwrap_or_default())
                        .await?,
                )
            }
            "StartVM" => vm_reply(engine.start_vm(&params::<IdParams>(raw)?.id).await?),
            "StopVM" => {
                let p: StopParams = params(raw)?;
                vm_reply(engine.stop_vm(&p.id, p.timeout()).await?)
            }
            "KillVM" => vm_reply(engine.kill_vm(&params::<IdParams>(raw)?.id).await?),
            "PauseVM" => vm_reply(engine.pause_vm(&params::<IdParams>(raw)?.id).await?),
            "ResumeVM" => vm_reply(engine.resume_vm(&params::<IdParams>(raw)?.id).await?),
            "RebootVM" => vm_reply(engine.reboot_vm(&params::<IdParams>(raw)?.id).await?),
            "DeleteVM" => {
                engine.delete_vm(&params::<IdParams>(raw)?.id).await?;
                Ok(Outcome::Single(json!({})))
            }
            "DescribeVM" => vm_reply(engine.describe_vm(&params::<IdParams>(raw)?.id).await?),
            "ListVMs" => {
                params::<NoParams>(raw)?;
                Ok(Outcome::Single(json!({ "vms": engine.list_vms().await? })))
            }
            "ExecVM" => {
                let (id, container, request) = params::<ExecParams>(raw)?.into_request();
                let reply = engine.exec_in(&id, container, request).await?;
                Ok(Outcome::Single(json!({
                    "exitCode": reply.exit_code,
                    "signal": reply.signal,
                    "stdout": reply.stdout,
                    "stderr": reply.stderr,
                    "stdoutTruncated": reply.stdout_truncated,
                    "stderrTruncated": reply.stderr_truncated,
                    "timedOut": reply.timed_out,
                })))
            }
            "StartProcess" => processes::start(engine, params(raw)?, call.more()).await,
            "AttachProcess" => processes::attach(engine, params(raw)?, call.more()).await,
            "WriteProcess" => processes::write(engine, params(raw)?).await,
            "SignalProcess" => processes::signal(engine, params(raw)?).await,
            "ResizeProcess" => processes::resize(engine, params(raw)?).await,
            "WaitProcess" => processes::wait(engine, params(raw)?).await,
            "ReleaseProcess" => processes::release(engine, params(raw)?).await,
            "CopyIn" => processes::copy_in(engine, params(raw)?, fds).await,
            "CopyOut" => processes::copy_out(engine, params(raw)?, call.more()).await,
            "SnapshotVM" => {
                let p: SnapshotParams = params(raw)?;
                let snapshot = engine.snapshot_vm(&p.id, &p.name, p.keep_paused).await?;
                Ok(Outcome::Single(json!({ "snapshot": snapshot })))
            }
            "ListSnapshots" => {
                params::<NoParams>(raw)?;
                let snapshots = engine.list_snapshots().await?;
                Ok(Outcome::Single(json!({ "snapshots": snapshots })))
            }
            "DeleteSnapshot" => {
                engine
                    .delete_snapshot(&params::<NameParams>(raw)?.name)
                    .await?;
                Ok(Outcome::Single(json!({})))
            }
            "RestoreVM" => {
                let p: RestoreParams = params(raw)?;
                match (&p.into, &p.name, p.same_identity) {
                    (Some(id), None, false) => {
                        vm_reply(engine.restore_into(&p.snapshot, id).await?)
                    }
                    (Some(_), _, _) => Err(ErrorReply::invalid_parameter("into")),
                    (None, _, _) => vm_reply(
                        engine
                            .restore_vm(&p.snapshot, p.name, p.same_identity)
                            .await?,
                    ),
                }
            }
            "ForkVM" => {
                let p: ForkParams = params(raw)?;
                let vms = engine.fork_vm(&p.id, p.count).await?;
                Ok(Outcome::Single(json!({ "vms": vms })))
            }
            "AddContainer" => {
                let p: AddContainerParams = params(raw)?;
                let container = engine.add_container(&p.id, p.spec).await?;
                Ok(Outcome::Single(json!({ "container": container })))
            }
            "RemoveContainer" => {
                let p: ContainerParams = params(raw)?;
                engine.remove_container(&p.id, &p.name).await?;
                Ok(Outcome::Single(json!({})))
            }
            "ListContainers" => {
                let containers = engine.list_containers(&params::<IdParams>(raw)?.id).await?;
                Ok(Outcome::Single(json!({ "containers": containers })))
            }
            "ContainerLogs" => {
                let p: ContainerLogsParams = params(raw)?;
                container_logs(engine.clone(), p, call.more()).await
            }
            "AttachNIC" => {
                let p: AttachNicParams = params(raw)?;
                let nic = engine.attach_nic(&p.id, p.address).await?;
                Ok(Outcome::Single(json!({ "nic": nic })))
            }
            "JoinNetns" => {
                let p: JoinNetnsParams = params(raw)?;
                let request = kiln_engine::api::PodNetworkRequest {
                    netns: p.netns,
                    interface: p.interface,
                    dns: p.dns.unwrap_or_default(),
                };
                vm_reply(engine.join_netns(&p.id, request).await?)
            }
            "DetachNIC" => {
                let p: DetachNicParams = params(raw)?;
                engine.detach_nic(&p.id, p.index).await?;
                Ok(Outcome::Single(json!({})))
            }
            "ListNICs" => {
                let nics = engine.list_nics(&params::<IdParams>(raw)?.id).await?;
                Ok(Outcome::Single(json!({ "nics": nics })))
            }
            "CreatePool" => {
                let p: CreatePoolParams = params(raw)?;
                pool_reply(engine.create_pool(&p.name, p.spec).await?)
            }
            "ResizePool" => {
                let p: ResizePoolParams = params(raw)?;
                pool_reply(engine.resize_pool(&p.name, p.warm, p.max).await?)
            }
            "DeletePool" => {
                engine.delete_pool(&params::<NameParams>(raw)?.name).await?;
                Ok(Outcome::Single(json!({})))
            }
            "DescribePool" => pool_reply(
                engine
                    .describe_pool(&params::<NameParams>(raw)?.name)
                    .await?,
            ),
            "ListPools" => {
                params::<NoParams>(raw)?;
                Ok(Outcome::Single(
                    json!({ "pools": engine.list_pools().await? }),
                ))
            }
            "Acquire" => {
                let p: AcquireParams = params(raw)?;
                let options = AcquireOptions {
                    timeout: p.timeout(),
                    holder: format!("uid:{}", caller_uid.unwrap_or(u32::MAX)),
                    uid: caller_uid,
                    labels: p.labels.clone(),
                    ttl: p.ttl_sec.map(Duration::from_secs),
                    release_on: p.release_on_disconnect.then(|| self.connection.clone()),
                    container: p.container.clone(),
                };
                if options.release_on.is_some() {
                    // Before the call: a lease granted just as the client
                    // hangs up must still be ended.
                    self.bound.set(true);
                }
                vm_reply(engine.acquire(&p.pool, options).await?)
            }
            "Renew" => {
                let p: RenewParams = params(raw)?;
                vm_reply(engine.renew(&p.id, Duration::from_secs(p.ttl_sec)).await?)
            }
            "Release" => {
                let p: ReleaseParams = params(raw)?;
                engine.release(&p.id, p.recycle).await?;
                Ok(Outcome::Single(json!({})))
            }
            "ListGPUs" => {
                params::<NoParams>(raw)?;
                Ok(Outcome::Single(
                    json!({ "gpus": engine.list_gpus().await? }),
                ))
            }
            "PullImage" => {
                let p: PullImageParams = params(raw)?;
                image_job(engine.pull_image(&p.reference).await?, call.more()).await
            }
            "ImportImage" => {
                let p: ImportImageParams = params(raw)?;
                // kilnd reads the path with its own rights: only what the
                // caller could read itself (a relative path is the
                // engine's to refuse).
                if let Some(caller) = &caller {
                    if p.path.is_absolute() && !caller.may_read(&p.path).await {
                        tracing::info!(uid = caller.uid, path = %p.path.display(), "varlink: refused an import the caller may not read");
                        return Err(ErrorReply::unreadable(&p.path));
                    }
                }
                let job = engine.import_image(&p.path, p.reference.as_deref()).await?;
                image_job(job, call.more()).await
            }
            "ImportRootfs" => {
                let p: ImportRootfsParams = params(raw)?;
                // kilnd reads every file of the directories with its own
                // rights: the containerd shim (root) alone may ask.
                if caller.as_ref().map(|c| c.uid) != Some(0) {
                    tracing::info!(uid = ?caller_uid, "varlink: refused ImportRootfs of a caller who is not root");
                    return Err(ErrorReply::kiln(
                        ErrorName::PermissionDenied,
                        json!({ "message": "ImportRootfs is for root alone" }),
                    ));
                }
                let job = engine
                    .import_rootfs(&p.layers, p.reference.as_deref())
                    .await?;
                image_job(job, call.more()).await
            }
            "ListImages" => {
                params::<NoParams>(raw)?;
                Ok(Outcome::Single(
                    json!({ "images": engine.list_images().await? }),
                ))
            }
            "DescribeImage" => {
                let image = engine
                    .describe_image(&params::<ImageParams>(raw)?.image)
                    .await?;
                Ok(Outcome::Single(json!({ "image": image })))
            }
            "RemoveImage" => {
                engine
                    .remove_image(&params::<ImageParams>(raw)?.image)
                    .await?;
                Ok(Outcome::Single(json!({})))
            }
            "GetStatus" => {
                params::<NoParams>(raw)?;
                let status = engine.status().await?;
                Ok(Outcome::Single(
                    serde_json::to_value(status).unwrap_or_default(),
                ))
            }
            "Watch" => {
                params::<NoParams>(raw)?;
                if !call.more() {
                    return Err(ErrorReply::new(
                        "org.varlink.service.ExpectedMore",
                        json!({}),
                    ));
                }
                Ok(Outcome::Stream(watch(engine.subscribe())))
            }
            _ => Err(ErrorReply::new(
                "org.varlink.service.MethodNotFound",
                json!({ "method": method_name }),
            )),
        }
    }

    /// `org.varlink.service`: introspection.
    fn service_method(&self, method: &str, raw: &Option<Value>) -> Result<Outcome, ErrorReply> {
        match method {
            "org.varlink.service.GetInfo" => Ok(Outcome::Single(json!({
                "vendor": "Kiln",
                "product": "kilnd",
                "version": env!("CARGO_PKG_VERSION"),
                "url": "https://github.com/kiln-vm/kiln",
                "interfaces": [INTERFACE, "org.varlink.service"],
            }))),
            "org.varlink.service.GetInterfaceDescription" => {
                let p: InterfaceParams = params(raw)?;
                match p.interface.as_str() {
                    INTERFACE => Ok(Outcome::Single(
                        json!({ "description": INTERFACE_DESCRIPTION }),
                    )),
                    "org.varlink.service" => Ok(Outcome::Single(
                        json!({ "description": kiln_agent_proto::VARLINK_SERVICE_IDL }),
                    )),
                    other => Err(ErrorReply::new(
                        "org.varlink.service.InterfaceNotFound",
                        json!({ "interface": other }),
                    )),
                }
            }
            _ => Err(ErrorReply::new(
                "org.varlink.service.MethodNotFound",
                json!({ "method": method }),
            )),
        }
    }
}

/// A pull or import: with `more`, one `{progress}` reply per report as it
/// comes, then `{image}` (or the error) last; without, `{image}` alone.
async fn image_job(job: ImageJob, more: bool) -> Result<Outcome, ErrorReply> {
    if !more {
        return Ok(Outcome::Single(json!({ "image": job.result().await? })));
    }
    let replies = stream::unfold(Some(job), |job| async move {
        let mut job = job?;
        if let Some(progress) = job.progress().await {
            return Some((continues(json!({ "progress": progress })), Some(job)));
        }
        let last = match job.result().await {
            Ok(image) => Ok(Reply::new(Some(json!({ "image": image }))).set_continues(Some(false))),
            Err(e) => Err(ErrorReply::from(e)),
        };
        Some(((last, Vec::new()), None))
    });
    Ok(Outcome::Stream(Box::pin(replies)))
}

/// How soon a followed `ContainerLogs` asks the guest again after output
/// came (a container that just printed likely prints on: its first lines
/// reach the caller within tens of ms, which is what a pod's start waits
/// for), doubling while nothing comes up to [`LOG_FOLLOW_INTERVAL`].
const LOG_FOLLOW_FIRST: Duration = Duration::from_millis(20);
/// How often an idle followed `ContainerLogs` asks the guest for more.
const LOG_FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// `ContainerLogs`: one read; with `more`, every read as output comes (the
/// first at once, then whenever there is new output, polled every
/// [`LOG_FOLLOW_FIRST`] to [`LOG_FOLLOW_INTERVAL`]) until the container
/// exited and all was read.
async fn container_logs(
    engine: EngineHandle,
    p: ContainerLogsParams,
    more: bool,
) -> Result<Outcome, ErrorReply> {
    let (name, max_bytes) = (p.name.clone(), p.max_bytes);
    let request = move |since| kiln_agent_proto::ContainerLogsRequest {
        id: name.clone(),
        since,
        max_bytes,
    };
    let first = engine.container_logs(&p.id, request(p.since)).await?;
    if !more {
        return Ok(Outcome::Single(logs_json(&first)));
    }
    let id = p.id.clone();
    let replies = stream::unfold(Some((engine, first, true)), move |state| {
        let (id, request) = (id.clone(), request.clone());
        async move {
            let (engine, mut logs, first) = state?;
            if !first {
                let mut wait = LOG_FOLLOW_FIRST;
                loop {
                    tokio::time::sleep(wait).await;
                    match engine.container_logs(&id, request(Some(logs.cursor))).await {
                        Ok(next) if next.entries.is_empty() && !next.ended => {
                            logs = next;
                            wait = (wait * 2).min(LOG_FOLLOW_INTERVAL);
                        }
                        Ok(next) => {
                            logs = next;
                            break;
                        }
                        Err(e) => return Some(((Err(ErrorReply::from(e)), Vec::new()), None)),
                    }
                }
            }
            if logs.ended {
                let last = Reply::new(Some(logs_json(&logs))).set_continues(Some(false));
                return Some(((Ok(last), Vec::new()), None));
            }
            let item = continues(logs_json(&logs));
            Some((item, Some((engine, logs, false))))
        }
    });
    Ok(Outcome::Stream(Box::pin(replies)))
}

fn logs_json(logs: &kiln_agent_proto::ContainerLogsReply) -> Value {
    json!({
        "entries": logs.entries,
        "cursor": logs.cursor,
        "dropped": logs.dropped,
        "ended": logs.ended,
    })
}

/// Engine events as a `more` stream: a `ready` marker first (the watcher is
/// subscribed from here on), then one reply per event.
fn watch(events: broadcast::Receiver<EngineEvent>) -> EventStream {
    let ready = stream::once(async { event_item(json!({ "type": "ready", "id": "" })) });
    let rest = stream::unfold(events, |mut events| async move {
        let event = match events.recv().await {
            Ok(EngineEvent::VmAdded { vm }) => {
                json!({ "type": "vmAdded", "id": vm.id.clone(), "vm": vm })
            }
            Ok(EngineEvent::VmChanged { vm }) => {
                json!({ "type": "vmChanged", "id": vm.id.clone(), "vm": vm })
            }
            Ok(EngineEvent::VmRemoved { id }) => json!({ "type": "vmRemoved", "id": id }),
            Ok(EngineEvent::PoolChanged { pool }) => {
                json!({ "type": "poolChanged", "id": pool.name.clone(), "pool": pool })
            }
            Ok(EngineEvent::PoolRemoved { name }) => json!({ "type": "poolRemoved", "id": name }),
            Ok(EngineEvent::GpusChanged { gpus }) => {
                json!({ "type": "gpusChanged", "id": "", "gpus": gpus })
            }
            Ok(EngineEvent::Oom { id, limit_bytes }) => {
                json!({ "type": "oom", "id": id, "memoryLimitBytes": limit_bytes })
            }
            Ok(EngineEvent::LeaseExpired { id, pool, holder }) => {
                json!({ "type": "leaseExpired", "id": id, "poolName": pool, "holder": holder })
            }
            Ok(EngineEvent::ImageAdded { image }) => {
                json!({ "type": "imageAdded", "id": image.digest.clone(), "image": image })
            }
            Ok(EngineEvent::ImageRemoved { digest }) => {
                json!({ "type": "imageRemoved", "id": digest })
            }
            // The watcher fell behind: tell it to re-list.
            Err(broadcast::error::RecvError::Lagged(_)) => json!({ "type": "lagged", "id": "" }),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((event_item(event), events))
    });
    Box::pin(ready.chain(rest))
}

/// `stream`, ended as soon as the client hangs up. zlink stops reading a
/// connection while it streams replies to it, so without this a client
/// that leaves a quiet stream (a `Watch` between two events) would keep its
/// socket and task in kilnd until the next reply failed to write.
///
/// Only a full hang-up ends it (`POLLHUP`: the peer closed its socket), not
/// a half-close (`shutdown(SHUT_WR)`: a client that still reads; its full
/// close is seen within a second), nor data (a call pipelined behind this
/// one, which zlink reads once the stream is over).
fn until_hang_up(stream: EventStream, conn: &Connection<Sock>) -> EventStream {
    use std::os::fd::{AsFd, AsRawFd};
    use tokio::io::Interest;

    let Ok(peer) = conn.read().read_half().as_fd().try_clone_to_owned() else {
        return stream;
    };
    let Ok(peer) = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(peer))
    else {
        return stream;
    };
    let hung_up = async move {
        let gone = |peer: &tokio::net::UnixStream| {
            let mut poll = libc::pollfd {
                fd: peer.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: poll(2) on one live pollfd, without waiting.
            let n = unsafe { libc::poll(&mut poll, 1, 0) };
            n < 0 || poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
        };
        loop {
            let Ok(ready) = peer.ready(Interest::READABLE).await else {
                return;
            };
            if ready.is_read_closed() {
                // Closed for good, or half-closed: tokio keeps reporting
                // a read-side close from then on, so look once a second.
                while !gone(&peer) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                return;
            }
            // Data (a pipelined call): wait for the next change; a
            // would-block clears readiness without reading anything.
            let _ = peer.try_io(Interest::READABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
    };
    Box::pin(stream.take_until(hung_up))
}

fn event_item(event: Value) -> ReplyStreamItem<Value, ErrorReply> {
    continues(json!({ "event": event }))
}

/// One reply of a stream with more to come.
pub(crate) fn continues(parameters: Value) -> ReplyStreamItem<Value, ErrorReply> {
    (
        Ok(Reply::new(Some(parameters)).set_continues(Some(true))),
        Vec::new(),
    )
}

impl zlink::Service<Sock> for ManagerService {
    type MethodCall<'de> = RawCall;
    type ReplyParams<'ser> = Value;
    type ReplyStreamParams = Value;
    type ReplyStreamError = ErrorReply;
    type ReplyStream = EventStream;
    type ReplyError<'ser> = ErrorReply;
    type Upgrade = ();

    async fn handle<'ser>(
        &'ser mut self,
        call: &'ser Call<Self::MethodCall<'_>>,
        conn: &mut Connection<Sock>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> HandleResult<
        Self::ReplyParams<'ser>,
        Self::ReplyStream,
        Self::ReplyError<'ser>,
        Self::Upgrade,
    > {
        match self.dispatch(call, conn, fds).await {
            Ok(Outcome::Single(value)) => (MethodReply::Single(Some(value)), Vec::new()),
            Ok(Outcome::SingleWithFds(value, fds)) => (MethodReply::Single(Some(value)), fds),
            Ok(Outcome::Stream(stream)) => {
                (MethodReply::Multi(until_hang_up(stream, conn)), Vec::new())
            }
            Err(error) => (MethodReply::Error(error), Vec::new()),
        }
    }
}
