//! The egress policy's front ends: command-line options, the policy file, the control
//! API's commands and the JSON that `usernet stats` and `network inspect` show.
//!
//! # Theory of operation
//!
//! The policy itself is the forwarder's ([`forwarder::egress`]: the rules, their order,
//! what is matched, the names). This module turns what the user writes into a
//! [`Spec`]:
//!
//! - `--allow CIDR[,PROTO[:PORTS]]`, `--deny ...`, `--allow-domain NAME` and
//!   `--egress-policy FILE` keep the order in which they appear on the command line:
//!   clap runs value parsers in argument order, and each parsed value takes the next
//!   number of one process-wide sequence ([`Ordered`]). A policy file is read and
//!   checked while the command line is parsed (before any sandbox), its rules taking its
//!   place in that order. `--deny-private` and `--default-deny` are not ordered
//!   (`deny-private` always comes after the explicit rules; see the forwarder's module).
//! - The options become one policy while the command line is parsed too
//!   ([`EgressPolicy`]), the file merged as pasta mode merges its `--egress-policy`
//!   ([`Spec::append_file`]): more rules than the forwarder's limit, the file's and the
//!   options' together (`--deny-private` is one, as a file's `deny-private` line is), is
//!   a usage error on every front end.
//! - `deny-private` also covers the host's own addresses, read with `getifaddrs` when
//!   the policy is made.
//!
//! The API commands (`list_egress`, `add_egress_rule`, `remove_egress_rule`,
//! `set_egress_default`) act on the policy in force at once: new flows follow the new
//! rules from the next packet; `"reset": true` also resets the open flows they deny.
//! A request may name a member of a network by address (`"member"`), else it is the
//! network's (or the single namespace's) policy.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Args, FromArgMatches};
use forwarder::egress::{Action, Policy, RuleKind, Spec};
use forwarder::Forwarder;
use serde_json::{json, Value};

use crate::requests::error;

/// A value of the command line with its place in it.
#[derive(Debug, Clone)]
pub struct Ordered<T> {
    /// Its place among the ordered options.
    pub seq: u64,
    /// The value.
    pub value: T,
}

/// The sequence that numbers ordered values as clap parses them.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn ordered<T>(value: T) -> Ordered<T> {
    Ordered {
        seq: SEQ.fetch_add(1, Ordering::Relaxed),
        value,
    }
}

fn parse_allow(s: &str) -> Result<Ordered<RuleKind>, String> {
    RuleKind::parse(&format!("allow {s}")).map(ordered)
}

fn parse_deny(s: &str) -> Result<Ordered<RuleKind>, String> {
    RuleKind::parse(&format!("deny {s}")).map(ordered)
}

fn parse_allow_domain(s: &str) -> Result<Ordered<RuleKind>, String> {
    RuleKind::parse(&format!("allow-domain {s}")).map(ordered)
}

/// Reads and checks a policy file.
pub fn read_policy_file(path: &str) -> Result<Spec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.parse().map_err(|e| format!("{path}: {e}"))
}

pub fn parse_policy_file(path: &str) -> Result<Ordered<Spec>, String> {
    read_policy_file(path).map(ordered)
}

/// The egress policy options (attach and run mode; in run mode with `--network`, the
/// member's own policy).
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Egress policy (rules in command-line order, first match wins)")]
pub struct EgressArgs {
    /// Allow new flows to CIDR (or an address, or `any`), optionally only PROTO (tcp,
    /// udp, icmp) and PORTS (N or N-M): e.g. `192.168.1.10,tcp:22` (repeatable).
    #[arg(long = "allow", value_name = "CIDR[,PROTO[:PORTS]]", value_parser = parse_allow)]
    pub allow: Vec<Ordered<RuleKind>>,

    /// Deny new flows to CIDR[,PROTO[:PORTS]] (as --allow): "administratively
    /// prohibited", nothing leaves the host (repeatable).
    #[arg(long = "deny", value_name = "CIDR[,PROTO[:PORTS]]", value_parser = parse_deny)]
    pub deny: Vec<Ordered<RuleKind>>,

    /// Deny the LAN and the host: RFC 1918, 100.64.0.0/10, link-local (169.254.0.0/16,
    /// the metadata service; fe80::/10), fc00::/7, multicast, loopback (the gateway's
    /// mapping), the host's own addresses; after every --allow, which may open some.
    #[arg(long)]
    pub deny_private: bool,

    /// Allow the addresses NAME resolves to (through the DNS forwarder, for the answer's
    /// TTL, at least 30 s and at most 1 h); `*.NAME`: its subdomains. Other names get
    /// NXDOMAIN when names are filtered (any --allow-domain, or --default-deny).
    #[arg(long = "allow-domain", value_name = "NAME", value_parser = parse_allow_domain)]
    pub allow_domain: Vec<Ordered<RuleKind>>,

    /// Deny new flows that no rule allows (default: allow).
    #[arg(long)]
    pub default_deny: bool,

    /// Read rules from FILE: one per line, `allow CIDR [PROTO[:PORTS]]`, `deny ...`,
    /// `deny-private`, `allow-domain NAME`, `default allow|deny`, `name-ttl MIN MAX`;
    /// `#` comments (see the README). At most 100000 rules, the file's and the options'
    /// together.
    #[arg(long = "egress-policy", value_name = "FILE", value_parser = parse_policy_file)]
    pub egress_policy: Option<Ordered<Spec>>,
}

impl EgressArgs {
    /// The policy these options say, `None` when they say nothing: their rules in
    /// command-line order, the file's merged where it stands ([`Spec::append_file`], as
    /// pasta mode's `--egress-policy`).
    ///
    /// # Errors
    /// `--OPTION: more than N rules` ([`MAX_RULES`](forwarder::egress::MAX_RULES), the
    /// files' and the options' together, `--deny-private` one of them).
    pub fn spec(&self) -> Result<Option<Spec>, String> {
        enum Part<'a> {
            Rule(&'static str, &'a RuleKind),
            File(&'a Spec),
        }
        let rules = [
            ("--allow", &self.allow),
            ("--deny", &self.deny),
            ("--allow-domain", &self.allow_domain),
        ];
        let mut parts: Vec<(u64, Part<'_>)> = rules
            .into_iter()
            .flat_map(|(opt, list)| list.iter().map(move |o| (o.seq, Part::Rule(opt, &o.value))))
            .chain(
                self.egress_policy
                    .iter()
                    .map(|o| (o.seq, Part::File(&o.value))),
            )
            .collect();
        parts.sort_by_key(|(seq, _)| *seq);
        let mut spec = Spec::default();
        for (_, part) in parts {
            match part {
                Part::Rule(opt, rule) => {
                    spec.push(rule.clone()).map_err(|e| format!("{opt}: {e}"))?
                }
                Part::File(file) => spec
                    .append_file(file)
                    .map_err(|e| format!("--egress-policy: {e}"))?,
            }
        }
        finish_spec(spec, self.deny_private, self.default_deny)
            .map_err(|e| format!("--deny-private: {e}"))
    }
}

/// The policy of a command's [`EgressArgs`], made while the command line is parsed: a
/// command flattens this, and a policy [`EgressArgs::spec`] refuses is a usage error
/// like a bad rule.
#[derive(Debug, Default, Clone)]
pub struct EgressPolicy {
    /// `None` when the options say nothing.
    pub spec: Option<Spec>,
}

impl FromArgMatches for EgressPolicy {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }

    fn from_arg_matches_mut(m: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        let spec = EgressArgs::from_arg_matches_mut(m)?
            .spec()
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))?;
        Ok(EgressPolicy { spec })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for EgressPolicy {
    fn group_id() -> Option<clap::Id> {
        EgressArgs::group_id()
    }

    fn augment_args(cmd: clap::Command) -> clap::Command {
        EgressArgs::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        EgressArgs::augment_args_for_update(cmd)
    }
}

/// A front end's policy from its rules and files (`spec`) and its two switches,
/// `--egress-deny-private` (a rule anywhere: it comes after every explicit one, see
/// [`forwarder::egress`]) and `--egress-default-deny`; `None` when it then lets
/// everything through.
///
/// # Errors
/// `more than N rules` when `deny_private` is a rule beyond
/// [`MAX_RULES`](forwarder::egress::MAX_RULES): it counts as the policy file's
/// `deny-private` line does.
pub fn finish_spec(
    mut spec: Spec,
    deny_private: bool,
    default_deny: bool,
) -> Result<Option<Spec>, String> {
    if deny_private {
        spec.push(RuleKind::DenyPrivate)?;
    }
    if default_deny {
        spec.default = Action::Deny;
    }
    if spec.is_open() {
        return Ok(None);
    }
    Ok(Some(spec))
}

/// The host's own addresses (every interface's), which `deny-private` covers: read at
/// start, before the sandbox (seccomp allows no netlink socket).
pub fn host_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A policy as JSON: default, rules with ids and hits, addresses learned.
pub fn policy_json(p: &Policy) -> Value {
    let (default, default_hits) = p.default_action();
    json!({
        "default": default.to_string(),
        "default_hits": default_hits,
        "names_filtered": p.filters_names(),
        "learned_addresses": p.learned_total(),
        "rules": p.rules().iter().map(|r| json!({
            "id": r.id,
            "rule": r.kind.to_string(),
            "hits": r.hits,
        })).collect::<Vec<_>>(),
    })
}

/// [`policy_json`] as `usernet stats` lines: `egress.default deny 12` (its hits), then
/// `egress.rule.ID hits RULE` per rule; nothing without a policy.
pub fn stats_lines(policy: &Value) -> Vec<String> {
    let Some(default) = policy["default"].as_str() else {
        return Vec::new();
    };
    let mut out = vec![
        format!("egress.default {default} {}", policy["default_hits"]),
        format!("egress.learned_addresses {}", policy["learned_addresses"]),
    ];
    for r in policy["rules"].as_array().into_iter().flatten() {
        out.push(format!(
            "egress.rule.{} {} {}",
            r["id"],
            r["hits"],
            r["rule"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// Runs one egress API command (`execute` with its `args`) on `fwd`; the reply. `None`
/// when `execute` is not an egress command.
pub fn execute(
    fwd: &mut Forwarder,
    io: &mut forwarder::Io<'_, crate::host::Sockets>,
    execute: &str,
    args: Option<&Value>,
) -> Option<Value> {
    let arg = |name: &str| args.and_then(|a| a.get(name));
    let member = match arg("member").map(|m| m.as_str().and_then(|s| s.parse::<IpAddr>().ok())) {
        None => None,
        Some(Some(ip)) => Some(ip),
        Some(None) => {
            return Some(error(&format!(
                "bad request: {execute}: bad arguments.member"
            )))
        }
    };
    let reset = arg("reset").and_then(Value::as_bool).unwrap_or(false);
    let reply = match execute {
        "list_egress" => match fwd.egress(member) {
            Some(p) => json!({ "return": policy_json(p) }),
            None => json!({ "return": { "default": "allow", "rules": [] } }),
        },
        "add_egress_rule" => {
            let Some(rule) = arg("rule").and_then(Value::as_str) else {
                return Some(error("bad request: add_egress_rule: bad arguments.rule"));
            };
            let kind = match RuleKind::parse(rule) {
                Ok(k) => k,
                Err(e) => return Some(error(&format!("bad request: add_egress_rule: {e}"))),
            };
            let at = match arg("position") {
                None => None,
                Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) => Some(n),
                    None => {
                        return Some(error(
                            "bad request: add_egress_rule: bad arguments.position",
                        ))
                    }
                },
            };
            let id = match policy_of(fwd, member).insert(at, kind) {
                Ok(id) => id,
                Err(e) => return Some(error(&format!("bad request: add_egress_rule: {e}"))),
            };
            changed(fwd, io, reset, json!({ "id": id }))
        }
        "remove_egress_rule" => {
            let id = arg("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok());
            let removed = match (id, fwd.egress_mut(member)) {
                (Some(id), Some(p)) => p.remove(id),
                _ => false,
            };
            if !removed {
                return Some(error("bad request: remove_egress_rule: bad arguments.id"));
            }
            changed(fwd, io, reset, json!({}))
        }
        "set_egress_default" => {
            let action = match arg("default").and_then(Value::as_str) {
                Some("allow") => Action::Allow,
                Some("deny") => Action::Deny,
                _ => {
                    return Some(error(
                        "bad request: set_egress_default: bad arguments.default",
                    ))
                }
            };
            policy_of(fwd, member).set_default(action);
            changed(fwd, io, reset, json!({}))
        }
        _ => return None,
    };
    Some(reply)
}

/// The reply to a change of a policy: `ret` and how many open flows were reset (with
/// `"reset": true`, those the policy now denies).
fn changed(
    fwd: &mut Forwarder,
    io: &mut forwarder::Io<'_, crate::host::Sockets>,
    reset: bool,
    mut ret: Value,
) -> Value {
    ret["reset"] = json!(if reset { fwd.reset_denied_flows(io) } else { 0 });
    json!({ "return": ret })
}

/// The policy of `member` (the network's: `None`), made empty (allow all) if there is
/// none yet.
fn policy_of(fwd: &mut Forwarder, member: Option<IpAddr>) -> &mut Policy {
    if fwd.egress(member).is_none() {
        let addrs: Vec<IpAddr> = member.into_iter().collect();
        fwd.set_egress(&addrs, Some(&Spec::default()));
    }
    fwd.egress_mut(member).expect("just set")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        e: EgressPolicy,
    }

    #[test]
    fn rules_keep_their_command_line_order() {
        let dir = std::env::temp_dir().join(format!("usernet-egress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy");
        std::fs::write(&file, "default deny\ndeny 192.0.2.0/24\n").unwrap();
        let t = T::try_parse_from([
            "t",
            "--deny-private",
            "--allow",
            "10.0.2.2,tcp:8080",
            "--allow-domain",
            "*.example.com",
            "--egress-policy",
            file.to_str().unwrap(),
            "--deny",
            "any,udp:53",
        ])
        .unwrap();
        let spec = t.e.spec.unwrap();
        let shown: Vec<String> = spec.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "allow 10.0.2.2 tcp:8080",
                "allow-domain *.example.com",
                "deny 192.0.2.0/24",
                "deny any udp:53",
                "deny-private",
            ]
        );
        assert_eq!(spec.default, Action::Deny);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_limit_counts_the_file_and_the_options_together() {
        use forwarder::egress::MAX_RULES;
        let dir = std::env::temp_dir().join(format!("usernet-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy");
        std::fs::write(&file, "deny 198.51.100.1\n".repeat(MAX_RULES)).unwrap();
        let file = file.to_str().unwrap();
        // --deny-private is one rule, as a file's `deny-private` line is.
        for (args, culprit) in [
            (
                &["--egress-policy", file, "--deny", "192.0.2.1"][..],
                "--deny",
            ),
            (
                &["--allow", "192.0.2.1", "--egress-policy", file],
                "--egress-policy",
            ),
            (
                &["--egress-policy", file, "--deny-private"],
                "--deny-private",
            ),
            (
                &["--deny-private", "--egress-policy", file],
                "--deny-private",
            ),
        ] {
            let e = T::try_parse_from(["t"].iter().chain(args)).err().unwrap();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
            let want = format!("{culprit}: more than {MAX_RULES} rules");
            assert!(e.to_string().contains(&want), "{e}");
        }
        let short = dir.join("short");
        std::fs::write(&short, "deny 198.51.100.1\n".repeat(MAX_RULES - 1)).unwrap();
        let short = short.to_str().unwrap();
        let t = T::try_parse_from(["t", "--egress-policy", short, "--deny-private"]).unwrap();
        let rules = t.e.spec.unwrap().rules;
        assert_eq!(rules.len(), MAX_RULES);
        assert_eq!(rules.last(), Some(&RuleKind::DenyPrivate));
        std::fs::remove_dir_all(&dir).unwrap();
        let help = <T as clap::CommandFactory>::command()
            .term_width(0)
            .render_long_help();
        let said = format!("At most {MAX_RULES} rules");
        assert!(help.to_string().contains(&said), "{help}");
    }

    #[test]
    fn nothing_said_no_policy_and_bad_values_refused() {
        assert!(T::try_parse_from(["t"]).unwrap().e.spec.is_none());
        for bad in [
            ["t", "--allow", "10.0.0.1/8"],
            ["t", "--deny", "any,tcp:0"],
            ["t", "--allow-domain", "a b"],
            ["t", "--egress-policy", "/nonexistent/policy"],
        ] {
            assert!(T::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
