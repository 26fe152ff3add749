//! The actor's rules against the fake VMM: no QEMU, tokio's clock paused
//! (boots, back-off and timeouts take no real time), each test in its own
//! temp dir. The real-QEMU tests (`engine/tests`, `daemon/tests`) prove
//! the wiring; these prove the rules.

use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::ExecRequest;
use tokio::sync::broadcast;

use crate::accel::AccelChoice;
use crate::api::{AcquireOptions, EngineEvent, EngineHandle, FAILED_AFTER};
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::pool::{PoolInfo, PoolMode, PoolSpec, PoolState};
use crate::spec::VmSpec;
use crate::state::VmState;
use crate::vm::{Disconnect, VmInfo};
use crate::vmm::fake::FakeVmm;
use crate::Engine;

/// A change to the test engine's config.
type Tweak = Arc<dyn Fn(&mut EngineConfig) + Send + Sync>;

/// An engine on the fake VMM in a temp dir. The fake "host" survives
/// [`Harness::restart`], like QEMU processes survive kilnd.
struct Harness {
    dir: tempfile::TempDir,
    fake: FakeVmm,
    /// Changes to the default test config (kept for restarts).
    tweak: Tweak,
    engine: EngineHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(Arc::new(|_| {})).await
    }

    async fn start_with(tweak: Tweak) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let guest = dir.path().join("guest");
        std::fs::create_dir_all(&guest).expect("guest dir");
        for file in ["vmlinuz", "initramfs"] {
            std::fs::write(guest.join(file), b"fake").expect("guest file");
        }
        std::fs::create_dir_all(dir.path().join("pools")).expect("pools dir");
        let fake = FakeVmm::new();
        let (engine, task) = Self::engine(dir.path(), &fake, &tweak).await;
        Self {
            dir,
            fake,
            tweak,
            engine,
            task,
        }
    }

    fn config(root: &std::path::Path, tweak: &Tweak) -> EngineConfig {
        let mut config = EngineConfig {
            state_dir: root.join("state"),
            runtime_dir: root.join("run"),
            guest_dir: root.join("guest"),
            qemu_binary: "fake-qemu".into(),
            accel: AccelChoice::Tcg,
            pool_dirs: vec![root.join("pools")],
            gpu_sysfs_root: root.join("sys"),
            gpu_dev_root: root.join("dev"),
            // No cgroups for fake processes.
            cgroup_root: root.join("cgroup"),
            ..EngineConfig::default()
        };
        tweak(&mut config);
        config
    }

    async fn engine(
        root: &std::path::Path,
        fake: &FakeVmm,
        tweak: &Tweak,
    ) -> (EngineHandle, tokio::task::JoinHandle<()>) {
        Engine::start_with(Self::config(root, tweak), Arc::new(fake.clone()))
            .await
            .expect("engine starts")
    }

    /// Stop the engine, VMs left running, and start a new one on the same
    /// state dir and fake host (a kilnd restart).
    async fn restart(self) -> Self {
        self.engine.shutdown(false).await.expect("shutdown");
        self.task.await.expect("actor ends");
        let (engine, task) = Self::engine(self.dir.path(), &self.fake, &self.tweak).await;
        Self {
            engine,
            task,
            ..self
        }
    }

    async fn create_and_start(&self, name: &str) -> VmInfo {
        let vm = self
            .engine
            .create_vm(name, VmSpec::default())
            .await
            .expect("create");
        self.engine.start_vm(&vm.id).await.expect("start")
    }

    async fn state(&self, id: &str) -> VmState {
        self.engine.describe_vm(id).await.expect("describe").state
    }

    async fn create_pool(&self, name: &str, mode: PoolMode, warm: u32, max: u32) -> PoolInfo {
        let spec = PoolSpec {
            mode,
            warm,
            max,
            refill_concurrency: 2,
            recycle_on_expiry: false,
            vm: VmSpec::default(),
            warmup_sec: 0,
        };
        self.engine.create_pool(name, spec).await.expect("pool")
    }

    async fn create_pool_with(&self, name: &str, spec: PoolSpec) -> PoolInfo {
        self.engine.create_pool(name, spec).await.expect("pool")
    }

    /// Wait (on tokio's paused clock) until `pool` satisfies `done`.
    async fn pool_until(&self, pool: &str, done: impl Fn(&PoolInfo) -> bool) -> PoolInfo {
        for _ in 0..10_000 {
            let info = self.engine.describe_pool(pool).await.expect("pool");
            if done(&info) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let info = self.engine.describe_pool(pool).await.expect("pool");
        panic!("pool {pool} never got there: {info:?}");
    }

    /// Wait until VM `id` is deleted.
    async fn until_gone(&self, id: &str) {
        for _ in 0..10_000 {
            if self.engine.describe_vm(id).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("VM {id} was never deleted");
    }

    /// Wait until VM `id` is in `state`.
    async fn until_state(&self, id: &str, state: VmState) {
        for _ in 0..10_000 {
            if self.state(id).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("VM {id} never became {state}: {}", self.state(id).await);
    }

    async fn acquire(
        &self,
        pool: &str,
        timeout: Duration,
        holder: &str,
    ) -> Result<VmInfo, EngineError> {
        self.engine.acquire(pool, options(timeout, holder)).await
    }
}

/// Every state a VM's `VmChanged` events walk through, in order.
async fn states_seen(events: &mut broadcast::Receiver<EngineEvent>, id: &str) -> Vec<VmState> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EngineEvent::VmChanged { vm } = event {
            if vm.id == id && seen.last() != Some(&vm.state) {
                seen.push(vm.state);
            }
        }
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn lifecycle_commands_walk_the_state_table() {
    let h = Harness::start().await;
    let mut events = h.engine.subscribe();
    let vm = h.create_and_start("walker").await;
    assert_eq!(vm.state, VmState::Ready);
    assert_eq!(
        h.engine.pause_vm(&vm.id).await.expect("pause").state,
        VmState::Paused
    );
    assert_eq!(
        h.engine.resume_vm(&vm.id).await.expect("resume").state,
        VmState::Ready
    );
    assert_eq!(
        h.engine.reboot_vm(&vm.id).await.expect("reboot").state,
        VmState::Ready
    );
    let reply = h
        .engine
        .exec_vm(&vm.id, exec(&["echo", "hi"]))
        .await
        .expect("exec");
    assert_eq!(reply.stdout, "echo hi\n");
    let stopped = h.engine.stop_vm(&vm.id, None).await.expect("stop");
    assert_eq!(stopped.state, VmState::Stopped);
    assert_eq!(
        h.engine.start_vm(&vm.id).await.expect("restart").state,
        VmState::Ready
    );
    assert_eq!(
        h.engine.kill_vm(&vm.id).await.expect("kill").state,
        VmState::Stopped
    );
    assert_eq!(
        states_seen(&mut events, &vm.id).await,
        [
            VmState::Booting,
            VmState::Ready,
            VmState::Paused,
            VmState::Ready,
            VmState::Booting,
            VmState::Ready,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Booting,
            VmState::Ready,
            VmState::Stopped,
        ]
    );
    // Every step above was one the table allows.
    assert!(h.fake.live().is_empty());
}

#[tokio::test(start_paused = true)]
async fn commands_in_the_wrong_state_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let vm = h
        .engine
        .create_vm("idle", VmSpec::default())
        .await
        .expect("create");
    let invalid =
        |r: Result<VmInfo, EngineError>| matches!(r, Err(EngineError::InvalidState { .. }));
    assert!(invalid(h.engine.pause_vm(&vm.id).await));
    assert!(invalid(h.engine.resume_vm(&vm.id).await));
    assert!(invalid(h.engine.reboot_vm(&vm.id).await));
    assert!(matches!(
        h.engine.exec_vm(&vm.id, exec(&["true"])).await,
        Err(EngineError::InvalidState { .. })
    ));
    assert_eq!(h.state(&vm.id).await, VmState::Created);
    h.engine.start_vm(&vm.id).await.expect("start");
    assert!(
        invalid(h.engine.resume_vm(&vm.id).await),
        "resume while ready"
    );
    assert!(
        invalid(h.engine.start_vm(&vm.id).await),
        "start while ready"
    );
    assert!(matches!(
        h.engine.release(&vm.id, false).await,
        Err(EngineError::InvalidState { .. })
    ));
    assert_eq!(h.state(&vm.id).await, VmState::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_crash_fails_the_vm_and_it_can_start_again() {
    let h = Harness::start().await;
    let vm = h.create_and_start("crashy").await;
    h.fake.crash(&vm.id);
    h.until_state(&vm.id, VmState::Failed).await;
    let failed = h.engine.describe_vm(&vm.id).await.expect("describe");
    assert!(failed.last_error.expect("reason").contains("unexpectedly"));
    assert_eq!(
        h.engine.start_vm(&vm.id).await.expect("start").state,
        VmState::Ready
    );
}

#[tokio::test(start_paused = true)]
async fn a_boot_that_never_answers_fails_with_boot_failed() {
    let h = Harness::start().await;
    h.fake.set_behaviour(|b| b.agent_silent = true);
    let vm = h
        .engine
        .create_vm("silent", VmSpec::default())
        .await
        .expect("create");
    let started = h.engine.start_vm(&vm.id).await;
    assert!(
        matches!(started, Err(EngineError::BootFailed(_))),
        "{started:?}"
    );
    h.until_state(&vm.id, VmState::Failed).await;
    assert!(
        h.fake.live().is_empty(),
        "the silent VM's process is killed"
    );
}

#[tokio::test(start_paused = true)]
async fn delete_while_booting_kills_the_process_and_answers_the_start() {
    let h = Harness::start().await;
    h.fake
        .set_behaviour(|b| b.boot_delay = Duration::from_secs(30));
    let vm = h
        .engine
        .create_vm("short-lived", VmSpec::default())
        .await
        .expect("create");
    let engine = h.engine.clone();
    let id = vm.id.clone();
    let start = tokio::spawn(async move { engine.start_vm(&id).await });
    h.until_state(&vm.id, VmState::Booting).await;
    h.engine.delete_vm(&vm.id).await.expect("delete");
    let started = start.await.expect("start task");
    assert!(
        started.is_err(),
        "the start must not report success: {started:?}"
    );
    assert!(matches!(
        h.engine.describe_vm(&vm.id).await,
        Err(EngineError::NoSuchVM(_))
    ));
    assert!(h.fake.live().is_empty());
    assert!(!h
        .dir
        .path()
        .join("state/vms")
        .join(format!("{}.json", vm.id))
        .exists());
}

#[tokio::test(start_paused = true)]
async fn a_leased_vm_stays_leased_through_pause_resume_and_reboot() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 2, 4).await;
    h.pool_until("p", |p| p.hot == 2).await;
    let vm = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    assert_eq!(vm.state, VmState::Leased);
    let mut events = h.engine.subscribe();
    assert_eq!(
        h.engine.pause_vm(&vm.id).await.expect("pause").state,
        VmState::Paused
    );
    assert_eq!(
        h.engine.resume_vm(&vm.id).await.expect("resume").state,
        VmState::Leased
    );
    assert_eq!(
        h.engine.reboot_vm(&vm.id).await.expect("reboot").state,
        VmState::Leased
    );
    let seen = states_seen(&mut events, &vm.id).await;
    assert!(
        !seen.contains(&VmState::Ready),
        "a leased VM was shown ready: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&VmState::Leased));
    let described = h.engine.describe_vm(&vm.id).await.expect("describe");
    assert_eq!(described.leased_by.as_deref(), Some("alice"));
    // Every other Acquire gets another VM, never this one.
    for holder in ["bob", "carol", "dave"] {
        let other = h
            .acquire("p", Duration::from_secs(5), holder)
            .await
            .expect("acquire");
        assert_ne!(other.id, vm.id);
    }
}

#[tokio::test(start_paused = true)]
async fn a_leased_vm_reset_by_its_guest_comes_back_leased() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 2).await;
    h.pool_until("p", |p| p.hot == 1).await;
    let vm = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    // A reset the guest did on its own (QMP RESET, no reboot command).
    let runtime_dir = h.dir.path().join("run/vms").join(&vm.id);
    let agent = crate::vmm::Vmm::agent(&h.fake, &runtime_dir);
    let _: serde_json::Value = agent
        .call(
            kiln_agent_proto::method::REBOOT,
            &serde_json::json!({}),
            Duration::from_secs(1),
        )
        .await
        .expect("guest reboots");
    h.until_state(&vm.id, VmState::Booting).await;
    h.until_state(&vm.id, VmState::Leased).await;
}

#[tokio::test(start_paused = true)]
async fn pools_refill_to_warm_with_at_most_refill_concurrency_boots() {
    let h = Harness::start().await;
    let mut events = h.engine.subscribe();
    h.create_pool("p", PoolMode::Template, 5, 8).await;
    let full = h.pool_until("p", |p| p.hot == 5).await;
    assert_eq!(full.state, PoolState::Ready);
    assert_eq!(h.fake.template_builds(), 1, "one template for the pool");
    let mut most_booting = 0;
    while let Ok(event) = events.try_recv() {
        if let EngineEvent::PoolChanged { pool } = event {
            most_booting = most_booting.max(pool.booting);
        }
    }
    assert!(
        (1..=2).contains(&most_booting),
        "booting at once: {most_booting}"
    );
    assert_eq!(h.fake.live().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn resizing_down_trims_hot_vms_and_never_leased_ones() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 3, 6).await;
    h.pool_until("p", |p| p.hot == 3).await;
    let leased = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    h.pool_until("p", |p| p.hot == 3 && p.leased == 1).await;
    h.engine.resize_pool("p", 1, None).await.expect("resize");
    let after = h.pool_until("p", |p| p.hot == 1).await;
    assert_eq!(after.leased, 1);
    // Trimmed VMs are gone: 1 hot + 1 leased processes.
    for _ in 0..100 {
        if h.fake.live().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.fake.live().len(), 2);
    assert_eq!(h.state(&leased.id).await, VmState::Leased);
}

#[tokio::test(start_paused = true)]
async fn failing_boots_back_off_then_fail_the_pool_and_recover() {
    let h = Harness::start().await;
    h.fake.set_behaviour(|b| b.launch_fails = true);
    h.create_pool("p", PoolMode::Cold, 1, 2).await;
    let backoff = h.pool_until("p", |p| p.state == PoolState::Backoff).await;
    assert!(backoff
        .last_error
        .expect("reason")
        .contains("launch refused"));
    let launches_at_first_failure = h.fake.launches();
    let failed = h.pool_until("p", |p| p.state == PoolState::Failed).await;
    assert!(failed.failed >= FAILED_AFTER);
    // Back-off, not a busy loop: one attempt per back-off period.
    assert!(
        h.fake.launches() - launches_at_first_failure < 2 * FAILED_AFTER,
        "launches: {}",
        h.fake.launches()
    );
    // A failing pool answers Acquire at once.
    let refused = h.acquire("p", Duration::from_secs(60), "alice").await;
    assert!(
        matches!(refused, Err(EngineError::BootFailed(_))),
        "{refused:?}"
    );
    // Fixed, and an operator acts on the pool: it fills again.
    h.fake.set_behaviour(|b| b.launch_fails = false);
    h.engine.resize_pool("p", 1, None).await.expect("resize");
    let ready = h.pool_until("p", |p| p.hot == 1).await;
    assert_eq!(ready.state, PoolState::Ready);
}

/// A clone's identity goes with the Ping that finds its agent (one
/// write): a guest that refuses it fails that boot, the clone is never
/// handed out, and the pool serves once identities are taken again.
#[tokio::test(start_paused = true)]
async fn a_clone_whose_identity_is_refused_is_never_handed_out() {
    let h = Harness::start().await;
    h.fake
        .set_behaviour(|b| b.failing_agent_call = Some(kiln_agent_proto::method::SET_IDENTITY));
    h.create_pool("t", PoolMode::Template, 0, 1).await;
    let refused = h.acquire("t", Duration::from_secs(5), "alice").await;
    assert!(refused.is_err(), "{refused:?}");
    let vms = h.engine.list_vms().await.expect("list");
    assert!(vms.iter().all(|vm| vm.state != VmState::Leased), "{vms:?}");
    h.fake.set_behaviour(|b| b.failing_agent_call = None);
    h.engine.resize_pool("t", 1, None).await.expect("resize");
    h.pool_until("t", |p| p.hot == 1).await;
    let vm = h
        .acquire("t", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    assert_eq!(vm.state, VmState::Leased);
}

#[tokio::test(start_paused = true)]
async fn a_failing_template_build_backs_off() {
    let h = Harness::start().await;
    h.fake.set_behaviour(|b| b.template_fails = true);
    h.create_pool("t", PoolMode::Template, 1, 2).await;
    let info = h.pool_until("t", |p| p.state == PoolState::Backoff).await;
    assert!(info.last_error.expect("reason").starts_with("template:"));
    assert_eq!(h.fake.launches(), 0, "no clone without a template");
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_for_a_boot_and_times_out_when_none_comes() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 0, 1).await;
    // Nothing hot: the waiter makes the pool boot one for it.
    let vm = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    assert_eq!(vm.state, VmState::Leased);
    // max reached by a lease: no VM can come for the next caller.
    let exhausted = h.acquire("p", Duration::from_secs(5), "bob").await;
    assert!(
        matches!(exhausted, Err(EngineError::PoolExhausted { .. })),
        "{exhausted:?}"
    );
    // A pool whose VMs never answer: the waiter times out, and is gone.
    h.fake.set_behaviour(|b| b.agent_silent = true);
    h.create_pool("slow", PoolMode::Cold, 0, 1).await;
    let timed_out = h.acquire("slow", Duration::from_secs(2), "carol").await;
    assert!(
        matches!(timed_out, Err(EngineError::Timeout(_))),
        "{timed_out:?}"
    );
    assert_eq!(
        h.engine.describe_pool("slow").await.expect("pool").waiting,
        0
    );
}

#[tokio::test(start_paused = true)]
async fn an_acquire_storm_never_gives_a_vm_to_two_holders() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 2, 3).await;
    h.pool_until("p", |p| p.hot == 2).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let engine = h.engine.clone();
        calls.push(tokio::spawn(async move {
            engine
                .acquire("p", options(Duration::from_secs(5), &format!("c{i}")))
                .await
        }));
    }
    let mut granted = Vec::new();
    let mut exhausted = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(vm) => granted.push(vm.id),
            Err(EngineError::PoolExhausted { .. }) => exhausted += 1,
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(granted.len(), 3, "max VMs handed out");
    granted.sort();
    granted.dedup();
    assert_eq!(granted.len(), 3, "no VM went to two holders");
    assert_eq!(exhausted, 17);
}

#[tokio::test(start_paused = true)]
async fn leases_and_hot_vms_survive_a_restart() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Template, 2, 4).await;
    h.pool_until("p", |p| p.hot == 2).await;
    let vm = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    h.pool_until("p", |p| p.hot == 2 && p.leased == 1).await;
    let before = h.fake.live();
    let h = h.restart().await;
    let again = h.engine.describe_vm(&vm.id).await.expect("still there");
    assert_eq!(again.state, VmState::Leased);
    assert_eq!(again.leased_by.as_deref(), Some("alice"));
    assert_eq!(again.pid, vm.pid, "re-adopted, not restarted");
    let pool = h.pool_until("p", |p| p.hot == 2).await;
    assert_eq!(pool.leased, 1);
    assert_eq!(h.fake.live(), before, "no VM was started or lost");
    assert_eq!(
        h.fake.template_builds(),
        1,
        "the template on disk is re-used"
    );
    // The re-adopted lease is released like any other.
    h.engine.release(&vm.id, false).await.expect("release");
    h.pool_until("p", |p| p.leased == 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_died_while_kilnd_was_down_is_failed_at_start() {
    let h = Harness::start().await;
    let vm = h.create_and_start("victim").await;
    h.engine.shutdown(false).await.expect("shutdown");
    h.fake.crash(&vm.id);
    let h = Harness { ..h }.restart_after_shutdown().await;
    let info = h.engine.describe_vm(&vm.id).await.expect("describe");
    assert_eq!(info.state, VmState::Failed);
    assert!(info.last_error.expect("reason").contains("not running"));
}

impl Harness {
    /// Start a new engine after [`EngineHandle::shutdown`] was already sent.
    async fn restart_after_shutdown(self) -> Self {
        let _ = self.task.await;
        let (engine, task) = Self::engine(self.dir.path(), &self.fake, &self.tweak).await;
        Self {
            engine,
            task,
            ..self
        }
    }
}

/// NIC hot-plug fails at each step in turn (descriptor, netdev, device,
/// the guest's configuration) and nothing of the NIC is left: no record,
/// no device in the VMM, no TAP, no address. Then it works. TAPs are real
/// (in a network namespace of the test's own: root), the VMM is the fake.
#[tokio::test]
async fn a_failed_nic_attach_is_undone_at_every_step() {
    if !kiln_testkit::require_root("TAPs in a network namespace") {
        return;
    }
    let ns = kiln_testkit::Netns::new();
    let network = kiln_net::NetConfig {
        bridge: "kbundo".into(),
        netns: Some(ns.path()),
        ..kiln_net::NetConfig::default()
    };
    let h = Harness::start_with(Arc::new(move |c| c.network = Some(network.clone()))).await;
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "network": { "mode": "bridge", "hotplugSlots": 1 }
    }))
    .expect("spec");
    let vm = h.engine.create_vm("hotplug", spec).await.expect("create");
    h.engine.start_vm(&vm.id).await.expect("start");
    let tap = kiln_net::names::tap_name(&vm.id, 1).expect("tap name");
    let tap_exists = || {
        std::process::Command::new("ip")
            .args(["-n", ns.name(), "link", "show", &tap])
            .output()
            .expect("ip")
            .status
            .success()
    };
    let steps: [(Option<&'static str>, Option<&'static str>); 4] = [
        (Some("getfd"), None),
        (Some("netdev_add"), None),
        (Some("device_add"), None),
        (None, Some(kiln_agent_proto::method::CONFIGURE_NETWORK)),
    ];
    for (monitor_call, agent_call) in steps {
        h.fake.set_behaviour(|b| {
            b.failing_monitor_call = monitor_call;
            b.failing_agent_call = agent_call;
        });
        let step = monitor_call.or(agent_call).unwrap_or_default();
        let attached = h.engine.attach_nic(&vm.id, None).await;
        assert!(attached.is_err(), "{step}: {attached:?}");
        let nics = h.engine.list_nics(&vm.id).await.expect("nics");
        assert_eq!(nics.len(), 1, "{step}: only the boot NIC is left: {nics:?}");
        assert!(
            h.fake.devices(&vm.id).is_empty(),
            "{step}: device left in the VMM"
        );
        for _ in 0..1000 {
            if !tap_exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!tap_exists(), "{step}: the TAP is left");
    }
    h.fake.set_behaviour(|b| {
        b.failing_monitor_call = None;
        b.failing_agent_call = None;
    });
    let nic = h.engine.attach_nic(&vm.id, None).await.expect("attach");
    assert_eq!(nic.index, 1);
    assert!(tap_exists());
    assert_eq!(h.fake.devices(&vm.id).len(), 1);
    h.engine.detach_nic(&vm.id, 1).await.expect("detach");
    assert!(h.fake.devices(&vm.id).is_empty());
    assert_eq!(h.engine.list_nics(&vm.id).await.expect("nics").len(), 1);
    h.engine.kill_vm(&vm.id).await.expect("kill");
}

#[tokio::test(start_paused = true)]
async fn a_lease_with_a_ttl_expires_unless_renewed() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 2).await;
    h.pool_until("p", |p| p.hot == 1).await;
    let mut events = h.engine.subscribe();
    let ttl = AcquireOptions {
        ttl: Some(Duration::from_secs(3)),
        ..options(Duration::from_secs(5), "alice")
    };
    let vm = h.engine.acquire("p", ttl).await.expect("acquire");
    let deadline = vm.lease_expires_at.expect("a deadline");
    assert!(deadline > vm.acquired_at.expect("acquired"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewed = h
        .engine
        .renew(&vm.id, Duration::from_secs(3))
        .await
        .expect("renew");
    assert!(renewed.lease_expires_at > Some(deadline));
    // Past the first deadline: the renewal holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.state(&vm.id).await, VmState::Leased);
    // Past the renewed one: the lease ends and the VM goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..100 {
        if h.engine.describe_vm(&vm.id).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        h.engine.describe_vm(&vm.id).await,
        Err(EngineError::NoSuchVM(_))
    ));
    let mut expired = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EngineEvent::LeaseExpired { id, pool, holder } = event {
            expired.push((id, pool, holder));
        }
    }
    assert_eq!(expired, [(vm.id.clone(), Some("p".into()), "alice".into())]);
    h.pool_until("p", |p| p.hot == 1 && p.leased == 0).await;
    // Renewing a VM without a lease, and TTLs out of bounds, are refused.
    let hot = h
        .acquire("p", Duration::from_secs(5), "bob")
        .await
        .expect("acquire");
    h.engine.release(&hot.id, true).await.expect("release");
    assert!(matches!(
        h.engine.renew(&hot.id, Duration::from_secs(3)).await,
        Err(EngineError::InvalidState { .. })
    ));
    let too_long = AcquireOptions {
        ttl: Some(crate::api::MAX_LEASE_TTL + Duration::from_secs(1)),
        ..options(Duration::from_secs(5), "carol")
    };
    assert!(matches!(
        h.engine.acquire("p", too_long).await,
        Err(EngineError::InvalidArgument(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_recycled_when_the_pool_says_so() {
    let h = Harness::start().await;
    let spec = PoolSpec {
        mode: PoolMode::Template,
        warm: 1,
        max: 2,
        refill_concurrency: 2,
        recycle_on_expiry: true,
        vm: VmSpec::default(),
        warmup_sec: 0,
    };
    h.create_pool_with("r", spec).await;
    h.pool_until("r", |p| p.hot == 1).await;
    let ttl = AcquireOptions {
        ttl: Some(Duration::from_secs(2)),
        ..options(Duration::from_secs(5), "alice")
    };
    let vm = h.engine.acquire("r", ttl).await.expect("acquire");
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.until_state(&vm.id, VmState::Ready).await;
    let back = h
        .engine
        .describe_vm(&vm.id)
        .await
        .expect("recycled, not destroyed");
    assert_eq!(back.leased_by, None);
    assert_eq!(back.lease_expires_at, None);
}

#[tokio::test(start_paused = true)]
async fn a_lease_deadline_is_honoured_after_a_restart() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 2).await;
    h.pool_until("p", |p| p.hot == 1).await;
    let ttl = AcquireOptions {
        ttl: Some(Duration::from_secs(10)),
        ..options(Duration::from_secs(5), "alice")
    };
    let vm = h.engine.acquire("p", ttl).await.expect("acquire");
    let h = h.restart().await;
    let again = h.engine.describe_vm(&vm.id).await.expect("kept");
    assert_eq!(
        again.lease_expires_at, vm.lease_expires_at,
        "the deadline is persisted"
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    for _ in 0..100 {
        if h.engine.describe_vm(&vm.id).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        h.engine.describe_vm(&vm.id).await.is_err(),
        "expired after the restart"
    );
}

/// Real time: the deadline passes while no engine runs (wall clock).
#[tokio::test]
async fn a_lease_that_expired_while_kilnd_was_down_is_reclaimed_at_start() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 2).await;
    h.pool_until("p", |p| p.hot == 1).await;
    let ttl = AcquireOptions {
        ttl: Some(Duration::from_secs(1)),
        ..options(Duration::from_secs(5), "alice")
    };
    let vm = h.engine.acquire("p", ttl).await.expect("acquire");
    h.engine.shutdown(false).await.expect("shutdown");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let h = h.restart_after_shutdown().await;
    h.until_gone(&vm.id).await;
    assert!(!h.fake.live().contains(&vm.id), "its process is gone too");
}

#[tokio::test(start_paused = true)]
async fn leases_per_caller_are_limited() {
    let h = Harness::start_with(Arc::new(|c| c.max_leases_per_caller = 2)).await;
    h.create_pool("p", PoolMode::Cold, 3, 6).await;
    h.pool_until("p", |p| p.hot == 3).await;
    let by_uid = |uid: u32, holder: &str| AcquireOptions {
        uid: Some(uid),
        ..options(Duration::from_secs(5), holder)
    };
    h.engine
        .acquire("p", by_uid(1000, "uid:1000 a"))
        .await
        .expect("first");
    h.engine
        .acquire("p", by_uid(1000, "uid:1000 b"))
        .await
        .expect("second");
    let third = h.engine.acquire("p", by_uid(1000, "uid:1000 c")).await;
    assert!(
        matches!(third, Err(EngineError::QuotaExceeded { limit: 2, .. })),
        "{third:?}"
    );
    // Another caller is not affected.
    h.engine
        .acquire("p", by_uid(1001, "uid:1001"))
        .await
        .expect("other uid");
}

#[tokio::test(start_paused = true)]
async fn leases_bound_to_a_holder_end_when_it_goes_away() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 3, 6).await;
    h.pool_until("p", |p| p.hot == 3).await;
    let bound = |who: Disconnect| AcquireOptions {
        release_on: Some(who),
        ..options(Duration::from_secs(5), "bound")
    };
    let by_conn = h
        .engine
        .acquire("p", bound(Disconnect::Connection(7)))
        .await
        .expect("acquire");
    let by_name = h
        .engine
        .acquire("p", bound(Disconnect::BusName(":1.42".into())))
        .await
        .expect("acquire");
    assert!(by_conn.release_on_disconnect);
    let free = h
        .acquire("p", Duration::from_secs(5), "unbound")
        .await
        .expect("acquire");
    assert_eq!(h.engine.bound_bus_names().await.expect("names"), [":1.42"]);
    // Another connection going away ends nothing.
    assert_eq!(
        h.engine
            .disconnected(Disconnect::Connection(8))
            .await
            .expect("ok"),
        0
    );
    assert_eq!(
        h.engine
            .disconnected(Disconnect::Connection(7))
            .await
            .expect("ok"),
        1
    );
    h.until_gone(&by_conn.id).await;
    // A restart ends leases bound to connections to the old kilnd (none
    // left here), keeps bus-name ones (the adapter checks those) and
    // unbound ones.
    let connected = h
        .engine
        .acquire("p", bound(Disconnect::Connection(1)))
        .await
        .expect("acquire");
    let h = h.restart().await;
    h.until_gone(&connected.id).await;
    assert_eq!(h.state(&by_name.id).await, VmState::Leased);
    assert_eq!(h.state(&free.id).await, VmState::Leased);
    let ended = h
        .engine
        .disconnected(Disconnect::BusName(":1.42".into()))
        .await
        .expect("ok");
    assert_eq!(ended, 1);
    h.until_gone(&by_name.id).await;
    assert_eq!(h.state(&free.id).await, VmState::Leased);
}

/// The crash-storm bug: a pool VM that was booting when kilnd died is
/// destroyed at start, but its agent answers before the SIGKILL takes
/// effect. It must not turn ready, and no Acquire may get it.
#[tokio::test(start_paused = true)]
async fn a_vm_being_killed_is_never_handed_out() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 3).await;
    h.pool_until("p", |p| p.hot == 1).await;
    // The replacement boots slowly, and kilnd "dies" while it does.
    h.fake
        .set_behaviour(|b| b.boot_delay = Duration::from_millis(300));
    let held = h
        .acquire("p", Duration::from_secs(5), "alice")
        .await
        .expect("acquire");
    h.pool_until("p", |p| p.booting == 1).await;
    h.fake
        .set_behaviour(|b| b.kill_delay = Duration::from_secs(2));
    let h = h.restart().await;
    // While the doomed VM's agent answers and its kill is pending, no
    // Acquire may take it.
    let mut granted = Vec::new();
    for _ in 0..30 {
        if let Ok(vm) = h.acquire("p", Duration::ZERO, "bob").await {
            granted.push(vm.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in granted.iter().chain([&held.id]) {
        assert_eq!(h.state(id).await, VmState::Leased, "lease on {id} lost");
    }
}

/// A hot VM the pool is destroying (a shrink, a moved image tag) still
/// holds its slot until its QEMU is gone; an Acquire meanwhile waits for
/// the slot and its new VM instead of failing with PoolExhausted.
#[tokio::test(start_paused = true)]
async fn an_acquire_waits_for_the_slot_of_a_vm_being_destroyed() {
    let h = Harness::start().await;
    h.create_pool("p", PoolMode::Cold, 1, 1).await;
    h.pool_until("p", |p| p.hot == 1).await;
    h.fake
        .set_behaviour(|b| b.kill_delay = Duration::from_secs(2));
    h.engine.resize_pool("p", 0, None).await.expect("resize");
    let pool = h.pool_until("p", |p| p.hot == 0).await;
    assert_eq!((pool.booting, pool.leased), (0, 0), "{pool:?}");
    let vm = h
        .acquire("p", Duration::from_secs(30), "alice")
        .await
        .expect("the acquire waits for the freed slot");
    assert_eq!(h.state(&vm.id).await, VmState::Leased);
}

fn options(timeout: Duration, holder: &str) -> AcquireOptions {
    AcquireOptions {
        timeout: Some(timeout),
        holder: holder.to_owned(),
        ..AcquireOptions::default()
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        stdin: None,
        timeout_ms: None,
        max_output_bytes: None,
    }
}

/// Image commands refuse bad input before the store sees it, and name
/// what is not there.
#[tokio::test(start_paused = true)]
async fn image_commands_check_their_input() {
    let h = Harness::start().await;
    let name = |e: EngineError| e.name();
    for bad in ["", "a b", "x;rm", &"a".repeat(513), "Upper/Case:1"] {
        let job = h.engine.pull_image(bad).await.expect("sent");
        assert_eq!(
            job.result().await.map_err(name),
            Err("InvalidArgument"),
            "{bad:?}"
        );
    }
    for path in ["relative/app.tar", "/tmp/a\nb"] {
        let job = h
            .engine
            .import_image(std::path::Path::new(path), None)
            .await
            .expect("sent");
        assert_eq!(
            job.result().await.map_err(name),
            Err("InvalidArgument"),
            "{path:?}"
        );
    }
    let missing = h.dir.path().join("no-such.tar");
    let job = h.engine.import_image(&missing, None).await.expect("sent");
    assert_eq!(job.result().await.map_err(name), Err("ImageNotFound"));
    let digest = format!("sha256:{}", "0".repeat(64));
    for what in ["localhost/nope:1", digest.as_str()] {
        let described = h.engine.describe_image(what).await;
        assert_eq!(described.map_err(name), Err("ImageNotFound"), "{what}");
        let removed = h.engine.remove_image(what).await;
        assert_eq!(removed.map_err(name), Err("ImageNotFound"), "{what}");
    }
    assert_eq!(
        h.engine.describe_image("sha256:xyz").await.map_err(name),
        Err("InvalidArgument")
    );
    assert!(h.engine.list_images().await.expect("list").is_empty());
}

/// An import through the engine: progress from resolved to stored,
/// `ImageAdded`, the image by tag and by digest, a second import that is a
/// cache hit, then removal, `ImageRemoved` and the files collected. Real
/// mkfs.erofs, a one-file layer (no QEMU).
#[tokio::test]
async fn images_are_imported_listed_and_removed() {
    use kiln_testkit::oci::{file, Entry, Layer, LayoutBuilder};
    let h = Harness::start().await;
    let mut events = h.engine.subscribe();
    let layout = h.dir.path().join("layout");
    let mut builder = LayoutBuilder::new(&layout);
    let arch = kiln_image::Platform::host().architecture;
    let layer = Layer::gzip(&[Entry::Dir("etc/"), file("etc/hello", b"hello\n")]);
    let desc = builder.image(&arch, &[layer]);
    builder.tag(desc, "1");

    let mut job = h
        .engine
        .import_image(&layout, Some("localhost/demo:1"))
        .await
        .expect("sent");
    let mut steps = Vec::new();
    while let Some(report) = job.progress().await {
        steps.push(report.step);
    }
    let image = job.result().await.expect("imported");
    assert_eq!(steps.first(), Some(&crate::images::ImageStep::Resolved));
    assert_eq!(steps.last(), Some(&crate::images::ImageStep::Stored));
    assert_eq!(image.references, ["localhost/demo:1"]);
    assert_eq!(image.layers.len(), 1);
    assert!(matches!(
        events.recv().await,
        Ok(EngineEvent::ImageAdded { image: ref added }) if added.digest == image.digest
    ));
    let by_tag = h
        .engine
        .describe_image("localhost/demo:1")
        .await
        .expect("by tag");
    let by_digest = h
        .engine
        .describe_image(&image.digest)
        .await
        .expect("by digest");
    assert_eq!((&by_tag, &by_digest), (&image, &image));
    assert_eq!(
        h.engine.list_images().await.expect("list"),
        std::slice::from_ref(&image)
    );

    let again = h
        .engine
        .import_image(&layout, Some("localhost/demo:1"))
        .await;
    let again = again.expect("sent").result().await.expect("cache hit");
    assert_eq!(again.digest, image.digest);

    let removed = h
        .engine
        .remove_image("localhost/demo:1")
        .await
        .expect("removed");
    assert_eq!(
        removed,
        crate::api::ImageRemoved::Deleted {
            digest: image.digest.clone()
        }
    );
    loop {
        match events.recv().await.expect("event") {
            EngineEvent::ImageRemoved { digest } => break assert_eq!(digest, image.digest),
            EngineEvent::ImageAdded { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(h.engine.list_images().await.expect("list").is_empty());
    // The collection after the removal frees the converted layer.
    let erofs = h.dir.path().join("state/images/erofs/sha256");
    for _ in 0..500 {
        if std::fs::read_dir(&erofs)
            .expect("erofs dir")
            .next()
            .is_none()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the removed image's layer was never collected");
}

/// `kiln.test/u:v1` (busybox) in the engine's image store, imported from
/// a layout; its digest.
async fn import_test_image(h: &Harness) -> String {
    let layout = kiln_testkit::oci::one_image(&[kiln_testkit::oci::busybox_layer()], "v1");
    let job = h
        .engine
        .import_image(layout.path(), Some("kiln.test/u:v1"))
        .await
        .expect("import starts");
    job.result().await.expect("imported").digest
}

async fn image_users(h: &Harness, digest: &str) -> Vec<String> {
    h.engine.describe_image(digest).await.expect("image").users
}

#[tokio::test(start_paused = true)]
async fn a_failed_add_container_is_undone_at_every_step() {
    let h = Harness::start().await;
    let digest = import_test_image(&h).await;
    let vm = h.create_and_start("c").await;
    let spec = |name: &str| crate::container::ContainerSpec {
        name: name.into(),
        image: "kiln.test/u:v1".into(),
        command: Some(vec!["-c".into(), "true".into()]),
        ..Default::default()
    };
    // QEMU refuses the device (the node goes again), the guest never sees
    // the disk (the disk goes again), the guest cannot start the process:
    // each time nothing stays plugged, recorded or held.
    for (monitor_call, agent_call) in [
        (Some("device_add"), None),
        (Some("blockdev-add"), None),
        (None, Some(kiln_agent_proto::method::START_CONTAINER)),
    ] {
        h.fake.set_behaviour(|b| {
            b.failing_monitor_call = monitor_call;
            b.failing_agent_call = agent_call;
        });
        let err = h.engine.add_container(&vm.id, spec("x")).await.unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::VmmFailed(_)
                    | EngineError::AgentFailed(_)
                    | EngineError::ContainerStartFailed(_)
            ),
            "{monitor_call:?} {agent_call:?}: {err:?}"
        );
        assert_eq!(
            h.fake.plugged(&vm.id),
            (vec![], vec![]),
            "{monitor_call:?} {agent_call:?}"
        );
        assert!(image_users(&h, &digest).await.is_empty());
        assert!(h
            .engine
            .list_containers(&vm.id)
            .await
            .expect("list")
            .is_empty());
    }
    h.fake.set_behaviour(|b| {
        b.failing_monitor_call = None;
        b.failing_agent_call = None;
    });
    let added = h
        .engine
        .add_container(&vm.id, spec("x"))
        .await
        .expect("add");
    assert_eq!(added.state, crate::container::ContainerPhase::Running);
    let (devices, nodes) = h.fake.plugged(&vm.id);
    assert_eq!((devices.len(), nodes.len()), (1, 1));
    assert_eq!(image_users(&h, &digest).await, [format!("vm:{}:x", vm.id)]);
    // Removed: unplugged and released.
    h.engine
        .remove_container(&vm.id, "x")
        .await
        .expect("remove");
    assert_eq!(h.fake.plugged(&vm.id), (vec![], vec![]));
    assert!(image_users(&h, &digest).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_image_user_no_vm_accounts_for_is_released_at_start() {
    let h = Harness::start().await;
    let digest = import_test_image(&h).await;
    // As a kilnd that died between acquiring and recording would leave it.
    let store = kiln_image::ImageStore::open(h.dir.path().join("state/images"), Default::default())
        .expect("store");
    store
        .acquire(&digest, "vm:0123456789ab:main")
        .await
        .expect("acquire");
    store.acquire(&digest, "pool:gone").await.expect("acquire");
    store.acquire(&digest, "test:other").await.expect("acquire");
    let h = h.restart().await;
    let mut users = Vec::new();
    for _ in 0..200 {
        users = image_users(&h, &digest).await;
        if users.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(users, ["test:other"], "only users Kiln does not own stay");
}

#[tokio::test(start_paused = true)]
async fn snapshots_restore_and_fork_into_new_vms_and_survive_a_restart() {
    let h = Harness::start().await;
    let vm = h.create_and_start("origin").await;
    let snapshot = h
        .engine
        .snapshot_vm(&vm.id, "first", false)
        .await
        .expect("snapshot");
    assert_eq!(
        (snapshot.name.as_str(), snapshot.source_id.as_str()),
        ("first", vm.id.as_str())
    );
    // Resumed after the save, and a second one of the name is refused.
    assert_eq!(
        h.engine.describe_vm(&vm.id).await.unwrap().state,
        VmState::Ready
    );
    assert_eq!(
        h.engine
            .snapshot_vm(&vm.id, "first", false)
            .await
            .unwrap_err()
            .name(),
        "AlreadyExists"
    );
    // Kept paused when asked.
    h.engine
        .snapshot_vm(&vm.id, "held", true)
        .await
        .expect("snapshot");
    assert_eq!(
        h.engine.describe_vm(&vm.id).await.unwrap().state,
        VmState::Paused
    );
    h.engine.resume_vm(&vm.id).await.expect("resume");

    let restored = h
        .engine
        .restore_vm("first", Some("copy".into()), false)
        .await
        .expect("restore");
    assert_eq!(
        (restored.name.as_str(), restored.state),
        ("copy", VmState::Ready)
    );
    let forks = h.engine.fork_vm(&vm.id, 2).await.expect("fork");
    let names: Vec<&str> = forks.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["origin-fork-1", "origin-fork-2"]);
    assert!(forks.iter().all(|v| v.state == VmState::Ready));
    // The fork's own snapshot is gone; the named ones stay.
    let listed: Vec<String> = h
        .engine
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, ["first", "held"]);

    let h = h.restart().await;
    assert_eq!(h.engine.list_snapshots().await.unwrap().len(), 2);
    h.engine.delete_snapshot("held").await.expect("delete");
    for (call, want) in [
        (
            h.engine.delete_snapshot("held").await.unwrap_err(),
            "NoSuchSnapshot",
        ),
        (
            h.engine.restore_vm("nope", None, false).await.unwrap_err(),
            "NoSuchSnapshot",
        ),
        (
            h.engine.fork_vm(&vm.id, 0).await.unwrap_err(),
            "InvalidArgument",
        ),
        (
            h.engine
                .snapshot_vm(&vm.id, "../x", false)
                .await
                .unwrap_err(),
            "InvalidArgument",
        ),
    ] {
        assert_eq!(call.name(), want);
    }
    // A stopped VM has nothing to save.
    h.engine.stop_vm(&restored.id, None).await.expect("stop");
    assert_eq!(
        h.engine
            .snapshot_vm(&restored.id, "late", false)
            .await
            .unwrap_err()
            .name(),
        "InvalidState"
    );
}
