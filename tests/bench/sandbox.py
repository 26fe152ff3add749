"""Sandbox calls: streamed exec, file copies, snapshots, restores, forks.

exec            a command that prints, sleeps 1 s and prints again: the
                first output byte of a streamed StartProcess (varlink
                `more`) against a buffered ExecVM of the same command (its
                reply is the first the caller sees of it); and both for an
                instant `echo`, the calls' own cost;
copy            CopyIn and CopyOut of a random file as a tar on a passed
                descriptor (the host <-> guest TCP throughput of the network
                phase is the path to compare with, measured in the same run);
snapshot        SnapshotVM of a running VM, RestoreVM to the agent
                answering, ForkVM of 1 and of N, against plain QEMU with the
                same argv: `migrate` to a file, and a new QEMU `-incoming`
                from it to the agent answering (a full RAM load, no sharing).
"""
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time

from boots import kilnd_cold_argv, retarget
from kiln import Kilnd, Qmp, VarlinkConnection, agent_ping, log

STREAM_FIRST = "sandbox: first output, streamed StartProcess (echo; sleep 1; echo)"
BUFFERED = "sandbox: buffered ExecVM reply (echo; sleep 1; echo)"
STREAM_ECHO = "sandbox: first output, streamed StartProcess (echo)"
BUFFERED_ECHO = "sandbox: buffered ExecVM reply (echo)"
COPY_IN = "sandbox: CopyIn of the test file"
COPY_OUT = "sandbox: CopyOut of the test file"
SNAPSHOT = "sandbox: kilnd SnapshotVM"
RAW_SAVE = "sandbox: raw QEMU migrate to a file"
RESTORE = "sandbox: kilnd RestoreVM to agent"
RAW_RESTORE = "sandbox: raw QEMU -incoming from the file to agent"
FORK_1 = "sandbox: kilnd ForkVM count=1"

SCRIPT = "echo start; sleep 1; echo end"


def first_output(conn, vm_id, argv):
    """StartProcess with `more`: ms to the first reply carrying output; reads to the exit."""
    t0 = time.monotonic()
    conn.send("io.kiln.Manager.StartProcess", {"id": vm_id, "process": {"argv": argv}}, more=True)
    first = None
    while True:
        reply = conn.recv(timeout=120)
        if "error" in reply:
            raise RuntimeError(f"StartProcess: {reply}")
        params = reply.get("parameters", {})
        if first is None and params.get("output"):
            first = (time.monotonic() - t0) * 1000
        if not reply.get("continues"):
            return first


def buffered(conn, vm_id, argv):
    t0 = time.monotonic()
    conn.call("ExecVM", {"id": vm_id, "command": argv})
    return (time.monotonic() - t0) * 1000


def exec_rows(conn, vm_id, rounds):
    out = {STREAM_FIRST: [], BUFFERED: [], STREAM_ECHO: [], BUFFERED_ECHO: []}
    for _ in range(rounds):
        out[STREAM_FIRST].append(first_output(conn, vm_id, ["sh", "-c", SCRIPT]))
        out[BUFFERED].append(buffered(conn, vm_id, ["sh", "-c", SCRIPT]))
        out[STREAM_ECHO].append(first_output(conn, vm_id, ["echo", "hi"]))
        out[BUFFERED_ECHO].append(buffered(conn, vm_id, ["echo", "hi"]))
    return out


def call_with_fd(sock_path, method, params, fd=None, more=False):
    """One varlink call passing `fd`; the replies and the descriptors they carried."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    msg = {"method": f"io.kiln.Manager.{method}", "parameters": params}
    if more:
        msg["more"] = True
    data = json.dumps(msg).encode() + b"\0"
    if fd is None:
        s.sendall(data)
    else:
        socket.send_fds(s, [data], [fd])
    return s


def read_replies(s, want):
    """Up to `want` replies and the fds that came with them."""
    buf, fds, replies = b"", [], []
    while len(replies) < want:
        chunk, got, _, _ = socket.recv_fds(s, 1 << 20, 4)
        if not chunk:
            break
        fds.extend(got)
        buf += chunk
        while b"\0" in buf:
            frame, buf = buf.split(b"\0", 1)
            replies.append(json.loads(frame))
    return replies, fds


def copy_rows(kilnd, vm_id, mib, rounds, work):
    # Into the guest's /tmp, a tmpfs of half its RAM: 64 MiB overflowed a
    # default 128 MiB guest's /tmp (ENOSPC, the full run of 2026-12-04) and
    # 32 MiB ran one out of memory (about 48 MiB available, 2026-12-05):
    # 16 MiB in both plans. (A larger VM would change the snapshot rows.)
    payload = os.urandom(mib << 20)
    archive = os.path.join(work, "in.tar")
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("bench.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    out = {COPY_IN: [], COPY_OUT: []}
    for _ in range(rounds):
        with open(archive, "rb") as f:
            t0 = time.monotonic()
            s = call_with_fd(kilnd.sock, "CopyIn", {"id": vm_id, "path": "/tmp"}, f.fileno())
            replies, _ = read_replies(s, 1)
            s.close()
        if "error" in replies[0]:
            raise RuntimeError(f"CopyIn: {replies[0]}")
        out[COPY_IN].append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        s = call_with_fd(kilnd.sock, "CopyOut", {"id": vm_id, "path": "/tmp/bench.bin"}, more=True)
        replies, fds = read_replies(s, 1)
        with os.fdopen(fds[0], "rb") as pipe:
            with tarfile.open(fileobj=pipe, mode="r|") as tar:
                for member in tar:
                    data = tar.extractfile(member).read()
        last, _ = read_replies(s, 1)
        s.close()
        out[COPY_OUT].append((time.monotonic() - t0) * 1000)
        if data != payload or "error" in last[0]:
            raise RuntimeError("CopyOut returned other bytes")
    mibs = {name: round(mib / (sorted(v)[len(v) // 2] / 1000), 1) for name, v in out.items()}
    return out, {f"{name}, MiB/s (median, {mib} MiB)": v for name, v in mibs.items()}


def raw_save_restore(argv, vm_dir, vm_id, work, rounds):
    """Plain QEMU with kilnd's argv: boot, migrate to a file, restore it."""
    saves, restores = [], []
    for i in range(rounds):
        run = os.path.join(work, f"rawsnap{i}")
        os.makedirs(run)
        raw = retarget(argv, vm_dir, vm_id, run)
        qemu = subprocess.Popen(raw, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        state = os.path.join(run, "state")
        try:
            agent_ping(os.path.join(run, "agent.sock"), time.monotonic() + 180)
            qmp = Qmp(os.path.join(run, "qmp.sock"), timeout=30, pause=0.001)
            t0 = time.monotonic()
            qmp.cmd("stop")
            qmp.cmd("migrate", uri=f"file:{state}")
            while qmp.cmd("query-migrate").get("status") not in ("completed", "failed"):
                time.sleep(0.002)
            saves.append((time.monotonic() - t0) * 1000)
        finally:
            qemu.kill()
            qemu.wait()
        for sock in ("qmp.sock", "agent.sock"):
            try:
                os.unlink(os.path.join(run, sock))
            except OSError:
                pass
        t0 = time.monotonic()
        qemu = subprocess.Popen(raw + ["-incoming", "defer"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            qmp = Qmp(os.path.join(run, "qmp.sock"), timeout=30, pause=0.001)
            qmp.cmd("migrate-incoming", uri=f"file:{state}")
            while qmp.cmd("query-status")["status"] == "inmigrate":
                time.sleep(0.002)
            qmp.cmd("cont")
            agent_ping(os.path.join(run, "agent.sock"), t0 + 60)
            restores.append((time.monotonic() - t0) * 1000)
        finally:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(run, ignore_errors=True)
    return {RAW_SAVE: saves, RAW_RESTORE: restores}


def snapshot_rows(conn, vm_id, rounds, fork_n):
    out = {SNAPSHOT: [], RESTORE: [], FORK_1: [], f"sandbox: kilnd ForkVM count={fork_n}": []}
    for i in range(rounds):
        t0 = time.monotonic()
        conn.call("SnapshotVM", {"id": vm_id, "name": f"bench{i}"})
        out[SNAPSHOT].append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        vm = conn.call("RestoreVM", {"snapshot": f"bench{i}"})["vm"]
        out[RESTORE].append((time.monotonic() - t0) * 1000)
        conn.call("DeleteVM", {"id": vm["id"]})
        conn.call("DeleteSnapshot", {"name": f"bench{i}"})
        for count, name in ((1, FORK_1), (fork_n, f"sandbox: kilnd ForkVM count={fork_n}")):
            t0 = time.monotonic()
            vms = conn.call("ForkVM", {"id": vm_id, "count": count})["vms"]
            out[name].append((time.monotonic() - t0) * 1000)
            for v in vms:
                conn.call("DeleteVM", {"id": v["id"]})
    return out


def run(plan):
    """The sandbox rows; (samples, extra)."""
    samples, extra = {}, {}
    work = tempfile.mkdtemp(prefix="kiln-bench-sandbox-", dir="/tmp")
    try:
        with Kilnd() as k:
            argv, vm_dir, vm_id = kilnd_cold_argv(k)
            conn = VarlinkConnection(k.sock)
            vm = conn.call("CreateVM", {"name": "sandbox"})["vm"]
            conn.call("StartVM", {"id": vm["id"]})
            samples.update(exec_rows(conn, vm["id"], plan["exec"]))
            copied, rates = copy_rows(k, vm["id"], plan["copy_mib"], plan["copy"], work)
            samples.update(copied)
            extra.update(rates)
            samples.update(snapshot_rows(conn, vm["id"], plan["snapshots"], plan["fork_n"]))
            samples.update(raw_save_restore(argv, vm_dir, vm_id, work, plan["raw_snapshots"]))
            conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("sandbox: " + ", ".join(f"{n.split(': ', 1)[1]} {sorted(v)[len(v) // 2]:.0f} ms"
                                for n, v in samples.items() if v))
    return samples, extra
