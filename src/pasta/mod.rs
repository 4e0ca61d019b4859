//! pasta mode: usernet started as `pasta` by podman or RootlessKit.
//!
//! # Theory of operation
//!
//! [`main`] parses pasta's command line ([`opts`]), turns it into the same pieces the
//! slirp4netns mode builds (a [`LinkConfig`] for the namespace, a forwarder [`Config`] in
//! pasta's address model, `-p`-style rules for `-t/-u`) and runs the shared event loop.
//!
//! **Ports** (`-t/-u`): each range becomes `-p` rules, one host listener per port and
//! address (`0.0.0.0` and `::` without `ADDR/`), bound before ready. `%IF` names the
//! interface the listeners are bound to (`SO_BINDTODEVICE`); an interface the host does
//! not have is refused before detaching. An option of exclusions alone is every other
//! port but the ephemeral range (`net.ipv4.ip_local_port_range`, read at start) as
//! best-effort rules: thousands of listeners, so the soft limit of open files is raised
//! to the hard one at start (as pasta does) and the forwarder's rule limit is sized to
//! the listeners asked for (plus room for `auto`).
//!
//! **Addresses** (`--config-net`): the guest gets a copy of the host's address, prefix
//! and default gateway per family ([`opts::HostTemplate`]; `-a/-n/-g` override them) on
//! an interface named like the host's (`-I`), MTU 65520 (`-m`). The forwarder runs in
//! [`Neighbours::AllButGuest`]: it answers ARP/NDP for every address but the guest's, so
//! on-link hosts and the gateway are reached through it. The gateway reaches the host's
//! loopback unless `--no-map-gw` (`--map-host-loopback` names another address);
//! `--dns-forward ADDR` is the DNS forwarder's address; `--map-guest-addr ADDR` reaches
//! the host's own address (an alias in the NAT).
//!
//! **Lifecycle**, as callers rely on it (they wait for the first process with
//! `CombinedOutput()`, which returns when it has exited *and* every copy of its output
//! pipes is closed): unless `-f`, usernet forks at once; the first process waits on a
//! pipe and exits 0 when the second reports ready (namespace configured, every port
//! bound), or with the second's status when it fails first. The second calls `setsid`,
//! does the work, prints errors to the caller's stderr while it still has it, and just
//! before reporting ready writes the `-P` file (`"%i\n"`) and points fds 0-2 at
//! `/dev/null`, so it holds none of the caller's pipes. It exits when the namespace file
//! is deleted, when a target process ends, and on SIGTERM/SIGINT/SIGHUP.

pub mod agent;
pub mod opts;
pub mod ports;
pub mod publish;

use std::ffi::OsString;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use forwarder::nat::{NatConfig, Neighbours, Network, Network6};
use forwarder::port::Proto;
use forwarder::{Config, Forwarder, Limits, Topology};
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::pipe2;

use crate::event_loop::{self, Extras};
use crate::netns::{self, AttachSpec, Target, TargetWatch};
use crate::sys::link::{Ipv6Link, LinkConfig, Route};
use crate::sys::tap::Tap;
use crate::{isolation, sys};
use opts::{HostTemplate, PastaError, PastaOpts};

/// pasta's default MTU.
pub const DEFAULT_MTU: u32 = 65520;

/// Errors after parsing; printed as `pasta: ...`, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum PastaRunError {
    /// A bad combination of options.
    #[error(transparent)]
    Opts(#[from] PastaError),
    /// The namespace work failed.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] crate::sys::tap::TapError),
    /// The event loop (binding a port, the signal fd, epoll).
    #[error(transparent)]
    Loop(#[from] event_loop::LoopError),
    /// Another local failure.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PastaRunError {
    let what = what.into();
    move |source| PastaRunError::Io { what, source }
}

/// Prints `pasta: MSG` and its sources on stderr; pasta's own texts (what it refuses
/// in the same words) as pasta prints them, without the prefix.
fn report(e: &(dyn std::error::Error + 'static)) {
    let verbatim = match e.downcast_ref::<PastaRunError>() {
        Some(PastaRunError::Opts(PastaError::Pasta(_))) => true,
        // Its ports' texts (publish::PublishError) are pasta's, but for a refused rule.
        Some(PastaRunError::Loop(event_loop::LoopError::Start(e))) => matches!(
            e.downcast_ref::<publish::PublishError>(),
            Some(p) if !matches!(p, publish::PublishError::Refused { .. })
        ),
        _ => matches!(e.downcast_ref::<PastaError>(), Some(PastaError::Pasta(_))),
    };
    if verbatim {
        eprintln!("{e}");
        return;
    }
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    eprintln!("pasta: {msg}");
}

/// Entry point with pasta's arguments (without `argv[0]`).
pub fn main(args: &[OsString]) -> ExitCode {
    // pasta takes no descriptors: none of the caller's (pipes, sockets) stays open here.
    if let Err(e) = sys::fd::close_inherited(&[]) {
        eprintln!("pasta: cannot close inherited descriptors: {e}");
        return ExitCode::from(1);
    }
    let opts = match PastaOpts::parse(args) {
        Ok(o) => o,
        Err(e) => {
            report(&e);
            return ExitCode::from(1);
        }
    };
    if opts.version {
        print!("{}", opts::version_text());
        return ExitCode::SUCCESS;
    }
    if opts.help {
        print!("{}", opts::USAGE);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&opts) {
        report(&e);
        return ExitCode::from(1);
    }
    raise_nofile_limit();
    match run(&opts) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            report(&e);
            ExitCode::from(1)
        }
    }
}

fn init_logging(opts: &PastaOpts) -> Result<(), PastaRunError> {
    let mut logger = env_logger::Builder::new();
    logger.parse_filters(opts.log_level());
    if let Some(path) = &opts.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(format!("cannot open log file {}", path.display())))?;
        logger.target(env_logger::Target::Pipe(Box::new(file)));
    }
    // Already set only if a caller logged before handing over; keep that one then.
    let _ = logger.format_target(false).try_init();
    Ok(())
}

/// The guest link and the forwarder's address model, from the options and the host.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The namespace's link.
    pub link: LinkConfig,
    /// The NAT configuration.
    pub nat: NatConfig,
    /// The DNS forwarder's upstreams (none unless `--dns-forward` asks for it).
    pub nameservers: Vec<SocketAddr>,
}

/// Builds the [`Plan`] of `opts` on a host described by `host`.
///
/// # Errors
/// [`PastaError::Invalid`] for addresses that do not fit together.
pub fn plan(opts: &PastaOpts, host: &HostTemplate) -> Result<Plan, PastaError> {
    let invalid = |s: String| PastaError::Invalid(s);
    if opts.v6_only && opts.addr6.is_none() && host.addr6.is_none() {
        return Err(invalid(
            "-6/--ipv6-only: the host has no IPv6 address to copy (give -a)".into(),
        ));
    }
    // IPv4: the host's address, prefix and gateway unless overridden; pasta's fallbacks.
    let fallback = host.addr4.is_none() && opts.addr4.is_none();
    let addr4 = opts
        .addr4
        .or(host.addr4.map(|a| a.0))
        .unwrap_or(Ipv4Addr::new(169, 254, 2, 1));
    // An address given without -n gets its classful prefix, as in pasta; the host's
    // prefix goes with the host's address only.
    let prefix4 = match (opts.prefix4, opts.addr4, host.addr4) {
        (Some(p), _, _) => p,
        (None, Some(a), _) => classful_prefix(a),
        (None, None, Some(h)) => h.1,
        (None, None, None) => {
            if fallback {
                16
            } else {
                24
            }
        }
    };
    let gw4 = opts
        .gw4
        .or(host.gw4)
        .unwrap_or(Ipv4Addr::new(169, 254, 2, 2));
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix4)).unwrap_or(0);
    if gw4 == addr4 {
        return Err(invalid(format!(
            "the gateway {gw4} is the namespace's own address"
        )));
    }
    let net = Network {
        addr: Ipv4Addr::from(u32::from(addr4) & mask),
        prefix_len: prefix4,
        gateway: gw4,
        dns: opts.dns_forward4,
        guest: addr4,
        loopback: opts.map_loopback4.unwrap_or(gw4),
        neighbours: Neighbours::AllButGuest,
    };
    // The host interface's on-link prefixes that the namespace's own prefix does not
    // already cover (pasta copies them all): they keep a gateway outside the namespace's
    // prefix reachable, as with `-a 192.0.2.1` alone and the host's gateway.
    let on_link4: Vec<Route> = host
        .routes
        .iter()
        .copied()
        .filter(|r| match *r {
            Route::V4 {
                dst,
                prefix_len,
                gateway,
            } => gateway.is_unspecified() && (dst, prefix_len) != (net.addr, net.prefix_len),
            Route::V6 { .. } => false,
        })
        .collect();
    let reaches4 = |ip: Ipv4Addr| {
        net.contains(ip)
            || on_link4.iter().any(|r| match *r {
                Route::V4 {
                    dst, prefix_len, ..
                } => in_prefix4(ip, dst, prefix_len),
                Route::V6 { .. } => false,
            })
    };
    if !opts.v6_only && !reaches4(gw4) {
        return Err(invalid(format!(
            "the gateway {gw4} is outside {addr4}/{prefix4} and no on-link route of the host \
             reaches it"
        )));
    }
    // IPv6 when the host has an address (or -a gives one, with a /64 as in pasta), unless -4.
    let v6 = if opts.v4_only {
        None
    } else {
        opts.addr6.map(|a| (a, 64)).or(host.addr6)
    };
    let net6 = v6.map(|(addr6, prefix6)| {
        let gw6 = opts
            .gw6
            .or(host.gw6)
            .unwrap_or(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));
        let mask = u128::MAX.checked_shl(128 - u32::from(prefix6)).unwrap_or(0);
        Network6 {
            prefix: Ipv6Addr::from(u128::from(addr6) & mask),
            prefix_len: prefix6,
            gateway: gw6,
            dns: opts.dns_forward6,
            guest: addr6,
            loopback: opts.map_loopback6.unwrap_or(gw6),
            neighbours: Neighbours::AllButGuest,
            // As pasta: router advertisements unless --config-net configured the
            // namespace (or --no-ra, --no-ndp, --no-icmp).
            router_adverts: !opts.config_net && !opts.no_ra && !opts.no_ndp && !opts.no_icmp,
        }
    });
    let mtu = opts.mtu.unwrap_or(DEFAULT_MTU);
    let ipv6 = net6.is_some() && mtu >= 1280;
    let name = opts
        .ns_ifname
        .clone()
        .or_else(|| host.ifname.clone())
        .unwrap_or_else(|| "tap0".into());
    let link = LinkConfig {
        name,
        mtu,
        // -6: no IPv4 in the namespace (the forwarder keeps its IPv4 model unused).
        addr: if opts.v6_only {
            Ipv4Addr::UNSPECIFIED
        } else {
            addr4
        },
        prefix_len: prefix4,
        gateway: gw4,
        mac: opts.ns_mac,
        ipv6: net6.filter(|_| ipv6).map(|n| Ipv6Link {
            addr: n.guest,
            prefix_len: n.prefix_len,
            gateway: n.gateway,
        }),
        // The host's on-link prefixes (but the namespace's own), and its other routes whose
        // next hop the namespace reaches on its link (none with --no-copy-routes).
        routes: host
            .routes
            .iter()
            .filter(|_| !opts.no_copy_routes)
            .copied()
            .filter(|r| match *r {
                Route::V4 { gateway, .. } if gateway.is_unspecified() => {
                    !opts.v6_only && on_link4.contains(r)
                }
                Route::V4 { gateway, .. } => !opts.v6_only && reaches4(gateway),
                Route::V6 {
                    dst,
                    prefix_len,
                    gateway,
                } if gateway.is_unspecified() => {
                    ipv6 && net6.is_some_and(|n| (dst, prefix_len) != (n.prefix, n.prefix_len))
                }
                Route::V6 { gateway, .. } => {
                    ipv6 && net6.is_some_and(|n| {
                        n.contains(gateway) || gateway.segments()[0] & 0xffc0 == 0xfe80
                    })
                }
            })
            .collect(),
    };
    // --map-guest-addr: the host's own address of that family (the one copied).
    let mut aliases = Vec::new();
    if let Some(a) = opts.map_guest4 {
        let to = host.addr4.map_or(addr4, |h| h.0);
        aliases.push((IpAddr::V4(a), IpAddr::V4(to)));
    }
    if let (Some(a), Some(n)) = (opts.map_guest6, net6) {
        let to = host.addr6.map_or(n.guest, |h| h.0);
        aliases.push((IpAddr::V6(a), IpAddr::V6(to)));
    }
    let host_loopback = if opts.map_loopback4.is_some() || opts.map_loopback6.is_some() {
        true
    } else {
        !opts.no_map_gw
    };
    Ok(Plan {
        link,
        nat: NatConfig {
            net,
            net6: net6.filter(|_| ipv6),
            host_loopback,
            aliases,
        },
        nameservers: Vec::new(),
    })
}

/// The classful prefix length of `a` (pasta's default for `-a` without `-n`): 8 for
/// class A, 16 for B, 24 for C, 32 above.
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        192..=223 => 24,
        _ => 32,
    }
}

/// Whether `ip` is in `dst/prefix_len`.
fn in_prefix4(ip: Ipv4Addr, dst: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(dst) & mask
}

/// The `-t/-u` rules, after checking that every `%IF` names an interface of the host.
fn port_rules(opts: &PastaOpts) -> Result<Vec<publish::Rule>, PastaError> {
    for (spec, opt) in [(&opts.tcp, "-t"), (&opts.udp, "-u")] {
        for name in spec.interfaces() {
            if nix::net::if_::if_nametoindex(name).is_err() {
                return Err(PastaError::Invalid(format!(
                    "{opt}: no interface '{name}' on the host to bind ports to"
                )));
            }
        }
    }
    let exclusions_only = !opts.tcp.all_but.is_empty() || !opts.udp.all_but.is_empty();
    let ephemeral = if exclusions_only {
        opts::ephemeral_ports()
    } else {
        opts::EPHEMERAL_FALLBACK
    };
    let mut out = Vec::new();
    for (spec, proto) in [(&opts.tcp, Proto::Tcp), (&opts.udp, Proto::Udp)] {
        out.extend(spec.publish(proto, opts.v4_only, opts.v6_only, ephemeral));
    }
    Ok(out)
}

/// How many host listeners `publish` asks for (address-less rules already name each
/// address).
fn listener_count(rules: &[publish::Rule]) -> usize {
    rules.iter().map(|r| usize::from(r.publish.count)).sum()
}

/// Raises the soft limit of open files to the hard one, as pasta does: exclusion-only
/// specs open a listener per port and address.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot read the open files limit: {e}"),
    }
}

fn nameservers(opts: &PastaOpts) -> Vec<SocketAddr> {
    if let Some(host) = opts.dns_host {
        return vec![SocketAddr::new(host, 53)];
    }
    if !opts.dns.is_empty() {
        return opts.dns.iter().map(|&a| SocketAddr::new(a, 53)).collect();
    }
    match forwarder::dns::read_resolv_conf(Path::new("/etc/resolv.conf")) {
        Ok(list) => list,
        Err(e) => {
            log::warn!("cannot read /etc/resolv.conf ({e}): --dns-forward will not answer");
            Vec::new()
        }
    }
}

/// With `--dns-forward` and the resolver taken from resolv.conf (no `--dns-host`, no `-D`), the
/// watch that follows resolv.conf's changes (a VPN, another network): usernet's addition,
/// pasta reads it once.
fn resolv_watch(opts: &PastaOpts) -> Option<crate::resolv_watch::ResolvWatch> {
    if opts.dns_host.is_some()
        || !opts.dns.is_empty()
        || (opts.dns_forward4.is_none() && opts.dns_forward6.is_none())
    {
        return None;
    }
    match crate::resolv_watch::ResolvWatch::new(Path::new("/etc/resolv.conf"), nameservers(opts)) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("cannot watch /etc/resolv.conf ({e}): its changes will not be followed");
            None
        }
    }
}

fn run(opts: &PastaOpts) -> Result<i32, PastaRunError> {
    let target = match (&opts.netns, opts.pid) {
        (Some(path), _) => Target::Path(path.clone()),
        (None, Some(pid)) => Target::Pid(pid),
        (None, None) => return run_command(opts),
    };
    // Everything that can be refused is checked before detaching.
    let host = HostTemplate::read(opts.interface.as_deref());
    let mut plan = plan(opts, &host)?;
    let publish = port_rules(opts)?;
    if opts.dns_forward4.is_some() || opts.dns_forward6.is_some() {
        plan.nameservers = nameservers(opts);
    }
    let ready = if opts.foreground {
        None
    } else {
        Some(detach()?)
    };
    let spec = AttachSpec {
        target: target.clone(),
        userns: opts.userns.clone(),
        tap_name: plan.link.name.clone(),
        vnet_hdr: true,
        configure: opts.config_net.then(|| plan.link.clone()),
    };
    let (tap, helper) = netns::open_tap(&spec)?;
    // --no-netns-quit: the namespace or target process going away does not end usernet.
    let watch = if opts.no_netns_quit {
        None
    } else {
        Some(TargetWatch::new(&target)?)
    };
    let fwd = forwarder(opts, &plan, &tap, listener_count(&publish));
    let (ns_v4, ns_v6) = ns_addrs(opts, &plan);
    let pasta_ports = ports::PastaPorts::new(opts, &target, ns_v4, ns_v6, publish)?;
    let signals = event_loop::signal_fd(false)?;
    let pid_file = opts.pid_file.clone();
    let detach_stdio = !opts.foreground;
    let mut extras = extras(
        ready,
        watch,
        None,
        Box::new(move || before_ready(pid_file.as_deref(), detach_stdio)),
        pasta_ports,
        open_pcap(opts, &tap)?,
    );
    extras.resolv = resolv_watch(opts);
    extras.helper = Some(helper);
    Ok(event_loop::run(tap, fwd, signals, extras)?)
}

/// `pasta [OPTIONS] [--] [CMD [ARGS]]` without a target: CMD (default: `$SHELL`, else
/// `/bin/sh`) in new user, network, mount, PID and UTS namespaces, the network configured
/// as `--config-net` does; usernet stays in front and exits with CMD's status.
fn run_command(opts: &PastaOpts) -> Result<i32, PastaRunError> {
    let host = HostTemplate::read(opts.interface.as_deref());
    let mut plan = plan(opts, &host)?;
    let publish = port_rules(opts)?;
    plan.nameservers = nameservers(opts);
    let cmd = if opts.command.is_empty() {
        vec![std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into())]
    } else {
        opts.command.clone()
    };
    // The command's resolv.conf: the DNS forwarder if asked for, else the host's.
    let resolv_conf = match (opts.dns_forward4, opts.dns_forward6) {
        (None, None) => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        (v4, v6) => [v4.map(IpAddr::V4), v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect(),
    };
    let spec = netns::RunSpec {
        cmd,
        tap_name: plan.link.name.clone(),
        vnet_hdr: true,
        link: plan.link.clone(),
        resolv_conf,
        // A UTS namespace of its own, named like the host (as pasta does).
        hostname: Some(
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
        ),
    };
    let signals = event_loop::signal_fd(true)?;
    let netns::RunChild { pid, tap, mut hold } = netns::spawn_run(&spec)?;
    let fwd = forwarder(opts, &plan, &tap, listener_count(&publish));
    let (ns_v4, ns_v6) = ns_addrs(opts, &plan);
    let pasta_ports =
        ports::PastaPorts::new(opts, &Target::Pid(pid.as_raw()), ns_v4, ns_v6, publish)?;
    let pid_file = opts.pid_file.clone();
    let supervisor = crate::pidns::Supervisor::new(pid, std::time::Duration::from_secs(10));
    let mut extras = extras(
        None,
        None,
        Some(supervisor),
        Box::new(move || before_ready(pid_file.as_deref(), false)),
        pasta_ports,
        open_pcap(opts, &tap)?,
    );
    extras.resolv = resolv_watch(opts);
    let running = event_loop::start(tap, fwd, signals, extras)?;
    hold.release()?;
    Ok(running.run()?)
}

/// The event loop's extras in pasta mode: no API socket, no sandbox (pasta's callers
/// isolate it themselves), the default busy polling; pasta's ports (its `-t/-u` rules, port
/// scans and relays) are its one part of the loop, when it has them.
fn extras(
    ready_fd: Option<OwnedFd>,
    watch: Option<TargetWatch>,
    child: Option<crate::pidns::Supervisor>,
    before_ready: Box<dyn FnOnce() -> io::Result<()>>,
    pasta_ports: Option<ports::PastaPorts>,
    pcap: Option<crate::pcap::Pcap>,
) -> Extras {
    Extras {
        exit_fd: None,
        ready_fd,
        watch,
        child,
        isolation: isolation::Isolation {
            sandbox: false,
            seccomp: false,
            keep: Vec::new(),
            keep_trees: Vec::new(),
        },
        api_socket: None,
        info: serde_json::json!({"mode": "pasta", "pid": std::process::id()}),
        // pasta's -t/-u rules are published by its own part of the loop (ports::PastaPorts).
        publish: Vec::new(),
        publish_ipv6: false,
        max_api_clients: 0,
        busy_poll: std::time::Duration::from_micros(50),
        resolv: None,
        before_ready: Some(before_ready),
        services: pasta_ports
            .into_iter()
            .map(|p| Box::new(p) as Box<dyn crate::subsystem::Subsystem>)
            .collect(),
        pcap,
        helper: None,
    }
}

/// The namespace's own addresses, per family.
fn ns_addrs(opts: &PastaOpts, plan: &Plan) -> (Option<Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    (
        (!opts.v6_only).then(|| plan.nat.net.guest()),
        plan.nat.net6.map(|n| n.guest()),
    )
}

/// `-p/--pcap FILE`.
fn open_pcap(opts: &PastaOpts, tap: &Tap) -> Result<Option<crate::pcap::Pcap>, PastaRunError> {
    opts.pcap
        .as_ref()
        .map(|path| {
            crate::pcap::Pcap::create(path, tap.vnet_hdr_len())
                .map_err(io_err(format!("cannot create {}", path.display())))
        })
        .transpose()
}

/// Just before the first process is told "ready": the PID file, then fds 0-2 on
/// `/dev/null` (unless `-f`).
fn before_ready(pid_file: Option<&Path>, detach_stdio: bool) -> io::Result<()> {
    if let Some(path) = pid_file {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write PID file {}: {e}", path.display()),
            )
        })?;
    }
    if detach_stdio {
        sys::fd::stdio_to_dev_null()?;
    }
    Ok(())
}

/// Forks: the first process waits for the second's "ready" (exit 0) or its end (its
/// status) and never returns; the second, in a new session, returns the pipe to report
/// ready on.
fn detach() -> Result<OwnedFd, PastaRunError> {
    let (rd, wr) = pipe2(OFlag::O_CLOEXEC).map_err(|e| PastaRunError::Io {
        what: "cannot create the ready pipe".into(),
        source: e.into(),
    })?;
    match sys::fork_continue().map_err(|e| PastaRunError::Io {
        what: "cannot fork".into(),
        source: e.into(),
    })? {
        Some(child) => {
            drop(wr);
            let mut buf = [0u8; 1];
            let mut file = std::fs::File::from(rd);
            let ready = matches!(file.read(&mut buf), Ok(1));
            let code = if ready {
                0
            } else {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => code,
                    _ => 1,
                }
            };
            std::process::exit(code);
        }
        None => {
            drop(rd);
            // A new session: no controlling terminal, no signals of the caller's group.
            let _ = nix::unistd::setsid();
            Ok(wr)
        }
    }
}

/// The forwarder; `listeners`: the `-t/-u` listeners to come (the rule limit leaves
/// room for as many again for `auto`).
fn forwarder(opts: &PastaOpts, plan: &Plan, tap: &Tap, listeners: usize) -> Forwarder {
    let cfg = Config {
        nat: plan.nat.clone(),
        services: forwarder::Services {
            tcp: !opts.no_tcp,
            udp: !opts.no_udp,
            icmp: !opts.no_icmp,
            dhcp: !opts.no_dhcp,
            // pasta: --no-icmp turns NDP off too.
            ndp: !opts.no_ndp && !opts.no_icmp,
            // pasta announces no resolver by DHCP or NDP unless --dhcp-dns.
            announce_dns: opts.dhcp_dns,
        },
        dns_enabled: plan.nat.net.dns.is_some() || plan.nat.net6.is_some_and(|n| n.dns.is_some()),
        nameservers: plan.nameservers.clone(),
        mtu: plan.link.mtu as usize,
        vnet_hdr_len: tap.vnet_hdr_len(),
        offload: crate::enable_offloads(tap),
        outbound_v4: opts.outbound4,
        outbound_v6: opts.outbound6,
        outbound_to_loopback: false,
        guest_v4: (!opts.v6_only).then_some(plan.nat.net.guest),
        guest_v6: plan.nat.net6.map(|n| n.guest),
        // --no-splice: loopback clients of -t/-u ports cross the link like any other.
        loopback_handoff: !opts.no_splice,
        limits: Limits {
            ports: listeners + forwarder::port::MAX_RULES.max(listeners),
            ..Limits::default()
        },
        seed: crate::random_seed(),
        ..Config::default()
    };
    let mut fwd = Forwarder::new(
        cfg,
        Topology::Single,
        smoltcp::time::Instant::from_micros(0),
    );
    fwd.set_host_addrs(crate::egress::host_addrs());
    fwd.set_egress(&[], opts.egress_policy.as_ref());
    fwd
}

/// Whether `argv[0]`'s file name asks for pasta's command line (as pasta's own
/// `conf_mode()` decides).
pub fn invoked_as_pasta(argv0: &OsString) -> bool {
    PathBuf::from(argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("pasta"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> PastaOpts {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        PastaOpts::parse(&args).unwrap()
    }

    fn host() -> HostTemplate {
        HostTemplate {
            ifname: Some("vh".into()),
            addr4: Some((Ipv4Addr::new(198, 51, 100, 1), 24)),
            gw4: Some(Ipv4Addr::new(198, 51, 100, 2)),
            addr6: Some(("2001:db8:1::1".parse().unwrap(), 64)),
            gw6: Some("2001:db8:1::2".parse().unwrap()),
            routes: Vec::new(),
        }
    }

    #[test]
    fn config_net_copies_the_host() {
        let p = plan(&opts(&["--config-net", "--netns", "x"]), &host()).unwrap();
        assert_eq!(p.link.name, "vh");
        assert_eq!(p.link.mtu, 65520);
        assert_eq!(
            (p.link.addr, p.link.prefix_len),
            (Ipv4Addr::new(198, 51, 100, 1), 24)
        );
        assert_eq!(p.link.gateway, Ipv4Addr::new(198, 51, 100, 2));
        let v6 = p.link.ipv6.unwrap();
        assert_eq!(v6.addr, "2001:db8:1::1".parse::<Ipv6Addr>().unwrap());
        assert!(p.nat.host_loopback);
        assert_eq!(p.nat.net.addr, Ipv4Addr::new(198, 51, 100, 0));
    }

    #[test]
    fn rootlesskit_overrides_and_fallbacks() {
        let o = opts(&[
            "--ns-ifname=tap0",
            "--mtu=1500",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--no-map-gw",
            "-4",
            "1",
        ]);
        let p = plan(&o, &host()).unwrap();
        assert_eq!((p.link.name.as_str(), p.link.mtu), ("tap0", 1500));
        assert_eq!(p.nat.net.guest, Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(p.nat.net.dns, Some(Ipv4Addr::new(10, 0, 2, 3)));
        assert!(!p.nat.host_loopback && p.link.ipv6.is_none());
        let empty = HostTemplate {
            ifname: None,
            addr4: None,
            gw4: None,
            addr6: None,
            gw6: None,
            routes: Vec::new(),
        };
        let p = plan(&opts(&["--config-net", "1"]), &empty).unwrap();
        assert_eq!(p.link.addr, Ipv4Addr::new(169, 254, 2, 1));
        assert_eq!(p.link.gateway, Ipv4Addr::new(169, 254, 2, 2));
    }

    /// podman's "IPv4/IPv6 address assignment": `-a` alone gets pasta's default prefix
    /// (classful, /64) and keeps the host's gateway, reached through the host's on-link
    /// prefix, which is copied; the namespace's own prefix is not (the kernel adds it).
    #[test]
    fn address_alone_keeps_the_host_gateway_through_on_link_routes() {
        let mut h = host();
        let on_link4 = Route::V4 {
            dst: Ipv4Addr::new(198, 51, 100, 0),
            prefix_len: 24,
            gateway: Ipv4Addr::UNSPECIFIED,
        };
        let on_link6 = Route::V6 {
            dst: "2001:db8:1::".parse().unwrap(),
            prefix_len: 64,
            gateway: Ipv6Addr::UNSPECIFIED,
        };
        h.routes = vec![on_link4, on_link6];
        let p = plan(&opts(&["--config-net", "-a", "192.0.2.1", "1"]), &h).unwrap();
        assert_eq!(
            (p.link.addr, p.link.prefix_len, p.link.gateway),
            (
                Ipv4Addr::new(192, 0, 2, 1),
                24,
                Ipv4Addr::new(198, 51, 100, 2)
            )
        );
        assert_eq!(p.link.routes, [on_link4]);
        let p = plan(&opts(&["--config-net", "-a", "10.1.2.3", "1"]), &h).unwrap();
        assert_eq!(p.link.prefix_len, 8);
        let p = plan(&opts(&["--config-net", "-a", "2001:db8::1", "1"]), &h).unwrap();
        let v6 = p.link.ipv6.unwrap();
        assert_eq!(
            (v6.prefix_len, v6.gateway),
            (64, "2001:db8:1::2".parse().unwrap())
        );
        assert_eq!(p.link.routes, [on_link6]);
        // Copied as it is, the host's prefix is the namespace's own: nothing to add.
        let p = plan(&opts(&["--config-net", "1"]), &h).unwrap();
        assert!(p.link.routes.is_empty(), "{:?}", p.link.routes);
        // A gateway that no prefix reaches is still an error.
        h.routes.clear();
        let e = plan(&opts(&["--config-net", "-a", "192.0.2.1", "1"]), &h).unwrap_err();
        assert!(e.to_string().contains("no on-link route"), "{e}");
    }

    #[test]
    fn router_adverts_and_copied_routes_follow_the_options() {
        let ra = |args: &[&str]| {
            plan(&opts(args), &host())
                .unwrap()
                .nat
                .net6
                .unwrap()
                .router_adverts
        };
        // As pasta: advertisements unless --config-net configured the namespace.
        assert!(ra(&["1"]));
        for off in [
            &["--config-net", "1"][..],
            &["--no-ra", "1"],
            &["--no-ndp", "1"],
            &["--no-icmp", "1"],
        ] {
            assert!(!ra(off), "{off:?}");
        }
        let mut h = host();
        h.routes = vec![Route::V4 {
            dst: Ipv4Addr::new(203, 0, 113, 0),
            prefix_len: 24,
            gateway: Ipv4Addr::new(198, 51, 100, 2),
        }];
        let routes = |args: &[&str]| plan(&opts(args), &h).unwrap().link.routes.len();
        assert_eq!(routes(&["--config-net", "1"]), 1);
        assert_eq!(routes(&["--config-net", "--no-copy-routes", "1"]), 0);
    }
}
