//! Kiln's test kit: the fixtures and helpers the integration tests of every
//! crate share, so each exists once.
//!
//! - [`wait_until`]: poll a condition until a deadline instead of sleeping a
//!   fixed time; a timeout names what was awaited and what was seen last.
//! - [`require_root`], [`skip`]: a test that cannot run here says so, and
//!   fails instead when `CI` is set (`.ci/run`).
//! - [`Sandbox`], [`Kilnd`], [`Daemon`], [`PrivateBus`], [`Netns`],
//!   [`FakeHost`]: fixtures that tear down what they started (kilnd, QEMU
//!   processes, dbus-daemon, namespaces, temp dirs) on drop, also when the
//!   test panics.
//! - [`NotifySocket`]: systemd's `NOTIFY_SOCKET`, played for kilnd.
//! - [`busctl`]: kilnd on a private bus ([`busctl::DbusKilnd`]) driven by
//!   `busctl`, and `busctl monitor` for error names and signals.
//! - [`containerd::Containerd`]: a real containerd of the test's own
//!   (root, state, sockets in a temp dir), driven with `ctr`, for the
//!   containerd shim's tests; or with its CRI plugin on, CNI pod networking
//!   and itself inside a network namespace of the test's own.
//! - [`oci`], [`registry`]: OCI test images built byte by byte from
//!   busybox-static, and a real `docker-registry` on 127.0.0.1 ([`Registry`],
//!   killed on drop) fed by `skopeo`.
//! - [`os_image`]: an OS image (`boot: "image"`): the GPU guest's generic
//!   kernel and modules, and the host's systemd as `/sbin/init`.
//!
//! It drives Kiln from outside, like a user: binaries, sockets, files,
//! `varlinkctl`. It links none of the Kiln crates.

// Test support: failing loudly with a message is its whole job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod busctl;
mod ci;
pub mod containerd;
mod dbus;
mod docs;
pub mod fdclient;
mod gpu;
mod kilnd;
mod netns;
mod notify;
pub mod oci;
pub mod os_image;
mod process;
pub mod registry;
mod varlink;
mod wait;

use std::path::{Path, PathBuf};

pub use ci::{in_ci, require_root, skip};
pub use dbus::PrivateBus;
pub use docs::{api_doc_script, run_bash};
pub use gpu::{FakeGpu, FakeHost};
pub use kilnd::{kilnd_exe, Kilnd};
pub use netns::{random_hex, Netns};
pub use notify::{has_line, NotifySocket};
pub use process::{
    command_as, kill_qemus_under, pid_alive, rss_kib, run, Sandbox, TEST_CGROUP_PARENT,
};
pub use registry::Registry;
pub use varlink::{
    json_seq, varlinkctl_call, varlinkctl_more, varlinkctl_ok, Daemon, VarlinkStream,
};
pub use wait::{try_wait_until, wait_until, wait_until_async, Poll, TimedOut};

/// The workspace's root directory.
pub fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Where `make guest` put the guest image: `KILN_GUEST_DIR`, else
/// `$CARGO_TARGET_DIR/guest` (default `target/guest`), which must hold it.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_GUEST_DIR") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = target.join("guest");
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initramfs").is_file(),
        "guest image missing in {}: run `make guest` first",
        dir.display()
    );
    dir
}
