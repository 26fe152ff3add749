//! `io.kiln.Kiln1.VM`: one object per VM at `/io/kiln/Kiln1/vm/<id>`.
//!
//! Methods are thin (authorize, one engine call, map the error). Properties
//! read a view of the last [`VmInfo`] the engine published; only the event
//! task in `objects.rs` writes it. The view is a `watch` channel rather than
//! `&mut self` so updating it never waits for a running method (zbus holds
//! an interface's read lock for the whole of a method call, e.g. a boot).

use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::ExecRequest;
use kiln_agent_proto::WindowSize;
use kiln_engine::copy::{self, CopyTarget, DEFAULT_MAX_COPY_BYTES};
use kiln_engine::error::ErrorName;
use kiln_engine::guest_io::ProcessSpec;
use kiln_engine::{EngineError, EngineHandle, VmInfo};
use tokio::sync::watch;
use zbus::message::Header;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::{interface, Connection, ObjectServer};

use crate::auth::Authorizer;
use crate::container::{logs_tuple, without_nul, ContainerSummary, LogsTuple};
use crate::error::KilnError;
use crate::mirror::{unexport, wire_name, Context, Mirror};
use crate::names::{vm_path, VM_INTERFACE};
use crate::process::relay;
use crate::snapshot::{snapshot_tuple, SnapshotTuple};

/// A copy's target from the D-Bus arguments ("" and 0 mean the defaults).
fn copy_target(id: &str, path: String, container: String, max_bytes: u64) -> CopyTarget {
    CopyTarget {
        id: id.to_owned(),
        path,
        container: (!container.is_empty()).then_some(container),
        max_bytes: if max_bytes == 0 {
            DEFAULT_MAX_COPY_BYTES
        } else {
            max_bytes
        },
    }
}

/// One exported VM.
#[derive(Debug)]
pub struct Vm {
    id: String,
    engine: EngineHandle,
    auth: Authorizer,
    view: Arc<watch::Sender<VmInfo>>,
}

impl Vm {
    /// An object for `info`.
    pub fn new(info: VmInfo, engine: EngineHandle, auth: Authorizer) -> Self {
        Self {
            id: info.id.clone(),
            engine,
            auth,
            view: Arc::new(watch::Sender::new(info)),
        }
    }

    fn info(&self) -> watch::Ref<'_, VmInfo> {
        self.view.borrow()
    }
}

impl Mirror for Vm {
    type Info = VmInfo;
    const INTERFACE: &'static str = VM_INTERFACE;

    fn new_object(info: VmInfo, context: &Context) -> Self {
        Self::new(info, context.engine.clone(), context.auth.clone())
    }
    fn view(&self) -> Arc<watch::Sender<VmInfo>> {
        self.view.clone()
    }
    fn path(info: &VmInfo) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
        vm_path(&info.id)
    }
    fn properties(info: &VmInfo) -> Vec<(&'static str, Value<'static>)> {
        properties(info)
    }
}

/// Every property as (D-Bus name, value), for PropertiesChanged diffs.
pub fn properties(info: &VmInfo) -> Vec<(&'static str, Value<'static>)> {
    let s = |v: &Option<String>| Value::from(v.clone().unwrap_or_default());
    vec![
        ("Id", Value::from(info.id.clone())),
        ("Name", Value::from(info.name.clone())),
        ("State", Value::from(info.state.as_str())),
        ("Vcpus", Value::from(info.vcpus)),
        ("MemoryMiB", Value::from(info.memory_mib)),
        ("Pid", Value::from(info.pid.unwrap_or(0))),
        ("CreatedAt", Value::from(info.created_at)),
        ("StartedAt", Value::from(info.started_at.unwrap_or(0))),
        ("ReadyAt", Value::from(info.ready_at.unwrap_or(0))),
        ("QemuVersion", s(&info.qemu_version)),
        ("KernelRelease", s(&info.kernel_release)),
        ("BootId", s(&info.boot_id)),
        ("LastError", s(&info.last_error)),
        ("Pool", s(&info.pool)),
        ("LeasedBy", s(&info.leased_by)),
        ("AcquiredAt", Value::from(info.acquired_at.unwrap_or(0))),
        (
            "LeaseExpiresAt",
            Value::from(info.lease_expires_at.unwrap_or(0)),
        ),
        ("Gpus", Value::from(info.gpus.clone())),
        ("Display", Value::from(display(info))),
        ("Boot", Value::from(wire_name(&info.boot))),
        ("Network", Value::from(network(info))),
    ]
}

/// One NIC on the wire, `(ysuss)`: index, TAP, ifindex, MAC, address
/// ("" when a `netns` VM was given none).
type NicTuple = (u8, String, u32, String, String);

fn nic_tuple(n: &kiln_engine::NicInfo) -> NicTuple {
    (
        n.index,
        n.tap.clone(),
        n.ifindex,
        n.mac.to_string(),
        n.address.map(|a| a.to_string()).unwrap_or_default(),
    )
}

fn network(info: &VmInfo) -> Vec<NicTuple> {
    info.network.iter().map(nic_tuple).collect()
}

fn display(info: &VmInfo) -> String {
    wire_name(&info.display)
}

/// A guest's output as a D-Bus string: NUL, which D-Bus strings cannot
/// hold (the bus daemon disconnects a sender whose message has one),
/// becomes U+FFFD, as the agent already does with invalid UTF-8.
/// An `ExecRequest` from `Exec`'s arguments (0 and "" mean the default).
fn exec_request(
    command: Vec<String>,
    env: Vec<String>,
    stdin: String,
    timeout_sec: u32,
    max_output_bytes: u32,
) -> ExecRequest {
    ExecRequest {
        argv: command,
        env,
        stdin: (!stdin.is_empty()).then_some(stdin),
        timeout_ms: (timeout_sec > 0).then(|| u64::from(timeout_sec) * 1000),
        max_output_bytes: (max_output_bytes > 0).then_some(max_output_bytes),
    }
}

/// `Exec`'s reply: exit code, stdout, stderr, signal, truncations, timeout.
type ExecTuple = (i32, String, String, i32, bool, bool, bool);

/// `Exec`'s reply tuple.
fn exec_tuple(reply: kiln_agent_proto::ExecReply) -> Result<ExecTuple, KilnError> {
    Ok((
        reply.exit_code,
        without_nul(reply.stdout),
        without_nul(reply.stderr),
        reply.signal.unwrap_or(0),
        reply.stdout_truncated,
        reply.stderr_truncated,
        reply.timed_out,
    ))
}

/// Remove a VM's object if it is exported.
pub async fn unexport_vm(server: &ObjectServer, id: &str) {
    if let Ok(path) = vm_path(id) {
        unexport::<Vm>(server, path).await;
    }
}

#[interface(name = "io.kiln.Kiln1.VM")]
impl Vm {
    /// Boot the VM; returns once the guest agent answers.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Start").await?;
        self.engine.start_vm(&self.id).await?;
        Ok(())
    }

    /// Shut down cleanly (agent, then ACPI, then SIGKILL after the timeout;
    /// 0 = the daemon's default).
    async fn stop(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        timeout_sec: u32,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Stop").await?;
        let timeout = (timeout_sec > 0).then(|| Duration::from_secs(u64::from(timeout_sec)));
        self.engine.stop_vm(&self.id, timeout).await?;
        Ok(())
    }

    /// SIGKILL the QEMU process.
    async fn kill(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Kill").await?;
        self.engine.kill_vm(&self.id).await?;
        Ok(())
    }

    /// Extend the VM's lease: it now ends `ttl_sec` (1 to 604800) seconds
    /// from now.
    async fn renew(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        ttl_sec: u32,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Renew").await?;
        self.engine
            .renew(&self.id, Duration::from_secs(ttl_sec.into()))
            .await?;
        Ok(())
    }

    /// Pause the vCPUs.
    async fn pause(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Pause").await?;
        self.engine.pause_vm(&self.id).await?;
        Ok(())
    }

    /// Resume paused vCPUs.
    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Resume").await?;
        self.engine.resume_vm(&self.id).await?;
        Ok(())
    }

    /// Reboot the guest; returns once it is ready again.
    async fn reboot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Reboot").await?;
        self.engine.reboot_vm(&self.id).await?;
        Ok(())
    }

    /// Delete the VM, killing its QEMU first if it has one; its object goes
    /// away (InterfacesRemoved).
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "Delete").await?;
        self.engine.delete_vm(&self.id).await?;
        // Also removed by the event task; whoever is first wins, so the
        // object is gone when the caller gets the reply.
        unexport_vm(conn.object_server(), &self.id).await;
        Ok(())
    }

    /// Run a command in the guest, like varlink's `ExecVM`: stdin "" = none,
    /// timeout 0 = the default, max_output_bytes 0 = the default cap per
    /// stream. Replies the exit code (128 + signal when killed), the output,
    /// then the signal that ended the command (0 = none), whether each
    /// stream was cut at the cap and whether the timeout killed it.
    // The reply tuple is spelled out, not an alias: zbus makes one out
    // argument per element only of a tuple it can see.
    #[zbus(out_args(
        "exit_code",
        "stdout",
        "stderr",
        "signal",
        "stdout_truncated",
        "stderr_truncated",
        "timed_out"
    ))]
    // The arguments are the D-Bus signature, one per field of ExecVM.
    #[allow(clippy::too_many_arguments)]
    async fn exec(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        command: Vec<String>,
        env: Vec<String>,
        stdin: String,
        timeout_sec: u32,
        max_output_bytes: u32,
    ) -> Result<(i32, String, String, i32, bool, bool, bool), KilnError> {
        self.auth.check_manage(conn, &header, "Exec").await?;
        let request = exec_request(command, env, stdin, timeout_sec, max_output_bytes);
        exec_tuple(self.engine.exec_vm(&self.id, request).await?)
    }

    /// Save this VM as snapshot `name`, like varlink's `SnapshotVM`:
    /// `(name, source_id, source_name, created_at, vcpus, memory_mib,
    /// size_bytes, containers)`.
    #[zbus(out_args("snapshot"))]
    async fn snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        keep_paused: bool,
    ) -> Result<SnapshotTuple, KilnError> {
        self.auth.check_manage(conn, &header, "Snapshot").await?;
        let snapshot = self
            .engine
            .snapshot_vm(&self.id, &name, keep_paused)
            .await?;
        Ok(snapshot_tuple(&snapshot))
    }

    /// What its QEMU uses now, like `usage` in varlink's `DescribeVM`:
    /// CPU µs, cgroup memory and cap, RSS, PSS, disk read and written,
    /// network received and sent (the guest's view), OOM kills, in bytes
    /// where not said. `InvalidState` when it has no process.
    #[zbus(out_args(
        "cpu_usec",
        "memory_bytes",
        "memory_limit_bytes",
        "rss_bytes",
        "pss_bytes",
        "disk_read_bytes",
        "disk_write_bytes",
        "net_rx_bytes",
        "net_tx_bytes",
        "oom_kills"
    ))]
    async fn usage(&self) -> Result<(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64), KilnError> {
        let vm = self.engine.describe_vm(&self.id).await?;
        let Some(u) = vm.usage else {
            return Err(EngineError::InvalidState {
                id: self.id.clone(),
                state: vm.state,
                operation: "report the usage of",
            }
            .into());
        };
        Ok((
            u.cpu_usec,
            u.memory_bytes,
            u.memory_limit_bytes,
            u.rss_bytes,
            u.pss_bytes,
            u.disk_read_bytes,
            u.disk_write_bytes,
            u.net_rx_bytes,
            u.net_tx_bytes,
            u.oom_kills,
        ))
    }

    /// Take this stopped VM back to snapshot `snapshot` of it, like
    /// varlink's `RestoreVM` with `into`; replies once its agent answers.
    async fn restore_to(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        snapshot: String,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "RestoreTo").await?;
        self.engine.restore_into(&snapshot, &self.id).await?;
        Ok(())
    }

    /// Start a process, like varlink's `StartProcess`: `container` "" =
    /// the guest; `tty` puts it on a terminal of `rows` × `cols`; `stdin`
    /// keeps its stdin open. Returns its handle, its PID in the guest and
    /// the caller's ends of its stdio: `[terminal]`, or `[stdout, stderr]`
    /// plus stdin's write end when `stdin`. kilnd relays them until the
    /// process ends; a caller that closes them first kills the process
    /// unless `detach`. The exit status: `WaitProcess`.
    #[zbus(out_args("handle", "pid", "stdio"))]
    #[allow(clippy::too_many_arguments)]
    async fn start_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        argv: Vec<String>,
        env: Vec<String>,
        container: String,
        tty: bool,
        rows: u16,
        cols: u16,
        stdin: bool,
        detach: bool,
    ) -> Result<(u64, u32, Vec<zbus::zvariant::OwnedFd>), KilnError> {
        self.auth
            .check_manage(conn, &header, "StartProcess")
            .await?;
        let spec = ProcessSpec {
            argv,
            env,
            container: (!container.is_empty()).then_some(container),
            tty: tty.then_some(WindowSize { rows, cols }),
            stdin,
        };
        let started = self.engine.spawn_process(&self.id, &spec).await?;
        let fds = relay(
            &self.engine,
            &self.id,
            started.handle,
            None,
            tty,
            stdin,
            detach,
        );
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                let _ = self.engine.release_process(&self.id, started.handle).await;
                return Err(e);
            }
        };
        Ok((
            started.handle,
            started.pid,
            fds.into_iter().map(Into::into).collect(),
        ))
    }

    /// Follow a started process's output again from cursor `since` (0 =
    /// the oldest byte the guest keeps): `[stdout, stderr]` read ends.
    /// Closing them never kills the process.
    async fn attach_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
        since: u64,
    ) -> Result<Vec<zbus::zvariant::OwnedFd>, KilnError> {
        self.auth
            .check_manage(conn, &header, "AttachProcess")
            .await?;
        // Checks the handle before handing out descriptors.
        self.engine.read_process(&self.id, handle, None).await?;
        let since = (since > 0).then_some(since);
        let fds = relay(&self.engine, &self.id, handle, since, false, false, true)?;
        Ok(fds.into_iter().map(Into::into).collect())
    }

    /// Write `data` to the process's stdin (or terminal); `close` then
    /// closes it (a terminal gets ^D).
    async fn write_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
        data: Vec<u8>,
        close: bool,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "WriteProcess")
            .await?;
        Ok(self
            .engine
            .write_process(&self.id, handle, &data, close)
            .await?)
    }

    /// Send `signal` to the process's process group.
    async fn signal_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
        signal: i32,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "SignalProcess")
            .await?;
        Ok(self.engine.signal_process(&self.id, handle, signal).await?)
    }

    /// Change the size of the process's terminal.
    async fn resize_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
        rows: u16,
        cols: u16,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "ResizeProcess")
            .await?;
        let size = WindowSize { rows, cols };
        Ok(self.engine.resize_process(&self.id, handle, size).await?)
    }

    /// Wait up to `timeout_sec` (0 = 60) for the process to exit: its exit
    /// code (128 + signal when killed) and the signal (0 = none).
    #[zbus(out_args("exit_code", "signal"))]
    async fn wait_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
        timeout_sec: u32,
    ) -> Result<(i32, i32), KilnError> {
        self.auth.check_manage(conn, &header, "WaitProcess").await?;
        let timeout =
            Duration::from_secs(u64::from(if timeout_sec == 0 { 60 } else { timeout_sec }));
        let exit = self.engine.wait_process(&self.id, handle, timeout).await?;
        Ok((exit.exit_code, exit.signal.unwrap_or(0)))
    }

    /// Kill the process if it runs, and forget it.
    async fn release_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        handle: u64,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "ReleaseProcess")
            .await?;
        Ok(self.engine.release_process(&self.id, handle).await?)
    }

    /// Unpack the tar archive read from `archive` below the directory
    /// `path` (in `container`'s root unless ""), like varlink's `CopyIn`;
    /// `max_bytes` 0 = 1 GiB. Returns the entries and bytes copied.
    #[zbus(out_args("entries", "bytes"))]
    async fn copy_in(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        path: String,
        container: String,
        max_bytes: u64,
        archive: zbus::zvariant::OwnedFd,
    ) -> Result<(u64, u64), KilnError> {
        self.auth.check_manage(conn, &header, "CopyIn").await?;
        let target = copy_target(&self.id, path, container, max_bytes);
        let stats = copy::copy_in(&self.engine, &target, archive.into()).await?;
        Ok((stats.entries, stats.bytes))
    }

    /// Pack `path` (a file, or a directory with all it holds) into a tar
    /// archive, like varlink's `CopyOut`: the read end of the pipe it is
    /// written to. A copy that fails half-way ends the archive early.
    async fn copy_out(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        path: String,
        container: String,
        max_bytes: u64,
    ) -> Result<zbus::zvariant::OwnedFd, KilnError> {
        self.auth.check_manage(conn, &header, "CopyOut").await?;
        let target = copy_target(&self.id, path, container, max_bytes);
        // The path must exist before the caller gets an archive to read.
        target.describe(&self.engine).await?;
        let (reader, writer) = kiln_engine::stream::pipe()
            .map_err(|e| KilnError::from(EngineError::FileFailed(format!("pipe: {e}"))))?;
        let engine = self.engine.clone();
        tokio::spawn(async move {
            if let Err(e) = copy::copy_out(&engine, &target, writer).await {
                tracing::info!(vm = %target.id, error = %e, "CopyOut ended early");
            }
        });
        Ok(reader.into())
    }

    /// `Exec` in container `container`'s root and namespaces (varlink's
    /// `ExecVM` with `container`).
    #[zbus(out_args(
        "exit_code",
        "stdout",
        "stderr",
        "signal",
        "stdout_truncated",
        "stderr_truncated",
        "timed_out"
    ))]
    #[allow(clippy::too_many_arguments)]
    async fn exec_in(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        container: String,
        command: Vec<String>,
        env: Vec<String>,
        stdin: String,
        timeout_sec: u32,
        max_output_bytes: u32,
    ) -> Result<(i32, String, String, i32, bool, bool, bool), KilnError> {
        self.auth.check_manage(conn, &header, "ExecIn").await?;
        let request = exec_request(command, env, stdin, timeout_sec, max_output_bytes);
        exec_tuple(
            self.engine
                .exec_in(&self.id, Some(container), request)
                .await?,
        )
    }

    /// Run another container (spec as varlink's `ContainerSpec`, an
    /// `a{sv}`); replies once it runs. See `docs/api.md`, "Containers".
    async fn add_container(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        spec: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
    ) -> Result<ContainerSummary, KilnError> {
        self.auth
            .check_manage(conn, &header, "AddContainer")
            .await?;
        let spec = crate::spec::decode(&spec)?;
        let container = self.engine.add_container(&self.id, spec).await?;
        Ok(ContainerSummary::from(&container))
    }

    /// Stop and remove container `name`, unplug its layers.
    async fn remove_container(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), KilnError> {
        self.auth
            .check_manage(conn, &header, "RemoveContainer")
            .await?;
        self.engine.remove_container(&self.id, &name).await?;
        Ok(())
    }

    /// The VM's containers, refreshed from the guest when it answers.
    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, KilnError> {
        let containers = self.engine.list_containers(&self.id).await?;
        Ok(containers.iter().map(ContainerSummary::from).collect())
    }

    /// One read of container `name`'s output from cursor `since` (0 = the
    /// oldest kept), at most `max_bytes` (0 = 64 KiB). Follow by calling
    /// again with the returned cursor until `ended`.
    #[zbus(out_args("entries", "cursor", "dropped", "ended"))]
    async fn container_logs(
        &self,
        name: String,
        since: u64,
        max_bytes: u32,
    ) -> Result<LogsTuple, KilnError> {
        let request = kiln_agent_proto::ContainerLogsRequest {
            id: name,
            since: (since > 0).then_some(since),
            max_bytes: (max_bytes > 0).then_some(max_bytes),
        };
        Ok(logs_tuple(
            self.engine.container_logs(&self.id, request).await?,
        ))
    }

    /// Hot-plug a NIC (VMs created with `hotplugSlots`): a TAP on the
    /// bridge and `address` ("" = the next free one), configured in the
    /// guest before this returns.
    #[zbus(
        name = "AttachNIC",
        out_args("index", "tap", "ifindex", "mac", "address")
    )]
    async fn attach_nic(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        address: String,
    ) -> Result<NicTuple, KilnError> {
        self.auth.check_manage(conn, &header, "AttachNIC").await?;
        let address = match address.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                KilnError::new(
                    ErrorName::InvalidArgument,
                    format!("address {a:?} is not an IPv4 address"),
                )
            })?),
        };
        let nic = self.engine.attach_nic(&self.id, address).await?;
        Ok(nic_tuple(&nic))
    }

    /// Unplug hot-plugged NIC `index` (1 or more); returns once the guest
    /// released it and its TAP and address are gone.
    #[zbus(name = "DetachNIC")]
    async fn detach_nic(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        index: u8,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "DetachNIC").await?;
        self.engine.detach_nic(&self.id, index).await?;
        Ok(())
    }

    /// Move the boot NIC into pod network namespace `netns` (a name under
    /// `/run/netns`): TAP there, tc redirect to and from `interface`
    /// (`""` = `eth0`), the guest given its MAC, address, gateway, MTU and
    /// name servers `dns`. The VM is the pod's from then on (destroyed on
    /// release).
    #[zbus(name = "JoinNetns")]
    async fn join_netns(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        netns: String,
        interface: String,
        dns: Vec<String>,
    ) -> Result<(), KilnError> {
        self.auth.check_manage(conn, &header, "JoinNetns").await?;
        let request = kiln_engine::api::PodNetworkRequest {
            netns,
            interface: (!interface.is_empty()).then_some(interface),
            dns,
        };
        self.engine.join_netns(&self.id, request).await?;
        Ok(())
    }

    /// The VM's NICs (as the `Network` property).
    #[zbus(name = "ListNICs")]
    async fn list_nics(&self) -> Result<Vec<NicTuple>, KilnError> {
        let nics = self.engine.list_nics(&self.id).await?;
        Ok(nics.iter().map(nic_tuple).collect())
    }

    /// Opaque id (also the last element of the object path).
    #[zbus(property)]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Caller-chosen unique name.
    #[zbus(property)]
    fn name(&self) -> String {
        self.info().name.clone()
    }

    /// Lifecycle state (`created`, `booting`, `ready`, `paused`, …).
    #[zbus(property)]
    fn state(&self) -> String {
        self.info().state.as_str().to_owned()
    }

    /// Virtual CPUs.
    #[zbus(property)]
    fn vcpus(&self) -> u32 {
        self.info().vcpus
    }

    /// Guest RAM in MiB.
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> u32 {
        self.info().memory_mib
    }

    /// QEMU pid, 0 when no process exists.
    #[zbus(property)]
    fn pid(&self) -> u32 {
        self.info().pid.unwrap_or(0)
    }

    /// Creation time, µs since the epoch.
    #[zbus(property)]
    fn created_at(&self) -> u64 {
        self.info().created_at
    }

    /// Last start, µs since the epoch (0 = never).
    #[zbus(property)]
    fn started_at(&self) -> u64 {
        self.info().started_at.unwrap_or(0)
    }

    /// Last time the guest became ready, µs since the epoch (0 = never).
    #[zbus(property)]
    fn ready_at(&self) -> u64 {
        self.info().ready_at.unwrap_or(0)
    }

    /// QEMU version of the running process ("" = unknown).
    #[zbus(property)]
    fn qemu_version(&self) -> String {
        self.info().qemu_version.clone().unwrap_or_default()
    }

    /// Guest kernel release ("" = unknown).
    #[zbus(property)]
    fn kernel_release(&self) -> String {
        self.info().kernel_release.clone().unwrap_or_default()
    }

    /// Guest boot id ("" = unknown).
    #[zbus(property)]
    fn boot_id(&self) -> String {
        self.info().boot_id.clone().unwrap_or_default()
    }

    /// Last failure ("" = none).
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.info().last_error.clone().unwrap_or_default()
    }

    /// The pool that owns the VM ("" = none).
    #[zbus(property)]
    fn pool(&self) -> String {
        self.info().pool.clone().unwrap_or_default()
    }

    /// Holder of the lease while acquired from a pool ("" = not leased).
    #[zbus(property)]
    fn leased_by(&self) -> String {
        self.info().leased_by.clone().unwrap_or_default()
    }

    /// Render nodes leased while it runs.
    #[zbus(property)]
    fn gpus(&self) -> Vec<String> {
        self.info().gpus.clone()
    }

    /// NICs (bridge mode): index (0 = the boot NIC, 1… hot-plugged), TAP,
    /// its ifindex while the VM runs (0 otherwise), the guest's MAC and
    /// IPv4 address.
    #[zbus(property)]
    fn network(&self) -> Vec<NicTuple> {
        network(&self.info())
    }

    /// Display device (`none`, `virtio-gpu`).
    #[zbus(property)]
    fn display(&self) -> String {
        display(&self.info())
    }

    /// What it boots: `kiln` (Kiln's guest) or `image` (its image as a
    /// whole OS, docs/images.md).
    #[zbus(property)]
    fn boot(&self) -> String {
        wire_name(&self.info().boot)
    }

    /// When it was acquired, µs since the epoch (0 = not leased).
    #[zbus(property)]
    fn acquired_at(&self) -> u64 {
        self.info().acquired_at.unwrap_or(0)
    }

    /// When the lease ends by itself, µs since the epoch (0 = no lifetime).
    #[zbus(property)]
    fn lease_expires_at(&self) -> u64 {
        self.info().lease_expires_at.unwrap_or(0)
    }
}
