//! Kiln's engine: everything kilnd does to VMs, with no IPC in sight.
//!
//! The D-Bus and varlink adapters (and tests) talk to one [`Engine`] actor
//! through an [`EngineHandle`]: each call is one [`Command`] with a typed
//! reply. The actor task owns every VM record; slow work (spawning QEMU,
//! waiting for the guest agent, stopping) runs in sub-tasks that report back
//! as internal events, so the actor never blocks.
//!
//! Module map (see `docs/architecture.md`):
//! - [`spec`]: what a caller may ask for, and its limits;
//! - [`container`]: containers in VMs: spec, record, layer disks;
//!   [`os_boot`]: VMs that boot their image as a whole OS;
//! - [`state`]: the VM state machine and its one transition check;
//! - [`qemu`]: typed QEMU argv, the QMP client, process handling;
//!   [`guest_kernel`]: the built-in guest's kernel unpacked for direct
//!   (PVH) boot;
//! - [`agent`]: the `io.kiln.Agent` client;
//! - [`store`]: crash-safe records on disk;
//! - [`api`]: the contract: commands, events, limits;
//! - `actor`: the one task that owns all state, one file per concern
//!   (VMs, pools with their templates, GPUs, network, NICs, reconcile) and
//!   the sub-task bodies it hands slow work to;
//! - [`vmm`]: the narrow port to the VMM (QEMU, or a fake in tests);
//! - [`images`]: stored OCI images and pull progress as callers see them
//!   (the store is `kiln-image`); [`access`]: whether a caller could read
//!   a path itself (for `ImportImage`);
//! - [`observe`]: what an observed [`EngineHandle`] tells of its calls
//!   (failures by error name, acquire times, image jobs), for kilnd's
//!   metrics.

pub mod accel;
pub mod access;
mod actor;
pub mod agent;
pub mod api;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod copy;
pub mod error;
pub mod guest_io;
pub mod guest_kernel;
pub mod ids;
pub mod images;
pub mod name;
pub mod observe;
pub mod os_boot;
pub mod pool;
pub mod process;
pub mod procfs;
pub mod qemu;
pub mod qemu_user;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod store;
pub mod stream;
pub mod vm;
pub mod vmm;

pub use accel::Accel;
pub use actor::Engine;
pub use api::{Command, EngineEvent, EngineHandle, GpuInfo, ImageJob, ImageRemoved};
pub use config::EngineConfig;
pub use error::EngineError;
pub use images::{ImageInfo, ImageProgress, ImageStep};
pub use pool::{PoolInfo, PoolMode, PoolSpec, PoolState};
pub use spec::VmSpec;
pub use state::VmState;
pub use vm::{NicInfo, VmInfo};

#[cfg(test)]
mod layout_tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// A source file's module path: `lib.rs` → [], `a.rs` and `a/mod.rs` →
    /// [a], `a/b.rs` → [a, b].
    fn module_path(file: &Path, src: &Path) -> Vec<String> {
        let rel = file.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
            .collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
            parts.pop();
        }
        parts
    }

    /// `crate::a::b` and `super::a` paths in `text`, as module paths
    /// relative to the crate root (lowercase segments only: items end them).
    fn references(text: &str, module: &[String]) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        for (start, _) in text
            .match_indices("crate::")
            .chain(text.match_indices("super::"))
        {
            let rest = &text[start..];
            let mut segments = rest.split("::");
            let root = segments.next().unwrap_or_default();
            let mut path: Vec<String> = match root {
                "crate" => Vec::new(),
                // `super` of a.rs or a/mod.rs (module [.., a]) is its parent.
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            for segment in segments {
                let ident: String = segment
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() || !ident.starts_with(|c: char| c.is_ascii_lowercase()) {
                    break;
                }
                path.push(ident);
                if segment.len() != path.last().map_or(0, String::len) {
                    break;
                }
            }
            found.push(path);
        }
        found
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// STYLE.md 14: at every level of the module tree, sibling modules
    /// (with everything under them) import each other along a DAG. A child
    /// using its parent's items, or a parent its children's, is not a cycle.
    #[test]
    fn sibling_modules_import_each_other_without_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(f, &src)).collect();
        // parent module -> sibling edges (from, to)
        let mut edges: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
        for file in &files {
            let from = module_path(file, &src);
            let text = std::fs::read_to_string(file).expect("read");
            for mut to in references(&text, &from) {
                while !to.is_empty() && !modules.contains(&to) {
                    to.pop();
                }
                let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
                if common == from.len() || common == to.len() {
                    continue; // an ancestor or a descendant
                }
                edges
                    .entry(from[..common].to_vec())
                    .or_default()
                    .insert((from[common].clone(), to[common].clone()));
            }
        }
        assert!(
            edges.get(&Vec::new()).is_some_and(|e| e.len() > 20),
            "{edges:?}"
        );
        for (parent, pairs) in &edges {
            let mut left: BTreeSet<&String> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
            while !left.is_empty() {
                let free: Vec<&String> = left
                    .iter()
                    .copied()
                    .filter(|m| !pairs.iter().any(|(a, b)| a == *m && left.contains(b)))
                    .collect();
                assert!(
                    !free.is_empty(),
                    "import cycle among the modules of crate::{}: {left:?} ({pairs:?})",
                    parent.join("::")
                );
                for m in free {
                    left.remove(m);
                }
            }
        }
    }
}
