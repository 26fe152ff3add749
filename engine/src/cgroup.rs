//! One cgroup per VM's QEMU: its memory cap, CPU quota and weight, IO
//! weight, and the usage figures read back from it.
//!
//! kilnd makes `<root>/<parent>/<vm id>` itself (no systemd needed, so it
//! works the same under systemd, where the unit delegates its subtree, and
//! in a container or a test). Both hierarchies are handled: the unified one
//! (cgroup v2: `memory.max`, `cpu.max`, `cpu.weight`, `io.weight`), and the
//! legacy one (v1: `memory.limit_in_bytes`, `cpu.cfs_quota_us`,
//! `cpu.shares`, `blkio.weight`) that hosts with a hybrid layout still
//! use for the controllers (this development machine among them).
//! Anything missing (a controller not mounted, `blkio.weight` under blk-mq)
//! is left out and reported, never fatal: limits are protection, a VM still
//! runs without them.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 with the memory controller: one directory per VM.
    Unified(PathBuf),
    /// cgroup v1: a directory per controller hierarchy.
    Legacy {
        /// `…/memory`.
        memory: PathBuf,
        /// `…/cpu` (or `cpu,cpuacct`).
        cpu: Option<PathBuf>,
        /// `…/cpuacct`, when mounted apart from `cpu`.
        cpuacct: Option<PathBuf>,
        /// `…/blkio`.
        blkio: Option<PathBuf>,
    },
    /// No usable memory controller: VMs run without a cgroup of their own.
    Unavailable,
}

impl Layout {
    /// The layout under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Self {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            return Self::Unified(root.to_path_buf());
        }
        let dir = |name: &str| Some(root.join(name)).filter(|d| d.join("tasks").exists());
        match dir("memory") {
            Some(memory) => Self::Legacy {
                memory,
                cpu: dir("cpu").or_else(|| dir("cpu,cpuacct")),
                cpuacct: dir("cpuacct"),
                blkio: dir("blkio"),
            },
            None => Self::Unavailable,
        }
    }

    /// The VM cgroup `<parent>/<name>` (not created).
    pub fn vm(&self, parent: &str, name: &str) -> VmCgroup {
        self.cgroup_at(|root, _| Some(root.join(parent).join(name)))
    }

    /// The cgroup process `pid` is in now (QEMU's own, or the machined
    /// scope systemd moved it to), from `/proc/<pid>/cgroup`.
    pub fn of_process(&self, pid: u32) -> VmCgroup {
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        self.of_membership(&membership)
    }

    /// The cgroup a `/proc/<pid>/cgroup` text names: `0::/path` on v2,
    /// `N:controller[,controller]:/path` per v1 hierarchy.
    fn of_membership(&self, membership: &str) -> VmCgroup {
        // The mount point's name need not be the controller's alone
        // (`cpu,cpuacct`), so each path is found by controller.
        self.cgroup_at(|root, wanted| {
            membership.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let found = match wanted {
                    "" => controllers.is_empty(),
                    name => controllers.split(',').any(|c| c == name),
                };
                found.then(|| root.join(path.trim_start_matches('/')))
            })
        })
    }

    /// A cgroup whose directory in each hierarchy is `at(hierarchy root,
    /// controller)` (`""` for the unified one).
    fn cgroup_at(&self, at: impl Fn(&PathBuf, &str) -> Option<PathBuf>) -> VmCgroup {
        match self {
            Self::Unified(root) => {
                let dir = at(root, "");
                VmCgroup {
                    unified: true,
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: dir.clone(),
                    io: dir,
                }
            }
            Self::Legacy {
                memory,
                cpu,
                cpuacct,
                blkio,
            } => VmCgroup {
                unified: false,
                memory: at(memory, "memory"),
                cpu: cpu.as_ref().and_then(|c| at(c, "cpu")),
                cpuacct: cpuacct
                    .as_ref()
                    .or(cpu.as_ref())
                    .and_then(|c| at(c, "cpuacct")),
                io: blkio.as_ref().and_then(|b| at(b, "blkio")),
            },
            Self::Unavailable => VmCgroup::default(),
        }
    }

    /// Lets VM cgroups under `<root>/<parent>` use the controllers (v2
    /// passes them down with `cgroup.subtree_control`, level by level).
    pub fn prepare(&self, parent: &str) -> io::Result<()> {
        let Self::Unified(root) = self else {
            return Ok(());
        };
        let mut dir = root.clone();
        let enable = |dir: &Path| {
            // Ask for each on its own: one a level cannot pass on must not
            // stop the others.
            for controller in ["+memory", "+cpu", "+io", "+pids"] {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), controller);
            }
        };
        enable(&dir);
        for part in Path::new(parent).components() {
            dir.push(part);
            std::fs::create_dir_all(&dir)?;
            enable(&dir);
        }
        Ok(())
    }
}

/// What a VM's QEMU may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupLimits {
    /// Memory cap in bytes (guest RAM plus QEMU's own).
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a core (500: half a core); `None`: no
    /// quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milli_cpus: Option<u32>,
    /// CPU weight, 1 to 10000 (v2's scale; 100 is the default share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// IO weight, 1 to 10000 (v2's scale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
}

/// Usage figures from a VM's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupUsage {
    /// CPU time used, µs.
    pub cpu_usec: u64,
    /// Memory charged now, bytes.
    pub memory_bytes: u64,
    /// Its cap, bytes.
    pub memory_limit_bytes: u64,
    /// Processes killed in it by the OOM killer.
    pub oom_kills: u64,
}

/// One VM's cgroup directories (one per hierarchy on v1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmCgroup {
    unified: bool,
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    io: Option<PathBuf>,
}

/// v1's share for a v2 weight: 100 ↔ 1024, clamped to v1's range.
fn shares_of(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
}

/// v1's blkio weight (10 to 1000) for a v2 weight (1 to 10000).
fn blkio_of(weight: u32) -> u32 {
    (weight / 10).clamp(10, 1000)
}

impl VmCgroup {
    /// Whether there is a cgroup at all (`Layout::Unavailable`: no).
    pub fn exists(&self) -> bool {
        self.memory.is_some()
    }

    fn dirs(&self) -> Vec<&PathBuf> {
        let mut dirs: Vec<&PathBuf> = [&self.memory, &self.cpu, &self.cpuacct, &self.io]
            .into_iter()
            .flatten()
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Makes the directories and writes `limits`; what could not be set
    /// is returned (for the log).
    pub fn create(&self, limits: &CgroupLimits) -> io::Result<Vec<String>> {
        if !self.exists() {
            return Ok(Vec::new());
        }
        for dir in self.dirs() {
            std::fs::create_dir_all(dir)?;
        }
        let mut skipped = Vec::new();
        let mut set = |dir: &Option<PathBuf>, file: &str, value: String| match dir {
            Some(dir) => {
                if let Err(e) = std::fs::write(dir.join(file), &value) {
                    skipped.push(format!("{file}={value}: {e}"));
                }
            }
            None => skipped.push(format!("{file}: no such controller")),
        };
        let period = 100_000u64;
        let quota = limits
            .milli_cpus
            .map(|m| (u64::from(m) * period / 1000).max(1000));
        if self.unified {
            set(&self.memory, "memory.max", limits.memory_bytes.to_string());
            // A guest must not page QEMU out to swap behind its back.
            set(&self.memory, "memory.swap.max", "0".into());
            if let Some(quota) = quota {
                set(&self.cpu, "cpu.max", format!("{quota} {period}"));
            }
            if let Some(w) = limits.cpu_weight {
                set(&self.cpu, "cpu.weight", w.to_string());
            }
            if let Some(w) = limits.io_weight {
                set(&self.io, "io.weight", format!("default {w}"));
            }
        } else {
            set(
                &self.memory,
                "memory.limit_in_bytes",
                limits.memory_bytes.to_string(),
            );
            if let Some(quota) = quota {
                set(&self.cpu, "cpu.cfs_period_us", period.to_string());
                set(&self.cpu, "cpu.cfs_quota_us", quota.to_string());
            }
            if let Some(w) = limits.cpu_weight {
                set(&self.cpu, "cpu.shares", shares_of(w).to_string());
            }
            if let Some(w) = limits.io_weight {
                set(&self.io, "blkio.weight", blkio_of(w).to_string());
            }
        }
        Ok(skipped)
    }

    /// Moves process `pid` in (every hierarchy).
    pub fn attach(&self, pid: u32) -> io::Result<()> {
        let file = if self.unified {
            "cgroup.procs"
        } else {
            "tasks"
        };
        for dir in self.dirs() {
            // v1 `tasks` takes one thread: the whole process goes through
            // `cgroup.procs`, which both versions have.
            let procs = dir.join("cgroup.procs");
            let target = if procs.exists() {
                procs
            } else {
                dir.join(file)
            };
            std::fs::write(target, pid.to_string())?;
        }
        Ok(())
    }

    /// What the cgroup has counted.
    pub fn usage(&self) -> CgroupUsage {
        let read = |dir: &Option<PathBuf>, file: &str| {
            dir.as_ref()
                .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
                .unwrap_or_default()
        };
        let number = |text: String| text.trim().parse::<u64>().unwrap_or(0);
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        if self.unified {
            let limit = read(&self.memory, "memory.max");
            CgroupUsage {
                cpu_usec: field(&read(&self.cpu, "cpu.stat"), "usage_usec"),
                memory_bytes: number(read(&self.memory, "memory.current")),
                memory_limit_bytes: limit.trim().parse().unwrap_or(u64::MAX),
                oom_kills: field(&read(&self.memory, "memory.events"), "oom_kill"),
            }
        } else {
            CgroupUsage {
                cpu_usec: number(read(&self.cpuacct, "cpuacct.usage")) / 1000,
                memory_bytes: number(read(&self.memory, "memory.usage_in_bytes")),
                memory_limit_bytes: number(read(&self.memory, "memory.limit_in_bytes")),
                oom_kills: field(&read(&self.memory, "memory.oom_control"), "oom_kill"),
            }
        }
    }

    /// Removes the directories (once no process is left in them).
    pub fn remove(&self) {
        for dir in self.dirs() {
            if let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot remove a VM cgroup");
                }
            }
        }
    }

    /// The memory directory (where an operator looks first).
    pub fn memory_dir(&self) -> Option<&Path> {
        self.memory.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake v1 tree: directories with a `tasks` file.
    fn legacy_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "cpuacct"] {
            std::fs::create_dir_all(dir.path().join(c)).unwrap();
            std::fs::write(dir.path().join(c).join("tasks"), "").unwrap();
        }
        dir
    }

    #[test]
    fn a_process_cgroup_is_found_by_controller() {
        let root = legacy_tree();
        let legacy = Layout::detect(root.path());
        let membership = "12:memory:/machine.slice/machine-kiln.scope\n\
            4:cpu,cpuacct:/machine.slice/machine-kiln.scope\n\
            0::/machine.slice/machine-kiln.scope\n";
        let scope = "machine.slice/machine-kiln.scope";
        let cg = legacy.of_membership(membership);
        assert_eq!(cg.memory, Some(root.path().join("memory").join(scope)));
        assert_eq!(cg.cpu, Some(root.path().join("cpu").join(scope)));
        assert_eq!(cg.io, None, "no blkio hierarchy here");
        let unified = Layout::Unified("/sys/fs/cgroup".into());
        let cg = unified.of_membership(membership);
        assert!(cg.unified);
        assert_eq!(cg.memory, Some(Path::new("/sys/fs/cgroup").join(scope)));
        assert_eq!(
            unified.of_membership(""),
            VmCgroup {
                unified: true,
                ..VmCgroup::default()
            }
        );
        // Our own process, for real: some cgroup, and one that exists.
        let mine = Layout::detect(Path::new("/sys/fs/cgroup")).of_process(std::process::id());
        if let Some(dir) = mine.memory_dir() {
            assert!(dir.exists(), "{}", dir.display());
        }
    }

    #[test]
    fn v1_limits_are_written_in_v1_units() {
        let root = legacy_tree();
        let layout = Layout::detect(root.path());
        assert!(matches!(layout, Layout::Legacy { blkio: None, .. }));
        let cg = layout.vm("kiln", "vm1");
        let limits = CgroupLimits {
            memory_bytes: 300 << 20,
            milli_cpus: Some(500),
            cpu_weight: Some(200),
            io_weight: Some(500),
        };
        let skipped = cg.create(&limits).unwrap();
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join("kiln/vm1").join(f)).unwrap()
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu", "cpu.shares"), "2048");
        // No blkio hierarchy: reported, not fatal.
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        cg.attach(42).unwrap();
        // The fake tree has no cgroup.procs: the pid goes to `tasks`.
        assert_eq!(read("memory", "tasks"), "42");
    }

    #[test]
    fn v2_is_one_directory_with_its_own_names() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        let layout = Layout::detect(root.path());
        assert_eq!(layout, Layout::Unified(root.path().to_path_buf()));
        layout.prepare("kiln").unwrap();
        let cg = layout.vm("kiln", "vm2");
        cg.create(&CgroupLimits {
            memory_bytes: 1 << 30,
            milli_cpus: Some(2000),
            cpu_weight: None,
            io_weight: Some(50),
        })
        .unwrap();
        let dir = root.path().join("kiln/vm2");
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "200000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("io.weight")).unwrap(),
            "default 50"
        );
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.current"), "12345\n").unwrap();
        let usage = cg.usage();
        assert_eq!((usage.oom_kills, usage.memory_bytes), (1, 12345));
    }

    #[test]
    fn without_a_memory_controller_there_is_no_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::detect(root.path());
        assert_eq!(layout, Layout::Unavailable);
        let cg = layout.vm("kiln", "x");
        assert!(!cg.exists());
        assert!(cg.create(&CgroupLimits::default()).unwrap().is_empty());
        assert_eq!(cg.usage(), CgroupUsage::default());
    }
}
