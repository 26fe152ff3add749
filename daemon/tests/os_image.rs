//! OS images through the real kilnd (`VMSpec.boot: "image"`, issue 14
//! item 6): an OCI image built here that carries its own kernel (Debian's
//! generic kernel, not Kiln's cloud kernel) and systemd as init is imported,
//! booted cold on real QEMU from its own `/boot/vmlinuz-*` with its layers
//! as the root; systemd gets PID 1 and runs the image's unit, and Kiln's
//! agent still answers `ExecVM` beside it. Also: the env in
//! `/etc/environment`, what a `boot: image` VM refuses (no kernel in the
//! image, pools, snapshots, containers) with names, and nothing left
//! behind once it is deleted (its initramfs, the image's boot files after
//! GC).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kiln_testkit::oci::{busybox_layer, one_image};
use kiln_testkit::os_image::{kernel_release, os_image, READY_FILE};
use kiln_testkit::{api_doc_script, run_bash, wait_until, Daemon};
use serde_json::{json, Value};

fn exec(d: &Daemon, id: &str, script: &str) -> Value {
    d.ok(
        "ExecVM",
        json!({ "id": id, "command": ["/bin/sh", "-c", script] }),
    )
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn an_os_image_boots_its_own_kernel_with_systemd_as_pid_1() {
    let mut d = Daemon::start();
    let state = d.kilnd.dir.path().join("state");
    let os = os_image("v1");
    let image = d.ok(
        "ImportImage",
        json!({ "path": os.path(), "reference": "kiln.test/os:v1" }),
    )["image"]
        .clone();
    let digest = image["digest"].as_str().unwrap().to_owned();
    let app = one_image(&[busybox_layer()], "v1");
    d.ok(
        "ImportImage",
        json!({ "path": app.path(), "reference": "kiln.test/app:v1" }),
    );

    // Refusals, each by name, none leaving a VM.
    let refused = [
        (json!({ "boot": "image" }), "InvalidSpec"),
        (
            json!({ "boot": "image", "image": "kiln.test/app:v1" }),
            "InvalidImage",
        ),
        (
            json!({ "boot": "image", "image": "kiln.test/os:v1", "restartPolicy": "always" }),
            "InvalidSpec",
        ),
        (
            json!({ "boot": "image", "image": "kiln.test/os:v1", "kernel": "/boot/x" }),
            "InvalidSpec",
        ),
        (
            json!({ "boot": "floppy", "image": "kiln.test/os:v1" }),
            "InvalidParameter",
        ),
    ];
    for (spec, error) in refused {
        let got = d.err("CreateVM", json!({ "name": "bad", "spec": spec }));
        assert!(got.ends_with(error), "{spec}: {got}");
    }
    assert_eq!(d.ok("ListVMs", json!({}))["vms"], json!([]));
    assert!(d
        .err(
            "CreatePool",
            json!({ "name": "os", "spec": { "warm": 1, "max": 1, "vm": { "image": "kiln.test/os:v1", "boot": "image" } } })
        )
        .ends_with("InvalidSpec"));

    let vm = d.ok(
        "CreateVM",
        json!({ "name": "os", "spec": {
            "image": "kiln.test/os:v1",
            "boot": "image",
            "memoryMiB": 512,
            "env": ["GREETING=hello from kiln"],
            "storageMiB": 64,
            "storageDisk": true,
        }}),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    assert_eq!(vm["boot"], "image", "{vm}");
    assert_eq!(vm["containers"][0]["digest"], digest);

    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "ready", "{vm}");
    assert_eq!(
        vm["kernelRelease"],
        kernel_release(),
        "the image's own kernel"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
    let boot_dir = state.join("images/boot/sha256");
    assert!(cmdline.contains(boot_dir.to_str().unwrap()), "{cmdline:?}");
    assert_eq!(
        (&vm["containers"][0]["state"], &vm["containers"][0]["pid"]),
        (&json!("running"), &json!(1)),
        "{vm}"
    );

    // The image's kernel, systemd as PID 1, its unit run, Kiln's agent in
    // the same root.
    let console = || {
        std::fs::read_to_string(d.kilnd.dir.path().join(format!("run/vms/{id}/console.log")))
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(120), "kiln-os-test.service", || {
        let r = exec(&d, &id, &format!("cat {READY_FILE} 2>/dev/null"));
        (r["stdout"] == "ready\n").then_some(()).ok_or(r)
    });
    let r = exec(
        &d,
        &id,
        "uname -r; readlink /proc/1/exe; cat /etc/os-release",
    );
    let out = r["stdout"].as_str().unwrap().to_owned();
    assert!(
        out.starts_with(&format!("{}\n/usr/lib/systemd/systemd\n", kernel_release())),
        "{r}\nconsole:\n{}",
        console()
    );
    assert!(out.contains("Kiln OS test"), "{r}");
    let r = exec(
        &d,
        &id,
        "systemctl is-system-running; systemctl is-active kiln-os-test.service",
    );
    let states = r["stdout"].as_str().unwrap();
    assert!(
        states.ends_with("active\n")
            && (states.starts_with("running") || states.starts_with("degraded")),
        "{r}"
    );
    let r = exec(&d, &id, "cat /etc/environment");
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .contains("GREETING=\"hello from kiln\""),
        "{r}"
    );
    // The root is the image's layers with a writable layer over them: an
    // ext4 disk of storageMiB, kept across a restart of the VM.
    let r = exec(
        &d,
        &id,
        "echo mine > /root-file && cat /root-file && grep ' / ' /proc/mounts",
    );
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .starts_with("mine\noverlay / overlay"),
        "{r}"
    );

    // kill -9 of kilnd: the VM is re-adopted, systemd and the agent as
    // they were.
    d.sigkill();
    d.spawn();
    let vm = d.ok("DescribeVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(
        (&vm["state"], &vm["boot"]),
        (&json!("ready"), &json!("image")),
        "{vm}"
    );
    let r = exec(&d, &id, "readlink /proc/1/exe; cat /root-file");
    assert_eq!(r["stdout"], "/usr/lib/systemd/systemd\nmine\n", "{r}");

    // A cold restart boots the same OS over the same writable disk.
    d.ok("StopVM", json!({ "id": id }));
    let vm = d.ok("StartVM", json!({ "id": id }))["vm"].clone();
    assert_eq!(vm["state"], "ready", "{vm}");
    let r = exec(
        &d,
        &id,
        "cat /root-file; cat /proc/sys/kernel/random/boot_id",
    );
    assert!(r["stdout"].as_str().unwrap().starts_with("mine\n"), "{r}");
    wait_until(Duration::from_secs(120), "systemd again", || {
        exec(&d, &id, "readlink /proc/1/exe")["stdout"] == "/usr/lib/systemd/systemd\n"
    });

    // What an OS VM is not.
    assert!(d
        .err(
            "AddContainer",
            json!({ "id": id, "spec": { "name": "side", "image": "kiln.test/app:v1", "command": ["true"] } })
        )
        .ends_with("InvalidSpec"));
    assert!(d
        .err("SnapshotVM", json!({ "id": id, "name": "s" }))
        .ends_with("NotSnapshottable"));
    let listed = d.ok("ListContainers", json!({ "id": id }))["containers"].clone();
    assert_eq!(listed[0]["state"], "running", "{listed}");

    // Gone without a trace; the image can go, and GC frees its boot files.
    d.ok("StopVM", json!({ "id": id }));
    d.ok("DeleteVM", json!({ "id": id }));
    assert_eq!(files(&state.join("disks")), Vec::<String>::new());
    assert_eq!(files(&state.join("images/boot/sha256")).len(), 3);
    d.ok("RemoveImage", json!({ "image": "kiln.test/os:v1" }));
    wait_until(Duration::from_secs(30), "the boot files freed", || {
        files(&state.join("images/boot/sha256")).is_empty()
    });
}

/// The examples of docs/api.md, "OS images", as written.
#[test]
fn the_api_examples_for_os_images_run() {
    let d = Daemon::start();
    let os = os_image("v1");
    let script = api_doc_script(
        "## OS images",
        &[
            (
                "SOCK=unix:/run/kiln/io.kiln.Manager",
                format!("SOCK={}", d.address()),
            ),
            (
                "LAYOUT=/srv/images/os",
                format!("LAYOUT={}", os.path().display()),
            ),
        ],
    );
    let stdout = run_bash(&script, &d.log());
    for line in [
        format!("image\n{}\n", kernel_release()),
        "GREETING=\"hello\"\n".to_owned(),
    ] {
        assert!(stdout.contains(&line), "{line:?} not in:\n{stdout}");
    }
    assert_eq!(d.ok("ListVMs", json!({}))["vms"], json!([]));

    // An init that cannot be run: the boot fails with the guest's reason
    // (the agent that served on reported it), and the console says why.
    let vm = d.ok(
        "CreateVM",
        json!({ "name": "no-init", "spec": {
            "image": "kiln.test/os:v1", "boot": "image", "memoryMiB": 512,
            "command": ["/no/such/init"],
        }}),
    )["vm"]
        .clone();
    let id = vm["id"].as_str().unwrap().to_owned();
    let (error, parameters) = d
        .call("io.kiln.Manager.StartVM", json!({ "id": id }))
        .unwrap_err();
    assert_eq!(error, "io.kiln.Manager.BootFailed", "{parameters}");
    // The agent's reason, with the console's tail (the failed VM's run
    // directory, console log included, may be gone already).
    let message = parameters["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("starting the OS image's init \"/no/such/init\""),
        "{parameters}"
    );
    let described = d.ok("DescribeVM", json!({ "id": id }))["vm"].clone();
    assert_ne!(described["state"], "ready", "{described}");
    d.ok("DeleteVM", json!({ "id": id }));
}
