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
//! Limits: at most [`MAX_RELAYS`] relayed TCP connections and UDP associations; beyond,
//! new ones are refused (closed). Relayed UDP associations idle for [`UDP_IDLE`] end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use forwarder::port::Proto;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::agent::{parse_proc_net, Agent, Listening};
use super::opts::{PastaOpts, PortSpec};
use super::PastaRunError;
use crate::api::Control;
use crate::event_loop::{Service, SERVICE_TOKENS};
use crate::netns::Target;

/// How often `auto` rescans.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Most relayed connections and associations at once.
pub const MAX_RELAYS: usize = 4096;
/// Relayed UDP associations end after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(180);
/// Bytes buffered per relayed direction.
const RELAY_BUF: usize = 64 << 10;

/// One source of the relay.
enum Entry {
    /// A `-T` listener in the namespace; connections go to `to` on the host.
    TcpListen { sock: TcpListener, to: SocketAddr },
    /// One side of a relayed TCP connection; `peer` is the other side's key.
    TcpSide(Box<TcpSide>),
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

struct TcpSide {
    sock: TcpStream,
    peer: usize,
    /// Read from this side, not yet written to the peer.
    pending: Vec<u8>,
    /// This side reached end of file (and the peer was told once `pending` is empty).
    eof: bool,
    /// The peer's write side was shut down.
    shut: bool,
}

/// The relay of `-T/-U`.
#[derive(Default)]
struct Relay {
    entries: Slab<Entry>,
    /// UDP associations by (listener, client).
    assoc: BTreeMap<(usize, SocketAddr), usize>,
    /// `-T/-U` listeners by (proto, namespace port), for `auto`.
    listeners: BTreeMap<(Proto, u16), Vec<usize>>,
}

fn token(key: usize) -> Token {
    Token(SERVICE_TOKENS + key)
}

impl Relay {
    fn relays(&self) -> usize {
        self.entries.len()
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
        let res = match &mut self.entries[key] {
            Entry::TcpListen { sock, .. } => {
                registry.register(sock, token(key), Interest::READABLE)
            }
            Entry::UdpListen { sock, .. } => {
                registry.register(sock, token(key), Interest::READABLE)
            }
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
            Some(Entry::TcpSide(_)) => self.pump_pair(key, registry),
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
            let a = self.entries.vacant_key();
            let side = |sock, peer| {
                Entry::TcpSide(Box::new(TcpSide {
                    sock,
                    peer,
                    pending: Vec::new(),
                    eof: false,
                    shut: false,
                }))
            };
            self.entries.insert(side(client, a + 1));
            let b = self.entries.insert(side(host, a));
            if b != a + 1 {
                // Slab keys are handed out in order only when nothing was freed in
                // between: fix the links.
                if let Some(Entry::TcpSide(s)) = self.entries.get_mut(a) {
                    s.peer = b;
                }
            }
            let rw = Interest::READABLE | Interest::WRITABLE;
            for k in [a, b] {
                if let Some(Entry::TcpSide(s)) = self.entries.get_mut(k) {
                    if registry.register(&mut s.sock, token(k), rw).is_err() {
                        self.close_pair(a, registry);
                        break;
                    }
                }
            }
        }
    }

    /// Moves bytes both ways between `key` and its peer.
    fn pump_pair(&mut self, key: usize, registry: &Registry) {
        let Some(Entry::TcpSide(s)) = self.entries.get(key) else {
            return;
        };
        let peer = s.peer;
        let mut done = false;
        for (from, to) in [(key, peer), (peer, key)] {
            match self.pump(from, to) {
                Ok(finished) => done |= finished,
                Err(_) => {
                    done = true;
                    break;
                }
            }
        }
        let both_eof = [key, peer].iter().all(|k| {
            matches!(self.entries.get(*k), Some(Entry::TcpSide(s)) if s.eof && s.pending.is_empty())
        });
        if done || both_eof {
            self.close_pair(key, registry);
        }
    }

    /// Reads what `from` has and writes it (and older pending bytes) to `to`. `Ok(true)`
    /// when the connection is over.
    fn pump(&mut self, from: usize, to: usize) -> io::Result<bool> {
        let Some((Entry::TcpSide(src), Entry::TcpSide(dst))) = self.entries.get2_mut(from, to)
        else {
            return Ok(true);
        };
        let mut buf = [0u8; 16 << 10];
        loop {
            // Write what is pending first.
            while !src.pending.is_empty() {
                match dst.sock.write(&src.pending) {
                    Ok(0) => return Ok(true),
                    Ok(n) => {
                        src.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if src.eof {
                if !src.shut {
                    let _ = dst.sock.shutdown(Shutdown::Write);
                    src.shut = true;
                }
                return Ok(false);
            }
            if src.pending.len() >= RELAY_BUF {
                return Ok(false);
            }
            match src.sock.read(&mut buf) {
                Ok(0) => src.eof = true,
                Ok(n) => src.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn close_pair(&mut self, key: usize, registry: &Registry) {
        let peer = match self.entries.get(key) {
            Some(Entry::TcpSide(s)) => Some(s.peer),
            _ => None,
        };
        for k in std::iter::once(key).chain(peer) {
            if let Some(Entry::TcpSide(mut s)) = self.entries.try_remove(k) {
                let _ = registry.deregister(&mut s.sock);
            }
        }
    }

    fn udp_from_ns(&mut self, key: usize, registry: &Registry) {
        let mut buf = vec![0u8; 65536];
        loop {
            let Some(Entry::UdpListen { sock, to }) = self.entries.get(key) else {
                return;
            };
            let to = *to;
            let (n, client) = match sock.recv_from(&mut buf) {
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
                        .register(&mut sock, token(a), Interest::READABLE)
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
                let _ = sock.send(&buf[..n]);
            }
        }
    }

    fn udp_from_host(&mut self, key: usize) {
        let mut buf = vec![0u8; 65536];
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
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            if let Some(Entry::UdpListen { sock, .. }) = self.entries.get(listener) {
                let _ = sock.send_to(&buf[..n], client);
            }
            if let Some(Entry::UdpAssoc { last, .. }) = self.entries.get_mut(key) {
                *last = Instant::now();
            }
        }
    }

    fn expire(&mut self, now: Instant, registry: &Registry) {
        let stale: Vec<(usize, (usize, SocketAddr))> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::UdpAssoc {
                    listener,
                    client,
                    last,
                    ..
                } if now.duration_since(*last) > UDP_IDLE => Some((k, (*listener, *client))),
                _ => None,
            })
            .collect();
        for (k, a) in stale {
            self.assoc.remove(&a);
            if let Some(Entry::UdpAssoc { mut sock, .. }) = self.entries.try_remove(k) {
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
    agent: Agent,
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
}

/// A spec that is `auto` (given so, or not given at all: pasta's default).
fn is_auto(spec: &PortSpec) -> bool {
    spec.auto || !spec.given
}

impl PastaPorts {
    /// The service for `opts`, or `None` when nothing is dynamic (every spec `none` or
    /// explicit without `-T/-U`).
    ///
    /// # Errors
    /// The agent cannot be started in `target`'s namespaces.
    pub fn new(
        opts: &PastaOpts,
        target: &Target,
        ns_ipv6: bool,
    ) -> Result<Option<PastaPorts>, PastaRunError> {
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
        if !dynamic {
            return Ok(None);
        }
        let agent = Agent::spawn(target, opts.userns.as_deref())?;
        Ok(Some(PastaPorts {
            agent,
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

impl Service for PastaPorts {
    fn next_tick(&self) -> Option<Instant> {
        self.next
    }

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

    fn owns(&self, token: Token) -> bool {
        token.0 >= SERVICE_TOKENS
    }

    fn handle(&mut self, token: Token, registry: &Registry) {
        self.relay.handle(token.0 - SERVICE_TOKENS, registry);
    }
}
