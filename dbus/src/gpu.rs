//! `io.kiln.Kiln1.Gpu`: one object per host render node at
//! `/io/kiln/Kiln1/gpu/<name>` (names are `renderD<N>`: valid path
//! elements), properties only, mirrored from the engine like VMs and pools.

use std::sync::Arc;

use kiln_engine::GpuInfo;
use tokio::sync::watch;
use zbus::interface;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::mirror::{Context, Mirror};
use crate::names::{gpu_path, GPU_INTERFACE};

/// One exported render node.
#[derive(Debug)]
pub struct Gpu {
    view: Arc<watch::Sender<GpuInfo>>,
}

impl Mirror for Gpu {
    type Info = GpuInfo;
    const INTERFACE: &'static str = GPU_INTERFACE;

    fn new_object(info: GpuInfo, _context: &Context) -> Self {
        Self {
            view: Arc::new(watch::Sender::new(info)),
        }
    }
    fn view(&self) -> Arc<watch::Sender<GpuInfo>> {
        self.view.clone()
    }
    fn path(info: &GpuInfo) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
        gpu_path(&info.node.name)
    }
    fn properties(info: &GpuInfo) -> Vec<(&'static str, Value<'static>)> {
        vec![
            ("Name", Value::from(info.node.name.clone())),
            ("Path", Value::from(path(info))),
            ("Vendor", Value::from(vendor(info))),
            ("Device", Value::from(device(info))),
            ("Driver", Value::from(driver(info))),
            ("PciAddress", Value::from(pci_address(info))),
            ("Usable", Value::from(info.node.usable)),
            ("VmIds", Value::from(info.usage.vm_ids.clone())),
            ("FreeSlots", Value::from(info.usage.free_slots)),
        ]
    }
}

fn path(info: &GpuInfo) -> String {
    info.node.path.to_string_lossy().into_owned()
}
fn vendor(info: &GpuInfo) -> String {
    info.node
        .vendor_id
        .map(|v| v.to_string())
        .unwrap_or_default()
}
fn device(info: &GpuInfo) -> String {
    info.node
        .device_id
        .map(|v| v.to_string())
        .unwrap_or_default()
}
fn driver(info: &GpuInfo) -> String {
    info.node.driver.clone().unwrap_or_default()
}
fn pci_address(info: &GpuInfo) -> String {
    info.node.pci_address.clone().unwrap_or_default()
}

impl Gpu {
    fn info(&self) -> watch::Ref<'_, GpuInfo> {
        self.view.borrow()
    }
}

#[interface(name = "io.kiln.Kiln1.Gpu")]
impl Gpu {
    /// `renderD128`.
    #[zbus(property)]
    fn name(&self) -> String {
        self.info().node.name.clone()
    }

    /// `/dev/dri/renderD128`.
    #[zbus(property)]
    fn path(&self) -> String {
        path(&self.info())
    }

    /// PCI vendor id (`0x10de`; "" = unknown).
    #[zbus(property)]
    fn vendor(&self) -> String {
        vendor(&self.info())
    }

    /// PCI device id ("" = unknown).
    #[zbus(property)]
    fn device(&self) -> String {
        device(&self.info())
    }

    /// Kernel driver ("" = unknown).
    #[zbus(property)]
    fn driver(&self) -> String {
        driver(&self.info())
    }

    /// PCI address ("" = not a PCI device).
    #[zbus(property)]
    fn pci_address(&self) -> String {
        pci_address(&self.info())
    }

    /// Whether it can be leased.
    #[zbus(property)]
    fn usable(&self) -> bool {
        self.info().node.usable
    }

    /// VMs holding it.
    #[zbus(property)]
    fn vm_ids(&self) -> Vec<String> {
        self.info().usage.vm_ids.clone()
    }

    /// How many more VMs could lease it.
    #[zbus(property)]
    fn free_slots(&self) -> u32 {
        self.info().usage.free_slots
    }
}
