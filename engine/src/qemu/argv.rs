//! Typed QEMU command line.
//!
//! [`QemuLaunch`] says what a VM needs; [`QemuLaunch::argv`] is the only
//! place that knows QEMU's option syntax. Golden files under
//! `engine/src/qemu/golden/` pin the exact argv; regenerate them with
//! `KILN_UPDATE_GOLDEN=1 cargo test -p kiln-engine golden` after a deliberate
//! change and review the diff.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::accel::Accel;
use crate::container::DiskAttachment;

/// Machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `microvm` with ACPI (virtio-mmio devices discovered through ACPI, since
    /// Debian's kernels lack `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    Microvm,
    /// `q35`: PCIe, for GPUs and NIC hotplug.
    Q35,
}

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// Anonymous memory (a plain VM).
    Anonymous,
    /// A file mapped shared: the template being built writes its RAM there.
    TemplateSource(PathBuf),
    /// A template's RAM file mapped privately (copy-on-write): the clone
    /// shares every page it does not write.
    TemplateClone(PathBuf),
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A TAP whose descriptor QEMU inherits as this fd number.
    TapFd(i32),
    /// A hub port with nothing else on the hub: the device exists, frames
    /// go nowhere. Template VMs: the saved device state is what clones
    /// need, their TAP is theirs.
    Isolated,
}

/// One virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArgs {
    /// Backend.
    pub backend: NicBackend,
    /// MAC of the device (`02:…`).
    pub mac: String,
}

/// Everything QEMU is launched with.
#[derive(Debug, Clone)]
pub struct QemuLaunch {
    /// QEMU binary.
    pub binary: PathBuf,
    /// VM id; becomes the QEMU `-name` and process name, which is how a
    /// process is recognised as this VM's on re-adoption.
    pub vm_id: String,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// TCG translation cache size (MiB), ignored under KVM.
    pub tcg_tb_size_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Full kernel command line.
    pub cmdline: String,
    /// QMP socket (QEMU listens).
    pub qmp_socket: PathBuf,
    /// Guest agent socket (QEMU listens, bridged to the virtio-serial port).
    pub agent_socket: PathBuf,
    /// Serial console log.
    pub console_log: PathBuf,
    /// Pid file QEMU writes at start (found by reconcile if kilnd died
    /// before recording the pid).
    pub pid_file: PathBuf,
    /// Where guest RAM lives.
    pub memory: GuestMemory,
    /// Start with `-incoming defer`: state is loaded over QMP (clones).
    pub incoming: bool,
    /// GPU device and display options (from `kiln_gpu::qemu_args`); a
    /// `-display` here replaces Kiln's `-display none`.
    pub gpu: Vec<(String, String)>,
    /// NICs, `net0` first.
    pub nics: Vec<NicArgs>,
    /// Empty PCIe root ports `hp1`… for NICs attached later (q35 only).
    pub hotplug_slots: u8,
    /// Read-only layer disks on the SCSI controller from the start: a VM's
    /// containers' layers (so a template's clone has its template's disks,
    /// and a cold boot needs no hot-plug).
    pub disks: Vec<DiskAttachment>,
    /// The unprivileged user QEMU runs as (`crate::qemu_user`); None: as
    /// kilnd's own user. Not part of the argv.
    pub user: Option<crate::qemu_user::QemuUser>,
    /// `kernel` and `initrd` are files kilnd made under its state
    /// directory (an OS image's, `crate::os_boot`), to be shared read-only
    /// with the QEMU's user. Never for a caller's `kernel`/`initrd`: kilnd
    /// must not re-own a file a request names. Not part of the argv.
    pub boot_files_are_kilnds: bool,
    /// The kernel (only) is one kilnd made: the built-in guest's, unpacked
    /// for direct boot (module `guest_kernel`), shared with QEMU's user.
    pub kernel_is_kilnds: bool,
    /// The cgroup QEMU goes into, with its limits, made and joined while
    /// QEMU starts (by the real VMM); None: it stays in kilnd's. Not
    /// part of the argv.
    pub cgroup: Option<(crate::cgroup::VmCgroup, crate::cgroup::CgroupLimits)>,
}

/// QEMU ids of hot-plugged NIC `index` (1-based): the root port it goes
/// into, its netdev, its device and the name of its TAP descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugIds {
    /// `pcie-root-port` id (`hp<index>`).
    pub port: String,
    /// `-netdev`/`netdev_add` id (`net<index>`).
    pub netdev: String,
    /// `device_add` id (`nic<index>`).
    pub device: String,
    /// `getfd` name of the TAP (`tap<index>`).
    pub fd: String,
}

impl HotplugIds {
    /// The ids of NIC `index`.
    pub fn of(index: u8) -> Self {
        Self {
            port: format!("hp{index}"),
            netdev: format!("net{index}"),
            device: format!("nic{index}"),
            fd: format!("tap{index}"),
        }
    }
}

/// The bus of the virtio-scsi controller every VM has (`scsi0`): image
/// layers are hot-plugged into it as `scsi-hd` devices.
pub const SCSI_BUS: &str = "scsi0.0";

/// Name of the process (and `-name`) of a VM: lets `ps` and re-adoption
/// recognise it.
pub fn process_name(vm_id: &str) -> String {
    format!("kiln-{vm_id}")
}

impl QemuLaunch {
    /// The kernel command line Kiln always uses, before the caller's extra part.
    pub const BASE_CMDLINE: &'static str = "console=ttyS0 quiet panic=-1 reboot=t";

    /// Whether QEMU may get transparent huge pages. Not when guest RAM is
    /// a template's file: then QEMU's anonymous memory is only its own,
    /// small and sparse (the TCG code buffer, ROM-sized RAM blocks), and a
    /// 2 MiB page faulted in for a few KiB of it is waste in every clone:
    /// 2.3 MiB of PSS per idle clone, 30.3 -> 27.9 MiB at N = 8, with
    /// clones no slower (docs/benchmarks.md, "What an idle clone's PSS is
    /// made of"). Anonymous guest RAM keeps them: under KVM its huge pages
    /// are what the guest's TLB reach rests on.
    pub fn transparent_huge_pages(&self) -> bool {
        matches!(self.memory, GuestMemory::Anonymous)
    }

    /// The argv, binary first.
    pub fn argv(&self) -> Vec<OsString> {
        let mut args = Args::default();
        args.push(self.binary.clone());
        let name = process_name(&self.vm_id);
        args.pair("-name", format!("{name},process={name}"));
        let mut machine = match self.machine {
            // Under TCG the emulated 8259 PIC and 8254 PIT keep QEMU's main
            // loop waking ~40 times a second in an idle guest: an idle VM
            // cost 5.7 % of a core with them, 0.4 % without (raw QEMU, 30 s,
            // docs/benchmarks.md "Idle CPU"). The guest needs neither: its
            // devices interrupt through the IO-APIC and its timer is the
            // local APIC. The PIT was only needed to calibrate the TSC,
            // which `tsc_early_khz` (accel::tcg_kernel_args) now gives; a
            // guest without that hint keeps both. Under KVM they are in
            // the kernel and cost nothing.
            Machine::Microvm
                if self.accel == Accel::Tcg && self.cmdline.contains("tsc_early_khz=") =>
            {
                "microvm,acpi=on,pit=off,pic=off".to_owned()
            }
            Machine::Microvm => "microvm,acpi=on".to_owned(),
            Machine::Q35 => "q35".to_owned(),
        };
        let memory_file = match &self.memory {
            GuestMemory::Anonymous => None,
            GuestMemory::TemplateSource(path) => Some((path, "on")),
            // The file opened read-only (a clone may not write its
            // template, and under its own uid cannot), mapped private and
            // writable: copy-on-write guest RAM (`rom=off`).
            GuestMemory::TemplateClone(path) => Some((path, "off,readonly=on,rom=off")),
        };
        // Always a named backend: its RAM block is "ram" whatever backs
        // it, so a VM's saved state loads into a snapshot's file-backed RAM
        // (without it the block is "<machine>.ram" and migration refuses).
        machine.push_str(",memory-backend=ram");
        args.pair("-machine", machine);
        match self.accel {
            Accel::Kvm => {
                args.pair("-accel", "kvm");
                args.pair("-cpu", "host");
            }
            Accel::Tcg => {
                args.pair("-accel", format!("tcg,tb-size={}", self.tcg_tb_size_mib));
                args.pair("-cpu", "max");
            }
        }
        args.pair("-smp", self.vcpus.to_string());
        args.pair("-m", format!("{}M", self.memory_mib));
        match memory_file {
            Some((path, share)) => {
                let mut object = OsString::from(format!(
                    "memory-backend-file,id=ram,size={}M,share={share},mem-path=",
                    self.memory_mib
                ));
                object.push(path_arg("", path));
                args.pair("-object", object);
            }
            None => args.pair(
                "-object",
                format!("memory-backend-ram,id=ram,size={}M", self.memory_mib),
            ),
        }
        if matches!(self.memory, GuestMemory::TemplateSource(_)) {
            // Saved without the run state ("paused"), a template's clone
            // starts running by itself once its state is loaded (QEMU's
            // autostart): no `cont` round trip, no polling for the end of
            // the load (pool/template.rs).
            args.pair("-global", "migration.store-global-state=off");
        }
        args.flag("-nodefaults");
        args.flag("-no-user-config");
        if !self.gpu.iter().any(|(option, _)| option == "-display") {
            args.pair("-display", "none");
        }
        for (option, value) in &self.gpu {
            args.pair(option, value.clone());
        }
        // Appended to, so kilnd can cut it back while QEMU writes
        // (`process::bound_console_log`).
        args.pair(
            "-chardev",
            path_arg("file,id=console,append=on,path=", &self.console_log),
        );
        args.pair("-serial", "chardev:console");
        args.pair("-kernel", self.kernel.clone());
        args.pair("-initrd", self.initrd.clone());
        args.pair("-append", self.cmdline.clone());
        let (serial_bus, rng, scsi) = match self.machine {
            Machine::Microvm => (
                "virtio-serial-device",
                "virtio-rng-device",
                "virtio-scsi-device",
            ),
            Machine::Q35 => ("virtio-serial-pci", "virtio-rng-pci", "virtio-scsi-pci"),
        };
        // Two ports: the agent's (1) and 0, which QEMU keeps for a console.
        // The default of 31 costs every QEMU 2.6 MiB of heap (62 unused
        // virtqueues and their element arrays), a tenth of an idle
        // clone's PSS (docs/benchmarks.md, "What an idle clone's PSS is
        // made of").
        args.pair("-device", format!("{serial_bus},max_ports=2"));
        args.pair(
            "-chardev",
            path_arg(
                "socket,id=agent,server=on,wait=off,path=",
                &self.agent_socket,
            ),
        );
        args.pair(
            "-device",
            format!(
                "virtserialport,chardev=agent,name={}",
                kiln_agent_proto::PORT_NAME
            ),
        );
        args.pair("-device", rng);
        // Every VM (and so every template) has the controller, so that a
        // clone can be given an image's disks after it is restored: a
        // device cannot be added to a saved state, a disk to a bus can.
        // The guest loads virtio_scsi only when a container needs it.
        args.pair("-device", format!("{scsi},id=scsi0"));
        for disk in &self.disks {
            let read_only = if disk.writable { "off" } else { "on" };
            let mut node = OsString::from(format!(
                "driver=raw,node-name={},read-only={read_only},file.driver=file,file.read-only={read_only},",
                disk.node
            ));
            node.push(path_arg("file.filename=", &disk.path));
            args.pair("-blockdev", node);
            args.pair(
                "-device",
                format!(
                    "scsi-hd,bus={SCSI_BUS},scsi-id={},lun={},serial={},drive={},id={}",
                    disk.target, disk.lun, disk.serial, disk.node, disk.device
                ),
            );
        }
        let nic_device = match self.machine {
            Machine::Microvm => "virtio-net-device",
            Machine::Q35 => "virtio-net-pci",
        };
        for (i, nic) in self.nics.iter().enumerate() {
            let netdev = match nic.backend {
                NicBackend::TapFd(fd) => format!("tap,id=net{i},fd={fd}"),
                NicBackend::Isolated => format!("hubport,id=net{i},hubid={i}"),
            };
            args.pair("-netdev", netdev);
            // No `VIRTIO_NET_F_GUEST_ANNOUNCE`: QEMU would ask a restored
            // guest to announce itself once per round after the load,
            // work that took a fresh clone's agent step from 52 to 84 ms
            // (its template's MAC, too); a clone announces its own MAC and
            // address when the agent sets them (`arp_notify`). A snapshot
            // saved with the feature on does not load without it.
            args.pair(
                "-device",
                format!(
                    "{nic_device},netdev=net{i},mac={},guest_announce=off",
                    nic.mac
                ),
            );
        }
        if self.machine == Machine::Q35 {
            // One root port per slot: native PCIe hot-plug works per port,
            // so each NIC can be unplugged alone.
            for index in 1..=self.hotplug_slots {
                args.pair(
                    "-device",
                    format!(
                        "pcie-root-port,id={},bus=pcie.0,chassis={index}",
                        HotplugIds::of(index).port
                    ),
                );
            }
            // A fresh generation id per launch: clones get a new one, and
            // guests that support it reseed their RNG (microvm has no ACPI
            // table for it).
            args.pair("-device", "vmgenid");
        }
        args.pair(
            "-chardev",
            path_arg("socket,id=qmp,server=on,wait=off,path=", &self.qmp_socket),
        );
        args.pair("-mon", "chardev=qmp,mode=control");
        args.pair("-pidfile", self.pid_file.clone());
        if self.incoming {
            args.pair("-incoming", "defer");
        }
        // No spawning helpers, no privilege changes, no obsolete syscalls.
        args.pair(
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        );
        args.0
    }
}

/// QEMU option values are comma-separated; a comma inside a path is
/// written doubled.
fn path_arg(prefix: &str, path: &std::path::Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.to_string_lossy().replace(',', ",,"));
    s
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, a: impl Into<OsString>) {
        self.0.push(a.into());
    }
    fn flag(&mut self, f: &str) {
        self.push(f);
    }
    fn pair(&mut self, opt: &str, value: impl Into<OsString>) {
        self.push(opt);
        self.push(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(machine: Machine, accel: Accel) -> QemuLaunch {
        let run = PathBuf::from("/run/kiln/vms/0123456789ab");
        QemuLaunch {
            binary: "qemu-system-x86_64".into(),
            vm_id: "0123456789ab".into(),
            machine,
            accel,
            tcg_tb_size_mib: 32,
            vcpus: 2,
            memory_mib: 256,
            kernel: "/usr/lib/kiln/guest/vmlinuz".into(),
            initrd: "/usr/lib/kiln/guest/initramfs".into(),
            cmdline: format!("{} kiln.extra=1", QemuLaunch::BASE_CMDLINE),
            qmp_socket: run.join("qmp.sock"),
            agent_socket: run.join("agent.sock"),
            console_log: run.join("console,log"),
            pid_file: run.join("qemu.pid"),
            memory: GuestMemory::Anonymous,
            incoming: false,
            gpu: Vec::new(),
            nics: Vec::new(),
            hotplug_slots: 0,
            disks: Vec::new(),
            user: None,
            boot_files_are_kilnds: false,
            kernel_is_kilnds: false,
            cgroup: None,
        }
    }

    fn check_golden(name: &str, launch: &QemuLaunch) {
        let got: String = launch
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned() + "\n")
            .collect();
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/qemu/golden")
            .join(name);
        if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).expect("write golden");
        }
        let want =
            std::fs::read_to_string(&path).expect("golden file (KILN_UPDATE_GOLDEN=1 to create)");
        assert_eq!(got, want, "argv differs from {}", path.display());
    }

    #[test]
    fn a_tcg_microvm_with_a_tsc_hint_has_no_pic_or_pit() {
        let machine = |launch: &QemuLaunch| {
            let argv = launch.argv();
            let at = argv.iter().position(|a| a == "-machine").expect("-machine");
            argv[at + 1].to_string_lossy().into_owned()
        };
        let mut tcg = launch(Machine::Microvm, Accel::Tcg);
        assert!(
            !machine(&tcg).contains("pit=off"),
            "no hint: the PIT calibrates"
        );
        tcg.cmdline.push_str(" tsc_early_khz=2400000");
        assert!(machine(&tcg).starts_with("microvm,acpi=on,pit=off,pic=off,"));
        let mut kvm = launch(Machine::Microvm, Accel::Kvm);
        kvm.cmdline.push_str(" tsc_early_khz=2400000");
        assert!(!machine(&kvm).contains("pic=off"), "in-kernel under KVM");
    }

    #[test]
    fn golden_microvm_tcg() {
        check_golden("microvm-tcg.args", &launch(Machine::Microvm, Accel::Tcg));
    }

    #[test]
    fn golden_q35_kvm() {
        check_golden("q35-kvm.args", &launch(Machine::Q35, Accel::Kvm));
    }

    #[test]
    fn golden_q35_tcg_virtio_gpu() {
        let mut l = launch(Machine::Q35, Accel::Tcg);
        l.gpu = kiln_gpu::qemu_args(&kiln_gpu::GpuDevice::Virtio2d).expect("args");
        check_golden("q35-tcg-virtio-gpu.args", &l);
    }

    #[test]
    fn golden_q35_kvm_virgl() {
        let mut l = launch(Machine::Q35, Accel::Kvm);
        let device = kiln_gpu::GpuDevice::Virgl {
            render_node: "/dev/dri/renderD128".into(),
            options: kiln_gpu::VirglOptions::default(),
        };
        l.gpu = kiln_gpu::qemu_args(&device).expect("args");
        check_golden("q35-kvm-virgl.args", &l);
    }

    #[test]
    fn golden_template_source_and_clone() {
        let ram = PathBuf::from("/var/lib/kiln/templates/default/0a1b/memory");
        let mut source = launch(Machine::Microvm, Accel::Tcg);
        source.memory = GuestMemory::TemplateSource(ram.clone());
        check_golden("microvm-tcg-template.args", &source);
        let mut clone = launch(Machine::Microvm, Accel::Tcg);
        clone.memory = GuestMemory::TemplateClone(ram);
        clone.incoming = true;
        check_golden("microvm-tcg-clone.args", &clone);
        // Huge pages only where guest RAM is QEMU's anonymous memory.
        assert!(launch(Machine::Microvm, Accel::Kvm).transparent_huge_pages());
        assert!(!source.transparent_huge_pages() && !clone.transparent_huge_pages());
        // A per-image template's clone: its layers on the command line.
        clone.disks = (0..2)
            .map(|lun| {
                DiskAttachment::layer(
                    0,
                    lun,
                    format!("/var/lib/kiln/images/erofs/l{lun}.erofs").into(),
                )
            })
            .collect();
        check_golden("microvm-tcg-clone-image.args", &clone);
    }

    #[test]
    fn golden_nics() {
        let mut l = launch(Machine::Microvm, Accel::Tcg);
        l.nics = vec![NicArgs {
            backend: NicBackend::TapFd(3),
            mac: "02:6b:01:02:03:04".into(),
        }];
        check_golden("microvm-tcg-tap.args", &l);
        let mut t = launch(Machine::Q35, Accel::Kvm);
        t.nics = vec![NicArgs {
            backend: NicBackend::Isolated,
            mac: "02:6b:00:00:00:01".into(),
        }];
        check_golden("q35-kvm-template-nic.args", &t);
        let mut h = launch(Machine::Q35, Accel::Tcg);
        h.nics = vec![NicArgs {
            backend: NicBackend::TapFd(3),
            mac: "02:6b:01:02:03:04".into(),
        }];
        h.hotplug_slots = 2;
        check_golden("q35-tcg-hotplug.args", &h);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let argv = launch(Machine::Microvm, Accel::Tcg).argv();
        assert!(
            argv.iter()
                .any(|a| a
                    == "file,id=console,append=on,path=/run/kiln/vms/0123456789ab/console,,log")
        );
    }
}
