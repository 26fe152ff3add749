//! `knet`: a small command-line front end to kiln-net, for trying it out,
//! debugging a host, and `guest/tests/net-smoke.py`. Prints JSON.
//!
//! ```text
//! knet [--netns PATH] [--bridge NAME] [--subnet CIDR] [--masquerade] COMMAND
//!   ensure                              bridge + gateway + nft table
//!   tap VMID NIC [-- PROG ARGS...]      create/reopen the TAP; with PROG, exec it with
//!                                       the TAP descriptor inherited ("{fd}" in ARGS
//!                                       is replaced by its number), e.g. QEMU
//!   rm-tap VMID NIC | taps
//!   forward VMID tcp|udp HOSTPORT ADDRESS PORT | forwards
//!   remove VMID | reconcile [LIVE-VMID...] | teardown
//!   lease VMID NIC [ADDRESS]            what IPAM would hand out (pure, nothing stored)
//! ```

use std::error::Error;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;

use kiln_net::{Ipam, NetConfig, Network, PortForward};
use serde_json::json;

type Res<T> = Result<T, Box<dyn Error>>;

fn usage() -> Box<dyn Error> {
    "usage: knet [--netns PATH] [--bridge NAME] [--subnet CIDR] [--masquerade] \
     ensure | tap VMID NIC [-- PROG ARGS...] | rm-tap VMID NIC | taps | \
     forward VMID PROTO HOSTPORT ADDRESS PORT | forwards | remove VMID | \
     reconcile [VMID...] | teardown | lease VMID NIC [ADDRESS]"
        .into()
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    let raw = args.get(i).ok_or_else(usage)?;
    raw.parse()
        .map_err(|e: T::Err| format!("bad argument {raw:?}: {e}").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        let mut chain = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("knet: {chain}");
        std::process::exit(1);
    }
}

async fn run() -> Res<()> {
    let mut config = NetConfig::default();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while let Some(flag) = args.first().filter(|a| a.starts_with("--")).cloned() {
        args.remove(0);
        let mut value = || -> Res<String> {
            if args.is_empty() {
                return Err(usage());
            }
            Ok(args.remove(0))
        };
        match flag.as_str() {
            "--netns" => config.netns = Some(value()?.into()),
            "--bridge" => config.bridge = value()?,
            "--subnet" => config.subnet = value()?.parse()?,
            "--masquerade" => config.masquerade = true,
            _ => return Err(usage()),
        }
    }
    let command = args.first().cloned().ok_or_else(usage)?;
    if command == "lease" {
        let mut ipam = Ipam::new(config.subnet, config.gateway)?;
        let requested = if args.len() > 3 {
            Some(arg(&args, 3)?)
        } else {
            None
        };
        let lease = ipam.allocate(&arg::<String>(&args, 1)?, arg(&args, 2)?, requested)?;
        println!("{}", serde_json::to_string(&lease)?);
        return Ok(());
    }
    let net = Network::open(config).await?;
    let out = match command.as_str() {
        "ensure" => {
            let b = net.ensure().await?;
            json!({"bridge": b.name, "index": b.index, "created": b.created})
        }
        "tap" => {
            let vm: String = arg(&args, 1)?;
            let tap = net.create_tap(&vm, arg(&args, 2)?).await?;
            let info = json!({"tap": tap.name, "index": tap.index, "outcome": format!("{:?}", tap.outcome)});
            if let Some(sep) = args.iter().position(|a| a == "--") {
                let fd = tap.fd.as_raw_fd();
                // SAFETY: F_SETFD on a descriptor we own; clears
                // close-on-exec so the program below inherits it.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let argv: Vec<String> = args[sep + 1..]
                    .iter()
                    .map(|a| a.replace("{fd}", &fd.to_string()))
                    .collect();
                let (prog, rest) = argv.split_first().ok_or_else(usage)?;
                println!("{info}");
                let err = std::process::Command::new(prog).args(rest).exec();
                return Err(format!("exec {prog}: {err}").into());
            }
            info
        }
        "rm-tap" => {
            let vm: String = arg(&args, 1)?;
            json!({"removed": format!("{:?}", net.delete_tap(&vm, arg(&args, 2)?).await?)})
        }
        "taps" => {
            let taps: Vec<_> = net
                .taps()
                .await?
                .into_iter()
                .map(|t| json!({"tap": t.name, "index": t.index, "vmId": t.vm_id, "nic": t.nic, "master": t.master, "up": t.up}))
                .collect();
            json!(taps)
        }
        "forward" => {
            let forward = PortForward {
                vm_id: arg(&args, 1)?,
                protocol: arg(&args, 2)?,
                host_port: arg(&args, 3)?,
                address: arg(&args, 4)?,
                port: arg(&args, 5)?,
            };
            json!({"outcome": format!("{:?}", net.add_forward(forward).await?)})
        }
        "forwards" => json!(net.forwards().await?),
        "remove" => {
            let vm: String = arg(&args, 1)?;
            let c = net.remove_vm(&vm).await?;
            json!({"taps": c.taps, "forwards": c.forwards})
        }
        "reconcile" => {
            let c = net.reconcile(&args[1..]).await?;
            json!({"taps": c.taps, "forwards": c.forwards})
        }
        "teardown" => {
            let c = net.teardown().await?;
            json!({"taps": c.taps, "forwards": c.forwards})
        }
        _ => return Err(usage()),
    };
    println!("{out}");
    Ok(())
}
