//! The VM half of the actor: the lifecycle commands (create, start, stop,
//! kill, pause, resume, reboot, delete, exec, ping) and the facts sub-tasks
//! report about a VM's process (launched, booted, exited, QMP events).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{self as proto, ExecInRequest, ExecReply, PingReply};
use tracing::{debug, error, info, warn};

use super::containers::{reply_once_released, ImagesReleased};
use super::network::{template_mac, TAP_FD};
use super::pools::BootSource;
use super::tasks::{boot, fresh_identity, stop_gracefully, BootPlan, NextBoot};
use super::{Engine, Internal, Op, Runtime, StopIntent, Write};
use crate::accel::Accel;
use crate::api::{validate_exec, EngineEvent, Reply, DEFAULT_EXEC_TIMEOUT};
use crate::container::ContainerRecord;
use crate::error::EngineError;
use crate::ids::now_usec;
use crate::process::console_tail;
use crate::qemu::{GuestMemory, Machine, NicArgs, NicBackend, QemuLaunch, QmpEvent};
use crate::qemu_user::QemuUser;
use crate::spec::{validate_name, ResolvedSpec, VmSpec};
use crate::state::VmState;
use crate::store::remove_tree;
use crate::store::Durability;
use crate::vm::{GuestInfo, VmInfo};
use crate::vmm::GuestAgent;

impl Engine {
    /// Check a new VM's name and spec: `InvalidName`, `AlreadyExists`,
    /// `InvalidSpec`.
    pub(super) fn check_new_vm(
        &self,
        name: &str,
        spec: &VmSpec,
    ) -> Result<ResolvedSpec, EngineError> {
        validate_name(name).map_err(EngineError::InvalidName)?;
        if self.name_taken(name) {
            return Err(EngineError::AlreadyExists(name.to_owned()));
        }
        spec.resolve(&self.defaults, &self.limits)
            .map_err(EngineError::InvalidSpec)
    }

    pub(super) fn start_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state();
        if state.check_transition(VmState::Booting).is_err() || entry.runtime.is_some() {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "start",
            })));
        }
        self.begin_boot(id, BootSource::Cold, Some(reply));
    }

    /// Launch a VM's process (cold, or restored from a template) and hand
    /// the wait for its agent to a sub-task. The caller checked that the VM
    /// may boot. Pool VMs also get their own identity before they count as
    /// ready.
    pub(super) fn begin_boot(
        &mut self,
        id: &str,
        source: BootSource,
        reply: Option<Reply<VmInfo>>,
    ) {
        let template = source.saved().map(|t| t.dir.clone());
        // GPUs first: without them the VM does not start at all.
        let Some(spec) = self.vms.get(id).map(|e| e.record.spec.clone()) else {
            return;
        };
        if let Err(e) = self.check_network(id) {
            match reply {
                Some(reply) => drop(reply.send(Err(e))),
                None => self.pool_vm_not_started(id, e),
            }
            return;
        }
        let gpu_args = match self.lease_gpus(id, &spec) {
            Ok(args) => args,
            Err(e) => {
                warn!(vm = %id, error = %e.message(), "cannot start VM");
                match reply {
                    Some(reply) => drop(reply.send(Err(e))),
                    None => self.pool_vm_not_started(id, e),
                }
                return;
            }
        };
        let gpu_nodes = self.gpus_of(id);
        let qemu_uid = match self.qemu_uid_for(id) {
            Ok(uid) => uid,
            Err(e) => {
                self.release_gpus(id);
                match reply {
                    Some(reply) => drop(reply.send(Err(e))),
                    None => self.pool_vm_not_started(id, e),
                }
                return;
            }
        };
        let result = self.transition(
            id,
            VmState::Booting,
            Write::Request(Durability::Durable),
            |r| {
                r.started_at = Some(now_usec());
                r.ready_at = None;
                r.pid = None;
                r.guest = None;
                r.last_error = None;
                r.template = template;
                r.gpus = gpu_nodes;
                r.qemu_uid = qemu_uid;
            },
        );
        if let Err(e) = result {
            self.release_gpus(id);
            if let Some(reply) = reply {
                let _ = reply.send(Err(e));
            }
            return;
        }
        let generation = self.next_generation();
        let runtime_dir = self.config.vm_runtime_dir(id);
        let agent = self.vmm.agent(&runtime_dir);
        let Some(record) = self.vms.get(id).map(|e| &e.record) else {
            return;
        };
        let (memory, restore) = match source.saved() {
            None => (GuestMemory::Anonymous, None),
            Some(t) => (GuestMemory::TemplateClone(t.memory()), Some(t.state())),
        };
        let mut launch =
            self.launch_for_spec(id, &record.spec, &runtime_dir, memory, &record.containers);
        launch.incoming = restore.is_some();
        launch.gpu = gpu_args;
        launch.user = self.qemu_user(record.qemu_uid, &record.spec, &record.gpus);
        let net = self.net_plan(id, restore.is_some());
        if let Some(n) = &net {
            launch.nics = vec![NicArgs {
                backend: NicBackend::TapFd(TAP_FD),
                mac: n.device_mac.to_string(),
            }];
        }
        let Some(record) = self.vms.get(id).map(|e| &e.record) else {
            return;
        };
        let restored_fresh = matches!(
            source,
            BootSource::Snapshot {
                fresh_identity: true,
                ..
            }
        );
        let identity =
            (record.pool.is_some() || restored_fresh).then(|| fresh_identity(&record.name));
        let upper_disks = record
            .containers
            .iter()
            .filter_map(|c| Some((c.upper_disk.clone()?, c.storage_mib?)))
            .collect();
        let limits = self.limits_for(&record.spec);
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        // Written with the pid at launch: the machined follower reads them.
        entry.record.cgroup_limits = Some(limits);
        entry.runtime = Some(Runtime {
            generation,
            process: None,
            qmp: None,
            agent: agent.clone(),
            stop_intent: None,
            shutdown_seen: false,
            containers_boot: None,
            container_watch: None,
        });
        entry.ready_waiters.extend(reply);
        let tx = self.internal_tx.clone();
        launch.cgroup = self.own_cgroups.then(|| (self.cgroup_of(id), limits));
        let mut plan = BootPlan {
            launch,
            runtime_dir,
            restore,
            net,
            identity,
            qmp_timeout: self.config.qmp_timeout(),
            boot_timeout: self.config.boot_timeout(),
            upper_disks,
        };
        let id = id.to_owned();
        info!(vm = %id, generation, clone = plan.restore.is_some(), "starting VM");
        let vmm = self.vmm.clone();
        tokio::spawn(async move {
            if let Some(cleanup) = plan.net.as_mut().and_then(|n| n.cleanup.take()) {
                let _ = cleanup.await;
            }
            let result = boot(&id, generation, &plan, vmm.as_ref(), agent, &tx).await;
            let _ = tx.send(Internal::BootDone {
                id,
                generation,
                result,
            });
        });
    }

    /// VM `id`'s QEMU uid: the one its record keeps, or the lowest free
    /// one of the range; None when QEMUs run as kilnd's own user.
    fn qemu_uid_for(&self, id: &str) -> Result<Option<u32>, EngineError> {
        let Some(users) = &self.qemu_users else {
            return Ok(None);
        };
        let kept = self.vms.get(id).and_then(|e| e.record.qemu_uid);
        if let Some(uid) = kept.filter(|uid| users.contains(*uid)) {
            return Ok(Some(uid));
        }
        let used = self.vms.values().filter_map(|e| e.record.qemu_uid);
        match users.allocate(used) {
            Some(uid) => Ok(Some(uid)),
            None => Err(EngineError::LaunchFailed(
                crate::process::ProcessError::NoFreeUser {
                    count: self.config.qemu_uid_count,
                },
            )),
        }
    }

    /// Who VM `id`'s running QEMU runs as (for files it opens later).
    pub(super) fn running_qemu_user(&self, id: &str) -> Option<QemuUser> {
        let record = &self.vms.get(id)?.record;
        self.qemu_user(Some(record.qemu_uid?), &record.spec, &record.gpus)
    }

    /// Who a QEMU runs as: uid `uid` (None: the template builders'),
    /// opening the devices its `spec` and leased render nodes `gpus` need.
    pub(super) fn qemu_user(
        &self,
        uid: Option<u32>,
        spec: &ResolvedSpec,
        gpus: &[String],
    ) -> Option<QemuUser> {
        let users = self.qemu_users.as_ref()?;
        let mut devices = Vec::new();
        if spec.accel == Accel::Kvm {
            devices.push(PathBuf::from("/dev/kvm"));
        }
        for node in gpus {
            devices.push(self.config.gpu_dev_root.join("dri").join(node));
        }
        Some(match uid {
            Some(uid) => users.user(uid, &devices),
            None => users.builder(&devices),
        })
    }

    /// A kernel kilnd ships (the built-in guest's, as it is or unpacked
    /// for direct boot), not a caller's or an image's.
    fn is_built_in_kernel(&self, kernel: &Path) -> bool {
        kernel.starts_with(&self.config.guest_dir)
            || crate::guest_kernel::is_unpacked(kernel, &self.config.state_dir)
    }

    /// The QEMU launch of VM `id` with `spec`, its runtime files in
    /// `runtime_dir` and its RAM in `memory`.
    pub(super) fn launch_for_spec(
        &self,
        id: &str,
        spec: &ResolvedSpec,
        runtime_dir: &Path,
        memory: GuestMemory,
        containers: &[ContainerRecord],
    ) -> QemuLaunch {
        let mut cmdline = QemuLaunch::BASE_CMDLINE.to_owned();
        for extra in [
            if spec.accel == Accel::Tcg {
                self.tcg_cmdline.as_str()
            } else {
                ""
            },
            if self.is_built_in_kernel(&spec.kernel) {
                crate::guest_kernel::BOOT_ARGS
            } else {
                ""
            },
            &spec.cmdline,
        ] {
            if !extra.is_empty() {
                cmdline.push(' ');
                cmdline.push_str(extra);
            }
        }
        QemuLaunch {
            binary: self.config.qemu_binary.clone(),
            vm_id: id.to_owned(),
            machine: if spec.needs_pci_machine() {
                Machine::Q35
            } else {
                Machine::Microvm
            },
            accel: spec.accel,
            tcg_tb_size_mib: self.config.tcg_tb_size_mib,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline,
            qmp_socket: runtime_dir.join("qmp.sock"),
            agent_socket: runtime_dir.join("agent.sock"),
            console_log: runtime_dir.join("console.log"),
            pid_file: runtime_dir.join("qemu.pid"),
            memory,
            incoming: false,
            gpu: Vec::new(),
            // Isolated until the boot gives it a TAP: the template VM's NIC.
            nics: spec
                .network
                .iter()
                .map(|_| NicArgs {
                    backend: NicBackend::Isolated,
                    mac: template_mac().to_string(),
                })
                .collect(),
            hotplug_slots: spec.hotplug_slots(),
            disks: containers.iter().flat_map(ContainerRecord::disks).collect(),
            // Set by the caller, which knows whose QEMU this is.
            user: None,
            boot_files_are_kilnds: spec.boot == crate::spec::BootSource::Image,
            kernel_is_kilnds: crate::guest_kernel::is_unpacked(
                &spec.kernel,
                &self.config.state_dir,
            ),
            // Set by the caller, which knows the limits.
            cgroup: None,
        }
    }

    pub(super) fn stop_vm(&mut self, id: &str, timeout: Option<Duration>, reply: Reply<VmInfo>) {
        let timeout = timeout.unwrap_or(Duration::from_secs(self.config.stop_timeout_sec));
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state();
        if !state.has_process() || entry.runtime.is_none() {
            // Already stopped: stopping again is a no-op.
            return drop(reply.send(Ok(VmInfo::from(&entry.record))));
        }
        entry.exit_waiters.push(reply);
        if state == VmState::Stopping {
            return;
        }
        let graceful = state.guest_answers();
        let Some(runtime) = entry.runtime.as_mut() else {
            return;
        };
        runtime.stop_intent = Some(StopIntent::Stop);
        let (process, qmp, agent) = (
            runtime.process.clone(),
            runtime.qmp.clone(),
            runtime.agent.clone(),
        );
        let _ = self.transition(id, VmState::Stopping, Write::Fact, |_| {});
        let Some(process) = process else {
            // Still launching: `Launched` will see the intent and kill it.
            if let Some(rt) = self.vms.get_mut(id).and_then(|e| e.runtime.as_mut()) {
                rt.stop_intent = Some(StopIntent::Kill);
            }
            return;
        };
        info!(vm = %id, ?timeout, "stopping VM");
        tokio::spawn(stop_gracefully(process, qmp, agent, graceful, timeout));
    }

    pub(super) fn kill_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.runtime.is_none() {
            return drop(reply.send(Ok(VmInfo::from(&entry.record))));
        }
        entry.exit_waiters.push(reply);
        self.kill_process(id);
    }

    /// SIGKILL a VM's process now, or as soon as it is launched.
    pub(super) fn kill_process(&mut self, id: &str) {
        let Some(runtime) = self.vms.get_mut(id).and_then(|e| e.runtime.as_mut()) else {
            return;
        };
        runtime.stop_intent = Some(StopIntent::Kill);
        if let Some(process) = &runtime.process {
            info!(vm = %id, pid = process.pid(), "killing VM");
            if let Err(e) = process.kill() {
                error!(vm = %id, error = %e, "cannot kill QEMU");
            }
        }
    }

    pub(super) fn pause_or_resume(&mut self, id: &str, op: Op, reply: Reply<VmInfo>) {
        let (operation, target) = op.name_and_target();
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state();
        let allowed = match op {
            Op::Pause => state.guest_answers(),
            Op::Resume => state == VmState::Paused,
        } && state.check_transition(target).is_ok();
        let qmp = entry
            .runtime
            .as_ref()
            .and_then(|r| r.qmp.clone().map(|q| (q, r.generation)));
        let Some((qmp, generation)) = qmp.filter(|_| allowed) else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation,
            })));
        };
        if entry.busy {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        }
        entry.busy = true;
        let tx = self.internal_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let result = match op {
                Op::Pause => qmp.stop().await,
                Op::Resume => qmp.cont().await,
            }
            .map_err(EngineError::from);
            let _ = tx.send(Internal::OpDone {
                id,
                generation,
                op,
                result,
                reply,
            });
        });
    }

    pub(super) fn reboot_vm(&mut self, id: &str, reply: Reply<VmInfo>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let runtime = match entry.answering("reboot") {
            Ok(r) => r,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.busy {
            return drop(reply.send(Err(EngineError::Busy { id: id.into() })));
        }
        let (agent, qmp, generation, qemu) = (
            runtime.agent.clone(),
            runtime.qmp.clone(),
            runtime.generation,
            runtime.process.clone(),
        );
        let old_boot_id = entry.record.guest.as_ref().map(|g| g.boot_id.clone());
        entry.busy = true;
        entry.ready_waiters.push(reply);
        let _ = self.transition(id, VmState::Booting, Write::Fact, |r| r.ready_at = None);
        let tx = self.internal_tx.clone();
        let boot_timeout = self.config.boot_timeout();
        let guest_net = self.guest_net(id);
        let id = id.to_owned();
        info!(vm = %id, "rebooting VM");
        tokio::spawn(async move {
            let asked: Result<serde_json::Value, _> = agent
                .call(
                    proto::method::REBOOT,
                    &serde_json::json!({}),
                    Duration::from_secs(5),
                )
                .await;
            if asked.is_err() {
                if let Some(qmp) = &qmp {
                    let _ = qmp.system_reset().await;
                }
            }
            let next = NextBoot {
                id,
                generation,
                agent,
                qemu,
                old_boot_id,
                guest_net,
                timeout: boot_timeout,
            };
            next.report(&tx).await;
        });
    }

    pub(super) fn delete_vm(&mut self, id: &str, reply: Reply<()>) {
        let entry = match self.entry_mut(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if entry.runtime.is_some() {
            entry.delete_waiters.push(reply);
            self.kill_process(id);
            return;
        }
        let removed = self.remove_vm(id);
        answer_deletes(removed, vec![reply], self.config.vm_records_dir());
    }

    /// Forget VM `id` (record, runtime files, GPUs, network) and release
    /// its containers' images; the release runs beside the actor and is
    /// returned, so a `DeleteVm` can reply once the image is free again.
    pub(super) fn remove_vm(&mut self, id: &str) -> Result<ImagesReleased, EngineError> {
        self.store.remove(id)?;
        let released = self
            .vms
            .get(id)
            .and_then(|entry| self.release_container_images(&entry.record));
        remove_tree(&self.config.vm_runtime_dir(id));
        remove_tree(&self.config.vm_disks_dir(id));
        self.release_gpus(id);
        self.release_network(id);
        if let Some(entry) = self.vms.remove(id) {
            // The last VM of a pool's old image, or of a deleted pool, lets
            // the pool's hold on that image go.
            if let Some(pool) = &entry.record.pool {
                for container in &entry.record.containers {
                    self.release_pool_image(pool, &container.digest);
                }
            }
            self.note_pool_change(&entry.record, entry.record.state(), true);
            for waiter in entry.ready_waiters {
                let _ = waiter.send(Err(EngineError::NoSuchVM(id.to_owned())));
            }
            // A table of 200 VMs keeps its 256 buckets of ~1.3 KB after
            // they are gone (docs/benchmarks.md, "Daemon cost"): give most
            // of it back once it is mostly empty.
            let len = self.vms.len();
            if self.vms.capacity() > 4 * len.max(16) {
                self.vms.shrink_to(2 * len);
            }
        }
        info!(vm = %id, "VM deleted");
        let _ = self
            .events
            .send(EngineEvent::VmRemoved { id: id.to_owned() });
        Ok(released)
    }

    pub(super) fn exec_vm(&mut self, id: &str, request: ExecInRequest, reply: Reply<ExecReply>) {
        // Input first: a malformed request is refused whatever the id.
        if let Err(e) = validate_exec(&request.exec) {
            return drop(reply.send(Err(e)));
        }
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if let Some(name) = &request.container {
            if !entry.record.containers.iter().any(|c| &c.name == name) {
                return drop(reply.send(Err(EngineError::NoSuchContainer(name.clone()))));
            }
        }
        let mut request = request;
        if entry.record.spec.boot == crate::spec::BootSource::Image {
            // The agent of an OS image lives in the OS's root already.
            request.container = None;
        }
        let agent = match entry.answering("exec") {
            Ok(runtime) => runtime.agent.clone(),
            Err(e) => return drop(reply.send(Err(e))),
        };
        let timeout = request
            .exec
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_EXEC_TIMEOUT);
        request.exec.timeout_ms = Some(timeout.as_millis() as u64);
        tokio::spawn(async move {
            // The agent enforces the timeout; ours covers a guest that hangs.
            let result = agent
                .call(
                    proto::method::EXEC,
                    &request,
                    timeout + Duration::from_secs(5),
                )
                .await
                .map_err(EngineError::from);
            let _ = reply.send(result);
        });
    }

    /// VM `id`'s cgroup.
    pub(super) fn cgroup_of(&self, id: &str) -> crate::cgroup::VmCgroup {
        self.cgroups.vm(&self.config.cgroup_parent, id)
    }

    /// The limits a VM with `spec` runs under: the spec's, or guest RAM
    /// + the daemon's overhead (+ TCG's translation cache).
    fn limits_for(&self, spec: &crate::spec::ResolvedSpec) -> crate::cgroup::CgroupLimits {
        let asked = spec.limits.unwrap_or_default();
        let tcg = if spec.accel == Accel::Tcg {
            self.config.tcg_tb_size_mib
        } else {
            0
        };
        let memory_mib = asked.memory_mib.unwrap_or(
            spec.memory_mib
                .saturating_add(self.config.memory_overhead_mib)
                .saturating_add(tcg),
        );
        crate::cgroup::CgroupLimits {
            memory_bytes: u64::from(memory_mib) << 20,
            milli_cpus: asked.milli_cpus,
            cpu_weight: asked.cpu_weight,
            io_weight: asked.io_weight,
        }
    }

    /// What VM `id`'s QEMU uses now; `None` when it has no process.
    pub(super) fn usage_of(&self, id: &str) -> Option<crate::vm::VmUsage> {
        let entry = self.vms.get(id)?;
        let pid = entry.runtime.as_ref()?.process.as_ref()?.pid();
        // Wherever QEMU is: its own cgroup, or its machined scope.
        let cgroup = self.cgroups.of_process(pid).usage();
        let proc_file =
            |name: &str| std::fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap_or_default();
        let field = crate::procfs::field;
        let smaps = proc_file("smaps_rollup");
        let io = proc_file("io");
        // Without a cgroup: utime + stime from /proc (clock ticks of 10 ms).
        let cpu_usec = if cgroup.cpu_usec > 0 {
            cgroup.cpu_usec
        } else {
            let stat = proc_file("stat");
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (ticks(11) + ticks(12)) * 10_000
        };
        let (mut rx, mut tx) = (0, 0);
        for nic in entry.record.network.iter().filter(|n| n.netns.is_none()) {
            let counter = |name: &str| {
                std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{name}", nic.tap))
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            // What the TAP sends is what the guest receives.
            rx += counter("tx_bytes");
            tx += counter("rx_bytes");
        }
        Some(crate::vm::VmUsage {
            cpu_usec,
            memory_bytes: cgroup.memory_bytes,
            memory_limit_bytes: cgroup.memory_limit_bytes,
            rss_bytes: field(&smaps, "Rss:") * 1024,
            pss_bytes: field(&smaps, "Pss:") * 1024,
            disk_read_bytes: field(&io, "read_bytes:"),
            disk_write_bytes: field(&io, "write_bytes:"),
            net_rx_bytes: rx,
            net_tx_bytes: tx,
            oom_kills: cgroup.oom_kills,
        })
    }

    pub(super) fn guest_agent(
        &self,
        id: &str,
        container: Option<&str>,
        operation: &'static str,
    ) -> Result<Arc<dyn GuestAgent>, EngineError> {
        let entry = self.entry(id)?;
        if let Some(name) = container {
            if !entry.record.containers.iter().any(|c| c.name == name) {
                return Err(EngineError::NoSuchContainer(name.to_owned()));
            }
        }
        Ok(entry.answering(operation)?.agent.clone())
    }

    pub(super) fn ping_vm(&mut self, id: &str, timeout: Duration, reply: Reply<PingReply>) {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let state = entry.record.state();
        let Some(runtime) = entry.runtime.as_ref() else {
            return drop(reply.send(Err(EngineError::InvalidState {
                id: id.into(),
                state,
                operation: "ping",
            })));
        };
        let agent = runtime.agent.clone();
        let timeout = timeout.min(Duration::from_secs(60));
        tokio::spawn(async move {
            let _ = reply.send(agent.ping(timeout).await.map_err(EngineError::from));
        });
    }

    // ----- internal events -------------------------------------------------

    pub(super) fn boot_done(
        &mut self,
        id: &str,
        generation: u64,
        result: Result<PingReply, EngineError>,
    ) {
        if self.runtime_of(id, generation).is_none() {
            // The process is already gone and `exited` settled the waiters.
            return;
        }
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        entry.busy = false;
        let state = entry.record.state();
        // A process being stopped or killed is not coming up, whatever its
        // agent answered in the meantime: its exit settles the waiters.
        let ending = entry
            .runtime
            .as_ref()
            .is_some_and(|r| r.stop_intent.is_some());
        match result {
            Ok(_) if ending => {}
            Ok(ping) if state == VmState::Booting => {
                if self.start_boot_containers(id, generation, &ping) {
                    // `ContainersStarted` comes back here once they run.
                    return;
                }
                let guest = GuestInfo {
                    agent_version: ping.agent_version,
                    kernel_release: ping.kernel_release,
                    boot_id: ping.boot_id,
                };
                // `ready`, or `leased` again for a leased VM that rebooted:
                // a fact about the running guest, so not synced (on every
                // clone's path; a host crash ends the guest too).
                let _ = self.transition(id, VmState::Ready, Write::RunningFact, |r| {
                    r.ready_at = Some(now_usec());
                    r.guest = Some(guest);
                });
                let Some(entry) = self.vms.get_mut(id) else {
                    return;
                };
                let info = VmInfo::from(&entry.record);
                if let (Some(started), Some(ready)) = (info.started_at, info.ready_at) {
                    info!(vm = %id, boot_ms = (ready.saturating_sub(started)) / 1000, "VM ready");
                }
                for waiter in entry.ready_waiters.drain(..) {
                    let _ = waiter.send(Ok(info.clone()));
                }
            }
            Ok(_) => {
                // Stopped or killed while booting: `exited` will settle waiters.
            }
            Err(e) => {
                let console = console_tail(&self.config.vm_runtime_dir(id).join("console.log"));
                let message = match console {
                    Some(tail) => format!("{}; console: {tail}", e.message()),
                    None => e.message(),
                };
                warn!(vm = %id, error = %message, "boot failed");
                if state.check_transition(VmState::Failed).is_ok() {
                    let m = message.clone();
                    let _ = self.transition(id, VmState::Failed, Write::Fact, |r| {
                        r.last_error = Some(m);
                    });
                }
                let Some(entry) = self.vms.get_mut(id) else {
                    return;
                };
                for waiter in entry.ready_waiters.drain(..) {
                    let _ = waiter.send(Err(EngineError::BootFailed(message.clone())));
                }
                let has_process = entry.runtime.as_ref().is_some_and(|r| r.process.is_some());
                if has_process {
                    self.kill_process(id);
                } else {
                    // Never launched: nothing will exit, settle now.
                    self.exited(id, generation);
                }
            }
        }
    }

    pub(super) fn exited(&mut self, id: &str, generation: u64) {
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        if entry.runtime.as_ref().map(|r| r.generation) != Some(generation) {
            return;
        }
        let Some(runtime) = entry.runtime.take() else {
            return;
        };
        entry.busy = false;
        let state = entry.record.state();
        let clean =
            runtime.stop_intent.is_some() || runtime.shutdown_seen || state == VmState::Stopping;
        let runtime_dir = self.config.vm_runtime_dir(id);
        let cgroup = self.cgroup_of(id);
        let usage = cgroup.usage();
        cgroup.remove();
        let oom = usage.oom_kills > 0;
        let (next, error) = match state {
            VmState::Failed => (VmState::Failed, None),
            _ if clean && !oom => (VmState::Stopped, None),
            _ if oom => (
                VmState::Failed,
                Some(format!(
                    "QEMU was killed by the OOM killer at the VM's memory cap of {} MiB",
                    usage.memory_limit_bytes >> 20
                )),
            ),
            _ => {
                let tail = console_tail(&runtime_dir.join("console.log"));
                let msg = match tail {
                    Some(t) => format!("QEMU exited unexpectedly; console: {t}"),
                    None => "QEMU exited unexpectedly".to_owned(),
                };
                (VmState::Failed, Some(msg))
            }
        };
        if oom {
            warn!(vm = %id, limit_mib = usage.memory_limit_bytes >> 20, "VM hit its memory cap: QEMU was OOM-killed");
            let _ = self.events.send(EngineEvent::Oom {
                id: id.to_owned(),
                limit_bytes: usage.memory_limit_bytes,
            });
        }
        if next == VmState::Failed && state != VmState::Failed {
            warn!(vm = %id, "QEMU exited unexpectedly, VM failed");
        } else {
            info!(vm = %id, state = %next, "QEMU exited");
        }
        remove_tree(&runtime_dir);
        self.release_gpus(id);
        self.remove_taps(id);
        self.drop_hotplugged_nics(id);
        let _ = self.transition(id, next, Write::Fact, |r| {
            r.pid = None;
            r.template = None;
            r.gpus.clear();
            for nic in &mut r.network {
                nic.ifindex = 0;
            }
            if error.is_some() {
                r.last_error = error;
            }
        });
        let Some(entry) = self.vms.get_mut(id) else {
            return;
        };
        let info = VmInfo::from(&entry.record);
        for waiter in entry.exit_waiters.drain(..) {
            let _ = waiter.send(Ok(info.clone()));
        }
        for waiter in entry.ready_waiters.drain(..) {
            let _ = waiter.send(Err(EngineError::BootFailed(format!("VM is {next}"))));
        }
        let deletes: Vec<_> = entry.delete_waiters.drain(..).collect();
        if !deletes.is_empty() {
            let removed = self.remove_vm(id);
            answer_deletes(removed, deletes, self.config.vm_records_dir());
        }
    }

    pub(super) fn qmp_event(&mut self, id: &str, generation: u64, event: QmpEvent) {
        let Some(runtime) = self.runtime_of(id, generation) else {
            return;
        };
        debug!(vm = %id, event = %event.event, "QMP event");
        match event.event.as_str() {
            "SHUTDOWN" => runtime.shutdown_seen = true,
            "STOP" | "RESUME" | "RESET" => {
                let agent = runtime.agent.clone();
                let qemu = runtime.process.clone();
                let Some(entry) = self.vms.get(id) else {
                    return;
                };
                let state = entry.record.state();
                let busy = entry.busy;
                match event.event.as_str() {
                    "STOP" if state.guest_answers() => {
                        let _ = self.transition(id, VmState::Paused, Write::Fact, |_| {});
                    }
                    "RESUME" if state == VmState::Paused => {
                        // `ready`, or `leased` again if a lease is held.
                        let _ = self.transition(id, VmState::Ready, Write::Fact, |_| {});
                    }
                    "RESET" if state.guest_answers() && !busy => {
                        // The guest rebooted on its own: wait for it again.
                        info!(vm = %id, "guest reset, waiting for the agent");
                        let _ = self.transition(id, VmState::Booting, Write::Fact, |r| {
                            r.ready_at = None;
                        });
                        if let Some(e) = self.vms.get_mut(id) {
                            e.busy = true;
                        }
                        let old = self
                            .vms
                            .get(id)
                            .and_then(|e| e.record.guest.as_ref())
                            .map(|g| g.boot_id.clone());
                        let tx = self.internal_tx.clone();
                        let next = NextBoot {
                            id: id.to_owned(),
                            generation,
                            agent,
                            qemu,
                            old_boot_id: old,
                            guest_net: self.guest_net(id),
                            timeout: self.config.boot_timeout(),
                        };
                        tokio::spawn(async move { next.report(&tx).await });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// A pause or resume finished in QEMU.
    pub(super) fn op_done(
        &mut self,
        id: String,
        generation: u64,
        op: Op,
        result: Result<(), EngineError>,
        reply: Reply<VmInfo>,
    ) {
        let Some(entry) = self.vms.get_mut(&id) else {
            return drop(reply.send(Err(EngineError::NoSuchVM(id))));
        };
        entry.busy = false;
        let current = entry.runtime.as_ref().map(|r| r.generation) == Some(generation);
        if let Err(e) = result {
            return drop(reply.send(Err(e)));
        }
        let (operation, target) = op.name_and_target();
        let state = entry.record.state();
        if !current {
            return drop(reply.send(Err(EngineError::InvalidState {
                id,
                state,
                operation,
            })));
        }
        // The STOP/RESUME event may have applied it already.
        let pending = match op {
            Op::Pause => state.guest_answers(),
            Op::Resume => state == VmState::Paused,
        };
        if pending {
            let _ = self.transition(&id, target, Write::Fact, |_| {});
        }
        let info = self.vms.get(&id).map(|e| VmInfo::from(&e.record));
        let _ = reply.send(info.ok_or(EngineError::NoSuchVM(id)));
    }
}

/// Answer the `DeleteVm` callers of a removal: with its error, or once its
/// images are released (so a `RemoveImage` right after is not refused).
fn answer_deletes(
    removed: Result<ImagesReleased, EngineError>,
    replies: Vec<Reply<()>>,
    records_dir: std::path::PathBuf,
) {
    match removed {
        Err(e) => {
            let message = e.message();
            for reply in replies {
                let _ = reply.send(Err(EngineError::StorageFailed(
                    crate::store::StoreError::Io {
                        path: records_dir.clone(),
                        source: std::io::Error::other(message.clone()),
                    },
                )));
            }
        }
        Ok(released) => reply_once_released(released, replies),
    }
}
