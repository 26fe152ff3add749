//! kilnd on a private, real `dbus-daemon`, driven with the real `busctl`
//! (and `varlinkctl` for parity); `busctl monitor` for what `busctl`
//! itself does not print: error names and signals.

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::json_output;
use crate::{command_as, varlinkctl_call, wait_until, Kilnd, PrivateBus};

/// kilnd's bus name.
pub const NAME: &str = "io.kiln.Kiln1";
/// The Manager's object path.
pub const MANAGER: &str = "/io/kiln/Kiln1/Manager";
/// The Manager's interface.
pub const MANAGER_IF: &str = "io.kiln.Kiln1.Manager";
/// The VM objects' interface.
pub const VM_IF: &str = "io.kiln.Kiln1.VM";
/// The pool objects' interface.
pub const POOL_IF: &str = "io.kiln.Kiln1.Pool";

/// A private dbus-daemon and a kilnd on it, in a temp dir; everything
/// (kilnd, its QEMUs, then the bus) is SIGKILLed on drop.
#[derive(Debug)]
pub struct DbusKilnd {
    /// kilnd, with its varlink socket too.
    pub kilnd: Kilnd,
    /// The bus.
    pub bus: PrivateBus,
    /// The bus address, for `busctl --address=`.
    pub address: String,
}

impl DbusKilnd {
    /// kilnd on a private bus, asking polkit on it when `polkit`.
    pub fn start(polkit: bool) -> Self {
        Self::start_with(polkit, "")
    }

    /// [`DbusKilnd::start`] with extra kilnd.toml lines.
    pub fn start_with(polkit: bool, extra_config: &str) -> Self {
        let kilnd = Kilnd::new(extra_config);
        let bus = PrivateBus::start(kilnd.dir.path());
        let address = bus.address().to_owned();
        kilnd.append_config(&format!("dbus = \"{address}\"\npolkit = {polkit}\n"));
        // Two render nodes (a tree made with mknod), for the GPU objects.
        kilnd.add_fake_gpus();
        let mut kiln = Self {
            kilnd,
            bus,
            address,
        };
        kiln.spawn_kilnd();
        kiln
    }

    /// Start kilnd (again); returns once its Manager answers.
    pub fn spawn_kilnd(&mut self) {
        let address = self.bus.address().to_owned();
        self.kilnd.spawn(|_| manager_answers(&address));
    }

    /// kilnd's log so far.
    pub fn log(&self) -> String {
        self.kilnd.log()
    }

    /// `busctl --json=short -- ARGS` as `uid`.
    pub fn busctl_as(&self, uid: Option<u32>, args: &[&str]) -> Output {
        let mut command = command_as(uid, "busctl");
        // `--` so arguments like `-c` are not taken for busctl options.
        // A method call may take longer than busctl's own 25 s (a reboot
        // under TCG next to other tests); nextest bounds every test.
        command
            .arg(format!("--address={}", self.address))
            .args(["--json=short", "--timeout=300", "--"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `busctl --json=short -- ARGS` as ourselves.
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.busctl_as(None, args)
    }

    /// `busctl` with text output (`tree`, `introspect`).
    pub fn busctl_text(&self, args: &[&str]) -> String {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "busctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `busctl call` that must succeed; returns the reply's `data`.
    pub fn call(&self, path: &str, iface: &str, method: &str, args: &[&str]) -> Value {
        let mut all = vec!["call", NAME, path, iface, method];
        all.extend_from_slice(args);
        let out = self.busctl(&all);
        assert!(
            out.status.success(),
            "{method} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str::<Value>(text.trim()).unwrap()["data"].clone()
    }

    /// `busctl call` that must fail; returns busctl's stderr.
    pub fn call_err(
        &self,
        uid: Option<u32>,
        path: &str,
        iface: &str,
        method: &str,
        args: &[&str],
    ) -> String {
        let mut all = vec!["call", NAME, path, iface, method];
        all.extend_from_slice(args);
        let out = self.busctl_as(uid, &all);
        assert!(!out.status.success(), "{method} {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A property's value (`data`), which must be readable.
    pub fn prop(&self, path: &str, iface: &str, name: &str) -> Value {
        let out = self.busctl(&["get-property", NAME, path, iface, name]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<Value>(String::from_utf8_lossy(&out.stdout).trim()).unwrap()["data"]
            .clone()
    }

    /// A VM object's `State`.
    pub fn state(&self, path: &str) -> String {
        self.prop(path, VM_IF, "State").as_str().unwrap().to_owned()
    }

    /// `CreateVM` with `spec` as (key, type, value) triples; the path.
    pub fn create(&self, name: &str, spec: &[&str]) -> String {
        let mut args = vec!["sa{sv}", name];
        let count = (spec.len() / 3).to_string();
        args.push(&count);
        args.extend_from_slice(spec);
        self.call(MANAGER, MANAGER_IF, "CreateVM", &args)[0]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `ListVMs`.
    pub fn list(&self) -> Vec<String> {
        serde_json::from_value(self.call(MANAGER, MANAGER_IF, "ListVMs", &[])[0].clone()).unwrap()
    }

    /// `busctl tree --list`.
    pub fn tree(&self) -> String {
        self.busctl_text(&["tree", "--list", NAME])
    }

    /// Wait until `busctl tree` satisfies `want`. While objects come and go
    /// (a pool's VMs being destroyed) a walk can fail on a path that
    /// vanished between listing and introspecting it; that is retried.
    pub fn wait_tree(&self, what: &str, want: impl Fn(&str) -> bool) {
        wait_until(Duration::from_secs(30), what, || {
            let out = Command::new("busctl")
                .arg(format!("--address={}", self.address))
                .args(["tree", "--list", NAME])
                .output()
                .unwrap();
            let tree = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && want(&tree) {
                Ok(())
            } else {
                Err(tree)
            }
        });
    }

    /// The introspection XML of `path`.
    pub fn introspect_xml(&self, path: &str) -> String {
        self.busctl_text(&["introspect", "--xml-interface", NAME, path])
    }

    /// `io.kiln.Manager.<method>` over varlink, which must succeed.
    pub fn varlinkctl(&self, method: &str, params: Value) -> Value {
        self.varlink(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e:?}\n{}", self.log()))
    }

    /// `io.kiln.Manager.<method>` over varlink: the reply, or the error's
    /// full name and parameters.
    pub fn varlink(&self, method: &str, params: Value) -> Result<Value, (String, Value)> {
        varlinkctl_call(
            None,
            &self.kilnd.varlink_address(),
            &format!("io.kiln.Manager.{method}"),
            &params.to_string(),
        )
    }

    /// `busctl monitor` of everything to and from kilnd, ready once it
    /// has seen a probe call.
    pub fn monitor(&self) -> Monitor {
        let mut child = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(["monitor", "--json=short", NAME])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let rx = json_output(&mut child);
        let mut monitor = Monitor { child, rx };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.prop(MANAGER, MANAGER_IF, "Accel");
            let probe = |m: &Value| m["member"] == "Get" && m["type"] == "method_call";
            if monitor
                .try_find(Duration::from_millis(300), probe)
                .is_some()
            {
                return monitor;
            }
            assert!(Instant::now() < deadline, "busctl monitor never saw a call");
        }
    }
}

/// Whether kilnd's Manager answers on the bus at `address`.
pub fn manager_answers(address: &str) -> bool {
    Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(["get-property", NAME, MANAGER, MANAGER_IF, "Version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Messages seen by `busctl monitor`, killed on drop.
#[derive(Debug)]
pub struct Monitor {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Monitor {
    /// The next message `want` accepts within `timeout`.
    pub fn try_find(&mut self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(m) if want(&m) => return Some(m),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next message `want` accepts; panics naming `what` after 30 s.
    pub fn find(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        self.try_find(Duration::from_secs(30), want)
            .unwrap_or_else(|| panic!("busctl monitor never saw {what}"))
    }

    /// The next error reply's name.
    pub fn error_name(&mut self) -> String {
        self.find("an error", |m| m["type"] == "error")["error_name"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
