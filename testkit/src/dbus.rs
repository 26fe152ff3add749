//! A private, real `dbus-daemon` for D-Bus API tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A session-type bus on `<dir>/bus.sock` where anyone may own any name
/// and eavesdrop (for `busctl monitor`).
const BUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=@DIR@/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"#;

/// A `dbus-daemon` of the test's own, listening in `dir`; killed on drop.
#[derive(Debug)]
pub struct PrivateBus {
    child: Child,
    address: String,
}

impl PrivateBus {
    /// Start it with its config in `dir/bus.conf`; returns once it listens.
    pub fn start(dir: &Path) -> Self {
        let conf = dir.join("bus.conf");
        std::fs::write(&conf, BUS_CONF.replace("@DIR@", &dir.display().to_string())).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // It prints its address once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
        Self { child, address }
    }

    /// The bus address (`unix:path=...`), for `busctl --address=` and kilnd's `dbus =`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// SIGKILL the dbus-daemon now, as a bus that crashes, and reap it:
    /// every connection to it is gone when this returns.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.kill();
    }
}
