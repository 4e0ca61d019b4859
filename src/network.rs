//! usernet networks: many namespaces on one user-space switch, without root.
//!
//! # Theory of operation
//!
//! A network is a definition (name, subnet, optional IPv6 /64, internal or not, MTU, host
//! loopback) kept as one JSON file in the user's configuration directory
//! (`$XDG_CONFIG_HOME/usernet/networks/NAME.json`, else `~/.config/...`), and, while it
//! has members, one serving process (`usernet network serve NAME`): a [`Forwarder`]
//! whose switch has one port per member TAP ([`forwarder::switch`]). Separate networks
//! are separate processes, so they are isolated from each other by construction and meet
//! only through published ports on the host.
//!
//! The serving process is started on demand by the first `usernet run --network` or
//! `usernet network connect`, holds `RUNTIME/NAME.lock` (`$XDG_RUNTIME_DIR/usernet`, else
//! `/tmp/usernet-UID`) so that there is never a second one, listens on `RUNTIME/NAME.sock`
//! and ends when its last member has gone (or when nobody joined within
//! [`IDLE_EXIT`]). An ending server unlinks its socket first; a member that joins while
//! it ends (its request closed unanswered, or the socket gone) starts the next one as
//! soon as the lock is free, and asks again.
//!
//! Joining is two requests on that socket, one JSON line each:
//! 1. `reserve`: the server allocates the member's addresses (IPv4 from `net+100` on,
//!    IPv6 the same host part in the /64, or the asked ones if free) and a MAC address
//!    derived from the IPv4 address; the client configures the member's link statically
//!    with them (no DHCP client needed) while creating its TAP;
//! 2. `attach`, with the TAP's descriptor attached (`SCM_RIGHTS`): the server adds a
//!    switch port, pins it to the member's MAC and addresses (anything else it sends is
//!    dropped and counted), registers its names for the network's DNS and publishes its
//!    ports.
//!
//! A member leaves when what it joined with goes away: the process (`run`: the command's
//! namespace holder; `connect PID`) or the namespace file (`connect PATH`), watched with a
//! pidfd or inotify (a TAP keeps its namespace alive, so the TAP alone never tells); or
//! by `disconnect`. Its port is detached, its TAP closed (the device goes away with it),
//! its address, names and ports freed. The same socket
//! also serves the slirp4netns-shaped API (`add_hostfwd`, `list_hostfwd`,
//! `remove_hostfwd`, `get_stats` with per-member port counters), and `members`,
//! `disconnect`, `shutdown`.
//!
//! Security: the socket is created in the user's runtime directory with the user's
//! umask; the members' frames are checked by the switch (source MAC and addresses) and
//! the gateway as in single-namespace mode. Limits: [`MAX_MEMBERS`] members, one address
//! per family each; requests are read without blocking the event loop
//! ([`crate::requests`]): a client has [`REQUEST_TIMEOUT`] to send one, at most
//! [`MAX_CLIENTS`] are served at once (a new one closes the longest-waiting), and a
//! silent one stalls no member's traffic.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use forwarder::egress::Spec;
use forwarder::names::Addrs;
use forwarder::nat::{Network, Network6};
use forwarder::port::Proto;
use forwarder::{Forwarder, PortId};
use serde_json::{json, Value};
use smoltcp::wire::EthernetAddress;

use crate::conf::Publish;
use crate::subsystem::{Cx, Next, StartError, Subsystem};
use crate::sys::tap::Tap;

/// Members of one network.
pub const MAX_MEMBERS: usize = 253;
/// A server nobody joined ends after this long.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);
/// A reservation that is not attached is freed after this long.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control clients served at once (a new one beyond that closes the longest-waiting).
pub const MAX_CLIENTS: usize = 64;
/// The members' watches' tokens, from the subsystem's base: this plus the switch port.
const WATCH_TOKENS: usize = 1 << 20;
/// Largest request, in bytes (a member's `attach` with its names and addresses).
const MAX_REQUEST: usize = 16 << 10;
/// Flows one member address may have open (TCP, UDP and ICMP together), by default.
pub const MEMBER_FLOWS: u32 = 4096;

/// Errors of network management.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The name is not a valid network or member name.
    #[error("bad name {0:?}: use letters, digits, '-', '_' and '.' (at most 63)")]
    BadName(String),
    /// No such network.
    #[error("no network named {0:?} (see usernet network ls)")]
    NotFound(String),
    /// The network exists.
    #[error("network {0:?} exists")]
    Exists(String),
    /// The network has members.
    #[error("network {0:?} is in use by {1} member(s); disconnect them or use --force")]
    InUse(String, usize),
    /// A definition or the runtime directory could not be read or written.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A definition file is not what usernet wrote.
    #[error("network definition {0} is damaged")]
    Damaged(PathBuf),
    /// The serving process refused a request.
    #[error("{0}")]
    Refused(String),
    /// The serving process did not come up.
    #[error("the serving process of network {0:?} did not start (see {1})")]
    NoServer(String, PathBuf),
    /// No serving process listens, or the one that did ended before it answered (it was
    /// exiting, its last member gone).
    #[error("network {0:?} is not running")]
    NotRunning(String),
    /// Bad option value.
    #[error("{0}")]
    Usage(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// A network's definition.
#[derive(Debug, Clone)]
pub struct Def {
    /// Its name.
    pub name: String,
    /// IPv4 subnet (gateway `net+2` unless `--gateway`, DNS `net+3`).
    pub subnet: Network,
    /// IPv6 /64, if any.
    pub subnet6: Option<Network6>,
    /// No way out: no outbound NAT, no host loopback.
    pub internal: bool,
    /// The members' MTU.
    pub mtu: u32,
    /// The gateway does not reach the host's loopback.
    pub disable_host_loopback: bool,
    /// Flows one member address may have open.
    pub member_flows: u32,
    /// The network's egress policy (every member's flows), if any.
    pub egress: Option<Spec>,
}

impl Def {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "subnet": format!("{}/{}", self.subnet.addr, self.subnet.prefix_len),
            "gateway": self.subnet.gateway().to_string(),
            "dns": self.subnet.dns().map(|d| d.to_string()),
            "subnet6": self.subnet6.map(|n| format!("{}/64", n.prefix)),
            "gateway6": self.subnet6.map(|n| n.gateway().to_string()),
            "internal": self.internal,
            "mtu": self.mtu,
            "disable_host_loopback": self.disable_host_loopback,
            "max_member_flows": self.member_flows,
            "egress_policy": self.egress.as_ref().map(ToString::to_string),
        })
    }

    fn from_json(v: &Value) -> Option<Def> {
        let mut subnet = crate::conf::parse_cidr(v["subnet"].as_str()?).ok()?;
        if let Some(g) = v["gateway"].as_str() {
            subnet = with_gateway(subnet, g.parse().ok()?).ok()?;
        }
        let subnet6 = match v["subnet6"].as_str() {
            Some(s) => Some(crate::conf::parse_cidr6(s).ok()?),
            None => None,
        };
        Some(Def {
            name: v["name"].as_str()?.to_owned(),
            subnet,
            subnet6,
            internal: v["internal"].as_bool()?,
            mtu: u32::try_from(v["mtu"].as_u64()?).ok()?,
            disable_host_loopback: v["disable_host_loopback"].as_bool()?,
            member_flows: v["max_member_flows"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(MEMBER_FLOWS),
            // A policy that no longer reads makes the definition unusable: never open.
            egress: match v["egress_policy"].as_str() {
                Some(text) => Some(text.parse::<Spec>().ok()?),
                None => None,
            },
        })
    }

    /// The host loopback reached through the gateway.
    pub fn host_loopback(&self) -> bool {
        !self.internal && !self.disable_host_loopback
    }
}

/// A policy in the file format ([`Spec`]'s text).
/// `net` with its gateway (and host loopback address) at `gateway`, which must be a host
/// address of the subnet other than the DNS forwarder's.
fn with_gateway(mut net: Network, gateway: Ipv4Addr) -> Result<Network, String> {
    if !net.contains(gateway)
        || gateway == net.addr
        || gateway == net.broadcast()
        || Some(gateway) == net.dns()
    {
        return Err(format!(
            "--gateway {gateway} is not a free host address of {}/{} (the DNS forwarder is {})",
            net.addr,
            net.prefix_len,
            net.dns().map_or("-".into(), |d| d.to_string())
        ));
    }
    net.gateway = gateway;
    net.loopback = gateway;
    Ok(net)
}

fn check_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && !["none", "host"].contains(&name)
        && !name.contains(':')
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::BadName(name.to_owned()))
    }
}

/// `$XDG_CONFIG_HOME/usernet/networks`, else `$HOME/.config/usernet/networks`.
pub fn config_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
            PathBuf::from(home).join(".config")
        });
    base.join("usernet").join("networks")
}

/// `$XDG_RUNTIME_DIR/usernet`, else `/tmp/usernet-UID`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("usernet"),
        None => PathBuf::from(format!("/tmp/usernet-{}", nix::unistd::getuid())),
    }
}

/// The serving process's socket of network `name`.
pub fn socket_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

fn def_path(name: &str) -> PathBuf {
    config_dir().join(format!("{name}.json"))
}

/// Reads network `name`'s definition.
///
/// # Errors
/// [`NetworkError`] when it does not exist or cannot be read.
pub fn load(name: &str) -> Result<Def, NetworkError> {
    check_name(name)?;
    let path = def_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NetworkError::NotFound(name.to_owned()))
        }
        Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
    };
    let v: Value = serde_json::from_str(&text).map_err(|_| NetworkError::Damaged(path.clone()))?;
    Def::from_json(&v).ok_or(NetworkError::Damaged(path))
}

fn all_defs() -> Result<Vec<Def>, NetworkError> {
    let dir = config_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("cannot read {}", dir.display()))(e)),
    };
    let mut defs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if let Ok(def) = load(name) {
            defs.push(def);
        }
    }
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(defs)
}

/// What `network create` asks for.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Name.
    pub name: String,
    /// `--subnet`.
    pub subnet: Option<Network>,
    /// `--gateway`.
    pub gateway: Option<Ipv4Addr>,
    /// `--ipv6`.
    pub ipv6: bool,
    /// `--subnet6`.
    pub subnet6: Option<Network6>,
    /// `--internal`.
    pub internal: bool,
    /// `--mtu`.
    pub mtu: u32,
    /// `--disable-host-loopback`.
    pub disable_host_loopback: bool,
    /// `--max-member-flows`.
    pub member_flows: u32,
    /// `--egress-policy`.
    pub egress: Option<Spec>,
}

/// `usernet network create`: writes the definition (a free `10.89.N.0/24` and
/// `fd89:N::/64` unless given).
///
/// # Errors
/// [`NetworkError`] when the name is taken or bad, or the file cannot be written.
pub fn create(spec: &CreateSpec) -> Result<Def, NetworkError> {
    check_name(&spec.name)?;
    let defs = all_defs()?;
    if defs.iter().any(|d| d.name == spec.name) {
        return Err(NetworkError::Exists(spec.name.clone()));
    }
    let free = (0..=255u8).find(|n| {
        let addr = Ipv4Addr::new(10, 89, *n, 0);
        !defs.iter().any(|d| {
            d.subnet.contains(addr) || {
                let probe = Network::slirp(addr, 24);
                probe.contains(d.subnet.addr)
            }
        })
    });
    let subnet = match spec.subnet {
        Some(s) => s,
        None => Network::slirp(
            Ipv4Addr::new(
                10,
                89,
                free.ok_or_else(|| {
                    NetworkError::Usage("no free 10.89.N.0/24 subnet: give --subnet".into())
                })?,
                0,
            ),
            24,
        ),
    };
    let subnet = match spec.gateway {
        Some(g) => with_gateway(subnet, g).map_err(NetworkError::Usage)?,
        None => subnet,
    };
    if subnet.prefix_len > 24 {
        return Err(NetworkError::Usage(format!(
            "--subnet /{} is too small for a network (at most /24)",
            subnet.prefix_len
        )));
    }
    let subnet6 = spec.subnet6.or_else(|| {
        spec.ipv6.then(|| {
            Network6::slirp(Ipv6Addr::new(
                0xfd89,
                u16::from(subnet.addr.octets()[2]),
                0,
                0,
                0,
                0,
                0,
                0,
            ))
        })
    });
    let def = Def {
        name: spec.name.clone(),
        subnet,
        subnet6,
        internal: spec.internal,
        mtu: spec.mtu,
        disable_host_loopback: spec.disable_host_loopback,
        member_flows: spec.member_flows,
        egress: spec.egress.clone(),
    };
    let dir = config_dir();
    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let path = def_path(&def.name);
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, format!("{:#}\n", def.to_json()))
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    Ok(def)
}

/// One request to a network's serving process; its `return` value.
///
/// # Errors
/// [`NetworkError::Refused`] with the server's error text; `NotRunning` when nobody
/// listens or the server ended without serving it; `Io` when the exchange failed otherwise.
pub fn request(name: &str, req: &Value, fd: Option<&OwnedFd>) -> Result<Value, NetworkError> {
    let stream = UnixStream::connect(socket_path(name))
        .map_err(|_| NetworkError::NotRunning(name.to_owned()))?;
    exchange(stream, req, fd).map_err(|e| match e {
        Exchange::Gone => NetworkError::NotRunning(name.to_owned()),
        Exchange::Failed(e) => e,
    })
}

/// How an exchange failed.
enum Exchange {
    /// The server closed without reading the request or without a byte of reply: it
    /// was on its way out, and it served nothing.
    Gone,
    Failed(NetworkError),
}

impl From<NetworkError> for Exchange {
    fn from(e: NetworkError) -> Exchange {
        Exchange::Failed(e)
    }
}

fn exchange(stream: UnixStream, req: &Value, fd: Option<&OwnedFd>) -> Result<Value, Exchange> {
    let mut line = req.to_string();
    line.push('\n');
    let sent = match fd {
        Some(fd) => crate::sys::send_with_fd(stream.as_fd(), line.as_bytes(), fd.as_fd())
            .map_err(io::Error::from),
        None => (&stream).write_all(line.as_bytes()),
    };
    match sent {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(Exchange::Gone)
        }
        r => r.map_err(io_err("cannot send the request"))?,
    }
    let mut reply = String::new();
    match BufReader::new(&stream).read_line(&mut reply) {
        Ok(0) => return Err(Exchange::Gone),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && reply.is_empty() => {
            return Err(Exchange::Gone)
        }
        r => {
            r.map_err(io_err("cannot read the reply"))?;
        }
    }
    let v: Value = serde_json::from_str(&reply)
        .map_err(|_| NetworkError::Refused("the network's server gave no reply".into()))?;
    if let Some(desc) = v.pointer("/error/desc").and_then(Value::as_str) {
        return Err(NetworkError::Refused(desc.to_owned()).into());
    }
    Ok(v["return"].clone())
}

/// Whether network `name`'s serving process answers.
fn running(name: &str) -> bool {
    UnixStream::connect(socket_path(name)).is_ok()
}

/// Starts network `name`'s serving process unless it runs; waits until it answers.
///
/// A server whose last member has gone unlinks its socket and then ends, holding the
/// network's lock until it has; a server started meanwhile finds the lock taken and ends
/// at once. So while nobody answers, a new server is started whenever the lock is free.
///
/// # Errors
/// [`NetworkError::NoServer`] when it does not come up.
fn ensure_server(name: &str) -> Result<(), NetworkError> {
    if running(name) {
        return Ok(());
    }
    let dir = runtime_dir();
    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let log = dir.join(format!("{name}.log"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut child = spawn_server(name, &log)?;
    while Instant::now() < deadline {
        if running(name) {
            // Reaped by init once we exit; nothing to wait for here.
            std::mem::forget(child);
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            // It lost the lock: another server is coming up, or the last one is ending.
            if lock_is_free(name) && !running(name) {
                child = spawn_server(name, &log)?;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(NetworkError::NoServer(name.to_owned(), log))
}

/// `usernet network serve NAME`, its output in `log`.
fn spawn_server(name: &str, log: &std::path::Path) -> Result<std::process::Child, NetworkError> {
    let out = fs::File::create(log).map_err(io_err(format!("cannot create {}", log.display())))?;
    let exe = std::env::current_exe().map_err(io_err("cannot find usernet's executable"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["network", "serve", name])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().map_err(io_err("cannot dup the log"))?)
        .stderr(out);
    {
        use std::os::unix::process::CommandExt;
        // Its own session: it outlives the member that started it.
        cmd.process_group(0);
    }
    // The server inherits our blocked signals; it reads them from a signalfd too.
    cmd.spawn()
        .map_err(io_err("cannot start the network's serving process"))
}

/// Whether no process holds network `name`'s lock (taken and let go at once).
fn lock_is_free(name: &str) -> bool {
    let Ok(file) = fs::File::open(lock_path(name)) else {
        return true;
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
}

fn lock_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.lock"))
}

/// The addresses a member got.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The reservation's id, for `attach`.
    pub id: u64,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    /// MAC address.
    pub mac: [u8; 6],
    /// The member's name in the network's DNS.
    pub name: String,
}

/// What a joining member asks for.
#[derive(Debug, Clone, Default)]
pub struct JoinSpec {
    /// Its name in the network's DNS (default: `member-N`).
    pub name: Option<String>,
    /// More names.
    pub aliases: Vec<String>,
    /// A static IPv4 address.
    pub ip: Option<Ipv4Addr>,
    /// A static IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    /// A MAC address.
    pub mac: Option<[u8; 6]>,
    /// Ports to publish to it.
    pub publish: Vec<Publish>,
    /// Its own egress policy (on top of the network's).
    pub egress: Option<Spec>,
    /// Its namespace, for `inspect` (a PID, a path, "run").
    pub namespace: String,
}

/// Asks network `name` for addresses, starting its serving process if none runs (again
/// if the one found was ending: a member joining just as the last one leaves).
///
/// # Errors
/// [`NetworkError`] when the server refuses (address taken, name taken, full) or does
/// not come up.
pub fn reserve(name: &str, spec: &JoinSpec) -> Result<Lease, NetworkError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        ensure_server(name)?;
        match reserve_once(name, spec) {
            // The ending server may still be on its way out: not a busy loop meanwhile.
            Err(NetworkError::NotRunning(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn reserve_once(name: &str, spec: &JoinSpec) -> Result<Lease, NetworkError> {
    let ret = request(
        name,
        &json!({"execute": "reserve", "arguments": {
            "name": spec.name, "aliases": spec.aliases,
            "ip": spec.ip.map(|a| a.to_string()), "ip6": spec.ip6.map(|a| a.to_string()),
            "mac": spec.mac.map(|m| mac_text(&m)),
        }}),
        None,
    )?;
    let parse = || -> Option<Lease> {
        Some(Lease {
            id: ret["id"].as_u64()?,
            ip: ret["ip"].as_str()?.parse().ok()?,
            ip6: ret["ip6"].as_str().and_then(|s| s.parse().ok()),
            mac: parse_mac(ret["mac"].as_str()?)?,
            name: ret["name"].as_str()?.to_owned(),
        })
    };
    parse().ok_or_else(|| NetworkError::Refused("bad reply to reserve".into()))
}

/// Hands the member's TAP to network `name`.
///
/// # Errors
/// [`NetworkError`] when the server refuses.
pub fn attach(
    name: &str,
    lease: &Lease,
    spec: &JoinSpec,
    tap: &Tap,
    watch: &crate::netns::Target,
) -> Result<Value, NetworkError> {
    let publish: Vec<Value> = spec
        .publish
        .iter()
        .flat_map(|p| {
            // Address-less rules: 0.0.0.0 on a network (its server publishes for IPv4).
            p.host_addrs(false).into_iter().flat_map(move |ip| {
                p.pairs().map(move |(h, g)| {
                    json!({"proto": p.proto.as_str(), "host_addr": ip.to_string(),
                           "host_port": h, "guest_port": g})
                })
            })
        })
        .collect();
    let fd = tap
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("cannot dup the TAP"))?;
    request(
        name,
        &json!({"execute": "attach", "arguments": {
            "id": lease.id, "namespace": spec.namespace, "publish": publish,
            "egress": spec.egress.as_ref().map(ToString::to_string),
            "watch_pid": match watch { crate::netns::Target::Pid(p) => Some(*p), _ => None },
            "watch_path": match watch {
                crate::netns::Target::Path(p) => Some(p.to_string_lossy().into_owned()),
                _ => None,
            },
        }}),
        Some(&fd),
    )
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_text(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `usernet network ls`: one line per network.
///
/// # Errors
/// [`NetworkError`] when the definitions cannot be read.
pub fn list() -> Result<Vec<String>, NetworkError> {
    let mut out = vec!["NAME SUBNET SUBNET6 INTERNAL MEMBERS".to_owned()];
    for d in all_defs()? {
        let members = request(&d.name, &json!({"execute": "members"}), None)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        out.push(format!(
            "{} {}/{} {} {} {}",
            d.name,
            d.subnet.addr,
            d.subnet.prefix_len,
            d.subnet6
                .map_or("-".to_owned(), |n| format!("{}/64", n.prefix)),
            d.internal,
            members
        ));
    }
    Ok(out)
}

/// `usernet network inspect`: the definition and the members.
///
/// # Errors
/// [`NetworkError`] when the network does not exist.
pub fn inspect(name: &str) -> Result<Value, NetworkError> {
    let def = load(name)?;
    let members = request(name, &json!({"execute": "members"}), None).unwrap_or(json!([]));
    let egress = request(name, &json!({"execute": "list_egress"}), None).ok();
    let mut v = def.to_json();
    v["running"] = json!(running(name));
    v["members"] = members;
    if let Some(e) = egress {
        v["egress"] = e;
    }
    Ok(v)
}

/// `usernet network rm`.
///
/// # Errors
/// [`NetworkError::InUse`] when it has members and `force` is not given.
pub fn remove(name: &str, force: bool) -> Result<(), NetworkError> {
    load(name)?;
    if let Ok(members) = request(name, &json!({"execute": "members"}), None) {
        let n = members.as_array().map_or(0, Vec::len);
        if n > 0 && !force {
            return Err(NetworkError::InUse(name.to_owned(), n));
        }
        let _ = request(name, &json!({"execute": "shutdown"}), None);
    }
    let path = def_path(name);
    fs::remove_file(&path).map_err(io_err(format!("cannot remove {}", path.display())))
}

// ---------------------------------------------------------------------------------------
// The serving process.
// ---------------------------------------------------------------------------------------

/// One member of a served network.
#[derive(Debug)]
struct Member {
    name: String,
    aliases: Vec<String>,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    mac: [u8; 6],
    namespace: String,
    /// `None` while reserved.
    port: Option<PortId>,
    /// Until when a reservation is kept.
    reserved_until: Instant,
    /// Published port rule ids.
    rules: Vec<u32>,
    /// What ends the membership.
    watch: Option<crate::netns::TargetWatch>,
}

impl Member {
    fn addrs(&self) -> Addrs {
        Addrs {
            v4: Some(self.v4),
            v6: self.v6,
        }
    }
    /// Its addresses, as the egress policy keys its own policy.
    fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.v4))
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }
}

/// The event loop's side for one call.
pub struct Host<'a> {
    /// Registry for the TAPs.
    pub registry: &'a mio::Registry,
    /// The forwarder's host sockets.
    pub sockets: &'a mut crate::host::Sockets,
    /// The TAPs.
    pub taps: &'a mut dyn crate::subsystem::Taps,
}

impl Host<'_> {
    fn io(&mut self) -> forwarder::Io<'_, crate::host::Sockets> {
        self.sockets.io(self.taps.sink())
    }
}

/// The serving side of one network: its socket and its members.
pub struct Server {
    def: Def,
    listener: mio::net::UnixListener,
    clients: crate::requests::Clients,
    /// The subsystem's first token: the listener's; clients follow, then (from
    /// [`WATCH_TOKENS`] on) the members' watches by port.
    base: usize,
    /// Held for the process's lifetime: the one server of this network.
    _lock: nix::fcntl::Flock<fs::File>,
    members: BTreeMap<u64, Member>,
    next_id: u64,
    started: Instant,
    joined: bool,
    shutdown: bool,
}

impl Server {
    /// Takes the network's lock and binds its socket. `Ok(None)` when another process
    /// serves the network already.
    ///
    /// # Errors
    /// [`NetworkError`] when the runtime directory or socket cannot be set up.
    pub fn bind(def: Def) -> Result<Option<Server>, NetworkError> {
        let dir = runtime_dir();
        fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        let lock_path = lock_path(&def.name);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
        let Ok(lock) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            return Ok(None);
        };
        let path = socket_path(&def.name);
        // A socket left by a server that died: we hold the lock, so it is stale.
        let _ = fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(io_err(format!("cannot bind {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("cannot make the socket non-blocking"))?;
        Ok(Some(Server {
            def,
            listener: mio::net::UnixListener::from_std(listener),
            clients: crate::requests::Clients::new(
                "network socket",
                1,
                MAX_CLIENTS,
                MAX_REQUEST,
                REQUEST_TIMEOUT,
            ),
            base: 0,
            _lock: lock,
            members: BTreeMap::new(),
            next_id: 1,
            started: Instant::now(),
            joined: false,
            shutdown: false,
        }))
    }

    /// Whether the process should end: asked to, or nobody is (or was ever) a member.
    fn should_exit(&self, now: Instant) -> bool {
        if self.shutdown {
            return true;
        }
        let attached = self.members.values().any(|m| m.port.is_some());
        let reserved = self.members.values().any(|m| m.reserved_until > now);
        if attached || reserved {
            return false;
        }
        self.joined || now.duration_since(self.started) >= IDLE_EXIT
    }

    /// When [`should_exit`](Self::should_exit) may change without an event.
    fn deadline(&self) -> Option<Instant> {
        let idle = (!self.joined).then(|| self.started + IDLE_EXIT);
        let reserved = self
            .members
            .values()
            .filter(|m| m.port.is_none())
            .map(|m| m.reserved_until)
            .min();
        [idle, reserved].into_iter().flatten().min()
    }

    /// A member's TAP went away (its namespace ended): the member leaves.
    fn port_gone(&mut self, fwd: &mut Forwarder, host: &mut Host<'_>, port: PortId) {
        let id = self
            .members
            .iter()
            .find(|(_, m)| m.port == Some(port))
            .map(|(&id, _)| id);
        match id {
            Some(id) => self.leave(fwd, host, id),
            None => {
                fwd.detach(port);
                host.taps.remove(port, host.registry);
            }
        }
    }

    fn leave(&mut self, fwd: &mut Forwarder, host: &mut Host<'_>, id: u64) {
        let Some(m) = self.members.remove(&id) else {
            return;
        };
        log::info!("member {} ({}) left", m.name, m.v4);
        fwd.remove_member(m.addrs(), &m.name, &m.aliases);
        fwd.set_egress(&m.ips(), None);
        for rule in &m.rules {
            let _ = fwd.remove_port(*rule, &mut host.io());
        }
        if let Some(port) = m.port {
            fwd.detach(port);
            host.taps.remove(port, host.registry);
        }
        if let Some(w) = &m.watch {
            let _ = host
                .registry
                .deregister(&mut mio::unix::SourceFd(&w.as_raw_fd()));
        }
    }

    /// The watch of `port`'s member fired: the member leaves if its process or namespace
    /// is gone.
    fn watch_event(&mut self, fwd: &mut Forwarder, host: &mut Host<'_>, port: PortId) {
        let gone = self
            .members
            .iter_mut()
            .find(|(_, m)| m.port == Some(port))
            .map(|(&id, m)| (id, m.watch.as_mut().is_some_and(|w| w.target_gone())));
        if let Some((id, true)) = gone {
            self.leave(fwd, host, id);
        }
    }

    /// Frees reservations that were never attached.
    /// Frees reservations that were never attached and closes control clients that sent
    /// no request in time; returns when to call again for the clients.
    fn expire(&mut self, now: Instant, registry: &mio::Registry) -> Option<Instant> {
        self.expire_reservations(now);
        self.clients.expire(now, &self.listener, registry)
    }

    fn expire_reservations(&mut self, now: Instant) {
        self.members
            .retain(|_, m| m.port.is_some() || m.reserved_until > now);
    }

    /// Accepts the pending connections; their requests come with
    /// [`handle_client`](Self::handle_client).
    fn accept(&mut self, registry: &mio::Registry) {
        self.clients.accept(&self.listener, registry);
    }

    /// Reads what client `token` sent and, once its request is complete, serves it.
    fn handle_client(&mut self, token: mio::Token, fwd: &mut Forwarder, host: &mut Host<'_>) {
        let Some(req) = self.clients.read(token, host.registry) else {
            return;
        };
        let reply = match serde_json::from_slice::<Value>(&req.bytes) {
            Ok(v) => match self.execute(fwd, host, &v, req.fd) {
                Ok(v) => json!({ "return": v }),
                Err(desc) => crate::requests::error(&desc),
            },
            Err(e) => crate::requests::error(&format!("bad request: {e}")),
        };
        let mut line = reply.to_string();
        line.push('\n');
        self.clients
            .reply(req.client, line.as_bytes(), host.registry);
    }

    fn execute(
        &mut self,
        fwd: &mut Forwarder,
        host: &mut Host<'_>,
        req: &Value,
        fd: Option<OwnedFd>,
    ) -> Result<Value, String> {
        let args = &req["arguments"];
        match req["execute"].as_str().unwrap_or("") {
            "reserve" => self.reserve(args),
            "attach" => self.attach(fwd, host, args, fd),
            "members" => Ok(self.members_json(fwd)),
            "disconnect" => {
                let id = self.member_id(args["member"].as_str().unwrap_or(""))?;
                self.leave(fwd, host, id);
                Ok(json!({}))
            }
            "add_hostfwd" if !args["member"].is_null() => self.publish(fwd, host, req),
            "remove_hostfwd" => {
                let v = api_execute(fwd, &mut host.io(), req)?;
                if let Some(rule) = args["id"].as_u64() {
                    for m in self.members.values_mut() {
                        m.rules.retain(|&r| u64::from(r) != rule);
                    }
                }
                Ok(v)
            }
            "shutdown" => {
                self.shutdown = true;
                Ok(json!({}))
            }
            "get_stats" => {
                let mut v = api_execute(fwd, &mut host.io(), req)?;
                v["members"] = self.members_json(fwd);
                Ok(v)
            }
            "list_egress" | "add_egress_rule" | "remove_egress_rule" | "set_egress_default"
                if !args["member"].is_null() =>
            {
                self.member_egress(fwd, host, req)
            }
            _ => api_execute(fwd, &mut host.io(), req),
        }
    }

    /// The member named `who` (its name, an alias or its IPv4 address).
    fn member_id(&self, who: &str) -> Result<u64, String> {
        self.members
            .iter()
            .find(|(_, m)| {
                m.name == who || m.aliases.iter().any(|a| a == who) || m.v4.to_string() == who
            })
            .map(|(&id, _)| id)
            .ok_or_else(|| format!("no member {who:?} in network {:?}", self.def.name))
    }

    /// An egress API command for a `member` (its name, an alias or its IPv4 address): on
    /// its own policy, made (empty, for all its addresses) if it has none yet.
    fn member_egress(
        &mut self,
        fwd: &mut Forwarder,
        host: &mut Host<'_>,
        req: &Value,
    ) -> Result<Value, String> {
        let who = req["arguments"]["member"].as_str().unwrap_or("");
        let id = self.member_id(who)?;
        let m = &self.members[&id];
        let v4 = IpAddr::V4(m.v4);
        if fwd.egress(Some(v4)).is_none() && req["execute"] != "list_egress" {
            fwd.set_egress(&m.ips(), Some(&Spec::default()));
        }
        let mut req = req.clone();
        req["arguments"]["member"] = json!(v4.to_string());
        api_execute(fwd, &mut host.io(), &req)
    }

    /// `add_hostfwd` with a `member`: the port is published to that member's address,
    /// and unpublished when it leaves.
    fn publish(
        &mut self,
        fwd: &mut Forwarder,
        host: &mut Host<'_>,
        req: &Value,
    ) -> Result<Value, String> {
        let who = req["arguments"]["member"]
            .as_str()
            .ok_or("bad request: add_hostfwd: bad arguments.member")?;
        let id = self.member_id(who)?;
        let mut req = req.clone();
        let args = &mut req["arguments"];
        args["guest_addr"] = json!(self.members[&id].v4.to_string());
        if let Some(a) = args.as_object_mut() {
            a.remove("member");
        }
        let v = api_execute(fwd, &mut host.io(), &req)?;
        let rule = v["id"].as_u64().and_then(|r| u32::try_from(r).ok());
        if let (Some(rule), Some(m)) = (rule, self.members.get_mut(&id)) {
            m.rules.push(rule);
        }
        Ok(v)
    }

    fn members_json(&self, fwd: &Forwarder) -> Value {
        let list: Vec<Value> = self
            .members
            .values()
            .filter(|m| m.port.is_some())
            .map(|m| {
                let port = m.port.and_then(|p| fwd.switch().counters(p));
                let counters: serde_json::Map<String, Value> = port
                    .map(|c| c.iter().map(|(k, v)| (k.to_owned(), v.into())).collect())
                    .unwrap_or_default();
                let rules: Vec<Value> = fwd
                    .port_rules()
                    .into_iter()
                    .filter(|r| m.rules.contains(&r.id))
                    .map(|r| {
                        json!({"id": r.id, "proto": r.proto.as_str(),
                               "host_addr": r.host.ip().to_string(), "host_port": r.host.port(),
                               "guest_port": r.guest.port()})
                    })
                    .collect();
                json!({
                    "name": m.name,
                    "aliases": m.aliases,
                    "ipv4": m.v4.to_string(),
                    "ipv6": m.v6.map(|a| a.to_string()),
                    "mac": mac_text(&m.mac),
                    "namespace": m.namespace,
                    "published_ports": rules,
                    "port_counters": counters,
                    "egress": fwd
                        .egress(Some(IpAddr::V4(m.v4)))
                        .map(crate::egress::policy_json),
                })
            })
            .collect();
        Value::Array(list)
    }

    fn reserve(&mut self, args: &Value) -> Result<Value, String> {
        let now = Instant::now();
        self.expire_reservations(now);
        if self.members.len() >= MAX_MEMBERS {
            return Err(format!("network {:?} is full", self.def.name));
        }
        let net = self.def.subnet;
        let taken = |a: Ipv4Addr, ms: &BTreeMap<u64, Member>| {
            ms.values().any(|m| m.v4 == a) || (net.contains(a) && !net.valid_source(a))
        };
        let v4 = match args["ip"].as_str() {
            Some(s) => {
                let a: Ipv4Addr = s.parse().map_err(|_| format!("bad --ip {s:?}"))?;
                if !net.contains(a) {
                    return Err(format!(
                        "--ip {a} is not in {}/{}",
                        net.addr, net.prefix_len
                    ));
                }
                if taken(a, &self.members) {
                    return Err(format!("--ip {a} is in use or reserved"));
                }
                a
            }
            None => {
                let base = u32::from(net.addr);
                let size = 1u32 << (32 - net.prefix_len);
                (100..size - 1)
                    .chain(4..100)
                    .map(|off| Ipv4Addr::from(base + off))
                    .find(|&a| !taken(a, &self.members))
                    .ok_or_else(|| format!("no free address in network {:?}", self.def.name))?
            }
        };
        let host = u32::from(v4) - u32::from(net.addr);
        let v6 = match (self.def.subnet6, args["ip6"].as_str()) {
            (None, Some(_)) => return Err("--ip6: the network has no IPv6".into()),
            (None, None) => None,
            (Some(n), Some(s)) => {
                let a: Ipv6Addr = s.parse().map_err(|_| format!("bad --ip6 {s:?}"))?;
                if !n.contains(a) || (n.is_ours(a) || a == n.prefix) {
                    return Err(format!(
                        "--ip6 {a} is not a member address of {}/64",
                        n.prefix
                    ));
                }
                if self.members.values().any(|m| m.v6 == Some(a)) {
                    return Err(format!("--ip6 {a} is in use"));
                }
                Some(a)
            }
            (Some(n), None) => Some(Ipv6Addr::from(u128::from(n.prefix) | u128::from(host))),
        };
        let o = v4.octets();
        let mac = match args["mac"].as_str() {
            Some(s) => {
                let mac = parse_mac(s).ok_or_else(|| format!("bad --mac {s:?}"))?;
                if mac[0] & 1 != 0 || self.members.values().any(|m| m.mac == mac) {
                    return Err(format!("--mac {s} is in use or not unicast"));
                }
                mac
            }
            None => [0x02, 0x89, o[0], o[1], o[2], o[3]],
        };
        let name = match args["name"].as_str() {
            Some(n) => n.to_owned(),
            None => format!("member-{}", self.next_id),
        };
        let aliases: Vec<String> = args["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        for n in std::iter::once(&name).chain(&aliases) {
            check_name(n).map_err(|e| e.to_string())?;
            let lower = n.to_ascii_lowercase();
            if self.members.values().any(|m| {
                m.name.eq_ignore_ascii_case(&lower)
                    || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(&lower))
            }) {
                return Err(format!(
                    "name {n:?} is in use in network {:?}",
                    self.def.name
                ));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let ret = json!({
            "id": id, "ip": v4.to_string(), "ip6": v6.map(|a| a.to_string()),
            "mac": mac_text(&mac), "name": name,
        });
        self.members.insert(
            id,
            Member {
                name,
                aliases,
                v4,
                v6,
                mac,
                namespace: String::new(),
                port: None,
                reserved_until: now + RESERVE_TIMEOUT,
                rules: Vec::new(),
                watch: None,
            },
        );
        Ok(ret)
    }

    fn attach(
        &mut self,
        fwd: &mut Forwarder,
        host: &mut Host<'_>,
        args: &Value,
        fd: Option<OwnedFd>,
    ) -> Result<Value, String> {
        let fd = fd.ok_or("attach needs the TAP's descriptor")?;
        let id = args["id"]
            .as_u64()
            .ok_or("attach needs the reservation's id")?;
        let m = self
            .members
            .get_mut(&id)
            .filter(|m| m.port.is_none())
            .ok_or("no such reservation (expired?)")?;
        let tap = Tap::from_fd(fd).map_err(|e| format!("bad TAP: {e}"))?;
        if tap.vnet_hdr_len() != fwd.config().vnet_hdr_len {
            return Err("the TAP's vnet header does not match the network's".into());
        }
        if fwd.config().offload {
            use crate::sys::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                .map_err(|e| format!("cannot turn on the TAP's offloads: {e}"))?;
        }
        let now = smoltcp::time::Instant::from_micros(0);
        let port = fwd
            .attach(now, Some(EthernetAddress(m.mac)))
            .map_err(|e| e.to_string())?;
        if let Err(e) = host.taps.add(port, tap, host.registry) {
            fwd.detach(port);
            return Err(format!("cannot watch the TAP: {e}"));
        }
        m.port = Some(port);
        m.namespace = args["namespace"].as_str().unwrap_or("").to_owned();
        let target = match (args["watch_pid"].as_i64(), args["watch_path"].as_str()) {
            (Some(pid), _) => i32::try_from(pid).ok().map(crate::netns::Target::Pid),
            (None, Some(path)) => Some(crate::netns::Target::Path(PathBuf::from(path))),
            (None, None) => None,
        };
        if let Some(target) = target {
            match crate::netns::TargetWatch::new(&target) {
                Ok(w) => {
                    let token = mio::Token(self.base + WATCH_TOKENS + port);
                    if let Err(e) = host.registry.register(
                        &mut mio::unix::SourceFd(&w.as_raw_fd()),
                        token,
                        mio::Interest::READABLE,
                    ) {
                        log::warn!("cannot watch {target:?}: {e}");
                    }
                    m.watch = Some(w);
                }
                Err(e) => {
                    log::warn!("cannot watch {target:?}, the member stays until disconnected: {e}")
                }
            }
        }
        let addrs = m.addrs();
        if !fwd.add_member(port, EthernetAddress(m.mac), addrs, &m.name, &m.aliases) {
            log::warn!("the network's name table is full: {} has no name", m.name);
        }
        let ips = m.ips();
        if let Some(text) = args["egress"].as_str() {
            match text.parse::<Spec>() {
                Ok(spec) => fwd.set_egress(&ips, Some(&spec)),
                Err(e) => {
                    self.leave(fwd, host, id);
                    return Err(format!("bad egress policy: {e}"));
                }
            }
        }
        let Some(m) = self.members.get(&id) else {
            return Err("the member left".into());
        };
        self.joined = true;
        log::info!("member {} ({}) joined on port {port}", m.name, m.v4);
        let v4 = m.v4;
        let mut rules = Vec::new();
        let mut failed = None;
        for p in args["publish"].as_array().into_iter().flatten() {
            let proto = match p["proto"].as_str() {
                Some("udp") => Proto::Udp,
                _ => Proto::Tcp,
            };
            let host_ip = p["host_addr"].as_str().and_then(|s| s.parse().ok());
            let (Some(host_ip), Some(hp), Some(gp)) = (
                host_ip,
                p["host_port"].as_u64().and_then(|v| u16::try_from(v).ok()),
                p["guest_port"].as_u64().and_then(|v| u16::try_from(v).ok()),
            ) else {
                failed = Some("bad publish rule".to_owned());
                break;
            };
            match fwd.add_port(
                proto,
                SocketAddr::new(host_ip, hp),
                Some(v4),
                gp,
                host.sockets,
            ) {
                Ok(rule) => rules.push(rule.id),
                Err(e) => {
                    failed = Some(format!(
                        "cannot publish {} {host_ip}:{hp}: {e}",
                        proto.as_str()
                    ));
                    break;
                }
            }
        }
        if let Some(m) = self.members.get_mut(&id) {
            m.rules = rules;
        }
        if let Some(e) = failed {
            self.leave(fwd, host, id);
            return Err(e);
        }
        Ok(json!({ "port": port }))
    }
}

/// The slirp4netns-shaped calls, through [`crate::api::execute`].
fn api_execute(
    fwd: &mut Forwarder,
    io: &mut forwarder::Io<'_, crate::host::Sockets>,
    req: &Value,
) -> Result<Value, String> {
    let mut ctl = crate::api::FwdControl { fwd, io };
    let reply = crate::api::execute(req.to_string().as_bytes(), &mut ctl);
    match reply.pointer("/error/desc").and_then(Value::as_str) {
        Some(desc) => Err(desc.to_owned()),
        None => Ok(reply.get("return").cloned().unwrap_or(reply)),
    }
}

/// The network's serving process as a part of the event loop: its control socket, its
/// members' watches, and its end when nobody is (or was ever) a member.
impl Subsystem for Server {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        self.base = base;
        self.clients = crate::requests::Clients::new(
            "network socket",
            base + 1,
            MAX_CLIENTS,
            MAX_REQUEST,
            REQUEST_TIMEOUT,
        );
        cx.registry.register(
            &mut self.listener,
            mio::Token(base),
            mio::Interest::READABLE,
        )?;
        Ok(())
    }

    fn handle(&mut self, local: usize, cx: &mut Cx<'_>) -> Next {
        let mut host = Host {
            registry: cx.registry,
            sockets: &mut *cx.sockets,
            taps: &mut *cx.taps,
        };
        match local {
            0 => self.accept(cx.registry),
            l if l < WATCH_TOKENS => {
                self.handle_client(mio::Token(self.base + l), cx.fwd, &mut host)
            }
            l => self.watch_event(cx.fwd, &mut host, l - WATCH_TOKENS),
        }
        Next::Continue
    }

    fn poll_timeout(&mut self, cx: &mut Cx<'_>) -> Option<Instant> {
        let clients = self.expire(Instant::now(), cx.registry);
        clients.into_iter().chain(self.deadline()).min()
    }

    fn turn(&mut self, cx: &mut Cx<'_>) -> Next {
        let now = Instant::now();
        self.expire(now, cx.registry);
        if self.should_exit(now) {
            // While we hold the lock, the socket is ours: gone, nobody new connects to a
            // server that will not answer, and a joining member starts the next one.
            let _ = fs::remove_file(socket_path(&self.def.name));
            log::info!("network {}: no members left, exiting", self.def.name);
            return Next::Exit(0);
        }
        Next::Continue
    }

    fn tap_gone(&mut self, port: PortId, cx: &mut Cx<'_>) -> bool {
        let mut host = Host {
            registry: cx.registry,
            sockets: &mut *cx.sockets,
            taps: &mut *cx.taps,
        };
        self.port_gone(cx.fwd, &mut host, port);
        true
    }
}

/// The TAP name for the `n`-th network a namespace joins.
pub fn tap_name(n: usize) -> String {
    format!("eth{n}")
}
