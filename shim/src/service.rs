//! The shim's binary actions, as containerd runs them (cwd = the task's
//! bundle): `start` (one shim per pod: the grouping is the pod's sandbox
//! id), `delete` (the shim is gone: give back what the bundle record says
//! the task held), and the daemon serving the task service.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_address;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::kiln::{is_gone, Kiln};
use crate::spec::Spec;
use crate::state::BundleRecord;
use crate::task::{timestamp, TaskService};

/// What a task killed by its shim's death reports: SIGKILL.
const KILLED: u32 = 128 + 9;

/// The shim (one per pod, or per standalone task).
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl containerd_shim::Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
        }
    }

    /// Spawn the daemon for the task's pod, or find the one serving it: the
    /// socket is named by containerd's address, the namespace and the pod.
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = match Spec::read(Path::new(".")) {
            Ok(spec) => spec.pod(&opts.id),
            Err(e) => {
                log::warn!("reading config.json: {e}");
                opts.id.clone()
            }
        };
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    /// The shim of this task died: release its VM (sandbox, standalone) or
    /// remove its container, as recorded in the bundle; gone is fine.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("cwd: {e}")))?;
        let record = BundleRecord::read(&bundle).map_err(|e| {
            containerd_shim::Error::Other(format!("reading the bundle record: {e}"))
        })?;
        let mut pid = 0;
        if let Some(record) = record {
            pid = record.qemu_pid;
            let kiln = Kiln::new(record.address.clone());
            let done = kiln.connect().and_then(|mut m| match &record.container {
                Some(name) if record.role == "container" => {
                    m.remove_container(&record.vm, name).map(drop)
                }
                _ => m.release(&record.vm, record.recycle).map(drop),
            });
            match done {
                Ok(()) => log::info!("{}: gave back {} after its shim died", self.id, record.vm),
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    return Err(containerd_shim::Error::Other(format!(
                        "giving back VM {} of {}: {e}",
                        record.vm, self.id
                    )))
                }
            }
        }
        Ok(DeleteResponse {
            pid,
            exit_status: KILLED,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            crate::events::Events::new(publisher, self.namespace.clone()),
            Arc::clone(&self.exit),
            self.namespace.clone(),
        )
    }
}
