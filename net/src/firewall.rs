//! NAT and port forwards in an nftables table Kiln owns: `inet kiln`.
//!
//! ```text
//! table inet kiln {
//!   chain prerouting  { type nat hook prerouting priority dstnat; policy accept;
//!     fib daddr type local tcp dport 8080 dnat ip to 10.77.0.5:80 comment "kiln:vm=0123456789ab;fwd=tcp/8080;to=10.77.0.5:80"
//!   }
//!   chain output      { type nat hook output priority -100; policy accept;
//!     (the same rule, for connections made on the host itself) }
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade comment "kiln:masquerade"
//!   }
//! }
//! ```
//!
//! A second table, `bridge kiln`, drops RARP (ethertype 0x8035) coming in
//! from Kiln's TAPs before the bridge learns its source: QEMU announces a
//! restored NIC with RARP from the MAC in the loaded device state, which
//! for a template's clone is the template's MAC (docs/networking.md,
//! "Template clones and MAC addresses"), not the clone's. Kiln does not
//! migrate VMs between hosts, so nothing needs those announcements.
//!
//! ```text
//! table bridge kiln {
//!   chain prerouting { type filter hook prerouting priority filter; policy accept;
//!     iifname "kt*" ether type 0x8035 drop comment "kiln:no-rarp"
//!   }
//! }
//! ```
//!
//! Rules are written with the `nftables` crate's typed JSON schema and
//! applied with `nft -j -f -`, one atomic transaction per change. Every
//! rule carries a comment naming its VM, so the VM's rules are found and
//! deleted by handle, exactly those. Nothing outside the table is read or
//! written. The comment is also the record of a forward: listing the table
//! is how Kiln knows which host ports are taken, so the kernel is the only
//! source of truth and a restarted kilnd sees the same state.
//!
//! These functions block (they run `nft`) and act in the calling thread's
//! network namespace; [`crate::Network`] runs them through
//! [`crate::netns::NsExec`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFamily, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ipam::Ipv4Net;
use crate::names::{self, NameError};

/// The table's name (family `inet`).
pub const TABLE: &str = "kiln";
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";
/// The masquerade rule of one subnet is commented `kiln:masquerade;net=<subnet>`
/// (each of kilnd's networks has its own); a bare `kiln:masquerade` is
/// what earlier versions wrote, replaced on the next `ensure`.
const MASQUERADE_COMMENT: &str = "kiln:masquerade";

/// RARP's ethertype: what QEMU announces a restored NIC with.
const ETHERTYPE_RARP: u32 = 0x8035;
const NO_RARP_COMMENT: &str = "kiln:no-rarp";

fn masquerade_comment(subnet: Ipv4Net) -> String {
    format!("{MASQUERADE_COMMENT};net={subnet}")
}
const VM_COMMENT_PREFIX: &str = "kiln:vm=";

/// Firewall errors.
#[derive(Debug, Error)]
pub enum FirewallError {
    /// The host port is already forwarded (to another VM, or to another
    /// port of the same VM).
    #[error("host port {protocol}/{host_port} is already forwarded to VM {vm_id}")]
    PortInUse {
        /// Protocol.
        protocol: Protocol,
        /// The host port.
        host_port: u16,
        /// The VM it is forwarded to.
        vm_id: String,
    },
    /// A port of 0.
    #[error("port 0 cannot be forwarded")]
    InvalidPort,
    /// The VM id is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `nft` could not be run.
    #[error("cannot run {program:?}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `nft` failed.
    #[error("nft {what} failed: {stderr}")]
    Nft {
        /// What was attempted.
        what: &'static str,
        /// Its error output.
        stderr: String,
    },
    /// `nft` printed something that is not the JSON it should.
    #[error("cannot parse nft output")]
    Parse(#[source] serde_json::Error),
}

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(format!("unknown protocol {other:?} (tcp or udp)")),
        }
    }
}

/// A port forward: `hostPort` on every local address of the host →
/// `address:port` of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortForward {
    /// The VM it belongs to.
    pub vm_id: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port on the host.
    pub host_port: u16,
    /// The VM's address.
    pub address: Ipv4Addr,
    /// Port in the VM.
    pub port: u16,
}

impl PortForward {
    fn comment(&self) -> String {
        format!(
            "{VM_COMMENT_PREFIX}{};fwd={}/{};to={}:{}",
            self.vm_id, self.protocol, self.host_port, self.address, self.port
        )
    }

    fn from_comment(comment: &str) -> Option<Self> {
        let rest = comment.strip_prefix(VM_COMMENT_PREFIX)?;
        let mut parts = rest.split(';');
        let vm_id = parts.next()?.to_owned();
        let (protocol, host_port) = parts.next()?.strip_prefix("fwd=")?.split_once('/')?;
        let (address, port) = parts.next()?.strip_prefix("to=")?.split_once(':')?;
        if parts.next().is_some() || !names::is_vm_id(&vm_id) {
            return None;
        }
        Some(Self {
            vm_id,
            protocol: protocol.parse().ok()?,
            host_port: host_port.parse().ok()?,
            address: address.parse().ok()?,
            port: port.parse().ok()?,
        })
    }

    fn validate(&self) -> Result<(), FirewallError> {
        names::validate_vm_id(&self.vm_id)?;
        if self.host_port == 0 || self.port == 0 {
            return Err(FirewallError::InvalidPort);
        }
        Ok(())
    }
}

/// Whether [`Firewall::add_forward`] added the forward or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardOutcome {
    /// Added now.
    Added,
    /// The identical forward was already there.
    AlreadyPresent,
}

/// A rule of Kiln's table, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    /// Chain.
    pub chain: String,
    /// Rule handle.
    pub handle: u32,
    /// Its comment.
    pub comment: Option<String>,
}

/// Kiln's nftables table, through the `nft` binary.
#[derive(Debug, Clone)]
pub struct Firewall {
    nft: PathBuf,
}

/// Kiln's table of `family` (`inet` for NAT and forwards, `bridge` for
/// the RARP rule).
fn table_ref(family: NfFamily) -> Table<'static> {
    Table {
        family,
        name: Cow::Borrowed(TABLE),
        ..Table::default()
    }
}

/// The bridge table's one chain: `filter` at prerouting, before the
/// bridge learns a frame's source.
fn bridge_prerouting() -> Chain<'static> {
    base_chain(
        NfFamily::Bridge,
        NfChainType::Filter,
        PREROUTING,
        NfHook::Prerouting,
        -200,
    )
}

/// Drops RARP from Kiln's TAPs (see the module docs).
fn no_rarp_rule() -> Rule<'static> {
    let tap_name = Expression::String(Cow::Owned(format!("{}*", names::TAP_PREFIX)));
    Rule {
        family: NfFamily::Bridge,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(PREROUTING),
        expr: Cow::Owned(vec![
            matches(
                Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Iifname,
                })),
                Operator::EQ,
                tap_name,
            ),
            matches(
                payload("ether", "type"),
                Operator::EQ,
                Expression::Number(ETHERTYPE_RARP),
            ),
            Statement::Drop(None),
        ]),
        comment: Some(Cow::Borrowed(NO_RARP_COMMENT)),
        ..Rule::default()
    }
}

fn base_chain(
    family: NfFamily,
    kind: NfChainType,
    name: &'static str,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(name),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> Rule<'static> {
    Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        comment: Some(Cow::Owned(comment)),
        ..Rule::default()
    }
}

fn forward_rule(chain: &'static str, f: &PortForward) -> Rule<'static> {
    let local = Expression::Named(NamedExpression::Fib(Fib {
        result: FibResult::Type,
        flags: HashSet::from([FibFlag::Daddr]),
    }));
    rule(
        chain,
        vec![
            matches(
                local,
                Operator::EQ,
                Expression::String(Cow::Borrowed("local")),
            ),
            matches(
                payload(f.protocol.as_str(), "dport"),
                Operator::EQ,
                Expression::Number(u32::from(f.host_port)),
            ),
            Statement::DNAT(Some(NAT {
                addr: Some(Expression::String(Cow::Owned(f.address.to_string()))),
                family: Some(NATFamily::IP),
                port: Some(Expression::Number(u32::from(f.port))),
                flags: None,
            })),
        ],
        f.comment(),
    )
}

fn masquerade_rule(subnet: Ipv4Net) -> Rule<'static> {
    rule(
        POSTROUTING,
        vec![
            matches(payload("ip", "saddr"), Operator::EQ, prefix(subnet)),
            matches(payload("ip", "daddr"), Operator::NEQ, prefix(subnet)),
            Statement::Masquerade(None),
        ],
        masquerade_comment(subnet),
    )
}

fn delete_rule(r: &TableRule) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Delete(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Owned(r.chain.clone()),
        handle: Some(r.handle),
        ..Rule::default()
    })))
}

fn add(obj: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(obj))
}

fn batch(objects: Vec<NfObject<'static>>) -> Nftables<'static> {
    Nftables {
        objects: Cow::Owned(objects),
    }
}

impl Firewall {
    /// A firewall driving `nft` (a path, or a name looked up in `PATH`).
    pub fn new(nft: impl Into<PathBuf>) -> Self {
        Self { nft: nft.into() }
    }

    /// The `nft` program used.
    pub fn program(&self) -> &Path {
        &self.nft
    }

    fn run(
        &self,
        what: &'static str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, FirewallError> {
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FirewallError::Spawn {
                program: self.nft.clone(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error shows up as nft's failure below.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| FirewallError::Spawn {
                program: self.nft.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(FirewallError::Nft {
                what,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, what: &'static str, cmds: &Nftables<'_>) -> Result<(), FirewallError> {
        let json = serde_json::to_string(cmds).map_err(FirewallError::Parse)?;
        self.run(what, &["-j", "-f", "-"], Some(&json)).map(drop)
    }

    /// Whether the table exists.
    pub fn table_exists(&self) -> Result<bool, FirewallError> {
        Ok(self.own_tables()?.contains(&NfFamily::INet))
    }

    /// The families Kiln's table exists in (`inet`, `bridge`), from one
    /// listing.
    fn own_tables(&self) -> Result<Vec<NfFamily>, FirewallError> {
        let out = self.run("list tables", &["-j", "list", "tables"], None)?;
        let value: serde_json::Value = serde_json::from_str(&out).map_err(FirewallError::Parse)?;
        let families = value["nftables"].as_array().map(|objs| {
            objs.iter()
                .filter(|o| o["table"]["name"] == TABLE)
                .filter_map(|o| match o["table"]["family"].as_str()? {
                    "inet" => Some(NfFamily::INet),
                    "bridge" => Some(NfFamily::Bridge),
                    _ => None,
                })
                .collect()
        });
        Ok(families.unwrap_or_default())
    }

    /// Creates the table and its chains if missing (idempotent), then sets
    /// the masquerade rule for `subnet` on or off in one transaction,
    /// leaving the rules of other subnets (other networks of kilnd's)
    /// alone.
    pub fn ensure(&self, subnet: Ipv4Net, masquerade: bool) -> Result<(), FirewallError> {
        let nat_chain = |name, hook, prio| {
            add(NfListObject::Chain(base_chain(
                NfFamily::INet,
                NfChainType::NAT,
                name,
                hook,
                prio,
            )))
        };
        let cmds = vec![
            add(NfListObject::Table(table_ref(NfFamily::INet))),
            // dstnat = -100, srcnat = 100 (nft's named priorities).
            nat_chain(PREROUTING, NfHook::Prerouting, -100),
            nat_chain(OUTPUT, NfHook::Output, -100),
            nat_chain(POSTROUTING, NfHook::Postrouting, 100),
            add(NfListObject::Table(table_ref(NfFamily::Bridge))),
            add(NfListObject::Chain(bridge_prerouting())),
            // Flushed and written again: the same one rule however often
            // kilnd starts.
            NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(bridge_prerouting()))),
            add(NfListObject::Rule(no_rarp_rule())),
        ];
        self.apply("ensure tables", &batch(cmds))?;
        let own = masquerade_comment(subnet);
        let mut cmds: Vec<NfObject<'static>> = self
            .rules()?
            .into_iter()
            .filter(|r| {
                r.comment
                    .as_deref()
                    .is_some_and(|c| c == own || c == MASQUERADE_COMMENT)
            })
            .map(|r| delete_rule(&r))
            .collect();
        if masquerade {
            cmds.push(add(NfListObject::Rule(masquerade_rule(subnet))));
        }
        if cmds.is_empty() {
            return Ok(());
        }
        self.apply("set masquerade", &batch(cmds))
    }

    /// Deletes the whole table and the `bridge kiln` table (uninstall,
    /// tests); `false` if the `inet` table was absent.
    pub fn delete_table(&self) -> Result<bool, FirewallError> {
        let present = self.own_tables()?;
        if present.is_empty() {
            return Ok(false);
        }
        let cmds = present
            .iter()
            .map(|family| {
                NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table_ref(*family))))
            })
            .collect();
        self.apply("delete tables", &batch(cmds))?;
        Ok(present.contains(&NfFamily::INet))
    }

    /// Every rule of the table (empty if the table does not exist).
    pub fn rules(&self) -> Result<Vec<TableRule>, FirewallError> {
        if !self.table_exists()? {
            return Ok(Vec::new());
        }
        let out = self.run("list table", &["-j", "list", "table", "inet", TABLE], None)?;
        let value: serde_json::Value = serde_json::from_str(&out).map_err(FirewallError::Parse)?;
        let rules = value["nftables"]
            .as_array()
            .map(|objs| {
                objs.iter()
                    .filter_map(|o| {
                        let r = o.get("rule")?;
                        Some(TableRule {
                            chain: r["chain"].as_str()?.to_owned(),
                            handle: u32::try_from(r["handle"].as_u64()?).ok()?,
                            comment: r["comment"].as_str().map(str::to_owned),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(rules)
    }

    /// Whether the masquerade rule of `subnet` is in place.
    pub fn masquerading(&self, subnet: Ipv4Net) -> Result<bool, FirewallError> {
        let own = masquerade_comment(subnet);
        Ok(self
            .rules()?
            .iter()
            .any(|r| r.comment.as_deref() == Some(own.as_str())))
    }

    /// Every forward in the table.
    pub fn forwards(&self) -> Result<Vec<PortForward>, FirewallError> {
        let mut seen = Vec::new();
        for r in self.rules()? {
            if let Some(f) = r.comment.as_deref().and_then(PortForward::from_comment) {
                if !seen.contains(&f) {
                    seen.push(f);
                }
            }
        }
        Ok(seen)
    }

    /// Adds a forward (the table must exist: [`Firewall::ensure`]).
    /// Refuses a host port that is already forwarded elsewhere
    /// ([`FirewallError::PortInUse`]); the identical forward again is a
    /// no-op.
    pub fn add_forward(&self, forward: &PortForward) -> Result<ForwardOutcome, FirewallError> {
        forward.validate()?;
        for existing in self.forwards()? {
            if existing.protocol == forward.protocol && existing.host_port == forward.host_port {
                if existing == *forward {
                    return Ok(ForwardOutcome::AlreadyPresent);
                }
                return Err(FirewallError::PortInUse {
                    protocol: forward.protocol,
                    host_port: forward.host_port,
                    vm_id: existing.vm_id,
                });
            }
        }
        let cmds = batch(vec![
            add(NfListObject::Rule(forward_rule(PREROUTING, forward))),
            add(NfListObject::Rule(forward_rule(OUTPUT, forward))),
        ]);
        self.apply("add forward", &cmds)?;
        Ok(ForwardOutcome::Added)
    }

    /// Deletes the rules tagged with a VM for which `doomed` is true, in one
    /// transaction; returns the forwards removed.
    fn remove_where(
        &self,
        doomed: impl Fn(&str) -> bool,
    ) -> Result<Vec<PortForward>, FirewallError> {
        let mut removed = Vec::new();
        let mut cmds = Vec::new();
        for r in self.rules()? {
            let Some(comment) = r.comment.as_deref() else {
                continue;
            };
            let Some(vm_id) = comment
                .strip_prefix(VM_COMMENT_PREFIX)
                .and_then(|rest| rest.split(';').next())
            else {
                continue;
            };
            if !doomed(vm_id) {
                continue;
            }
            if let Some(f) = PortForward::from_comment(comment) {
                if !removed.contains(&f) {
                    removed.push(f);
                }
            }
            cmds.push(delete_rule(&r));
        }
        if !cmds.is_empty() {
            self.apply("delete rules", &batch(cmds))?;
        }
        Ok(removed)
    }

    /// Removes every rule of `vm_id`; returns its forwards (idempotent).
    pub fn remove_vm(&self, vm_id: &str) -> Result<Vec<PortForward>, FirewallError> {
        names::validate_vm_id(vm_id)?;
        self.remove_where(|id| id == vm_id)
    }

    /// Removes the rules of every VM for which `live` is false (reconcile).
    pub fn retain(&self, live: impl Fn(&str) -> bool) -> Result<Vec<PortForward>, FirewallError> {
        self.remove_where(|id| !live(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd() -> PortForward {
        PortForward {
            vm_id: "0123456789ab".into(),
            protocol: Protocol::Tcp,
            host_port: 8080,
            address: "10.77.0.5".parse().unwrap(),
            port: 80,
        }
    }

    #[test]
    fn comments_round_trip_and_fit() {
        let f = fwd();
        let c = f.comment();
        assert_eq!(c, "kiln:vm=0123456789ab;fwd=tcp/8080;to=10.77.0.5:80");
        assert!(c.len() <= 128, "nft comments are at most 128 bytes");
        assert_eq!(PortForward::from_comment(&c), Some(f));
        for bad in [
            "kiln:masquerade",
            "kiln:vm=0123456789ab",
            "kiln:vm=BAD;fwd=tcp/1;to=10.0.0.1:1",
            "kiln:vm=0123456789ab;fwd=sctp/1;to=10.0.0.1:1",
            "kiln:vm=0123456789ab;fwd=tcp/1;to=10.0.0.1:1;x",
        ] {
            assert_eq!(PortForward::from_comment(bad), None, "{bad}");
        }
    }

    #[test]
    fn forward_rule_json_is_what_nft_expects() {
        let json = serde_json::to_value(forward_rule(PREROUTING, &fwd())).unwrap();
        assert_eq!(json["family"], "inet");
        assert_eq!(json["table"], "kiln");
        assert_eq!(json["expr"][0]["match"]["left"]["fib"]["result"], "type");
        assert_eq!(
            json["expr"][1]["match"]["left"]["payload"]["field"],
            "dport"
        );
        assert_eq!(json["expr"][1]["match"]["right"], 8080);
        assert_eq!(
            json["expr"][2]["dnat"],
            serde_json::json!({"addr": "10.77.0.5", "family": "ip", "port": 80})
        );
    }

    #[test]
    fn bad_forwards_are_refused_before_nft_runs() {
        let fw = Firewall::new("/nonexistent/nft");
        let mut f = fwd();
        f.host_port = 0;
        assert!(matches!(
            fw.add_forward(&f),
            Err(FirewallError::InvalidPort)
        ));
        let mut f = fwd();
        f.vm_id = "x".into();
        assert!(matches!(fw.add_forward(&f), Err(FirewallError::Name(_))));
        assert!(matches!(fw.remove_vm("x"), Err(FirewallError::Name(_))));
        assert!(matches!(
            fw.add_forward(&fwd()),
            Err(FirewallError::Spawn { .. })
        ));
    }
}
