//! The forwarder's host side on this machine: real sockets, watched by the event loop's
//! mio `Poll`.
//!
//! # Theory of operation
//!
//! [`Sockets`] implements [`forwarder::HostIo`]: the forwarder names a host socket by its
//! flow's id, and this table holds the socket at that index (flow ids are a slab's keys,
//! so the table is dense). Every socket it opens is registered with the loop's `Poll`
//! under the token `Token(id)` (the flow tokens: below the TAPs' and the subsystems',
//! [`crate::event_loop`]), edge-triggered: streams for reading, urgent data and writing
//! (one connected within its connect call for writing only once a write leaves bytes
//! behind), datagram sockets and listeners for reading. The event loop hands each event
//! of such a token to [`forwarder::Forwarder::handle_ready`] with `id`;
//! [`forwarder::HostIo::close`] deregisters and closes (a stream is only closed, which
//! ends its registration too).
//!
//! A stream's close waits for the end of the turn ([`Sockets::end_turn`], after the
//! frames for the guest are written): closing a TCP socket sends its FIN or RST at once,
//! inside `close(2)`, and on a connection's path that is time the guest would wait for
//! the frames of the same turn (a connect/close loop's next SYN-ACK comes in the turn
//! that takes the last one's RST). Its id is free at once; until the turn ends its
//! descriptor stays open, and the loop's next wait, which could report it, comes after.
//!
//! A call costs an index and a match on top of its system call: no allocation, no
//! dynamic dispatch (the forwarder is generic over its host). The datagram calls with a
//! local address or segmentation are [`crate::sys::msg`]'s.
//!
//! Loopback clients of published ports in pasta mode are not forwarded
//! ([`forwarder::Config::loopback_handoff`]). A connection becomes a spliced flow: the
//! [`NsOpener`] that pasta mode installs ([`Sockets::set_opener`]) opens its other side
//! inside the namespace, and the two sockets are relayed by [`crate::splice::Pair`]
//! through pipes. The accepted one is registered under the flow's token, the other under
//! [`PEER_TOKENS`] plus it; the event loop tells [`Sockets::note_splice`] which one an
//! event is for before the forwarder relays the flow, so that the pair moves only the
//! directions that event lets move. A datagram goes to its client's
//! spliced association: a socket the opener makes inside the namespace, then a flow's
//! datagram socket like any other (the forwarder relays its replies through the rule's
//! socket, and closes it with the rule).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use forwarder::port::{PortError, PortRule, Proto};
use forwarder::{Close, FrameSink, HostIo, Io, SpliceTo};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::splice::{End, Pair};
use crate::sys::msg;

/// Opens the namespace's side of a spliced connection: installed by pasta mode, whose
/// agent makes sockets inside the namespace.
pub trait NsOpener {
    /// A TCP socket inside the namespace, non-blocking, connecting to the guest's port
    /// `guest_port` for the loopback client `client` (its family first).
    ///
    /// # Errors
    /// When the namespace has no address to reach, or the socket cannot be made.
    fn tcp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd>;

    /// A UDP socket inside the namespace, non-blocking, connected to the guest's port
    /// `guest_port` for the loopback client `client`, from the client's port if free.
    ///
    /// # Errors
    /// As [`tcp_connect`](Self::tcp_connect).
    fn udp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd>;

    /// A socket bound to `addr` inside the namespace (TCP: listening), non-blocking:
    /// pasta's `-T/-U`.
    ///
    /// # Errors
    /// When the address cannot be had there (`EADDRINUSE`...).
    fn bind(&self, proto: Proto, addr: SocketAddr) -> io::Result<OwnedFd>;
}

/// Tokens of spliced pairs' second sockets: this plus the flow's id (flow ids stay far
/// below: the forwarder's limits bound them).
pub const PEER_TOKENS: usize = 1 << 31;

/// One entry of the table.
enum Entry {
    Free,
    /// A flow's TCP stream (registered), and whether for writing too (see
    /// [`Sockets::write`](HostIo::write)).
    Stream(TcpStream, bool),
    /// A flow's UDP or ping socket, connected (registered): also a spliced UDP
    /// association's socket inside the namespace.
    Dgram(UdpSocket),
    /// A published TCP port (registered).
    Listener(TcpListener),
    /// A published UDP port (registered).
    Port(UdpSocket),
    /// A connection accepted and not yet adopted (not registered).
    Accepted(TcpStream),
    /// A spliced flow: its first socket registered under its token, the second under
    /// [`PEER_TOKENS`] plus it.
    Splice(Box<Pair>),
}

/// Receive buffer asked for on every host UDP socket (the kernel caps it at
/// `net.core.rmem_max`).
///
/// The default (`rmem_default`, 208 KiB) holds about 90 datagrams of 1400 bytes: a sender
/// that bursts, as paced senders do, overflows it whenever the loop is busy elsewhere
/// for a millisecond (iperf3 -u at 1 Gbit/s towards the container lost 4-10 %; with 1 MiB
/// 0-0.3 %, with 4 MiB none, 3 runs each). Only queued datagrams use the memory.
const UDP_RCVBUF: usize = 4 << 20;

/// Asks for [`UDP_RCVBUF`]; a refusal leaves the default, which still works.
fn widen_receive_buffer(socket: &Socket) {
    if let Err(e) = socket.set_recv_buffer_size(UDP_RCVBUF) {
        log::debug!("SO_RCVBUF {UDP_RCVBUF}: {e}");
    }
}

/// What a flow's stream is watched for when not for writing: readable, and urgent data
/// (`EPOLLPRI`, [`forwarder::Ready::urgent`]).
const STREAM: Interest = Interest::READABLE.add(Interest::PRIORITY);

/// The error of a call on an id that holds no socket of that kind (a forwarder bug).
fn no_socket() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

/// The forwarder's host sockets; see the module's header.
pub struct Sockets {
    registry: Registry,
    table: Vec<Entry>,
    /// Whether the kernel segments UDP sends ([`msg::udp_gso_supported`]).
    gso: bool,
    /// Opens the namespace's side of spliced flows (pasta mode).
    opener: Option<Box<dyn NsOpener>>,
    /// Streams closed this turn, closed for real by [`Sockets::end_turn`].
    closing: Vec<(TcpStream, Close)>,
    /// The number of the current turn, counted by [`Sockets::end_turn`] from 1.
    turn: u64,
    /// For each id, the turn its last socket was closed in (0: never); see
    /// [`Sockets::closed_this_turn`].
    closed_in: Vec<u64>,
    /// A TCP socket made ahead of need for each family (IPv4, IPv6), with its options
    /// set; see [`Sockets::end_turn`].
    spare: [Option<Socket>; 2],
    /// The families a connect was made for this turn.
    refill: [bool; 2],
}

/// Starts the non-blocking `socket`'s connect to `to`: `Ok(true)` if made already,
/// `Ok(false)` if under way (`EINPROGRESS`; its outcome is reported by writability).
/// The pasta agent's connects inside the namespace share it.
///
/// # Errors
/// When the connect fails at once (`ECONNREFUSED`, `ENETUNREACH`...).
pub(crate) fn start_connect(socket: &Socket, to: SocketAddr) -> io::Result<bool> {
    match socket.connect(&to.into()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A non-blocking TCP socket of `domain` with the options every flow's stream has: Nagle
/// off, urgent data inline (`SO_OOBINLINE`: the guest gets the urgent byte in its place in
/// the stream; without, a read skips it).
fn tcp_socket(domain: Domain) -> io::Result<Socket> {
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket.set_out_of_band_inline(true)?;
    Ok(socket)
}

/// The index of `domain`'s spare socket.
fn family(ip: IpAddr) -> (usize, Domain) {
    match ip {
        IpAddr::V4(_) => (0, Domain::IPV4),
        IpAddr::V6(_) => (1, Domain::IPV6),
    }
}

impl Sockets {
    /// An empty table whose sockets are registered with `registry` (the loop's).
    pub fn new(registry: Registry) -> Sockets {
        Sockets {
            registry,
            table: Vec::new(),
            gso: msg::udp_gso_supported(),
            opener: None,
            closing: Vec::new(),
            turn: 1,
            closed_in: Vec::new(),
            // A family the host lacks has none (and its connects fail as they would).
            spare: [tcp_socket(Domain::IPV4).ok(), tcp_socket(Domain::IPV6).ok()],
            refill: [false; 2],
        }
    }

    /// The forwarder's outside world for one call: these sockets and `tap`, where frames for
    /// the members go.
    pub fn io<'a>(&'a mut self, tap: &'a mut dyn FrameSink) -> Io<'a, Sockets> {
        Io { host: self, tap }
    }

    /// Notes an event of socket `end` of spliced flow `id` for its next
    /// [`HostIo::splice_relay`] ([`Pair::note`]); nothing for any other flow.
    #[inline]
    pub fn note_splice(&mut self, id: usize, end: End, ready: &forwarder::Ready) {
        if let Some(Entry::Splice(pair)) = self.table.get_mut(id) {
            pair.note(end, ready);
        }
    }

    /// Whether `id` was closed this turn. The rest of the turn's events for it came from
    /// the closed socket, not from the flow that may already reuse the id (whose socket's
    /// events come after the next wait): the event loop drops them, or a stale end of
    /// stream would end the new flow's stream early.
    #[inline]
    pub fn closed_this_turn(&self, id: usize) -> bool {
        self.closed_in.get(id) == Some(&self.turn)
    }

    /// The work of a turn that the guest need not wait for: the event loop calls it once
    /// the turn's frames are written, before it waits.
    ///
    /// - Closes the streams [`HostIo::close`] was given this turn (see the module's
    ///   header).
    /// - Makes the spare TCP socket of a family a connect was made for this turn: a new
    ///   connection's turn then makes two system calls fewer before its SYN-ACK
    ///   (`socket(2)`, and `TCP_NODELAY` set). One per family, so at most one connect per
    ///   turn takes a spare; the others make their socket at once, as all did before.
    pub fn end_turn(&mut self) {
        self.turn += 1;
        for (s, how) in self.closing.drain(..) {
            if how == Close::Reset {
                let _ = socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
            }
            drop(s);
        }
        for (i, domain) in [(0, Domain::IPV4), (1, Domain::IPV6)] {
            if std::mem::take(&mut self.refill[i]) && self.spare[i].is_none() {
                // Failing here (EMFILE) leaves the next connect to fail, and say why, as
                // before; it tries again after it.
                self.spare[i] = tcp_socket(domain).ok();
            }
        }
    }

    /// A TCP socket for a connection to `ip`, with [`tcp_socket`]'s options: the spare of
    /// its family if there is one (made again at the end of the turn), else a new one.
    fn take_tcp_socket(&mut self, ip: IpAddr) -> io::Result<Socket> {
        let (i, domain) = family(ip);
        self.refill[i] = true;
        match self.spare[i].take() {
            Some(socket) => Ok(socket),
            None => tcp_socket(domain),
        }
    }

    /// Installs what opens the namespace's side of spliced flows.
    pub fn set_opener(&mut self, opener: Box<dyn NsOpener>) {
        self.opener = Some(opener);
    }

    fn put(&mut self, id: usize, entry: Entry) {
        if self.table.len() <= id {
            self.table.resize_with(id + 1, || Entry::Free);
        }
        self.table[id] = entry;
    }

    fn take(&mut self, id: usize) -> Entry {
        match self.table.get_mut(id) {
            Some(e) => std::mem::replace(e, Entry::Free),
            None => Entry::Free,
        }
    }

    fn stream(&mut self, id: usize) -> io::Result<&mut TcpStream> {
        match self.table.get_mut(id) {
            Some(Entry::Stream(s, _)) => Ok(s),
            _ => Err(no_socket()),
        }
    }

    fn dgram(&mut self, id: usize) -> io::Result<&mut UdpSocket> {
        match self.table.get_mut(id) {
            Some(Entry::Dgram(s) | Entry::Port(s)) => Ok(s),
            _ => Err(no_socket()),
        }
    }

    /// Gives a flow's UDP socket, connected, the [`UDP_RCVBUF`] receive buffer, registers
    /// it and keeps it as `id`: a datagram flow's host socket and a spliced association's
    /// socket inside the namespace alike (a published port and a `-U` listener get theirs
    /// from [`register_port`]).
    fn add_udp(&mut self, id: usize, socket: Socket) -> io::Result<()> {
        widen_receive_buffer(&socket);
        self.add_dgram(id, socket)
    }

    /// Registers a flow's datagram socket and keeps it as `id`.
    fn add_dgram(&mut self, id: usize, socket: Socket) -> io::Result<()> {
        let mut sock = UdpSocket::from_std(socket.into());
        self.registry
            .register(&mut sock, Token(id), Interest::READABLE)?;
        self.put(id, Entry::Dgram(sock));
        Ok(())
    }
}

/// Binds `socket` to `outbound` when it is of `target`'s family.
fn bind_outbound(socket: &Socket, outbound: Option<IpAddr>, target: IpAddr) -> io::Result<()> {
    if let Some(addr) = outbound {
        if addr.is_ipv4() == target.is_ipv4() {
            socket.bind(&SocketAddr::new(addr, 0).into())?;
        }
    }
    Ok(())
}

impl HostIo for Sockets {
    fn tcp_connect(
        &mut self,
        id: usize,
        target: SocketAddr,
        bind: Option<IpAddr>,
    ) -> io::Result<bool> {
        let socket = self.take_tcp_socket(target.ip())?;
        bind_outbound(&socket, bind, target.ip())?;
        // A connect to one of this host's own addresses (the gateway's usual target, the
        // host's loopback) is made before the call returns, although it says EINPROGRESS:
        // one getpeername saves the wait for the readiness event, a turn of the loop and
        // the checks after it. Elsewhere it costs that one call.
        let connected = start_connect(&socket, target)? || socket.peer_addr().is_ok();
        let mut stream = TcpStream::from_std(socket.into());
        // A connected stream is watched for reading only until a write fills its buffer:
        // registered for writing, it would be reported writable at once, a turn of the
        // loop for nothing. A connect in progress is reported by its writability.
        let interest = if connected {
            STREAM
        } else {
            STREAM | Interest::WRITABLE
        };
        self.registry.register(&mut stream, Token(id), interest)?;
        self.put(id, Entry::Stream(stream, !connected));
        Ok(connected)
    }

    fn tcp_connected(&mut self, id: usize) -> io::Result<bool> {
        let stream = self.stream(id)?;
        // One system call when connected (nearly always, after a readiness event): a
        // socket with a peer address has no pending connect error. Only when it has none
        // does SO_ERROR tell a failed connect from one still in progress.
        match stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => match stream.take_error()? {
                Some(e) => Err(e),
                None => Ok(false),
            },
            Err(e) => Err(e),
        }
    }

    #[inline]
    fn read(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize> {
        self.stream(id)?.read(buf)
    }

    /// A stream registered for reading only (connected at once, see `tcp_connect`) is
    /// registered for writing as well when a write leaves bytes behind: the forwarder then
    /// waits for its writability. Re-registering evaluates the readiness anew, so a buffer
    /// that drained meanwhile is still reported.
    #[inline]
    fn write(&mut self, id: usize, buf: &[u8]) -> io::Result<usize> {
        let Some(Entry::Stream(s, watched)) = self.table.get_mut(id) else {
            return Err(no_socket());
        };
        let res = s.write(buf);
        let full = match &res {
            Ok(n) => *n < buf.len(),
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        if full && !*watched {
            self.registry
                .reregister(s, Token(id), STREAM | Interest::WRITABLE)?;
            *watched = true;
        }
        res
    }

    fn shutdown_write(&mut self, id: usize) {
        if let Ok(s) = self.stream(id) {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    fn udp_open(&mut self, id: usize, target: SocketAddr, bind: Option<IpAddr>) -> io::Result<()> {
        let socket = Socket::new(
            Domain::for_address(target),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        bind_outbound(&socket, bind, target.ip())?;
        socket.connect(&target.into())?;
        self.add_udp(id, socket)
    }

    fn udp_connect(&mut self, id: usize, to: SocketAddr) -> io::Result<()> {
        self.dgram(id)?.connect(to)
    }

    fn icmp_open(&mut self, id: usize, dst: IpAddr, bind: Option<IpAddr>) -> io::Result<()> {
        let (domain, proto) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(proto))?;
        bind_outbound(&socket, bind, dst)?;
        socket.connect(&SocketAddr::new(dst, 0).into())?;
        self.add_dgram(id, socket)
    }

    #[inline]
    fn send(&mut self, id: usize, data: &[u8]) -> io::Result<usize> {
        self.dgram(id)?.send(data)
    }

    #[inline]
    fn recv(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize> {
        self.dgram(id)?.recv(buf)
    }

    #[inline]
    fn send_msg(
        &mut self,
        id: usize,
        data: &[u8],
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
        seg: Option<u16>,
    ) -> io::Result<usize> {
        let fd = self.dgram(id)?.as_raw_fd();
        msg::send_msg(fd, data, to, from, seg)
    }

    fn recv_from(
        &mut self,
        id: usize,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        let fd = self.dgram(id)?.as_raw_fd();
        msg::recv_with_dst(fd, buf)
    }

    #[inline]
    fn udp_gso(&self) -> bool {
        self.gso
    }

    fn listen(&mut self, id: usize, rule: &PortRule) -> Result<(), PortError> {
        let entry = open_listener(rule, &self.registry, Token(id))?;
        self.put(id, entry);
        Ok(())
    }

    fn accept(&mut self, listener: usize, id: usize) -> io::Result<SocketAddr> {
        let Some(Entry::Listener(l)) = self.table.get(listener) else {
            return Err(no_socket());
        };
        let (stream, client) = l.accept()?;
        self.put(id, Entry::Accepted(stream));
        Ok(client)
    }

    fn adopt(&mut self, id: usize) -> io::Result<()> {
        let Entry::Accepted(mut stream) = self.take(id) else {
            return Err(no_socket());
        };
        // TCP_NODELAY and SO_OOBINLINE come from the listener.
        self.registry
            .register(&mut stream, Token(id), STREAM | Interest::WRITABLE)?;
        self.put(id, Entry::Stream(stream, true));
        Ok(())
    }

    fn splice_tcp(&mut self, id: usize, to: SpliceTo) -> io::Result<()> {
        let Entry::Accepted(stream) = self.take(id) else {
            return Err(no_socket());
        };
        let other = match to {
            SpliceTo::Guest { client, port } => {
                let opener = self.opener.as_ref().ok_or_else(no_socket)?;
                TcpStream::from_std(std::net::TcpStream::from(opener.tcp_connect(client, port)?))
            }
            SpliceTo::Host(addr) => {
                // The spare, whose options (urgent data inline) the pair needs too.
                let socket = self.take_tcp_socket(addr.ip())?;
                start_connect(&socket, addr)?;
                TcpStream::from_std(socket.into())
            }
        };
        let mut pair = Box::new(Pair::new(stream, other)?);
        let rw = STREAM | Interest::WRITABLE;
        let [a, b] = pair.sockets();
        // Flow ids stay far below: ids are reused, and the flow limits (25,000 by default)
        // bound how many are open.
        debug_assert!(id < PEER_TOKENS, "flow id {id} in the pairs' second range");
        self.registry.register(a, Token(id), rw)?;
        self.registry.register(b, Token(PEER_TOKENS + id), rw)?;
        self.put(id, Entry::Splice(pair));
        Ok(())
    }

    #[inline]
    fn splice_relay(&mut self, id: usize) -> (usize, bool) {
        match self.table.get_mut(id) {
            Some(Entry::Splice(pair)) => pair.pump_noted(),
            _ => (0, true),
        }
    }

    fn splice_listen(&mut self, id: usize, proto: Proto, addr: SocketAddr) -> io::Result<()> {
        let opener = self.opener.as_ref().ok_or_else(no_socket)?;
        let fd = opener.bind(proto, addr)?;
        let entry = register_port(Socket::from(fd), proto, addr, &self.registry, Token(id))?;
        self.put(id, entry);
        Ok(())
    }

    fn splice_udp(&mut self, id: usize, client: SocketAddr, guest_port: u16) -> io::Result<()> {
        let opener = self.opener.as_ref().ok_or_else(no_socket)?;
        let fd = opener.udp_connect(client, guest_port)?;
        self.add_udp(id, Socket::from(fd))
    }

    fn close(&mut self, id: usize, how: Close) {
        if self.closed_in.len() <= id {
            self.closed_in.resize(id + 1, 0);
        }
        self.closed_in[id] = self.turn;
        let entry = self.take(id);
        match entry {
            Entry::Free => {}
            // Not deregistered first: closing the descriptor takes it out of the epoll set
            // (the kernel drops a registration with the last reference to its file, and
            // the table holds the only one), one `epoll_ctl` less per connection. Were a
            // reference ever held elsewhere for a moment (a fork's child before its exec),
            // a late event would reach the flow that reuses the id as a spurious wake-up,
            // which every flow handles (`WouldBlock`, a connect still in progress).
            // At the end of the turn.
            Entry::Stream(s, _) | Entry::Accepted(s) => self.closing.push((s, how)),
            // The same holds for a flow's datagram socket, a listener, a published UDP
            // port and a pair.
            Entry::Dgram(_) | Entry::Listener(_) | Entry::Port(_) | Entry::Splice(_) => {}
        }
    }
}

/// Binds the host socket of `rule` and registers it as `token`.
fn open_listener(rule: &PortRule, registry: &Registry, token: Token) -> Result<Entry, PortError> {
    let addr = rule.host;
    let fail = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            PortError::InUse { addr, source }
        } else if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            PortError::Privileged { addr, source }
        } else {
            PortError::Listen { addr, source }
        }
    };
    let (ty, proto) = match rule.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )
    .map_err(fail)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only, so that a rule for 0.0.0.0 can coexist.
        socket.set_only_v6(true).map_err(fail)?;
    }
    if let Some(dev) = &rule.device {
        socket
            .bind_device(Some(dev.as_bytes()))
            .map_err(|source| PortError::Device {
                addr,
                device: dev.clone(),
                source,
            })?;
    }
    if rule.proto == Proto::Tcp {
        // Re-publishing a port right after removing it must not trip over TIME-WAIT.
        socket.set_reuse_address(true).map_err(fail)?;
        // Inherited by the accepted connections: Nagle off and urgent data inline, as on
        // `tcp_socket`'s, at no cost per connection.
        socket.set_tcp_nodelay(true).map_err(fail)?;
        socket.set_out_of_band_inline(true).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    if rule.proto == Proto::Tcp {
        socket.listen(1024).map_err(fail)?;
    }
    register_port(socket, rule.proto, addr, registry, token).map_err(fail)
}

/// Registers `socket`, bound to `addr` (TCP: listening), as the listener or UDP port
/// `token`: a published port and a `-T/-U` listener in pasta's namespace alike. A UDP port
/// gets the [`UDP_RCVBUF`] receive buffer and, on a wildcard address, learns each
/// datagram's local address, to reply from it.
fn register_port(
    socket: Socket,
    proto: Proto,
    addr: SocketAddr,
    registry: &Registry,
    token: Token,
) -> io::Result<Entry> {
    match proto {
        Proto::Tcp => {
            let mut l = TcpListener::from_std(socket.into());
            registry.register(&mut l, token, Interest::READABLE)?;
            Ok(Entry::Listener(l))
        }
        Proto::Udp => {
            widen_receive_buffer(&socket);
            if addr.ip().is_unspecified() {
                msg::enable_pktinfo(socket.as_raw_fd(), addr.is_ipv6())?;
            }
            let mut u = UdpSocket::from_std(socket.into());
            registry.register(&mut u, token, Interest::READABLE)?;
            Ok(Entry::Port(u))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets() -> (mio::Poll, Sockets) {
        let poll = mio::Poll::new().unwrap();
        let s = Sockets::new(poll.registry().try_clone().unwrap());
        (poll, s)
    }

    fn listener_addr(s: &Sockets, id: usize) -> &TcpListener {
        match &s.table[id] {
            Entry::Listener(l) => l,
            _ => panic!("no listener at {id}"),
        }
    }

    #[test]
    fn device_bound_listener_and_unknown_device() {
        let (_poll, mut s) = sockets();
        let rule = |id, device: &str| PortRule {
            id,
            proto: Proto::Tcp,
            host: "127.0.0.1:0".parse().unwrap(),
            guest: "10.0.2.100:80".parse().unwrap(),
            device: Some(device.to_owned()),
        };
        match s.listen(1, &rule(1, "lo")) {
            Ok(()) => {
                let sock = socket2::SockRef::from(listener_addr(&s, 1));
                assert_eq!(sock.device().unwrap().as_deref(), Some(&b"lo"[..]));
            }
            // Before Linux 5.7 SO_BINDTODEVICE needs CAP_NET_RAW.
            Err(PortError::Device { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => panic!("unexpected error {e}"),
        }
        match s.listen(2, &rule(2, "nosuch-if0")) {
            Err(PortError::Device { device, .. }) => assert_eq!(device, "nosuch-if0"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => panic!("bound to an interface that does not exist"),
        }
    }

    /// A connect takes the family's spare socket, options set, and the turn's end makes
    /// the next; a family no connect used is left alone.
    #[test]
    fn connects_take_the_spare_socket_and_the_turn_makes_the_next() {
        let (_poll, mut s) = sockets();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let spare_fd = |s: &Sockets, i: usize| s.spare[i].as_ref().map(|x| x.as_raw_fd());
        let v6 = spare_fd(&s, 1);
        for id in [1, 2] {
            let spare = spare_fd(&s, 0).expect("an IPv4 spare");
            s.tcp_connect(id, target, None).unwrap();
            let Entry::Stream(stream, _) = &s.table[id] else {
                panic!("no stream");
            };
            assert_eq!(stream.as_raw_fd(), spare, "the spare was used");
            assert!(stream.nodelay().unwrap());
            assert!(socket2::SockRef::from(stream).out_of_band_inline().unwrap());
            assert_eq!(spare_fd(&s, 0), None);
            s.end_turn();
            assert!(spare_fd(&s, 0).is_some(), "a new spare");
        }
        assert_eq!(spare_fd(&s, 1), v6, "the IPv6 spare untouched");
        // Without a spare, a connect makes its socket at once.
        s.spare[0] = None;
        s.tcp_connect(3, target, None).unwrap();
        let Entry::Stream(stream, _) = &s.table[3] else {
            panic!("no stream");
        };
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn loopback_connect_is_made_at_once_and_writes_watched_once_full() {
        use std::time::{Duration, Instant};
        let (mut poll, mut s) = sockets();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(s
            .tcp_connect(4, server.local_addr().unwrap(), None)
            .unwrap());
        assert!(s.tcp_connected(4).unwrap());
        let (mut peer, _) = server.accept().unwrap();
        let mut events = mio::Events::with_capacity(8);
        let writable = |events: &mio::Events| {
            events
                .iter()
                .any(|e| e.token() == Token(4) && e.is_writable())
        };
        // Watched for reading only: no writability reported while nothing is full.
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        assert!(!writable(&events));
        // Fill the send buffer while the peer does not read.
        let chunk = vec![7u8; 1 << 16];
        loop {
            match s.write(4, &chunk) {
                Ok(n) if n == chunk.len() => {}
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        // Once the peer reads, writability is reported.
        peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while peer.read(&mut buf).is_ok_and(|n| n > 0) {}
            poll.poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
            if writable(&events) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no writability after the peer read"
            );
        }
    }

    #[test]
    fn second_bind_same_address_in_use() {
        let (_poll, mut s) = sockets();
        let rule = |id| PortRule {
            id,
            proto: Proto::Tcp,
            host: "127.0.0.1:0".parse().unwrap(),
            guest: "10.0.2.100:80".parse().unwrap(),
            device: None,
        };
        s.listen(1, &rule(1)).unwrap();
        let l = socket2::SockRef::from(listener_addr(&s, 1));
        assert!(
            l.out_of_band_inline().unwrap() && l.tcp_nodelay().unwrap(),
            "inherited by its connections"
        );
        // On loopback the handshake is over when connect returns: accepted at once.
        let _c = std::net::TcpStream::connect(listener_addr(&s, 1).local_addr().unwrap());
        let (accepted, _) = listener_addr(&s, 1).accept().unwrap();
        let a = socket2::SockRef::from(&accepted);
        assert!(a.tcp_nodelay().unwrap(), "Nagle off, from the listener");
        assert!(
            a.out_of_band_inline().unwrap(),
            "urgent inline, from the listener"
        );
        let taken = listener_addr(&s, 1).local_addr().unwrap();
        let mut second = rule(2);
        second.host = taken;
        match s.listen(2, &second) {
            Err(PortError::InUse { addr, source }) => {
                assert_eq!(addr, taken);
                assert_eq!(source.raw_os_error(), Some(libc::EADDRINUSE));
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => panic!("second bind succeeded"),
        }
    }

    #[test]
    fn close_frees_the_entry_and_a_reset_stream_is_reset() {
        let (_poll, mut s) = sockets();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        s.tcp_connect(3, target, None).unwrap();
        let (mut peer, _) = server.accept().unwrap();
        s.close(3, Close::Reset);
        assert!(matches!(s.table[3], Entry::Free));
        let mut buf = [0u8; 1];
        peer.set_nonblocking(true).unwrap();
        assert_eq!(
            peer.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "closed before the turn's end"
        );
        assert!(
            s.closed_this_turn(3),
            "its late events are dropped this turn"
        );
        s.end_turn();
        assert!(!s.closed_this_turn(3), "the id's next socket is reported");
        let err = peer.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            s.read(3, &mut buf).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// Many ids closed in one turn, one of them reused at once: all are closed this turn,
    /// no other id is, and the next turn starts with none.
    #[test]
    fn closed_this_turn_holds_for_the_turn_of_the_close() {
        let (_poll, mut s) = sockets();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        for id in (0..200).step_by(2) {
            s.close(id, Close::Clean);
        }
        s.tcp_connect(4, target, None).unwrap();
        for id in 0..300 {
            assert_eq!(s.closed_this_turn(id), id < 200 && id % 2 == 0, "id {id}");
        }
        s.end_turn();
        assert!((0..300).all(|id| !s.closed_this_turn(id)), "a new turn");
        s.close(4, Close::Reset);
        s.close(250, Close::Clean);
        let closed: Vec<usize> = (0..300).filter(|&id| s.closed_this_turn(id)).collect();
        assert_eq!(closed, [4, 250]);
        s.end_turn();
        assert!((0..300).all(|id| !s.closed_this_turn(id)));
    }
}
