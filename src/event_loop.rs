//! The one event loop: the TAP, the flows' host sockets, signals and lifecycle fds.
//!
//! # Theory of operation
//!
//! One thread, one mio `Poll` (epoll, edge-triggered) for the members' TAPs (one per
//! switch port; a single namespace is a network of one) and the host sockets. Per turn:
//! wait (until the forwarder's next timer, or not at all while a TAP still has frames;
//! spinning first while traffic is interactive, see [`crate::busy_poll`]), note
//! readiness, read a bounded batch of frames from each readable TAP (fairness with the
//! other members and the host sockets; the rest is read next turn), then let the
//! forwarder run its timers, relay every flow touched in this turn, and write what it
//! queued for the members. smoltcp's clock is fed from a
//! monotonic clock (`std::time::Instant`), never the wall clock.
//!
//! Start-up ([`start`]) binds the API socket, publishes the `-p` ports and applies the
//! isolation stages; only once all of that worked does the caller release run mode's
//! command and call [`Running::run`], so that a failure stops usernet before the command
//! ever runs.
//!
//! Exits: SIGTERM/SIGINT (attach mode) or the `-e` pipe's end of file: status 0; the
//! attach target or the TAP going away: status 0; in run mode, the command's exit (signals
//! are passed on to it, see [`crate::pidns`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use forwarder::port::{PortError, PortRule, Proto};
use forwarder::{Forwarder, FrameSink, Io};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::api;
use crate::busy_poll::{BulkMeter, BusyPoll};
use crate::conf::Publish;
use crate::netns::TargetWatch;
use crate::pcap::Pcap;
use crate::pidns::Supervisor;
use crate::sys::tap::Tap;

const SIGNAL: Token = Token(1);
const EXIT_FD: Token = Token(2);
const WATCH: Token = Token(3);
const API: Token = Token(4);
const RESOLV: Token = Token(5);
const NETWORK: Token = Token(6);
/// API client tokens, far above any flow token.
const API_CLIENTS: usize = 1 << 40;
/// TAP tokens: this plus the switch port, between flow and API client tokens.
const TAPS: usize = 1 << 32;
/// Network members' watches (process or namespace gone): this plus the switch port.
const WATCHES: usize = 1 << 36;
/// Clients of a network's control socket, above the watches.
pub const NETWORK_CLIENTS: usize = 1 << 38;

/// Tokens of a [`Service`]'s sources, above the API clients'.
pub const SERVICE_TOKENS: usize = 1 << 41;

/// Extra work of a mode that the loop drives besides the forwarder (pasta's port scans
/// and loopback relays). Its sources use tokens from [`SERVICE_TOKENS`] up.
pub trait Service {
    /// When [`tick`](Self::tick) is next due (`None`: never).
    fn next_tick(&self) -> Option<std::time::Instant>;
    /// Periodic work (and once before ready), with control of the published ports.
    ///
    /// # Errors
    /// A failure that must stop start-up (the first call only; later ones are logged).
    fn tick(
        &mut self,
        now: std::time::Instant,
        ctl: &mut dyn api::Control,
        registry: &mio::Registry,
    ) -> io::Result<()>;
    /// Whether `token` is one of its sources.
    fn owns(&self, token: Token) -> bool;
    /// A readiness event of one of its sources.
    fn handle(&mut self, token: Token, registry: &mio::Registry);
    /// Bytes it has moved by itself (not through the TAP) so far: a stream there is bulk
    /// traffic too, not spun for ([`crate::busy_poll`]).
    fn bytes_relayed(&self) -> u64 {
        0
    }
    /// A published-port connection or datagram from a loopback client that the forwarder
    /// handed over ([`forwarder::Config::loopback_handoff`]); dropping it closes it.
    fn take_connection(&mut self, conn: forwarder::port::Handoff, registry: &mio::Registry) {
        let _ = (conn, registry);
    }
}

/// Frames read from the TAP per turn before host sockets get their turn.
const TAP_BATCH: usize = 64;

/// Largest frame the TAP can hand us: vnet header + Ethernet + 64 KiB (GSO).
const RX_BUFFER: usize = 10 + 14 + 65536;

/// Errors that stop the loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// Setting up epoll or a registration failed.
    #[error("cannot set up the event loop")]
    Setup(#[source] io::Error),
    /// Waiting for events failed.
    #[error("cannot wait for events")]
    Poll(#[source] io::Error),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    /// The API socket could not be set up.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// An isolation stage failed.
    #[error(transparent)]
    Isolation(#[from] crate::isolation::IsolationError),
    /// A best-effort rule (pasta's `-t ~PORTS`) ran out of descriptors (pasta's text).
    #[error("Can't open enough sockets for port specifier: {value}")]
    Descriptors {
        /// The option's value.
        value: String,
    },
    /// No port of a best-effort option could be bound (pasta's text).
    #[error("Failed to bind any port for '{opt} {value}', exiting")]
    NoneBound {
        /// The option, `-t` or `-u`.
        opt: String,
        /// Its value.
        value: String,
    },
    /// A port of a pasta option could not be bound (pasta's text, which callers match:
    /// podman's tests look for the port and then the system's error text).
    #[error("Failed to bind port {port} ({why}) for option '{opt} {value}', exiting")]
    PastaBind {
        /// The host port.
        port: u16,
        /// The system's error text (strerror).
        why: String,
        /// The option, `-t` or `-u`.
        opt: String,
        /// Its value as given.
        value: String,
    },
    /// A `-p` port could not be published.
    #[error("cannot publish {spec}")]
    Publish {
        /// The rule.
        spec: String,
        /// Why.
        #[source]
        source: PortError,
    },
}

/// What else the loop watches, besides the TAP.
pub struct Extras {
    /// `-e`: exit when this pipe reaches end of file.
    pub exit_fd: Option<OwnedFd>,
    /// `-r`: written "1" and closed once ready.
    pub ready_fd: Option<OwnedFd>,
    /// The attach target, to exit when it goes away.
    pub watch: Option<TargetWatch>,
    /// Run mode: the command; signals go to it and the loop ends when it does.
    pub child: Option<Supervisor>,
    /// `--enable-sandbox`, `--enable-seccomp`: applied after start-up, before ready.
    pub isolation: crate::isolation::Isolation,
    /// `--api-socket`.
    pub api_socket: Option<std::path::PathBuf>,
    /// What `get_info` answers: mode, pid, and in run mode the name and command.
    pub info: serde_json::Value,
    /// `-p` rules, published before ready.
    pub publish: Vec<Publish>,
    /// Address-less `-p` rules listen on `[::]` too.
    pub publish_ipv6: bool,
    /// `--max-api-clients`.
    pub max_api_clients: usize,
    /// `--busy-poll`: the most the loop spins before it sleeps.
    pub busy_poll: std::time::Duration,
    /// The host's resolv.conf, followed for the DNS forwarder (none with
    /// `--disable-dns`).
    pub resolv: Option<crate::resolv_watch::ResolvWatch>,
    /// Runs once everything is set up, just before ready is reported (pasta mode: the
    /// PID file, detaching from the caller's stdio). An error ends start-up.
    pub before_ready: Option<Box<dyn FnOnce() -> io::Result<()>>>,
    /// A mode's extra work, see [`Service`].
    pub service: Option<Box<dyn Service>>,
    /// `--pcap`: every TAP frame, both ways.
    pub pcap: Option<Pcap>,
}

/// A member's TAP, by switch port.
struct Member {
    tap: Tap,
    /// Frames may be waiting to be read.
    readable: bool,
}

/// The members' TAPs, indexed by switch port.
/// The members' TAPs by switch port, and the `--pcap` capture of frames read and written
/// on any of them.
#[derive(Default)]
pub(crate) struct Members(Vec<Option<Member>>, Option<Pcap>);

impl Members {
    fn insert(&mut self, port: forwarder::PortId, tap: Tap) {
        if self.0.len() <= port {
            self.0.resize_with(port + 1, || None);
        }
        self.0[port] = Some(Member {
            tap,
            readable: true,
        });
    }

    fn get(&self, port: forwarder::PortId) -> Option<&Member> {
        self.0.get(port).and_then(Option::as_ref)
    }
}

impl crate::network::Taps for Members {
    fn add(
        &mut self,
        port: forwarder::PortId,
        tap: Tap,
        registry: &mio::Registry,
    ) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&tap.as_raw_fd()),
            Token(TAPS + port),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.insert(port, tap);
        Ok(())
    }

    fn remove(&mut self, port: forwarder::PortId, registry: &mio::Registry) {
        if let Some(slot) = self.0.get_mut(port) {
            if let Some(m) = slot.take() {
                let _ = registry.deregister(&mut SourceFd(&m.tap.as_raw_fd()));
            }
        }
    }

    fn sink(&mut self) -> &mut dyn FrameSink {
        self
    }

    fn watch_token(&self, port: forwarder::PortId) -> Token {
        Token(WATCHES + port)
    }
}

impl FrameSink for Members {
    fn send_frame(&mut self, port: forwarder::PortId, frame: &[u8]) -> io::Result<()> {
        let Some(m) = self.get(port) else {
            return Ok(());
        };
        m.tap.write(frame)?;
        if let Some(p) = self.1.as_mut() {
            p.record(frame);
        }
        Ok(())
    }
}

/// [`api::FwdControl`] plus what `get_info` answers.
struct InfoControl<'c, 'a, 'io> {
    inner: api::FwdControl<'a, 'io>,
    info: &'c serde_json::Value,
    /// The event loop's waits so far (`get_stats` section `loop`).
    waits: crate::busy_poll::WaitStats,
}

impl api::Control for InfoControl<'_, '_, '_> {
    fn add(
        &mut self,
        proto: Proto,
        host: std::net::SocketAddr,
        guest: Option<std::net::Ipv4Addr>,
        port: u16,
    ) -> Result<PortRule, PortError> {
        self.inner.add(proto, host, guest, port)
    }
    fn remove(&mut self, id: u32) -> Result<(), PortError> {
        self.inner.remove(id)
    }
    fn list(&self) -> Vec<PortRule> {
        self.inner.list()
    }
    fn stats(&self) -> serde_json::Value {
        let mut stats = self.inner.stats();
        let w = self.waits;
        stats["loop"] = serde_json::json!({
            "sleeps": w.sleeps,
            "spin_polls": w.spin_polls,
            "spun_wakeups": w.spun_wakeups,
            "spin_us": w.spin_us,
        });
        stats
    }
    fn info(&self) -> serde_json::Value {
        self.info.clone()
    }
}

/// What was set up, in two lines for `--log-level info`: the guest's addresses and the
/// virtual services, then published ports, API socket and isolation.
fn setup_summary(fwd: &Forwarder, extras: &Extras) -> String {
    let cfg = fwd.config();
    let net = &cfg.nat.net;
    let mut s = format!(
        "guest {}/{} via {}, DNS {}, MTU {}",
        net.guest(),
        net.prefix_len,
        net.gateway(),
        net.dns().map_or("off".to_owned(), |d| d.to_string()),
        cfg.mtu
    );
    if let Some(net6) = &cfg.nat.net6 {
        s += &format!(
            ", IPv6 {}/{} via {}",
            net6.guest(),
            net6.prefix_len,
            net6.gateway()
        );
    }
    if !cfg.nat.host_loopback {
        s += ", no host loopback";
    }
    let ports: Vec<String> = fwd
        .port_rules()
        .iter()
        .map(|r| api::describe_short(&api::rule_json(r)))
        .collect();
    let isolation = &extras.isolation;
    s += &format!(
        "\nports: {}; API socket: {}; sandbox {}, seccomp {}",
        if ports.is_empty() {
            "none".to_owned()
        } else {
            ports.join(", ")
        },
        extras
            .api_socket
            .as_ref()
            .map_or("none".to_owned(), |p| p.display().to_string()),
        if isolation.sandbox { "on" } else { "off" },
        if isolation.seccomp { "on" } else { "off" },
    );
    s
}

/// Blocks the signals the loop handles, so that they arrive on a signalfd. Call before
/// any thread exists; children started later must unblock them before exec.
pub fn signal_fd(run_mode: bool) -> Result<SignalFd, LoopError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGHUP);
    if run_mode {
        for sig in crate::pidns::FORWARDED {
            mask.add(sig);
        }
        mask.add(Signal::SIGCHLD);
    }
    mask.thread_block().map_err(LoopError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(LoopError::Signals)
}

/// Runs until an exit condition; returns the exit status. [`start`], then
/// [`Running::run`].
///
/// # Errors
/// [`LoopError`] when start-up or epoll itself fails.
pub fn run(tap: Tap, fwd: Forwarder, signals: SignalFd, extras: Extras) -> Result<i32, LoopError> {
    start(tap, fwd, signals, extras)?.run()
}

/// The event loop after start-up, ready to [`run`](Running::run).
pub struct Running {
    members: Members,
    /// Serving a usernet network: members come and go.
    network: Option<crate::network::Server>,
    fwd: Forwarder,
    signals: SignalFd,
    extras: Extras,
    poll: Poll,
    api: Option<api::Server>,
}

/// Start-up: registers every descriptor, binds the API socket, publishes the `-p` ports,
/// applies the isolation stages and writes the ready fd.
///
/// # Errors
/// [`LoopError`] for the first step that fails.
pub fn start(
    tap: Tap,
    mut fwd: Forwarder,
    signals: SignalFd,
    mut extras: Extras,
) -> Result<Running, LoopError> {
    let poll = Poll::new().map_err(LoopError::Setup)?;
    let registry = poll.registry();
    let reg = |fd: i32, token, interest| {
        registry
            .register(&mut SourceFd(&fd), token, interest)
            .map_err(LoopError::Setup)
    };
    reg(
        tap.as_raw_fd(),
        Token(TAPS),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let mut members = Members(Vec::new(), extras.pcap.take());
    // The forwarder's first port.
    members.insert(0, tap);
    reg(signals.as_raw_fd(), SIGNAL, Interest::READABLE)?;
    if let Some(fd) = &extras.exit_fd {
        set_nonblocking(fd).map_err(LoopError::Setup)?;
        reg(fd.as_raw_fd(), EXIT_FD, Interest::READABLE)?;
    }
    if let Some(watch) = &extras.watch {
        reg(watch.as_raw_fd(), WATCH, Interest::READABLE)?;
    }
    if let Some(resolv) = &extras.resolv {
        reg(resolv.as_raw_fd(), RESOLV, Interest::READABLE)?;
    }
    let api = match &extras.api_socket {
        Some(path) => Some(api::Server::bind(
            path,
            poll.registry(),
            API,
            API_CLIENTS,
            extras.max_api_clients,
        )?),
        None => None,
    };
    publish(&mut fwd, &extras, poll.registry())?;
    if let Some(service) = extras.service.as_mut() {
        let mut io = Io {
            registry: poll.registry(),
            tap: &mut members,
        };
        let mut ctl = api::FwdControl {
            fwd: &mut fwd,
            io: &mut io,
        };
        service
            .tick(std::time::Instant::now(), &mut ctl, poll.registry())
            .map_err(LoopError::Setup)?;
    }
    crate::isolation::apply(&extras.isolation)?;
    crate::isolation::test_probe();
    if let Some(hook) = extras.before_ready.take() {
        hook().map_err(LoopError::Setup)?;
    }
    log::info!("{}", setup_summary(&fwd, &extras));
    if let Some(fd) = extras.ready_fd.take() {
        let mut f = File::from(fd);
        if let Err(e) = f.write_all(b"1") {
            log::warn!("cannot write to the ready fd: {e}");
        }
    }
    Ok(Running {
        members,
        network: None,
        fwd,
        signals,
        extras,
        poll,
        api,
    })
}

/// Publishes the `-p` rules of `extras` (see [`Publish`]; best-effort rules as
/// [`crate::conf::Publish::best_effort`] says).
fn publish(
    fwd: &mut Forwarder,
    extras: &Extras,
    registry: &mio::Registry,
) -> Result<(), LoopError> {
    // Best-effort options and whether one of their ports was bound.
    let mut best_effort: Vec<(&crate::conf::PastaOption, bool)> = Vec::new();
    for spec in &extras.publish {
        let mut bound = false;
        for ip in spec.host_addrs(extras.publish_ipv6) {
            for (host_port, guest_port) in spec.pairs() {
                let host = std::net::SocketAddr::new(ip, host_port);
                let device = spec.device.as_deref();
                let err =
                    match fwd.add_port_on(spec.proto, host, device, None, guest_port, registry) {
                        Ok(_) => {
                            bound = true;
                            continue;
                        }
                        Err(e) => e,
                    };
                let os_error = err.os_error().and_then(io::Error::raw_os_error);
                let best_effort = spec.option.as_ref().filter(|_| spec.best_effort);
                match (best_effort, err) {
                    (Some(be), _) if matches!(os_error, Some(libc::EMFILE | libc::ENFILE)) => {
                        return Err(LoopError::Descriptors {
                            value: be.value.clone(),
                        });
                    }
                    // Anything else (in use, privileged, no such address) skips the port.
                    (Some(_), e) => {
                        log::debug!("{} {host} not forwarded: {e}", spec.proto.as_str())
                    }
                    // No IPv6 in this kernel: the IPv4 half of an address-less rule still
                    // serves.
                    (None, PortError::Listen { source, .. })
                        if spec.host_ip.is_none()
                            && ip.is_ipv6()
                            && source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                    {
                        log::warn!("no IPv6 on this host: {host} not published");
                    }
                    (None, source) => {
                        if let (Some(o), Some(code)) = (&spec.option, os_error) {
                            return Err(LoopError::PastaBind {
                                port: host_port,
                                why: nix::errno::Errno::from_raw(code).desc().to_owned(),
                                opt: o.opt.clone(),
                                value: o.value.clone(),
                            });
                        }
                        return Err(LoopError::Publish {
                            spec: format!("{} {host} -> {guest_port}", spec.proto.as_str()),
                            source,
                        });
                    }
                }
            }
        }
        if let Some(be) = spec.option.as_ref().filter(|_| spec.best_effort) {
            match best_effort.iter_mut().find(|(b, _)| *b == be) {
                Some((_, any)) => *any |= bound,
                None => best_effort.push((be, bound)),
            }
        }
    }
    if let Some((be, _)) = best_effort.iter().find(|(_, any)| !any) {
        return Err(LoopError::NoneBound {
            opt: be.opt.clone(),
            value: be.value.clone(),
        });
    }
    Ok(())
}

/// Start-up of a network's serving process: no member yet; the network's socket serves
/// joins and the API.
///
/// # Errors
/// [`LoopError::Setup`] when a registration fails.
pub fn start_network(
    server: crate::network::Server,
    fwd: Forwarder,
    signals: SignalFd,
) -> Result<Running, LoopError> {
    let poll = Poll::new().map_err(LoopError::Setup)?;
    let registry = poll.registry();
    for (fd, token) in [(signals.as_raw_fd(), SIGNAL), (server.fd(), NETWORK)] {
        registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
            .map_err(LoopError::Setup)?;
    }
    Ok(Running {
        members: Members::default(),
        network: Some(server),
        fwd,
        signals,
        extras: Extras {
            exit_fd: None,
            ready_fd: None,
            watch: None,
            child: None,
            isolation: crate::isolation::Isolation::default(),
            api_socket: None,
            info: serde_json::Value::Null,
            publish: Vec::new(),
            publish_ipv6: false,
            max_api_clients: 64,
            busy_poll: std::time::Duration::from_micros(50),
            resolv: None,
            before_ready: None,
            service: None,
            pcap: None,
        },
        poll,
        api: None,
    })
}

impl Running {
    /// Runs until an exit condition; returns the exit status.
    ///
    /// # Errors
    /// [`LoopError::Poll`] when epoll itself fails.
    pub fn run(self) -> Result<i32, LoopError> {
        let Running {
            mut members,
            mut network,
            mut fwd,
            signals,
            mut extras,
            mut poll,
            mut api,
        } = self;
        let start = std::time::Instant::now();
        let clock = |t: std::time::Instant| {
            smoltcp::time::Instant::from_micros(t.duration_since(start).as_micros() as i64)
        };
        let mut events = Events::with_capacity(1024);
        let mut frame = vec![0u8; RX_BUFFER];
        let mut tap_blocked = false;
        let mut waiter = BusyPoll::new(extras.busy_poll);
        let mut bulk = BulkMeter::new(start);

        loop {
            let any_readable = members.0.iter().flatten().any(|m| m.readable);
            let timeout = if any_readable {
                Some(std::time::Duration::ZERO)
            } else {
                let now = clock(std::time::Instant::now());
                // Not `at - now`: smoltcp's difference of instants is absolute, not saturating.
                let flows = fwd.poll_timeout().map(|at| {
                    let us = at.total_micros().saturating_sub(now.total_micros());
                    std::time::Duration::from_micros(us.max(0).unsigned_abs())
                });
                let api_due = api
                    .as_mut()
                    .and_then(|a| a.expire(std::time::Instant::now(), poll.registry()))
                    .map(|at| at.saturating_duration_since(std::time::Instant::now()));
                let child_due = extras
                    .child
                    .as_ref()
                    .and_then(Supervisor::poll_timeout)
                    .map(|at| at.saturating_duration_since(std::time::Instant::now()));
                let resolv_due = extras
                    .resolv
                    .as_ref()
                    .and_then(|r| r.poll_timeout())
                    .map(|at| at.saturating_duration_since(std::time::Instant::now()));
                let network_due = network
                    .as_mut()
                    .and_then(|s| {
                        let wall = std::time::Instant::now();
                        let clients = s.expire(wall, poll.registry());
                        clients.into_iter().chain(s.poll_timeout()).min()
                    })
                    .map(|at| at.saturating_duration_since(std::time::Instant::now()));
                let service_due = extras
                    .service
                    .as_ref()
                    .and_then(|s| s.next_tick())
                    .map(|at| at.saturating_duration_since(std::time::Instant::now()));
                [
                    flows,
                    api_due,
                    child_due,
                    resolv_due,
                    network_due,
                    service_due,
                ]
                .into_iter()
                .flatten()
                .min()
            };
            // A stream has buffers on both sides and gains nothing from a faster wake-up,
            // so it is not spun for.
            let c = fwd.counters();
            let relayed = extras.service.as_ref().map_or(0, |s| s.bytes_relayed());
            let spin = !bulk.is_bulk(std::time::Instant::now(), c.rx_bytes + c.tx_bytes + relayed);
            if let Err(e) = waiter.wait(&mut poll, &mut events, timeout, spin) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(LoopError::Poll(e));
            }
            let now = clock(std::time::Instant::now());
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                match event.token() {
                    Token(t) if (WATCHES..NETWORK_CLIENTS).contains(&t) => {
                        if let Some(server) = network.as_mut() {
                            let mut host = crate::network::Host {
                                registry: poll.registry(),
                                taps: &mut members,
                            };
                            server.watch_event(&mut fwd, &mut host, t - WATCHES);
                        }
                    }
                    Token(t) if (TAPS..WATCHES).contains(&t) => {
                        if let Some(Some(m)) = members.0.get_mut(t - TAPS) {
                            m.readable |= readable;
                        }
                        if event.is_writable() {
                            tap_blocked = false;
                        }
                    }
                    SIGNAL => {
                        if let Some(code) = handle_signals(&signals, extras.child.as_mut()) {
                            return Ok(code);
                        }
                    }
                    EXIT_FD => {
                        if exit_fd_closed(extras.exit_fd.as_ref()) {
                            log::info!("exit fd closed: exiting");
                            return Ok(0);
                        }
                    }
                    WATCH => {
                        if extras.watch.as_mut().is_some_and(|w| w.target_gone()) {
                            log::info!("the namespace went away: exiting");
                            return Ok(0);
                        }
                    }
                    RESOLV => {
                        if let Some(r) = extras.resolv.as_mut() {
                            r.handle_ready(std::time::Instant::now());
                        }
                    }
                    NETWORK => {
                        if let Some(server) = network.as_mut() {
                            server.accept(poll.registry());
                        }
                    }
                    token if network.as_ref().is_some_and(|s| s.owns(token)) => {
                        if let Some(server) = network.as_mut() {
                            let mut host = crate::network::Host {
                                registry: poll.registry(),
                                taps: &mut members,
                            };
                            server.handle_client(token, &mut fwd, &mut host);
                        }
                    }
                    token if extras.service.as_ref().is_some_and(|s| s.owns(token)) => {
                        if let Some(s) = extras.service.as_mut() {
                            s.handle(token, poll.registry());
                        }
                    }
                    token if api.as_ref().is_some_and(|a| a.owns(token)) => {
                        if let Some(a) = api.as_mut() {
                            let mut io = Io {
                                registry: poll.registry(),
                                tap: &mut members,
                            };
                            let mut ctl = InfoControl {
                                inner: api::FwdControl {
                                    fwd: &mut fwd,
                                    io: &mut io,
                                },
                                info: &extras.info,
                                waits: waiter.stats(),
                            };
                            a.handle(token, poll.registry(), &mut ctl);
                        }
                    }
                    token => {
                        let mut io = Io {
                            registry: poll.registry(),
                            tap: &mut members,
                        };
                        fwd.handle_ready(
                            now,
                            token,
                            readable,
                            writable,
                            event.is_read_closed(),
                            &mut io,
                        )
                    }
                }
            }
            for port in 0..members.0.len() {
                if !members.get(port).is_some_and(|m| m.readable) {
                    continue;
                }
                for _ in 0..TAP_BATCH {
                    let Some(m) = members.get(port) else {
                        break;
                    };
                    match m.tap.read(&mut frame) {
                        Ok(n) => {
                            if let Some(p) = members.1.as_mut() {
                                p.record(&frame[..n]);
                            }
                            let mut io = Io {
                                registry: poll.registry(),
                                tap: &mut members,
                            };
                            fwd.handle_port_frame(now, port, &frame[..n], &mut io);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Some(Some(m)) = members.0.get_mut(port) {
                                m.readable = false;
                            }
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // EBADFD/EIO: the device was unregistered with its namespace.
                            let Some(server) = network.as_mut() else {
                                log::info!("the TAP device went away ({e}): exiting");
                                return Ok(0);
                            };
                            log::info!("the TAP of port {port} went away ({e})");
                            let mut host = crate::network::Host {
                                registry: poll.registry(),
                                taps: &mut members,
                            };
                            server.port_gone(&mut fwd, &mut host, port);
                            break;
                        }
                    }
                }
            }
            if let Some(child) = extras.child.as_mut() {
                child.handle_timeout(std::time::Instant::now());
            }
            let mut io = Io {
                registry: poll.registry(),
                tap: &mut members,
            };
            if let Some(list) = extras
                .resolv
                .as_mut()
                .and_then(|r| r.poll(std::time::Instant::now()))
            {
                fwd.set_nameservers(list, &mut io);
            }
            fwd.handle_timeouts(now, &mut io);
            fwd.poll_flows(now, &mut io);
            for conn in fwd.handoffs() {
                if let Some(service) = extras.service.as_mut() {
                    service.take_connection(conn, poll.registry());
                }
            }
            if let Some(service) = extras.service.as_mut() {
                let wall = std::time::Instant::now();
                if service.next_tick().is_some_and(|at| at <= wall) {
                    let mut ctl = api::FwdControl {
                        fwd: &mut fwd,
                        io: &mut io,
                    };
                    if let Err(e) = service.tick(wall, &mut ctl, poll.registry()) {
                        log::warn!("{e}");
                    }
                }
            }
            if !tap_blocked {
                tap_blocked = !fwd.flush(&mut members);
            }
            if let Some(server) = network.as_mut() {
                let now = std::time::Instant::now();
                server.expire(now, poll.registry());
                if server.should_exit(now) {
                    log::info!("network {}: no members left, exiting", server.def().name);
                    return Ok(0);
                }
            }
            if let Some(p) = members.1.as_mut() {
                p.flush();
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Drains the exit pipe; true at end of file (data written to it is ignored).
fn exit_fd_closed(fd: Option<&OwnedFd>) -> bool {
    let Some(fd) = fd else {
        return false;
    };
    let Ok(dup) = fd.try_clone() else {
        return false;
    };
    let mut f = File::from(dup);
    let mut buf = [0u8; 64];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Handles pending signals; `Some(status)` when the loop should end.
pub(crate) fn handle_signals(
    signals: &SignalFd,
    mut child: Option<&mut Supervisor>,
) -> Option<i32> {
    while let Ok(Some(info)) = signals.read_signal() {
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        match (sig, child.as_deref_mut()) {
            (Signal::SIGCHLD, Some(child)) => {
                if let Some(code) = child.try_reap() {
                    return Some(code);
                }
            }
            (Signal::SIGCHLD, None) => {}
            (sig, Some(child)) => {
                // Run mode: the command decides; pass the signal on.
                child.handle_signal(sig, info.ssi_code, std::time::Instant::now());
            }
            (sig, None) => {
                log::info!("{sig}: exiting");
                return Some(0);
            }
        }
    }
    None
}
