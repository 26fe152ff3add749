//! kilnctl: the operator's command line for kilnd, a client of its varlink
//! API (`io.kiln.Manager`) and nothing else.

mod archive;
mod cli;
mod commands;
mod exit;
mod man;
mod output;
mod sla;
mod terminal;
mod view;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
// The varlink client is its own crate (shared with the containerd shim);
// imported at the root so `crate::api` and `crate::client` name it.
use kiln_client::{api, client};

use crate::api::Manager;
use crate::cli::{Cli, Command};
use crate::client::{socket_path, Connection};
use crate::commands::{CtlError, Ctx};
use crate::exit::{EXEC_FAILED, EXEC_NOT_STARTED};

/// `kilnctl __generate-man`: print kilnctl(1).
const GENERATE_MAN: &str = "__generate-man";

fn main() -> ExitCode {
    // SAFETY: signal(2) before any thread exists; the default action makes
    // `kilnctl watch | head` end quietly when head does, as other Unix
    // tools do, instead of failing on EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // For packaging/build.sh only: outside clap, so that neither the help
    // nor the completions offer it.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == GENERATE_MAN)
    {
        print!("{}", man::render(Cli::command()));
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "kilnctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let json = cli.json();
    // exec and shell keep the command's codes apart from their own.
    let exec = matches!(cli.command, Command::Exec(_) | Command::Shell(_));
    let result = Connection::open(&socket_path(&cli.address))
        .map_err(CtlError::from)
        .and_then(|conn| commands::run(&mut Ctx::new(Manager::new(conn), json), cli.command));
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kilnctl: {e}");
            match (exec, e.error_name()) {
                (true, Some("io.kiln.Manager.ExecFailed")) => EXEC_NOT_STARTED,
                (true, _) => EXEC_FAILED,
                (false, _) => e.class().code(),
            }
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
