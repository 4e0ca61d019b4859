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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use forwarder::port::Proto;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::agent::{parse_proc_net, Agent, Listening};
use super::opts::{PastaOpts, PortSpec};
use super::PastaRunError;
use crate::api::Control;
use crate::host::Handoff;
use crate::netns::Target;
use crate::subsystem::{Cx, Next, StartError, Subsystem};

/// How often `auto` rescans.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Most relayed connections and associations at once.
pub const MAX_RELAYS: usize = 4096;
/// Relayed UDP associations end after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(180);
/// Pipe capacity asked for per relayed direction (the kernel may give less: a user's
/// pipes beyond `fs.pipe-user-pages-soft` get the minimum).
const PIPE_SIZE: usize = 1 << 20;

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
    /// A loopback client of a `-u` port: `ns` is connected to the namespace's side,
    /// replies go to `client` through `host` (the rule's socket).
    UdpSplice {
        ns: UdpSocket,
        host: std::sync::Arc<std::net::UdpSocket>,
        client: SocketAddr,
        guest_port: u16,
        last: Instant,
    },
}

struct TcpSide {
    sock: TcpStream,
    peer: usize,
    /// Read from this side, not yet written to the peer.
    pipe: Pipe,
    /// This side reached end of file (and the peer was told once the pipe is empty).
    eof: bool,
    /// The peer's write side was shut down.
    shut: bool,
}

/// A pipe that bytes cross between two sockets by `splice(2)`.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in it.
    len: usize,
    /// Its capacity.
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let asked = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(asked))
            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Pipe {
            r,
            w,
            len: 0,
            cap: usize::try_from(cap).unwrap_or(4096),
        })
    }
}

/// `splice(2)` without blocking: `Ok(None)` for `EAGAIN`.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<Option<usize>> {
    use nix::fcntl::SpliceFFlags;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        match nix::fcntl::splice(from, None, to, None, len, flags) {
            Ok(n) => return Ok(Some(n)),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A datagram of a loopback client of a `-u` port ([`Handoff::Udp`]'s fields).
struct UdpHandoff {
    socket: std::sync::Arc<std::net::UdpSocket>,
    client: SocketAddr,
    data: Vec<u8>,
    guest_port: u16,
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
    /// Loopback clients of `-u` ports by (client, guest port).
    spliced: BTreeMap<(SocketAddr, u16), usize>,
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
            spliced: BTreeMap::new(),
            base: 0,
        }
    }
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
            Some(Entry::TcpSide(_)) => self.pump_pair(key, registry),
            Some(Entry::UdpListen { .. }) => self.udp_from_ns(key, registry),
            Some(Entry::UdpAssoc { .. }) => self.udp_from_host(key),
            Some(Entry::UdpSplice { .. }) => self.udp_splice_reply(key),
            None => {}
        }
    }

    /// A datagram of a loopback client of a `-u` port, for `to` in the namespace.
    fn udp_splice(&mut self, agent: &Agent, h: UdpHandoff, to: SocketAddr, registry: &Registry) {
        let key = match self.spliced.get(&(h.client, h.guest_port)) {
            Some(&k) => k,
            None => {
                if self.relays() >= MAX_RELAYS {
                    return;
                }
                let mut ns = match agent.udp_connect(to, h.client.port()) {
                    Ok(fd) => UdpSocket::from_std(std::net::UdpSocket::from(fd)),
                    Err(e) => {
                        log::debug!("cannot reach {to} in the namespace: {e}");
                        return;
                    }
                };
                let k = self.entries.vacant_key();
                if registry
                    .register(&mut ns, Token(self.base + k), Interest::READABLE)
                    .is_err()
                {
                    return;
                }
                self.entries.insert(Entry::UdpSplice {
                    ns,
                    host: h.socket,
                    client: h.client,
                    guest_port: h.guest_port,
                    last: Instant::now(),
                });
                self.spliced.insert((h.client, h.guest_port), k);
                k
            }
        };
        if let Some(Entry::UdpSplice { ns, last, .. }) = self.entries.get_mut(key) {
            *last = Instant::now();
            if ns.send(&h.data).is_ok() {
                self.moved += h.data.len() as u64;
            }
        }
    }

    /// Replies from the namespace to a loopback client of a `-u` port.
    fn udp_splice_reply(&mut self, key: usize) {
        loop {
            let Some(Entry::UdpSplice {
                ns,
                host,
                client,
                last,
                ..
            }) = self.entries.get_mut(key)
            else {
                return;
            };
            let n = match ns.recv(&mut self.buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            *last = Instant::now();
            if host.send_to(&self.buf[..n], *client).is_ok() {
                self.moved += n as u64;
            }
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
        let side = |sock: TcpStream, peer| -> io::Result<Entry> {
            let _ = sock.set_nodelay(true);
            Ok(Entry::TcpSide(Box::new(TcpSide {
                sock,
                peer,
                pipe: Pipe::new()?,
                eof: false,
                shut: false,
            })))
        };
        let ka = self.entries.vacant_key();
        let ea = side(a, ka + 1)?;
        self.entries.insert(ea);
        let eb = match side(b, ka) {
            Ok(e) => e,
            Err(e) => {
                self.entries.remove(ka);
                return Err(e);
            }
        };
        let kb = self.entries.insert(eb);
        if kb != ka + 1 {
            // Slab keys are handed out in order only when nothing was freed in
            // between: fix the links.
            if let Some(Entry::TcpSide(s)) = self.entries.get_mut(ka) {
                s.peer = kb;
            }
        }
        let rw = Interest::READABLE | Interest::WRITABLE;
        for k in [ka, kb] {
            let token = Token(self.base + k);
            if let Some(Entry::TcpSide(s)) = self.entries.get_mut(k) {
                if let Err(e) = registry.register(&mut s.sock, token, rw) {
                    self.close_pair(ka, registry);
                    return Err(e);
                }
            }
        }
        Ok(())
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
        let both_eof = [key, peer].iter().all(
            |k| matches!(self.entries.get(*k), Some(Entry::TcpSide(s)) if s.eof && s.pipe.len == 0),
        );
        if done || both_eof {
            self.close_pair(key, registry);
        }
    }

    /// Moves what `from` has (and what waits in its pipe) to `to`. `Ok(true)` when the
    /// connection is over.
    fn pump(&mut self, from: usize, to: usize) -> io::Result<bool> {
        let Some((Entry::TcpSide(src), Entry::TcpSide(dst))) = self.entries.get2_mut(from, to)
        else {
            return Ok(true);
        };
        loop {
            // Empty the pipe first.
            while src.pipe.len > 0 {
                match splice(src.pipe.r.as_fd(), dst.sock.as_fd(), src.pipe.len)? {
                    Some(0) => return Ok(true),
                    Some(n) => {
                        src.pipe.len -= n;
                        self.moved += n as u64;
                    }
                    None => return Ok(false),
                }
            }
            if src.eof {
                if !src.shut {
                    let _ = dst.sock.shutdown(Shutdown::Write);
                    src.shut = true;
                }
                return Ok(false);
            }
            // The pipe is empty: EAGAIN can only mean that the socket is.
            match splice(src.sock.as_fd(), src.pipe.w.as_fd(), src.pipe.cap)? {
                Some(0) => src.eof = true,
                Some(n) => src.pipe.len += n,
                None => return Ok(false),
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
                Entry::UdpAssoc { last, .. } | Entry::UdpSplice { last, .. }
                    if now.duration_since(*last) > UDP_IDLE =>
                {
                    Some(k)
                }
                _ => None,
            })
            .collect();
        for k in stale {
            match self.entries.try_remove(k) {
                Some(Entry::UdpAssoc {
                    mut sock,
                    listener,
                    client,
                    ..
                }) => {
                    self.assoc.remove(&(listener, client));
                    let _ = registry.deregister(&mut sock);
                }
                Some(Entry::UdpSplice {
                    mut ns,
                    client,
                    guest_port,
                    ..
                }) => {
                    self.spliced.remove(&(client, guest_port));
                    let _ = registry.deregister(&mut ns);
                }
                _ => {}
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
    /// Where loopback clients of `-t` ports go in the namespace, per family: its own
    /// address, or its loopback address with `--host-lo-to-ns-lo`.
    splice_to: (Option<Ipv4Addr>, Option<Ipv6Addr>),
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
            splice_to: if opts.host_lo_to_ns_lo {
                (
                    ns_v4.map(|_| Ipv4Addr::LOCALHOST),
                    ns_v6.map(|_| Ipv6Addr::LOCALHOST),
                )
            } else {
                (ns_v4, ns_v6)
            },
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
    fn start(&mut self, base: usize, _cx: &mut Cx<'_>) -> Result<(), StartError> {
        self.relay.base = base;
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

    fn take_connection(&mut self, conn: Handoff, registry: &Registry) -> Option<Handoff> {
        self.splice(conn, registry);
        None
    }
}

impl PastaPorts {
    fn splice(&mut self, conn: Handoff, registry: &Registry) {
        let (client, guest_port) = match &conn {
            Handoff::Tcp {
                client, guest_port, ..
            }
            | Handoff::Udp {
                client, guest_port, ..
            } => (*client, *guest_port),
        };
        // The client's family first; a namespace without it is reached by the other.
        let (v4, v6) = self.splice_to;
        let to_v4 = v4.map(|a| SocketAddr::new(a.into(), guest_port));
        let to_v6 = v6.map(|a| SocketAddr::new(a.into(), guest_port));
        let to = if client.is_ipv6() {
            to_v6.or(to_v4)
        } else {
            to_v4.or(to_v6)
        };
        let Some(to) = to else { return };
        match conn {
            Handoff::Udp {
                socket,
                client,
                data,
                guest_port,
            } => {
                let h = UdpHandoff {
                    socket,
                    client,
                    data,
                    guest_port,
                };
                self.relay.udp_splice(&self.agent, h, to, registry);
            }
            Handoff::Tcp { stream, .. } => {
                if self.relay.relays() + 2 > MAX_RELAYS {
                    log::debug!("relay table full: connection from {client} refused");
                    return;
                }
                let ns = match self.agent.connect(to) {
                    Ok(fd) => TcpStream::from_std(std::net::TcpStream::from(fd)),
                    Err(e) => {
                        log::debug!("cannot connect to {to} in the namespace: {e}");
                        return;
                    }
                };
                if let Err(e) = self.relay.add_pair(stream, ns, registry) {
                    log::debug!("relay of {client} to {to}: {e}");
                }
            }
        }
    }
}
