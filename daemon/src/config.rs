//! `kilnd.toml`: the engine's keys plus the daemon's own, at the top level.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kiln_engine::EngineConfig;
use serde::{Deserialize, Serialize};

/// Where kilnd looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kiln/kilnd.toml";

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    /// Engine keys (`state_dir`, `runtime_dir`, `accel`, …).
    #[serde(flatten)]
    pub engine: EngineConfig,
    /// Daemon keys.
    #[serde(flatten)]
    pub daemon: DaemonKeys,
}

/// Keys only the daemon reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonKeys {
    /// Stop every VM when kilnd is asked to exit (SIGTERM, SIGINT). Off by
    /// default: VMs outlive the daemon and are re-adopted when it comes
    /// back. kilnd exiting on a failure always keeps them, for the restart
    /// to re-adopt.
    pub stop_vms_on_exit: bool,
    /// Log filter (`RUST_LOG` syntax) when `RUST_LOG` is not set.
    pub log_level: String,
    /// varlink socket kilnd binds when systemd passes none.
    pub varlink_socket: PathBuf,
    /// Members of this group may call mutating varlink methods (root and
    /// the daemon's own user always may).
    pub manage_group: String,
    /// D-Bus: `system`, `session`, `none` or a bus address. An unreachable
    /// system bus is only a warning (dev machines have none); any other
    /// unreachable bus fails startup.
    pub dbus: String,
    /// Ask polkit (`io.kiln.manage`) before mutating D-Bus calls. Off (tests,
    /// private buses): only root and kilnd's own user may change things.
    pub polkit: bool,
    /// Also serve metrics over HTTP on this TCP address (e.g.
    /// `127.0.0.1:9464`); they are always served on `<runtime_dir>/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for DaemonKeys {
    fn default() -> Self {
        Self {
            stop_vms_on_exit: false,
            log_level: "info".into(),
            varlink_socket: "/run/kiln/io.kiln.Manager".into(),
            manage_group: "kiln".into(),
            dbus: "system".into(),
            polkit: true,
            metrics_listen: None,
        }
    }
}

impl DaemonConfig {
    /// Load `path`, or the defaults when `path` is the default location and
    /// does not exist. Unknown keys are an error (serde cannot deny unknown
    /// fields across `flatten`, so we compare keys ourselves).
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (path, explicit): (PathBuf, bool) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (DEFAULT_CONFIG_PATH.into(), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parse config text strictly.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        let config: Self = toml::Value::Table(table.clone()).try_into()?;
        let known = toml::Table::try_from(&config)?;
        let unknown: Vec<&String> = table.keys().filter(|k| !known.contains_key(*k)).collect();
        if !unknown.is_empty() {
            bail!(
                "unknown key(s): {}",
                unknown
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            DaemonConfig::parse("").expect("parse"),
            DaemonConfig::default()
        );
    }

    #[test]
    fn keys_of_both_parts_are_read() {
        let c = DaemonConfig::parse(
            "state_dir = \"/tmp/s\"\naccel = \"tcg\"\nstop_vms_on_exit = true\n",
        )
        .expect("parse");
        assert_eq!(c.engine.state_dir, PathBuf::from("/tmp/s"));
        assert!(c.daemon.stop_vms_on_exit);
    }

    #[test]
    fn image_keys_are_read_and_become_the_store_config() {
        let c = DaemonConfig::parse(
            "image_auth_file = \"/etc/kiln/auth.json\"\n\
             image_insecure_registries = [\"127.0.0.1:5000\"]\n\
             image_max_size_mib = 2\nmkfs_erofs = \"/usr/sbin/mkfs.erofs\"\n",
        )
        .expect("parse");
        let store = c.engine.image_store_config();
        assert_eq!(store.auth_file, Some(PathBuf::from("/etc/kiln/auth.json")));
        assert_eq!(store.insecure_registries, ["127.0.0.1:5000"]);
        assert_eq!(store.max_image_bytes, 2 << 20);
        assert_eq!(store.mkfs_erofs, PathBuf::from("/usr/sbin/mkfs.erofs"));
        // An empty list is a key like any other, not an unknown one.
        assert!(DaemonConfig::parse("image_insecure_registries = []\n").is_ok());
        assert_eq!(c.engine.images_dir(), PathBuf::from("/var/lib/kiln/images"));
    }

    #[test]
    fn metrics_listen_is_an_address() {
        let c = DaemonConfig::parse("metrics_listen = \"127.0.0.1:9464\"\n").expect("parse");
        assert_eq!(c.daemon.metrics_listen, Some(([127, 0, 0, 1], 9464).into()));
        assert_eq!(DaemonConfig::default().daemon.metrics_listen, None);
        assert!(DaemonConfig::parse("metrics_listen = \"localhost\"\n").is_err());
    }

    #[test]
    fn unknown_and_mistyped_keys_are_errors() {
        let err = DaemonConfig::parse("stat_dir = \"/tmp\"\n").expect_err("typo");
        assert!(err.to_string().contains("stat_dir"), "{err}");
        assert!(DaemonConfig::parse("accel = \"fast\"\n").is_err());
        assert!(DaemonConfig::parse("boot_timeout_sec = \"x\"\n").is_err());
    }
}
