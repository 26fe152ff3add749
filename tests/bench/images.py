"""Images and containers: pulling an image, and an image's first output.

The image is built here, byte for byte (no image comes from the internet):
five gzip layers, ~50 MB uncompressed — busybox-static, incompressible
noise, compressible text, many small files, one small file — written as an
OCI layout and pushed with skopeo to Debian's `docker-registry`, started
on 127.0.0.1 with its own config and storage for this phase only. A kilnd
of its own lists that registry in image_insecure_registries.

image: kilnd PullImage ...   PullImage into an empty store (the previous
                             round's image removed and its files collected)
                             against its floor, alternating: `skopeo copy
                             docker://... oci:DIR` plus mkfs.erofs of every
                             layer blob with kilnd's flags, one after the
                             other as kilnd does; then PullImage again, a
                             cache hit (the manifest only), against one
                             GET of the manifest on a fresh connection.
image: ... first output      from the call to the moment the container's
                             first stdout line ("ready") can be read:
                             - Acquire from a per-image template pool: its
                               clones resume with the container running;
                             - Acquire from a generic template pool, then
                               AddContainer; one template loads the guest's
                               container modules at boot, one on demand.
                               The three pools hold one VM hot (max 1, so
                               no refill clone competes for the cores);
                             - CreateVM with the image + StartVM (a cold
                               boot), against raw QEMU with that VM's argv
                               (the layers on it, as kilnd launches it) and
                               the agent's StartContainer (its floor);
                             - `runc run` of the same image unpacked on the
                               host: no VM at all, the pools' floor (crun
                               would be lower, but refuses the development
                               machines' hybrid cgroup hierarchy: "cgroups in
                               hybrid mode not supported").
                             All of them poll the container's output every
                             10 ms: ContainerLogs' own follow (`more`) polls
                             the guest every 200 ms, too coarse here.
PSS                          of N idle VMs of the per-image pool and of the
                             generic one (modules at boot), per VM.
"""
import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time

import procfs
from boots import retarget
from kiln import Agent, Kilnd, Qmp, VarlinkConnection, argv_of, delete_pool, log, pool_vms, wait_pool

PULL = "image: kilnd PullImage, empty store"
PULL_FLOOR = "image: skopeo copy + mkfs.erofs per layer (pull floor)"
PULL_CACHED = "image: kilnd PullImage again (cache hit)"
MANIFEST_GET = "image: registry manifest GET (cache-hit floor)"
HOT_BOOT = "image: hot VM + AddContainer to first output (modules loaded at boot)"
HOT_DEMAND = "image: hot VM + AddContainer to first output (modules on demand)"
COLD = "image: kilnd CreateVM+StartVM with the image to first output"
RAW = "image: raw QEMU with the layers + StartContainer to first output"
RUNC = "image: runc run on the host to first output"
PER_IMAGE = "image: per-image pool, Acquire to first output (started in the template)"

TAG = "v1"
ENV = ["PATH=/bin"]
# The container prints a line and stays: "first output" is that line.
COMMAND = ["/bin/sh", "-c", "echo ready; exec /bin/busybox sleep 100000"]
# What kilnd runs for a gzip layer (image/src/convert.rs).
MKFS = ["mkfs.erofs", "--quiet", "-b4096", "--tar=f", "--aufs", "--ungzip"]
POLL_S = 0.01
# The agent's own account of a StartContainer, in the guest's kernel log.
AGENT_LOG = re.compile(r"container app started as pid \d+ \(\d+ layers; modules (\d+) ms, disks (\d+) ms, "
                       r"mounts (\d+) ms, started (\d+) ms\)")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# ----- the image --------------------------------------------------------------


def tar_layer(entries):
    """An uncompressed tar of (kind, name, data) entries: "dir", "file" (data:
    bytes, mode 0755 when the name is under bin/), "link" (data: target).
    USTAR: plain headers only (no PAX or GNU extensions), fixed mtime and
    owner, so the layers are the same bytes every run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid = 1_700_000_000, 0, 0
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, data, 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if name.startswith("bin/") else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def text(rng, size):
    """`size` bytes of log-like lines: gzip makes them ~4x smaller."""
    lines, total = [], 0
    while total < size:
        line = (f"{total:010d} INFO request id={rng.getrandbits(64):016x} path=/api/v1/items/"
                f"{rng.randrange(1000)} status={rng.choice((200, 200, 200, 404, 500))} "
                f"bytes={rng.randrange(65536)}\n")
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def layers():
    """The image's layer tars, lowest first (the same bytes every run)."""
    rng = random.Random(14)
    mib = 1 << 20
    with open(shutil.which("busybox") or "/bin/busybox", "rb") as f:
        busybox = f.read()
    return [
        tar_layer([("dir", "bin", None), ("file", "bin/busybox", busybox), ("link", "bin/sh", "busybox"),
                   ("dir", "etc", None), ("file", "etc/hello", b"hello from the base layer\n")]),
        tar_layer([("dir", "opt", None), ("dir", "opt/noise", None)] +
                  [("file", f"opt/noise/{i}.bin", rng.randbytes(4 * mib)) for i in range(5)]),
        tar_layer([("dir", "usr", None), ("dir", "usr/share", None), ("dir", "usr/share/logs", None)] +
                  [("file", f"usr/share/logs/{i}.log", text(rng, mib)) for i in range(16)]),
        tar_layer([("dir", "srv", None), ("dir", "srv/data", None), ("dir", "srv/small", None)] +
                  [("file", f"srv/data/{i}.bin", rng.randbytes(128 << 10)) for i in range(64)] +
                  [("file", f"srv/small/{i}.txt", text(rng, 1024)) for i in range(1000)]),
        tar_layer([("dir", "srv", None), ("file", "srv/app.txt", b"app layer\n")]),
    ]


def write_layout(dir_, tars=None):
    """An OCI layout at `dir_` holding the image of `tars` (default: this
    phase's layers) tagged TAG; a description."""
    os.makedirs(os.path.join(dir_, "blobs", "sha256"))

    def blob(media_type, data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(dir_, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    tars = layers() if tars is None else tars
    # gzip level 6, what registries usually hold (docker's and skopeo's default).
    descs = [blob("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(t, 6, mtime=0)) for t in tars]
    config = {"architecture": "amd64", "os": "linux", "created": "2024-05-01T00:00:00Z",
              "config": {"Cmd": ["/bin/sh"], "Env": ENV},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars]}}
    config_desc = blob("application/vnd.oci.image.config.v1+json", json.dumps(config).encode())
    manifest = blob(OCI_MANIFEST, json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                              "config": config_desc, "layers": descs}).encode())
    manifest["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    with open(os.path.join(dir_, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest]}, f)
    with open(os.path.join(dir_, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return {"layers": len(tars), "uncompressed_mib": round(sum(map(len, tars)) / (1 << 20), 1),
            "compressed_mib": round(sum(d["size"] for d in descs) / (1 << 20), 1),
            "layer_mib": [round(len(t) / (1 << 20), 1) for t in tars]}


def layout_layers(dir_):
    """The layer blob paths of the one image in the OCI layout at `dir_`."""
    def read(digest):
        return os.path.join(dir_, "blobs", "sha256", digest.split(":", 1)[1])

    with open(os.path.join(dir_, "index.json")) as f:
        manifest = json.load(f)["manifests"][0]
    with open(read(manifest["digest"])) as f:
        return [read(layer["digest"]) for layer in json.load(f)["layers"]]


# ----- the registry -------------------------------------------------------------


class Registry:
    """Debian's docker-registry on 127.0.0.1 (anonymous, plain HTTP), as
    testkit/src/registry.rs starts it, its config and storage under `work`;
    stopped on exit."""

    def __init__(self, work):
        self.dir = os.path.join(work, "registry")
        os.makedirs(self.dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self):
        config = os.path.join(self.dir, "config.yml")
        with open(config, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.dir}/storage\n  delete:\n    enabled: true\n"
                    f"http:\n  addr: {self.host}\n")
        self.log = open(os.path.join(self.dir, "registry.log"), "w")
        self.proc = subprocess.Popen(["docker-registry", "serve", config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"docker-registry did not start: {open(self.log.name).read()[-2000:]}")
                time.sleep(0.05)

    def push(self, layout, name):
        """Push TAG of the layout as `name`, layers exactly as built."""
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                        "--preserve-digests", f"oci:{layout}:{TAG}", f"docker://{self.host}/{name}"],
                       check=True, capture_output=True)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()
        return False


# ----- pulls --------------------------------------------------------------------


def floor_pull(ref, dest):
    """What a pull has to do, with the plain tools: skopeo copies (and
    verifies) the image into an OCI layout, then mkfs.erofs converts each
    layer blob, one after the other. ms."""
    t0 = time.monotonic()
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                    "--preserve-digests", f"docker://{ref}", f"oci:{dest}:{TAG}"], check=True, capture_output=True)
    for i, blob in enumerate(layout_layers(dest)):
        with open(blob, "rb") as f:
            subprocess.run(MKFS + [os.path.join(dest, f"{i}.erofs")], stdin=f, check=True, capture_output=True)
    ms = (time.monotonic() - t0) * 1000
    shutil.rmtree(dest)
    return ms


def empty_store(conn, kilnd, ref, timeout=60):
    """Remove the image and wait until the store's collection freed its
    layers, so the next pull converts every one again."""
    conn.call("RemoveImage", {"image": ref})
    erofs = os.path.join(kilnd.work, "state", "images", "erofs", "sha256")
    deadline = time.monotonic() + timeout
    while os.path.isdir(erofs) and os.listdir(erofs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the image store kept {os.listdir(erofs)} after RemoveImage")
        time.sleep(0.02)


def manifest_get(ref):
    """One GET of the manifest by tag on a fresh connection (plain HTTP, as
    for an insecure registry): all a cache hit needs from the registry. ms."""
    host, path = ref.split("/", 1)
    repo, tag = path.rsplit(":", 1)
    t0 = time.perf_counter()
    client = http.client.HTTPConnection(host, timeout=10)
    client.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    reply = client.getresponse()
    reply.read()
    client.close()
    if reply.status != 200:
        raise RuntimeError(f"GET manifest of {ref}: HTTP {reply.status}")
    return (time.perf_counter() - t0) * 1000


def pulls(conn, kilnd, ref, rounds, cached, work):
    """Pull and floor alternating from an empty store, then cache hits and
    manifest GETs alternating. The image stays stored for the container
    scenarios."""
    out = {PULL: [], PULL_FLOOR: [], PULL_CACHED: [], MANIFEST_GET: []}
    for i in range(rounds):
        out[PULL_FLOOR].append(floor_pull(ref, os.path.join(work, f"floor{i}")))
        t0 = time.monotonic()
        image = conn.call("PullImage", {"reference": ref})["image"]
        out[PULL].append((time.monotonic() - t0) * 1000)
        log(f"pull {i + 1}/{rounds}: kilnd {out[PULL][-1]:.0f} ms, floor {out[PULL_FLOOR][-1]:.0f} ms")
        if i < rounds - 1:
            empty_store(conn, kilnd, ref)
    for _ in range(cached):
        out[MANIFEST_GET].append(manifest_get(ref))
        t0 = time.perf_counter()
        conn.call("PullImage", {"reference": ref})
        out[PULL_CACHED].append((time.perf_counter() - t0) * 1000)
    return out, image


# ----- first output -------------------------------------------------------------


def wait_ready(read_stdout, t0, timeout=120):
    """Poll `read_stdout()` until it holds the "ready" line; ms since t0."""
    deadline = time.monotonic() + timeout
    while "ready\n" not in read_stdout():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no 'ready' from the container in {timeout} s")
        time.sleep(POLL_S)
    return (time.monotonic() - t0) * 1000


def stdout_of(logs):
    return "".join(e["text"] for e in logs["entries"] if e["stream"] == "stdout")


def kilnd_stdout(conn, vm_id, name):
    """A reader of container `name`'s stdout through kilnd's ContainerLogs."""
    return lambda: stdout_of(conn.call("ContainerLogs", {"id": vm_id, "name": name}))


def hot_attach(conn, pool, ref):
    """Acquire a hot VM of a generic pool and add the image's container.
    Returns ms from the Acquire call to the first output, and the parts:
    Acquire's and AddContainer's replies, and the agent's StartContainer
    from the guest's log (read after the timing)."""
    t0 = time.monotonic()
    vm_id = conn.call("Acquire", {"pool": pool, "timeoutMs": 0})["vm"]["id"]
    acquired = (time.monotonic() - t0) * 1000
    conn.call("AddContainer", {"id": vm_id, "spec": {"name": "app", "image": ref, "command": COMMAND}})
    added = (time.monotonic() - t0) * 1000
    first = wait_ready(kilnd_stdout(conn, vm_id, "app"), t0)
    dmesg = conn.call("ExecVM", {"id": vm_id, "command": ["dmesg"]})["stdout"]
    conn.call("Release", {"id": vm_id})
    m = AGENT_LOG.search(dmesg)
    agent = dict(zip(("modules", "disks", "mounts", "total"), map(float, m.groups()))) if m else {}
    return first, {"acquire": acquired, "add_container": added, **{f"agent_{k}": v for k, v in agent.items()}}


def per_image_acquire(conn, pool):
    """Acquire a hot VM of a per-image pool: the clone resumes with its
    container running (the line was printed in the template, before the
    save), so this is Acquire plus reading the output. As hot_attach."""
    t0 = time.monotonic()
    vm_id = conn.call("Acquire", {"pool": pool, "timeoutMs": 0})["vm"]["id"]
    acquired = (time.monotonic() - t0) * 1000
    first = wait_ready(kilnd_stdout(conn, vm_id, "main"), t0)
    conn.call("Release", {"id": vm_id})
    return first, {"acquire": acquired}


def wait_full(conn, pools, n, timeout=300):
    """Wait until every pool has n hot and nothing cloning; a failed pool
    (a per-image template that cannot start its container) raises."""
    def full(p):
        if p["state"] == "failed":
            raise RuntimeError(f"pool {p['name']} failed: {p.get('lastError')}")
        return p["hot"] == n and p["booting"] == 0
    for pool in pools:
        wait_pool(conn, pool, full, timeout=timeout)


def runc_bundle(layout, dir_):
    """The image as a runc bundle: its layers unpacked in order (our own
    layers: no whiteouts to apply) and `runc spec`'s default config with the
    same process, no terminal and a writable root as in the guest."""
    rootfs = os.path.join(dir_, "rootfs")
    os.makedirs(rootfs)
    for blob in layout_layers(layout):
        with tarfile.open(blob, "r:gz") as tar:
            tar.extractall(rootfs)
    subprocess.run(["runc", "spec"], cwd=dir_, check=True)
    path = os.path.join(dir_, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"].update(terminal=False, args=COMMAND, env=ENV, cwd="/")
    config["root"]["readonly"] = False
    with open(path, "w") as f:
        json.dump(config, f)
    return dir_


def runc_run(bundle, state, name):
    """`runc run` until the container's first line on stdout; ms."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["runc", "--root", state, "run", "--bundle", bundle, name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    ms = (time.monotonic() - t0) * 1000
    subprocess.run(["runc", "--root", state, "delete", "--force", name], capture_output=True)
    proc.wait()
    if line != b"ready\n":
        raise RuntimeError(f"runc run: {line!r} {proc.stderr.read().decode()[-2000:]}")
    return ms


def cold(conn, ref, name):
    """CreateVM with the image + StartVM until its first output: (ms, the
    VM's QEMU argv, its id)."""
    t0 = time.monotonic()
    vm = conn.call("CreateVM", {"name": name, "spec": {"image": ref, "command": COMMAND}})["vm"]
    vm = conn.call("StartVM", {"id": vm["id"]})["vm"]
    ms = wait_ready(kilnd_stdout(conn, vm["id"], "main"), t0)
    argv = argv_of(vm["pid"])
    conn.call("DeleteVM", {"id": vm["id"]})
    return ms, argv, vm["id"]


def raw_cold(argv, run_dir, erofs):
    """Raw QEMU with a kilnd VM's argv, then what kilnd does for the image:
    StartContainer through the agent once it answers; ms until the first
    output. kilnd puts a VM's layers on its command line (so they are in
    argv); an argv without them gets them hot-plugged first, target 0 and
    LUN = layer, as kilnd's AddContainer does."""
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    agent = qmp = None
    try:
        agent = Agent(os.path.join(run_dir, "agent.sock"), connect_timeout=60)
        agent.sync_ping(180)
        serials = [f"kiln-0-{lun}" for lun in range(len(erofs))]
        if not any("kiln-disk-0-0" in a for a in argv):
            qmp = Qmp(os.path.join(run_dir, "qmp.sock"), timeout=30)
            for lun, path in enumerate(erofs):
                qmp.add_disk(path, serials[lun], lun)
        agent.call("io.kiln.Agent.StartContainer", {"id": "main", "layers": serials,
                                                    "process": {"args": COMMAND, "env": ENV, "cwd": "/"}})
        return wait_ready(lambda: stdout_of(agent.call("io.kiln.Agent.ContainerLogs", {"id": "main"})), t0)
    finally:
        for c in (agent, qmp):
            if c:
                c.close()
        qemu.kill()
        qemu.wait()


def hot_rows(conn, ref, bundle, plan, out, extra):
    """runc and the three pools, each sample from a pool holding one hot VM,
    in a rotating order. Then the PSS of idle VMs of the per-image pool and
    of the generic one. The pools are deleted at the end."""
    # The guest's docs (docs/agent-protocol.md): a template whose clones
    # get images should load the container modules at boot; the default is
    # on demand. The per-image pool's template runs the container itself.
    pools = {"img-image": (PER_IMAGE, {"image": ref, "command": COMMAND}),
             "img-boot": (HOT_BOOT, {"cmdline": "kiln.container_modules=boot"}),
             "img-demand": (HOT_DEMAND, {})}
    # max 1: while its one VM is leased a pool cannot refill, so no clone
    # competes with the sample for the 2 cores; it refills after Release.
    for pool, (_, vm) in pools.items():
        conn.call("CreatePool", {"name": pool, "spec": {"mode": "template", "warm": 1, "max": 1, "vm": vm}})
    out.update({RUNC: [], **{name: [] for name, _ in pools.values()}})
    breakdown = {name: {} for name, _ in pools.values()}
    order = list(pools.items())
    try:
        for i in range(plan["first_output"]):
            out[RUNC].append(runc_run(bundle, os.path.join(os.path.dirname(bundle), "runc"), f"kiln-bench-{i}"))
            for pool, (name, vm) in order[i % 3:] + order[: i % 3]:
                wait_full(conn, pools, 1)
                first, parts = per_image_acquire(conn, pool) if "image" in vm else hot_attach(conn, pool, ref)
                out[name].append(first)
                for part, ms in parts.items():
                    breakdown[name].setdefault(part, []).append(ms)
            log(f"first output {i + 1}/{plan['first_output']}: runc {out[RUNC][-1]:.0f} ms, "
                + ", ".join(f"{pool} {out[name][-1]:.0f} ms" for pool, (name, _) in order))
        extra["hot_breakdown_median_ms"] = {name: {k: round(statistics.median(v), 1) for k, v in parts.items()}
                                            for name, parts in breakdown.items()}
        delete_pool(conn, "img-demand")
        extra["pss"] = idle_pss(conn, ["img-image", "img-boot"], plan["pss_n"])
    finally:
        for pool in pools:
            with contextlib.suppress(Exception):
                delete_pool(conn, pool)


def idle_pss(conn, pools, n, settle_s=2):
    """PSS per VM of n idle hot VMs of each pool (member QEMUs'
    smaps_rollup): what a VM that runs the image costs next to a generic
    clone of the same guest."""
    for pool in pools:
        conn.call("ResizePool", {"name": pool, "warm": n, "max": n})
    wait_full(conn, pools, n)
    time.sleep(settle_s)
    per_vm = {}
    for pool in pools:
        pss = [procfs.pss_mib(v["pid"]) for v in pool_vms(conn, pool) if v.get("pid") and v["state"] == "ready"]
        per_vm[pool] = round(sum(pss) / len(pss), 1)
    return {"n": n, "per_image_mib": per_vm[pools[0]], "generic_mib": per_vm[pools[1]]}


def cold_rows(kilnd, conn, ref, work, plan, out):
    """kilnd's cold boot with the image and raw QEMU, alternating within a
    time budget."""
    out.update({COLD: [], RAW: []})
    image = conn.call("DescribeImage", {"image": ref})["image"]
    store = os.path.join(kilnd.work, "state", "images", "erofs", "sha256")
    erofs = [os.path.join(store, layer["diffId"].split(":", 1)[1] + ".erofs") for layer in image["layers"]]
    deadline = time.monotonic() + plan["cold_budget_s"]
    for i in range(plan["cold"]):
        if i >= plan["cold_min"] and time.monotonic() > deadline:
            log(f"cold boots with an image: {i} rounds in the {plan['cold_budget_s']} s budget")
            break
        # kilnd first: its VM's argv is the raw peer's.
        ms, argv, vm_id = cold(conn, ref, f"imgcold{i}")
        out[COLD].append(ms)
        raw_dir = os.path.join(work, f"raw{i}")
        os.makedirs(raw_dir)
        out[RAW].append(raw_cold(retarget(argv, kilnd.vm_dir(vm_id), vm_id, raw_dir), raw_dir, erofs))
        shutil.rmtree(raw_dir, ignore_errors=True)
        log(f"cold with the image {i + 1}/{plan['cold']}: kilnd {ms:.0f} ms, raw QEMU {out[RAW][-1]:.0f} ms")


def run(plan):
    """(samples, report section)."""
    work = tempfile.mkdtemp(prefix="kiln-bench-img-", dir="/tmp")
    out, extra = {}, {}
    try:
        layout = os.path.join(work, "layout")
        t0 = time.monotonic()
        extra["image"] = write_layout(layout)
        with Registry(work) as registry:
            ref = f"{registry.host}/bench/app:{TAG}"
            registry.push(layout, f"bench/app:{TAG}")
            extra["image"].update(reference=ref, built_and_pushed_s=round(time.monotonic() - t0, 1))
            log(f"image {ref}: {extra['image']}")
            config = f'image_insecure_registries = ["{registry.host}"]\n'
            with Kilnd(extra_config=config) as k:
                conn = VarlinkConnection(k.sock)
                pulled, image = pulls(conn, k, ref, plan["pulls"], plan["cached_pulls"], work)
                out.update(pulled)
                extra["image"]["erofs_mib"] = round(image["size"] / (1 << 20), 1)
                hot_rows(conn, ref, runc_bundle(layout, os.path.join(work, "bundle")), plan, out, extra)
                cold_rows(k, conn, ref, work, plan, out)
                conn.close()
        extra["runc"] = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        return out, extra
    finally:
        shutil.rmtree(work, ignore_errors=True)
