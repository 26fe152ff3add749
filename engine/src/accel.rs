//! Accelerator choice (DESIGN.md §3).
//!
//! KVM only when it can really run a stock kernel: the CPU advertises
//! `vmx`/`svm` *and* `/dev/kvm` opens read-write. The development and CI
//! machines have a paravirtual `/dev/kvm` (PVM) that opens fine but hangs on
//! stock kernels; their CPUs show no `vmx`/`svm`, which is how we tell.

use serde::{Deserialize, Serialize};

/// Accelerator QEMU runs a VM with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (slow, works everywhere).
    Tcg,
}

/// The `accel` config key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when usable, else TCG with a warning.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// What the host offers, read once; split out so the decision is testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirt {
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub cpu_has_virt: bool,
    /// `/dev/kvm` opened read-write.
    pub kvm_opens: bool,
}

impl HostVirt {
    /// Probe this host.
    pub fn probe() -> Self {
        let cpu_has_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|info| cpuinfo_has_virt(&info))
            .unwrap_or(false);
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Self {
            cpu_has_virt,
            kvm_opens,
        }
    }
}

fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

impl AccelChoice {
    /// Resolve `auto` against the host; explicit choices are kept as given.
    pub fn resolve(self, host: HostVirt) -> Accel {
        match self {
            Self::Kvm => Accel::Kvm,
            Self::Tcg => Accel::Tcg,
            Self::Auto if host.cpu_has_virt && host.kvm_opens => Accel::Kvm,
            Self::Auto => {
                tracing::warn!(
                    cpu_has_virt = host.cpu_has_virt,
                    kvm_opens = host.kvm_opens,
                    "KVM is not usable here, falling back to TCG (slow)"
                );
                Accel::Tcg
            }
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_both_cpu_flags_and_dev_kvm() {
        let both = HostVirt {
            cpu_has_virt: true,
            kvm_opens: true,
        };
        let pvm = HostVirt {
            cpu_has_virt: false,
            kvm_opens: true,
        };
        let no_dev = HostVirt {
            cpu_has_virt: true,
            kvm_opens: false,
        };
        assert_eq!(AccelChoice::Auto.resolve(both), Accel::Kvm);
        assert_eq!(AccelChoice::Auto.resolve(pvm), Accel::Tcg);
        assert_eq!(AccelChoice::Auto.resolve(no_dev), Accel::Tcg);
        assert_eq!(AccelChoice::Tcg.resolve(both), Accel::Tcg);
        assert_eq!(AccelChoice::Kvm.resolve(pvm), Accel::Kvm);
    }

    #[test]
    fn cpuinfo_flags_are_matched_as_words() {
        assert!(cpuinfo_has_virt(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virt("flags : svm\n"));
        assert!(!cpuinfo_has_virt("flags : fpu vmxx hypervisor\n"));
        assert!(!cpuinfo_has_virt("model name : vmx\n"));
    }
}

/// Kernel arguments a TCG guest needs to boot reliably on a loaded host.
///
/// Under TCG the guest's TSC ticks at the host TSC's rate, but the guest
/// kernel's PIT-based calibration is timing-sensitive: with a few VMs
/// booting at once on 2 cores it fails ("Unable to calibrate against PIT")
/// and the guest hangs (measured). Telling it the rate skips calibration.
///
/// `tsc=reliable` too: the TSC under TCG is the host's, constant and
/// invariant, but the guest's clocksource watchdog checks it against
/// jiffies, which a loaded host delays; it then marks the TSC unstable and
/// falls back to the jiffies clocksource, whose periodic tick kept an idle
/// VM at ~250 timer interrupts a second, 4.7 % of a core (measured, a VM
/// booted beside a template build; docs/benchmarks.md "Idle CPU").
pub fn tcg_kernel_args() -> String {
    match host_tsc_khz() {
        Some(khz) => format!("tsc_early_khz={khz} tsc=reliable"),
        None => String::new(),
    }
}

/// The host TSC rate in kHz, measured once against CLOCK_MONOTONIC_RAW.
fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    #[allow(unused_unsafe)]
    // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it.
    let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(20));
    let (t1, c1) = (Instant::now(), rdtsc());
    let nanos = t1.duration_since(t0).as_nanos() as u64;
    let khz = c1.wrapping_sub(c0).saturating_mul(1_000_000) / nanos.max(1);
    // Anything outside 100 MHz..10 GHz is a measuring error: skip the hint.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tsc_tests {
    #[test]
    fn tcg_args_name_a_plausible_tsc_rate() {
        let args = super::tcg_kernel_args();
        let khz: u64 = args
            .strip_prefix("tsc_early_khz=")
            .and_then(|rest| rest.strip_suffix(" tsc=reliable"))
            .expect("x86_64 host")
            .parse()
            .expect("number");
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
    }
}
