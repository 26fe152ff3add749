//! A fabricated GPU host: a sysfs tree (`class/drm/renderD*` links into
//! `devices/pci…`, vendor/device/numa files, driver and subsystem links)
//! and a `/dev/dri` with real character device nodes made by `mknod`
//! (root only).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// One fake GPU; `None` leaves that sysfs file out.
#[derive(Debug, Clone)]
pub struct FakeGpu {
    pub index: u32,
    pub pci: &'static str,
    pub vendor: Option<&'static str>,
    pub device: Option<&'static str>,
    pub driver: Option<&'static str>,
    pub numa: Option<&'static str>,
}

impl FakeGpu {
    /// An NVIDIA card on NUMA node 0.
    pub fn nvidia(index: u32, pci: &'static str) -> Self {
        Self {
            index,
            pci,
            vendor: Some("0x10de"),
            device: Some("0x2204"),
            driver: Some("nvidia"),
            numa: Some("0"),
        }
    }

    /// An AMD card without NUMA affinity (-1).
    pub fn amd(index: u32, pci: &'static str) -> Self {
        Self {
            index,
            pci,
            vendor: Some("0x1002"),
            device: Some("0x73bf"),
            driver: Some("amdgpu"),
            numa: Some("-1"),
        }
    }
}

/// `<root>/sys` and `<root>/dev` of a fabricated host; a temp root goes
/// away with the fixture, also when a test fails.
#[derive(Debug)]
pub struct FakeHost {
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl FakeHost {
    /// A host with empty `sys/class/drm` and `dev/dri`, in a temp dir.
    pub fn new() -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut host = Self::in_dir(temp.path());
        host._temp = Some(temp);
        host
    }

    /// The same in `root` (created if missing), which the caller owns.
    pub fn in_dir(root: &Path) -> Self {
        fs::create_dir_all(root.join("sys/class/drm")).expect("class/drm");
        fs::create_dir_all(root.join("dev/dri")).expect("dev/dri");
        // Children running as other uids must reach the nodes.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self {
            root: root.to_owned(),
            _temp: None,
        }
    }

    /// A host without any DRM: no class/drm, no /dev/dri.
    pub fn bare() -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(temp.path().join("sys/class")).expect("class");
        fs::create_dir_all(temp.path().join("dev")).expect("dev");
        Self {
            root: temp.path().to_owned(),
            _temp: Some(temp),
        }
    }

    pub fn sysfs(&self) -> PathBuf {
        self.root.join("sys")
    }

    pub fn dev(&self) -> PathBuf {
        self.root.join("dev")
    }

    pub fn node_path(&self, index: u32) -> PathBuf {
        self.dev().join(format!("dri/renderD{index}"))
    }

    /// The sysfs side of a GPU, as the kernel lays it out:
    /// devices/pci0000:00/<pci>/{vendor,device,numa_node,driver,subsystem,drm/renderD<N>/dev}
    /// and class/drm/renderD<N> -> ../../devices/pci0000:00/<pci>/drm/renderD<N>.
    pub fn add_sysfs(&self, gpu: &FakeGpu) {
        let sys = self.sysfs();
        let pci_dir = sys.join("devices/pci0000:00").join(gpu.pci);
        let name = format!("renderD{}", gpu.index);
        let drm_dir = pci_dir.join("drm").join(&name);
        fs::create_dir_all(&drm_dir).expect("drm dir");
        fs::write(drm_dir.join("dev"), format!("226:{}\n", gpu.index)).expect("dev");
        symlink(format!("../../../{}", gpu.pci), drm_dir.join("device")).expect("device link");
        let write = |file: &str, value: Option<&str>| {
            if let Some(v) = value {
                fs::write(pci_dir.join(file), format!("{v}\n")).expect(file);
            }
        };
        write("vendor", gpu.vendor);
        write("device", gpu.device);
        write("numa_node", gpu.numa);
        if let Some(driver) = gpu.driver {
            let drv = sys.join("bus/pci/drivers").join(driver);
            fs::create_dir_all(&drv).expect("driver dir");
            symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                pci_dir.join("driver"),
            )
            .expect("driver link");
        }
        fs::create_dir_all(sys.join("bus/pci")).expect("bus");
        symlink("../../../bus/pci", pci_dir.join("subsystem")).expect("subsystem link");
        fs::create_dir_all(sys.join("class/drm")).expect("class/drm");
        symlink(
            format!("../../devices/pci0000:00/{}/drm/{name}", gpu.pci),
            sys.join("class/drm").join(&name),
        )
        .expect("class link");
    }

    /// The /dev side: a character device 226:<index> (DRM's numbers; no
    /// driver behind it here, so opening it gives ENXIO).
    pub fn add_node(&self, index: u32) {
        self.mknod(&self.node_path(index), 226, index, 0o660);
    }

    /// Both sides of `gpu`.
    pub fn add(&self, gpu: &FakeGpu) {
        self.add_sysfs(gpu);
        self.add_node(gpu.index);
    }

    /// Unplug: the class link, the device directory and the node go.
    pub fn remove(&self, index: u32) {
        let link = self
            .sysfs()
            .join("class/drm")
            .join(format!("renderD{index}"));
        if let Ok(drm_dir) = fs::canonicalize(&link) {
            // <pci>/drm/renderD<N> -> <pci>
            if let Some(pci_dir) = drm_dir.parent().and_then(Path::parent) {
                let _ = fs::remove_dir_all(pci_dir);
            }
        }
        let _ = fs::remove_file(&link);
        let _ = fs::remove_file(self.node_path(index));
    }

    /// A character device `major:minor` at `path` with exactly `mode`.
    pub fn mknod(&self, path: &Path, major: u32, minor: u32, mode: u32) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let c = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | mode,
                libc::makedev(major, minor),
            )
        };
        assert_eq!(
            rc,
            0,
            "mknod {} (needs root): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        // mknod's mode is filtered by the umask: set it exactly.
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}
