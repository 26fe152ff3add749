//! The QEMU fragments of GPU VMs: golden files, and a check of every
//! option name against the QEMU installed here.
//!
//! Regenerate the goldens after a deliberate change with
//! `KILN_UPDATE_GOLDEN=1 cargo test -p kiln-gpu --test qemu_args` and
//! review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kiln_gpu::{qemu_args, DevNum, GpuDevice, GpuLease, LeaseMode, VirglOptions};
use kiln_testkit::skip;

fn qemu() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

fn lease() -> GpuLease {
    GpuLease {
        vm_id: "0123456789ab".into(),
        node: "renderD128".into(),
        path: "/dev/dri/renderD128".into(),
        dev: DevNum {
            major: 226,
            minor: 128,
        },
        mode: LeaseMode::Exclusive,
        vendor_id: None,
        pci_address: None,
    }
}

fn cases() -> Vec<(&'static str, GpuDevice)> {
    let virgl = |options| GpuDevice::virgl(&[lease()], options).unwrap();
    vec![
        ("virtio-2d.args", GpuDevice::Virtio2d),
        ("virgl.args", virgl(VirglOptions::default())),
        (
            "virgl-blob.args",
            virgl(VirglOptions {
                blob: true,
                hostmem_mib: Some(512),
                ..VirglOptions::default()
            }),
        ),
        (
            "venus.args",
            virgl(VirglOptions {
                venus: true,
                ..VirglOptions::default()
            }),
        ),
    ]
}

fn render(args: &[(String, String)]) -> String {
    args.iter().map(|(o, v)| format!("{o}\n{v}\n")).collect()
}

#[test]
fn golden_fragments() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for (name, device) in cases() {
        let got = render(&qemu_args(&device).unwrap());
        let path = dir.join(name);
        if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} missing (KILN_UPDATE_GOLDEN=1 to create)",
                path.display()
            )
        });
        assert_eq!(got, want, "fragment differs from {}", path.display());
    }
}

fn run_help(args: &[&str]) -> Option<String> {
    let out = Command::new(qemu()).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Every `-device` property and `-display` option the fragments use is one
/// the installed QEMU knows.
#[test]
fn option_names_exist_in_the_installed_qemu() {
    let Some(devices) = run_help(&["-device", "help"]) else {
        panic!("{} not found (make deps installs it)", qemu());
    };
    assert!(devices.contains("name \"virtio-gpu-pci\""), "{devices}");
    if !devices.contains("name \"virtio-gpu-gl-pci\"") {
        skip(
            "the virgl half: this QEMU has no virtio-gpu-gl-pci \
             (Debian: install qemu-system-modules-opengl)",
        );
        return;
    }
    let gl_props = run_help(&["-device", "virtio-gpu-gl-pci,help"]).unwrap();
    let displays = run_help(&["-display", "help"]).unwrap();
    let usage = run_help(&["-help"]).unwrap();
    assert!(
        displays.lines().any(|l| l.trim() == "egl-headless"),
        "{displays}"
    );
    assert!(
        usage.contains("-display egl-headless[,rendernode=<file>]"),
        "{usage}"
    );
    for (_, device) in cases() {
        for (opt, value) in qemu_args(&device).unwrap() {
            let mut parts = value.split(',');
            let head = parts.next().unwrap();
            match opt.as_str() {
                "-device" => {
                    assert!(
                        devices.contains(&format!("name \"{head}\"")),
                        "no device {head}"
                    );
                    for prop in parts {
                        let key = prop.split('=').next().unwrap();
                        assert!(
                            gl_props
                                .lines()
                                .any(|l| l.trim_start().starts_with(&format!("{key}="))),
                            "virtio-gpu-gl-pci has no property {key}"
                        );
                    }
                }
                "-display" => assert!(
                    head == "none" || displays.lines().any(|l| l.trim() == head),
                    "no display {head}"
                ),
                other => panic!("unexpected option {other}"),
            }
        }
    }
}

/// Starts QEMU paused on q35 with the fragment and quits it over QMP: the
/// 2D device is accepted for real. The virgl fragment is started too: with
/// no render node on the machine QEMU must fail on exactly that (which
/// shows every option before it parsed), and with one it must start.
#[test]
fn qemu_accepts_the_fragments() {
    let start = |device: &GpuDevice| {
        let mut cmd = Command::new(qemu());
        cmd.args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-S",
        ]);
        for (o, v) in qemu_args(device).unwrap() {
            cmd.args([o, v]);
        }
        cmd.args(["-qmp", "stdio"]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu");
        // QEMU reads these once it is up; if it died first the write fails.
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = start(&GpuDevice::Virtio2d);
    assert!(ok, "virtio-gpu-pci on q35 refused: {err}");

    let nodes: Vec<PathBuf> = std::fs::read_dir("/dev/dri")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("renderD"))
                })
                .collect()
        })
        .unwrap_or_default();
    let has_gl = run_help(&["-device", "help"])
        .unwrap()
        .contains("virtio-gpu-gl-pci");
    if !has_gl {
        skip("the virgl start: QEMU lacks the OpenGL modules (qemu-system-modules-opengl)");
        return;
    }
    match nodes.first() {
        None => {
            let mut l = lease();
            l.path = "/dev/dri/renderD128".into();
            let (ok, err) = start(&GpuDevice::virgl(&[l], VirglOptions::default()).unwrap());
            assert!(!ok);
            assert!(
                err.contains("egl: no drm render node available")
                    || err.contains("render node init failed"),
                "virgl without a render node failed for another reason: {err}"
            );
            eprintln!("no /dev/dri/renderD* here: QEMU stopped at the render node, as expected");
        }
        Some(node) => {
            let mut l = lease();
            l.path = node.clone();
            let (ok, err) = start(&GpuDevice::virgl(&[l], VirglOptions::default()).unwrap());
            assert!(ok, "virgl on {} refused: {err}", node.display());
        }
    }
}
