//! The QEMU command-line fragment of a VM with a GPU.
//!
//! [`qemu_args`] returns `(option, value)` pairs for the engine's argv
//! builder. Option names were checked against QEMU 10.0 (Debian
//! `1:10.0.13+ds-0+deb13u1`): `-device help`, `-display help`,
//! `-device virtio-gpu-gl-pci,help`; a test re-checks them against the
//! installed QEMU. The GL device and the `egl-headless` display are QEMU
//! modules that Debian ships in `qemu-system-modules-opengl`, not in
//! `qemu-system-x86` (docs/gpu.md).
//!
//! What the engine must know besides the pairs:
//!
//! - every variant is a PCI device: the VM needs the `q35` machine
//!   ([`GpuDevice::needs_pci`]);
//! - the pairs include `-display`: they replace the `-display none` of a
//!   plain VM (QEMU has one display; a later `-display` overrides);
//! - virgl renders on the host through the single render node of that one
//!   display, so a QEMU VM can use one leased node
//!   ([`QEMU_MAX_RENDER_NODES`]); more would need one vhost-user-gpu
//!   process per node;
//! - Venus makes virglrenderer start `virgl_render_server`, which
//!   `-sandbox …,spawn=deny` forbids ([`GpuDevice::needs_spawn`]).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::lease::GpuLease;

/// Render nodes one QEMU process can use (one `egl-headless` display).
pub const QEMU_MAX_RENDER_NODES: usize = 1;

/// Options of the virgl device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirglOptions {
    /// Vulkan through Venus (`venus=on`); implies `blob` and a host memory
    /// window.
    pub venus: bool,
    /// Blob resources (`blob=on`), needed by Venus and zero-copy paths.
    pub blob: bool,
    /// Size of the host-visible memory window in MiB (`hostmem=`); Venus
    /// needs one, QEMU's docs suggest 256 MiB to 8 GiB.
    pub hostmem_mib: Option<u64>,
}

impl VirglOptions {
    /// Host memory window used for Venus when none is given.
    pub const DEFAULT_VENUS_HOSTMEM_MIB: u64 = 1024;
}

/// The GPU device of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuDevice {
    /// 2D `virtio-gpu-pci`: a framebuffer and a DRM device in the guest,
    /// no host GPU and no lease (display-only guests, tests).
    Virtio2d,
    /// `virtio-gpu-gl-pci` rendering through virglrenderer on a leased
    /// host render node, with a headless EGL display on that node.
    Virgl {
        /// The host render node (`/dev/dri/renderD128`).
        render_node: PathBuf,
        /// Device options.
        options: VirglOptions,
    },
}

impl GpuDevice {
    /// The virgl device on the node of `leases` (exactly one lease).
    pub fn virgl(leases: &[GpuLease], options: VirglOptions) -> Result<Self, QemuGpuError> {
        match leases {
            [lease] => Ok(Self::Virgl {
                render_node: lease.path.clone(),
                options,
            }),
            [] => Err(QemuGpuError::NoRenderNode),
            more => Err(QemuGpuError::TooManyRenderNodes { count: more.len() }),
        }
    }

    /// Whether the device needs a PCI machine (`q35`): always, today.
    pub fn needs_pci(&self) -> bool {
        true
    }

    /// Whether QEMU must be allowed to spawn processes (Venus starts
    /// `virgl_render_server`; the engine drops `spawn=deny` from
    /// `-sandbox` then).
    pub fn needs_spawn(&self) -> bool {
        matches!(self, Self::Virgl { options, .. } if options.venus)
    }
}

/// Errors building the fragment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QemuGpuError {
    /// A virgl device without a leased node.
    #[error("a virgl GPU needs one leased render node, got none")]
    NoRenderNode,
    /// More nodes than one QEMU can use.
    #[error("QEMU can render on one render node per VM, {count} were leased")]
    TooManyRenderNodes {
        /// Leased nodes.
        count: usize,
    },
    /// A path QEMU cannot take as an option value.
    #[error("render node path {path:?} is not valid UTF-8")]
    BadPath {
        /// The path.
        path: PathBuf,
    },
}

/// The `(option, value)` pairs for `device`, in order.
pub fn qemu_args(device: &GpuDevice) -> Result<Vec<(String, String)>, QemuGpuError> {
    let pair = |o: &str, v: String| (o.to_owned(), v);
    match device {
        GpuDevice::Virtio2d => Ok(vec![
            pair("-device", "virtio-gpu-pci".into()),
            pair("-display", "none".into()),
        ]),
        GpuDevice::Virgl {
            render_node,
            options,
        } => {
            let mut dev = String::from("virtio-gpu-gl-pci");
            let blob = options.blob || options.venus;
            if blob {
                dev.push_str(",blob=on");
            }
            let hostmem = options.hostmem_mib.or(options
                .venus
                .then_some(VirglOptions::DEFAULT_VENUS_HOSTMEM_MIB));
            if let Some(mib) = hostmem {
                dev.push_str(&format!(",hostmem={mib}M"));
            }
            if options.venus {
                dev.push_str(",venus=on");
            }
            Ok(vec![
                pair("-device", dev),
                pair(
                    "-display",
                    format!("egl-headless,rendernode={}", escape(render_node)?),
                ),
            ])
        }
    }
}

/// QEMU option values are comma-separated; a comma in a path is doubled.
fn escape(path: &Path) -> Result<String, QemuGpuError> {
    path.to_str()
        .map(|s| s.replace(',', ",,"))
        .ok_or_else(|| QemuGpuError::BadPath {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::DevNum;
    use crate::lease::LeaseMode;

    fn lease(n: u32) -> GpuLease {
        GpuLease {
            vm_id: "vm".into(),
            node: format!("renderD{n}"),
            path: format!("/dev/dri/renderD{n}").into(),
            dev: DevNum {
                major: 226,
                minor: n,
            },
            mode: LeaseMode::Exclusive,
            vendor_id: None,
            pci_address: None,
        }
    }

    #[test]
    fn virgl_needs_exactly_one_lease() {
        assert_eq!(
            GpuDevice::virgl(&[], VirglOptions::default()),
            Err(QemuGpuError::NoRenderNode)
        );
        assert_eq!(
            GpuDevice::virgl(&[lease(128), lease(129)], VirglOptions::default()),
            Err(QemuGpuError::TooManyRenderNodes { count: 2 })
        );
        let dev = GpuDevice::virgl(&[lease(129)], VirglOptions::default()).expect("one");
        assert_eq!(
            dev,
            GpuDevice::Virgl {
                render_node: "/dev/dri/renderD129".into(),
                options: VirglOptions::default()
            }
        );
        assert!(dev.needs_pci());
        assert!(!dev.needs_spawn());
    }

    #[test]
    fn venus_needs_spawn() {
        let venus = GpuDevice::Virgl {
            render_node: "/dev/dri/renderD128".into(),
            options: VirglOptions {
                venus: true,
                ..VirglOptions::default()
            },
        };
        assert!(venus.needs_spawn());
        assert!(!GpuDevice::Virtio2d.needs_spawn());
    }

    #[test]
    fn commas_in_the_node_path_are_doubled() {
        let dev = GpuDevice::Virgl {
            render_node: "/tmp/a,b/renderD128".into(),
            options: VirglOptions::default(),
        };
        let args = qemu_args(&dev).expect("args");
        assert_eq!(args[1].1, "egl-headless,rendernode=/tmp/a,,b/renderD128");
    }
}
