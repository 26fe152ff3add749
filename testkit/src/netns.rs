//! A network namespace for one test: bridges, TAPs and nftables rules made
//! in it never touch the host, and go with it.

use std::path::PathBuf;
use std::process::Command;

/// A network namespace `kiln-t-<random>` with `lo` up, deleted on drop
/// (which also deletes every link in it, persistent TAPs included, once
/// nothing holds them).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!("kiln-t-{}", random_hex(4));
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add: {out:?}");
        let ns = Self { name };
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Its name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind mount, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `argv` to run inside the namespace (`ip netns exec`, which execs it).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Run `argv` inside the namespace: (success, stdout + stderr).
    pub fn run(&self, argv: &[&str]) -> (bool, String) {
        let out = self.command(argv).output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Run `argv` inside the namespace, which must succeed; its output.
    pub fn sh(&self, argv: &[&str]) -> String {
        let (ok, text) = self.run(argv);
        assert!(ok, "{argv:?} failed: {text}");
        text
    }

    /// `ip -br link` inside the namespace.
    pub fn links(&self) -> String {
        let out = self.command(&["ip", "-br", "link"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `bytes` random bytes from /dev/urandom, in hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
