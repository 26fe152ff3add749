//! Streamed processes, terminals and file copies through the real kilnd,
//! one real QEMU VM (TCG here) and both transports: `varlinkctl --more`
//! for streamed output, a small fd-passing varlink client for terminals
//! and archives (varlinkctl cannot pass descriptors), and a zbus client
//! on a private dbus-daemon for the D-Bus methods, which hand out
//! descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_testkit::busctl::{DbusKilnd, VM_IF};
use kiln_testkit::fdclient::FdClient;
use kiln_testkit::{api_doc_script, run_bash, VarlinkStream};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const M: &str = "io.kiln.Manager.";

fn err(k: &DbusKilnd, method: &str, params: Value) -> String {
    match k.varlink(method, params) {
        Ok(v) => panic!("{method} succeeded: {v}"),
        Err((name, _)) => name,
    }
}

/// Stdout bytes of a run of `output` replies.
fn stdout_of(replies: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for reply in replies {
        for chunk in reply["output"].as_array().into_iter().flatten() {
            if chunk["stream"] == "stdout" {
                out.extend(
                    kiln_agent_proto::decode_bytes(chunk["data"].as_str().unwrap()).unwrap(),
                );
            }
        }
    }
    out
}

fn start(k: &DbusKilnd, id: &str, argv: &[&str], extra: Value) -> u64 {
    let mut process = json!({ "argv": argv });
    if let Value::Object(fields) = extra {
        for (key, value) in fields {
            process[key] = value;
        }
    }
    k.varlinkctl("StartProcess", json!({ "id": id, "process": process }))["handle"]
        .as_u64()
        .unwrap()
}

fn pid_alive_in_guest(k: &DbusKilnd, id: &str, pid: u64) -> bool {
    let reply = k.varlinkctl("ExecVM",
        json!({ "id": id, "command": ["sh", "-c", format!("kill -0 {pid} 2>/dev/null && echo alive || echo gone")] }),
    );
    reply["stdout"].as_str().unwrap().trim() == "alive"
}

/// Reads from `fd` until `want` is in what came, or panics after 20 s.
fn read_until(fd: &mut std::fs::File, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        assert!(Instant::now() < deadline, "never saw {want:?} in {seen:?}");
        match fd.read(&mut buf) {
            Ok(0) => panic!("terminal closed before {want:?}: {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn processes_stream_terminals_work_and_files_round_trip() {
    let k = DbusKilnd::start(false);
    let id = k.varlinkctl(
        "CreateVM",
        json!({ "name": "sandbox", "spec": { "memoryMiB": 512 } }),
    )["vm"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    k.varlinkctl("StartVM", json!({ "id": id }));
    let address = k.kilnd.varlink_address();

    // --- Streaming: a line every 200 ms for 2 s; the first line must come
    // long before the end.
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done; exit 7";
    let stream = VarlinkStream::start(
        &address,
        &format!("{M}StartProcess"),
        &json!({ "id": id, "process": { "argv": ["sh", "-c", script] } }).to_string(),
    );
    let opening = stream.next(Duration::from_secs(30)).expect("the handle");
    assert!(opening["handle"].as_u64().is_some(), "{opening}");
    let mut replies = Vec::new();
    let mut first_output = None;
    let ended = loop {
        let reply = stream.next(Duration::from_secs(30)).expect("more output");
        if first_output.is_none() && !stdout_of(std::slice::from_ref(&reply)).is_empty() {
            first_output = Some(Instant::now());
        }
        replies.push(reply.clone());
        if reply.get("exit").is_some() {
            break Instant::now();
        }
    };
    let lead = ended - first_output.unwrap();
    assert!(
        lead >= Duration::from_millis(1000),
        "first output only {lead:?} before the end"
    );
    let text = String::from_utf8(stdout_of(&replies)).unwrap();
    assert_eq!(text.lines().count(), 10, "{text}");
    assert_eq!(replies.last().unwrap()["exit"]["exitCode"], 7);
    println!("streamed: first line {lead:?} before the exit");

    // --- stdin streamed into wc -c, then closed; exit and output by handle.
    let handle = start(&k, &id, &["wc", "-c"], json!({ "stdin": true }));
    // varlinkctl takes the call as one argument (128 KiB at most).
    let chunk = kiln_agent_proto::encode_bytes(&[b'x'; 60_000]);
    for _ in 0..2 {
        k.varlinkctl(
            "WriteProcess",
            json!({ "id": id, "handle": handle, "data": chunk }),
        );
    }
    k.varlinkctl("WriteProcess",
        json!({ "id": id, "handle": handle, "data": kiln_agent_proto::encode_bytes(b"12345"), "close": true }),
    );
    let exit = k.varlinkctl(
        "WaitProcess",
        json!({ "id": id, "handle": handle, "timeoutSec": 30 }),
    );
    assert_eq!(exit["exit"]["exitCode"], 0);
    let read = k.varlinkctl("AttachProcess", json!({ "id": id, "handle": handle }));
    assert_eq!(
        String::from_utf8(stdout_of(&[read])).unwrap().trim(),
        "120005"
    );
    k.varlinkctl("ReleaseProcess", json!({ "id": id, "handle": handle }));
    assert_eq!(
        err(&k, "AttachProcess", json!({ "id": id, "handle": handle })),
        format!("{M}NoSuchProcess")
    );

    // --- Signal and wait by handle.
    let handle = start(&k, &id, &["sleep", "300"], json!({}));
    k.varlinkctl(
        "SignalProcess",
        json!({ "id": id, "handle": handle, "signal": 15 }),
    );
    let exit = k.varlinkctl(
        "WaitProcess",
        json!({ "id": id, "handle": handle, "timeoutSec": 30 }),
    );
    assert_eq!(exit["exit"], json!({ "exitCode": 143, "signal": 15 }));

    // --- Detach and re-attach; a client that goes without detach kills.
    let mut detached = VarlinkStream::start(
        &address,
        &format!("{M}StartProcess"),
        &json!({ "id": id, "detach": true,
                 "process": { "argv": ["sh", "-c", "echo first; sleep 2; echo second"] } })
        .to_string(),
    );
    let opening = detached.next(Duration::from_secs(30)).unwrap();
    let (handle, pid) = (
        opening["handle"].as_u64().unwrap(),
        opening["pid"].as_u64().unwrap(),
    );
    let first = detached.next(Duration::from_secs(30)).unwrap();
    assert_eq!(stdout_of(std::slice::from_ref(&first)), b"first\n");
    detached.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pid_alive_in_guest(&k, &id, pid),
        "a detached process died with its client"
    );
    let rest = kiln_testkit::varlinkctl_more(
        None,
        &address,
        &format!("{M}AttachProcess"),
        &json!({ "id": id, "handle": handle, "since": first["cursor"] }).to_string(),
    )
    .unwrap();
    assert_eq!(stdout_of(&rest), b"second\n");
    assert_eq!(rest.last().unwrap()["exit"]["exitCode"], 0);

    let mut attached = VarlinkStream::start(
        &address,
        &format!("{M}StartProcess"),
        &json!({ "id": id, "process": { "argv": ["sh", "-c", "echo up; sleep 300"] } }).to_string(),
    );
    let pid = attached.next(Duration::from_secs(30)).unwrap()["pid"]
        .as_u64()
        .unwrap();
    attached.next(Duration::from_secs(30)).unwrap();
    attached.kill();
    kiln_testkit::wait_until(
        Duration::from_secs(10),
        "the abandoned process killed",
        || {
            if pid_alive_in_guest(&k, &id, pid) {
                Err("alive")
            } else {
                Ok(())
            }
        },
    );

    // --- Bad input: named errors.
    assert_eq!(
        err(
            &k,
            "StartProcess",
            json!({ "id": id, "process": { "argv": [] } })
        ),
        format!("{M}InvalidArgument")
    );
    assert_eq!(
        err(
            &k,
            "SignalProcess",
            json!({ "id": id, "handle": 99999, "signal": 9 })
        ),
        format!("{M}NoSuchProcess")
    );
    assert_eq!(
        err(
            &k,
            "StartProcess",
            json!({ "id": "000000000000", "process": { "argv": ["true"] } })
        ),
        format!("{M}NoSuchVM")
    );

    terminal(&k, &id);
    files(&k, &id);
    dbus(&k, &id);
    doc_examples(&k, &id);
}

/// The varlink example of docs/api.md runs verbatim against this VM.
fn doc_examples(k: &DbusKilnd, id: &str) {
    let script = api_doc_script(
        "## Processes, terminals and files",
        &[
            (
                "SOCK=unix:/run/kiln/io.kiln.Manager",
                format!("SOCK={}", k.kilnd.varlink_address()),
            ),
            ("ID=0123456789ab", format!("ID={id}")),
        ],
    );
    let stdout = run_bash(&script, &k.log());
    assert_eq!(stdout, "line 1\nline 2\nline 3\nexit 0\n");
}

/// A shell on a terminal: the descriptor from the first reply, `tty` and
/// `stty size`, a resize, and the exit code in the last reply.
fn terminal(k: &DbusKilnd, id: &str) {
    let mut client = FdClient::connect(&k.kilnd.varlink_address());
    client.call(
        &format!("{M}StartProcess"),
        json!({ "id": id, "process": { "argv": ["sh"], "tty": { "rows": 24, "cols": 80 } } }),
        true,
        &[],
    );
    let (opening, fds) = client.reply();
    assert_eq!(opening["parameters"]["terminal"], 0, "{opening}");
    let handle = opening["parameters"]["handle"].as_u64().unwrap();
    let mut tty = std::fs::File::from(fds.into_iter().next().expect("the terminal"));
    let mut seen = String::new();
    tty.write_all(b"tty; stty size\n").unwrap();
    read_until(&mut tty, &mut seen, "24 80");
    assert!(seen.contains("/dev/pts/"), "{seen}");
    k.varlinkctl(
        "ResizeProcess",
        json!({ "id": id, "handle": handle, "rows": 40, "cols": 100 }),
    );
    tty.write_all(b"stty size\n").unwrap();
    read_until(&mut tty, &mut seen, "40 100");
    tty.write_all(b"exit 3\n").unwrap();
    let (last, _) = client.reply();
    assert_eq!(last["parameters"]["exit"]["exitCode"], 3, "{last}");
}

/// A random 100 MiB file and a small tree in, the same out: equal
/// checksums, modes kept; bad targets refused with their names.
fn files(k: &DbusKilnd, id: &str) {
    let address = k.kilnd.varlink_address();
    let mut big = vec![0u8; 100 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in big.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let bytes = seed.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let want = hex(&Sha256::digest(&big));

    // The archive: tree/, tree/big.bin (0600), tree/sub/ (0750),
    // tree/sub/script.sh (0755), tree/link -> sub/script.sh.
    let archive = tempfile::tempfile().unwrap();
    {
        let mut builder = tar::Builder::new(&archive);
        let dir = |path: &str, mode: u32, builder: &mut tar::Builder<&std::fs::File>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            builder.append_data(&mut h, path, std::io::empty()).unwrap();
        };
        dir("tree", 0o755, &mut builder);
        dir("tree/sub", 0o750, &mut builder);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(big.len() as u64);
        builder
            .append_data(&mut h, "tree/big.bin", &big[..])
            .unwrap();
        let script = b"#!/bin/sh\necho hi\n";
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(script.len() as u64);
        builder
            .append_data(&mut h, "tree/sub/script.sh", &script[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder
            .append_link(&mut h, "tree/link", "sub/script.sh")
            .unwrap();
        builder.finish().unwrap();
    }
    let copy_in = |params: Value, archive: &std::fs::File| {
        use std::io::Seek;
        let mut file = archive;
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut client = FdClient::connect(&address);
        client.call(&format!("{M}CopyIn"), params, false, &[archive.as_fd()]);
        client.reply().0
    };
    let started = Instant::now();
    let reply = copy_in(json!({ "id": id, "path": "/tmp" }), &archive);
    let took_in = started.elapsed();
    assert_eq!(reply["parameters"]["bytes"], (100 << 20) + 18, "{reply}");
    let listing = k.varlinkctl("ExecVM",
        json!({ "id": id, "command": ["sh", "-c",
            "stat -c '%n %a' /tmp/tree/big.bin /tmp/tree/sub /tmp/tree/sub/script.sh; readlink /tmp/tree/link; /tmp/tree/link; sha256sum /tmp/tree/big.bin"] }),
    );
    let text = listing["stdout"].as_str().unwrap();
    for line in [
        "/tmp/tree/big.bin 600",
        "/tmp/tree/sub 750",
        "/tmp/tree/sub/script.sh 755",
        "sub/script.sh",
        "hi",
        &want,
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }

    // Out again through a pipe, as a tar.
    let started = Instant::now();
    let mut client = FdClient::connect(&address);
    client.call(
        &format!("{M}CopyOut"),
        json!({ "id": id, "path": "/tmp/tree" }),
        true,
        &[],
    );
    let (opening, fds) = client.reply();
    assert_eq!(opening["parameters"]["archive"], 0, "{opening}");
    let pipe: OwnedFd = fds.into_iter().next().unwrap();
    let mut tar = tar::Archive::new(std::fs::File::from(pipe));
    let mut seen = Vec::new();
    let mut got_sha = String::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mode = entry.header().mode().unwrap();
        if path == "tree/big.bin" {
            let mut hasher = Sha256::new();
            std::io::copy(&mut entry, &mut hasher).unwrap();
            got_sha = hex(&hasher.finalize());
        }
        seen.push(format!("{path} {mode:o}"));
    }
    let took_out = started.elapsed();
    let (last, _) = client.reply();
    assert_eq!(last["parameters"]["entries"], 5, "{last}");
    assert_eq!(got_sha, want, "the 100 MiB file came back different");
    for entry in [
        "tree 755",
        "tree/big.bin 600",
        "tree/sub 750",
        "tree/sub/script.sh 755",
        "tree/link 777",
    ] {
        assert!(seen.iter().any(|s| s == entry), "{entry} not in {seen:?}");
    }
    println!("100 MiB in {took_in:?}, out {took_out:?}");

    // Refusals.
    let missing = copy_in(json!({ "id": id, "path": "/nonexistent" }), &archive);
    assert_eq!(missing["error"], format!("{M}NoSuchFile"), "{missing}");
    let over = copy_in(
        json!({ "id": id, "path": "/tmp", "maxBytes": 1000 }),
        &archive,
    );
    assert_eq!(over["error"], format!("{M}FileTooLarge"), "{over}");
    let relative = copy_in(json!({ "id": id, "path": "tmp" }), &archive);
    assert_eq!(
        relative["error"],
        format!("{M}InvalidArgument"),
        "{relative}"
    );
    let mut no_fd = FdClient::connect(&address);
    no_fd.call(
        &format!("{M}CopyIn"),
        json!({ "id": id, "path": "/tmp" }),
        false,
        &[],
    );
    assert_eq!(no_fd.reply().0["error"], format!("{M}InvalidArgument"));
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    // `append_data` refuses "..": write the name into the header directly.
    h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let evil_file = tempfile::tempfile().unwrap();
    (&evil_file).write_all(&evil.into_inner().unwrap()).unwrap();
    let refused = copy_in(json!({ "id": id, "path": "/tmp" }), &evil_file);
    assert_eq!(refused["error"], format!("{M}FileFailed"), "{refused}");
    let mut out = FdClient::connect(&address);
    out.call(
        &format!("{M}CopyOut"),
        json!({ "id": id, "path": "/no/such" }),
        true,
        &[],
    );
    let (_, _) = out.reply();
    assert_eq!(out.reply().0["error"], format!("{M}NoSuchFile"));
}

/// The D-Bus methods with a zbus client: output through the returned
/// pipes, the exit by `WaitProcess`, an archive out through a returned
/// descriptor.
fn dbus(k: &DbusKilnd, id: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = zbus::connection::Builder::address(k.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let path = format!("/io/kiln/Kiln1/vm/{id}");
        let reply = conn
            .call_method(
                Some("io.kiln.Kiln1"),
                path.as_str(),
                Some(VM_IF),
                "StartProcess",
                &(
                    vec![
                        "sh",
                        "-c",
                        "echo out; echo err >&2; read x; echo got $x; exit 4",
                    ],
                    Vec::<String>::new(),
                    "",
                    false,
                    0u16,
                    0u16,
                    true,
                    false,
                ),
            )
            .await
            .unwrap();
        let (handle, _pid, fds): (u64, u32, Vec<zbus::zvariant::OwnedFd>) =
            reply.body().deserialize().unwrap();
        assert_eq!(fds.len(), 3);
        let mut fds = fds.into_iter().map(OwnedFd::from);
        let (out, errs, input) = (
            fds.next().unwrap(),
            fds.next().unwrap(),
            fds.next().unwrap(),
        );
        std::fs::File::from(input).write_all(b"hello\n").unwrap();
        let mut stdout = String::new();
        std::fs::File::from(out)
            .read_to_string(&mut stdout)
            .unwrap();
        let mut stderr = String::new();
        std::fs::File::from(errs)
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(stdout, "out\ngot hello\n");
        assert_eq!(stderr, "err\n");
        let reply = conn
            .call_method(
                Some("io.kiln.Kiln1"),
                path.as_str(),
                Some(VM_IF),
                "WaitProcess",
                &(handle, 30u32),
            )
            .await
            .unwrap();
        let exit: (i32, i32) = reply.body().deserialize().unwrap();
        assert_eq!(exit, (4, 0));

        let reply = conn
            .call_method(
                Some("io.kiln.Kiln1"),
                path.as_str(),
                Some(VM_IF),
                "CopyOut",
                &("/tmp/tree/sub", "", 0u64),
            )
            .await
            .unwrap();
        let fd: zbus::zvariant::OwnedFd = reply.body().deserialize().unwrap();
        let mut tar = tar::Archive::new(std::fs::File::from(OwnedFd::from(fd)));
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["sub", "sub/script.sh"]);

        let error = conn
            .call_method(
                Some("io.kiln.Kiln1"),
                path.as_str(),
                Some(VM_IF),
                "SignalProcess",
                &(99_999u64, 9i32),
            )
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("io.kiln.Kiln1.Error.NoSuchProcess"),
            "{error}"
        );
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
