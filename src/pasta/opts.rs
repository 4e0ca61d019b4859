//! pasta's command line and the host template of `--config-net`.
//!
//! # Theory of operation
//!
//! podman 5+ and RootlessKit v2 start `pasta` with passt's option syntax and rely on its
//! exact behaviour (see the README's pasta section). usernet takes that command line when
//! the basename of `argv[0]` contains `pasta` (as pasta picks its own mode) or after
//! `usernet pasta`.
//!
//! **Parsing** is hand-written getopt_long, not clap: pasta's callers depend on details
//! clap does not reproduce: an unknown option must fail with getopt's exact text
//! (`unrecognized option '--x'`, podman's retry without `--map-guest-addr` keys on it) and
//! exit status 1; long options may be abbreviated to any unique prefix; `-xVALUE`,
//! `-x VALUE`, `--long VALUE` and `--long=VALUE` are all accepted; parsing stops at the
//! first non-option (`+` in the getopt string) so that `pasta -- CMD -a` and
//! `pasta CMD -a` both leave `-a` to CMD. Options that take no value refuse one.
//!
//! **The model** ([`PastaOpts`]) is everything pasta's callers pass; [`PortSpec`] is the
//! `-t/-u/-T/-U` grammar (`none`, `auto`, ranges, `[ADDR][%IF]/`, `~` exclusions, comma
//! lists; repeated options add up). As in pasta, an option's exclusions cut that option's
//! ranges only, `%IF` (`-t/-u`) binds the host listeners to an interface, and an option of
//! exclusions alone ([`AllBut`], `-t/-u`) forwards every other port but the ephemeral
//! ones, best effort (see [`super::publish`]). `all` is refused with pasta's own
//! text (pasta allows it for passt only), and so are modes that do not combine
//! ([`PastaError::Pasta`], printed without a prefix, as pasta prints it).
//!
//! **Every option pasta has** (passt's `conf.c`) is in [`LONG`]/[`SHORT`], so none is
//! unknown by omission: the ones that turn a service off (`--no-dhcp`, `--no-ra`,
//! `--no-tcp`, ...) are taken with their meaning (the forwarder's `Services`); the ones
//! pasta itself refuses in pasta mode (`-s`, `--one-off`, `--no-dhcp-dns`, ...) get
//! pasta's text; what usernet does not implement (`-M`, `--freebind`, `--fd`, `-T/-U`
//! `%IF` and exclusions alone, ...) gets a sentence naming the option and why
//! ([`refusal`]), never ignored. Only an option pasta does not have either is
//! `unrecognized option`.
//!
//! **The host template** ([`HostTemplate`]): `--config-net` copies the addresses of the
//! host interface holding the default route (`/proc/net/route`, `/proc/net/ipv6_route`,
//! `getifaddrs`), the first non-link-local one per family, and the default gateways.
//! Without a default route pasta's fallbacks apply (169.254.2.1/16 via 169.254.2.2).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use forwarder::port::Proto;

use crate::conf::Publish;
use crate::pasta::publish::{PastaOption, Rule};
use crate::sys::link::Route;

/// Errors of the command line and of the host template; printed as one line on stderr,
/// exit status 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PastaError {
    /// getopt's texts, verbatim (podman matches them).
    #[error("unrecognized option '{0}'")]
    Unrecognized(String),
    /// An unknown short option.
    #[error("invalid option -- '{0}'")]
    InvalidShort(char),
    /// A long option abbreviated to a prefix of several.
    #[error("option '{0}' is ambiguous")]
    Ambiguous(String),
    /// A long option needing a value got none.
    #[error("option '--{0}' requires an argument")]
    MissingLong(String),
    /// A short option needing a value got none.
    #[error("option requires an argument -- '{0}'")]
    MissingShort(char),
    /// A flag given a value (`--quiet=1`).
    #[error("option '--{0}' doesn't allow an argument")]
    UnexpectedValue(String),
    /// A value that does not parse, or a combination pasta refuses.
    #[error("{0}")]
    Invalid(String),
    /// pasta's own text for what it refuses, printed as pasta prints it (no prefix).
    #[error("{0}")]
    Pasta(String),
}

/// Whether an option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    No,
    Yes,
}

/// Long options: name, value, the short option it is (or a private code).
const LONG: &[(&str, Arg, char)] = &[
    ("debug", Arg::No, 'd'),
    ("quiet", Arg::No, 'q'),
    ("foreground", Arg::No, 'f'),
    ("stderr", Arg::No, 'e'),
    ("log-file", Arg::Yes, 'l'),
    ("help", Arg::No, 'h'),
    ("version", Arg::No, '\u{1}'),
    ("trace", Arg::No, '\u{2}'),
    ("pcap", Arg::Yes, 'p'),
    ("pid", Arg::Yes, 'P'),
    ("mtu", Arg::Yes, 'm'),
    ("address", Arg::Yes, 'a'),
    ("netmask", Arg::Yes, 'n'),
    ("gateway", Arg::Yes, 'g'),
    ("interface", Arg::Yes, 'i'),
    ("outbound", Arg::Yes, 'o'),
    ("dns", Arg::Yes, 'D'),
    ("ipv4-only", Arg::No, '4'),
    ("ipv6-only", Arg::No, '6'),
    ("tcp-ports", Arg::Yes, 't'),
    ("udp-ports", Arg::Yes, 'u'),
    ("tcp-ns", Arg::Yes, 'T'),
    ("udp-ns", Arg::Yes, 'U'),
    ("ns-ifname", Arg::Yes, 'I'),
    ("netns", Arg::Yes, '\u{3}'),
    ("userns", Arg::Yes, '\u{4}'),
    ("config-net", Arg::No, '\u{5}'),
    ("dns-forward", Arg::Yes, '\u{6}'),
    ("dns-host", Arg::Yes, '\u{7}'),
    ("no-map-gw", Arg::No, '\u{8}'),
    ("map-host-loopback", Arg::Yes, '\u{9}'),
    ("map-guest-addr", Arg::Yes, '\u{a}'),
    ("host-lo-to-ns-lo", Arg::No, '\u{b}'),
    ("ns-mac-addr", Arg::Yes, '\u{c}'),
    ("runas", Arg::Yes, '\u{d}'),
    // Services and protocol handlers turned off.
    ("no-tcp", Arg::No, '\u{e000}'),
    ("no-udp", Arg::No, '\u{e001}'),
    ("no-icmp", Arg::No, '\u{e002}'),
    ("no-dhcp", Arg::No, '\u{e003}'),
    ("no-dhcpv6", Arg::No, '\u{e004}'),
    ("no-ndp", Arg::No, '\u{e005}'),
    ("no-ra", Arg::No, '\u{e006}'),
    ("no-splice", Arg::No, '\u{e007}'),
    ("dhcp-dns", Arg::No, '\u{e008}'),
    ("no-netns-quit", Arg::No, '\u{e009}'),
    ("no-copy-routes", Arg::No, '\u{e00a}'),
    ("no-copy-addrs", Arg::No, '\u{e00b}'),
    ("chroot-fallback", Arg::No, '\u{e00c}'),
    ("search", Arg::Yes, 'S'),
    // The rest of pasta's options: refused, each with its reason (see `refusal`).
    ("socket", Arg::Yes, 's'),
    ("socket-path", Arg::Yes, 's'),
    ("fd", Arg::Yes, 'F'),
    ("conf-path", Arg::Yes, 'c'),
    ("mac-addr", Arg::Yes, 'M'),
    ("hostname", Arg::Yes, 'H'),
    ("one-off", Arg::No, '1'),
    ("splice-only", Arg::No, '\u{e100}'),
    ("freebind", Arg::No, '\u{e101}'),
    ("no-dhcp-dns", Arg::No, '\u{e102}'),
    ("dhcp-search", Arg::No, '\u{e103}'),
    ("no-dhcp-search", Arg::No, '\u{e104}'),
    ("log-size", Arg::Yes, '\u{e105}'),
    ("outbound-if4", Arg::Yes, '\u{e106}'),
    ("outbound-if6", Arg::Yes, '\u{e107}'),
    ("netns-only", Arg::No, '\u{e108}'),
    ("vhost-user", Arg::No, '\u{e109}'),
    ("print-capabilities", Arg::No, '\u{e10a}'),
    ("fqdn", Arg::Yes, '\u{e10b}'),
    ("repair-path", Arg::Yes, '\u{e10c}'),
    ("migrate-exit", Arg::No, '\u{e10d}'),
    ("migrate-no-linger", Arg::No, '\u{e10e}'),
    ("stats", Arg::Yes, '\u{e10f}'),
    // usernet's egress policy (no pasta option starts with `egress`, so no abbreviation
    // of one of pasta's changes meaning).
    ("egress-allow", Arg::Yes, '\u{e200}'),
    ("egress-deny", Arg::Yes, '\u{e201}'),
    ("egress-deny-private", Arg::No, '\u{e202}'),
    ("egress-allow-domain", Arg::Yes, '\u{e203}'),
    ("egress-default-deny", Arg::No, '\u{e204}'),
    ("egress-policy", Arg::Yes, '\u{e205}'),
];

/// Why usernet refuses one of pasta's options (code as in [`LONG`]), or `None` for the
/// ones it takes. Every option of pasta's (passt's `conf.c`, its man page) is in [`LONG`]
/// and [`SHORT`]: none is unknown by omission. pasta's own words where pasta refuses it
/// too ([`PastaError::Pasta`]), otherwise a sentence naming what usernet does not do.
fn refusal(code: char, name: &str, value: &str) -> Option<PastaError> {
    let pasta = |s: &str| Some(PastaError::Pasta(s.to_owned()));
    let unsupported = |why: &str| {
        Some(PastaError::Invalid(format!(
            "--{name}: not supported by usernet ({why})"
        )))
    };
    match code {
        // pasta's texts: these are for passt or vhost-user, in pasta mode too.
        's' => pasta("-s is for passt / vhost-user mode only"),
        '1' => pasta("--one-off is for passt mode only"),
        '\u{e102}' => pasta("--no-dhcp-dns is for passt mode only"),
        '\u{e104}' => pasta("--no-dhcp-search is for passt mode only"),
        '\u{e10c}' if value == "none" => None,
        '\u{e10c}' => pasta("--repair-path is for vhost-user mode only"),
        '\u{e10d}' => pasta("--migrate-exit is for vhost-user mode only"),
        '\u{e10e}' => pasta("--migrate-no-linger is for vhost-user mode only"),
        'F' => unsupported("a pre-opened tap socket is for passt's guests; pasta mode opens the namespace's TAP itself"),
        'c' => unsupported("no pesto control socket: ports are fixed at start, or followed with auto"),
        'M' => unsupported("the gateway's MAC address is usernet's own"),
        'H' | '\u{e10b}' => unsupported("its DHCP server sends no host name"),
        '\u{e100}' => unsupported("the namespace's link is always served"),
        '\u{e101}' => unsupported("forwarded ports bind only local addresses"),
        '\u{e103}' => unsupported("it announces no DNS search list"),
        '\u{e105}' => unsupported("its log file is not rotated or bounded"),
        '\u{e106}' | '\u{e107}' => unsupported("host sockets are not bound to an interface; -o binds an address"),
        '\u{e108}' => unsupported("a PID target joins the process's user namespace too; use --netns PATH"),
        '\u{e109}' | '\u{e10a}' => unsupported("there is no vhost-user mode"),
        '\u{e10f}' => unsupported("its counters are not printed"),
        _ => None,
    }
}

/// Short options and whether they take a value.
const SHORT: &[(char, Arg)] = &[
    ('d', Arg::No),
    ('q', Arg::No),
    ('f', Arg::No),
    ('e', Arg::No),
    ('h', Arg::No),
    ('4', Arg::No),
    ('6', Arg::No),
    ('l', Arg::Yes),
    ('p', Arg::Yes),
    ('P', Arg::Yes),
    ('m', Arg::Yes),
    ('a', Arg::Yes),
    ('n', Arg::Yes),
    ('g', Arg::Yes),
    ('i', Arg::Yes),
    ('o', Arg::Yes),
    ('D', Arg::Yes),
    ('t', Arg::Yes),
    ('u', Arg::Yes),
    ('T', Arg::Yes),
    ('U', Arg::Yes),
    ('I', Arg::Yes),
    ('S', Arg::Yes),
    ('s', Arg::Yes),
    ('F', Arg::Yes),
    ('c', Arg::Yes),
    ('M', Arg::Yes),
    ('H', Arg::Yes),
    ('1', Arg::No),
];

/// One `-t/-u/-T/-U` forwarding range: host (or, for `-T/-U`, namespace) ports
/// `first..=last` to `to..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange {
    /// `ADDR/`: the address to listen on; `None`: every address.
    pub addr: Option<IpAddr>,
    /// `%IF/`: the host interface the listeners are bound to (`-t/-u` only).
    pub ifname: Option<String>,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
    /// Where `first` goes on the other side (the rest follow).
    pub to: u16,
    /// The option's value as given (pasta's messages quote it).
    pub value: String,
}

/// An option of exclusions only (`-t ~20000-20010`): every other port that is not
/// ephemeral (`net.ipv4.ip_local_port_range`), each to the same port, as far as the
/// host lets them be bound (see [`super::publish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllBut {
    /// `ADDR/`: the address to listen on; `None`: every address.
    pub addr: Option<IpAddr>,
    /// `%IF/`: the host interface the listeners are bound to.
    pub ifname: Option<String>,
    /// The excluded ranges.
    pub excluded: Vec<(u16, u16)>,
    /// The option's value as given (pasta's messages quote it).
    pub value: String,
}

/// A `-t/-u/-T/-U` option's accumulated value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSpec {
    /// Whether any option was given (pasta's default without one is `auto`).
    pub given: bool,
    /// `none`.
    pub none: bool,
    /// `auto`: follow the listening sockets of the other side.
    pub auto: bool,
    /// Explicit ranges, the `~` exclusions of their option already cut out.
    pub ranges: Vec<PortRange>,
    /// Every `~FIRST[-LAST]` given with explicit ranges (what `auto` leaves out too).
    pub excluded: Vec<(u16, u16)>,
    /// Options of exclusions only (`-t/-u`).
    pub all_but: Vec<AllBut>,
}

/// The ephemeral port range pasta leaves out of exclusion-only specs when
/// `/proc/sys/net/ipv4/ip_local_port_range` cannot be read (RFC 6335's).
pub const EPHEMERAL_FALLBACK: (u16, u16) = (49152, 65535);

/// The `ip_local_port_range` text: `FIRST\tLAST`.
pub fn parse_port_range_sysctl(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(a)), Some(Ok(b)), None) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    (a <= b).then_some((a, b))
}

/// This network namespace's ephemeral ports (pasta's fallback if unreadable).
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_port_range_sysctl(&t))
        .unwrap_or_else(|| {
            log::warn!("cannot read net.ipv4.ip_local_port_range: assuming 49152-65535");
            EPHEMERAL_FALLBACK
        })
}

/// Ranges `first..=last` minus `excluded`, as runs of consecutive ports.
fn runs(first: u16, last: u16, excluded: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let out_of = |p: u32| {
        excluded
            .iter()
            .any(|&(a, b)| (u32::from(a)..=u32::from(b)).contains(&p))
    };
    let mut out = Vec::new();
    let mut p = u32::from(first);
    while p <= u32::from(last) {
        let start = p;
        while p <= u32::from(last) && !out_of(p) {
            p += 1;
        }
        if p > start {
            out.push((start as u16, (p - 1) as u16));
        }
        p += 1;
    }
    out
}

impl PortSpec {
    /// Adds one option value: `none`, `auto`, `all` (refused as pasta does), or a comma
    /// list of `[ADDR][%IF]/` and `FIRST[-LAST][:TOFIRST[-TOLAST]]` and `~FIRST[-LAST]`;
    /// exclusions alone (`-t/-u` only) mean every other port.
    ///
    /// # Errors
    /// [`PastaError::Invalid`] naming the value; [`PastaError::Pasta`] with pasta's
    /// text for `all` and for modes that do not combine.
    pub fn add(&mut self, opt: &str, value: &str) -> Result<(), PastaError> {
        let bad = |why: &str| {
            PastaError::Invalid(format!("invalid {opt} specification '{value}': {why}"))
        };
        let was_given = self.given;
        self.given = true;
        let conflict = || {
            PastaError::Pasta(format!(
                "Port forwarding mode '{value}' conflicts with previous mode"
            ))
        };
        match value {
            "none" => {
                if !self.all_but.is_empty() {
                    return Err(conflict());
                }
                if self.auto || !self.ranges.is_empty() {
                    return Err(bad("'none' cannot be combined with other ports"));
                }
                self.none = true;
                return Ok(());
            }
            "auto" => {
                if !self.all_but.is_empty() {
                    return Err(conflict());
                }
                self.auto = true;
                return self.check_none(&bad);
            }
            // pasta's `all` is passt's only (pasta exits 1 with this text).
            "all" if was_given => return Err(conflict()),
            "all" => {
                return Err(PastaError::Pasta(
                    "'all' port forwarding is only allowed for passt".into(),
                ))
            }
            _ => {}
        }
        let ns_side = matches!(opt, "-T" | "-U");
        let (addr, ifname, list) = match value.split_once('/') {
            Some((prefix, list)) => {
                let (addr, ifname) = match prefix.split_once('%') {
                    Some((a, i)) => (a, Some(i)),
                    None => (prefix, None),
                };
                if let Some(i) = ifname {
                    if ns_side {
                        return Err(PastaError::Invalid(format!(
                            "{opt} {value}: an interface (%IF) is for -t/-u only"
                        )));
                    }
                    // IFNAMSIZ, with its terminating NUL.
                    if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', '\t']) {
                        return Err(bad("bad interface name"));
                    }
                }
                let addr = addr
                    .strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(addr);
                let ip = match (addr, ifname) {
                    ("", Some(_)) => None,
                    _ => Some(addr.parse::<IpAddr>().map_err(|_| bad("bad address"))?),
                };
                (ip, ifname.map(str::to_owned), list)
            }
            None => (None, None, value),
        };
        // This option's exclusions first: they cut its ranges wherever they are given.
        let mut excluded = Vec::new();
        for item in list.split(',') {
            if let Some(ex) = item.strip_prefix('~') {
                excluded
                    .push(crate::conf::parse_range(ex).ok_or_else(|| bad("bad excluded range"))?);
            }
        }
        let mut any = false;
        for item in list.split(',').filter(|i| !i.starts_with('~')) {
            let (from, to) = match item.split_once(':') {
                Some((from, to)) => (from, Some(to)),
                None => (item, None),
            };
            let (first, last) =
                crate::conf::parse_range(from).ok_or_else(|| bad("bad port range"))?;
            let to = match to {
                None => first,
                Some(to) => {
                    let (t0, t1) =
                        crate::conf::parse_range(to).ok_or_else(|| bad("bad target range"))?;
                    if t1 != t0 && t1 - t0 != last - first {
                        return Err(bad("the ranges differ in length"));
                    }
                    if u32::from(t0) + u32::from(last - first) > u32::from(u16::MAX) {
                        return Err(bad("target range beyond 65535"));
                    }
                    t0
                }
            };
            for (a, b) in runs(first, last, &excluded) {
                self.ranges.push(PortRange {
                    addr,
                    ifname: ifname.clone(),
                    first: a,
                    last: b,
                    to: to + (a - first),
                    value: value.to_owned(),
                });
            }
            any = true;
        }
        if !any {
            // Exclusions only: pasta then forwards every other port.
            if ns_side {
                return Err(PastaError::Invalid(format!(
                    "{opt} {value}: exclusions alone (all other ports) are not supported by usernet for -T/-U"
                )));
            }
            if self.none || self.auto {
                return Err(PastaError::Pasta(
                    "Specific ports cannot be specified together with all/none/auto".into(),
                ));
            }
            self.all_but.push(AllBut {
                addr,
                ifname,
                excluded,
                value: value.to_owned(),
            });
            return Ok(());
        }
        self.excluded.extend(excluded);
        self.check_none(&bad)
    }

    fn check_none(&self, bad: &dyn Fn(&str) -> PastaError) -> Result<(), PastaError> {
        if self.none {
            return Err(bad("'none' cannot be combined with other ports"));
        }
        Ok(())
    }

    /// Whether `port` is excluded.
    pub fn excludes(&self, port: u16) -> bool {
        self.excluded.iter().any(|&(a, b)| (a..=b).contains(&port))
    }

    /// The interfaces named with `%IF`.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.ranges
            .iter()
            .filter_map(|r| r.ifname.as_deref())
            .chain(self.all_but.iter().filter_map(|a| a.ifname.as_deref()))
    }

    /// The explicit ranges, then the exclusion-only options, as `-p` rules of `proto`;
    /// an address-less range listens on `0.0.0.0` and, unless `v4_only`, on `::` too.
    /// Exclusion-only options leave out port 0 and the `ephemeral` range and are
    /// best-effort rules.
    pub fn publish(
        &self,
        proto: Proto,
        v4_only: bool,
        v6_only: bool,
        ephemeral: (u16, u16),
    ) -> Vec<Rule> {
        let addrs = |addr: Option<IpAddr>| -> Vec<IpAddr> {
            match addr {
                Some(a) => vec![a],
                None => {
                    let mut v = Vec::new();
                    if !v6_only {
                        v.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                    }
                    if !v4_only {
                        v.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
                    }
                    v
                }
            }
        };
        let opt = match proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        let option = |value: &str| PastaOption {
            opt: opt.into(),
            value: value.into(),
        };
        let mut out = Vec::new();
        for r in &self.ranges {
            for host_ip in addrs(r.addr) {
                out.push(Rule {
                    publish: Publish {
                        proto,
                        host_ip: Some(host_ip),
                        host_port: r.first,
                        guest_port: r.to,
                        count: r.last - r.first + 1,
                        device: r.ifname.clone(),
                    },
                    option: option(&r.value),
                    best_effort: false,
                });
            }
        }
        for a in &self.all_but {
            let mut skip = a.excluded.clone();
            skip.push(ephemeral);
            for host_ip in addrs(a.addr) {
                for (first, last) in runs(1, u16::MAX, &skip) {
                    out.push(Rule {
                        publish: Publish {
                            proto,
                            host_ip: Some(host_ip),
                            host_port: first,
                            guest_port: first,
                            count: last - first + 1,
                            device: a.ifname.clone(),
                        },
                        option: option(&a.value),
                        best_effort: true,
                    });
                }
            }
        }
        out
    }
}

/// Everything pasta's command line says.
#[derive(Debug, Clone, Default)]
pub struct PastaOpts {
    /// `--version`.
    pub version: bool,
    /// `-h/--help`.
    pub help: bool,
    /// `-d/--debug`.
    pub debug: bool,
    /// `--trace`.
    pub trace: bool,
    /// `-q/--quiet`.
    pub quiet: bool,
    /// `-f/--foreground`.
    pub foreground: bool,
    /// `-l/--log-file`.
    pub log_file: Option<PathBuf>,
    /// `-p/--pcap`.
    pub pcap: Option<PathBuf>,
    /// `-P/--pid`.
    pub pid_file: Option<PathBuf>,
    /// `-m/--mtu`.
    pub mtu: Option<u32>,
    /// `-a/--address` per family.
    pub addr4: Option<Ipv4Addr>,
    /// `-a/--address` (IPv6).
    pub addr6: Option<Ipv6Addr>,
    /// `-n/--netmask` (IPv4 prefix length).
    pub prefix4: Option<u8>,
    /// `-g/--gateway` per family.
    pub gw4: Option<Ipv4Addr>,
    /// `-g/--gateway` (IPv6).
    pub gw6: Option<Ipv6Addr>,
    /// `-i/--interface`: the host interface to copy.
    pub interface: Option<String>,
    /// `-o/--outbound` per family.
    pub outbound4: Option<Ipv4Addr>,
    /// `-o/--outbound` (IPv6).
    pub outbound6: Option<Ipv6Addr>,
    /// `-4/--ipv4-only`.
    pub v4_only: bool,
    /// `-6/--ipv6-only`.
    pub v6_only: bool,
    /// `-t/--tcp-ports`.
    pub tcp: PortSpec,
    /// `-u/--udp-ports`.
    pub udp: PortSpec,
    /// `-T/--tcp-ns`.
    pub tcp_ns: PortSpec,
    /// `-U/--udp-ns`.
    pub udp_ns: PortSpec,
    /// `-I/--ns-ifname`.
    pub ns_ifname: Option<String>,
    /// `--ns-mac-addr`.
    pub ns_mac: Option<[u8; 6]>,
    /// `--netns PATH|NAME` (a NAME is `/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// `--userns PATH`.
    pub userns: Option<PathBuf>,
    /// A bare PID target.
    pub pid: Option<i32>,
    /// `[--] CMD [ARGS]`.
    pub command: Vec<OsString>,
    /// `--config-net`.
    pub config_net: bool,
    /// `--dns-forward` per family.
    pub dns_forward4: Option<Ipv4Addr>,
    /// `--dns-forward` (IPv6).
    pub dns_forward6: Option<Ipv6Addr>,
    /// `--dns-host`: the upstream for `--dns-forward` instead of resolv.conf's first.
    pub dns_host: Option<IpAddr>,
    /// `-D/--dns ADDR` (repeatable): the resolvers `--dns-forward` uses instead of
    /// resolv.conf's.
    pub dns: Vec<IpAddr>,
    /// `--no-map-gw`.
    pub no_map_gw: bool,
    /// `--map-host-loopback ADDR` per family.
    pub map_loopback4: Option<Ipv4Addr>,
    /// `--map-host-loopback` (IPv6).
    pub map_loopback6: Option<Ipv6Addr>,
    /// `--map-guest-addr ADDR` per family.
    pub map_guest4: Option<Ipv4Addr>,
    /// `--map-guest-addr` (IPv6).
    pub map_guest6: Option<Ipv6Addr>,
    /// `--host-lo-to-ns-lo`.
    pub host_lo_to_ns_lo: bool,
    /// `--no-tcp`: TCP from the namespace is dropped; no TCP port is forwarded.
    pub no_tcp: bool,
    /// `--no-udp`: UDP from the namespace (DNS included, DHCP aside) is dropped; no UDP
    /// port is forwarded.
    pub no_udp: bool,
    /// `--no-icmp`: echo requests are dropped (and, as in pasta, NDP is off too).
    pub no_icmp: bool,
    /// `--no-dhcp`: the DHCP server does not answer.
    pub no_dhcp: bool,
    /// `--no-dhcpv6`: accepted; usernet has no DHCPv6 server to turn off.
    pub no_dhcpv6: bool,
    /// `--no-ndp`: neighbour and router solicitations are not answered, no router
    /// advertisements.
    pub no_ndp: bool,
    /// `--no-ra`: no router advertisements (without `--config-net` they are sent, as
    /// pasta does).
    pub no_ra: bool,
    /// `--no-splice`: clients on the host's loopback cross the link like any other.
    pub no_splice: bool,
    /// `--dhcp-dns`: DHCP and router advertisements name the `--dns-forward` address.
    pub dhcp_dns: bool,
    /// `-S/--search`: the DNS search list (announced only with `--dhcp-search`, which
    /// usernet refuses); `none` empties it.
    pub search: Vec<String>,
    /// `--no-netns-quit`: keep running when the namespace or target process goes away.
    pub no_netns_quit: bool,
    /// `--no-copy-routes`: `--config-net` sets the default route only.
    pub no_copy_routes: bool,
    /// `--no-copy-addrs`: `--config-net` sets one address per family (what usernet
    /// does anyway).
    pub no_copy_addrs: bool,
    /// The egress policy usernet's `--egress-*` options say, `None` when they say
    /// nothing: made from the three fields below once every option is read.
    pub egress_policy: Option<forwarder::egress::Spec>,
    /// While parsing: usernet's `--egress-allow`, `--egress-deny`, `--egress-allow-domain`
    /// rules and `--egress-policy` files, in command-line order (a file's default and
    /// name TTLs too); [`egress_policy`](Self::egress_policy) takes them at the end.
    egress: forwarder::egress::Spec,
    /// `--egress-deny-private`.
    egress_deny_private: bool,
    /// `--egress-default-deny`.
    egress_default_deny: bool,
}

/// Finds a long option by its full name or a unique prefix (getopt_long).
fn find_long(name: &str) -> Result<(&'static str, Arg, char), PastaError> {
    if let Some(&(n, a, c)) = LONG.iter().find(|(n, _, _)| *n == name) {
        return Ok((n, a, c));
    }
    let matches: Vec<_> = LONG
        .iter()
        .filter(|(n, _, _)| n.starts_with(name))
        .collect();
    match matches.as_slice() {
        [] => Err(PastaError::Unrecognized(format!("--{name}"))),
        _ if name.is_empty() => Err(PastaError::Unrecognized(format!("--{name}"))),
        // As glibc: prefixes of several names for the same option are not ambiguous
        // (`--sock` is `--socket` and `--socket-path`, both `-s`).
        [&(n, a, c), rest @ ..] if rest.iter().all(|&&(_, ra, rc)| (ra, rc) == (a, c)) => {
            Ok((n, a, c))
        }
        _ => Err(PastaError::Ambiguous(format!("--{name}"))),
    }
}

impl PastaOpts {
    /// Parses pasta's arguments (without `argv[0]`).
    ///
    /// # Errors
    /// [`PastaError`] with getopt's text for syntax errors, or naming a bad value.
    pub fn parse(args: &[OsString]) -> Result<PastaOpts, PastaError> {
        let mut o = PastaOpts::default();
        let mut i = 0;
        while i < args.len() {
            let raw = args[i].as_bytes();
            let arg = String::from_utf8_lossy(raw).into_owned();
            i += 1;
            if arg == "--" {
                o.command.extend(args[i..].iter().cloned());
                break;
            }
            if let Some(long) = arg.strip_prefix("--") {
                let (name, inline) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_owned())),
                    None => (long, None),
                };
                let (full, kind, code) = find_long(name)?;
                let value = match (kind, inline) {
                    (Arg::No, Some(_)) => return Err(PastaError::UnexpectedValue(full.to_owned())),
                    (Arg::No, None) => None,
                    (Arg::Yes, Some(v)) => Some(v),
                    (Arg::Yes, None) => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| PastaError::MissingLong(full.to_owned()))?;
                        i += 1;
                        Some(v.to_string_lossy().into_owned())
                    }
                };
                o.apply(code, full, value)?;
                continue;
            }
            if arg.len() > 1 && arg.starts_with('-') {
                let chars: Vec<char> = arg[1..].chars().collect();
                let mut j = 0;
                while j < chars.len() {
                    let c = chars[j];
                    j += 1;
                    let &(_, kind) = SHORT
                        .iter()
                        .find(|(s, _)| *s == c)
                        .ok_or(PastaError::InvalidShort(c))?;
                    let value = if kind == Arg::Yes {
                        let rest: String = chars[j..].iter().collect();
                        j = chars.len();
                        if rest.is_empty() {
                            let v = args.get(i).ok_or(PastaError::MissingShort(c))?;
                            i += 1;
                            Some(v.to_string_lossy().into_owned())
                        } else {
                            Some(rest)
                        }
                    } else {
                        None
                    };
                    let name = LONG
                        .iter()
                        .find(|(_, _, code)| *code == c)
                        .map_or("", |(n, _, _)| *n);
                    o.apply(c, name, value)?;
                }
                continue;
            }
            // The first non-option ends the options (getopt's '+').
            let rest = &args[i - 1..];
            match (rest.len(), arg.parse::<i32>()) {
                (1, Ok(pid)) if pid > 0 => o.pid = Some(pid),
                _ => o.command.extend(rest.iter().cloned()),
            }
            break;
        }
        o.validate()?;
        Ok(o)
    }

    fn apply(&mut self, code: char, name: &str, value: Option<String>) -> Result<(), PastaError> {
        let v = value.unwrap_or_default();
        if let Some(e) = refusal(code, name, &v) {
            return Err(e);
        }
        let bad = |what: &str| PastaError::Invalid(format!("invalid {what} for --{name}: '{v}'"));
        let ip = || v.parse::<IpAddr>().map_err(|_| bad("address"));
        match code {
            'd' => self.debug = true,
            '\u{2}' => {
                self.debug = true;
                self.trace = true;
            }
            'q' => self.quiet = true,
            'f' => self.foreground = true,
            // Accepted and without effect, as in pasta: logs go to stderr anyway.
            'e' => {}
            'h' => self.help = true,
            '\u{1}' => self.version = true,
            'l' => self.log_file = Some(PathBuf::from(&v)),
            'p' => self.pcap = Some(PathBuf::from(&v)),
            'P' => self.pid_file = Some(PathBuf::from(&v)),
            'm' => {
                let mtu: u32 = v.parse().map_err(|_| bad("MTU"))?;
                if !(68..=65520).contains(&mtu) {
                    return Err(bad("MTU (68..65520)"));
                }
                self.mtu = Some(mtu);
            }
            'a' => match ip()? {
                IpAddr::V4(a) => self.addr4 = Some(a),
                IpAddr::V6(a) => self.addr6 = Some(a),
            },
            'n' => {
                let prefix = match v.parse::<u8>() {
                    Ok(p) if p <= 32 => p,
                    _ => {
                        let mask: Ipv4Addr = v.parse().map_err(|_| bad("netmask"))?;
                        let m = u32::from(mask);
                        if m.leading_ones() + m.trailing_zeros() != 32 {
                            return Err(bad("netmask"));
                        }
                        m.leading_ones() as u8
                    }
                };
                self.prefix4 = Some(prefix);
            }
            'g' => match ip()? {
                IpAddr::V4(a) => self.gw4 = Some(a),
                IpAddr::V6(a) => self.gw6 = Some(a),
            },
            'i' => self.interface = Some(v),
            'o' => match ip()? {
                IpAddr::V4(a) => self.outbound4 = Some(a),
                IpAddr::V6(a) => self.outbound6 = Some(a),
            },
            // podman 5.0 passes `--dns none`: announce no resolver (usernet announces
            // none by DHCP or NDP in pasta mode anyway).
            'D' if v == "none" => {}
            'D' => {
                let a = ip()?;
                if a.is_unspecified() {
                    return Err(bad("DNS address"));
                }
                self.dns.push(a);
            }
            '4' => self.v4_only = true,
            '6' => self.v6_only = true,
            't' => self.tcp.add("-t", &v)?,
            'u' => self.udp.add("-u", &v)?,
            'T' => self.tcp_ns.add("-T", &v)?,
            'U' => self.udp_ns.add("-U", &v)?,
            'I' => {
                if v.is_empty() || v.len() > 15 || v.contains('/') || v.contains(' ') {
                    return Err(bad("interface name"));
                }
                self.ns_ifname = Some(v);
            }
            '\u{3}' => {
                self.netns = Some(if v.contains('/') {
                    PathBuf::from(&v)
                } else {
                    PathBuf::from("/run/netns").join(&v)
                })
            }
            '\u{4}' => self.userns = Some(PathBuf::from(&v)),
            '\u{5}' => self.config_net = true,
            '\u{6}' => match ip()? {
                IpAddr::V4(a) => self.dns_forward4 = Some(a),
                IpAddr::V6(a) => self.dns_forward6 = Some(a),
            },
            '\u{7}' => self.dns_host = Some(ip()?),
            '\u{8}' => self.no_map_gw = true,
            '\u{9}' | '\u{a}' => {
                let addr = if v == "none" { None } else { Some(ip()?) };
                let (v4, v6) = if code == '\u{9}' {
                    (&mut self.map_loopback4, &mut self.map_loopback6)
                } else {
                    (&mut self.map_guest4, &mut self.map_guest6)
                };
                match addr {
                    Some(IpAddr::V4(a)) => *v4 = Some(a),
                    Some(IpAddr::V6(a)) => *v6 = Some(a),
                    None => {
                        *v4 = None;
                        *v6 = None;
                    }
                }
            }
            '\u{b}' => self.host_lo_to_ns_lo = true,
            // pasta drops to this user when started as root. usernet keeps its user, so
            // only the user it already runs as is accepted.
            '\u{d}' => {
                let (user, group) = v
                    .split_once(':')
                    .map_or((v.as_str(), None), |(u, g)| (u, Some(g)));
                let uid = user.parse::<u32>().ok().or_else(|| {
                    nix::unistd::User::from_name(user)
                        .ok()
                        .flatten()
                        .map(|u| u.uid.as_raw())
                });
                let gid = group.map(|g| {
                    g.parse::<u32>().ok().or_else(|| {
                        nix::unistd::Group::from_name(g)
                            .ok()
                            .flatten()
                            .map(|g| g.gid.as_raw())
                    })
                });
                let same_uid = uid == Some(nix::unistd::geteuid().as_raw());
                let same_gid = gid.is_none_or(|g| g == Some(nix::unistd::getegid().as_raw()));
                if !(same_uid && same_gid) {
                    return Err(PastaError::Invalid(format!(
                        "--runas {v}: usernet does not change its user; run it as that user"
                    )));
                }
            }
            '\u{e000}' => self.no_tcp = true,
            '\u{e001}' => self.no_udp = true,
            '\u{e002}' => self.no_icmp = true,
            '\u{e003}' => self.no_dhcp = true,
            '\u{e004}' => self.no_dhcpv6 = true,
            '\u{e005}' => self.no_ndp = true,
            '\u{e006}' => self.no_ra = true,
            '\u{e007}' => self.no_splice = true,
            '\u{e008}' => self.dhcp_dns = true,
            '\u{e009}' => self.no_netns_quit = true,
            '\u{e00a}' => self.no_copy_routes = true,
            '\u{e00b}' => self.no_copy_addrs = true,
            // usernet never chroots in pasta mode: nothing can fail to fall back from.
            '\u{e00c}' | '\u{e10c}' => {}
            'S' if v == "none" => self.search.clear(),
            'S' => {
                for d in v.split_whitespace() {
                    if d.len() > 253 || d.bytes().any(|b| b.is_ascii_control()) {
                        return Err(bad("search domain"));
                    }
                    self.search.push(d.to_owned());
                }
            }
            '\u{c}' => self.ns_mac = Some(crate::conf::parse_mac(&v).map_err(PastaError::Invalid)?),
            '\u{e200}'..='\u{e205}' => self.egress_option(code, name, &v)?,
            _ => return Err(PastaError::Unrecognized(format!("--{name}"))),
        }
        Ok(())
    }

    fn validate(&mut self) -> Result<(), PastaError> {
        if self.no_splice && self.host_lo_to_ns_lo {
            return Err(PastaError::Pasta(
                "--host-lo-to-ns-lo is incompatible with --no-splice".into(),
            ));
        }
        if self.dhcp_dns && self.dns_forward4.is_none() && self.dns_forward6.is_none() {
            return Err(PastaError::Invalid(
                "--dhcp-dns: usernet announces its --dns-forward address only: give --dns-forward too".into(),
            ));
        }
        if !self.config_net {
            for (set, opt) in [
                (self.no_copy_routes, "--no-copy-routes"),
                (self.no_copy_addrs, "--no-copy-addrs"),
            ] {
                if set {
                    return Err(PastaError::Pasta(format!("{opt} needs --config-net")));
                }
            }
        }
        // A protocol turned off forwards no port of its own (pasta refuses the rules).
        for (off, proto, specs) in [
            (
                self.no_tcp,
                "TCP",
                [(&mut self.tcp, "-t"), (&mut self.tcp_ns, "-T")],
            ),
            (
                self.no_udp,
                "UDP",
                [(&mut self.udp, "-u"), (&mut self.udp_ns, "-U")],
            ),
        ] {
            if !off {
                continue;
            }
            for (spec, opt) in specs {
                if !spec.ranges.is_empty() || !spec.all_but.is_empty() {
                    return Err(PastaError::Invalid(format!(
                        "{opt}: cannot forward {proto} ports with {proto} disabled (--no-{})",
                        proto.to_ascii_lowercase()
                    )));
                }
                *spec = PortSpec {
                    given: true,
                    none: true,
                    ..PortSpec::default()
                };
            }
        }
        if self.v4_only && self.v6_only {
            return Err(PastaError::Invalid(
                "options ipv4-only and ipv6-only are mutually exclusive".into(),
            ));
        }
        if self.pid.is_some() && self.netns.is_some() {
            return Err(PastaError::Invalid(
                "both --netns and PID given: name one target".into(),
            ));
        }
        if self.userns.is_some() && self.netns.is_none() && self.pid.is_none() {
            return Err(PastaError::Invalid("--userns requires --netns".into()));
        }
        if !self.command.is_empty() && (self.netns.is_some() || self.pid.is_some()) {
            return Err(PastaError::Invalid(
                "a command cannot be given with a target namespace".into(),
            ));
        }
        // `deny-private` comes after every explicit rule, and counts toward the limit.
        self.egress_policy = crate::egress::finish_spec(
            std::mem::take(&mut self.egress),
            self.egress_deny_private,
            self.egress_default_deny,
        )
        .map_err(|e| PastaError::Invalid(format!("--egress-deny-private: {e}")))?;
        Ok(())
    }

    /// An `--egress-*` option.
    fn egress_option(&mut self, code: char, name: &str, v: &str) -> Result<(), PastaError> {
        use forwarder::egress::RuleKind;
        let bad = |e: String| PastaError::Invalid(format!("--{name}: {e}"));
        let verb = match code {
            '\u{e200}' => "allow",
            '\u{e201}' => "deny",
            '\u{e203}' => "allow-domain",
            '\u{e202}' => {
                self.egress_deny_private = true;
                return Ok(());
            }
            '\u{e204}' => {
                self.egress_default_deny = true;
                return Ok(());
            }
            _ => {
                let file = crate::egress::read_policy_file(v).map_err(bad)?;
                return self.egress.append_file(&file).map_err(bad);
            }
        };
        let rule = RuleKind::parse(&format!("{verb} {v}")).map_err(bad)?;
        self.egress.push(rule).map_err(bad)?;
        Ok(())
    }

    /// The log filter these options ask for.
    pub fn log_level(&self) -> &'static str {
        if self.trace {
            "trace"
        } else if self.debug {
            "debug"
        } else if self.quiet {
            "error"
        } else {
            "warn"
        }
    }
}

/// What `--config-net` copies from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTemplate {
    /// The interface holding the default route (or `-i`), if any.
    pub ifname: Option<String>,
    /// Its first IPv4 address and prefix length.
    pub addr4: Option<(Ipv4Addr, u8)>,
    /// The IPv4 default gateway.
    pub gw4: Option<Ipv4Addr>,
    /// Its first global IPv6 address and prefix length.
    pub addr6: Option<(Ipv6Addr, u8)>,
    /// The IPv6 default gateway.
    pub gw6: Option<Ipv6Addr>,
    /// The interface's other routes, both families: via a gateway, and on-link ones
    /// (gateway unspecified), which pasta copies too.
    pub routes: Vec<Route>,
}

/// The routes of `ifname` in `/proc/net/route` text, the default one left out: via a
/// gateway, and on-link ones (gateway `0.0.0.0`, as the kernel shows them).
pub fn routes4(text: &str, ifname: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (name, dst, gw, flags, mask) =
                (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let mask = u32::from_str_radix(mask, 16).ok()?.swap_bytes();
            let dst = u32::from_str_radix(dst, 16).ok()?.swap_bytes();
            let gateway = u32::from_str_radix(gw, 16).ok()?.swap_bytes();
            // RTF_UP, with RTF_GATEWAY or (on-link) without a gateway.
            let kind_ok = flags & 0x3 == 0x3 || (flags & 0x3 == 0x1 && gateway == 0);
            if *name != ifname || !kind_ok || mask == 0 {
                return None;
            }
            Some(Route::V4 {
                dst: Ipv4Addr::from(dst),
                prefix_len: mask.leading_ones() as u8,
                gateway: Ipv4Addr::from(gateway),
            })
        })
        .collect()
}

/// The routes of `ifname` in `/proc/net/ipv6_route` text, the default one left out: via a
/// gateway, and on-link prefixes (gateway `::`) but for the kernel's own (link-local,
/// multicast, local addresses).
pub fn routes6(text: &str, ifname: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dst, len, gw, flags, name) =
                (f.first()?, f.get(1)?, f.get(4)?, f.get(8)?, f.get(9)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let prefix_len = u8::from_str_radix(len, 16).ok()?;
            let dst = Ipv6Addr::from(u128::from_str_radix(dst, 16).ok()?);
            let gateway = Ipv6Addr::from(u128::from_str_radix(gw, 16).ok()?);
            // RTF_UP | RTF_GATEWAY; or on-link: RTF_UP alone (RTF_LOCAL 0x80000000 not),
            // a unicast, non-link-local prefix.
            let kernels = dst.is_multicast() || dst.segments()[0] & 0xffc0 == 0xfe80;
            let on_link = flags & 0x8000_0003 == 0x1 && gateway.is_unspecified() && !kernels;
            if *name != ifname || !(flags & 0x3 == 0x3 || on_link) || prefix_len == 0 {
                return None;
            }
            Some(Route::V6 {
                dst,
                prefix_len,
                gateway,
            })
        })
        .collect()
}

/// The first global IPv6 address of `ifname` that is not deprecated, tentative or
/// link-local, with its prefix length, from `/proc/net/if_inet6` text.
pub fn first_addr6(text: &str, ifname: &str) -> Option<(Ipv6Addr, u8)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (addr, prefix, flags, name) = (f.first()?, f.get(2)?, f.get(4)?, f.get(5)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        // IFA_F_TENTATIVE 0x40, IFA_F_DEPRECATED 0x20, IFA_F_DADFAILED 0x08.
        if *name != ifname || flags & 0x68 != 0 {
            return None;
        }
        let ip = Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?);
        let prefix = u8::from_str_radix(prefix, 16).ok()?;
        (ip.segments()[0] & 0xffc0 != 0xfe80 && !ip.is_loopback()).then_some((ip, prefix))
    })
}

/// The interface and gateway of the IPv4 default route in `/proc/net/route` text.
pub fn default_route4(text: &str) -> Option<(String, Ipv4Addr)> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (ifname, dst, gw, flags, mask) =
            (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        // RTF_UP | RTF_GATEWAY, destination and mask 0.
        if *dst != "00000000" || *mask != "00000000" || flags & 0x3 != 0x3 {
            return None;
        }
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some(((*ifname).to_owned(), Ipv4Addr::from(gw.swap_bytes())))
    })
}

/// The interface and gateway of the IPv6 default route in `/proc/net/ipv6_route` text.
pub fn default_route6(text: &str) -> Option<(String, Ipv6Addr)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dst, len, gw, flags, ifname) =
            (f.first()?, f.get(1)?, f.get(4)?, f.get(8)?, f.get(9)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if dst.bytes().any(|b| b != b'0') || *len != "00" || flags & 0x3 != 0x3 || *ifname == "lo" {
            return None;
        }
        let gw = u128::from_str_radix(gw, 16).ok()?;
        Some(((*ifname).to_owned(), Ipv6Addr::from(gw)))
    })
}

impl HostTemplate {
    /// Reads the host's default routes and the addresses of their interface (`ifname`
    /// overrides the interface, as `-i`).
    pub fn read(ifname: Option<&str>) -> HostTemplate {
        let r4 = std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|t| default_route4(&t));
        let r6 = std::fs::read_to_string("/proc/net/ipv6_route")
            .ok()
            .and_then(|t| default_route6(&t));
        let name = ifname
            .map(str::to_owned)
            .or_else(|| r4.as_ref().map(|r| r.0.clone()))
            .or_else(|| r6.as_ref().map(|r| r.0.clone()));
        let mut t = HostTemplate {
            ifname: name.clone(),
            addr4: None,
            gw4: r4.filter(|r| Some(&r.0) == name.as_ref()).map(|r| r.1),
            addr6: None,
            gw6: r6.filter(|r| Some(&r.0) == name.as_ref()).map(|r| r.1),
            routes: Vec::new(),
        };
        let Some(name) = name else {
            return t;
        };
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return t;
        };
        for ifa in addrs.filter(|ifa| ifa.interface_name == name) {
            let (Some(addr), Some(mask)) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else {
                continue;
            };
            if let (None, Some(a), Some(m)) =
                (t.addr4, addr.as_sockaddr_in(), mask.as_sockaddr_in())
            {
                let ip = a.ip();
                if !ip.is_link_local() {
                    t.addr4 = Some((ip, u32::from(m.ip()).leading_ones() as u8));
                }
            }
        }
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        t.routes = routes4(&read("/proc/net/route"), &name);
        t.routes
            .extend(routes6(&read("/proc/net/ipv6_route"), &name));
        // IPv6 from /proc/net/if_inet6, which tells deprecated addresses apart.
        t.addr6 = std::fs::read_to_string("/proc/net/if_inet6")
            .ok()
            .and_then(|text| first_addr6(&text, &name));
        t
    }
}

/// pasta's version text for `--version` (RootlessKit and podman only look at the exit
/// status and show the first line).
pub fn version_text() -> String {
    format!(
        "pasta (usernet {}): a pasta-compatible front end of usernet\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The `-h/--help` text.
pub const USAGE: &str = "Usage: pasta [OPTION]... [COMMAND] [ARGS]...
       pasta [OPTION]... PID
       pasta [OPTION]... --netns [PATH|NAME]

usernet taking pasta's command line. Options:
  -d, --debug              debug messages          --trace            trace messages
  -q, --quiet              errors only             -f, --foreground   do not detach
  -e, --stderr             (accepted, no effect)   -l, --log-file F   log to F
  -p, --pcap FILE          write frames to FILE    -P, --pid FILE     write the PID to FILE
  -m, --mtu MTU            (default 65520)         -a, --address A    -n, --netmask M
  -g, --gateway G          -i, --interface IF      -o, --outbound A   -D, --dns ADDR|none
  -4, --ipv4-only          -6, --ipv6-only         -I, --ns-ifname N  --ns-mac-addr MAC
  -t, --tcp-ports SPEC     -u, --udp-ports SPEC    -T, --tcp-ns SPEC  -U, --udp-ns SPEC
      SPEC: none | auto | [[ADDR][%IF]/]FIRST[-LAST][:TO[-TOLAST]] | ~FIRST[-LAST], comma
      lists; -t/-u only: %IF, and exclusions alone (every other non-ephemeral port)
  --netns PATH|NAME        --userns PATH           --config-net
  --dns-forward ADDR       --dns-host ADDR         --no-map-gw
  --map-host-loopback ADDR|none                    --map-guest-addr ADDR|none
  --host-lo-to-ns-lo       --runas UID[:GID] (the current user only)
  --no-tcp  --no-udp  --no-icmp  --no-dhcp  --no-dhcpv6  --no-ndp  --no-ra
                           turn that protocol handler or service off
  --dhcp-dns               DHCP/RA name the --dns-forward address
  --no-splice              loopback clients of -t/-u cross the link
  --no-netns-quit          keep running when the target goes away
  --no-copy-routes  --no-copy-addrs  (with --config-net)
  -S, --search LIST|none   --chroot-fallback       (accepted)
  --version                -h, --help
usernet's egress policy (rules in order, first match wins; see usernet's README):
  --egress-allow CIDR[,PROTO[:PORTS]]   --egress-deny CIDR[,PROTO[:PORTS]]
  --egress-deny-private    --egress-allow-domain NAME   --egress-default-deny
  --egress-policy FILE
Every other pasta option is refused with the reason.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<PastaOpts, PastaError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        PastaOpts::parse(&args)
    }

    #[test]
    fn podman_53_default_line() {
        let o = parse(&[
            "--config-net",
            "--dns-forward",
            "169.254.1.1",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            "/run/user/1000/netns/x",
            "--map-guest-addr",
            "169.254.1.2",
        ])
        .unwrap();
        assert!(o.config_net && o.no_map_gw && o.quiet && o.tcp.none && o.udp_ns.none);
        assert_eq!(o.dns_forward4, Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(o.map_guest4, Some(Ipv4Addr::new(169, 254, 1, 2)));
        assert_eq!(o.netns, Some(PathBuf::from("/run/user/1000/netns/x")));
    }

    #[test]
    fn rootlesskit_equals_forms_and_pid() {
        let o = parse(&[
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--tcp-ports=none",
            "--udp-ports=none",
            "--host-lo-to-ns-lo",
            "4242",
        ])
        .unwrap();
        assert_eq!(o.pid, Some(4242));
        assert_eq!(o.ns_ifname.as_deref(), Some("tap0"));
        assert_eq!((o.mtu, o.prefix4), (Some(65520), Some(24)));
        assert_eq!(o.gw4, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert!(o.host_lo_to_ns_lo);
    }

    #[test]
    fn getopt_forms_prefixes_and_errors() {
        let o = parse(&["-t8080", "-tnone", "--config", "-dq"]);
        assert!(o.is_err(), "none after a port must be refused");
        let o = parse(&["-t8080", "--config", "-dqm", "1500", "--netns=x"]).unwrap();
        assert!(o.config_net && o.debug && o.quiet);
        assert_eq!(o.mtu, Some(1500));
        assert_eq!(o.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(
            parse(&["--map-guest-addr", "1.2.3.4", "--bogus"])
                .unwrap_err()
                .to_string(),
            "unrecognized option '--bogus'"
        );
        assert_eq!(
            parse(&["-Z"]).unwrap_err().to_string(),
            "invalid option -- 'Z'"
        );
        assert_eq!(
            parse(&["--netns"]).unwrap_err().to_string(),
            "option '--netns' requires an argument"
        );
        assert_eq!(
            parse(&["--quiet=1"]).unwrap_err().to_string(),
            "option '--quiet' doesn't allow an argument"
        );
        assert!(matches!(parse(&["--map"]), Err(PastaError::Ambiguous(_))));
        // --config-net and --conf-path, as in pasta.
        assert!(matches!(parse(&["--conf"]), Err(PastaError::Ambiguous(_))));
        // --socket and --socket-path are both -s: not ambiguous (then refused as pasta).
        assert_eq!(
            parse(&["--sock", "x"]).unwrap_err().to_string(),
            "-s is for passt / vhost-user mode only"
        );
        assert_eq!(
            parse(&["--=x"]).unwrap_err(),
            PastaError::Unrecognized("--".into())
        );
    }

    /// Every long option of pasta's (passt's conf.c, 2026-07) and every short one.
    const PASTA_LONG: &[&str] = &[
        "debug",
        "quiet",
        "foreground",
        "stderr",
        "log-file",
        "help",
        "socket",
        "fd",
        "ns-ifname",
        "pcap",
        "pid",
        "mtu",
        "address",
        "netmask",
        "mac-addr",
        "gateway",
        "interface",
        "outbound",
        "dns",
        "search",
        "hostname",
        "no-tcp",
        "no-udp",
        "no-icmp",
        "no-dhcp",
        "no-dhcpv6",
        "no-ndp",
        "no-ra",
        "no-splice",
        "splice-only",
        "freebind",
        "no-map-gw",
        "ipv4-only",
        "ipv6-only",
        "one-off",
        "tcp-ports",
        "udp-ports",
        "tcp-ns",
        "udp-ns",
        "userns",
        "netns",
        "ns-mac-addr",
        "dhcp-dns",
        "no-dhcp-dns",
        "dhcp-search",
        "no-dhcp-search",
        "dns-forward",
        "no-netns-quit",
        "trace",
        "runas",
        "log-size",
        "version",
        "outbound-if4",
        "outbound-if6",
        "config-net",
        "no-copy-routes",
        "no-copy-addrs",
        "netns-only",
        "map-host-loopback",
        "map-guest-addr",
        "host-lo-to-ns-lo",
        "dns-host",
        "vhost-user",
        "print-capabilities",
        "socket-path",
        "fqdn",
        "repair-path",
        "migrate-exit",
        "migrate-no-linger",
        "stats",
        "conf-path",
        "chroot-fallback",
    ];

    #[test]
    fn egress_options_keep_their_order() {
        let o = parse(&[
            "--config-net",
            "--egress-deny-private",
            "--egress-allow",
            "192.168.1.10,tcp:22",
            "--egress-allow-domain=*.example.com",
            "--egress-deny",
            "any,udp:53",
            "--egress-default-deny",
            "1",
        ])
        .unwrap();
        let spec = o.egress_policy.unwrap();
        let shown: Vec<String> = spec.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "allow 192.168.1.10 tcp:22",
                "allow-domain *.example.com",
                "deny any udp:53",
                "deny-private",
            ]
        );
        assert_eq!(spec.default, forwarder::egress::Action::Deny);
        assert!(parse(&["1"]).unwrap().egress_policy.is_none());
        let e = parse(&["--egress-deny", "10.0.0.1/8", "1"]).unwrap_err();
        assert!(e.to_string().starts_with("--egress-deny: "), "{e}");
        assert!(parse(&["--egress-policy", "/nonexistent", "1"]).is_err());
    }

    #[test]
    fn egress_deny_private_counts_toward_the_limit() {
        use forwarder::egress::{RuleKind, MAX_RULES};
        let dir = std::env::temp_dir().join(format!("usernet-pasta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, rules: usize| {
            let path = dir.join(name);
            std::fs::write(&path, "deny 198.51.100.1\n".repeat(rules)).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let (full, short) = (file("full", MAX_RULES), file("short", MAX_RULES - 1));
        let too_many = format!("more than {MAX_RULES} rules");
        for (opt, value) in [
            ("--egress-deny", Some("192.0.2.1")),
            ("--egress-deny-private", None),
        ] {
            let args: Vec<&str> = ["--egress-policy", &full, opt]
                .into_iter()
                .chain(value)
                .chain(["1"])
                .collect();
            let e = parse(&args).unwrap_err();
            assert_eq!(e, PastaError::Invalid(format!("{opt}: {too_many}")));
        }
        let o = parse(&["--egress-deny-private", "--egress-policy", &short, "1"]).unwrap();
        let rules = o.egress_policy.unwrap().rules;
        assert_eq!(rules.len(), MAX_RULES);
        assert_eq!(rules.last(), Some(&RuleKind::DenyPrivate));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_pasta_option_is_known() {
        for name in PASTA_LONG {
            let (full, _, _) = find_long(name).unwrap_or_else(|e| panic!("--{name}: {e}"));
            assert_eq!(full, *name);
        }
        let ours = LONG
            .iter()
            .filter(|(n, _, _)| n.starts_with("egress-"))
            .count();
        assert_eq!(
            LONG.len() - ours,
            PASTA_LONG.len(),
            "an option pasta does not have"
        );
        // usernet's own options cannot collide with pasta's, nor change what an
        // abbreviation of one of pasta's means.
        assert!(PASTA_LONG.iter().all(|n| !n.starts_with('e')));
        // passt's getopt string: "+dqfel:hs:c:F:I:p:P:m:a:n:M:g:i:o:D:S:H:461t:u:T:U:".
        for c in "dqfehs:c:F:I:p:P:m:a:n:M:g:i:o:D:S:H:461t:u:T:U:l:".chars() {
            if c != ':' {
                assert!(SHORT.iter().any(|(s, _)| *s == c), "-{c}");
            }
        }
        assert_eq!(SHORT.len(), 29);
    }

    #[test]
    fn rootlesskit_20_line_turns_services_off() {
        // RootlessKit 2.0.x (Debian 13, rootless Docker with --net=pasta), verbatim.
        let o = parse(&[
            "--foreground",
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=1500",
            "--no-dhcp",
            "--no-ra",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--no-map-gw",
            "--ipv4-only",
            "--tcp-ports=auto",
            "--udp-ports=auto",
            "4242",
        ])
        .unwrap();
        assert!(o.foreground && o.no_dhcp && o.no_ra && o.no_map_gw && o.v4_only);
        assert!(!o.config_net && !o.no_tcp && !o.no_ndp && !o.dhcp_dns);
        assert!(o.tcp.auto && o.udp.auto);
        assert_eq!(o.pid, Some(4242));
    }

    #[test]
    fn service_options() {
        let o = parse(&[
            "--no-tcp",
            "--no-udp",
            "--no-icmp",
            "--no-dhcp",
            "--no-dhcpv6",
            "--no-ndp",
            "--no-ra",
            "--no-splice",
            "--no-netns-quit",
            "--chroot-fallback",
            "--repair-path=none",
            "-S",
            "a.example b.example",
            "--netns",
            "x",
        ])
        .unwrap();
        assert!(o.no_tcp && o.no_udp && o.no_icmp && o.no_dhcp && o.no_dhcpv6);
        assert!(o.no_ndp && o.no_ra && o.no_splice && o.no_netns_quit);
        assert_eq!(o.search, ["a.example", "b.example"]);
        // Nothing of a protocol turned off is forwarded, auto included.
        for s in [&o.tcp, &o.udp, &o.tcp_ns, &o.udp_ns] {
            assert!(s.given && s.none && !s.auto && s.ranges.is_empty());
        }
        assert!(parse(&["-S", "x", "-S", "none", "1"])
            .unwrap()
            .search
            .is_empty());
        let o = parse(&["--config-net", "--no-copy-routes", "--no-copy-addrs", "1"]).unwrap();
        assert!(o.no_copy_routes && o.no_copy_addrs);
        let o = parse(&["--dhcp-dns", "--dns-forward", "10.0.2.3", "1"]).unwrap();
        assert!(o.dhcp_dns);
        // Explicit ports of a protocol turned off are refused; the other protocol's not.
        for args in [
            &["--no-tcp", "-t", "80", "1"][..],
            &["-T", "80", "--no-tcp", "1"],
            &["--no-udp", "-u", "~53", "1"],
            &["--no-udp", "-U", "53", "1"],
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains("disabled (--no-"), "{args:?}: {e}");
        }
        let o = parse(&["--no-tcp", "-u", "53", "1"]).unwrap();
        assert_eq!(o.udp.ranges.len(), 1);
    }

    #[test]
    fn refused_options_say_why() {
        let err = |args: &[&str]| parse(args).unwrap_err();
        // pasta's own texts where pasta refuses them too.
        for (args, text) in [
            (
                &["-s", "/tmp/s"][..],
                "-s is for passt / vhost-user mode only",
            ),
            (
                &["--socket-path=/tmp/s"],
                "-s is for passt / vhost-user mode only",
            ),
            (&["-1"], "--one-off is for passt mode only"),
            (&["--no-dhcp-dns"], "--no-dhcp-dns is for passt mode only"),
            (
                &["--no-dhcp-search"],
                "--no-dhcp-search is for passt mode only",
            ),
            (
                &["--repair-path", "/x"],
                "--repair-path is for vhost-user mode only",
            ),
            (
                &["--migrate-exit"],
                "--migrate-exit is for vhost-user mode only",
            ),
            (
                &["--migrate-no-linger"],
                "--migrate-no-linger is for vhost-user mode only",
            ),
            (
                &["--no-copy-routes", "1"],
                "--no-copy-routes needs --config-net",
            ),
            (
                &["--no-copy-addrs", "1"],
                "--no-copy-addrs needs --config-net",
            ),
            (
                &["--no-splice", "--host-lo-to-ns-lo", "1"],
                "--host-lo-to-ns-lo is incompatible with --no-splice",
            ),
        ] {
            assert_eq!(err(args), PastaError::Pasta(text.into()), "{args:?}");
        }
        // What usernet does not do: a sentence naming the option, never "unrecognized".
        for (args, name) in [
            (&["-F", "3"][..], "--fd"),
            (&["-c", "/tmp/c"], "--conf-path"),
            (&["-M", "02:00:00:00:00:01"], "--mac-addr"),
            (&["-H", "box"], "--hostname"),
            (&["--fqdn", "box.example"], "--fqdn"),
            (&["--splice-only"], "--splice-only"),
            (&["--freebind"], "--freebind"),
            (&["--dhcp-search"], "--dhcp-search"),
            (&["--log-size", "1000000"], "--log-size"),
            (&["--outbound-if4", "eth0"], "--outbound-if4"),
            (&["--outbound-if6=eth0"], "--outbound-if6"),
            (&["--netns-only"], "--netns-only"),
            (&["--vhost-user"], "--vhost-user"),
            (&["--print-capabilities"], "--print-capabilities"),
            (&["-f", "--stats", "1"], "--stats"),
        ] {
            let e = err(args);
            assert!(matches!(e, PastaError::Invalid(_)), "{args:?}: {e:?}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{name}: not supported by usernet (")),
                "{e}"
            );
        }
        assert!(err(&["--dhcp-dns", "1"])
            .to_string()
            .contains("--dns-forward"));
        assert!(err(&["-S", "bad\u{7}name"])
            .to_string()
            .contains("search domain"));
    }

    #[test]
    fn command_after_options_or_double_dash() {
        let o = parse(&["--config-net", "--", "sh", "-c", "exit 3"]).unwrap();
        assert_eq!(o.command, ["sh", "-c", "exit 3"]);
        let o = parse(&["-q", "sh", "-c", "x"]).unwrap();
        assert_eq!(o.command, ["sh", "-c", "x"]);
        assert!(parse(&["--netns", "x", "--", "sh"]).is_err());
    }

    fn rules(p: &[Rule]) -> Vec<(String, u16, u16, u16)> {
        p.iter()
            .map(|r| {
                let p = &r.publish;
                (
                    p.host_ip.map(|a| a.to_string()).unwrap_or_default(),
                    p.host_port,
                    p.guest_port,
                    p.count,
                )
            })
            .collect()
    }

    #[test]
    fn port_grammar() {
        let mut s = PortSpec::default();
        s.add("-t", "8080-8082:80-82").unwrap();
        s.add("-t", "127.0.0.1/5353:53").unwrap();
        s.add("-t", "::1/9000").unwrap();
        s.add("-t", "100-110,~103-104,~110").unwrap();
        let p = s.publish(Proto::Tcp, false, false, EPHEMERAL_FALLBACK);
        assert!(p
            .iter()
            .all(|p| p.publish.device.is_none() && !p.best_effort));
        assert_eq!(
            rules(&p),
            [
                ("0.0.0.0".into(), 8080, 80, 3),
                ("::".into(), 8080, 80, 3),
                ("127.0.0.1".into(), 5353, 53, 1),
                ("::1".into(), 9000, 9000, 1),
                ("0.0.0.0".into(), 100, 100, 3),
                ("::".into(), 100, 100, 3),
                ("0.0.0.0".into(), 105, 105, 5),
                ("::".into(), 105, 105, 5),
            ]
        );
        for bad in [
            "0",
            "80-79",
            "80:90-91",
            "x/80",
            "eth0%1.2.3.4/80",
            "%/80",
            "%averyveryverylongname/80",
            "1.2.3.4%/80",
            "/80",
            "~0",
            "~90-80",
        ] {
            assert!(PortSpec::default().add("-t", bad).is_err(), "{bad}");
        }
        let mut s = PortSpec::default();
        s.add("-t", "auto").unwrap();
        assert!(s.add("-t", "none").is_err());
    }

    #[test]
    fn exclusions_cut_their_own_option_only() {
        // pasta: each option's `~` applies to that option's ranges.
        let mut s = PortSpec::default();
        s.add("-t", "100-110").unwrap();
        s.add("-t", "200-202:300,~201").unwrap();
        let p = s.publish(Proto::Tcp, true, false, EPHEMERAL_FALLBACK);
        assert_eq!(
            rules(&p),
            [
                ("0.0.0.0".into(), 100, 100, 11),
                ("0.0.0.0".into(), 200, 300, 1),
                ("0.0.0.0".into(), 202, 302, 1),
            ]
        );
        assert!(s.excludes(201) && !s.excludes(105));
    }

    #[test]
    fn interface_bound_ranges() {
        let mut s = PortSpec::default();
        s.add("-t", "198.51.100.1%vh/8080-8081:80").unwrap();
        s.add("-t", "%lo/9000").unwrap();
        s.add("-t", "[::1]%lo/7000").unwrap();
        let p = s.publish(Proto::Tcp, false, false, EPHEMERAL_FALLBACK);
        let got: Vec<_> = p
            .iter()
            .map(|p| {
                (
                    p.publish.host_ip.unwrap().to_string(),
                    p.publish.host_port,
                    p.publish.device.clone(),
                )
            })
            .collect();
        let dev = |d: &str| Some(d.to_owned());
        assert_eq!(
            got,
            [
                ("198.51.100.1".into(), 8080, dev("vh")),
                ("0.0.0.0".into(), 9000, dev("lo")),
                ("::".into(), 9000, dev("lo")),
                ("::1".into(), 7000, dev("lo")),
            ]
        );
        assert_eq!(s.interfaces().collect::<Vec<_>>(), ["vh", "lo", "lo"]);
        // -T/-U bind in the namespace: no host interface there.
        let e = PortSpec::default().add("-T", "%lo/80").unwrap_err();
        assert!(e.to_string().contains("-t/-u only"), "{e}");
        // -u takes it as -t does.
        let mut u = PortSpec::default();
        u.add("-u", "%vh/53").unwrap();
        assert_eq!(u.ranges[0].ifname.as_deref(), Some("vh"));
    }

    #[test]
    fn exclusions_alone_are_every_other_port_but_ephemeral_ones() {
        let mut s = PortSpec::default();
        s.add("-t", "~20000-20010").unwrap();
        assert!(s.ranges.is_empty());
        let p = s.publish(Proto::Tcp, false, false, (32768, 60999));
        assert_eq!(
            rules(&p),
            [
                ("0.0.0.0".into(), 1, 1, 19999),
                ("0.0.0.0".into(), 20011, 20011, 32768 - 20011),
                ("0.0.0.0".into(), 61000, 61000, 65535 - 61000 + 1),
                ("::".into(), 1, 1, 19999),
                ("::".into(), 20011, 20011, 32768 - 20011),
                ("::".into(), 61000, 61000, 65535 - 61000 + 1),
            ]
        );
        assert!(p[0].best_effort);
        let be = p[0].option.clone();
        assert_eq!((be.opt.as_str(), be.value.as_str()), ("-t", "~20000-20010"));
        // With an address and interface, several exclusions, UDP; the ephemeral range
        // at the top.
        let mut u = PortSpec::default();
        u.add("-u", "127.0.0.1%lo/~1-1000,~2000-65000").unwrap();
        let p = u.publish(Proto::Udp, false, false, EPHEMERAL_FALLBACK);
        // 65001-65535 is ephemeral.
        assert_eq!(rules(&p), [("127.0.0.1".into(), 1001, 1001, 999)]);
        assert_eq!(p[0].publish.device.as_deref(), Some("lo"));
        assert_eq!(p[0].option.opt, "-u");
        // Not for -T/-U; not with auto or none (pasta's texts).
        assert!(PortSpec::default().add("-T", "~80").is_err());
        let mut a = PortSpec::default();
        a.add("-t", "auto").unwrap();
        assert_eq!(
            a.add("-t", "~80").unwrap_err(),
            PastaError::Pasta(
                "Specific ports cannot be specified together with all/none/auto".into()
            )
        );
        let mut x = PortSpec::default();
        x.add("-t", "~80").unwrap();
        assert_eq!(
            x.add("-t", "auto").unwrap_err(),
            PastaError::Pasta("Port forwarding mode 'auto' conflicts with previous mode".into())
        );
        assert!(x.add("-t", "none").is_err());
    }

    #[test]
    fn all_is_refused_with_pastas_text() {
        for opt in ["-t", "-u", "-T", "-U"] {
            assert_eq!(
                PortSpec::default().add(opt, "all").unwrap_err().to_string(),
                "'all' port forwarding is only allowed for passt"
            );
        }
        let mut s = PortSpec::default();
        s.add("-t", "80").unwrap();
        assert_eq!(
            s.add("-t", "all").unwrap_err().to_string(),
            "Port forwarding mode 'all' conflicts with previous mode"
        );
        let e = parse(&["-t", "all", "--netns", "x"]).unwrap_err();
        assert!(matches!(e, PastaError::Pasta(_)), "{e:?}");
    }

    #[test]
    fn ip_local_port_range_text() {
        assert_eq!(
            parse_port_range_sysctl("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_port_range_sysctl("1024 65000"), Some((1024, 65000)));
        for bad in ["", "1", "5 4", "1 2 3", "x y", "1 70000"] {
            assert_eq!(parse_port_range_sysctl(bad), None, "{bad}");
        }
    }

    #[test]
    fn proc_route_parsing() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  vh\t00716433\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  vh\t00000000\t02643364\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let v4r =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                   vh\t007100CB\t02643364\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                   vh\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                   vp\t00000A0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            routes4(v4r, "vh"),
            [
                Route::V4 {
                    dst: Ipv4Addr::new(203, 0, 113, 0),
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(100, 51, 100, 2)
                },
                Route::V4 {
                    dst: Ipv4Addr::new(198, 51, 100, 0),
                    prefix_len: 24,
                    gateway: Ipv4Addr::UNSPECIFIED
                }
            ]
        );
        // On-link IPv6 prefixes, but not the kernel's link-local, multicast and local ones.
        let v6r = "20010db8000900000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001       vh\n\
                   fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001       vh\n\
                   20010db8000100000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       vh\n\
                   ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001       vh\n";
        assert_eq!(
            routes6(v6r, "vh"),
            [Route::V6 {
                dst: "2001:db8:9::".parse().unwrap(),
                prefix_len: 64,
                gateway: Ipv6Addr::UNSPECIFIED
            }]
        );
        assert_eq!(
            default_route4(v4),
            Some(("vh".into(), Ipv4Addr::new(100, 51, 100, 2)))
        );
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 vh\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        let if6 = "20010db8000100000000000000000003 03 40 00 a0       vh\n\
                   20010db8000100000000000000000001 03 40 00 80       vh\n";
        assert_eq!(
            first_addr6(if6, "vh"),
            Some(("2001:db8:1::1".parse().unwrap(), 64))
        );
        assert_eq!(
            default_route6(v6),
            Some(("vh".into(), "fe80::1".parse().unwrap()))
        );
    }
}
