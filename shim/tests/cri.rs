//! `containerd-shim-kiln-v1` on the Kubernetes path without a kubelet: a
//! CRI client (runtime.v1 over containerd's socket, as the kubelet
//! speaks it) drives a real containerd (Debian's, CRI plugin on, testkit
//! `Containerd::start_cri`) whose runtime handler `kiln` is the shim, on a
//! real kilnd with a template pool (real QEMU). containerd and its CNI
//! network (Debian's `bridge` + `host-local`) run in a network namespace
//! of the test's own, where kilnd also puts its bridge: nothing touches the
//! host's links.
//!
//! `a_pod_runs_in_one_vm_through_cri`: RunPodSandbox with handler `kiln`
//! (the pool picked by the pod annotation `io.kiln.pool`, the shim's
//! config by the runtime's `ConfigPath`), a pod IP from CNI and a pod
//! netns under `/run/netns`; two containers created and started in it;
//! ExecSync (output and exit codes), ContainerStatus, the containers'
//! output in CRI's log files, one VM for the pod holding both containers
//! (kilnd's ListVMs and ListContainers), the containers sharing the VM's
//! network as a pod's share localhost, the pod's resolv.conf from its DNS
//! config; StopPodSandbox and RemovePodSandbox give the VM back and leave
//! no pod netns, address or CNI cache entry; containerd stops cleanly. (A
//! first StopPodSandbox that fails is retried as the kubelet would, so
//! the checks after it run, and fails the test at its end.)
//! The pod network: the VM joined the pod's netns (the shim's `JoinNetns`
//! at the sandbox's Create), so the server container answers at the pod IP
//! from the other side of the CNI bridge.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{Setup, IMAGE, LEASE_TTL_SEC, POOL, SLEEPER};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, DnsConfig, ExecSyncRequest, ExecSyncResponse, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata, PodSandboxState,
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use kiln_testkit::containerd::{pod_netns, CRI_HANDLER, KILN_SHIM};
use kiln_testkit::{try_wait_until, wait_until};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

/// The pod's name server (only written into its resolv.conf).
const DNS_SERVER: &str = "10.99.0.1";

/// The port the pod's server container listens on.
const WEB_PORT: u16 = 8080;

/// A blocking CRI client: runtime.v1 over containerd's unix socket, on a
/// runtime of its own (the fixtures around it are blocking).
struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    fn connect(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // tonic 0.14 dials `unix:` endpoints itself.
        let endpoint = Endpoint::from_shared(format!("unix:{}", socket.display())).unwrap();
        let channel = rt.block_on(endpoint.connect()).unwrap();
        Self {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    /// One call: `call(client)` run to its end.
    fn call<T, F>(
        &self,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(call(self.client.clone()))
            .map(tonic::Response::into_inner)
    }
}

/// A CRI call's reply, or a failed test showing containerd's log.
fn must<T>(s: &Setup, what: &str, reply: Result<T, tonic::Status>) -> T {
    reply.unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", s.containerd.log_tail()))
}

/// Microseconds since the epoch (kilnd's timestamps).
fn now_us() -> u64 {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    u64::try_from(since.unwrap().as_micros()).unwrap()
}

/// The path of the `kind` namespace in a runtime spec, if it has one.
fn namespace_path(spec: &Value, kind: &str) -> Option<String> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == kind)
        .and_then(|n| n["path"].as_str())
        .map(str::to_owned)
}

/// Where a runtime spec mounts something at `destination` from.
fn mount_source(spec: &Value, destination: &str) -> Option<String> {
    spec["mounts"]
        .as_array()?
        .iter()
        .find(|m| m["destination"] == destination)
        .and_then(|m| m["source"].as_str())
        .map(str::to_owned)
}

/// A runtime spec's bind mounts, `destination <- source`.
fn binds(spec: &Value) -> String {
    let mounts = spec["mounts"].as_array().cloned().unwrap_or_default();
    let binds: Vec<String> = mounts
        .iter()
        .filter(|m| m["type"] == "bind")
        .map(|m| format!("{} <- {}", m["destination"], m["source"]))
        .collect();
    binds.join(", ")
}

/// A container of `image` running `command` in pod `pod`, logging to
/// `<log dir>/<name>.log`; its id.
fn create(
    s: &Setup,
    cri: &Cri,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> String {
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.to_owned(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_owned(),
                ..Default::default()
            }),
            command: command.iter().map(|a| (*a).to_owned()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config.clone()),
    };
    let reply = cri.call(|mut c| async move { c.create_container(request).await });
    must(s, &format!("CreateContainer {name}"), reply).container_id
}

/// ExecSync of `cmd` in container `id`.
fn exec(s: &Setup, cri: &Cri, id: &str, cmd: &[&str]) -> ExecSyncResponse {
    let request = ExecSyncRequest {
        container_id: id.to_owned(),
        cmd: cmd.iter().map(|a| (*a).to_owned()).collect(),
        timeout: 30,
    };
    let reply = cri.call(|mut c| async move { c.exec_sync(request).await });
    must(s, &format!("ExecSync {cmd:?}"), reply)
}

#[test]
fn a_pod_runs_in_one_vm_through_cri() {
    let Some(mut s) = Setup::with_cri() else {
        return;
    };
    let c = &s.containerd;
    let ns = c.netns().unwrap();
    let bridge = c.pod_bridge().unwrap().to_owned();
    let subnet = c.pod_subnet().unwrap().to_owned();
    let cri = Cri::connect(&c.address());

    // CRI answers as runtime.v1, its CNI network loaded.
    let version = cri.call(|mut c| async move { c.version(VersionRequest::default()).await });
    let version = must(&s, "Version", version);
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");
    eprintln!(
        "CRI: {} {} (API {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    wait_until(Duration::from_secs(30), "CRI's NetworkReady", || {
        let status = cri.call(|mut c| async move { c.status(StatusRequest::default()).await });
        let status = must(&s, "Status", status).status.unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|cond| cond.r#type == "NetworkReady" && cond.status);
        ready.then_some(()).ok_or(format!("{status:?}"))
    });
    // The template built, so RunPodSandbox is timed with a hot VM.
    let started = Instant::now();
    s.wait_hot();
    eprintln!("pool hot (template built): {:?}", started.elapsed());

    // The pod, as the kubelet asks for one with RuntimeClass `kiln`.
    let log_dir = c.dir.path().join("pods/default_web");
    std::fs::create_dir_all(&log_dir).unwrap();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "3f1c1d52-kiln-test".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec![DNS_SERVER.into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".into(), "web".into())]),
        annotations: HashMap::from([("io.kiln.pool".into(), POOL.into())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext::default()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let request = RunPodSandboxRequest {
        config: Some(pod_config.clone()),
        runtime_handler: CRI_HANDLER.into(),
    };
    let reply = cri.call(|mut c| async move { c.run_pod_sandbox(request).await });
    let pod = must(&s, "RunPodSandbox", reply).pod_sandbox_id;
    eprintln!("RunPodSandbox (hot VM): {:?}", started.elapsed());

    // Its status: ready, an IP of the pod network, the sandbox's spec as
    // the shim got it (verbose info).
    let request = PodSandboxStatusRequest {
        pod_sandbox_id: pod.clone(),
        verbose: true,
    };
    let reply = cri.call(|mut c| async move { c.pod_sandbox_status(request).await });
    let reply = must(&s, "PodSandboxStatus", reply);
    let status = reply.status.clone().unwrap();
    assert_eq!(status.state(), PodSandboxState::SandboxReady, "{status:?}");
    assert_eq!(status.runtime_handler, CRI_HANDLER);
    let ip = status.network.clone().unwrap_or_default().ip;
    eprintln!("pod {pod}: IP {ip}");
    let prefix = subnet.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "pod IP {ip:?} not in {subnet}");
    let info: Value = serde_json::from_str(&reply.info["info"]).unwrap();
    let spec = &info["runtimeSpec"];
    eprintln!(
        "sandbox spec: annotations {}\n  namespaces {}\n  binds {}\n  process {}\n  \
         sandbox pid {} (CRI's container specs use its /proc/<pid>/ns/*)",
        spec["annotations"],
        spec["linux"]["namespaces"],
        binds(spec),
        spec["process"]["args"],
        info["pid"]
    );
    let annotations = &spec["annotations"];
    assert_eq!(annotations["io.kubernetes.cri.container-type"], "sandbox");
    assert_eq!(annotations["io.kubernetes.cri.sandbox-id"], pod.as_str());
    assert_eq!(annotations["io.kiln.pool"], POOL, "pod_annotations pass it");
    let netns = namespace_path(spec, "network").expect("the sandbox has a network namespace");
    let netns_name = Path::new(&netns).file_name().unwrap().to_string_lossy();
    assert!(
        netns_name.starts_with("cni-") && Path::new("/run/netns").join(&*netns_name).exists(),
        "{netns}"
    );
    // The pod's end of the veth has the IP; the other end is on the pods'
    // bridge in containerd's namespace, and no such bridge is on the host.
    let pod_addr = ns.sh(&["ip", "-n", &netns_name, "-br", "addr", "show", "eth0"]);
    assert!(pod_addr.contains(&format!("{ip}/24")), "{pod_addr}");
    assert!(ns.links().contains(&bridge), "{}", ns.links());
    let on_host = Command::new("ip")
        .args(["link", "show", "dev", &bridge])
        .output()
        .unwrap();
    assert!(!on_host.status.success(), "the pods' bridge is on the host");

    // One VM for the pod, from the pool the annotation named, leased for
    // the shim config's lifetime (so the shim read ConfigPath).
    let vms = s.vms_of(&pod);
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = &vms[0];
    eprintln!("VM {} (QEMU pid {})", vm["id"], vm["pid"]);
    assert_eq!(vm["state"], "leased", "{vm}");
    assert_eq!(vm["pool"], POOL, "{vm}");
    assert_eq!(vm["labels"]["io.containerd.namespace"], "k8s.io", "{vm}");
    assert_eq!(vm["labels"]["io.kiln.shim"], "containerd", "{vm}");
    let expires = vm["leaseExpiresAt"].as_u64().unwrap();
    assert!(
        expires <= now_us() + (LEASE_TTL_SEC + 1) * 1_000_000,
        "lease beyond {LEASE_TTL_SEC} s: {vm}"
    );

    // Two containers: a sleeper and a web server (busybox httpd on the
    // app layer), which says so on stdout first.
    let started = Instant::now();
    let sleeper = create(&s, &cri, &pod, &pod_config, "sleeper", &SLEEPER);
    let serve = format!(
        "/bin/busybox httpd -p {WEB_PORT} -h /srv && echo serving; \
         trap 'exit 0' TERM; while :; do /bin/busybox sleep 1; done"
    );
    let web = create(
        &s,
        &cri,
        &pod,
        &pod_config,
        "web",
        &["/bin/sh", "-c", &serve],
    );
    eprintln!("CreateContainer x2: {:?}", started.elapsed());
    let started = Instant::now();
    for id in [&sleeper, &web] {
        let request = StartContainerRequest {
            container_id: id.clone(),
        };
        let reply = cri.call(|mut c| async move { c.start_container(request).await });
        must(&s, "StartContainer", reply);
    }
    eprintln!("StartContainer x2: {:?}", started.elapsed());

    // ExecSync: output and exit codes.
    let started = Instant::now();
    let out = exec(&s, &cri, &sleeper, &["/bin/cat", "/srv/app.txt"]);
    eprintln!("ExecSync: {:?}", started.elapsed());
    assert_eq!(
        (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()),
        (0, b"app layer\n".as_slice(), b"".as_slice())
    );
    let out = exec(
        &s,
        &cri,
        &web,
        &["/bin/sh", "-c", "echo to-stderr >&2; exit 3"],
    );
    assert_eq!(
        (out.exit_code, out.stderr.as_slice()),
        (3, b"to-stderr\n".as_slice())
    );

    // ContainerStatus: both running; the container's spec as the shim got
    // it, with the resolv.conf CRI wrote from the pod's DNS config.
    let mut resolv = None;
    for id in [&sleeper, &web] {
        let request = ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        };
        let reply = cri.call(|mut c| async move { c.container_status(request).await });
        let reply = must(&s, "ContainerStatus", reply);
        let status = reply.status.unwrap();
        assert_eq!(
            status.state(),
            ContainerState::ContainerRunning,
            "{status:?}"
        );
        let info: Value = serde_json::from_str(&reply.info["info"]).unwrap();
        let spec = &info["runtimeSpec"];
        if id == &web {
            eprintln!(
                "container spec: annotations {}\n  namespaces {}\n  binds {}",
                spec["annotations"],
                spec["linux"]["namespaces"],
                binds(spec)
            );
        }
        assert_eq!(
            spec["annotations"]["io.kubernetes.cri.container-type"],
            "container"
        );
        assert_eq!(
            spec["annotations"]["io.kubernetes.cri.sandbox-id"],
            pod.as_str()
        );
        resolv = mount_source(spec, "/etc/resolv.conf");
    }
    let resolv = resolv.expect("CRI mounts a resolv.conf");
    let text = std::fs::read_to_string(&resolv).unwrap();
    assert!(
        text.contains(&format!("nameserver {DNS_SERVER}")),
        "{resolv}: {text}"
    );

    // The server's stdout reached CRI's log file (CRI's log format).
    wait_until(Duration::from_secs(10), "web's output in its log", || {
        let log = std::fs::read_to_string(log_dir.join("web.log")).unwrap_or_default();
        log.contains(" stdout F serving").then_some(()).ok_or(log)
    });

    // kilnd: the pod is one VM holding both containers.
    let vms = s.vms_of(&pod);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let mut held = s.containers(&vms[0]);
    held.sort();
    let mut ours = vec![sleeper.clone(), web.clone()];
    ours.sort();
    assert_eq!(held, ours);

    // The containers share the VM's network, as a pod's share localhost.
    let url = format!("http://127.0.0.1:{WEB_PORT}/app.txt");
    wait_until(Duration::from_secs(10), "the server on localhost", || {
        let out = exec(
            &s,
            &cri,
            &sleeper,
            &["/bin/busybox", "wget", "-q", "-O-", &url],
        );
        (out.stdout == b"app layer\n")
            .then_some(())
            .ok_or(format!("{out:?}"))
    });

    // The pod network: from containerd's side of the bridge, the server
    // answers at the pod IP. (A ping would prove less: without the VM
    // behind it, the pod netns's own kernel answers at that address; no
    // one there serves the app's file.) python3's HTTP client, as the
    // host's static busybox wget crashes.
    let url = format!("http://{ip}:{WEB_PORT}/app.txt");
    let started = Instant::now();
    let get = format!(
        "import sys, urllib.request; \
         sys.stdout.write(urllib.request.urlopen('{url}', timeout=2).read().decode())"
    );
    let pod_ip_served = try_wait_until(Duration::from_secs(20), || {
        let (ok, text) = ns.run(&["python3", "-c", &get]);
        (ok && text == "app layer\n").then_some(()).ok_or(text)
    });
    eprintln!(
        "the VM at the pod IP: {:?} after {:?}",
        pod_ip_served,
        started.elapsed()
    );
    // Failed: what the pod network looked like.
    if let Err(e) = pod_ip_served {
        let in_pod = |argv: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &*netns_name];
            all.extend_from_slice(argv);
            ns.run(&all).1
        };
        let guest = exec(&s, &cri, &sleeper, &["/bin/busybox", "ip", "addr"]);
        let nics = s.vms_of(&pod).first().map(|vm| vm["network"].clone());
        let nics = nics.unwrap_or_default();
        let tap = nics[0]["tap"].as_str().unwrap_or("-");
        let ingress = |dev: &str| in_pod(&["tc", "filter", "show", "dev", dev, "ingress"]);
        panic!(
            "the pod's server did not answer at the pod IP {ip}: {e}\n\
             pod netns links:\n{}tc ingress of eth0:\n{}tc ingress of {tap}:\n{}\
             the guest's addresses:\n{}the VM's NICs: {nics}",
            in_pod(&["ip", "-s", "link"]),
            ingress("eth0"),
            ingress(tap),
            String::from_utf8_lossy(&guest.stdout),
        );
    }

    // StopPodSandbox: the VM given back, the pod's netns, address and CNI
    // cache entry gone. A failed first call is retried as the kubelet
    // retries it (so the checks after it run), and fails the test at the
    // end.
    let started = Instant::now();
    let stop = || {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        };
        cri.call(|mut c| async move { c.stop_pod_sandbox(request).await })
    };
    let first_stop = stop();
    eprintln!("StopPodSandbox: {:?} {first_stop:?}", started.elapsed());
    if first_stop.is_err() {
        let again = try_wait_until(Duration::from_secs(30), || {
            stop().map_err(|e| format!("{e:?}"))
        });
        again.unwrap_or_else(|e| {
            panic!("StopPodSandbox, retried: {e}\n{}", s.containerd.log_tail())
        });
    }
    let released = s.wait_released(&pod);
    eprintln!("VM released {released:?} after StopPodSandbox returned");
    assert!(!Path::new(&netns).exists(), "{netns} left");
    assert!(
        !pod_netns().iter().any(|p| p.ends_with(&*netns_name)),
        "{netns} left"
    );
    let ipam = s.containerd.dir.path().join("cni-ipam");
    let held_ips: Vec<String> = walk_files(&ipam);
    assert!(
        !held_ips.iter().any(|f| f.ends_with(&format!("/{ip}"))),
        "{ip} still held: {held_ips:?}"
    );
    assert!(
        s.containerd.cni_results().is_empty(),
        "{:?}",
        s.containerd.cni_results()
    );

    // RemovePodSandbox: nothing of the pod left in CRI; the shim exits.
    let request = RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    };
    let reply = cri.call(|mut c| async move { c.remove_pod_sandbox(request).await });
    must(&s, "RemovePodSandbox", reply);
    let reply =
        cri.call(|mut c| async move { c.list_pod_sandbox(ListPodSandboxRequest::default()).await });
    assert!(must(&s, "ListPodSandbox", reply).items.is_empty());
    let reply =
        cri.call(|mut c| async move { c.list_containers(ListContainersRequest::default()).await });
    assert!(must(&s, "ListContainers", reply).containers.is_empty());
    wait_until(Duration::from_secs(10), "the shim to exit", || {
        let left = s.containerd.shims(KILN_SHIM);
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    });
    assert!(s.vms_of(&pod).is_empty());

    // containerd stops cleanly (SIGTERM, exit 0).
    drop(cri);
    let status = s.containerd.stop();
    assert!(status.success(), "{status}\n{}", s.containerd.log_tail());

    if let Err(e) = first_stop {
        panic!("the first StopPodSandbox failed (the retry passed): {e:?}");
    }
}

/// The files below `dir`, as paths.
fn walk_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path.display().to_string());
        }
    }
    files
}
