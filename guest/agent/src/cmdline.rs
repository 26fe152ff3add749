//! Agent settings from the kernel command line (`/proc/cmdline`), the one
//! place a host configures a guest before the agent answers:
//!
//! - `kiln.max_containers=N` (1 to [`LIMIT_MAX_CONTAINERS`]): containers the
//!   guest runs at once; default [`DEFAULT_MAX_CONTAINERS`].
//! - `kiln.container_modules=boot`: load the container modules (SCSI, erofs,
//!   overlay) at boot instead of on the first `StartContainer`; for
//!   templates whose clones will get images attached.
//!
//! Unknown `kiln.*` keys and bad values are logged and ignored: a typo must
//! not keep a guest from booting.

use kiln_agent_proto::{DEFAULT_MAX_CONTAINERS, LIMIT_MAX_CONTAINERS};

use crate::log;

/// Settings the agent reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// Most containers at once.
    pub max_containers: usize,
    /// Load the container modules before serving.
    pub container_modules_at_boot: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            max_containers: DEFAULT_MAX_CONTAINERS,
            container_modules_at_boot: false,
        }
    }
}

impl BootOptions {
    /// Reads `/proc/cmdline`; defaults when it cannot be read.
    pub fn from_proc() -> Self {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let (options, complaints) = parse(&cmdline);
        for complaint in complaints {
            log::error!("kernel command line: {complaint}");
        }
        options
    }
}

/// Options from a command line, and what was wrong with it.
pub fn parse(cmdline: &str) -> (BootOptions, Vec<String>) {
    let mut options = BootOptions::default();
    let mut complaints = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let Some(setting) = word.strip_prefix("kiln.") else {
            continue;
        };
        let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
        match key {
            "max_containers" => match value.parse::<usize>() {
                Ok(n) if (1..=LIMIT_MAX_CONTAINERS).contains(&n) => options.max_containers = n,
                _ => complaints.push(format!(
                    "kiln.max_containers={value}: not 1 to {LIMIT_MAX_CONTAINERS}; ignored"
                )),
            },
            "container_modules" => match value {
                "boot" => options.container_modules_at_boot = true,
                "demand" => options.container_modules_at_boot = false,
                _ => complaints.push(format!(
                    "kiln.container_modules={value}: not boot or demand; ignored"
                )),
            },
            _ => complaints.push(format!("unknown setting kiln.{key}; ignored")),
        }
    }
    (options, complaints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_kiln_settings() {
        let (options, complaints) = parse("console=ttyS0 quiet panic=-1\n");
        assert_eq!(options, BootOptions::default());
        assert!(complaints.is_empty());
    }

    #[test]
    fn reads_both_settings() {
        let (options, complaints) =
            parse("quiet kiln.max_containers=3 kiln.container_modules=boot");
        assert_eq!(options.max_containers, 3);
        assert!(options.container_modules_at_boot);
        assert!(complaints.is_empty());
    }

    #[test]
    fn ignores_bad_values_and_unknown_keys() {
        let (options, complaints) = parse(
            "kiln.max_containers=0 kiln.max_containers=65 kiln.max_containers=x \
             kiln.container_modules=later kiln.colour=blue kiln.max_containers",
        );
        assert_eq!(options, BootOptions::default());
        assert_eq!(complaints.len(), 6, "{complaints:?}");
    }
}
