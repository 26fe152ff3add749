//! kilnctl(1), generated from the clap definition: clap_mangen renders the
//! head (name, synopsis, description, global options), a COMMANDS section
//! lists every command with its own usage and options, and the exit
//! codes, environment and examples follow. One page, as machinectl(1) and
//! varlinkctl(1) are, rather than a page per subcommand.

use clap::{Arg, ArgAction, Command};
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

use crate::exit::{Class, EXEC_FAILED, EXEC_NOT_STARTED};

/// The page as roff.
pub fn render(cmd: Command) -> String {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd.clone())
        .title("KILNCTL")
        .section("1")
        .manual("kiln")
        .source(format!("kiln {}", env!("CARGO_PKG_VERSION")));

    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut head = |f: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut buf = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = f(&mut buf);
        chunks.push(buf);
    };
    head(&|w| man.render_title(w));
    head(&|w| man.render_name_section(w));
    head(&|w| man.render_synopsis_section(w));
    head(&|w| man.render_description_section(w));
    head(&|w| man.render_options_section(w));

    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in visible(&cmd) {
        command_entry(&mut roff, sub);
    }
    tail(&mut roff);
    chunks.push(roff.render().into_bytes());

    // Each chunk starts with roff's apostrophe preamble; keep the first.
    let texts: Vec<String> = chunks
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    let preamble = texts[0].split(".TH ").next().unwrap_or("").to_owned();
    let mut page = String::new();
    for (i, text) in texts.iter().enumerate() {
        match text.strip_prefix(preamble.as_str()) {
            Some(rest) if i > 0 && !preamble.is_empty() => page.push_str(rest),
            _ => page.push_str(text),
        }
    }
    page
}

fn visible(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// One command: a subsection with its usage, description and options; a
/// group (container, image, pool, snapshot, nic, gpu) lists its members instead.
fn command_entry(roff: &mut Roff, cmd: &Command) {
    let path = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_owned();
    if cmd.has_subcommands() {
        for sub in visible(cmd) {
            command_entry(roff, sub);
        }
        return;
    }
    roff.control("SS", [path.as_str()]);
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage:").trim();
    let rest = usage.strip_prefix(path.as_str()).unwrap_or(usage);
    roff.text([bold(path.as_str()), roman(rest)]);
    let aliases: Vec<&str> = cmd.get_visible_aliases().collect();
    if !aliases.is_empty() {
        roff.control("br", []);
        roff.text([roman(format!("Alias: {}", aliases.join(", ")))]);
    }
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|a| a.to_string())
        .unwrap_or_default();
    for paragraph in about.split("\n\n") {
        roff.control("PP", []);
        roff.text([roman(paragraph.replace('\n', " "))]);
    }
    for arg in cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
    {
        roff.control("TP", []);
        roff.text(arg_label(arg));
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        roff.text([roman(help.replace('\n', " "))]);
    }
}

/// `-e, --env NAME=VALUE` or `VM...`.
fn arg_label(arg: &Arg) -> Vec<Inline> {
    let value = arg
        .get_value_names()
        .map(|names| names.join(" "))
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    if arg.is_positional() {
        let many = matches!(arg.get_action(), ArgAction::Append)
            || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        let dots = if many { "..." } else { "" };
        return vec![italic(value), roman(dots)];
    }
    let mut label = Vec::new();
    if let Some(short) = arg.get_short() {
        label.push(bold(format!("-{short}")));
        label.push(roman(", "));
    }
    if let Some(long) = arg.get_long() {
        label.push(bold(format!("--{long}")));
    }
    if arg.get_action().takes_values() {
        label.push(roman(" "));
        label.push(italic(value));
    }
    label
}

/// EXIT STATUS, ENVIRONMENT, NOTES, EXAMPLES, SEE ALSO.
fn tail(roff: &mut Roff) {
    roff.control("SH", ["EXIT STATUS"]);
    let classes = [
        (0, "Success."),
        (Class::Failure.code(), "Failure: kilnd or the guest failed (e.g. io.kiln.Manager.BootFailed, ImagePullFailed, ContainerStartFailed), or kilnd sent something kilnctl cannot read; an archive entry cp refuses."),
        (Class::Usage.code(), "Usage: bad options or arguments, a VM or digest prefix that matches several VMs or images, an SLA file that cannot be read or is not JSON, cp with neither or both sides VM:PATH, or --json with a terminal."),
        (Class::NotFound.code(), "Not found: NoSuchVM, NoSuchPool, NoSuchNIC, ImageNotFound, NoSuchContainer, NoSuchProcess, NoSuchFile, NoSuchSnapshot; a local file cp was given that does not exist."),
        (Class::PermissionDenied.code(), "Permission denied: PermissionDenied (a mutating call without root or the kiln group), or the socket cannot be opened for lack of permission, or a local file cp may not read or write."),
        (Class::Timeout.code(), "Timeout: a deadline passed (e.g. acquire --timeout)."),
        (Class::Invalid.code(), "Invalid input or state: InvalidName, InvalidSpec, InvalidArgument, InvalidState, AlreadyExists, Busy, AddressInUse, PortInUse, NoHotplugSlot, InvalidImage, ImageInUse (image rm of an image a VM or pool uses), ContainerExists, NotSnapshottable (a VM with GPUs, hot-plugged NICs or a storage disk), org.varlink.service.InvalidParameter; an SLA field deploy refuses, a deployed VM that runs otherwise than its SLA asks, or cp of a directory over a file."),
        (Class::Exhausted.code(), "Exhausted: PoolExhausted, QuotaExceeded, NoGpuAvailable, TooManyContainers, TooManyProcesses, FileTooLarge (cp --max-bytes)."),
        (Class::Unreachable.code(), "Unreachable: kilnd's socket cannot be reached, or the connection broke."),
    ];
    for (code, text) in classes {
        roff.control("TP", []);
        roff.text([bold(code.to_string())]);
        roff.text([roman(text)]);
    }
    roff.control("PP", []);
    roff.text([
        bold("exec"),
        roman(" and "),
        bold("shell"),
        roman(format!(
            " exit with the command's status (128+N when signal N ended it; 137 after \
             exec --timeout), {EXEC_FAILED} when kilnctl or kilnd failed, and \
             {EXEC_NOT_STARTED} when the command could not be started in the guest \
             or the container (ExecFailed), as podman exec does."
        )),
    ]);
    roff.control("PP", []);
    roff.text([roman(
        "Every error is one line on standard error: kilnctl: then the varlink error name and its message, e.g.",
    )]);
    roff.control("RS", []);
    roff.text([roman(
        "kilnctl: io.kiln.Manager.NoSuchVM: no VM with id 3fa2c1d0e4b5",
    )]);
    roff.control("RE", []);

    roff.control("SH", ["ENVIRONMENT"]);
    roff.control("TP", []);
    roff.text([bold("KILN_ADDRESS")]);
    roff.text([roman(
        "kilnd's socket when --address is not given: unix:PATH or PATH (default /run/kiln/io.kiln.Manager).",
    )]);
    roff.control("TP", []);
    roff.text([bold("COLUMNS")]);
    roff.text([roman(
        "The width tables are fitted to. Without it, tables fit the terminal; \
         written to a pipe or a file they are never cut.",
    )]);

    roff.control("SH", ["NOTES"]);
    roff.text([roman(
        "exec prints the command's output as it is written and passes Ctrl-C, SIGTERM, \
         SIGHUP and SIGQUIT on to it; shell puts the local terminal in raw mode until \
         the command ends. cp names copies as docker cp does: into an existing \
         directory under the source's name, otherwise under the destination's. \
         A restored or forked VM shares the snapshot's RAM copy-on-write and gets \
         its own identity, MAC and address unless restore --same-identity. show \
         includes a running VM's usage (CPU time, memory and its cap, RSS, PSS, \
         disk, network, OOM kills); create and pool create set its limits with \
         --memory-cap, --cpus, --cpu-weight and --io-weight.",
    )]);

    roff.control("SH", ["EXAMPLES"]);
    for (what, example) in [
        ("A VM, started, a command in it, and gone:", "kilnctl create web --memory 256 --start\nkilnctl exec web -- uname -r\nkilnctl rm web"),
        ("A pool and a lease that ends by itself in ten minutes:", "kilnctl pool create ci --warm 2 --max 8\nID=$(kilnctl acquire ci --ttl 10m --label job=42)\nkilnctl exec $ID -- sh -c 'make test'\nkilnctl release $ID"),
        ("An image imported, a VM that runs it, a command in its container, its output:", "kilnctl image import ./app-layout --tag kiln.test/app:v1\nkilnctl create app --image kiln.test/app:v1 --start -- -c 'echo up; exec sleep 1d'\nkilnctl exec --container main app -- cat /etc/hello\nkilnctl logs app"),
        ("Another container beside it, followed until it ends, and removed:", "kilnctl container add app once kiln.test/app:v1 -- -c 'echo one-shot'\nkilnctl logs -f app once\nkilnctl container rm app once"),
        ("A shell in a VM, a tree copied in and a file out, input streamed into a command:", "kilnctl shell web\nkilnctl cp ./site web:/srv/\nkilnctl cp web:/var/log/app.log ./app.log\nkilnctl exec -i web -- sh -c 'cat > /tmp/in.txt' < in.txt"),
        ("A hot VM leased from a pool, running an image:", "kilnctl acquire ci --image busybox -- sleep 600"),
        ("An Oakestra SLA's microservices as VMs, and gone again:", "kilnctl deploy nginx-client-server.json\nkilnctl deploy nginx-client-server.json   # nothing changes\nkilnctl undeploy nginx-client-server.json"),
        ("A running VM saved, restored as a new VM, forked twice, taken back to the snapshot after a kill, and the snapshot removed:", "kilnctl snapshot create web before-tests\nkilnctl restore before-tests --name retry\nkilnctl fork web -n 2\nkilnctl kill web\nkilnctl restore before-tests --into web\nkilnctl snapshot rm before-tests"),
        ("A VM capped at 300 MiB and half a core:", "kilnctl create small --memory 128 --memory-cap 300M --cpus 0.5 --start"),
        ("Every change, as JSON lines:", "kilnctl watch --json | jq -c .event"),
    ] {
        roff.control("PP", []);
        roff.text([roman(what)]);
        roff.control("PP", []);
        roff.control("RS", ["4"]);
        roff.control("nf", []);
        for line in example.lines() {
            roff.text([roman(line)]);
        }
        roff.control("fi", []);
        roff.control("RE", []);
    }

    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("kilnd"),
        roman("(8), "),
        bold("kilnd.toml"),
        roman("(5), "),
        bold("varlinkctl"),
        roman("(1), "),
        bold("busctl"),
        roman("(1), "),
        bold("machinectl"),
        roman("(1)"),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_page_covers_every_command_once() {
        let page = render(crate::cli::Cli::command());
        assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
        assert_eq!(page.matches(".TH ").count(), 1);
        assert_eq!(
            page.matches(".ds Aq").count(),
            2,
            "one preamble (.ie and .el)"
        );
        for cmd in [
            "kilnctl status",
            "kilnctl list",
            "kilnctl exec",
            "kilnctl shell",
            "kilnctl cp",
            "kilnctl logs",
            "kilnctl container add",
            "kilnctl container rm",
            "kilnctl image pull",
            "kilnctl image import",
            "kilnctl image rm",
            "kilnctl pool create",
            "kilnctl pool resize",
            "kilnctl nic detach",
            "kilnctl snapshot create",
            "kilnctl snapshot ls",
            "kilnctl snapshot rm",
            "kilnctl restore",
            "kilnctl fork",
            "kilnctl gpu ls",
            "kilnctl watch",
            "kilnctl deploy",
            "kilnctl undeploy",
            "kilnctl completions",
        ] {
            assert!(page.contains(&format!(".SS \"{cmd}\"")), "{cmd} missing");
        }
        assert!(page.contains(".SH \"EXIT STATUS\""));
    }
}
