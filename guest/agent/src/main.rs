//! kiln-agent: `/init` (PID 1) of every Kiln microVM.
//!
//! It mounts the basic file systems, loads the kernel modules listed in
//! `/etc/kiln/modules`, opens the virtio-serial port `io.kiln.agent.0` and
//! serves the varlink interface `io.kiln.Agent` on it (see
//! `docs/agent-protocol.md`), forever: PID 1 must never exit, since that
//! panics the kernel.
//!
//! For tests on the host, `kiln-agent --stdio` serves the same protocol on
//! stdin/stdout until end of input (Shutdown/Reboot then only reply).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod cmdline;
mod container;
mod exec;
mod files;
mod frame;
mod identity;
mod init;
mod log;
mod network;
mod os_root;
mod params;
mod port;
mod service;
mod session;
mod sys;

use std::io::{Read, Write};
use std::time::Duration;

use kiln_agent_proto::{MAX_MESSAGE_BYTES, PORT_NAME};

use crate::cmdline::BootOptions;
use crate::frame::{Frame, FrameSplitter};
use crate::port::{Incoming, Port};
use crate::service::{After, Agent};

const READ_CHUNK: usize = 64 * 1024;

fn main() {
    // As PID 1, argv holds whatever the kernel command line left over.
    if std::process::id() == 1 {
        run_as_init();
    }
    match std::env::args().nth(1).as_deref() {
        Some("--version") => println!("kiln-agent {}", service::AGENT_VERSION),
        Some("--stdio") => serve_stdio(&mut Agent::new(&BootOptions::default())),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "kiln-agent runs as /init of a Kiln guest; use --stdio to serve on stdin/stdout"
            );
            std::process::exit(2);
        }
    }
}

fn run_as_init() -> ! {
    install_panic_hook();
    init::early();
    // Before any thread exists, so every thread inherits the mask and the
    // port's SIGIO stays pending for sigtimedwait.
    if let Err(e) = sys::block_signal(libc::SIGIO) {
        log::error!("blocking SIGIO: {e}");
    }
    init::load_modules();
    // An OS image takes PID 1 from here; this process goes on as its agent.
    let os_main = os_root::boot_if_asked();
    let mut agent = Agent::new(&BootOptions::from_proc());
    if let Some(outcome) = os_main {
        agent.set_os_main(outcome);
    }
    let mut port = Port::open_waiting(PORT_NAME);
    log::info!(
        "serving {} {}",
        kiln_agent_proto::INTERFACE,
        service::AGENT_VERSION
    );
    serve_port(&mut agent, &mut port)
}

/// A panic in PID 1 would abort and panic the kernel. Instead, log it and
/// re-execute `/init`: every start-up step is idempotent, and the host just
/// sees the call in flight go unanswered. The agent beside an OS image's
/// init is not PID 1 and its root has no Kiln `/init`: it ends (logged),
/// and the OS runs on without an agent.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let in_os = os_root::IN_OS_ROOT.load(std::sync::atomic::Ordering::SeqCst);
        let next = if in_os {
            "the agent ends"
        } else {
            "restarting"
        };
        let message = format!("<2>kiln-agent: panic: {info}; {next}\n");
        if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            let _ = kmsg.write_all(message.as_bytes());
        }
        if in_os {
            std::process::abort();
        }
        sys::exec_self(c"/init");
    }));
}

fn serve_port(agent: &mut Agent, port: &mut Port) -> ! {
    let mut splitter = FrameSplitter::new(MAX_MESSAGE_BYTES);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut frames = Vec::new();
    let mut errors: u32 = 0;
    loop {
        match port.read(&mut buf) {
            Ok(Incoming::Data(n)) => {
                errors = 0;
                splitter.push(buf.get(..n).unwrap_or_default(), &mut frames);
                for frame in frames.drain(..) {
                    handle_one(agent, port, &frame);
                }
                agent.catch_up();
            }
            Ok(Incoming::HostGone) => {
                // A frame cut short by a host that went away must not be
                // glued to the first frame of the next connection. But a
                // "disconnected" state can also be a stale view right
                // after a reconnect (see port.rs), while the new host's
                // frame is half read: so drop the partial frame only once
                // the host has stayed away for a while.
                if !port.wait_for_host() && splitter.has_partial() {
                    log::info!("host went away in the middle of a message; dropped it");
                    splitter.reset();
                }
            }
            Err(e) => {
                errors = errors.saturating_add(1);
                if errors <= 3 {
                    log::error!("reading the port: {e}");
                }
                std::thread::sleep(Duration::from_millis(200));
                // Persistent errors (the port was unplugged?): start over.
                if errors >= 10 {
                    port.reopen(PORT_NAME);
                    errors = 0;
                }
            }
        }
        agent.reap();
    }
}

fn handle_one(agent: &mut Agent, port: &mut Port, frame: &Frame) {
    let response = agent.handle_frame(frame);
    if let Some(bytes) = &response.bytes {
        match port.write_reply(bytes) {
            Ok(true) => {}
            Ok(false) => log::info!("host disconnected before the reply was sent; dropped it"),
            Err(e) => log::error!("writing a reply: {e}"),
        }
    }
    // Reap what the call may have orphaned (e.g. `sh -c 'x & y'`), now that
    // no command is being waited for.
    agent.reap();
    let cmd = match response.after {
        After::Continue => return,
        After::PowerOff => libc::RB_POWER_OFF,
        After::Reboot => libc::RB_AUTOBOOT,
    };
    sys::sync();
    // Let the host-side chardev take the reply before the machine goes.
    std::thread::sleep(Duration::from_millis(20));
    let err = sys::reboot(cmd);
    log::error!("reboot({cmd:#x}): {err}");
}

fn serve_stdio(agent: &mut Agent) {
    let mut splitter = FrameSplitter::new(MAX_MESSAGE_BYTES);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut frames = Vec::new();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        splitter.push(buf.get(..n).unwrap_or_default(), &mut frames);
        for frame in frames.drain(..) {
            let response = agent.handle_frame(&frame);
            if let Some(bytes) = response.bytes {
                if stdout
                    .write_all(&bytes)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return;
                }
            }
        }
        agent.catch_up();
    }
}
