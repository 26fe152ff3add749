//! The real `kilnctl` binary against a real kilnd (and real QEMU, TCG
//! here): every subcommand, its tables and its `--json`, the exit code of
//! each error class, name and prefix resolution, `exec` passing the guest's
//! status on, images imported (from layouts built here from
//! busybox-static) and pulled (from a real `docker-registry`) with their
//! progress, containers run, exec'd into, followed and removed, the
//! completions in bash and the man pages through `man`.
//!
//! kilnd is the binary beside this test's (`target/<profile>/kilnd`), as
//! for kilnd's own tests: `cargo nextest run --workspace` (or
//! `-p kilnd -p kiln-ctl`) builds it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fails, json, kilnctl, kilnctl_as, ok, row, text, KILNCTL};
use kiln_testkit::oci::{busybox_layer, one_image};
use kiln_testkit::{
    require_root, skip, try_wait_until, wait_until, workspace_root, Daemon, Registry,
};
use serde_json::Value;

/// Everything that needs no running VM: status, create/list/show/rm,
/// references, pools that never fill, watch, and the exit code of each
/// error class.
#[test]
fn commands_tables_json_and_exit_codes_without_booting() {
    let mut d = Daemon::start();

    let status = ok(&d, &["status"]);
    assert!(status.contains("Version: "), "{status}");
    assert!(status.contains("    VMs: 0 (0 running)"), "{status}");
    let status = json(&d, &["status"]);
    assert_eq!(status["vms"], 0);
    assert!(status["version"].is_string() && status["accel"].is_string());
    // -o json is --json; --address takes unix:PATH and a plain path.
    let out = ok(&d, &["-o", "json", "--address", &d.address(), "status"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["vms"], 0);
    let path = d.address().trim_start_matches("unix:").to_owned();
    assert!(ok(&d, &["--address", &path, "status"]).contains("Version"));

    // create prints the id; list shows both; ls is list.
    let web = ok(&d, &["create", "web", "--memory", "256M", "--vcpus", "2"])
        .trim()
        .to_owned();
    assert_eq!(web.len(), 12, "{web}");
    let db = ok(&d, &["create", "db", "--spec", r#"{"memoryMiB": 128}"#])
        .trim()
        .to_owned();
    let table = ok(&d, &["ls"]);
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(
        row(&table, &web).unwrap()[..6],
        [web.as_str(), "web", "created", "-", "2", "256M"],
        "{table}"
    );
    assert_eq!(row(&table, &db).unwrap()[1..3], ["db", "created"]);
    assert_eq!(ok(&d, &["list"]), table);
    let listed = json(&d, &["ls"]);
    let vms = listed["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{listed}");
    assert!(vms
        .iter()
        .any(|v| v["id"] == web.as_str() && v["memoryMiB"] == 256));
    let quiet = ok(&d, &["ls", "-q"]);
    let mut ids: Vec<&str> = quiet.lines().collect();
    ids.sort();
    let mut want = vec![web.as_str(), db.as_str()];
    want.sort();
    assert_eq!(ids, want);

    // show: by id, by name, by a unique id prefix.
    let shown = ok(&d, &["show", "web"]);
    assert!(shown.contains(&format!("Id: {web}")), "{shown}");
    assert!(
        shown.contains("Memory: 256M") && shown.contains("State: created"),
        "{shown}"
    );
    assert_eq!(without_ages(&ok(&d, &["show", &web])), without_ages(&shown));
    let unique = (1..=12)
        .map(|n| &web[..n])
        .find(|p| !db.starts_with(p))
        .unwrap();
    assert_eq!(json(&d, &["show", unique])["vm"]["id"], web.as_str());
    assert_eq!(json(&d, &["show", "db"])["vm"]["name"], "db");

    // A prefix several ids share is refused, naming them: make VMs until
    // two ids share their first character (17 at most).
    let mut made = vec![web.clone(), db.clone()];
    let shared = loop {
        let first: Vec<char> = made.iter().map(|id| id.chars().next().unwrap()).collect();
        if let Some(c) = first
            .iter()
            .find(|c| first.iter().filter(|x| x == c).count() > 1)
        {
            break c.to_string();
        }
        let name = format!("filler{}", made.len());
        made.push(ok(&d, &["create", &name]).trim().to_owned());
    };
    let line = fails(
        &d,
        None,
        &["show", &shared],
        2,
        &format!("\"{shared}\" matches several VMs: "),
    );
    for id in made.iter().filter(|id| id.starts_with(&shared)) {
        assert!(line.contains(id.as_str()), "{line}");
    }
    let fillers: Vec<&str> = made[2..].iter().map(String::as_str).collect();
    if !fillers.is_empty() {
        let mut args = vec!["rm"];
        args.extend(&fillers);
        assert_eq!(ok(&d, &args), "", "rm prints nothing");
    }

    // Errors: one line, the error's name, the class's exit code.
    let line = fails(&d, None, &["show", "nope"], 3, "io.kiln.Manager.NoSuchVM");
    assert_eq!(
        line,
        "kilnctl: io.kiln.Manager.NoSuchVM: no VM with id nope\n"
    );
    fails(&d, None, &["start", "nope"], 3, "io.kiln.Manager.NoSuchVM");
    fails(
        &d,
        None,
        &["pool", "show", "nope"],
        3,
        "io.kiln.Manager.NoSuchPool",
    );
    fails(
        &d,
        None,
        &["acquire", "nope"],
        3,
        "io.kiln.Manager.NoSuchPool",
    );
    fails(
        &d,
        None,
        &["create", "web"],
        6,
        "io.kiln.Manager.AlreadyExists",
    );
    fails(
        &d,
        None,
        &["create", "no good"],
        6,
        "io.kiln.Manager.InvalidName",
    );
    fails(
        &d,
        None,
        &["create", "big", "--vcpus", "0"],
        6,
        "io.kiln.Manager.InvalidSpec",
    );
    fails(
        &d,
        None,
        &["pause", "web"],
        6,
        "io.kiln.Manager.InvalidState",
    );
    fails(
        &d,
        None,
        &["release", "web"],
        6,
        "io.kiln.Manager.InvalidState",
    );
    fails(
        &d,
        None,
        &["renew", "web", "--ttl", "0"],
        6,
        "io.kiln.Manager.",
    );
    fails(
        &d,
        None,
        &["create", "x", "--spec", "{"],
        2,
        "--spec: not JSON",
    );
    fails(
        &d,
        None,
        &["stop", "web", "--timeout", "1.5"],
        2,
        "--timeout takes whole seconds",
    );
    let bad = kilnctl(&d, &["frobnicate"]);
    assert_eq!(bad.status.code(), Some(2), "clap's usage error");
    let gone = kilnctl(&d, &["--address", "unix:/nonexistent/kiln", "ls"]);
    assert_eq!(gone.status.code(), Some(8));
    assert!(text(&gone.stderr).starts_with("kilnctl: cannot connect to /nonexistent/kiln"));
    // exec: the command never ran, so 125 (not a class code a guest
    // command could also exit with).
    fails(
        &d,
        None,
        &["exec", "nope", "--", "true"],
        125,
        "io.kiln.Manager.NoSuchVM",
    );
    fails(
        &d,
        None,
        &["exec", "web", "--", "true"],
        125,
        "io.kiln.Manager.InvalidState",
    );

    // A pool that keeps nothing hot answers a non-waiting acquire with
    // Timeout at once: no boot involved, so no race.
    ok(
        &d,
        &[
            "pool", "create", "idle", "--warm", "0", "--max", "1", "--mode", "cold",
        ],
    );
    let pools = ok(&d, &["pool", "ls"]);
    assert!(pools.starts_with("NAME "), "{pools}");
    assert_eq!(
        row(&pools, "idle").unwrap()[1..5],
        ["cold", "ready", "0", "1"],
        "{pools}"
    );
    let pools = json(&d, &["pool", "ls"]);
    assert_eq!(pools["pools"][0]["name"], "idle");
    fails(
        &d,
        None,
        &["acquire", "idle", "--timeout", "0"],
        5,
        "io.kiln.Manager.Timeout",
    );
    let shown = ok(&d, &["pool", "show", "idle"]);
    assert!(
        shown.contains("Mode: cold") && shown.contains("Max: 1"),
        "{shown}"
    );
    let resized = json(&d, &["pool", "resize", "idle", "0", "--max", "2"]);
    assert_eq!(resized["pool"]["max"], 2);
    assert_eq!(json(&d, &["pool", "rm", "idle"]), serde_json::json!({}));
    fails(
        &d,
        None,
        &["pool", "show", "idle"],
        3,
        "io.kiln.Manager.NoSuchPool",
    );

    // watch: one line per event, or one JSON object per line.
    let mut lines = Watcher::start(&d, &[]);
    let mut objects = Watcher::start(&d, &["--json"]);
    let id = ok(&d, &["create", "watched"]).trim().to_owned();
    ok(&d, &["rm", "watched"]);
    assert_eq!(
        lines.until("vmAdded"),
        format!("vmAdded {id} watched created")
    );
    assert_eq!(lines.until("vmRemoved"), format!("vmRemoved {id}"));
    let added: Value = serde_json::from_str(&objects.until("\"vmAdded\"")).unwrap();
    assert_eq!(added["event"]["vm"]["name"], "watched");
    let removed: Value = serde_json::from_str(&objects.until("\"vmRemoved\"")).unwrap();
    assert_eq!(removed["event"]["id"], id.as_str());
    // The stream ends with kilnd: exit 8, one line.
    d.sigkill();
    let (code, stderr) = lines.finish();
    assert_eq!(code, Some(8), "{stderr}");
    assert!(
        stderr.starts_with("kilnctl: connection to kilnd lost"),
        "{stderr}"
    );
    objects.finish();
}

/// `kilnctl watch` running in the background, its stdout a socket read
/// with a timeout.
struct Watcher {
    child: std::process::Child,
    out: BufReader<UnixStream>,
}

impl Watcher {
    /// Started, and past the stream's `ready` event.
    fn start(d: &Daemon, args: &[&str]) -> Self {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let child = Command::new(KILNCTL)
            .arg("watch")
            .args(args)
            .env("KILN_ADDRESS", d.address())
            .stdout(OwnedFd::from(theirs))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut watcher = Self {
            child,
            out: BufReader::new(ours),
        };
        watcher.until("ready");
        watcher
    }

    /// The next line that contains `want`.
    fn until(&mut self, want: &str) -> String {
        loop {
            let mut line = String::new();
            match self.out.read_line(&mut line) {
                Ok(n) if n > 0 && line.contains(want) => return line.trim_end().to_owned(),
                Ok(n) if n > 0 => continue,
                other => panic!("watch: no line with {want}: {other:?}"),
            }
        }
    }

    /// Its exit code and stderr once it ended (killed after 30 s).
    fn finish(mut self) -> (Option<i32>, String) {
        let status = try_wait_until(Duration::from_secs(30), || self.child.try_wait().unwrap());
        if status.is_err() {
            let _ = self.child.kill();
        }
        let out = self.child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stderr))
    }
}

/// Reading is open to anyone; changing needs root or the kiln group
/// (exit 4). GPUs from a fake sysfs (mknod needs root too).
#[test]
fn permissions_and_gpus() {
    if !require_root("setpriv to another uid, mknod for the fake GPUs") {
        return;
    }
    let mut d = Daemon::new("");
    d.kilnd.add_fake_gpus();
    d.spawn();
    let id = ok(&d, &["create", "owned"]).trim().to_owned();
    let nobody = Some(65534);
    let listed = kilnctl_as(&d, nobody, &["ls", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["vms"][0]["id"], id.as_str());
    for args in [
        &["rm", "owned"][..],
        &["start", "owned"],
        &["create", "intruder"],
        &["pool", "create", "p", "--warm", "0", "--max", "1"],
    ] {
        fails(&d, nobody, args, 4, "io.kiln.Manager.PermissionDenied");
    }
    fails(
        &d,
        nobody,
        &["exec", "owned", "--", "true"],
        125,
        "io.kiln.Manager.PermissionDenied",
    );
    assert_eq!(json(&d, &["ls"])["vms"].as_array().unwrap().len(), 1);

    let gpus = ok(&d, &["gpu", "ls"]);
    let nvidia = row(&gpus, "renderD128").unwrap_or_else(|| panic!("{gpus}"));
    assert_eq!(nvidia[1], "0x10de", "{gpus}");
    assert!(row(&gpus, "renderD129").is_some(), "{gpus}");
    let gpus = json(&d, &["gpu", "list"]);
    assert_eq!(gpus["gpus"].as_array().unwrap().len(), 2, "{gpus}");
}

/// The commands that need running VMs: one VM booted (and rebooted), one
/// template pool (one more boot; its members are clones).
#[test]
fn lifecycle_exec_pools_leases_and_nics() {
    let d = Daemon::start();

    // create --start, then the lifecycle verbs by name.
    let id = ok(&d, &["create", "vm1", "--start", "--memory", "128"])
        .trim()
        .to_owned();
    let shown = ok(&d, &["show", "vm1"]);
    assert!(
        shown.contains("State: ready") && shown.contains("Boot ID: "),
        "{shown}"
    );
    let boot_id = json(&d, &["show", &id])["vm"]["bootId"]
        .as_str()
        .unwrap()
        .to_owned();

    // exec itself (streams, stdin, signals, --json): ctl/tests/processes.rs.
    let out = kilnctl(
        &d,
        &["exec", &id[..6], "--", "sh", "-c", "echo out; exit 7"],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(7), "out\n".into())
    );

    assert_eq!(json(&d, &["pause", "vm1"])["vm"]["state"], "paused");
    assert!(ok(&d, &["show", "vm1"]).contains("State: paused"));
    ok(&d, &["resume", "vm1"]);
    ok(&d, &["reboot", "vm1"]);
    let rebooted = json(&d, &["show", "vm1"])["vm"].clone();
    assert_eq!(rebooted["state"], "ready");
    assert_ne!(rebooted["bootId"], boot_id.as_str(), "a new guest boot");

    // NICs: this VM has none; the API's refusals come through by class.
    let nics = ok(&d, &["nic", "ls", "vm1"]);
    assert_eq!(nics.lines().count(), 1, "header only: {nics}");
    assert!(nics.starts_with("INDEX"), "{nics}");
    assert_eq!(
        json(&d, &["nic", "list", "vm1"])["nics"],
        serde_json::json!([])
    );
    fails(&d, None, &["nic", "attach", "vm1"], 6, "io.kiln.Manager.");
    fails(
        &d,
        None,
        &["nic", "detach", "vm1", "1"],
        3,
        "io.kiln.Manager.NoSuchNIC",
    );

    assert_eq!(
        json(&d, &["stop", "vm1", "--timeout", "20"])["vm"]["state"],
        "stopped"
    );
    ok(&d, &["rm", "vm1"]);
    fails(&d, None, &["show", &id], 3, "io.kiln.Manager.NoSuchVM");

    // A template pool made with the CLI; leases with a lifetime and labels.
    ok(
        &d,
        &[
            "pool", "create", "ci", "--warm", "1", "--max", "3", "--memory", "128",
        ],
    );
    let pool = wait_pool(&d, "ci", |p| p["hot"] == 1 && p["booting"] == 0);
    assert_eq!(
        (pool["mode"].as_str(), pool["templateReady"].as_bool()),
        (Some("template"), Some(true))
    );
    let leased = ok(
        &d,
        &[
            "acquire",
            "ci",
            "--ttl",
            "60",
            "--label",
            "job=42",
            "--timeout",
            "2m",
        ],
    )
    .trim()
    .to_owned();
    let vm = json(&d, &["show", &leased])["vm"].clone();
    assert_eq!(
        (vm["state"].as_str(), vm["pool"].as_str()),
        (Some("leased"), Some("ci"))
    );
    assert_eq!(vm["labels"]["job"], "42");
    let shown = ok(&d, &["show", &leased]);
    assert!(
        shown.contains("Labels: job=42") && shown.contains("Lease ends: "),
        "{shown}"
    );
    let renewed = json(&d, &["renew", &leased, "--ttl", "10m"])["vm"].clone();
    assert!(renewed["leaseExpiresAt"].as_u64() > vm["leaseExpiresAt"].as_u64());
    let listed = ok(&d, &["ls"]);
    assert_eq!(
        row(&listed, &leased).unwrap()[2..4],
        ["leased", "ci"],
        "{listed}"
    );
    let out = kilnctl(&d, &["exec", &leased, "--", "hostname"]);
    assert_eq!(text(&out.stdout).trim(), vm["name"].as_str().unwrap());
    ok(&d, &["release", &leased]);
    fails(&d, None, &["show", &leased], 3, "io.kiln.Manager.NoSuchVM");

    // kill a leased VM, then give it back with --recycle: hot again.
    wait_pool(&d, "ci", |p| p["hot"] == 1 && p["booting"] == 0);
    let second = ok(&d, &["acquire", "ci"]).trim().to_owned();
    let killed = json(&d, &["kill", &second])["vm"].clone();
    assert_ne!(killed["state"], "ready", "{killed}");
    ok(&d, &["release", "--recycle", &second]);
    wait_pool(&d, "ci", |p| {
        p["leased"] == 0 && p["booting"] == 0 && p["hot"] == 1
    });
    ok(&d, &["pool", "resize", "ci", "0"]);
    ok(&d, &["pool", "rm", "ci"]);
    wait_until(Duration::from_secs(60), "the pool's VMs to go", || {
        json(&d, &["ls"])["vms"].as_array().unwrap().is_empty()
    });
}

/// `pool show` until `done` holds (boots take seconds under TCG).
fn wait_pool(d: &Daemon, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    try_wait_until(Duration::from_secs(240), || {
        let pool = json(d, &["pool", "show", name])["pool"].clone();
        if done(&pool) {
            Ok(pool)
        } else {
            Err(pool)
        }
    })
    .unwrap_or_else(|t| panic!("pool {name}: {t}\n{}", d.log()))
}

/// Tables fit `COLUMNS`, cutting names rather than ids; a pipe gets them
/// whole.
#[test]
fn tables_fit_the_width() {
    let d = Daemon::start();
    let long = "a-vm-with-a-name-far-too-long-for-a-narrow-terminal";
    let id = ok(&d, &["create", long]).trim().to_owned();
    let whole = ok(&d, &["ls"]);
    assert!(whole.contains(long), "{whole}");
    let narrow = Command::new(KILNCTL)
        .args(["ls"])
        .env("KILN_ADDRESS", d.address())
        .env("COLUMNS", "70")
        .output()
        .unwrap();
    let narrow = text(&narrow.stdout);
    for line in narrow.lines() {
        assert!(line.chars().count() <= 70, "{line:?}\n{narrow}");
    }
    assert!(narrow.contains(&id) && narrow.contains('…'), "{narrow}");
    // The name still resolves.
    assert_eq!(json(&d, &["show", long])["vm"]["id"], id.as_str());
}

/// Completions come from the same definition; bash loads them.
#[test]
fn completions_load() {
    let script = format!("source <({KILNCTL} completions bash) && complete -p kilnctl");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("-F _kilnctl"),
        "{}",
        text(&out.stdout)
    );
    // bash offers the subcommands and the pool verbs.
    let script = format!(
        "source <({KILNCTL} completions bash)\n\
         COMP_WORDS=(kilnctl pool c); COMP_CWORD=2; COMP_LINE='kilnctl pool c'; COMP_POINT=14\n\
         _kilnctl kilnctl c pool; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).lines().any(|l| l == "create"),
        "{}",
        text(&out.stdout)
    );
    for (shell, marker, check) in [
        ("zsh", "#compdef kilnctl", ["zsh", "-n"]),
        ("fish", "complete -c kilnctl", ["fish", "--no-execute"]),
    ] {
        let out = Command::new(KILNCTL)
            .args(["completions", shell])
            .output()
            .unwrap();
        let script = text(&out.stdout);
        assert!(
            out.status.success() && script.contains(marker),
            "{shell}: {script}"
        );
        // Checked by the shell itself where it is installed (not a
        // dependency: bash is the one every test host has).
        let file = tempfile_with(&script);
        if let Ok(out) = Command::new(check[0])
            .arg(check[1])
            .arg(file.path())
            .output()
        {
            assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        }
    }
    let out = Command::new(KILNCTL)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn tempfile_with(content: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(content.as_bytes()).unwrap();
    file
}

/// kilnctl(1) (generated), kilnd(8) and kilnd.toml(5) (written by hand)
/// render with `man` without a warning, as lintian checks them.
#[test]
fn man_pages_render_without_warnings() {
    if Command::new("man").arg("--version").output().is_err() {
        skip("man (man-db) is not installed; scripts/setup-host.sh installs it");
        return;
    }
    let out = Command::new(KILNCTL)
        .arg("__generate-man")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = tempfile_with(&text(&out.stdout));
    let root = workspace_root();
    for (page, must) in [
        (
            generated.path().to_owned(),
            ["kilnctl pool create", "EXIT STATUS"],
        ),
        (root.join("packaging/kilnd.8"), ["--config", "kilnctl"]),
        (
            root.join("packaging/kilnd.toml.5"),
            ["max_leases_per_caller", "[network]"],
        ),
    ] {
        let rendered = render_man(&page);
        for text in must {
            assert!(
                rendered.contains(text),
                "{}: no {text:?}\n{rendered}",
                page.display()
            );
        }
    }
}

/// `man -l` of a page as lintian runs it; panics on any warning.
fn render_man(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
        .arg(page)
        .env("LC_ALL", "C.UTF-8")
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}: {}",
        page.display(),
        text(&out.stderr)
    );
    let plain = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    assert!(
        plain.stderr.is_empty(),
        "{}: {}",
        page.display(),
        text(&plain.stderr)
    );
    text(&plain.stdout)
}

/// kilnd.toml(5) describes every key kilnd reads: the fields of the
/// config structs (engine, daemon, `[network]`) and the commented defaults
/// the packages install.
#[test]
fn kilnd_toml_page_names_every_key() {
    let root = workspace_root();
    let page = std::fs::read_to_string(root.join("packaging/kilnd.toml.5")).unwrap();
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let mut keys = Vec::new();
    for (file, structs) in [
        ("engine/src/config.rs", &["EngineConfig"][..]),
        ("daemon/src/config.rs", &["DaemonKeys"]),
        ("net/src/config.rs", &["NetConfig"]),
    ] {
        let source = read(file);
        for name in structs {
            let (_, rest) = source
                .split_once(&format!("pub struct {name} {{"))
                .unwrap_or_else(|| panic!("{file}: no struct {name}"));
            let body = rest.split_once("\n}").map_or(rest, |(body, _)| body);
            keys.extend(body.lines().filter_map(|l| {
                let field = l.trim().strip_prefix("pub ")?.split(':').next()?;
                Some(field.trim().to_owned())
            }));
        }
    }
    assert!(keys.len() > 25, "{keys:?}");
    let defaults = read("packaging/kilnd.toml");
    keys.extend(defaults.lines().filter_map(|l| {
        let key = l.strip_prefix('#')?.split(" = ").next()?;
        key.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_')
            .then(|| key.to_owned())
    }));
    for key in keys {
        // Described: a `.B`/`.BR` line (a tagged paragraph's tag) names it.
        let wanted = match key.as_str() {
            "network" => "[network]",
            "networks" => "[[networks]]",
            key => key,
        };
        let named = page
            .lines()
            .any(|l| l.starts_with(".B") && l.split([' ', ',', '"']).any(|w| w == wanted));
        assert!(named, "packaging/kilnd.toml.5 does not describe {key}");
    }
}

/// The first ```sh block after `heading` in docs/kilnctl.md.
fn doc_script(heading: &str) -> String {
    let doc = std::fs::read_to_string(workspace_root().join("docs/kilnctl.md")).unwrap();
    doc.split_once(&format!("\n{heading}\n"))
        .and_then(|(_, section)| section.split_once("```sh\n"))
        .and_then(|(_, block)| block.split_once("```"))
        .unwrap_or_else(|| panic!("docs/kilnctl.md: a ```sh block under {heading}"))
        .0
        .to_owned()
}

/// `script` run by bash with this build's kilnctl first on PATH, against
/// `d`; its stdout.
fn run_doc_script(d: &Daemon, script: &str) -> String {
    let script = format!("set -euo pipefail\n{script}");
    let bin = Path::new(KILNCTL).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("KILN_ADDRESS", d.address())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}\n{}",
        text(&out.stderr),
        d.log()
    );
    stdout
}

/// The `## Examples` of docs/kilnctl.md run verbatim (a pool's template
/// is booted for them).
#[test]
fn doc_examples_run() {
    let d = Daemon::start();
    let stdout = run_doc_script(&d, &doc_script("## Examples"));
    assert!(stdout.contains("\ncreated\n"), "{stdout}");
    assert!(stdout.contains("hello from ci-"), "{stdout}");
    assert!(stdout.contains("Lease ends: "), "{stdout}");
    assert!(json(&d, &["pool", "ls"])["pools"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// The test image: busybox and `/etc/hello`, entrypoint `/bin/sh`, cmd
/// `-c 'cat /etc/hello'`, in an OCI layout.
fn app_layout() -> tempfile::TempDir {
    one_image(&[busybox_layer()], "v1")
}

const APP: &str = "kiln.test/app:v1";
const SLEEPER: &str = "exec /bin/busybox sleep 100000";
/// A sleeper that ends on SIGTERM (as PID 1 of its container, a plain
/// `sleep` would ignore it, and `container rm` would wait 10 s to kill it).
const STOPPABLE: &str = "trap 'exit 0' TERM; /bin/busybox sleep 100000 & wait";

/// Images imported and removed, a VM running one as `main`, exec in it,
/// more containers added, listed, followed and removed, and the image
/// refused removal while it is in use: one VM boot.
#[test]
fn images_and_containers() {
    let d = Daemon::start();
    let layout = app_layout();
    let path = layout.path().to_str().unwrap();

    // import: progress on stderr (a line each: no terminal here), the
    // digest on stdout.
    let out = kilnctl(&d, &["image", "import", path, "--tag", APP]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{}", d.log());
    let digest = stdout.trim().to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{stdout}"
    );
    assert!(stderr.contains(" layer 1/1  "), "{stderr}");
    assert!(
        stderr.lines().last().unwrap().starts_with("stored "),
        "{stderr}"
    );
    let short = &digest[7..19];

    let table = ok(&d, &["image", "ls"]);
    assert!(table.starts_with("DIGEST "), "{table}");
    let image_row = row(&table, short).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(image_row[1], APP, "{table}");
    assert_eq!(image_row.last(), Some(&"-"), "no users yet: {table}");
    assert_eq!(ok(&d, &["image", "ls", "-q"]), format!("{digest}\n"));
    assert_eq!(json(&d, &["image", "list"])["images"][0]["digest"], digest);
    // show: by reference, digest, or digest prefix (with or without
    // sha256:); the image's process and its layers.
    let shown = ok(&d, &["image", "show", &digest[..13]]);
    assert!(shown.contains(&format!("Digest: {digest}")), "{shown}");
    assert!(
        shown.contains("Entrypoint: /bin/sh") && shown.contains("Cmd: -c 'cat /etc/hello'"),
        "{shown}"
    );
    assert!(shown.contains("\nDIGEST "), "layers table: {shown}");
    assert_eq!(
        without_ages(&ok(&d, &["image", "show", short])),
        without_ages(&shown)
    );
    assert_eq!(
        json(&d, &["image", "show", APP])["image"]["layers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    fails(
        &d,
        None,
        &["image", "show", "kiln.test/none:v1"],
        3,
        "io.kiln.Manager.ImageNotFound",
    );

    // A VM running the image as main: its command and env replaced.
    let id = ok(
        &d,
        &[
            "create",
            "app",
            "--image",
            APP,
            "-e",
            "MODE=demo",
            "--start",
            "--",
            "-c",
            &format!("echo started $MODE; echo oops >&2; {SLEEPER}"),
        ],
    )
    .trim()
    .to_owned();
    let shown = ok(&d, &["show", "app"]);
    let main = row(&shown[shown.find("\nNAME ").unwrap() + 1..], "main")
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(main[1..3], [APP, "running"], "{shown}");
    let vm = json(&d, &["show", &id])["vm"].clone();
    assert_eq!(vm["containers"][0]["digest"], digest);

    // exec in the container: its root and env, not the guest's.
    let out = kilnctl(
        &d,
        &[
            "exec",
            "--container",
            "main",
            "app",
            "--",
            "/bin/sh",
            "-c",
            "echo $MODE; cat /etc/hello",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "demo\nhello from the base layer\n".into()),
        "{}",
        text(&out.stderr)
    );
    // --json: kilnd's replies, a line each, the exit last.
    let lines = ok(
        &d,
        &[
            "--json",
            "exec",
            "-c",
            "main",
            "app",
            "--",
            "cat",
            "/etc/hello",
        ],
    );
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["exit"]["exitCode"], 0, "{lines}");
    assert!(lines.contains("\"stream\":\"stdout\""), "{lines}");
    fails(
        &d,
        None,
        &["exec", "-c", "nope", "app", "--", "true"],
        125,
        "io.kiln.Manager.NoSuchContainer",
    );
    // cp -c: paths in the container's root, both ways.
    let files = tempfile::tempdir().unwrap();
    let note = files.path().join("note.txt");
    std::fs::write(&note, "into the container\n").unwrap();
    ok(&d, &["cp", "-c", "main", note.to_str().unwrap(), "app:/"]);
    let out = kilnctl(&d, &["exec", "-c", "main", "app", "--", "cat", "/note.txt"]);
    assert_eq!(
        text(&out.stdout),
        "into the container\n",
        "{}",
        text(&out.stderr)
    );
    let hello = files.path().join("hello");
    ok(
        &d,
        &[
            "cp",
            "--container",
            "main",
            "app:/etc/hello",
            hello.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        "hello from the base layer\n"
    );
    // shell -c with piped input (no terminal here: typed as it comes).
    let mut shell = Command::new(KILNCTL)
        .args(["shell", "-c", "main", "app"])
        .env("KILN_ADDRESS", d.address())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keys = shell.stdin.take().unwrap();
    keys.write_all(b"echo in $MODE; exit 6\n").unwrap();
    let out = shell.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stdout).contains("in demo\r\n"),
        "{}",
        text(&out.stdout)
    );
    drop(keys);

    // logs: each stream on its own, the container defaulting to main.
    wait_until(Duration::from_secs(20), "main's output", || {
        let out = kilnctl(&d, &["logs", "app"]);
        let both = (text(&out.stdout), text(&out.stderr));
        (both == ("started demo\n".into(), "oops\n".into()))
            .then_some(())
            .ok_or(format!("{both:?}"))
    });
    let logs = json(&d, &["logs", &id, "main"]);
    assert_eq!(
        logs["entries"][0],
        serde_json::json!({"stream": "stdout", "text": "started demo\n"})
    );
    assert_eq!(logs["ended"], false);

    // container add: a table row, or the reply; logs -f until it ended.
    let added = ok(
        &d,
        &[
            "container",
            "add",
            "app",
            "once",
            APP,
            "--",
            "-c",
            "for i in 1 2 3; do echo tick $i; /bin/busybox sleep 0.3; done",
        ],
    );
    assert!(added.starts_with("NAME "), "{added}");
    let out = kilnctl(&d, &["logs", "-f", "app", "once"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "tick 1\ntick 2\ntick 3\n".into()),
        "{}",
        text(&out.stderr)
    );
    let followed = ok(&d, &["--json", "logs", "-f", "app", "once"]);
    let replies: Vec<Value> = followed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.last().unwrap()["ended"], true, "{followed}");
    // By a digest prefix; --json prints the reply.
    let side = json(
        &d,
        &[
            "container",
            "add",
            "app",
            "side",
            short,
            "--restart",
            "always",
            "--",
            "-c",
            STOPPABLE,
        ],
    );
    assert_eq!(
        (
            side["container"]["state"].as_str(),
            side["container"]["restartPolicy"].as_str()
        ),
        (Some("running"), Some("always")),
        "{side}"
    );
    let listed = ok(&d, &["container", "ls", "app"]);
    assert_eq!(row(&listed, "once").unwrap()[2], "exited", "{listed}");
    assert_eq!(row(&listed, "side").unwrap()[2], "running", "{listed}");
    let listed = json(&d, &["container", "list", "app"]);
    assert_eq!(listed["containers"].as_array().unwrap().len(), 3);
    fails(
        &d,
        None,
        &["container", "add", "app", "once", APP],
        6,
        "io.kiln.Manager.ContainerExists",
    );
    fails(
        &d,
        None,
        &["container", "add", "app", "x", "kiln.test/none:v1"],
        3,
        "io.kiln.Manager.ImageNotFound",
    );

    // In use: refused, exit 6, and its users shown.
    fails(
        &d,
        None,
        &["image", "rm", APP],
        6,
        "io.kiln.Manager.ImageInUse",
    );
    let table = ok(&d, &["image", "ls"]);
    assert!(table.contains(&format!("vm:{id}:main")), "{table}");

    assert_eq!(ok(&d, &["container", "rm", "app", "once", "side"]), "");
    fails(
        &d,
        None,
        &["container", "rm", "app", "nope"],
        3,
        "io.kiln.Manager.NoSuchContainer",
    );
    let listed = json(&d, &["container", "ls", "app"]);
    assert_eq!(listed["containers"].as_array().unwrap().len(), 1);

    // Once the VM is gone the image may go, by a digest prefix.
    ok(&d, &["rm", "app"]);
    assert_eq!(json(&d, &["image", "rm", short]), serde_json::json!({}));
    assert_eq!(json(&d, &["image", "ls"])["images"], serde_json::json!([]));
}

/// `image pull` from a real registry: progress lines on a pipe, one line
/// rewritten in place on a terminal, JSON lines with --json, a failure as
/// one line. No VM.
#[test]
fn image_pull_shows_progress() {
    let registry = Registry::start();
    let layout = app_layout();
    registry.push(layout.path(), "v1", "app:v1", false);
    let d = Daemon::start_with(&format!(
        "image_insecure_registries = [\"{}\"]\n",
        registry.host()
    ));
    let reference = registry.reference("app:v1");

    let out = kilnctl(&d, &["image", "pull", &reference]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{}", d.log());
    let digest = stdout.trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{stdout}");
    let steps: Vec<&str> = stderr
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(steps.first(), Some(&"resolved"), "{stderr}");
    assert_eq!(steps.last(), Some(&"stored"), "{stderr}");
    assert!(
        stderr.contains("downloading layer 1/1  ") || stderr.contains("converted layer 1/1  "),
        "{stderr}"
    );

    // On a terminal (script(1) gives it one): a line rewritten in place,
    // ended once; the digest after it.
    let shell = format!("{KILNCTL} image pull {reference}");
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &shell, "/dev/null"])
        .env("KILN_ADDRESS", d.address())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.starts_with("\rresolved "), "{screen:?}");
    assert!(screen.contains("\x1b[K\rstored "), "{screen:?}");
    assert!(
        screen.ends_with(&format!("\x1b[K\r\n{digest}\r\n")),
        "{screen:?}"
    );

    // --json: every reply a line, the image last.
    let lines = ok(&d, &["--json", "image", "pull", &reference]);
    let replies: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(replies.len() > 1, "{lines}");
    assert!(replies[..replies.len() - 1]
        .iter()
        .all(|r| r["progress"]["step"].is_string()));
    assert_eq!(replies.last().unwrap()["image"]["digest"], digest);

    let nowhere = format!("{}/none:v1", registry.host());
    fails(
        &d,
        None,
        &["image", "pull", &nowhere],
        1,
        "io.kiln.Manager.ImagePullFailed",
    );
}

/// `acquire --image`: a hot clone of a generic template pool, leased with
/// the image running as main.
#[test]
fn acquire_runs_an_image() {
    let d = Daemon::start();
    let layout = app_layout();
    let path = layout.path().to_str().unwrap();
    ok(&d, &["image", "import", path, "--tag", APP]);
    ok(
        &d,
        &[
            "pool", "create", "ci", "--warm", "1", "--max", "2", "--memory", "128",
        ],
    );
    fails(
        &d,
        None,
        &["acquire", "ci", "-e", "A=1"],
        2,
        "the container options of acquire need --image",
    );
    wait_pool(&d, "ci", |p| p["hot"] == 1 && p["booting"] == 0);
    let leased = ok(
        &d,
        &[
            "acquire",
            "ci",
            "--timeout",
            "2m",
            "--image",
            APP,
            "-e",
            "JOB=42",
            "--",
            "-c",
            SLEEPER,
        ],
    )
    .trim()
    .to_owned();
    let out = kilnctl(
        &d,
        &[
            "exec",
            "-c",
            "main",
            &leased,
            "--",
            "/bin/sh",
            "-c",
            "echo $JOB",
        ],
    );
    assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));
    let containers = json(&d, &["container", "ls", &leased])["containers"].clone();
    assert_eq!(containers[0]["name"], "main", "{containers}");
    assert_eq!(containers[0]["state"], "running", "{containers}");
    ok(&d, &["release", &leased]);
    ok(&d, &["pool", "rm", "ci"]);
}

/// The image examples of docs/kilnctl.md run verbatim, with `LAYOUT` a
/// layout built here.
#[test]
fn image_doc_examples_run() {
    let d = Daemon::start();
    let layout = app_layout();
    let default = "LAYOUT=/srv/images/app";
    let script = doc_script("### An image in a VM");
    assert!(script.contains(default), "the examples set {default}");
    let script = script.replace(default, &format!("LAYOUT={}", layout.path().display()));
    let stdout = run_doc_script(&d, &script);
    for line in [
        "hello from the base layer\n",
        "one-shot\nserving demo\n",
        "exit 6\n",
    ] {
        assert!(stdout.contains(line), "{line:?} in\n{stdout}");
    }
    // The last table is `container ls`'s.
    let listed = stdout.rsplit_once("\nNAME ").unwrap().1;
    assert_eq!(row(listed, "main").unwrap()[2], "running", "{stdout}");
    assert_eq!(row(listed, "once").unwrap()[2], "exited", "{stdout}");
    assert_eq!(json(&d, &["image", "ls"])["images"], serde_json::json!([]));
    assert_eq!(json(&d, &["ls"])["vms"], serde_json::json!([]));
}

/// `text` without its relative times ("(3s ago)"), which tick between
/// two calls that should otherwise print the same.
fn without_ages(text: &str) -> String {
    text.lines()
        .map(|line| match (line.rfind(" ("), line.ends_with(" ago)")) {
            (Some(start), true) => &line[..start],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
