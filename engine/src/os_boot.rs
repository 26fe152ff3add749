//! VMs that boot their image as a whole OS (`VMSpec.boot: "image"`,
//! docs/images.md "OS images").
//!
//! The VM boots the image's own kernel with an initramfs made for it:
//! Kiln's initramfs, then the image's kernel modules (the store's
//! [`kiln_image::BootFiles`]), then [`OS_ROOT_CONFIG`] — the kernel unpacks
//! the three archives in order, later files over earlier ones. The agent
//! starts as PID 1, loads those modules, mounts the image's layer disks
//! and the writable layer as an overlay exactly as for a container, then
//! forks: the child stays the agent (chrooted into the new root), PID 1
//! moves the root into place and execs the image's init. So `ExecVM`,
//! files, identity and network set-up keep working beside, say, systemd.
//!
//! The image's layers are the VM's container `main` (slot 0) in its
//! record, so their disks, image user and writable disk follow the same
//! paths as any container's; only its start differs.

use std::path::Path;

use kiln_agent_proto::{ContainerProcess, OS_ROOT_CONFIG};
use kiln_image::newc::Archive;
use kiln_image::ProcessConfig;

use crate::container::{merge_env, ContainerRecord, ContainerSpec};

/// Modules (of the image's kernel) the initramfs loads, with their
/// dependencies: device discovery on `microvm`, the agent's and the
/// layers' devices, the file systems of the root. Names the image's
/// `modules.dep` does not list are taken as built in. `crc32c_generic`
/// first: erofs (through libcrc32c) and ext4 ask the crypto API for
/// crc32c when they load, a soft dependency `modules.dep` does not name,
/// and nothing in the initramfs could load it on demand.
pub const OS_MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_mmio",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "virtio_balloon",
    "virtio_scsi",
    "sd_mod",
    "erofs",
    "overlay",
    "ext4",
];

/// The init an OS image runs when the spec names none.
pub const DEFAULT_INIT: &str = "/sbin/init";

/// The file name of a VM's own initramfs, in its disks directory.
pub const INITRAMFS_FILE: &str = "os-initramfs";

/// The init process of an OS image: `entrypoint` + `command` when the spec
/// gives them (an image's `Cmd` is usually a shell for `docker run`, not an
/// init, so it is not used), else [`DEFAULT_INIT`]; the image's `Env` with
/// the spec's merged over it (the agent also writes it to
/// `/etc/environment`).
pub fn init_process(spec: &ContainerSpec, image: &ProcessConfig) -> ContainerProcess {
    let args: Vec<String> = spec
        .entrypoint
        .iter()
        .flatten()
        .chain(spec.command.iter().flatten())
        .cloned()
        .collect();
    let env = merge_env(&image.env, &spec.env);
    ContainerProcess {
        args: if args.is_empty() {
            vec![DEFAULT_INIT.into()]
        } else {
            args
        },
        env,
        cwd: None,
        user: None,
        terminal: None,
        stdin: false,
    }
}

/// The VM's initramfs: Kiln's (`kiln_initrd`), the image's modules
/// fragment, and the OS root config for `main`, concatenated (the caller
/// writes it atomically).
pub fn initramfs(
    kiln_initrd: &Path,
    modules_cpio: &Path,
    main: &ContainerRecord,
) -> std::io::Result<Vec<u8>> {
    let config = serde_json::to_vec_pretty(&main.start_request()).map_err(std::io::Error::other)?;
    let mut archive = Archive::new();
    let relative = OS_ROOT_CONFIG.trim_start_matches('/');
    archive.parents(relative);
    archive.file(relative, 0o644, &config);
    let mut bytes = std::fs::read(kiln_initrd)?;
    for part in [std::fs::read(modules_cpio)?, archive.finish()] {
        // Each archive starts on a 4-byte boundary (newc pads within one).
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend_from_slice(&part);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ProcessConfig {
        ProcessConfig {
            entrypoint: vec![],
            cmd: vec!["/bin/bash".into()],
            env: vec!["PATH=/usr/bin".into(), "LANG=C".into()],
            working_dir: None,
            user: None,
        }
    }

    #[test]
    fn the_test_os_image_carries_every_module_kiln_loads() {
        // testkit links no Kiln crate, so its image lists them again.
        let mut ours = OS_MODULES.to_vec();
        let mut image = kiln_testkit::os_image::MODULES.to_vec();
        ours.sort_unstable();
        image.sort_unstable();
        assert_eq!(ours, image);
    }

    #[test]
    fn the_init_is_sbin_init_unless_named_and_env_merges() {
        let spec = ContainerSpec {
            name: "main".into(),
            image: "os".into(),
            env: vec!["LANG=C.UTF-8".into(), "GREETING=hi".into()],
            ..ContainerSpec::default()
        };
        let p = init_process(&spec, &image());
        assert_eq!(p.args, [DEFAULT_INIT], "the image's Cmd is not an init");
        assert_eq!(p.env, ["PATH=/usr/bin", "LANG=C.UTF-8", "GREETING=hi"]);
        let named = ContainerSpec {
            command: Some(vec![
                "/lib/systemd/systemd".into(),
                "--log-level=debug".into(),
            ]),
            ..spec
        };
        assert_eq!(
            init_process(&named, &image()).args,
            ["/lib/systemd/systemd", "--log-level=debug"]
        );
    }
}
