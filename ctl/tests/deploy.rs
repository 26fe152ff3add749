//! `kilnctl deploy` and `undeploy` of Oakestra SLAs against a real kilnd:
//! the two example SLAs of Oakestra's docs (`tests/fixtures/`) deployed,
//! run, deployed again without a change and undeployed, with kilnd in a
//! network namespace of its own whose bridge has Oakestra's service subnet
//! (10.30.0.0/16), so the nginx example's client reaches its server at the
//! `rr_ip`, and the crosvm example's port is forwarded for real. The
//! images the SLAs name are built here from busybox-static and imported
//! under those names, so the fixtures name them as Oakestra's docs do.
//! Refused SLAs are one line naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{fails, json, kilnctl, ok, row, text};
use kiln_testkit::oci::{busybox_layer, Entry, Layer, LayoutBuilder, OCI_CONFIG, OCI_MANIFEST};
use kiln_testkit::{kilnd_exe, require_root, varlinkctl_ok, wait_until, Daemon, FakeHost, Netns};
use serde_json::{json, Value};

/// Oakestra's nginx client-server example: `curlv4` curls `nginx` at its
/// round-robin address 10.30.55.55.
const NGINX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nginx-client-server.json"
);
/// Oakestra's crosvm example: 4 vCPUs, 4 GiB, a vGPU, a 16 GiB root disk,
/// port 8080 and an env entry.
const CROSVM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/crosvm-service.json"
);

const CURL_VM: &str = "clientsrvr.test.curlv4.test";
const NGINX_VM: &str = "clientsrvr.test.nginx.test";
const CROSVM_VM: &str = "my-vm-app.default.my-vm-app.default";
/// What the nginx stand-in serves.
const PAGE: &str = "served by the nginx stand-in";

/// kilnd in `ns` with a bridge on Oakestra's service subnet and no GPU
/// (an empty render-node tree, so the crosvm example's vGPU is refused
/// the same on every host).
fn daemon_in(ns: &Netns) -> Daemon {
    let mut d = Daemon::new("");
    let gpus = FakeHost::in_dir(&d.kilnd.dir.path().join("gpu-tree"));
    d.kilnd.append_config(&format!(
        "gpu_sysfs_root = \"{}\"\ngpu_dev_root = \"{}\"\n\
         [network]\nbridge = \"kb0\"\nsubnet = \"10.30.0.0/16\"\n",
        gpus.sysfs().display(),
        gpus.dev().display()
    ));
    let address = d.address();
    d.kilnd
        .spawn_with(ns.command(&[kilnd_exe().to_str().unwrap()]), |_| {
            varlinkctl_ok(&address, "org.varlink.service.GetInfo")
        });
    d
}

/// Import an image of busybox plus `files` as `reference`, running
/// `process` (an OCI config's `config`; PATH is /bin); its digest.
fn import(d: &Daemon, reference: &str, process: Value, files: &[Entry]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(dir.path());
    let layers = [busybox_layer(), Layer::gzip(files)];
    let mut process = process;
    process["Env"] = json!(["PATH=/bin"]);
    let config = json!({
        "architecture": "amd64", "os": "linux", "config": process,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(Layer::diff_id).collect::<Vec<_>>()}
    });
    let config = layout.blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
    let blobs: Vec<Value> = layers
        .iter()
        .map(|l| layout.blob(l.media_type, &l.blob()))
        .collect();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": blobs
    });
    let desc = layout.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
    layout.tag(desc, "v1");
    let path = dir.path().to_str().unwrap();
    ok(d, &["image", "import", path, "--tag", reference])
        .trim()
        .to_owned()
}

fn applet(name: &'static str) -> Entry {
    Entry::Symlink(name, "busybox")
}

/// Stand-ins for the three images the fixtures name: nginx (busybox's
/// httpd on port 80), curl (`curl HOST` is busybox's wget of
/// `http://HOST/`) and the crosvm example's app (its env in a page it
/// writes to its root disk, served on port 8080). Their digests.
fn import_images(d: &Daemon) -> [String; 3] {
    let nginx = import(
        d,
        "docker.io/library/nginx:latest",
        json!({"Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"]}),
        &[
            applet("bin/httpd"),
            Entry::Dir("www/"),
            Entry::File("www/index.html", format!("{PAGE}\n").into_bytes(), 0o644),
        ],
    );
    let curl = import(
        d,
        "docker.io/curlimages/curl:7.82.0",
        json!({"Cmd": ["curl"]}),
        &[
            applet("bin/wget"),
            applet("bin/sleep"),
            Entry::File(
                "bin/curl",
                b"#!/bin/sh\nexec wget -q -O - \"http://$1/\"\n".to_vec(),
                0o755,
            ),
        ],
    );
    let app = import(
        d,
        "registry.example.com/my-app:latest",
        json!({"Cmd": ["sh", "-c",
            "mkdir -p /www && echo \"$MY_CONFIG_VALUE from my-app\" > /www/index.html \
             && exec httpd -f -p 8080 -h /www"]}),
        &[applet("bin/httpd"), applet("bin/mkdir")],
    );
    [nginx, curl, app]
}

/// The microservices' rows of a deploy or undeploy `--json`, by name:
/// (result, VM id).
fn results(reply: &Value) -> Vec<(String, String, String)> {
    reply["microservices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap().to_owned();
            (field("name"), field("result"), field("id"))
        })
        .collect()
}

/// The VM named `name`, as `ls --json` shows it.
fn vm(d: &Daemon, name: &str) -> Value {
    let vms = json(d, &["ls"]);
    vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VM {name}: {vms}"))
        .clone()
}

/// `sla` with `change` made to it, written to `path`.
fn changed(sla: &str, path: &Path, change: impl FnOnce(&mut Value)) -> String {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(sla).unwrap()).unwrap();
    change(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Both examples deployed, run (three VMs booted, one started again),
/// deployed again without a change, refused when changed, and undeployed.
#[test]
fn oakestra_examples_deploy_run_and_undeploy() {
    if !require_root("a network namespace for kilnd's bridge and port forwards") {
        return;
    }
    let ns = Netns::new();
    let d = daemon_in(&ns);
    let [nginx_digest, curl_digest, app_digest] = import_images(&d);
    let temp = tempfile::tempdir().unwrap();

    // The crosvm example as written asks for a vGPU, and this host has
    // none: kilnd refuses the start (exit 7), and the VM the run created
    // is removed again.
    let line = fails(
        &d,
        None,
        &["deploy", CROSVM],
        7,
        "io.kiln.Manager.NoGpuAvailable",
    );
    assert!(line.ends_with(&format!(" (VM {CROSVM_VM})\n")), "{line}");
    assert_eq!(json(&d, &["ls"])["vms"], json!([]), "nothing left behind");

    // The nginx example: two VMs, created and running; the IPv6 service
    // address is ignored, with a warning.
    let out = kilnctl(&d, &["deploy", NGINX]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{}", d.log());
    assert!(stdout.starts_with("NAME "), "{stdout}");
    let curl_id = row(&stdout, CURL_VM).unwrap_or_else(|| panic!("{stdout}"))[1].to_owned();
    assert_eq!(row(&stdout, CURL_VM).unwrap()[2], "created", "{stdout}");
    assert_eq!(row(&stdout, NGINX_VM).unwrap()[2], "created", "{stdout}");
    assert_eq!(
        stderr,
        format!(
            "kilnctl: {NGINX}: applications[0].microservices[1].addresses.rr_ip_v6: \
             ignored: Kiln's networks are IPv4 only (the VM has rr_ip)\n"
        )
    );
    let server = vm(&d, NGINX_VM);
    assert_eq!(server["state"], "ready", "{server}");
    assert_eq!(
        (server["memoryMiB"].as_u64(), server["vcpus"].as_u64()),
        (Some(100), Some(1))
    );
    assert_eq!(server["network"][0]["address"], "10.30.55.55", "{server}");
    let main = &server["containers"][0];
    assert_eq!(
        (
            &main["name"],
            &main["state"],
            &main["digest"],
            &main["restartPolicy"]
        ),
        (
            &json!("main"),
            &json!("running"),
            &json!(nginx_digest),
            &json!("always")
        ),
        "{server}"
    );
    let client = vm(&d, CURL_VM);
    assert_eq!(client["containers"][0]["digest"], curl_digest.as_str());
    assert_eq!(
        client["containers"][0]["command"],
        json!(["sh", "-c", "curl 10.30.55.55 ; sleep 5"])
    );
    // The client reaches the server at its rr_ip; it ends after each
    // request and is started again, as Oakestra redeploys it.
    wait_until(Duration::from_secs(60), "curlv4's request answered", || {
        let logs = text(&kilnctl(&d, &["logs", CURL_VM]).stdout);
        logs.contains(PAGE).then_some(()).ok_or(logs)
    });
    wait_until(Duration::from_secs(60), "curlv4 restarted", || {
        let listed = json(&d, &["container", "ls", CURL_VM]);
        let restarts = listed["containers"][0]["restarts"].as_u64().unwrap_or(0);
        (restarts > 0).then_some(()).ok_or(listed)
    });

    // Again: nothing changes; --json says so per microservice.
    let again = json(&d, &["deploy", NGINX]);
    let unchanged = results(&again);
    assert_eq!(unchanged.len(), 2, "{again}");
    assert!(
        unchanged.iter().all(|(_, r, _)| r == "unchanged"),
        "{again}"
    );
    assert_eq!(
        unchanged[0],
        (CURL_VM.into(), "unchanged".into(), curl_id.clone())
    );
    assert_eq!(again["microservices"][1]["vm"]["state"], "ready");

    // A microservice whose VM was stopped is started again.
    ok(&d, &["stop", NGINX_VM]);
    let out = ok(&d, &["deploy", NGINX]);
    assert_eq!(row(&out, NGINX_VM).unwrap()[2], "started", "{out}");
    assert_eq!(row(&out, CURL_VM).unwrap()[2], "unchanged", "{out}");
    assert_eq!(vm(&d, NGINX_VM)["state"], "ready");

    // An SLA that asks for something else is refused naming the field,
    // and changes nothing.
    let more_memory = changed(NGINX, &temp.path().join("more-memory.json"), |sla| {
        sla["applications"][0]["microservices"][1]["memory"] = json!(200);
    });
    fails(
        &d,
        None,
        &["deploy", &more_memory],
        6,
        &format!(
            "{NGINX_VM} runs memoryMiB 100; applications[0].microservices[1].memory \
             asks for memoryMiB 200 (undeploy it first)"
        ),
    );
    assert_eq!(vm(&d, NGINX_VM)["memoryMiB"], 100);

    // The crosvm example with vgpus 0, the one change this GPU-less host
    // needs: 4 vCPUs, 4 GiB, the env, a 16 GiB root disk and port 8080.
    let without_gpu = changed(
        CROSVM,
        &temp.path().join("crosvm-without-gpu.json"),
        |sla| {
            sla["applications"][0]["microservices"][0]["vgpus"] = json!(0);
        },
    );
    let deployed = json(&d, &["deploy", &without_gpu]);
    assert_eq!(results(&deployed)[0].1, "created", "{deployed}");
    let app = &deployed["microservices"][0]["vm"];
    assert_eq!(
        (app["name"].as_str(), app["state"].as_str()),
        (Some(CROSVM_VM), Some("ready")),
        "{app}"
    );
    assert_eq!(
        (app["vcpus"].as_u64(), app["memoryMiB"].as_u64()),
        (Some(4), Some(4096))
    );
    assert_eq!(app["containers"][0]["digest"], app_digest.as_str());
    let out = kilnctl(
        &d,
        &[
            "exec",
            "-c",
            "main",
            CROSVM_VM,
            "--",
            "/bin/sh",
            "-c",
            "echo $MY_CONFIG_VALUE; busybox df -m / | busybox tail -n 1",
        ],
    );
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello"), "{stdout}{}", text(&out.stderr));
    let size_mib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df: {stdout}"));
    assert!(
        (15_000..=16_384).contains(&size_mib),
        "the root is the 16 GiB disk: {stdout}"
    );
    // Port 8080 of the node (here the bridge's address in the namespace)
    // reaches the VM's 8080.
    wait_until(Duration::from_secs(30), "the forwarded port", || {
        let (_, page) = ns.run(&["busybox", "wget", "-q", "-O", "-", "http://10.30.0.1:8080/"]);
        (page == "hello from my-app\n").then_some(()).ok_or(page)
    });
    assert_eq!(
        results(&json(&d, &["deploy", &without_gpu]))[0].1,
        "unchanged"
    );

    // Undeploy removes exactly the SLA's VMs; again, they are absent.
    let removed = ok(&d, &["undeploy", NGINX]);
    assert_eq!(
        row(&removed, CURL_VM).unwrap()[1..],
        [curl_id.as_str(), "removed"]
    );
    assert_eq!(row(&removed, NGINX_VM).unwrap()[2], "removed", "{removed}");
    assert_eq!(json(&d, &["ls"])["vms"].as_array().unwrap().len(), 1);
    let absent = json(&d, &["undeploy", NGINX]);
    assert_eq!(
        results(&absent),
        [
            (CURL_VM.into(), "absent".into(), String::new()),
            (NGINX_VM.into(), "absent".into(), String::new())
        ]
    );
    ok(&d, &["undeploy", &without_gpu]);
    assert_eq!(json(&d, &["ls"])["vms"], json!([]));
}

/// A bad SLA is one line naming the field (exit 6; 2 for a file that is
/// not JSON), before anything changes. No VM boots.
#[test]
fn a_bad_sla_is_one_line_naming_the_field() {
    let d = Daemon::start();
    let temp = tempfile::tempdir().unwrap();
    let nginx =
        |name: &str, change: &dyn Fn(&mut Value)| changed(NGINX, &temp.path().join(name), change);
    let ms = "applications[0].microservices[1]";
    for (path, message) in [
        (
            nginx("vtpus.json", &|sla| {
                sla["applications"][0]["microservices"][1]["vtpus"] = json!(1)
            }),
            format!("{ms}.vtpus: Kiln has no TPUs to give a VM"),
        ),
        (
            nginx("port.json", &|sla| {
                sla["applications"][0]["microservices"][1]["port"] = json!("80:80-80")
            }),
            format!("{ms}.port: \"80:80-80\" is not HOST[:VM][/tcp|/udp] (e.g. 8080:80/tcp)"),
        ),
        (
            nginx("vcpu.json", &|sla| {
                sla["applications"][0]["microservices"][1]["vcpu"] = json!(2)
            }),
            format!("{ms}.vcpu: not a field of Oakestra's SLA v2.0"),
        ),
        (
            nginx("closest.json", &|sla| {
                sla["applications"][0]["microservices"][1]["addresses"]["closest_ip"] =
                    json!("10.30.1.1");
            }),
            format!("{ms}.addresses.closest_ip: Kiln gives a VM one address, rr_ip"),
        ),
        (
            nginx("version.json", &|sla| sla["sla_version"] = json!("v1.0")),
            "sla_version: \"v1.0\": kilnctl reads v2.0 only".to_owned(),
        ),
    ] {
        let line = fails(&d, None, &["deploy", &path], 6, &path);
        assert_eq!(line, format!("kilnctl: {path}: {message}\n"));
    }
    // Ports need a network.
    let line = fails(
        &d,
        None,
        &["deploy", CROSVM, "--network", "none"],
        6,
        CROSVM,
    );
    assert!(
        line.ends_with(".port: needs a network (deploy without --network none)\n"),
        "{line}"
    );
    let not_json = temp.path().join("broken.json");
    std::fs::write(&not_json, "{\"sla_version\": ").unwrap();
    let not_json = not_json.to_str().unwrap();
    fails(
        &d,
        None,
        &["deploy", not_json],
        2,
        &format!("{not_json}: not JSON"),
    );
    fails(
        &d,
        None,
        &["undeploy", "/nonexistent/sla.json"],
        2,
        "/nonexistent/sla.json: cannot read it",
    );
    // A missing image is pulled: here from nowhere, kilnd's error named.
    let nowhere = changed(CROSVM, &temp.path().join("nowhere.json"), |sla| {
        sla["applications"][0]["microservices"][0]["image"] = json!("127.0.0.1:1/none:v1");
    });
    let line = fails(
        &d,
        None,
        &["deploy", &nowhere],
        1,
        "io.kiln.Manager.ImagePullFailed",
    );
    assert!(line.ends_with(&format!(" (VM {CROSVM_VM})\n")), "{line}");
    assert_eq!(json(&d, &["ls"])["vms"], json!([]), "nothing deployed");
    // Undeploying what is not there is no error.
    let absent = ok(&d, &["undeploy", NGINX]);
    assert_eq!(
        row(&absent, NGINX_VM).unwrap()[1..],
        ["-", "absent"],
        "{absent}"
    );
}
