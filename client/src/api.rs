//! `io.kiln.Manager` as its clients (kilnctl, the containerd shim) use it,
//! written once: one method per varlink method (the IDL is
//! varlink/io.kiln.Manager.varlink) with typed arguments, each returning
//! the reply's parameters as kilnd sent them. kilnctl's `--json` prints
//! them unchanged; its tables read them through field lists that a test
//! checks against the IDL.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

use serde_json::{json, Value};

use crate::client::{ClientError, Connection, Reply};

const INTERFACE: &str = "io.kiln.Manager";

/// The client of `io.kiln.Manager`.
#[derive(Debug)]
pub struct Manager {
    conn: Connection,
}

/// `fn rust_name(args) => Method { "parameter": value, ... }`: a method of
/// [`Manager`] that calls `io.kiln.Manager.Method` with those parameters
/// (`None` ones left out) and returns the reply's parameters.
macro_rules! calls {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) => $method:ident
        { $($key:literal: $value:expr),* $(,)? } )*) => {
        impl Manager {
            $(
                $(#[$doc])*
                pub fn $name(&mut self, $($arg: $ty),*) -> Result<Value, ClientError> {
                    self.call(stringify!($method), json!({ $($key: $value),* }))
                }
            )*
        }
    };
}

calls! {
    fn get_status() => GetStatus {}
    /// `{"vms": [VM]}`.
    fn list_vms() => ListVMs {}
    /// `{"vm": VM}`, as for every VM method that returns one.
    fn describe_vm(id: &str) => DescribeVM { "id": id }
    fn create_vm(name: &str, spec: Value) => CreateVM { "name": name, "spec": spec }
    fn stop_vm(id: &str, timeout_sec: Option<u64>) => StopVM { "id": id, "timeoutSec": timeout_sec }
    fn delete_vm(id: &str) => DeleteVM { "id": id }
    /// Without `more`: `{"handle": N, "pid": N}`, the process running on
    /// by itself; `process` is a ProcessSpec.
    fn start_process(id: &str, process: &Value, detach: bool) => StartProcess {
        "id": id, "process": process, "detach": detach.then_some(true)
    }
    /// `data` is base64 (at most 1 MiB of bytes).
    fn write_process(id: &str, handle: u64, data: Option<&str>, close: bool) => WriteProcess {
        "id": id, "handle": handle, "data": data, "close": close.then_some(true)
    }
    fn signal_process(id: &str, handle: u64, signal: i32) => SignalProcess {
        "id": id, "handle": handle, "signal": signal
    }
    fn resize_process(id: &str, handle: u64, rows: u16, cols: u16) => ResizeProcess {
        "id": id, "handle": handle, "rows": rows, "cols": cols
    }
    fn release_process(id: &str, handle: u64) => ReleaseProcess { "id": id, "handle": handle }
    /// `{"containers": [Container]}`.
    fn list_containers(id: &str) => ListContainers { "id": id }
    /// `{"container": Container}`; `spec` is a ContainerSpec.
    fn add_container(id: &str, spec: Value) => AddContainer { "id": id, "spec": spec }
    fn remove_container(id: &str, name: &str) => RemoveContainer { "id": id, "name": name }
    /// One read: `{"entries": [LogEntry], "cursor": N, "dropped": N, "ended": B}`.
    fn container_logs(id: &str, name: &str, since: Option<u64>) => ContainerLogs {
        "id": id, "name": name, "since": since
    }
    /// `{"images": [Image]}`.
    fn list_images() => ListImages {}
    /// `{"image": Image}`.
    fn describe_image(image: &str) => DescribeImage { "image": image }
    fn remove_image(image: &str) => RemoveImage { "image": image }
    /// `{"nics": [NIC]}`.
    fn list_nics(id: &str) => ListNICs { "id": id }
    /// `{"nic": NIC}`.
    fn attach_nic(id: &str, address: Option<&str>) => AttachNIC { "id": id, "address": address }
    fn detach_nic(id: &str, index: u32) => DetachNIC { "id": id, "index": index }
    /// `{"vm": VM}`: the VM's boot NIC now in pod namespace `netns`.
    fn join_netns(id: &str, netns: &str, interface: Option<&str>, dns: &[String]) => JoinNetns {
        "id": id, "netns": netns, "interface": interface, "dns": dns
    }
    /// `{"pools": [Pool]}`.
    fn list_pools() => ListPools {}
    /// `{"pool": Pool}`, as for CreatePool and ResizePool.
    fn describe_pool(name: &str) => DescribePool { "name": name }
    fn create_pool(name: &str, spec: Value) => CreatePool { "name": name, "spec": spec }
    fn resize_pool(name: &str, warm: u32, max: Option<u32>) => ResizePool {
        "name": name, "warm": warm, "max": max
    }
    fn delete_pool(name: &str) => DeletePool { "name": name }
    fn acquire(
        pool: &str,
        timeout_ms: Option<u64>,
        labels: &BTreeMap<String, String>,
        ttl_sec: Option<u64>,
        container: Option<Value>
    ) => Acquire {
        "pool": pool,
        "timeoutMs": timeout_ms,
        "labels": (!labels.is_empty()).then_some(labels),
        "ttlSec": ttl_sec,
        "container": container,
    }
    fn renew(id: &str, ttl_sec: u64) => Renew { "id": id, "ttlSec": ttl_sec }
    fn release(id: &str, recycle: bool) => Release { "id": id, "recycle": recycle.then_some(true) }
    /// `{"gpus": [Gpu]}`.
    fn list_gpus() => ListGPUs {}
    /// `{"snapshot": Snapshot}`.
    fn snapshot_vm(id: &str, name: &str, keep_paused: bool) => SnapshotVM {
        "id": id, "name": name, "keepPaused": keep_paused.then_some(true)
    }
    /// `{"snapshots": [Snapshot]}`.
    fn list_snapshots() => ListSnapshots {}
    fn delete_snapshot(name: &str) => DeleteSnapshot { "name": name }
    /// `{"vm": VM}`: a new VM, or with `into` that VM, restored.
    fn restore_vm(
        snapshot: &str,
        name: Option<&str>,
        same_identity: bool,
        into: Option<&str>
    ) => RestoreVM {
        "snapshot": snapshot,
        "name": name,
        "sameIdentity": same_identity.then_some(true),
        "into": into,
    }
    /// `{"vms": [VM]}`: the copies.
    fn fork_vm(id: &str, count: u32) => ForkVM { "id": id, "count": count }
}

impl Manager {
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    /// A second client on a connection of its own, for calls made while
    /// this one follows a stream.
    pub fn reconnect(&self) -> Result<Self, ClientError> {
        Ok(Self::new(self.conn.reopen()?))
    }

    fn call(&mut self, method: &str, parameters: Value) -> Result<Value, ClientError> {
        self.conn.call(&format!("{INTERFACE}.{method}"), parameters)
    }

    /// `StartVM`, `KillVM`, `PauseVM`, `ResumeVM`, `RebootVM`: an id in, the
    /// VM after the change out.
    pub fn vm_action(&mut self, action: VmAction, id: &str) -> Result<Value, ClientError> {
        self.call(action.method(), json!({ "id": id }))
    }

    /// `Watch`: `each` gets every reply (`{"event": Event}`) until it
    /// returns false or the stream ends.
    pub fn watch(&mut self, each: impl FnMut(Value) -> bool) -> Result<(), ClientError> {
        self.stream("Watch", json!({}), each)
    }

    /// `PullImage` with `more`: `each` gets `{"progress": ImageProgress}`
    /// replies, then `{"image": Image}` last.
    pub fn pull_image(
        &mut self,
        reference: &str,
        each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        self.stream("PullImage", json!({ "reference": reference }), each)
    }

    /// `ImportImage` with `more`, replying as [`Manager::pull_image`].
    pub fn import_image(
        &mut self,
        path: &str,
        reference: Option<&str>,
        each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let parameters = json!({ "path": path, "reference": reference });
        self.stream("ImportImage", parameters, each)
    }

    /// `ImportRootfs` with `more`: the directories `layers` (absolute,
    /// lowest first; each one layer of a committed overlay snapshot)
    /// stored as an image, replying as [`Manager::pull_image`].
    pub fn import_rootfs(
        &mut self,
        layers: &[String],
        reference: Option<&str>,
        each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let parameters = json!({ "layers": layers, "reference": reference });
        self.stream("ImportRootfs", parameters, each)
    }

    /// `ContainerLogs` with `more` from cursor `since` (`None`: the oldest
    /// output kept): a reply whenever there is new output, the last with
    /// `ended` once the container exited.
    pub fn follow_container_logs(
        &mut self,
        id: &str,
        name: &str,
        since: Option<u64>,
        each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let parameters = json!({ "id": id, "name": name, "since": since });
        self.stream("ContainerLogs", parameters, each)
    }

    /// `StartProcess` with `more` (`process` a ProcessSpec; `detach`: the
    /// process outlives this connection): the replies, from
    /// [`Manager::next_reply`], are `{handle, pid}` (and `terminal`, the
    /// index of the terminal's descriptor, with a tty), then
    /// `{output, cursor}` per read, the last with `exit`.
    pub fn follow_process(
        &mut self,
        id: &str,
        process: &Value,
        detach: bool,
    ) -> Result<(), ClientError> {
        let parameters = json!({ "id": id, "process": process, "detach": detach.then_some(true) });
        self.conn
            .send(&format!("{INTERFACE}.StartProcess"), parameters, true, &[])
    }

    /// `AttachProcess` with `more` from cursor `since`: the replies, from
    /// [`Manager::next_reply`], are `{output, cursor}` per read, the last
    /// with `exit`.
    pub fn follow_attach(
        &mut self,
        id: &str,
        handle: u64,
        since: Option<u64>,
    ) -> Result<(), ClientError> {
        let parameters = json!({ "id": id, "handle": handle, "since": since });
        self.conn
            .send(&format!("{INTERFACE}.AttachProcess"), parameters, true, &[])
    }

    /// `CopyIn`: the tar archive read from `archive` unpacked below the
    /// directory `target.path`; `{entries, bytes}`.
    pub fn copy_in(
        &mut self,
        id: &str,
        target: &CopyTarget<'_>,
        archive: BorrowedFd<'_>,
    ) -> Result<Value, ClientError> {
        let method = format!("{INTERFACE}.CopyIn");
        self.conn
            .send(&method, target.parameters(id), false, &[archive])?;
        Ok(self.conn.receive()?.parameters)
    }

    /// `CopyOut` with `more`: the first reply from [`Manager::next_reply`]
    /// passes the archive's pipe (`archive` is its index), the last says
    /// `{entries, bytes}` or why the copy failed.
    pub fn copy_out(&mut self, id: &str, target: &CopyTarget<'_>) -> Result<(), ClientError> {
        let method = format!("{INTERFACE}.CopyOut");
        self.conn.send(&method, target.parameters(id), true, &[])
    }

    /// The next reply of the stream [`Manager::follow_process`] or
    /// [`Manager::copy_out`] started.
    pub fn next_reply(&mut self) -> Result<Reply, ClientError> {
        self.conn.receive()
    }

    fn stream(
        &mut self,
        method: &str,
        parameters: Value,
        each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        self.conn
            .call_more(&format!("{INTERFACE}.{method}"), parameters, each)
    }
}

/// The methods that take an id and return the changed VM.
#[derive(Debug, Clone, Copy)]
pub enum VmAction {
    Start,
    Kill,
    Pause,
    Resume,
    Reboot,
}

impl VmAction {
    fn method(self) -> &'static str {
        match self {
            Self::Start => "StartVM",
            Self::Kill => "KillVM",
            Self::Pause => "PauseVM",
            Self::Resume => "ResumeVM",
            Self::Reboot => "RebootVM",
        }
    }
}

/// Where a copy goes or comes from: `CopyIn`'s and `CopyOut`'s arguments
/// besides the VM.
#[derive(Debug, Clone, Copy)]
pub struct CopyTarget<'a> {
    /// Absolute, in the guest or the container.
    pub path: &'a str,
    pub container: Option<&'a str>,
    pub max_bytes: Option<u64>,
}

impl CopyTarget<'_> {
    fn parameters(&self, id: &str) -> Value {
        json!({
            "id": id,
            "path": self.path,
            "container": self.container,
            "maxBytes": self.max_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    /// Every method the client calls is declared by the committed IDL.
    #[test]
    fn calls_are_idl_methods() {
        let idl = include_str!("../../varlink/io.kiln.Manager.varlink");
        let source = include_str!("api.rs");
        let table = source
            .split_once("\ncalls! {")
            .and_then(|(_, rest)| rest.split_once("\n}\n"))
            .map_or("", |(table, _)| table);
        let calls = table
            .split(") => ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next());
        let mut methods: Vec<&str> = calls.collect();
        methods.extend([
            "StartVM",
            "KillVM",
            "PauseVM",
            "ResumeVM",
            "RebootVM",
            "Watch",
            "PullImage",
            "ImportImage",
            "ImportRootfs",
            "AttachProcess",
            "CopyIn",
            "CopyOut",
        ]);
        assert!(methods.len() > 20, "{methods:?}");
        for method in methods {
            assert!(
                idl.contains(&format!("\nmethod {method}(")),
                "the client calls {method}, which the IDL does not declare"
            );
        }
    }
}
