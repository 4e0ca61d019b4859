//! pasta's dynamic ports: `-t/-u auto` and `-T/-U` (namespace loopback to host loopback).
//!
//! # Theory of operation
//!
//! **`-t/-u auto`**: once before ready and then every [`SCAN_INTERVAL`], the
//! [`Agent`] lists the sockets listening in the namespace; every port bound there to a
//! non-loopback address (and not excluded with `~`, nor already forwarded explicitly) gets
//! a published-port rule on the host (`0.0.0.0` and, unless `-4`, `::`), and a rule whose
//! listener went away is removed. A host port that cannot be bound (in use) is skipped
//! until the next scan. This is how pasta follows a container's servers.
//!
//! **`-T/-U`**: the agent binds sockets on the namespace's loopback (`127.0.0.1` and, if
//! the namespace has IPv6, `::1`) and hands them over; connections and datagrams on them
//! are relayed to the same (or the translated) port on the host's loopback by plain socket
//! pairs in this process ([`Relay`]), not through the TAP. With `auto`, the ports are those
//! the host listens on (loopback or wildcard, read from this process's own
//! `/proc/net`), rescanned like `-t auto`, minus the ports usernet itself publishes.
//!
//! **Loopback clients of `-t` and `-u` ports** (pasta's "splice" path): a connection to
//! a forwarded TCP port from the host's loopback does not cross the TAP. The forwarder hands it over
//! ([`forwarder::Config::loopback_handoff`]), the agent opens a socket inside the
//! namespace connecting to the namespace's own address (with `--host-lo-to-ns-lo`: its
//! loopback address) at the target port, and the two are relayed here. As in pasta, the
//! namespace's server sees a local client (its own address, or `127.0.0.1`/`::1`), and a
//! server bound only to the namespace's loopback is reached only with
//! `--host-lo-to-ns-lo`. Other clients keep the TAP path and their real addresses.
//! Datagrams of a loopback client of a `-u` port go the same way: the agent makes a UDP
//! socket in the namespace bound to the client's port (as pasta keeps it; any port if it
//! is taken) and connected to the target; the namespace's replies go back through the
//! rule's own socket. Such an association ends after [`UDP_IDLE`] without traffic.
//!
//! **Relaying TCP** moves bytes with `splice(2)` through one pipe per direction: the data
//! never enters this process's memory, as in pasta. A side reads into its pipe only once
//! the pipe is empty, so the pipe's fill is known without asking the kernel.
//!
//! Limits: at most [`MAX_RELAYS`] relayed TCP connections and UDP associations; beyond,
//! new ones are refused (closed). Relayed UDP associations idle for [`UDP_IDLE`] end.
//! This table is the relay's own, not the forwarder's flow table: README's Layout says
//! why, and what moving it there needs.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forwarder::port::Proto;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::agent::{parse_proc_net, Agent, Listening};
use super::opts::{PastaOpts, PortSpec};
use super::PastaRunError;
use crate::api::Control;
use crate::host::NsOpener;
use crate::netns::Target;
use crate::splice::Pair;
use crate::subsystem::{Cx, Next, StartError, Subsystem};

/// How often `auto` rescans.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Most relayed connections and associations at once.
pub const MAX_RELAYS: usize = 4096;
/// Relayed UDP associations end after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(180);
/// One source of the relay.
enum Entry {
    /// A `-T` listener in the namespace; connections go to `to` on the host.
    TcpListen { sock: TcpListener, to: SocketAddr },
    /// A relayed `-T` connection, both sockets registered under its key.
    TcpPair(Box<Pair>),
    /// A `-U` socket in the namespace; datagrams go to `to` on the host.
    UdpListen { sock: UdpSocket, to: SocketAddr },
    /// A host socket of a UDP association: replies go back through `listener` to
    /// `client`.
    UdpAssoc {
        sock: UdpSocket,
        listener: usize,
        client: SocketAddr,
        last: Instant,
    },
}

/// The relay of `-T/-U` and of loopback clients of `-t/-u` ports.
struct Relay {
    /// Receive buffer of the UDP relays (one datagram at a time).
    buf: Box<[u8]>,
    entries: Slab<Entry>,
    /// UDP associations by (listener, client).
    assoc: BTreeMap<(usize, SocketAddr), usize>,
    /// `-T/-U` listeners by (proto, namespace port), for `auto`.
    listeners: BTreeMap<(Proto, u16), Vec<usize>>,
    /// Bytes written to either side so far.
    moved: u64,
    /// Relayed `-T` connections (each counts as two relays, one per socket).
    pairs: usize,
    /// The subsystem's first token: entry `k` is registered as `base + k`.
    base: usize,
}

impl Default for Relay {
    fn default() -> Relay {
        Relay {
            buf: vec![0u8; 65536].into_boxed_slice(),
            entries: Slab::new(),
            assoc: BTreeMap::new(),
            listeners: BTreeMap::new(),
            moved: 0,
            pairs: 0,
            base: 0,
        }
    }
}

impl Relay {
    fn relays(&self) -> usize {
        self.entries.len() + self.pairs
    }

    fn add_listener(
        &mut self,
        proto: Proto,
        fd: OwnedFd,
        port: u16,
        to: SocketAddr,
        registry: &Registry,
    ) -> io::Result<()> {
        let std_fd = fd;
        let entry = match proto {
            Proto::Tcp => Entry::TcpListen {
                sock: TcpListener::from_std(std::net::TcpListener::from(std_fd)),
                to,
            },
            Proto::Udp => Entry::UdpListen {
                sock: UdpSocket::from_std(std::net::UdpSocket::from(std_fd)),
                to,
            },
        };
        let key = self.entries.insert(entry);
        let token = Token(self.base + key);
        let res = match &mut self.entries[key] {
            Entry::TcpListen { sock, .. } => registry.register(sock, token, Interest::READABLE),
            Entry::UdpListen { sock, .. } => registry.register(sock, token, Interest::READABLE),
            _ => Ok(()),
        };
        if let Err(e) = res {
            self.entries.remove(key);
            return Err(e);
        }
        self.listeners.entry((proto, port)).or_default().push(key);
        Ok(())
    }

    fn remove_listeners(&mut self, proto: Proto, port: u16, registry: &Registry) {
        for key in self.listeners.remove(&(proto, port)).unwrap_or_default() {
            if let Some(entry) = self.entries.try_remove(key) {
                match entry {
                    Entry::TcpListen { mut sock, .. } => {
                        let _ = registry.deregister(&mut sock);
                    }
                    Entry::UdpListen { mut sock, .. } => {
                        let _ = registry.deregister(&mut sock);
                    }
                    _ => {}
                }
            }
        }
    }

    fn handle(&mut self, key: usize, registry: &Registry) {
        match self.entries.get(key) {
            Some(Entry::TcpListen { .. }) => self.accept(key, registry),
            Some(Entry::TcpPair(_)) => self.pump_pair(key),
            Some(Entry::UdpListen { .. }) => self.udp_from_ns(key, registry),
            Some(Entry::UdpAssoc { .. }) => self.udp_from_host(key),
            None => {}
        }
    }

    fn accept(&mut self, key: usize, registry: &Registry) {
        loop {
            let Some(Entry::TcpListen { sock, to }) = self.entries.get(key) else {
                return;
            };
            let to = *to;
            let (client, _) = match sock.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("-T accept: {e}");
                    return;
                }
            };
            if self.relays() + 2 > MAX_RELAYS {
                log::debug!("relay table full: connection to {to} refused");
                continue;
            }
            let host = match TcpStream::connect(to) {
                Ok(h) => h,
                Err(e) => {
                    log::debug!("-T connect to {to}: {e}");
                    continue;
                }
            };
            if let Err(e) = self.add_pair(client, host, registry) {
                log::debug!("-T relay to {to}: {e}");
            }
        }
    }

    /// Relays `a` and `b` to each other until both ends are done.
    fn add_pair(&mut self, a: TcpStream, b: TcpStream, registry: &Registry) -> io::Result<()> {
        let mut pair = Box::new(Pair::new(a, b)?);
        let key = self.entries.vacant_key();
        let rw = Interest::READABLE | Interest::WRITABLE;
        for sock in pair.sockets() {
            registry.register(sock, Token(self.base + key), rw)?;
        }
        self.entries.insert(Entry::TcpPair(pair));
        self.pairs += 1;
        Ok(())
    }

    /// Moves bytes both ways in pair `key`; closes it when done.
    fn pump_pair(&mut self, key: usize) {
        let Some(Entry::TcpPair(pair)) = self.entries.get_mut(key) else {
            return;
        };
        let (moved, done) = pair.pump();
        self.moved += moved as u64;
        if done {
            // Closing the sockets takes them out of the epoll set.
            self.entries.remove(key);
            self.pairs -= 1;
        }
    }

    fn udp_from_ns(&mut self, key: usize, registry: &Registry) {
        loop {
            let Some(Entry::UdpListen { sock, to }) = self.entries.get(key) else {
                return;
            };
            let to = *to;
            let (n, client) = match sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return,
            };
            let assoc = match self.assoc.get(&(key, client)) {
                Some(&a) => a,
                None => {
                    if self.relays() >= MAX_RELAYS {
                        continue;
                    }
                    let bind: SocketAddr = if to.is_ipv6() {
                        (Ipv6Addr::LOCALHOST, 0).into()
                    } else {
                        (Ipv4Addr::LOCALHOST, 0).into()
                    };
                    let Ok(mut sock) = UdpSocket::bind(bind) else {
                        continue;
                    };
                    if sock.connect(to).is_err() {
                        continue;
                    }
                    let a = self.entries.vacant_key();
                    if registry
                        .register(&mut sock, Token(self.base + a), Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.entries.insert(Entry::UdpAssoc {
                        sock,
                        listener: key,
                        client,
                        last: Instant::now(),
                    });
                    self.assoc.insert((key, client), a);
                    a
                }
            };
            if let Some(Entry::UdpAssoc { sock, last, .. }) = self.entries.get_mut(assoc) {
                *last = Instant::now();
                let _ = sock.send(&self.buf[..n]);
                self.moved += n as u64;
            }
        }
    }

    fn udp_from_host(&mut self, key: usize) {
        loop {
            let Some(Entry::UdpAssoc {
                sock,
                listener,
                client,
                ..
            }) = self.entries.get(key)
            else {
                return;
            };
            let (listener, client) = (*listener, *client);
            let n = match sock.recv(&mut self.buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            if let Some(Entry::UdpListen { sock, .. }) = self.entries.get(listener) {
                let _ = sock.send_to(&self.buf[..n], client);
                self.moved += n as u64;
            }
            if let Some(Entry::UdpAssoc { last, .. }) = self.entries.get_mut(key) {
                *last = Instant::now();
            }
        }
    }

    fn expire(&mut self, now: Instant, registry: &Registry) {
        let stale: Vec<usize> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::UdpAssoc { last, .. } if now.duration_since(*last) > UDP_IDLE => Some(k),
                _ => None,
            })
            .collect();
        for k in stale {
            if let Some(Entry::UdpAssoc {
                mut sock,
                listener,
                client,
                ..
            }) = self.entries.try_remove(k)
            {
                self.assoc.remove(&(listener, client));
                let _ = registry.deregister(&mut sock);
            }
        }
    }
}

/// The `auto` state of `-t` or `-u`: forwarded port -> its rule ids.
#[derive(Default)]
struct AutoHost {
    spec: PortSpec,
    rules: BTreeMap<u16, Vec<u32>>,
}

/// pasta's dynamic ports as an event-loop [`Service`].
pub struct PastaPorts {
    agent: Rc<Agent>,
    v4_only: bool,
    v6_only: bool,
    ns_ipv6: bool,
    /// `-t/-u auto`.
    auto_tcp: Option<AutoHost>,
    auto_udp: Option<AutoHost>,
    /// Explicit host ports of `-t/-u`, never taken over by `auto`.
    explicit: BTreeSet<(Proto, u16)>,
    /// `-T/-U auto` specs (exclusions).
    auto_tcp_ns: Option<PortSpec>,
    auto_udp_ns: Option<PortSpec>,
    /// Explicit `-T/-U` ranges, bound at the first tick.
    ns_static: Vec<(Proto, super::opts::PortRange)>,
    relay: Relay,
    next: Option<Instant>,
    first: bool,
    /// Where loopback clients of `-t/-u` ports go in the namespace.
    splicer: Splicer,
}

/// A spec that is `auto` (given so, or not given at all: pasta's default).
fn is_auto(spec: &PortSpec) -> bool {
    spec.auto || !spec.given
}

impl PastaPorts {
    /// The service for `opts` in a namespace with addresses `ns_v4` and `ns_v6`, or
    /// `None` when there is nothing to do (no port forwarded either way, nothing
    /// dynamic).
    ///
    /// # Errors
    /// The agent cannot be started in `target`'s namespaces.
    pub fn new(
        opts: &PastaOpts,
        target: &Target,
        ns_v4: Option<Ipv4Addr>,
        ns_v6: Option<Ipv6Addr>,
    ) -> Result<Option<PastaPorts>, PastaRunError> {
        let ns_ipv6 = ns_v6.is_some();
        let auto = |s: &PortSpec| {
            is_auto(s).then(|| AutoHost {
                spec: s.clone(),
                rules: BTreeMap::new(),
            })
        };
        let mut ns_static = Vec::new();
        for (spec, proto) in [(&opts.tcp_ns, Proto::Tcp), (&opts.udp_ns, Proto::Udp)] {
            ns_static.extend(spec.ranges.iter().map(|r| (proto, r.clone())));
        }
        let mut explicit = BTreeSet::new();
        for (spec, proto) in [(&opts.tcp, Proto::Tcp), (&opts.udp, Proto::Udp)] {
            for r in &spec.ranges {
                explicit.extend((r.first..=r.last).map(|p| (proto, p)));
            }
        }
        let auto_tcp = auto(&opts.tcp);
        let auto_udp = auto(&opts.udp);
        let auto_tcp_ns = is_auto(&opts.tcp_ns).then(|| opts.tcp_ns.clone());
        let auto_udp_ns = is_auto(&opts.udp_ns).then(|| opts.udp_ns.clone());
        let dynamic = auto_tcp.is_some()
            || auto_udp.is_some()
            || auto_tcp_ns.is_some()
            || auto_udp_ns.is_some()
            || !ns_static.is_empty();
        // Loopback clients of forwarded ports are relayed here.
        let forwarded = [&opts.tcp, &opts.udp]
            .iter()
            .any(|s| !s.ranges.is_empty() || !s.all_but.is_empty());
        if !dynamic && !forwarded {
            return Ok(None);
        }
        let agent = Rc::new(Agent::spawn(target, opts.userns.as_deref())?);
        Ok(Some(PastaPorts {
            v4_only: opts.v4_only,
            v6_only: opts.v6_only,
            ns_ipv6,
            auto_tcp,
            auto_udp,
            explicit,
            auto_tcp_ns,
            auto_udp_ns,
            ns_static,
            relay: Relay::default(),
            next: Some(Instant::now()),
            first: true,
            splicer: Splicer {
                agent: agent.clone(),
                to: if opts.host_lo_to_ns_lo {
                    (
                        ns_v4.map(|_| Ipv4Addr::LOCALHOST),
                        ns_v6.map(|_| Ipv6Addr::LOCALHOST),
                    )
                } else {
                    (ns_v4, ns_v6)
                },
            },
            agent,
        }))
    }

    /// Binds `-T/-U` listeners for namespace port `port` -> host loopback `to_port`.
    fn bind_ns(
        &mut self,
        proto: Proto,
        addr: Option<IpAddr>,
        port: u16,
        to_port: u16,
        registry: &Registry,
    ) -> io::Result<()> {
        let addrs: Vec<IpAddr> = match addr {
            Some(a) => vec![a],
            None if self.ns_ipv6 => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
            None => vec![Ipv4Addr::LOCALHOST.into()],
        };
        for a in addrs {
            let fd = self.agent.bind(proto, SocketAddr::new(a, port))?;
            let host_ip: IpAddr = if a.is_ipv6() {
                Ipv6Addr::LOCALHOST.into()
            } else {
                Ipv4Addr::LOCALHOST.into()
            };
            self.relay.add_listener(
                proto,
                fd,
                port,
                SocketAddr::new(host_ip, to_port),
                registry,
            )?;
        }
        Ok(())
    }

    fn scan_ns(&mut self, ctl: &mut dyn Control) -> io::Result<()> {
        if self.auto_tcp.is_none() && self.auto_udp.is_none() {
            return Ok(());
        }
        let found = self.agent.scan()?;
        let (v4_only, v6_only) = (self.v4_only, self.v6_only);
        for (proto, auto) in [
            (Proto::Tcp, &mut self.auto_tcp),
            (Proto::Udp, &mut self.auto_udp),
        ] {
            let Some(auto) = auto else { continue };
            let want: BTreeSet<u16> = found
                .iter()
                .filter(|l: &&Listening| l.proto == proto && !l.loopback)
                .map(|l| l.port)
                .filter(|p| !auto.spec.excludes(*p) && !self.explicit.contains(&(proto, *p)))
                .collect();
            let gone: Vec<u16> = auto
                .rules
                .keys()
                .filter(|p| !want.contains(p))
                .copied()
                .collect();
            for port in gone {
                for id in auto.rules.remove(&port).unwrap_or_default() {
                    let _ = ctl.remove(id);
                }
            }
            for port in want {
                if auto.rules.contains_key(&port) {
                    continue;
                }
                let mut ids = Vec::new();
                let mut hosts: Vec<IpAddr> = Vec::new();
                if !v6_only {
                    hosts.push(Ipv4Addr::UNSPECIFIED.into());
                }
                if !v4_only {
                    hosts.push(Ipv6Addr::UNSPECIFIED.into());
                }
                for host in hosts {
                    match ctl.add(proto, SocketAddr::new(host, port), None, port) {
                        Ok(rule) => ids.push(rule.id),
                        Err(e) => log::debug!("auto {} port {port}: {e}", proto.as_str()),
                    }
                }
                if !ids.is_empty() {
                    log::info!("auto: forwarding {} port {port}", proto.as_str());
                    auto.rules.insert(port, ids);
                }
            }
        }
        Ok(())
    }

    fn scan_host(&mut self, ctl: &mut dyn Control, registry: &Registry) {
        let ours: BTreeSet<(Proto, u16)> = ctl
            .list()
            .iter()
            .map(|r| (r.proto, r.host.port()))
            .collect();
        for (proto, files) in [
            (Proto::Tcp, ["/proc/self/net/tcp", "/proc/self/net/tcp6"]),
            (Proto::Udp, ["/proc/self/net/udp", "/proc/self/net/udp6"]),
        ] {
            let spec = match proto {
                Proto::Tcp => self.auto_tcp_ns.clone(),
                Proto::Udp => self.auto_udp_ns.clone(),
            };
            let Some(spec) = spec else { continue };
            let mut want = BTreeSet::new();
            for f in files {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                for l in parse_proc_net(&text, proto) {
                    want.insert(l.port);
                }
            }
            want.retain(|p| !spec.excludes(*p) && !ours.contains(&(proto, *p)));
            let have: Vec<u16> = self
                .relay
                .listeners
                .keys()
                .filter(|(p, _)| *p == proto)
                .map(|(_, port)| *port)
                .collect();
            for port in have.iter().filter(|p| !want.contains(p)) {
                self.relay.remove_listeners(proto, *port, registry);
            }
            for port in want {
                if !self.relay.listeners.contains_key(&(proto, port)) {
                    if let Err(e) = self.bind_ns(proto, None, port, port, registry) {
                        log::debug!("auto -T/-U port {port}: {e}");
                    }
                }
            }
        }
    }
}

impl PastaPorts {
    /// The periodic work (and once before ready): `-T/-U` listeners, the `auto` scans of
    /// both sides, the relays' expiry.
    fn tick(&mut self, now: Instant, ctl: &mut dyn Control, registry: &Registry) -> io::Result<()> {
        if self.first {
            self.first = false;
            for (proto, r) in std::mem::take(&mut self.ns_static) {
                for port in r.first..=r.last {
                    let to = r.to + (port - r.first);
                    self.bind_ns(proto, r.addr, port, to, registry)
                        .map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!(
                                    "cannot bind {} port {port} in the namespace: {e}",
                                    proto.as_str()
                                ),
                            )
                        })?;
                }
            }
        }
        self.scan_ns(ctl)?;
        self.scan_host(ctl, registry);
        self.relay.expire(now, registry);
        let dynamic = self.auto_tcp.is_some()
            || self.auto_udp.is_some()
            || self.auto_tcp_ns.is_some()
            || self.auto_udp_ns.is_some()
            || self.relay.relays() > 0;
        self.next = dynamic.then(|| now + SCAN_INTERVAL);
        Ok(())
    }

    fn tick_with(&mut self, now: Instant, cx: &mut Cx<'_>) -> io::Result<()> {
        let mut io = forwarder::Io {
            host: &mut *cx.sockets,
            tap: cx.taps.sink(),
        };
        let mut ctl = crate::api::FwdControl {
            fwd: cx.fwd,
            io: &mut io,
        };
        self.tick(now, &mut ctl, cx.registry)
    }
}

impl Subsystem for PastaPorts {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        self.relay.base = base;
        cx.sockets.set_opener(Box::new(self.splicer.clone()));
        Ok(())
    }

    fn before_ready(&mut self, cx: &mut Cx<'_>) -> Result<(), StartError> {
        self.tick_with(Instant::now(), cx)
            .map_err(|e| Box::new(crate::event_loop::LoopError::Setup(e)).into())
    }

    fn handle(&mut self, local: usize, cx: &mut Cx<'_>) -> Next {
        self.relay.handle(local, cx.registry);
        Next::Continue
    }

    fn poll_timeout(&mut self, _cx: &mut Cx<'_>) -> Option<Instant> {
        self.next
    }

    fn turn(&mut self, cx: &mut Cx<'_>) -> Next {
        let now = Instant::now();
        if self.next.is_some_and(|at| at <= now) {
            if let Err(e) = self.tick_with(now, cx) {
                log::warn!("{e}");
            }
        }
        Next::Continue
    }

    fn bytes_relayed(&self) -> u64 {
        self.relay.moved
    }
}

/// Where loopback clients of `-t/-u` ports go: the namespace's side, opened by the agent.
#[derive(Clone)]
struct Splicer {
    agent: Rc<Agent>,
    /// The namespace's address per family: its own, or its loopback address with
    /// `--host-lo-to-ns-lo`.
    to: (Option<Ipv4Addr>, Option<Ipv6Addr>),
}

impl Splicer {
    /// Where `client`'s traffic to `guest_port` goes in the namespace: the client's
    /// family first; a namespace without it is reached by the other.
    fn to(&self, client: SocketAddr, guest_port: u16) -> Option<SocketAddr> {
        let (v4, v6) = self.to;
        let to_v4 = v4.map(|a| SocketAddr::new(a.into(), guest_port));
        let to_v6 = v6.map(|a| SocketAddr::new(a.into(), guest_port));
        if client.is_ipv6() {
            to_v6.or(to_v4)
        } else {
            to_v4.or(to_v6)
        }
    }
}

impl NsOpener for Splicer {
    fn tcp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd> {
        let to = self
            .to(client, guest_port)
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        self.agent.connect(to)
    }

    fn udp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd> {
        let to = self
            .to(client, guest_port)
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        // The client's port, as pasta keeps it (any port if it is taken).
        self.agent.udp_connect(to, client.port())
    }
}
