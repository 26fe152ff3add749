//! Processes the tests start: a sandbox whose QEMUs die with it, liveness
//! of a pid, commands run as another user, commands that must succeed, a
//! child's JSON output as it comes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A temp dir `/tmp/kiln-t*` for an engine or a kilnd; every QEMU whose pid
/// file lies under its `run/vms/` is SIGKILLed and the dir removed on drop.
/// `scripts/test.sh` kills what a test killed by a timeout left there.
/// With `KILN_KEEP_FAILED=1` in the environment, a failed test's dir is
/// kept (its path printed) so its QEMU and agent logs can be read.
#[derive(Debug)]
pub struct Sandbox {
    dir: Option<tempfile::TempDir>,
}

impl Sandbox {
    pub fn new() -> Self {
        // Short: unix socket paths inside it are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("kiln-t")
            .tempdir_in("/tmp")
            .unwrap();
        // Searchable (not listable) by others: QEMUs run under their own
        // uids and open their files below it.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        Self { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        kill_qemus_under(self.path());
        if std::thread::panicking() && std::env::var_os("KILN_KEEP_FAILED").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("KILN_KEEP_FAILED: kept {}", dir.keep().display());
            }
        }
    }
}

/// SIGKILL every QEMU whose pid file is `<root>/run/vms/<id>/qemu.pid`,
/// and every process whose command line names a path under `root` (a QEMU
/// launched just before its kilnd was killed has no pid file yet, and
/// would otherwise outlive the test and recreate its files in the dir).
pub fn kill_qemus_under(root: &Path) {
    let mut vm_ids = Vec::new();
    for dir in std::fs::read_dir(root.join("run/vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        vm_ids.extend(dir.file_name().to_str().map(str::to_owned));
        if let Ok(pid) = std::fs::read_to_string(dir.path().join("qemu.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let needle = format!("{}/", root.display());
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_root = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(&needle));
        if pid != me && names_root {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            // A QEMU whose run dir is gone (a test's tmpfs over `run/`
            // unmounted first) still names it: its cgroup is the
            // sandbox's to remove too.
            vm_ids.extend(vm_id_in(&cmdline, &format!("{needle}run/vms/")));
        }
    }
    vm_ids.sort();
    vm_ids.dedup();
    remove_vm_cgroups(&vm_ids);
    // The VMs the sandbox's kilnd made and no longer ran: their cgroups
    // must be gone already. One left behind is kilnd's leak: reported,
    // then removed so the host stays clean. (The one empty VM cgroup a
    // full `make test` used to leave was the sandbox's own: a QEMU whose
    // run dir a test had unmounted, handled above.)
    let destroyed: Vec<String> = vms_created_in_log(root)
        .into_iter()
        .filter(|id| !vm_ids.contains(id))
        .collect();
    for id in &destroyed {
        if let Some(dir) = vm_cgroup_left(id) {
            report_leak(&format!(
                "kilnd no longer runs VM {id} but left its cgroup ({})",
                dir.display()
            ));
        }
    }
    remove_vm_cgroups(&destroyed);
    for id in &vm_ids {
        if let Some(dir) = vm_cgroup_left(id) {
            report_leak(&format!(
                "the cgroup of VM {id} is still busy after its QEMU was killed ({})",
                dir.display()
            ));
        }
    }
}

/// A directory of VM `id`'s cgroup that still exists, if any.
fn vm_cgroup_left(id: &str) -> Option<PathBuf> {
    vm_cgroup_dirs(id).into_iter().find(|d| d.is_dir())
}

/// The VM id in a command line that names `<vms_dir><id>/…`.
fn vm_id_in(cmdline: &[u8], vms_dir: &str) -> Option<String> {
    cmdline.split(|b| *b == 0).find_map(|arg| {
        let arg = String::from_utf8_lossy(arg);
        let rest = arg.split(vms_dir).nth(1)?;
        let id = rest.split('/').next()?;
        (!id.is_empty()).then(|| id.to_owned())
    })
}

/// Where leftover VM cgroups are reported: `scripts/test.sh` prints it
/// after the tests.
const LEAK_REPORT: &str = "/tmp/kiln-test-leaks.log";

/// One line to [`LEAK_REPORT`] (and stderr), with the test's name.
fn report_leak(what: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_owned();
    let line = format!("{test}: {what}\n");
    eprint!("kiln-testkit: {line}");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LEAK_REPORT)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// The ids of the VMs a sandbox's kilnd logged as created (`VM created
/// vm=<id>` in its `kilnd.log`).
fn vms_created_in_log(root: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(root.join("kilnd.log")).unwrap_or_default();
    let mut ids: Vec<String> = log
        .lines()
        .filter_map(|line| line.split("VM created vm=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// `kiln-test/<id>` in every cgroup hierarchy (v1's, and v2's root).
fn vm_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain([PathBuf::from("/sys/fs/cgroup")])
        .map(|hierarchy| hierarchy.join(TEST_CGROUP_PARENT).join(id))
        .collect()
}

/// The cgroup parent every test kilnd puts its VMs under.
pub const TEST_CGROUP_PARENT: &str = "kiln-test";

/// Removes the cgroups of the sandbox's VMs (`kiln-test/<id>` in every
/// hierarchy). A kilnd leaves a running VM's cgroup for the next kilnd to
/// re-adopt; the sandbox killed those QEMUs itself, so nothing else would
/// remove them and every test run would leave its VMs' cgroups behind.
/// An rmdir waits (briefly) for the killed QEMU to leave the cgroup.
fn remove_vm_cgroups(vm_ids: &[String]) {
    for id in vm_ids {
        for dir in vm_cgroup_dirs(id) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while dir.is_dir() {
                match std::fs::remove_dir(&dir) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Is `pid` alive? A zombie is not (it still answers kill(0)), nor is a
/// process being reaped: between its parent's wait(2) and the pid's
/// release, `/proc/<pid>/stat` says `X` (dead). A test that checks right
/// after kilnd saw the exit can land in that window: a CI run did.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X', 'x'])),
        Err(_) => false,
    }
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `program` run as `uid` (and its group, no supplementary groups), or as
/// ourselves when `uid` is None.
pub fn command_as(uid: Option<u32>, program: &str) -> Command {
    match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
            c.arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Run a command that must succeed; its stdout. Panics with its status and
/// stderr otherwise.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON values `child` prints on its (piped) stdout, one per line or
/// JSON-SEQ, as they come: a thread reads them until the child closes it
/// or nobody listens any more.
pub(crate) fn json_output(child: &mut Child) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            for value in crate::json_seq(&line) {
                if tx.send(value).is_err() {
                    return;
                }
            }
        }
    });
    rx
}
