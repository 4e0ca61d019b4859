//! The one event loop: the TAP, the flows' host sockets, signals and lifecycle fds.
//!
//! # Theory of operation
//!
//! One thread, one mio `Poll` (epoll, edge-triggered) for the members' TAPs (one per
//! switch port; a single namespace is a network of one) and the forwarder's host sockets
//! ([`crate::host::Sockets`], registered under their flow ids). Per turn:
//! wait (until the forwarder's next timer, or not at all while a TAP still has frames;
//! spinning first while traffic is interactive, see [`crate::busy_poll`]), note
//! readiness, read a bounded batch of frames from each readable TAP (fairness with the
//! other members and the host sockets; the rest is read next turn), then let the
//! forwarder run its timers, relay every flow touched in this turn, write what it
//! queued for the members, and only then close the streams it closed (the guest does not
//! wait for their FINs and RSTs). smoltcp's clock is fed from a
//! monotonic clock (`std::time::Instant`), never the wall clock.
//!
//! Everything else the loop serves is a [`Subsystem`] with tokens of its own (signals, the
//! exit pipe, the attach target, the resolv.conf watch, the API socket, a network's control
//! socket, pasta's ports): a token says by arithmetic whether it is a flow's, a TAP's or a
//! subsystem's ([`Source`]), and every subsystem is called the same way.
//!
//! Start-up ([`start`]) starts the subsystems (the API socket is bound), publishes the `-p`
//! ports and applies the isolation stages; only once all of that worked does the caller
//! release run mode's command and call [`Running::run`], so that a failure stops usernet
//! before the command ever runs.
//!
//! Exits: SIGTERM/SIGINT (attach mode) or the `-e` pipe's end of file: status 0; the
//! attach target or the TAP going away: status 0; in run mode, the command's exit (signals
//! are passed on to it, see [`crate::pidns`]).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use forwarder::port::PortError;
use forwarder::{Forwarder, FrameSink};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::api;
use crate::busy_poll::{BulkMeter, BusyPoll};
use crate::conf::Publish;
use crate::host::{Sockets, PEER_TOKENS};
use crate::netns::TargetWatch;
use crate::pcap::Pcap;
use crate::pidns::Supervisor;
use crate::splice::End;
use crate::subsystem::{self, Cx, Next, Subsystem};
use crate::sys::tap::Tap;

/// TAP tokens: this plus the switch port, above every flow token (a flow's id, or
/// [`PEER_TOKENS`] plus it for a spliced pair's second socket).
const TAPS: usize = 1 << 32;
/// Subsystem tokens: subsystem `i` has [`subsystem::TOKENS`] of them from
/// `SUBSYSTEMS + i * subsystem::TOKENS` up.
const SUBSYSTEMS: usize = 1 << 40;

/// Who a readiness event is for, from its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A flow's host socket or a published port's listener, by flow id (its token,
    /// [`crate::host`]), and which socket of a spliced pair it is (`A` for all others;
    /// `B` from [`PEER_TOKENS`] up).
    Flow(usize, End),
    /// A member's TAP, by switch port.
    Tap(forwarder::PortId),
    /// Subsystem `.0`'s source `.1` (its token minus its base).
    Sub(usize, usize),
}

impl Source {
    fn of(token: Token) -> Source {
        match token.0 {
            t if t >= SUBSYSTEMS => {
                let rel = t - SUBSYSTEMS;
                Source::Sub(rel / subsystem::TOKENS, rel % subsystem::TOKENS)
            }
            t if t >= TAPS => Source::Tap(t - TAPS),
            t if t >= PEER_TOKENS => Source::Flow(t - PEER_TOKENS, End::B),
            t => Source::Flow(t, End::A),
        }
    }

    /// The first token of subsystem `i`.
    fn base(i: usize) -> usize {
        SUBSYSTEMS + i * subsystem::TOKENS
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
    /// A part of the loop could not start; its own error.
    #[error(transparent)]
    Start(subsystem::StartError),
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
    /// A mode's own parts of the loop (pasta's ports), started in this order after the
    /// `-p` rules are published.
    pub services: Vec<Box<dyn Subsystem>>,
    /// The helper that opened the TAP ([`crate::netns::open_tap`]): reaped once ready is
    /// reported, so that ready does not wait for its exit.
    pub helper: Option<crate::netns::Helper>,
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

impl subsystem::Taps for Members {
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
    fwd: Forwarder,
    /// The forwarder's host sockets.
    sockets: Sockets,
    /// Every other part of the loop; subsystem `i` owns the tokens of [`Source::Sub`]`(i, _)`.
    subs: Vec<Box<dyn Subsystem>>,
    poll: Poll,
    /// What `get_info` answers.
    info: serde_json::Value,
    /// `--busy-poll`.
    busy_poll: std::time::Duration,
}

impl Running {
    fn new(
        members: Members,
        fwd: Forwarder,
        info: serde_json::Value,
    ) -> Result<Running, LoopError> {
        let poll = Poll::new().map_err(LoopError::Setup)?;
        let registry = poll.registry().try_clone().map_err(LoopError::Setup)?;
        Ok(Running {
            members,
            fwd,
            sockets: Sockets::new(registry),
            subs: Vec::new(),
            poll,
            info,
            busy_poll: std::time::Duration::from_micros(50),
        })
    }

    /// Adds and starts a subsystem (its sources registered under its tokens).
    fn add(&mut self, mut sub: Box<dyn Subsystem>) -> Result<(), LoopError> {
        let base = Source::base(self.subs.len());
        let mut cx = Cx {
            fwd: &mut self.fwd,
            registry: self.poll.registry(),
            sockets: &mut self.sockets,
            taps: &mut self.members,
            info: &self.info,
            waits: crate::busy_poll::WaitStats::default(),
        };
        sub.start(base, &mut cx).map_err(LoopError::Start)?;
        self.subs.push(sub);
        Ok(())
    }
}

/// Start-up: registers every descriptor, binds the API socket, publishes the `-p` ports,
/// applies the isolation stages and writes the ready fd.
///
/// # Errors
/// [`LoopError`] for the first step that fails.
pub fn start(
    tap: Tap,
    fwd: Forwarder,
    signals: SignalFd,
    mut extras: Extras,
) -> Result<Running, LoopError> {
    let mut members = Members(Vec::new(), extras.pcap.take());
    // The forwarder's first port.
    members.insert(0, tap);
    let mut running = Running::new(members, fwd, extras.info.clone())?;
    running.busy_poll = extras.busy_poll;
    if let Some(m) = running.members.get(0) {
        running
            .poll
            .registry()
            .register(
                &mut SourceFd(&m.tap.as_raw_fd()),
                Token(TAPS),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(LoopError::Setup)?;
    }
    running.add(Box::new(subsystem::Signals::new(
        signals,
        extras.child.take(),
    )))?;
    if let Some(fd) = extras.exit_fd.take() {
        running.add(Box::new(subsystem::ExitFd(fd)))?;
    }
    if let Some(watch) = extras.watch.take() {
        running.add(Box::new(subsystem::Target(watch)))?;
    }
    if let Some(resolv) = extras.resolv.take() {
        running.add(Box::new(subsystem::Resolv(resolv)))?;
    }
    if let Some(path) = &extras.api_socket {
        let api = api::Socket::new(path.clone(), extras.max_api_clients);
        running.add(Box::new(api))?;
    }
    // Every `-p` port must bind, but the IPv6 half of an address-less rule on a host
    // without IPv6.
    for spec in &extras.publish {
        let (fwd, sockets) = (&mut running.fwd, &mut running.sockets);
        publish(
            fwd,
            sockets,
            spec,
            extras.publish_ipv6,
            |host, guest_port, e| match e {
                PortError::Listen { source, .. }
                    if spec.host_ip.is_none()
                        && host.is_ipv6()
                        && source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    log::warn!("no IPv6 on this host: {host} not published");
                    Ok(())
                }
                source => Err(LoopError::Publish {
                    spec: format!("{} {host} -> {guest_port}", spec.proto.as_str()),
                    source,
                }),
            },
        )?;
    }
    for service in std::mem::take(&mut extras.services) {
        running.add(service)?;
    }
    {
        let Running {
            members,
            fwd,
            sockets,
            subs,
            poll,
            info,
            ..
        } = &mut running;
        for sub in subs.iter_mut() {
            let mut cx = Cx {
                fwd,
                registry: poll.registry(),
                sockets,
                taps: members,
                info,
                waits: crate::busy_poll::WaitStats::default(),
            };
            sub.before_ready(&mut cx).map_err(LoopError::Start)?;
        }
    }
    crate::isolation::apply(&extras.isolation)?;
    crate::isolation::test_probe();
    if let Some(hook) = extras.before_ready.take() {
        hook().map_err(LoopError::Setup)?;
    }
    log::info!("{}", setup_summary(&running.fwd, &extras));
    if let Some(fd) = extras.ready_fd.take() {
        let mut f = File::from(fd);
        if let Err(e) = f.write_all(b"1") {
            log::warn!("cannot write to the ready fd: {e}");
        }
    }
    drop(extras.helper.take());
    Ok(running)
}

/// Publishes `spec`'s listeners (an address-less rule on `[::]` too when `ipv6`); returns
/// whether any was bound. A listener that cannot be had goes to `failed`, with its host
/// address and container port: `Ok` skips it, `Err` ends publishing with that error.
/// Every front end publishes this way, with its own rules for failures.
pub(crate) fn publish<E>(
    fwd: &mut Forwarder,
    sockets: &mut Sockets,
    spec: &Publish,
    ipv6: bool,
    mut failed: impl FnMut(std::net::SocketAddr, u16, PortError) -> Result<(), E>,
) -> Result<bool, E> {
    let mut bound = false;
    for ip in spec.host_addrs(ipv6) {
        for (host_port, guest_port) in spec.pairs() {
            let host = std::net::SocketAddr::new(ip, host_port);
            let device = spec.device.as_deref();
            match fwd.add_port_on(spec.proto, host, device, None, guest_port, sockets) {
                Ok(_) => bound = true,
                Err(e) => failed(host, guest_port, e)?,
            }
        }
    }
    Ok(bound)
}

/// Start-up of a network's serving process: no member yet; the network's socket serves
/// joins and the API.
///
/// # Errors
/// [`LoopError`] when a registration fails.
pub fn start_network(
    server: crate::network::Server,
    fwd: Forwarder,
    signals: SignalFd,
) -> Result<Running, LoopError> {
    let mut running = Running::new(Members::default(), fwd, serde_json::Value::Null)?;
    running.add(Box::new(subsystem::Signals::new(signals, None)))?;
    running.add(Box::new(server))?;
    Ok(running)
}

impl Running {
    /// Runs until an exit condition; returns the exit status.
    ///
    /// # Errors
    /// [`LoopError::Poll`] when epoll itself fails.
    pub fn run(self) -> Result<i32, LoopError> {
        let Running {
            mut members,
            mut fwd,
            mut sockets,
            mut subs,
            mut poll,
            info,
            busy_poll,
        } = self;
        let start = std::time::Instant::now();
        let clock = |t: std::time::Instant| {
            smoltcp::time::Instant::from_micros(t.duration_since(start).as_micros() as i64)
        };
        let mut events = Events::with_capacity(1024);
        let mut frame = vec![0u8; RX_BUFFER];
        let mut tap_blocked = false;
        let mut waiter = BusyPoll::new(busy_poll);
        let mut bulk = BulkMeter::new(start);
        // One subsystem call: `$f(sub, cx)` with a fresh context.
        macro_rules! cx {
            () => {
                Cx {
                    fwd: &mut fwd,
                    registry: poll.registry(),
                    sockets: &mut sockets,
                    taps: &mut members,
                    info: &info,
                    waits: waiter.stats(),
                }
            };
        }

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
                let mut due = flows;
                for sub in subs.iter_mut() {
                    let at = sub.poll_timeout(&mut cx!());
                    let wait = at.map(|at| at.saturating_duration_since(std::time::Instant::now()));
                    due = due.into_iter().chain(wait).min();
                }
                due
            };
            // A stream has buffers on both sides and gains nothing from a faster wake-up,
            // so it is not spun for.
            let c = fwd.counters();
            let moved = c.rx_bytes + c.tx_bytes + c.splice_bytes;
            let spin = !bulk.is_bulk(std::time::Instant::now(), moved);
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
                match Source::of(event.token()) {
                    Source::Tap(port) => {
                        if let Some(Some(m)) = members.0.get_mut(port) {
                            m.readable |= readable;
                        }
                        if event.is_writable() {
                            tap_blocked = false;
                        }
                    }
                    Source::Sub(i, local) => {
                        let Some(sub) = subs.get_mut(i) else { continue };
                        if let Next::Exit(code) = sub.handle(local, &mut cx!()) {
                            return Ok(code);
                        }
                    }
                    Source::Flow(id, _) if sockets.closed_this_turn(id) => {}
                    Source::Flow(id, end) => {
                        let ready = forwarder::Ready {
                            readable,
                            writable,
                            hup: event.is_read_closed(),
                            error: event.is_error(),
                            urgent: event.is_priority(),
                        };
                        sockets.note_splice(id, end, &ready);
                        let mut io = sockets.io(&mut members);
                        fwd.handle_ready(now, id, ready, &mut io)
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
                            let mut io = sockets.io(&mut members);
                            fwd.handle_port_frame(now, port, &mut frame[..n], &mut io);
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
                            let mut taken = false;
                            for sub in subs.iter_mut() {
                                if sub.tap_gone(port, &mut cx!()) {
                                    taken = true;
                                    break;
                                }
                            }
                            if !taken {
                                log::info!("the TAP device went away ({e}): exiting");
                                return Ok(0);
                            }
                            log::info!("the TAP of port {port} went away ({e})");
                            break;
                        }
                    }
                }
            }
            let mut io = sockets.io(&mut members);
            fwd.handle_timeouts(now, &mut io);
            fwd.poll_flows(now, &mut io);
            for sub in subs.iter_mut() {
                if let Next::Exit(code) = sub.turn(&mut cx!()) {
                    return Ok(code);
                }
            }
            if !tap_blocked {
                tap_blocked = !fwd.flush(&mut members);
            }
            sockets.end_turn();
            if let Some(p) = members.1.as_mut() {
                p.flush();
            }
        }
    }
}
