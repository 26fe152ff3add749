//! `containerd-shim-kiln-v1`: containerd's shim v2 for Kiln. containerd
//! runs it per task (`start`, `delete`); it serves the task API over ttrpc
//! for a whole pod, whose VM it leases from kilnd and whose containers
//! run in it. A thin client of kilnd's varlink API: no VM logic here
//! (docs/kubernetes.md).
//!
//! Modules, leaves first: `config` (the shim's TOML and runtime options),
//! `spec` (config.json), `rootfs` (the snapshot's layer dirs), `state`
//! (exits, the bundle record), `stats`, `events`, `kiln` (calls, errors,
//! leases), `io` (stdio pumps), `task` (the task service), `service` (the
//! binary's actions).

mod config;
mod events;
mod io;
mod kiln;
mod rootfs;
mod service;
mod spec;
mod state;
mod stats;
mod task;

/// The runtime name containerd knows the shim by (`runtime_type`).
const RUNTIME_ID: &str = "io.containerd.kiln.v1";

fn main() {
    containerd_shim::run::<service::Service>(RUNTIME_ID, None);
}
