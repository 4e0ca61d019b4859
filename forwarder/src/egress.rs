//! Egress policy: which destinations a guest's new flows may reach, by address and by name.
//!
//! # Theory of operation
//!
//! A [`Policy`] is an ordered list of rules and a default. Each new flow (a TCP SYN, the
//! first datagram of a UDP flow, the first echo request of an ICMP flow; never a later
//! packet) is checked once, in [`crate::flow`]'s translate-and-deny path, before any host
//! socket exists: a denied flow leaves nothing on the host side, not even a SYN. A
//! denied SYN the guest sends again (same flow, same initial sequence number) is the
//! same attempt: decided again, but not counted or logged again.
//!
//! Rules, evaluated in this order, the first that matches deciding:
//!
//! 1. the address rules (`allow`/`deny` CIDR, optionally narrowed to `tcp`, `udp` or
//!    `icmp` and, for TCP and UDP, a port range), in the order given;
//! 2. `deny-private`, wherever it was written: RFC 1918, CGNAT `100.64.0.0/10`,
//!    link-local `169.254.0.0/16` and `fe80::/10` (cloud metadata services), ULA
//!    `fc00::/7`, multicast, loopback (the gateway's host-loopback mapping), `0.0.0.0/8`,
//!    the limited broadcast and the host's own addresses. It comes after every explicit
//!    rule so that an `allow` naming one of these addresses opens it whatever the order;
//! 3. the names: an address the DNS forwarder saw in an answer for an `allow-domain`
//!    name, until that answer's TTL ends (clamped to [`Spec::ttl_min`]..[`Spec::ttl_max`]);
//! 4. the default (`allow`, or `deny` with `--default-deny`).
//!
//! A name therefore never opens an address an address rule closes: an allowed name that
//! resolves to `127.0.0.1`, `10.x` or `169.254.169.254` (DNS rebinding) stays denied by
//! `deny-private` or an explicit `deny`.
//!
//! **Which address is matched.** A flow has the destination the guest addressed and the
//! destination usernet connects to on the host; they differ only where usernet maps
//! (the gateway's address to the host's `127.0.0.1`/`::1`, pasta's `--map-guest-addr`).
//! Both are looked up and the rule that comes first for either decides, so
//! `deny 10.0.2.2` and `deny 127.0.0.1` both close the host's loopback, and `allow
//! 10.0.2.2` opens it again before `deny-private`.
//!
//! **The DNS forwarder** (the DNS address, port 53) is usernet's own service, not egress:
//! UDP queries to it are always taken. While names are filtered ([`Policy::filters_names`]:
//! any `allow-domain`, or the default is deny) a query whose question is not an allowed
//! name gets NXDOMAIN from usernet and never reaches a resolver (so no data leaves in
//! query names either), and TCP to the DNS forwarder is denied (it is not filtered).
//! NXDOMAIN rather than REFUSED: REFUSED makes stub resolvers try the next server and
//! report a temporary failure, which clients retry; NXDOMAIN is final ("Could not resolve
//! host") and negatively cached. DNS to any other resolver is an ordinary flow under the
//! rules.
//!
//! **The lookup** ([`Table`]): per family, one hash map per prefix length in use, from the
//! masked address to the positions of the rules with that prefix (ascending). A lookup
//! visits the prefix lengths in the order of the first rule each holds and stops as soon
//! as a length cannot hold an earlier rule than the best match so far: at most 33 (129)
//! hash probes, in practice as many as there are distinct lengths (a list of 1,000 `/32`
//! hosts is one probe). A longest-prefix trie would not do better here: first-match
//! order, not prefix length, decides, so every length must be looked at anyway.
//!
//! **The host's own addresses** are held once, by the forwarder's [`Egress`]
//! ([`crate::Forwarder::set_host_addrs`], before or after any policy), and given to each
//! check rather than put in the tables: `deny-private`'s entry comes after every address
//! rule, so they are looked at only when no address rule matched.
//!
//! Limits: [`MAX_LEARNED`] addresses learned from names (expired ones are dropped first,
//! in expiry order as answers come: a full table costs a new answer no scan of it;
//! beyond, new answers are not learned and their flows follow the default). Denied flows
//! are logged at `info` at most [`LOG_BURST`] per second, with a count of those left out.
//!
//! Security: the policy covers where new flows go. It does not inspect what flows to
//! allowed addresses carry (an allowed CDN address serves other names too), and does not
//! apply to published ports (inbound) nor to traffic between the members of a network.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::time::{Duration, Instant};

use crate::names;

/// Most addresses learned from DNS answers at once.
pub const MAX_LEARNED: usize = 65536;

/// Denied flows logged per second at most.
pub const LOG_BURST: u32 = 10;

/// Default lower bound of a learned address's lifetime, seconds: the time a client may
/// take between its lookup and its connection, and the caches of stub resolvers and
/// runtimes (glibc's nscd, the JVM's 30 s) that outlive short TTLs.
pub const TTL_MIN: u32 = 30;

/// Default upper bound of a learned address's lifetime, seconds.
pub const TTL_MAX: u32 = 3600;

/// Most rules in a policy.
pub const MAX_RULES: usize = 100_000;

/// The error of a policy over [`MAX_RULES`], whichever way it got there.
fn too_many_rules() -> String {
    format!("more than {MAX_RULES} rules")
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The flow is opened.
    Allow,
    /// The flow is refused: ICMP administratively prohibited.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// A flow's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6 echo.
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// An address block: IPv4, IPv6, or both families whole (`any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cidr {
    /// An IPv4 block (host bits clear).
    V4(Ipv4Addr, u8),
    /// An IPv6 block (host bits clear).
    V6(Ipv6Addr, u8),
    /// Every address of both families.
    Any,
}

impl Cidr {
    /// Parses `A.B.C.D[/N]`, `X::Y[/N]` or `any`; a bare address is a single host. Host
    /// bits must be clear (`10.0.0.1/8` is refused: it is probably a typing error).
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        if s == "any" {
            return Ok(Cidr::Any);
        }
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}`: not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: prefix length must be 0..={max}")),
            },
        };
        let bits = to_bits(addr);
        let masked = bits & mask(family_len(addr), len);
        if masked != bits {
            let meant = Cidr::from_bits(addr.is_ipv4(), masked, len);
            return Err(format!("`{s}`: host bits set (did you mean {meant}?)"));
        }
        Ok(Cidr::from_bits(addr.is_ipv4(), masked, len))
    }

    fn from_bits(v4: bool, bits: u128, len: u8) -> Cidr {
        if v4 {
            Cidr::V4(Ipv4Addr::from((bits >> 96) as u32), len)
        } else {
            Cidr::V6(Ipv6Addr::from(bits), len)
        }
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (Cidr::Any, _) => true,
            (Cidr::V4(net, len), IpAddr::V4(_)) => {
                to_bits(ip) & mask(32, len) == to_bits(IpAddr::V4(net))
            }
            (Cidr::V6(net, len), IpAddr::V6(_)) => {
                to_bits(ip) & mask(128, len) == to_bits(IpAddr::V6(net))
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidr::V4(a, 32) => write!(f, "{a}"),
            Cidr::V6(a, 128) => write!(f, "{a}"),
            Cidr::V4(a, l) => write!(f, "{a}/{l}"),
            Cidr::V6(a, l) => write!(f, "{a}/{l}"),
            Cidr::Any => f.write_str("any"),
        }
    }
}

/// An address as the top bits of a `u128` (IPv4 in the top 32 bits): one masking rule
/// for both families.
fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn family_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The mask of a `len`-bit prefix of an address of `family` bits, in [`to_bits`] form.
fn mask(family: u8, len: u8) -> u128 {
    let len = u32::from(len.min(family));
    u128::MAX.checked_shl(128 - len).unwrap_or(0)
}

/// One rule as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKind {
    /// `allow|deny CIDR [PROTO[:PORT[-PORT]]]`.
    Address {
        /// Allow or deny.
        action: Action,
        /// The destination block.
        net: Cidr,
        /// Only this protocol (any: `None`).
        proto: Option<Proto>,
        /// Only these destination ports, inclusive (TCP and UDP; all: `0..=65535`).
        ports: (u16, u16),
    },
    /// `deny-private`: see the module documentation.
    DenyPrivate,
    /// `allow-domain NAME` (lower case, no trailing dot); `*.NAME`: its subdomains.
    Domain(String),
}

impl RuleKind {
    /// Parses one rule: `allow CIDR [PROTO[:PORTS]]`, `deny CIDR [PROTO[:PORTS]]`,
    /// `deny-private` or `allow-domain NAME`. Words are separated by blanks or commas.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(line: &str) -> Result<RuleKind, String> {
        let mut words = line
            .split(|c: char| c.is_ascii_whitespace() || c == ',')
            .filter(|w| !w.is_empty());
        let verb = words.next().ok_or("empty rule")?;
        let rest: Vec<&str> = words.collect();
        match verb {
            "allow" | "deny" => {
                let action = if verb == "allow" {
                    Action::Allow
                } else {
                    Action::Deny
                };
                let (net, narrow) = match rest[..] {
                    [net] => (net, None),
                    [net, narrow] => (net, Some(narrow)),
                    _ => return Err(format!("`{line}`: expected `{verb} CIDR [PROTO[:PORTS]]`")),
                };
                let net = Cidr::parse(net)?;
                let (proto, ports) = match narrow {
                    None => (None, (0, u16::MAX)),
                    Some(n) => parse_narrow(n)?,
                };
                Ok(RuleKind::Address {
                    action,
                    net,
                    proto,
                    ports,
                })
            }
            "deny-private" if rest.is_empty() => Ok(RuleKind::DenyPrivate),
            "allow-domain" => match rest[..] {
                [name] => parse_domain(name).map(RuleKind::Domain),
                _ => Err(format!("`{line}`: expected `allow-domain NAME`")),
            },
            _ => Err(format!(
                "`{line}`: a rule is `allow CIDR [PROTO[:PORTS]]`, `deny CIDR [PROTO[:PORTS]]`, \
                 `deny-private` or `allow-domain NAME`"
            )),
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleKind::Address {
                action,
                net,
                proto,
                ports,
            } => {
                write!(f, "{action} {net}")?;
                if let Some(p) = proto {
                    write!(f, " {p}")?;
                }
                match *ports {
                    (0, u16::MAX) => Ok(()),
                    (a, b) if a == b => write!(f, ":{a}"),
                    (a, b) => write!(f, ":{a}-{b}"),
                }
            }
            RuleKind::DenyPrivate => f.write_str("deny-private"),
            RuleKind::Domain(name) => write!(f, "allow-domain {name}"),
        }
    }
}

/// `tcp`, `udp:53`, `tcp:8000-8100`, `icmp`.
fn parse_narrow(s: &str) -> Result<(Option<Proto>, (u16, u16)), String> {
    let (proto, ports) = match s.split_once(':') {
        Some((p, ports)) => (p, Some(ports)),
        None => (s, None),
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        _ => return Err(format!("`{s}`: protocol must be tcp, udp or icmp")),
    };
    let Some(ports) = ports else {
        return Ok((Some(proto), (0, u16::MAX)));
    };
    if proto == Proto::Icmp {
        return Err(format!("`{s}`: icmp has no ports"));
    }
    let range = match ports.split_once('-') {
        Some((a, b)) => a.parse::<u16>().ok().zip(b.parse::<u16>().ok()),
        None => ports.parse::<u16>().ok().map(|p| (p, p)),
    };
    match range {
        Some((a, b)) if a <= b && a > 0 => Ok((Some(proto), (a, b))),
        _ => Err(format!("`{s}`: ports must be N or N-M, 1..=65535, N <= M")),
    }
}

/// A domain name as `allow-domain` takes it: letters, digits, `-`, `_`, dots, an
/// optional leading `*.`; lower-cased, without trailing dot.
fn parse_domain(s: &str) -> Result<String, String> {
    let name = s.trim_end_matches('.').to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "`{s}`: not a domain name (NAME or *.NAME for its subdomains)"
        ))
    }
}

/// A policy as written: its rules in order, the default and the TTL bounds of learned
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The rules, in order.
    pub rules: Vec<RuleKind>,
    /// What happens to a flow no rule matches.
    pub default: Action,
    /// Shortest time, in seconds, a learned address stays allowed.
    pub ttl_min: u32,
    /// Longest time, in seconds, a learned address stays allowed.
    pub ttl_max: u32,
}

impl Default for Spec {
    /// No rule, default allow, TTLs [`TTL_MIN`]..[`TTL_MAX`].
    fn default() -> Spec {
        Spec {
            rules: Vec::new(),
            default: Action::Allow,
            ttl_min: TTL_MIN,
            ttl_max: TTL_MAX,
        }
    }
}

impl Spec {
    /// Parses a policy file, adding to `self` (so that command-line rules and files
    /// combine in the order given). The format, one directive per line, `#` starting a
    /// comment:
    ///
    /// ```text
    /// default deny                 # or: default allow
    /// deny-private
    /// allow 192.168.1.10 tcp:22    # CIDR or address, [tcp|udp|icmp[:PORT[-PORT]]]
    /// deny 203.0.113.0/24
    /// allow 2001:db8::/32 udp:53
    /// allow-domain example.com     # the name itself
    /// allow-domain *.example.com   # its subdomains
    /// name-ttl 30 3600             # learned addresses live min..max seconds
    /// ```
    ///
    /// # Errors
    /// `line N: what is wrong`.
    pub fn parse_file(&mut self, text: &str) -> Result<(), String> {
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            self.parse_directive(line)
                .map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        Ok(())
    }

    fn parse_directive(&mut self, line: &str) -> Result<(), String> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        match words[..] {
            ["default", "allow"] => self.default = Action::Allow,
            ["default", "deny"] => self.default = Action::Deny,
            ["default", ..] => return Err(format!("`{line}`: expected `default allow|deny`")),
            ["name-ttl", min, max] => {
                let (min, max) = min
                    .parse::<u32>()
                    .ok()
                    .zip(max.parse::<u32>().ok())
                    .filter(|(a, b)| a <= b && *b <= 7 * 86400)
                    .ok_or_else(|| {
                        format!(
                            "`{line}`: expected `name-ttl MIN MAX`, seconds, MIN <= MAX <= 604800"
                        )
                    })?;
                self.ttl_min = min;
                self.ttl_max = max;
            }
            ["name-ttl", ..] => return Err(format!("`{line}`: expected `name-ttl MIN MAX`")),
            _ => self.push(RuleKind::parse(line)?)?,
        }
        Ok(())
    }

    /// Appends a rule.
    ///
    /// # Errors
    /// When the policy already has [`MAX_RULES`].
    pub fn push(&mut self, rule: RuleKind) -> Result<(), String> {
        if self.rules.len() >= MAX_RULES {
            return Err(too_many_rules());
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Adds a policy file's policy where it stands among a front end's options: its rules
    /// after the rules so far, its default and name TTLs in place of these. Every front end
    /// merges its files through this, so that the rules of all its files and options
    /// together are held to [`MAX_RULES`].
    ///
    /// # Errors
    /// When the rules would be more than [`MAX_RULES`] (nothing is added then).
    pub fn append_file(&mut self, file: &Spec) -> Result<(), String> {
        if self.rules.len() + file.rules.len() > MAX_RULES {
            return Err(too_many_rules());
        }
        self.default = file.default;
        self.ttl_min = file.ttl_min;
        self.ttl_max = file.ttl_max;
        self.rules.extend_from_slice(&file.rules);
        Ok(())
    }

    /// Whether the policy lets everything through (no rule, default allow).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow
    }
}

impl std::str::FromStr for Spec {
    type Err = String;

    /// A policy file's text as a policy of its own ([`Spec::parse_file`]).
    fn from_str(text: &str) -> Result<Spec, String> {
        let mut spec = Spec::default();
        spec.parse_file(text)?;
        Ok(spec)
    }
}

impl fmt::Display for Spec {
    /// The policy file's text of the policy: [`parse_file`](Spec::parse_file) reads it
    /// back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "default {}", self.default)?;
        writeln!(f, "name-ttl {} {}", self.ttl_min, self.ttl_max)?;
        for r in &self.rules {
            writeln!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The blocks of `deny-private` (and the host's own addresses, which the checks are given).
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "255.255.255.255",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "::1",
    "::",
    "::ffff:0.0.0.0/96",
];

/// A rule in force: what it says, its id (stable while the policy changes) and its hits.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its id, for the API.
    pub id: u32,
    /// What it says.
    pub kind: RuleKind,
    /// Flows it decided (allowed or denied).
    pub hits: u64,
}

/// One address block of a rule in evaluation order.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Index of the rule in [`Policy::rules`].
    rule: usize,
    action: Action,
    proto: Option<Proto>,
    ports: (u16, u16),
}

impl Entry {
    fn matches(&self, proto: Proto, port: u16) -> bool {
        self.proto.is_none_or(|p| p == proto)
            && (proto == Proto::Icmp || (self.ports.0..=self.ports.1).contains(&port))
    }
}

/// The hash of the prefix maps: a multiply-and-fold of the masked address. Their keys are
/// the rules' blocks, which the user chose; the guest only looks up, so it cannot make
/// keys collide, and SipHash would cost most of a lookup.
#[derive(Debug, Default, Clone, Copy)]
struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u128(&mut self, v: u128) {
        let folded = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
        let m = u128::from(folded ^ self.0) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

type PrefixMap = HashMap<u128, Vec<u32>, std::hash::BuildHasherDefault<PrefixHasher>>;

/// One prefix length's map: masked address -> positions (ascending) of its entries.
#[derive(Debug, Default)]
struct Level {
    len: u8,
    /// The smallest position it holds.
    first: u32,
    map: PrefixMap,
}

/// One family's address rules: see the module documentation.
#[derive(Debug, Default)]
struct Table {
    /// Ordered by [`Level::first`].
    levels: Vec<Level>,
    family: u8,
}

impl Table {
    fn new(family: u8) -> Table {
        Table {
            levels: Vec::new(),
            family,
        }
    }

    /// Adds the block `bits/len` at position `pos` (positions come in ascending order).
    fn insert(&mut self, bits: u128, len: u8, pos: u32) {
        let level = match self.levels.iter_mut().position(|l| l.len == len) {
            Some(i) => &mut self.levels[i],
            None => {
                self.levels.push(Level {
                    len,
                    first: pos,
                    map: PrefixMap::default(),
                });
                self.levels.last_mut().expect("just pushed")
            }
        };
        level.map.entry(bits).or_default().push(pos);
    }

    /// Puts the levels in lookup order, once every block is in.
    fn seal(&mut self) {
        self.levels.sort_by_key(|l| l.first);
    }

    /// The first position whose block holds `bits` and whose entry matches.
    fn lookup(&self, bits: u128, order: &[Entry], proto: Proto, port: u16) -> Option<u32> {
        let mut best: Option<u32> = None;
        for level in &self.levels {
            if best.is_some_and(|b| level.first >= b) {
                break;
            }
            let Some(list) = level.map.get(&(bits & mask(self.family, level.len))) else {
                continue;
            };
            for &pos in list {
                if best.is_some_and(|b| pos >= b) {
                    break;
                }
                if order[pos as usize].matches(proto, port) {
                    best = Some(pos);
                    break;
                }
            }
        }
        best
    }
}

/// An address learned from a DNS answer.
#[derive(Debug, Clone, Copy)]
struct Learned {
    expires: Instant,
    /// Index of the `allow-domain` rule in [`Policy::rules`].
    rule: usize,
}

/// The names side of a policy: the allowed names and the addresses learned from them
/// (the DNS forwarder's flows teach it the answers they relay, through
/// [`Policy::learn`]).
#[derive(Debug, Default)]
struct Names {
    /// Exact names -> rule index.
    exact: HashMap<String, usize>,
    /// `*.NAME` rules: NAME -> rule index.
    suffix: HashMap<String, usize>,
    learned: HashMap<IpAddr, Learned>,
    /// `learned` in expiry order, soonest first: an entry each time an address was
    /// learned or its lifetime extended. One whose address now expires later, or is
    /// gone, is stale and skipped when it comes up.
    expiry: BinaryHeap<Reverse<(Instant, IpAddr)>>,
    ttl_min: u32,
    ttl_max: u32,
    /// Whether queries for names not allowed are answered NXDOMAIN.
    filter: bool,
    /// Addresses learned (counter).
    learned_total: u64,
}

impl Names {
    /// The rule that allows `name` (lower case, no trailing dot).
    fn allows(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(&i) = self.suffix.get(parent) {
                return Some(i);
            }
            rest = parent;
        }
        None
    }

    fn lookup(&self, now: Instant, ip: IpAddr) -> Option<usize> {
        self.learned
            .get(&ip)
            .filter(|l| l.expires > now)
            .map(|l| l.rule)
    }

    /// See [`Policy::learn`].
    fn learn(&mut self, now: Instant, reply: &[u8]) -> usize {
        if self.exact.is_empty() && self.suffix.is_empty() {
            // No name is allowed by a rule: nothing to learn, no reply to parse.
            return 0;
        }
        let mut name = [0u8; MAX_NAME];
        let Some(msg) = parse_reply(reply, &mut name) else {
            return 0;
        };
        let Some(rule) = self.allows(msg.name) else {
            return 0;
        };
        self.expire(now);
        let mut n = 0;
        for (ip, ttl) in msg.addrs.iter().flatten() {
            let ttl = (*ttl).clamp(self.ttl_min, self.ttl_max);
            let expires = now + Duration::from_secs(u64::from(ttl));
            if let Some(l) = self.learned.get_mut(ip) {
                l.rule = rule;
                if expires > l.expires {
                    l.expires = expires;
                    self.order(expires, *ip);
                }
            } else if self.learned.len() >= MAX_LEARNED {
                log::info!("egress: {MAX_LEARNED} learned addresses, {ip} not learned");
                break;
            } else {
                self.learned.insert(*ip, Learned { expires, rule });
                self.order(expires, *ip);
            }
            n += 1;
        }
        self.learned_total += n as u64;
        n
    }

    /// Drops the addresses expired at `now`: each costs a step of the expiry order.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((expires, ip))) = self.expiry.peek() {
            if expires > now {
                break;
            }
            self.expiry.pop();
            if self.learned.get(&ip).is_some_and(|l| l.expires == expires) {
                self.learned.remove(&ip);
            }
        }
    }

    /// Puts `ip`, now expiring at `expires`, in the expiry order. Its earlier entry goes
    /// stale; once stale entries outnumber the addresses, the order is made again from
    /// the table (as many entries went stale since the last time: amortised, a constant
    /// per answer).
    fn order(&mut self, expires: Instant, ip: IpAddr) {
        self.expiry.push(Reverse((expires, ip)));
        if self.expiry.len() > 2 * self.learned.len() + 64 {
            self.expiry = self
                .learned
                .iter()
                .map(|(ip, l)| Reverse((l.expires, *ip)))
                .collect();
        }
    }

    /// With names filtered: writes into `out` the NXDOMAIN answer to `query` when its
    /// question is not an allowed name (REFUSED for a query with no single question),
    /// and returns its length. `None`: the query may go to the resolver.
    fn refuse(&self, query: &[u8], out: &mut [u8]) -> Option<usize> {
        if !self.filter || query.len() < 12 {
            // Too short to answer: the resolver drops it as well.
            return None;
        }
        let standard = query[2] & 0x78 == 0 && query[2] & 0x80 == 0;
        let mut buf = [0u8; MAX_NAME];
        let question = if standard && u16::from_be_bytes([query[4], query[5]]) == 1 {
            names::read_name(query, 12, &mut buf).and_then(|(len, end)| {
                let qend = end.checked_add(4).filter(|&e| e <= query.len())?;
                Some((len, qend))
            })
        } else {
            None
        };
        let (rcode, qlen) = match question {
            Some((len, qend)) => {
                // A name that is not text is no allowed name.
                let name = std::str::from_utf8(&buf[..len]).ok();
                if name.is_some_and(|n| self.allows(n).is_some()) {
                    return None;
                }
                (3, qend)
            }
            None => (5, 12),
        };
        let head = out.get_mut(..qlen)?;
        head.copy_from_slice(&query[..qlen]);
        // QR, opcode and RD as asked, RA; the rcode; the question only.
        out[2] = 0x80 | (query[2] & 0x79);
        out[3] = 0x80 | rcode;
        let qd: u16 = if rcode == 3 { 1 } else { 0 };
        out[4..6].copy_from_slice(&qd.to_be_bytes());
        out[6..12].fill(0);
        Some(qlen)
    }
}

/// Longest name in dotted text.
const MAX_NAME: usize = 255;

/// What a DNS reply says that the policy learns from.
struct Reply<'a> {
    name: &'a str,
    /// Up to 16 (address, TTL) pairs.
    addrs: [Option<(IpAddr, u32)>; 16],
}

/// Parses a reply (QR set, NOERROR, one question): its question name and the A/AAAA
/// records of its answer section.
fn parse_reply<'a>(msg: &[u8], buf: &'a mut [u8; MAX_NAME]) -> Option<Reply<'a>> {
    if msg.len() < 12 || msg[2] & 0x80 == 0 || msg[3] & 0x0f != 0 {
        return None;
    }
    if u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let (len, end) = names::read_name(msg, 12, buf)?;
    let name = std::str::from_utf8(&buf[..len]).ok()?;
    let mut at = end.checked_add(4)?;
    let mut reply = Reply {
        name,
        addrs: [None; 16],
    };
    let mut n = 0;
    for _ in 0..ancount {
        at = skip_name(msg, at)?;
        let rr = msg.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([rr[0], rr[1]]);
        let class = u16::from_be_bytes([rr[2], rr[3]]);
        let ttl = u32::from_be_bytes([rr[4], rr[5], rr[6], rr[7]]);
        let rdlen = usize::from(u16::from_be_bytes([rr[8], rr[9]]));
        let rdata = msg.get(at + 10..at + 10 + rdlen)?;
        at += 10 + rdlen;
        let ip = match (rtype, class, rdlen) {
            (1, 1, 4) => IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (28, 1, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(rdata);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => continue,
        };
        if n < reply.addrs.len() {
            reply.addrs[n] = Some((ip, ttl));
            n += 1;
        }
    }
    Some(reply)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
}

/// A flow to check.
#[derive(Debug, Clone, Copy)]
pub struct FlowDst {
    /// Its protocol.
    pub proto: Proto,
    /// The destination the guest addressed.
    pub dst: IpAddr,
    /// The destination on the host (the same unless usernet maps it).
    pub host: IpAddr,
    /// The destination port (0 for ICMP).
    pub port: u16,
    /// Whether it is the DNS forwarder's own service (the DNS address, port 53).
    pub dns_service: bool,
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    /// The rule of this id.
    Rule(u32),
    /// An address learned for the `allow-domain` rule of this id.
    Name(u32),
    /// The default.
    Default,
    /// TCP to the DNS forwarder while names are filtered.
    DnsOverTcp,
    /// The DNS forwarder's own service (UDP, or TCP while names are not filtered): not
    /// egress, not counted.
    DnsService,
}

impl fmt::Display for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decider::Rule(id) => write!(f, "rule {id}"),
            Decider::Name(id) => write!(f, "name rule {id}"),
            Decider::Default => f.write_str("default"),
            Decider::DnsOverTcp => f.write_str("DNS over TCP (names are filtered)"),
            Decider::DnsService => f.write_str("the DNS forwarder"),
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Allowed or denied.
    pub action: Action,
    /// By what.
    pub by: Decider,
}

/// Rate limit of the log of denied flows.
#[derive(Debug)]
struct LogLimit {
    second: Instant,
    count: u32,
    suppressed: u64,
}

/// A policy in force: its rules with their hit counters, the lookup tables, and the
/// names learned.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    default: Action,
    default_hits: u64,
    order: Vec<Entry>,
    /// The position in [`order`](Self::order) of the `deny-private` entry, the last.
    private: Option<u32>,
    v4: Table,
    v6: Table,
    names: Names,
    next_id: u32,
    log: LogLimit,
}

impl Policy {
    /// The policy `spec` says, rule ids from 1.
    pub fn new(spec: &Spec) -> Policy {
        let mut p = Policy {
            rules: Vec::new(),
            default: spec.default,
            default_hits: 0,
            order: Vec::new(),
            private: None,
            v4: Table::new(32),
            v6: Table::new(128),
            names: Names {
                ttl_min: spec.ttl_min,
                ttl_max: spec.ttl_max,
                ..Names::default()
            },
            next_id: 1,
            log: LogLimit {
                second: Instant::ZERO,
                count: 0,
                suppressed: 0,
            },
        };
        for kind in &spec.rules {
            p.rules.push(Rule {
                id: p.next_id,
                kind: kind.clone(),
                hits: 0,
            });
            p.next_id += 1;
        }
        p.rebuild();
        p
    }

    /// Rebuilds the tables and the names from [`rules`](Self::rules). The learned
    /// addresses stay: each holds the index of its `allow-domain` rule, which
    /// [`insert`](Self::insert) and [`remove`](Self::remove) keep in step (`remove`
    /// drops the addresses of the rule it removes).
    fn rebuild(&mut self) {
        self.order.clear();
        self.private = None;
        self.v4 = Table::new(32);
        self.v6 = Table::new(128);
        let mut private = None;
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.kind {
                RuleKind::Address {
                    action,
                    net,
                    proto,
                    ports,
                } => {
                    let e = Entry {
                        rule: i,
                        action,
                        proto,
                        ports,
                    };
                    Self::add_block(&mut self.order, &mut self.v4, &mut self.v6, net, e);
                }
                RuleKind::DenyPrivate => private = private.or(Some(i)),
                RuleKind::Domain(_) => {}
            }
        }
        if let Some(i) = private {
            let e = Entry {
                rule: i,
                action: Action::Deny,
                proto: None,
                ports: (0, u16::MAX),
            };
            let pos = self.order.len() as u32;
            self.order.push(e);
            self.private = Some(pos);
            for net in PRIVATE
                .iter()
                .map(|s| Cidr::parse(s).expect("valid built-in block"))
            {
                match net {
                    Cidr::V4(a, l) => self.v4.insert(to_bits(IpAddr::V4(a)), l, pos),
                    Cidr::V6(a, l) => self.v6.insert(to_bits(IpAddr::V6(a)), l, pos),
                    Cidr::Any => {}
                }
            }
        }
        self.v4.seal();
        self.v6.seal();
        let names = &mut self.names;
        names.exact.clear();
        names.suffix.clear();
        let mut any_domain = false;
        for (i, rule) in self.rules.iter().enumerate() {
            if let RuleKind::Domain(name) = &rule.kind {
                any_domain = true;
                match name.strip_prefix("*.") {
                    Some(s) => names.suffix.entry(s.to_string()).or_insert(i),
                    None => names.exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        names.filter = any_domain || self.default == Action::Deny;
    }

    fn add_block(order: &mut Vec<Entry>, v4: &mut Table, v6: &mut Table, net: Cidr, e: Entry) {
        let pos = order.len() as u32;
        order.push(e);
        match net {
            Cidr::V4(a, l) => v4.insert(to_bits(IpAddr::V4(a)), l, pos),
            Cidr::V6(a, l) => v6.insert(to_bits(IpAddr::V6(a)), l, pos),
            Cidr::Any => {
                v4.insert(0, 0, pos);
                v6.insert(0, 0, pos);
            }
        }
    }

    /// The rules in force, in order, with their hits.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The default and how many flows it decided.
    pub fn default_action(&self) -> (Action, u64) {
        (self.default, self.default_hits)
    }

    /// The policy as written now (rules and default; the TTL bounds it was made with).
    pub fn spec(&self) -> Spec {
        let names = &self.names;
        Spec {
            rules: self.rules.iter().map(|r| r.kind.clone()).collect(),
            default: self.default,
            ttl_min: names.ttl_min,
            ttl_max: names.ttl_max,
        }
    }

    /// Inserts a rule before position `at` (the end: `None` or past it); its id.
    ///
    /// # Errors
    /// When the policy has [`MAX_RULES`] already.
    pub fn insert(&mut self, at: Option<usize>, kind: RuleKind) -> Result<u32, String> {
        if self.rules.len() >= MAX_RULES {
            return Err(too_many_rules());
        }
        let id = self.next_id;
        self.next_id += 1;
        let at = at.unwrap_or(self.rules.len()).min(self.rules.len());
        // Learned addresses hold rule indices: shift them with the rules.
        for l in self.names.learned.values_mut() {
            if l.rule >= at {
                l.rule += 1;
            }
        }
        self.rules.insert(at, Rule { id, kind, hits: 0 });
        self.rebuild();
        Ok(id)
    }

    /// Removes the rule `id`; false if there is none.
    pub fn remove(&mut self, id: u32) -> bool {
        let Some(at) = self.rules.iter().position(|r| r.id == id) else {
            return false;
        };
        let names = &mut self.names;
        names.learned.retain(|_, l| l.rule != at);
        for l in names.learned.values_mut() {
            if l.rule > at {
                l.rule -= 1;
            }
        }
        self.rules.remove(at);
        self.rebuild();
        true
    }

    /// Sets the default.
    pub fn set_default(&mut self, action: Action) {
        self.default = action;
        self.rebuild();
    }

    /// Whether DNS queries for names not allowed are answered NXDOMAIN.
    pub fn filters_names(&self) -> bool {
        self.names.filter
    }

    /// Learns the A and AAAA records of a DNS `reply` whose question is an allowed name
    /// (CNAME chains included: the host's resolver answers for the question). Returns how
    /// many addresses were learned.
    pub fn learn(&mut self, now: Instant, reply: &[u8]) -> usize {
        self.names.learn(now, reply)
    }

    /// With names filtered: writes into `out` the NXDOMAIN answer to `query` when its
    /// question is not an allowed name (REFUSED for a query with no single question),
    /// and returns its length. `None`: the query may go to the resolver.
    pub fn refuse(&self, query: &[u8], out: &mut [u8]) -> Option<usize> {
        self.names.refuse(query, out)
    }

    /// Addresses learned from names since the start.
    pub fn learned_total(&self) -> u64 {
        self.names.learned_total
    }

    /// Decides a new flow and counts the hit; a denied flow is logged (rate-limited).
    /// `deny-private` covers `host_addrs`, the host's own addresses.
    pub fn check(&mut self, now: Instant, f: &FlowDst, host_addrs: &[IpAddr]) -> Verdict {
        let (v, rule) = self.decide_by(now, f, host_addrs);
        match (rule, v.by) {
            (Some(i), _) => self.rules[i].hits += 1,
            (None, Decider::Default) => self.default_hits += 1,
            (None, _) => {}
        }
        if v.action == Action::Deny {
            self.log_denied(now, f, v.by, rule);
        }
        v
    }

    /// Decides a flow without counting it (for flows already open, when rules change); as
    /// [`check`](Self::check).
    pub fn decide(&self, now: Instant, f: &FlowDst, host_addrs: &[IpAddr]) -> Verdict {
        self.decide_by(now, f, host_addrs).0
    }

    /// The verdict on `f` and the index of the rule that gave it, if a rule did.
    fn decide_by(
        &self,
        now: Instant,
        f: &FlowDst,
        host_addrs: &[IpAddr],
    ) -> (Verdict, Option<usize>) {
        if f.dns_service {
            let v = match (f.proto, self.filters_names()) {
                (Proto::Tcp, true) => Verdict {
                    action: Action::Deny,
                    by: Decider::DnsOverTcp,
                },
                _ => Verdict {
                    action: Action::Allow,
                    by: Decider::DnsService,
                },
            };
            return (v, None);
        }
        let pos = self.lookup(f.dst, f.proto, f.port);
        let pos = if f.host == f.dst {
            pos
        } else {
            match (pos, self.lookup(f.host, f.proto, f.port)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        // The host's own addresses are `deny-private`'s too: its entry is the last, so
        // they decide only where no address rule does.
        let pos = pos.or_else(|| {
            self.private
                .filter(|_| host_addrs.contains(&f.dst) || host_addrs.contains(&f.host))
        });
        if let Some(pos) = pos {
            let e = self.order[pos as usize];
            let v = Verdict {
                action: e.action,
                by: Decider::Rule(self.rules[e.rule].id),
            };
            return (v, Some(e.rule));
        }
        let names = &self.names;
        let learned = names
            .lookup(now, f.dst)
            .or_else(|| names.lookup(now, f.host));
        if let Some(i) = learned {
            let v = Verdict {
                action: Action::Allow,
                by: Decider::Name(self.rules[i].id),
            };
            return (v, Some(i));
        }
        let v = Verdict {
            action: self.default,
            by: Decider::Default,
        };
        (v, None)
    }

    fn lookup(&self, ip: IpAddr, proto: Proto, port: u16) -> Option<u32> {
        let table = if ip.is_ipv4() { &self.v4 } else { &self.v6 };
        table.lookup(to_bits(ip), &self.order, proto, port)
    }

    fn log_denied(&mut self, now: Instant, f: &FlowDst, by: Decider, rule: Option<usize>) {
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        let l = &mut self.log;
        if now >= l.second + Duration::from_secs(1) {
            l.second = now;
            l.count = 0;
        }
        if l.count >= LOG_BURST {
            l.suppressed += 1;
            return;
        }
        l.count += 1;
        let rule = match rule.and_then(|i| self.rules.get(i)) {
            Some(r) => format!("{by} ({})", r.kind),
            None => by.to_string(),
        };
        let port = match f.proto {
            Proto::Icmp => String::new(),
            _ => format!(" port {}", f.port),
        };
        let more = std::mem::take(&mut l.suppressed);
        let more = if more > 0 {
            format!(" ({more} more denied flows not logged)")
        } else {
            String::new()
        };
        log::info!(
            "egress: denied {} to {}{port} by {rule}{more}",
            f.proto,
            f.dst
        );
    }
}

/// The policies of one forwarder: the network's (the single namespace's, in attach and
/// run mode) and the members' own. A member's flow must pass both; member-to-member
/// traffic on the switch never comes here.
#[derive(Debug, Default)]
pub(crate) struct Egress {
    all: Option<Policy>,
    /// Members' policies, by slot.
    members: Vec<Option<Policy>>,
    /// A member's addresses -> its slot.
    member_of: HashMap<IpAddr, usize>,
    /// The host's own addresses, which `deny-private` covers in every policy: held here
    /// alone and given to each check, so they may be set before or after the policies.
    pub host_addrs: Vec<IpAddr>,
}

impl Egress {
    /// Sets (`Some`) or removes the policy of `member` (its addresses; `None`: the
    /// network's).
    pub fn set(&mut self, member: &[IpAddr], spec: Option<&Spec>) {
        if member.is_empty() {
            self.all = spec.map(Policy::new);
            return;
        }
        let slot = member.iter().find_map(|a| self.member_of.get(a).copied());
        for a in member {
            self.member_of.remove(a);
        }
        if let Some(i) = slot {
            self.members[i] = None;
        }
        let Some(spec) = spec else {
            return;
        };
        let i = match self.members.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.members.push(None);
                self.members.len() - 1
            }
        };
        self.members[i] = Some(Policy::new(spec));
        for a in member {
            self.member_of.insert(*a, i);
        }
    }

    /// The policy of `member` (an address of it; `None`: the network's).
    pub fn get(&self, member: Option<IpAddr>) -> Option<&Policy> {
        match member {
            None => self.all.as_ref(),
            Some(a) => self.members.get(*self.member_of.get(&a)?)?.as_ref(),
        }
    }

    /// See [`get`](Self::get).
    pub fn get_mut(&mut self, member: Option<IpAddr>) -> Option<&mut Policy> {
        match member {
            None => self.all.as_mut(),
            Some(a) => self.members.get_mut(*self.member_of.get(&a)?)?.as_mut(),
        }
    }

    /// Whether any policy is set.
    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.member_of.is_empty()
    }

    /// The policies a flow of `guest` passes: the network's, then its own.
    fn of(&self, guest: IpAddr) -> impl Iterator<Item = &Policy> {
        [self.get(None), self.get(Some(guest))]
            .into_iter()
            .flatten()
    }

    /// Decides a new flow of `guest` (counted, logged): the network's policy, then the
    /// member's.
    pub fn check(&mut self, now: Instant, guest: IpAddr, f: &FlowDst) -> Verdict {
        let allow = Verdict {
            action: Action::Allow,
            by: Decider::Default,
        };
        let host = &self.host_addrs;
        let v = self.all.as_mut().map_or(allow, |p| p.check(now, f, host));
        if v.action == Action::Deny {
            return v;
        }
        // Not `get_mut`: it would borrow all of `self`, `host_addrs` with it.
        let own = self
            .member_of
            .get(&guest)
            .and_then(|&i| self.members.get_mut(i)?.as_mut());
        own.map_or(v, |p| p.check(now, f, host))
    }

    /// Whether a flow already open would be denied now (not counted).
    pub fn denies(&self, now: Instant, guest: IpAddr, f: &FlowDst) -> bool {
        self.of(guest)
            .any(|p| p.decide(now, f, &self.host_addrs).action == Action::Deny)
    }

    /// Teaches the policies of `guest` (the network's and its own, those in force now)
    /// the addresses of the allowed names in a DNS `reply` relayed to it.
    pub fn learn(&mut self, now: Instant, guest: IpAddr, reply: &[u8]) {
        if let Some(p) = self.all.as_mut() {
            p.learn(now, reply);
        }
        if let Some(p) = self.get_mut(Some(guest)) {
            p.learn(now, reply);
        }
    }

    /// With names filtered for `guest`: the NXDOMAIN (or REFUSED) answer to `query`
    /// written into `out`, its length. `None`: the query may go on.
    pub fn refuse(&self, guest: IpAddr, query: &[u8], out: &mut [u8]) -> Option<usize> {
        self.of(guest).find_map(|p| p.refuse(query, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rules: &[&str], default: Action) -> Spec {
        let mut s = Spec {
            default,
            ..Spec::default()
        };
        for r in rules {
            s.push(RuleKind::parse(r).unwrap()).unwrap();
        }
        s
    }

    fn flow(proto: Proto, dst: &str, port: u16) -> FlowDst {
        let ip: IpAddr = dst.parse().unwrap();
        FlowDst {
            proto,
            dst: ip,
            host: ip,
            port,
            dns_service: false,
        }
    }

    /// The host's own address in [`allowed`]'s checks.
    const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77));

    fn allowed(p: &mut Policy, proto: Proto, dst: &str, port: u16) -> bool {
        p.check(Instant::ZERO, &flow(proto, dst, port), &[HOST])
            .action
            == Action::Allow
    }

    #[test]
    fn rules_parse_and_print_back() {
        for (text, shown) in [
            ("allow 10.0.0.0/8", "allow 10.0.0.0/8"),
            ("deny 192.0.2.1,tcp:443", "deny 192.0.2.1 tcp:443"),
            (
                "deny 192.0.2.1/32 tcp:8000-8100",
                "deny 192.0.2.1 tcp:8000-8100",
            ),
            ("allow 2001:db8::/32 udp:53", "allow 2001:db8::/32 udp:53"),
            ("deny any icmp", "deny any icmp"),
            ("deny-private", "deny-private"),
            ("allow-domain Example.COM.", "allow-domain example.com"),
            ("allow-domain *.example.com", "allow-domain *.example.com"),
        ] {
            assert_eq!(RuleKind::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for bad in [
            "",
            "permit 10.0.0.0/8",
            "allow 10.0.0.1/8",
            "allow 10.0.0.0/33",
            "allow 300.0.0.0",
            "allow 10.0.0.0/8 sctp",
            "allow 10.0.0.0/8 tcp:0",
            "allow 10.0.0.0/8 tcp:90-80",
            "allow 10.0.0.0/8 tcp:70000",
            "allow 10.0.0.0/8 icmp:8",
            "allow 10.0.0.0/8 tcp:1 extra",
            "allow-domain",
            "allow-domain exa mple.com",
            "allow-domain *.",
            "allow-domain a..b",
            "deny-private now",
        ] {
            assert!(RuleKind::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RuleKind::parse("allow 10.0.0.1/8")
            .unwrap_err()
            .contains("10.0.0.0/8"));
    }

    #[test]
    fn policy_file_parses_with_line_numbers() {
        let mut s = Spec::default();
        s.parse_file(
            "# sandbox\n\ndefault deny\ndeny-private  # no LAN\nallow 192.0.2.0/24 tcp:443\n\
             allow-domain *.example.com\nname-ttl 5 60\n",
        )
        .unwrap();
        assert_eq!(s.default, Action::Deny);
        assert_eq!((s.ttl_min, s.ttl_max), (5, 60));
        assert_eq!(s.rules.len(), 3);
        let err = Spec::default()
            .parse_file("default deny\nallow nowhere\n")
            .unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(Spec::default().parse_file("name-ttl 60 5").is_err());
        assert!(Spec::default().parse_file("default maybe").is_err());
    }

    #[test]
    fn policy_text_reads_back() {
        let mut s = spec(
            &[
                "deny-private",
                "allow 192.0.2.0/24 tcp:80-81",
                "allow-domain *.example.com",
                "deny any icmp",
            ],
            Action::Deny,
        );
        s.ttl_min = 7;
        let mut back = Spec::default();
        back.parse_file(&s.to_string()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_file_appends_its_rules_and_the_limit_counts_them_all() {
        let mut s = spec(&["allow 192.0.2.1"], Action::Allow);
        let mut file = spec(&["deny 192.0.2.0/24"], Action::Deny);
        file.ttl_min = 5;
        s.append_file(&file).unwrap();
        let shown: Vec<String> = s.rules.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["allow 192.0.2.1", "deny 192.0.2.0/24"]);
        assert_eq!((s.default, s.ttl_min), (Action::Deny, 5));
        // A file of MAX_RULES rules fills a policy alone, not after another rule.
        let full = Spec {
            rules: vec![RuleKind::parse("deny 198.51.100.1").unwrap(); MAX_RULES],
            ..Spec::default()
        };
        let mut s = spec(&["allow 192.0.2.1"], Action::Deny);
        assert_eq!(
            s.append_file(&full),
            Err(format!("more than {MAX_RULES} rules"))
        );
        assert_eq!((s.rules.len(), s.default), (1, Action::Deny));
        let mut s = Spec::default();
        s.append_file(&full).unwrap();
        assert_eq!(s.rules.len(), MAX_RULES);
        assert!(s.push(RuleKind::DenyPrivate).is_err());
    }

    #[test]
    fn first_match_wins_with_protocols_and_ports() {
        let mut p = Policy::new(&spec(
            &[
                "allow 192.0.2.7 tcp:443",
                "deny 192.0.2.0/24",
                "allow 192.0.2.0/24",
                "deny 198.51.100.0/24 udp:50-60",
                "deny 2001:db8::/32 tcp",
                "deny any icmp",
            ],
            Action::Allow,
        ));
        assert!(allowed(&mut p, Proto::Tcp, "192.0.2.7", 443));
        assert!(!allowed(&mut p, Proto::Tcp, "192.0.2.7", 80));
        assert!(!allowed(&mut p, Proto::Udp, "192.0.2.7", 443));
        assert!(!allowed(&mut p, Proto::Tcp, "192.0.2.8", 443));
        assert!(!allowed(&mut p, Proto::Udp, "198.51.100.1", 53));
        assert!(allowed(&mut p, Proto::Udp, "198.51.100.1", 61));
        assert!(allowed(&mut p, Proto::Tcp, "198.51.100.1", 53));
        assert!(!allowed(&mut p, Proto::Tcp, "2001:db8::1", 80));
        assert!(allowed(&mut p, Proto::Udp, "2001:db8::1", 80));
        assert!(!allowed(&mut p, Proto::Icmp, "203.0.113.1", 0));
        assert!(!allowed(&mut p, Proto::Icmp, "2001:db8:1::1", 0));
        assert!(allowed(&mut p, Proto::Tcp, "203.0.113.1", 80));
        let hits: Vec<u64> = p.rules().iter().map(|r| r.hits).collect();
        assert_eq!(hits, [1, 3, 0, 1, 1, 2]);
        assert_eq!(p.default_action(), (Action::Allow, 4));
    }

    #[test]
    fn default_deny_and_explicit_allow() {
        let mut p = Policy::new(&spec(&["allow 203.0.113.0/24"], Action::Deny));
        assert!(allowed(&mut p, Proto::Tcp, "203.0.113.9", 80));
        assert!(!allowed(&mut p, Proto::Tcp, "198.51.100.9", 80));
        assert!(!allowed(&mut p, Proto::Udp, "2001:db8::9", 80));
    }

    #[test]
    fn deny_private_covers_its_ranges_and_yields_to_any_allow() {
        let s = spec(&["deny-private", "allow 192.168.1.10"], Action::Allow);
        let mut p = Policy::new(&s);
        for dst in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.0.1",
            "100.64.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "224.0.0.251",
            "255.255.255.255",
            "0.1.2.3",
            "198.51.100.77",
            "fd12::1",
            "fe80::1",
            "ff02::fb",
            "::1",
        ] {
            assert!(!allowed(&mut p, Proto::Tcp, dst, 80), "{dst}");
        }
        for dst in [
            "192.168.1.10",
            "172.32.0.1",
            "100.128.0.1",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            assert!(allowed(&mut p, Proto::Tcp, dst, 80), "{dst}");
        }
    }

    #[test]
    fn host_addresses_count_whenever_they_are_set() {
        let mut e = Egress::default();
        let guest: IpAddr = "10.0.2.100".parse().unwrap();
        e.set(&[], Some(&spec(&["deny-private"], Action::Allow)));
        let own = flow(Proto::Tcp, "198.51.100.77", 80);
        assert_eq!(e.check(Instant::ZERO, guest, &own).action, Action::Allow);
        // After the policy: it covers them from the next flow on, as one set before.
        e.host_addrs = vec![HOST];
        assert_eq!(e.check(Instant::ZERO, guest, &own).by, Decider::Rule(1));
        assert!(e.denies(Instant::ZERO, guest, &own));
        // A member's own policy too, and an allow before deny-private still opens them.
        e.set(&[], None);
        let member = spec(
            &["deny-private", "allow 198.51.100.77 tcp:80"],
            Action::Allow,
        );
        e.set(&[guest], Some(&member));
        assert_eq!(e.check(Instant::ZERO, guest, &own).by, Decider::Rule(2));
        let other = flow(Proto::Tcp, "198.51.100.77", 81);
        assert_eq!(e.check(Instant::ZERO, guest, &other).by, Decider::Rule(1));
    }

    #[test]
    fn mapped_destinations_match_either_address() {
        // The gateway 10.0.2.2 is the host's 127.0.0.1.
        let gw = FlowDst {
            proto: Proto::Tcp,
            dst: "10.0.2.2".parse().unwrap(),
            host: "127.0.0.1".parse().unwrap(),
            port: 8080,
            dns_service: false,
        };
        let mut p = Policy::new(&spec(&["deny-private"], Action::Allow));
        assert_eq!(p.check(Instant::ZERO, &gw, &[]).action, Action::Deny);
        let mut p = Policy::new(&spec(
            &["deny-private", "allow 10.0.2.2 tcp:8080"],
            Action::Allow,
        ));
        assert_eq!(p.check(Instant::ZERO, &gw, &[]).action, Action::Allow);
        let mut p = Policy::new(&spec(&["deny 127.0.0.1"], Action::Allow));
        assert_eq!(p.check(Instant::ZERO, &gw, &[]).action, Action::Deny);
        let mut p = Policy::new(&spec(
            &["allow 127.0.0.0/8", "deny 10.0.2.2"],
            Action::Allow,
        ));
        assert_eq!(p.check(Instant::ZERO, &gw, &[]).action, Action::Allow);
    }

    /// A tiny deterministic generator for the table test.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn table_agrees_with_a_linear_scan() {
        let mut rng = Lcg(7);
        let mut s = Spec::default();
        let mut nets = Vec::new();
        for _ in 0..1000 {
            let (net, text) = if rng.next().is_multiple_of(4) {
                let len = (rng.next() % 129) as u8;
                let bits = (u128::from(rng.next()) << 96 | 0x2001_0db8 << 64) & mask(128, len);
                let c = Cidr::V6(Ipv6Addr::from(bits), len);
                (c, c.to_string())
            } else {
                let len = [8u8, 16, 24, 28, 32][(rng.next() % 5) as usize];
                let bits = (u128::from(rng.next() as u32 & 0x0aff_ffff) << 96) & mask(32, len);
                let c = Cidr::from_bits(true, bits, len);
                (c, c.to_string())
            };
            let action = if rng.next().is_multiple_of(2) {
                "allow"
            } else {
                "deny"
            };
            let narrow = match rng.next() % 3 {
                0 => String::new(),
                1 => format!(" tcp:{}", 1 + rng.next() % 1000),
                _ => " udp".to_string(),
            };
            s.push(RuleKind::parse(&format!("{action} {text}{narrow}")).unwrap())
                .unwrap();
            nets.push(net);
        }
        let p = Policy::new(&s);
        for _ in 0..20000 {
            let ip = if rng.next().is_multiple_of(4) {
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(rng.next()) << 96 | 0x2001_0db8 << 64,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32 & 0x0aff_ffff))
            };
            let proto = [Proto::Tcp, Proto::Udp][(rng.next() % 2) as usize];
            let port = (1 + rng.next() % 1000) as u16;
            let f = FlowDst {
                proto,
                dst: ip,
                host: ip,
                port,
                dns_service: false,
            };
            let scan = s.rules.iter().position(|r| match r {
                RuleKind::Address {
                    net,
                    proto: rp,
                    ports,
                    ..
                } => {
                    net.contains(ip)
                        && rp.is_none_or(|x| x == proto)
                        && (ports.0..=ports.1).contains(&port)
                }
                _ => false,
            });
            let expect = scan.map_or(Decider::Default, |i| Decider::Rule(i as u32 + 1));
            assert_eq!(
                p.decide(Instant::ZERO, &f, &[]).by,
                expect,
                "{ip} {proto} {port}"
            );
        }
    }

    /// A query for `name` of type `qtype`.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    /// A reply to `query(name, 1)`: a CNAME, then A records, names compressed.
    fn reply(name: &str, addrs: &[[u8; 4]], ttl: u32) -> Vec<u8> {
        let mut r = query(name, 1);
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&(addrs.len() as u16 + 1).to_be_bytes());
        // CNAME to "cdn" + pointer to the question name.
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 6, 3, b'c', b'd', b'n', 0xc0, 12]);
        let cname_at = r.len() - 6;
        for a in addrs {
            r.extend_from_slice(&[0xc0, cname_at as u8, 0, 1, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 4]);
            r.extend_from_slice(a);
        }
        r
    }

    #[test]
    fn names_not_allowed_get_nxdomain_allowed_ones_go_through() {
        let p = Policy::new(&spec(
            &["allow-domain example.com", "allow-domain *.example.org"],
            Action::Deny,
        ));
        let names = &p.names;
        let mut out = [0u8; 512];
        for ok in [
            "example.com",
            "EXAMPLE.com",
            "www.example.org",
            "a.b.example.org",
        ] {
            assert_eq!(names.refuse(&query(ok, 1), &mut out), None, "{ok}");
        }
        for no in [
            "www.example.com",
            "example.org",
            "evil.test",
            "example.com.evil.test",
        ] {
            let q = query(no, 28);
            let n = names.refuse(&q, &mut out).expect(no);
            assert_eq!(n, q.len());
            assert_eq!(&out[..2], &q[..2], "ID kept");
            assert_eq!(out[2], 0x81, "QR, RD");
            assert_eq!(out[3] & 0x0f, 3, "NXDOMAIN");
            assert_eq!(&out[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(&out[12..n], &q[12..]);
        }
        // Two questions, or a response: REFUSED, header only.
        let mut two = query("example.com", 1);
        two[5] = 2;
        assert_eq!(names.refuse(&two, &mut out), Some(12));
        assert_eq!(out[3] & 0x0f, 5);
        assert_eq!(names.refuse(&[0u8; 5], &mut out), None);
    }

    #[test]
    fn no_filter_with_default_allow_and_no_names() {
        let p = Policy::new(&spec(&["deny-private"], Action::Allow));
        assert!(!p.filters_names());
        let mut out = [0u8; 512];
        assert_eq!(p.refuse(&query("evil.test", 1), &mut out), None);
    }

    #[test]
    fn learned_addresses_allow_until_the_ttl_ends_and_never_past_address_rules() {
        let mut s = spec(
            &["deny-private", "allow-domain *.example.com"],
            Action::Deny,
        );
        s.ttl_min = 10;
        s.ttl_max = 100;
        let mut p = Policy::new(&s);
        let t0 = Instant::from_secs(1000);
        let r = reply("www.example.com", &[[203, 0, 113, 5], [10, 0, 0, 1]], 1);
        assert_eq!(p.learn(t0, &r), 2);
        // Not an allowed name: nothing learned.
        let other = reply("evil.test", &[[198, 51, 100, 1]], 300);
        assert_eq!(p.learn(t0, &other), 0);
        let at =
            |p: &mut Policy, t: Instant, dst: &str| p.check(t, &flow(Proto::Tcp, dst, 443), &[]);
        assert_eq!(
            at(&mut p, t0, "203.0.113.5"),
            Verdict {
                action: Action::Allow,
                by: Decider::Name(2)
            }
        );
        // Rebinding into a private range: deny-private still decides.
        assert_eq!(at(&mut p, t0, "10.0.0.1").action, Action::Deny);
        assert_eq!(at(&mut p, t0, "198.51.100.1").action, Action::Deny);
        // TTL 1 s raised to the floor of 10 s.
        let t9 = t0 + Duration::from_secs(9);
        assert_eq!(at(&mut p, t9, "203.0.113.5").action, Action::Allow);
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(at(&mut p, t10, "203.0.113.5").action, Action::Deny);
        // A long TTL is capped.
        let r = reply("api.example.com", &[[203, 0, 113, 6]], 86400);
        p.learn(t0, &r);
        assert_eq!(
            at(&mut p, t0 + Duration::from_secs(99), "203.0.113.6").action,
            Action::Allow
        );
        assert_eq!(
            at(&mut p, t0 + Duration::from_secs(100), "203.0.113.6").action,
            Action::Deny
        );
        assert_eq!(p.rules()[1].hits, 3);
    }

    #[test]
    fn a_full_table_makes_room_from_expired_addresses_in_expiry_order() {
        let mut s = spec(&["allow-domain example.com"], Action::Deny);
        s.ttl_min = 1;
        s.ttl_max = 1000;
        let mut p = Policy::new(&s);
        let t0 = Instant::from_secs(10);
        let addr = |i: usize| [198, 18 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        // Full: the first half lives 10 s, the second 1000 s.
        for chunk in 0..MAX_LEARNED / 16 {
            let addrs: Vec<[u8; 4]> = (0..16).map(|k| addr(chunk * 16 + k)).collect();
            let ttl = if chunk < MAX_LEARNED / 32 { 10 } else { 1000 };
            assert_eq!(p.learn(t0, &reply("example.com", &addrs, ttl)), 16);
        }
        let new = |i: u8| reply("example.com", &[[203, 0, 113, i]], 60);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Full of live addresses: a new one is not learned, a known one is renewed.
        assert_eq!(p.learn(at(9), &new(1)), 0);
        assert_eq!(p.learn(at(9), &reply("example.com", &[addr(0)], 60)), 1);
        // The first half expires: room for new ones, the renewed address kept.
        assert_eq!(p.learn(at(10), &new(1)), 1);
        assert_eq!(p.names.learned.len(), MAX_LEARNED / 2 + 2);
        assert_eq!(
            p.check(at(10), &flow(Proto::Tcp, "198.18.0.0", 80), &[]).by,
            Decider::Name(1)
        );
        assert_eq!(
            p.check(at(10), &flow(Proto::Tcp, "198.18.0.1", 80), &[]).by,
            Decider::Default
        );
        // Answers renewing the same addresses leave no more entries in the expiry
        // order than twice the table.
        for s in 11..2000 {
            p.learn(at(s), &new(1));
            assert!(p.names.expiry.len() <= 2 * p.names.learned.len() + 64);
        }
        // Everything expires: the table empties as the next answer comes.
        assert_eq!(p.learn(at(5000), &new(2)), 1);
        assert_eq!(p.names.learned.len(), 1);
        assert_eq!(p.names.expiry.len(), 1);
    }

    #[test]
    fn rules_change_at_run_time_and_learned_addresses_follow() {
        let mut p = Policy::new(&spec(&["allow-domain example.com"], Action::Deny));
        let t0 = Instant::from_secs(1);
        p.learn(t0, &reply("example.com", &[[203, 0, 113, 5]], 60));
        let deny = p
            .insert(Some(0), RuleKind::parse("deny 192.0.2.0/24").unwrap())
            .unwrap();
        assert_eq!(deny, 2);
        assert_eq!(
            p.check(t0, &flow(Proto::Tcp, "203.0.113.5", 80), &[]).by,
            Decider::Name(1)
        );
        assert_eq!(
            p.check(t0, &flow(Proto::Tcp, "192.0.2.1", 80), &[]).by,
            Decider::Rule(2)
        );
        let deny2 = p
            .insert(None, RuleKind::parse("deny 203.0.113.5").unwrap())
            .unwrap();
        assert_eq!(
            p.check(t0, &flow(Proto::Tcp, "203.0.113.5", 80), &[]).by,
            Decider::Rule(deny2)
        );
        assert!(p.remove(deny2));
        assert!(!p.remove(deny2));
        assert!(p.remove(deny));
        assert_eq!(
            p.check(t0, &flow(Proto::Tcp, "203.0.113.5", 80), &[]).by,
            Decider::Name(1)
        );
        // The name's rule goes: so do its addresses.
        assert!(p.remove(1));
        assert_eq!(
            p.check(t0, &flow(Proto::Tcp, "203.0.113.5", 80), &[]).by,
            Decider::Default
        );
        p.set_default(Action::Allow);
        assert!(!p.filters_names());
        assert_eq!(p.spec().rules, vec![]);
    }

    #[test]
    fn dns_service_is_exempt_but_not_over_tcp_while_names_are_filtered() {
        let dns = |proto| FlowDst {
            dns_service: true,
            ..flow(proto, "10.0.2.3", 53)
        };
        let mut p = Policy::new(&spec(&["deny-private"], Action::Deny));
        assert_eq!(
            p.check(Instant::ZERO, &dns(Proto::Udp), &[]).action,
            Action::Allow
        );
        assert_eq!(
            p.check(Instant::ZERO, &dns(Proto::Tcp), &[]).by,
            Decider::DnsOverTcp
        );
        assert_eq!(p.default_action(), (Action::Deny, 0), "not counted");
        let mut p = Policy::new(&spec(&["deny-private"], Action::Allow));
        assert_eq!(
            p.check(Instant::ZERO, &dns(Proto::Tcp), &[]).action,
            Action::Allow
        );
    }

    #[test]
    fn aaaa_records_are_learned_too() {
        let mut p = Policy::new(&spec(&["allow-domain v6.example"], Action::Deny));
        let mut r = query("v6.example", 28);
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        let ip: Ipv6Addr = "2001:db8::42".parse().unwrap();
        r.extend_from_slice(&ip.octets());
        assert_eq!(p.learn(Instant::ZERO, &r), 1);
        assert_eq!(
            p.check(Instant::ZERO, &flow(Proto::Tcp, "2001:db8::42", 443), &[])
                .by,
            Decider::Name(1)
        );
    }

    #[test]
    fn random_messages_never_panic() {
        let mut p = Policy::new(&spec(&["allow-domain example.com"], Action::Deny));
        let names = &mut p.names;
        let mut rng = Lcg(11);
        let good = reply("example.com", &[[203, 0, 113, 5]], 60);
        let mut out = [0u8; 512];
        for _ in 0..20000 {
            let mut m = if rng.next().is_multiple_of(2) {
                good.clone()
            } else {
                query("example.com", 1)
            };
            for _ in 0..(1 + rng.next() % 4) {
                let i = rng.next() as usize % m.len();
                m[i] = rng.next() as u8;
            }
            m.truncate(rng.next() as usize % (m.len() + 1));
            names.learn(Instant::ZERO, &m);
            if let Some(n) = names.refuse(&m, &mut out) {
                assert!(n <= m.len());
            }
        }
    }

    #[test]
    fn garbage_replies_teach_nothing() {
        let mut p = Policy::new(&spec(&["allow-domain example.com"], Action::Deny));
        let names = &mut p.names;
        let good = reply("example.com", &[[203, 0, 113, 5]], 60);
        for cut in 0..good.len() - 1 {
            // A truncated reply may still carry some records: never more than there are.
            assert!(names.learn(Instant::ZERO, &good[..cut]) <= 1);
        }
        let mut err = good.clone();
        err[3] = 0x83;
        assert_eq!(names.learn(Instant::ZERO, &err), 0);
        let mut q = good.clone();
        q[2] = 0x01;
        assert_eq!(names.learn(Instant::ZERO, &q), 0);
    }
}
