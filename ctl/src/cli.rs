//! The command line: one clap definition, from which the help, the shell
//! completions and the man page are all generated.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use serde_json::{json, Value};

use crate::client::DEFAULT_ADDRESS;

const ABOUT: &str = "Control kilnd: microVMs, their containers, images, warm pools and leases";

const LONG_ABOUT: &str = "\
Control kilnd: microVMs, the containers they run, OCI images, warm pools \
and their leases.

kilnctl is a client of kilnd's varlink API (io.kiln.Manager) and nothing \
else: every command is one or two calls to it, so what kilnctl can do is \
what the API can do. A VM is named by its id, its name, or a prefix of its \
id that fits no other VM; an image by a reference, its digest, or a prefix \
of its digest that fits no other image. Reading is open to anyone who can open the \
socket; changing things needs root or membership in the kiln group.";

const AFTER_HELP: &str = "\
Exit status: 0 success; 1 failure; 2 usage (or an ambiguous VM or image); \
3 no such VM, pool, NIC, image, container or snapshot; 4 permission denied; \
5 timeout; 6 invalid input or state (an image in use, a VM that cannot be \
snapshotted, ...); 7 pool, quota, GPU or \
container slots exhausted; 8 kilnd unreachable. exec exits with the \
command's status (128+N for signal N), 125 when kilnctl failed and 126 when \
the command could not be started; so does shell.";

#[derive(Debug, Parser)]
#[command(
    name = "kilnctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    disable_help_subcommand = true,
    max_term_width = 100
)]
pub struct Cli {
    /// kilnd's varlink socket: unix:PATH or PATH
    #[arg(
        long,
        global = true,
        env = "KILN_ADDRESS",
        default_value = DEFAULT_ADDRESS,
        value_name = "ADDRESS"
    )]
    pub address: String,

    /// Output format: tables for people, or kilnd's replies as JSON
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t = Format::Table,
        value_name = "FORMAT"
    )]
    pub output: Format,

    /// Same as --output json
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn json(&self) -> bool {
        self.json || self.output == Format::Json
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns that fit the terminal
    Table,
    /// The varlink reply objects, unchanged
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show kilnd's version, accelerator and VM counts
    Status,

    /// List VMs
    #[command(visible_alias = "ls")]
    List {
        /// Print VM ids only
        #[arg(short, long)]
        quiet: bool,
    },

    /// Show one VM in detail
    Show {
        /// VM id, name or unique id prefix
        vm: String,
    },

    /// Define a VM (state created); prints its id
    Create(Box<CreateArgs>),

    /// Boot VMs; returns once each guest agent answers
    Start(VmRefs),

    /// Stop VMs gracefully (agent, then ACPI), SIGKILL after a timeout
    Stop {
        #[command(flatten)]
        vms: VmRefs,
        /// Grace period before SIGKILL (default: kilnd's stop_timeout_sec)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },

    /// SIGKILL VMs' QEMU processes
    Kill(VmRefs),

    /// Pause VMs' vCPUs
    Pause(VmRefs),

    /// Resume paused VMs
    Resume(VmRefs),

    /// Reboot VMs' guests; returns once each agent answers again
    Reboot(VmRefs),

    /// Delete VMs, killing them first if they run
    Rm(VmRefs),

    /// Run a command in a VM and exit with its status
    #[command(long_about = "Run a command in a VM and exit with its status.\n\n\
        Its output is printed as it is written: its stdout on kilnctl's \
        stdout, its stderr on stderr. With -i kilnctl's standard input is \
        passed on as it comes and closed at its end; with -t the command \
        runs on a terminal in the guest (and with -i as well, kilnctl's \
        terminal is put in raw mode, as for shell). Ctrl-C, SIGTERM, SIGHUP \
        and SIGQUIT are passed on to the command's process group instead of \
        ending kilnctl. kilnctl exits with the command's status (128+N when \
        signal N ended it), 125 when kilnctl or kilnd failed, and 126 when \
        the command could not be started in the guest. With --detach it \
        prints the process's handle and leaves the command running.")]
    Exec(ExecArgs),

    /// Open a shell (or run a command) on a terminal in a VM
    #[command(
        long_about = "Open a shell (or run a command) on a terminal in a VM.\n\n\
        The command (default /bin/sh) runs on a pseudo-terminal in the guest \
        or the container, the size of kilnctl's terminal (24x80 when there \
        is none) and resized with it. kilnctl's terminal is put in raw mode, \
        so every key, Ctrl-C and Ctrl-D too, goes to the guest; it is \
        restored when the command ends. kilnctl exits with the command's \
        status, as exec does."
    )]
    Shell(ShellArgs),

    /// Copy files and directories between the host and a VM
    #[command(
        long_about = "Copy files and directories between the host and a VM.\n\n\
        One of SRC and DEST is VM:PATH (PATH absolute, in the guest or, with \
        -c, in the container's root), the other a local path. As with docker \
        cp: a DEST that is an existing directory gets SRC inside it under \
        its own name; any other DEST is the copy's new name (its parent must \
        exist); a DEST ending in / must be an existing directory. Files, \
        directories and symlinks are copied with their modes; files copied \
        into a VM belong to root, files copied out to the caller. A line on \
        stderr tells how many entries and bytes were copied."
    )]
    Cp(CpArgs),

    /// Print a container's output; with -f follow it until the container ends
    #[command(
        long_about = "Print a container's output; with -f follow it until the container ends.\n\n\
        The guest keeps the last 1 MiB of each container's output, stdout and \
        stderr interleaved as written; kilnctl writes each part to its own \
        stdout or stderr. With -f it waits for more until the container \
        exited and everything was printed."
    )]
    Logs(LogsArgs),

    /// A VM's containers
    #[command(subcommand)]
    Container(ContainerCommand),

    /// Stored OCI images
    #[command(subcommand)]
    Image(ImageCommand),

    /// Warm pools
    #[command(subcommand)]
    Pool(PoolCommand),

    /// Lease a hot VM from a pool; prints its id
    Acquire(AcquireArgs),

    /// Give acquired VMs back: destroyed, or put back hot with --recycle
    Release {
        #[command(flatten)]
        vms: VmRefs,
        /// Reset the VM from the pool's template and put it back hot
        #[arg(long)]
        recycle: bool,
    },

    /// Extend a lease: it now ends TTL from now
    Renew {
        /// VM id, name or unique id prefix
        vm: String,
        /// The lease's new lifetime (1 s to 7 days)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Duration,
    },

    /// Snapshots of running VMs: save, list, remove
    #[command(subcommand)]
    Snapshot(SnapshotCommand),

    /// A new VM from a snapshot (prints its id), or with --into a stopped
    /// VM taken back to one
    #[command(
        long_about = "A new VM from a snapshot (prints its id), or with --into a stopped VM taken back to one.\n\n\
        The new VM runs where the snapshot left off: its processes and files \
        as they were, its RAM shared copy-on-write with the snapshot. It gets \
        a new id, a hostname, machine id, a reseeded RNG and its own MAC and \
        address, unless --same-identity. kilnctl returns once its agent \
        answers. With --into VM, that VM (stopped: kill or stop it first; the \
        machine the snapshot was taken of) boots from the snapshot instead \
        and keeps its id, name and identity."
    )]
    Restore(RestoreArgs),

    /// Running copies of a running VM; prints their ids, one a line
    #[command(
        long_about = "Running copies of a running VM; prints their ids, one a line.\n\n\
        Each copy (named VM-fork-N) continues where the VM was, with its own \
        identity, MAC, address and RNG, its RAM shared copy-on-write; the VM \
        runs on. kilnctl returns once every copy's agent answers."
    )]
    Fork {
        /// VM id, name or unique id prefix
        vm: String,
        /// How many copies (1 to 32)
        #[arg(short = 'n', long, value_name = "COUNT", default_value_t = 1)]
        count: u32,
    },

    /// A VM's network interfaces (bridge and netns modes)
    #[command(subcommand)]
    Nic(NicCommand),

    /// Host GPU render nodes
    #[command(subcommand)]
    Gpu(GpuCommand),

    /// Stream VM, pool, GPU and image changes, one line (or JSON object) each
    Watch,

    /// Run an Oakestra SLA's microservices as VMs; again, nothing changes
    #[command(
        long_about = "Run an Oakestra SLA's microservices as VMs; again, nothing changes.\n\n\
        Each microservice of the SLA (sla_version v2.0) becomes a VM named \
        APP.APP_NAMESPACE.SERVICE.SERVICE_NAMESPACE that runs its image as \
        its container main: memory, vcpus, vgpus, storage, env, cmd, port, \
        addresses.rr_ip and one_shot are honoured, fields Kiln has nothing \
        for are refused naming the field. A missing image is pulled. A VM \
        that exists and runs as the SLA asks is left alone, a stopped one is \
        started, one that runs otherwise is an error (undeploy it first). \
        If a VM cannot be created or started, the VMs this run created are \
        removed again."
    )]
    Deploy(DeployArgs),

    /// Remove the VMs an Oakestra SLA's microservices run in
    Undeploy {
        /// The SLA file (JSON)
        sla: PathBuf,
    },

    /// Print a shell completion script
    Completions {
        /// bash, zsh or fish (also elvish, powershell)
        shell: Shell,
    },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The SLA file (JSON, Oakestra's sla_version v2.0)
    pub sla: PathBuf,
    /// The VMs' network: bridge (kilnd's [network]; needed for port and
    /// addresses) or none
    #[arg(long, value_name = "MODE", value_parser = ["bridge", "none"], default_value = "bridge")]
    pub network: String,
}

/// One or more VMs, each an id, a name or a unique id prefix.
#[derive(Debug, Args)]
pub struct VmRefs {
    /// VM ids, names or unique id prefixes
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name ([A-Za-z0-9_.-])
    pub name: String,
    /// A VMSpec as JSON, or @FILE; the options below override its keys
    #[arg(long, value_name = "JSON|@FILE")]
    pub spec: Option<String>,
    /// Start the VM once it is created
    #[arg(long)]
    pub start: bool,
    #[command(flatten)]
    pub vm: VmSpecArgs,
}

/// The VMSpec keys as options (kilnd validates them and fills defaults).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "VM spec")]
pub struct VmSpecArgs {
    /// Virtual CPUs
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest RAM in MiB, or with a unit: 512M, 2G
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub memory: Option<u64>,
    /// Kernel image (default: the built-in guest image)
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (default: the built-in guest image)
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Accelerator (default: kilnd's)
    #[arg(long, value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
    /// Host GPU render nodes to lease
    #[arg(long, value_name = "N")]
    pub gpus: Option<u32>,
    /// Display device without a host GPU: none or virtio-gpu
    #[arg(long, value_name = "DEVICE")]
    pub display: Option<String>,
    /// Networking: none, bridge (needs [network] in kilnd.toml) or netns
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Bridge mode: which configured bridge
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// netns mode: the namespace in /run/netns that gets the TAP
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// The guest's IPv4 address (bridge or netns mode)
    #[arg(long, value_name = "ADDRESS")]
    pub ip: Option<String>,
    /// Forward a host port to the VM (bridge mode): HOST:VM[/tcp|udp]
    #[arg(long = "forward", value_name = "HOST:VM[/PROTO]", value_parser = parse_forward)]
    pub forwards: Vec<Forward>,
    /// Empty PCIe slots for `nic attach` (0-8)
    #[arg(long, value_name = "N")]
    pub hotplug_slots: Option<u32>,
    /// An image (reference or digest) the VM runs as its container main,
    /// started at every boot
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub container: ContainerArgs,
}

/// What the VM's QEMU may use of the host: the VMSpec's `limits`.
#[derive(Debug, Args, Default, PartialEq, Eq)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Memory cap of the VM's whole QEMU, 300M or 1G (at least 128M;
    /// default: the guest's RAM and kilnd's overhead); below the guest's
    /// RAM it overcommits
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub memory_cap: Option<u64>,
    /// CPU quota in cores, fractions too: 0.5 is half a core (at most
    /// --vcpus; default: none)
    #[arg(long = "cpus", value_name = "N", value_parser = parse_milli_cpus)]
    pub milli_cpus: Option<u64>,
    /// CPU weight against other VMs, 1 to 10000 (default 100)
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<u32>,
    /// IO weight against other VMs, 1 to 10000 (default 100)
    #[arg(long, value_name = "N")]
    pub io_weight: Option<u32>,
}

/// How a container runs its image: the process keys VMSpec,
/// ContainerSpec and Acquire's container share (all need an image).
#[derive(Debug, Args, Default, PartialEq, Eq)]
#[command(next_help_heading = "Container")]
pub struct ContainerArgs {
    /// Replace the image's Entrypoint (and Cmd) with PROGRAM ("" for none);
    /// its arguments go after --
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// Set an environment variable in the container, over the image's
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container (absolute)
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as uid[:gid] or name[:group]
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Size of the writable layer, 512M or 2G (default: half the guest's RAM)
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub storage: Option<u64>,
    /// Keep the writable layer on an ext4 disk of --storage (16M or more),
    /// kept until the container or VM is removed, instead of a tmpfs
    #[arg(long, requires = "storage")]
    pub storage_disk: bool,
    /// When the process exits: no (default; a VM's main container stops
    /// the VM), on-failure or always
    #[arg(long, value_name = "POLICY", value_parser = ["no", "on-failure", "always"])]
    pub restart: Option<String>,
    /// The command and its arguments, replacing the image's Cmd (after --)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A port forward, as the VMSpec's `network.forwards` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub host_port: u16,
    pub vm_port: u16,
    pub protocol: Option<String>,
}

impl Forward {
    /// The `network.forwards` entry (no protocol: kilnd's default).
    pub fn to_spec(&self) -> Value {
        let mut v = json!({ "hostPort": self.host_port, "vmPort": self.vm_port });
        if let Some(p) = &self.protocol {
            v["protocol"] = Value::from(p.as_str());
        }
        v
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// VM id, name or unique id prefix
    pub vm: String,
    /// The command and its arguments (after --)
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Set an environment variable for the command
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Pass kilnctl's standard input on to the command as it comes
    #[arg(short, long, conflicts_with = "detach")]
    pub interactive: bool,
    /// Run the command on a terminal in the guest
    #[arg(short, long, conflicts_with = "detach")]
    pub tty: bool,
    /// Kill the command (SIGKILL) after this long
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "detach")]
    pub timeout: Option<Duration>,
    /// Run it in this container (its root and namespaces), not the guest
    #[arg(short, long, value_name = "NAME")]
    pub container: Option<String>,
    /// Start the command, print its handle and leave it running
    #[arg(short, long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// VM id, name or unique id prefix
    pub vm: String,
    /// The command and its arguments, after -- (default /bin/sh)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Run it in this container (its root and namespaces), not the guest
    #[arg(short, long, value_name = "NAME")]
    pub container: Option<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local path, or VM:PATH
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Where to: VM:PATH, or a local path
    #[arg(value_name = "DEST")]
    pub dest: String,
    /// VM:PATH is in this container's root, not the guest's
    #[arg(short, long, value_name = "NAME")]
    pub container: Option<String>,
    /// Refuse to copy more file content than this: 4096, 512K, 100M, 2G
    /// (default: kilnd's 1G; at most 16G)
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// VM id, name or unique id prefix
    pub vm: String,
    /// The container's name (default: main, the one a VM made with
    /// --image runs)
    #[arg(default_value = "main", hide_default_value = true)]
    pub container: String,
    /// Follow the output until the container ended
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// List a VM's containers, as the guest reports them
    #[command(visible_alias = "list")]
    Ls {
        /// VM id, name or unique id prefix
        vm: String,
    },
    /// Run another container in a ready or leased VM (up to 8)
    Add(Box<ContainerAddArgs>),
    /// Stop containers (SIGTERM, SIGKILL after 10 s) and remove them
    Rm {
        /// VM id, name or unique id prefix
        vm: String,
        /// Container names
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ContainerAddArgs {
    /// VM id, name or unique id prefix
    pub vm: String,
    /// The container's name, unique in the VM ([A-Za-z0-9_.-])
    pub name: String,
    /// A stored image: reference, digest or unique digest prefix
    pub image: String,
    #[command(flatten)]
    pub container: ContainerArgs,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List stored images
    #[command(visible_alias = "list")]
    Ls {
        /// Print digests only
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show one image: its references, process and layers
    Show {
        /// Reference, digest or unique digest prefix
        image: String,
    },
    /// Pull an image from its registry, showing progress; prints its digest
    #[command(
        long_about = "Pull an image from its registry, showing progress; prints its digest.\n\n\
        Progress goes to stderr: one line rewritten in place when stderr is a \
        terminal, a line per step otherwise. The digest is printed on stdout \
        once the image is stored; with --json every reply of kilnd is printed \
        as one JSON line instead, the image last. An image already stored is \
        a cache hit: only its manifest is fetched."
    )]
    Pull {
        /// [REGISTRY/]REPOSITORY[:TAG|@DIGEST]; busybox is
        /// docker.io/library/busybox:latest
        reference: String,
    },
    /// Import an OCI layout directory, OCI archive or docker archive; prints
    /// its digest
    #[command(
        long_about = "Import an OCI layout directory, OCI archive or docker archive; prints its digest.\n\n\
        kilnd reads the path, which the caller must be able to read too. \
        Progress and output are as for image pull."
    )]
    Import {
        /// The layout directory or archive
        path: PathBuf,
        /// Record the image under this reference (and pick it, when the
        /// source holds several)
        #[arg(long, value_name = "REF")]
        tag: Option<String>,
    },
    /// Remove images: a reference removes that tag (and the image with its
    /// last one), a digest the image with all its tags
    Rm {
        /// References, digests or unique digest prefixes
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct AcquireArgs {
    /// Pool name
    pub pool: String,
    /// The lease ends by itself this long after it is granted (or renewed)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// A label for the lease (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// How long to wait for a VM when none is hot (0: do not wait;
    /// default: kilnd's 60 s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Run this image in the VM, as its container main, before the reply
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub container: ContainerArgs,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List pools
    #[command(visible_alias = "list")]
    Ls,
    /// Show one pool in detail
    Show {
        /// Pool name
        name: String,
    },
    /// Define a pool (kept in kilnd's own pools.d layer) and start filling it
    Create(Box<PoolCreateArgs>),
    /// Change how many VMs a pool keeps hot, and its cap
    Resize {
        /// Pool name
        name: String,
        /// Hot VMs to keep ready
        warm: u32,
        /// The new cap of VMs the pool owns
        #[arg(long, value_name = "N")]
        max: Option<u32>,
    },
    /// Delete pools: unleased VMs are destroyed, leased ones stay
    Rm {
        /// Pool names
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    /// Pool name
    pub name: String,
    /// A PoolSpec as JSON, or @FILE; the options below override its keys
    #[arg(long, value_name = "JSON|@FILE")]
    pub spec: Option<String>,
    /// template (clones of a saved, booted VM) or cold (each VM boots)
    #[arg(long, value_parser = ["template", "cold"])]
    pub mode: Option<String>,
    /// Hot VMs kept ready
    #[arg(long, value_name = "N", required_unless_present = "spec")]
    pub warm: Option<u32>,
    /// Hard cap: hot + booting + leased
    #[arg(long, value_name = "N", required_unless_present = "spec")]
    pub max: Option<u32>,
    /// Boots at once while refilling
    #[arg(long, value_name = "N")]
    pub refill_concurrency: Option<u32>,
    /// An expired lease puts its VM back hot instead of destroying it
    #[arg(long)]
    pub recycle_on_expiry: bool,
    /// How long a per-image template's container runs before the template
    /// is saved (whole seconds, needs --image)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    #[command(flatten)]
    pub vm: VmSpecArgs,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running VM as a snapshot; prints it as a table row
    #[command(
        long_about = "Save a running VM as a snapshot; prints it as a table row.\n\n\
        The VM (ready, leased or paused) stops while its RAM and device state \
        are written, then runs on, unless --keep-paused (a paused VM stays \
        paused). The snapshot is kept under kilnd's state directory, \
        survives kilnd restarts, and can be restored any number of times. \
        VMs with GPUs, hot-plugged NICs or a container with --storage-disk \
        cannot be snapshotted."
    )]
    Create {
        /// VM id, name or unique id prefix
        vm: String,
        /// The snapshot's name ([A-Za-z0-9_.-], up to 64)
        name: String,
        /// Leave the VM paused once it is saved
        #[arg(long)]
        keep_paused: bool,
    },
    /// List snapshots
    #[command(visible_alias = "list")]
    Ls {
        /// Print snapshot names only
        #[arg(short, long)]
        quiet: bool,
    },
    /// Delete snapshots; VMs restored from them keep running
    Rm {
        /// Snapshot names
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot name
    pub snapshot: String,
    /// The new VM's name (default: SNAPSHOT-N)
    #[arg(long, value_name = "NAME", conflicts_with = "into")]
    pub name: Option<String>,
    /// Keep the saved VM's hostname, machine id, MAC and address
    #[arg(long, conflicts_with = "into")]
    pub same_identity: bool,
    /// Take this stopped VM (the one the snapshot was taken of) back to
    /// the snapshot instead of making a new VM
    #[arg(long, value_name = "VM")]
    pub into: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NicCommand {
    /// List a VM's NICs
    #[command(visible_alias = "list")]
    Ls {
        /// VM id, name or unique id prefix
        vm: String,
    },
    /// Hot-plug a NIC into a running VM created with --hotplug-slots
    Attach {
        /// VM id, name or unique id prefix
        vm: String,
        /// The NIC's IPv4 address (default: the next free one)
        #[arg(long, value_name = "ADDRESS")]
        ip: Option<String>,
    },
    /// Unplug a hot-plugged NIC
    Detach {
        /// VM id, name or unique id prefix
        vm: String,
        /// The NIC's index (1 or more; see `nic ls`)
        index: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// List the host's render nodes and who holds them
    #[command(visible_alias = "list")]
    Ls,
}

/// `30`, `30s`, `500ms`, `5m`, `2h`, `1d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (30, 30s, 500ms, 5m, 2h, 1d)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => return Err(format!("unknown time unit {other:?} (ms, s, m, h, d)")),
    };
    // Millisecond resolution: what the finest API field (Acquire's
    // timeoutMs) takes, and exact for 1.5s or 0.1.
    let ms = (value * scale * 1000.0).round();
    if !(0.0..=1e15).contains(&ms) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_millis(ms as u64))
}

/// Whole seconds of `d`, for the API's second-granular fields.
pub fn whole_seconds(d: Duration, option: &str) -> Result<u64, String> {
    if d.subsec_nanos() != 0 {
        return Err(format!("{option} takes whole seconds, not {d:?}"));
    }
    Ok(d.as_secs())
}

/// MiB: `512`, `512M`, `512MiB`, `2G`, `2GiB`.
fn parse_mib(text: &str) -> Result<u64, String> {
    let units = [("", 1), ("M", 1), ("MiB", 1), ("G", 1024), ("GiB", 1024)];
    parse_size(text, &units, "512, 512M, 2G")
}

/// Cores, fractions too: `0.5` is 500 thousandths of a core (the API's
/// `milliCpus`), `2` is 2000; kilnd checks the range.
fn parse_milli_cpus(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a number of cores (0.5, 1, 2.25)");
    let cores: f64 = text.parse().map_err(|_| bad())?;
    if !cores.is_finite() || cores <= 0.0 {
        return Err(bad());
    }
    let milli = (cores * 1000.0).round();
    if milli < 1.0 {
        return Err(format!("{text:?} is less than a thousandth of a core"));
    }
    if milli > f64::from(u32::MAX) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(milli as u64)
}

/// Bytes: `4096`, `512K`, `100M`, `2G` (powers of 1024; `KiB`, `MiB`,
/// `GiB` too).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let units = [
        ("", 1),
        ("B", 1),
        ("K", 1 << 10),
        ("KiB", 1 << 10),
        ("M", 1 << 20),
        ("MiB", 1 << 20),
        ("G", 1 << 30),
        ("GiB", 1 << 30),
    ];
    parse_size(text, &units, "4096, 512K, 100M, 2G")
}

/// A whole number with one of `units` after it, scaled by it.
fn parse_size(text: &str, units: &[(&str, u64)], examples: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size ({examples})"))?;
    let scale = units
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| format!("unknown size unit {unit:?} ({examples})"))?;
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn parse_forward(text: &str) -> Result<Forward, String> {
    let bad = || format!("{text:?} is not HOST:VM[/tcp|udp] (e.g. 8080:80)");
    let (ports, protocol) = match text.split_once('/') {
        Some((ports, protocol)) => (ports, Some(protocol.to_owned())),
        None => (text, None),
    };
    let (host, vm) = ports.split_once(':').ok_or_else(bad)?;
    Ok(Forward {
        host_port: host.parse().map_err(|_| bad())?,
        vm_port: vm.parse().map_err(|_| bad())?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(whole_seconds(Duration::from_secs(3), "--ttl"), Ok(3));
        assert!(whole_seconds(Duration::from_millis(1500), "--ttl").is_err());
    }

    #[test]
    fn sizes_labels_forwards() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("256MiB"), Ok(256));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_bytes("5M"), Ok(5 << 20));
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert!(parse_bytes("1T").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_mib("1T").is_err());
        assert_eq!(parse_milli_cpus("0.5"), Ok(500));
        assert_eq!(parse_milli_cpus("2"), Ok(2000));
        assert_eq!(parse_milli_cpus("1.25"), Ok(1250));
        assert_eq!(parse_milli_cpus(".01"), Ok(10));
        for bad in ["0", "-1", "half", "inf", "NaN", "0.0001", ""] {
            assert!(parse_milli_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("ab").is_err());
        assert_eq!(
            parse_forward("8080:80/udp"),
            Ok(Forward {
                host_port: 8080,
                vm_port: 80,
                protocol: Some("udp".into())
            })
        );
        assert!(parse_forward("8080").is_err());
        assert!(parse_forward("x:80").is_err());
    }

    #[test]
    fn exec_takes_the_command_after_the_vm() {
        let cli = Cli::try_parse_from(["kilnctl", "exec", "web", "--", "sh", "-c", "exit 7"])
            .expect("parse");
        let Command::Exec(exec) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(exec.vm, "web");
        assert_eq!(exec.command, ["sh", "-c", "exit 7"]);
        let cli = Cli::try_parse_from(["kilnctl", "exec", "-e", "A=1", "web", "ls", "-l"])
            .expect("parse");
        let Command::Exec(exec) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (exec.env, exec.command),
            (vec!["A=1".into()], vec!["ls".into(), "-l".into()])
        );
        let cli = Cli::try_parse_from(["kilnctl", "exec", "-c", "main", "web", "--", "ls"])
            .expect("parse");
        let Command::Exec(exec) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (exec.container.as_deref(), exec.vm.as_str()),
            (Some("main"), "web")
        );
    }

    #[test]
    fn exec_shell_and_cp_options() {
        let cli =
            Cli::try_parse_from(["kilnctl", "exec", "-it", "web", "--", "sh"]).expect("parse");
        let Command::Exec(exec) = cli.command else {
            panic!("{cli:?}")
        };
        assert!(exec.interactive && exec.tty && !exec.detach);
        assert!(
            Cli::try_parse_from(["kilnctl", "exec", "-d", "-i", "web", "--", "cat"]).is_err(),
            "nothing to read stdin once detached"
        );
        let cli = Cli::try_parse_from(["kilnctl", "shell", "web"]).expect("parse");
        let Command::Shell(shell) = cli.command else {
            panic!("{cli:?}")
        };
        assert!(shell.command.is_empty());
        let cli = Cli::try_parse_from(["kilnctl", "shell", "-c", "main", "web", "--", "ash", "-l"])
            .expect("parse");
        let Command::Shell(shell) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (shell.container.as_deref(), shell.command),
            (Some("main"), vec!["ash".to_owned(), "-l".to_owned()])
        );
        let cli = Cli::try_parse_from(["kilnctl", "cp", "--max-bytes", "5M", "a", "web:/tmp/"])
            .expect("parse");
        let Command::Cp(cp) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (cp.src.as_str(), cp.dest.as_str(), cp.max_bytes),
            ("a", "web:/tmp/", Some(5 << 20))
        );
    }

    #[test]
    fn snapshot_restore_and_fork() {
        let cli = Cli::try_parse_from([
            "kilnctl",
            "snapshot",
            "create",
            "web",
            "s1",
            "--keep-paused",
        ])
        .expect("parse");
        let Command::Snapshot(SnapshotCommand::Create {
            vm,
            name,
            keep_paused,
        }) = cli.command
        else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (vm.as_str(), name.as_str(), keep_paused),
            ("web", "s1", true)
        );
        assert!(Cli::try_parse_from(["kilnctl", "snapshot", "create", "web"]).is_err());
        assert!(Cli::try_parse_from(["kilnctl", "snapshot", "rm"]).is_err());

        let cli = Cli::try_parse_from([
            "kilnctl",
            "restore",
            "s1",
            "--name",
            "copy",
            "--same-identity",
        ])
        .expect("parse");
        let Command::Restore(restore) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (restore.name.as_deref(), restore.same_identity, restore.into),
            (Some("copy"), true, None)
        );
        assert!(
            Cli::try_parse_from(["kilnctl", "restore", "s1", "--into", "web", "--name", "x"])
                .is_err(),
            "--into keeps the VM's own name"
        );
        assert!(Cli::try_parse_from([
            "kilnctl",
            "restore",
            "s1",
            "--into",
            "web",
            "--same-identity"
        ])
        .is_err());

        let cli = Cli::try_parse_from(["kilnctl", "fork", "web"]).expect("parse");
        assert!(
            matches!(cli.command, Command::Fork { count: 1, .. }),
            "{cli:?}"
        );
        let cli = Cli::try_parse_from(["kilnctl", "fork", "web", "-n", "3"]).expect("parse");
        assert!(
            matches!(cli.command, Command::Fork { count: 3, .. }),
            "{cli:?}"
        );
    }

    /// The image's command comes after `--` only, so `create NAME` alone
    /// parses as it always did.
    #[test]
    fn containers_take_their_command_after_the_double_dash() {
        let cli = Cli::try_parse_from([
            "kilnctl",
            "create",
            "app",
            "--image",
            "app:v1",
            "-e",
            "A=1",
            "--storage",
            "1G",
            "--storage-disk",
            "--",
            "-c",
            "echo hi",
        ])
        .expect("parse");
        let Command::Create(create) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(create.vm.image.as_deref(), Some("app:v1"));
        assert_eq!(create.vm.container.command, ["-c", "echo hi"]);
        assert_eq!(create.vm.container.env, ["A=1"]);
        assert_eq!(create.vm.container.storage, Some(1024));
        assert!(Cli::try_parse_from(["kilnctl", "create", "app", "extra"]).is_err());
        assert!(
            Cli::try_parse_from(["kilnctl", "create", "app", "--storage-disk"]).is_err(),
            "a disk needs its size"
        );

        let cli = Cli::try_parse_from([
            "kilnctl",
            "container",
            "add",
            "web",
            "side",
            "app:v1",
            "--restart",
            "always",
            "--",
            "sleep",
            "1",
        ])
        .expect("parse");
        let Command::Container(ContainerCommand::Add(add)) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((add.vm.as_str(), add.name.as_str()), ("web", "side"));
        assert_eq!(add.container.command, ["sleep", "1"]);
        assert!(Cli::try_parse_from([
            "kilnctl",
            "container",
            "add",
            "web",
            "side",
            "app:v1",
            "--restart",
            "never"
        ])
        .is_err());

        let cli = Cli::try_parse_from(["kilnctl", "logs", "web", "-f"]).expect("parse");
        let Command::Logs(logs) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((logs.container.as_str(), logs.follow), ("main", true));
    }
}
