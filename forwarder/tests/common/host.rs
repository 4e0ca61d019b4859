//! An in-memory host for the forwarder: every host socket is a buffer here, every peer
//! is the test, nothing leaves the process.
//!
//! # Theory of operation
//!
//! [`MemHost`] implements [`forwarder::HostIo`] the way the kernel behaves for the calls
//! the forwarder makes, minus the network: a TCP connect to an address follows that
//! address's [`Remote`] (accepted, refused, unreachable, or never answered), a stream is
//! two byte queues (what the forwarder wrote, for the test to read as the peer; what the
//! peer sent, for the forwarder to read), a datagram socket is two datagram queues, and a
//! published port is a queue of connections and datagrams the test brings in.
//!
//! Readiness is edge-triggered as with epoll: every change a reader or writer would wait
//! for (data, room, FIN, reset, connect outcome) appends an event to
//! [`MemHost::events`], which the driver ([`super::Sim`]) hands to
//! `Forwarder::handle_ready`. There is no clock here: time is the driver's.
//!
//! Buffers are sized when a socket opens, so that carrying traffic allocates nothing
//! (`tests/no_alloc.rs` counts allocations with this host in the loop).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};

use forwarder::port::{PortError, PortRule, Proto};
use forwarder::{Close, HostIo, SpliceTo};

/// What a TCP connect to an address meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// A listener: the connection is made.
    Accept,
    /// Nobody listens: `ECONNREFUSED` when the connect completes.
    Refuse,
    /// `EHOSTUNREACH` when the connect completes (an ICMP error on the way).
    Unreachable,
    /// The SYN goes into a black hole: the connect never completes.
    Silent,
    /// The connect fails at once with this error number (`ENETUNREACH`, `EMFILE`...).
    FailNow(i32),
}

/// One readiness event, as epoll reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub id: usize,
    pub readable: bool,
    pub writable: bool,
    /// The peer closed its sending side (`EPOLLRDHUP`).
    pub hup: bool,
    /// An error is pending (`EPOLLERR`: a reset, a failed connect).
    pub error: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Connecting,
    Open,
    /// The connect failed with this error number (reported once).
    Failed(i32),
}

/// A stream's state.
#[derive(Debug)]
pub struct Stream {
    pub peer: SocketAddr,
    conn: Conn,
    /// What the forwarder wrote, for the peer.
    pub to_peer: VecDeque<u8>,
    /// What the peer sent, for the forwarder.
    pub to_fwd: VecDeque<u8>,
    /// The forwarder shut down its sending side (the peer got FIN).
    pub fwd_fin: bool,
    /// The peer shut down its sending side.
    pub peer_fin: bool,
    /// The peer reset the connection.
    pub peer_reset: bool,
    /// Not yet adopted (an accepted connection).
    pub watched: bool,
    /// A write found the buffer full: the next room raises writable.
    blocked: bool,
    /// Reads the forwarder made (system calls, for a real host).
    pub reads: usize,
}

/// A datagram socket's state (UDP or ping).
#[derive(Debug)]
pub struct Dgram {
    pub peer: SocketAddr,
    pub icmp: bool,
    /// Datagrams the forwarder sent, each prefixed by its length (2 bytes).
    sent: VecDeque<u8>,
    /// Datagrams for the forwarder, as above.
    inbox: VecDeque<u8>,
    /// The error number the next receive reports (an ICMP error for an earlier send).
    pub error: Option<i32>,
    /// Segmented sends taken.
    pub gso_sends: usize,
}

/// A published port's socket.
#[derive(Debug)]
pub struct Port {
    pub rule: PortRule,
    /// Connections waiting to be accepted: (client, the stream id it will get... none yet).
    backlog: VecDeque<SocketAddr>,
    /// Datagrams waiting: (client, local address, data).
    inbox: VecDeque<(SocketAddr, Option<IpAddr>, Vec<u8>)>,
    /// Datagrams sent back: (to, from, data).
    pub sent: Vec<(Option<SocketAddr>, Option<IpAddr>, Vec<u8>)>,
}

/// A spliced flow: the loopback client's connection and the one to the guest's port
/// opened inside the namespace, relayed by the host.
#[derive(Debug)]
pub struct Pair {
    /// The accepted connection's client.
    pub client: SocketAddr,
    /// Where the other side was opened.
    pub to: SpliceTo,
    /// What the client sent, not yet relayed.
    from_client: VecDeque<u8>,
    /// What the namespace's server sent, not yet relayed.
    from_ns: VecDeque<u8>,
    /// Relayed to the namespace's server.
    pub to_ns: Vec<u8>,
    /// Relayed to the client.
    pub to_client: Vec<u8>,
    /// The client / the server shut down its sending side.
    client_fin: bool,
    ns_fin: bool,
    /// The server / the client got that FIN (after the bytes before it).
    pub ns_got_fin: bool,
    pub client_got_fin: bool,
    /// Either side reset its connection.
    reset: bool,
}

#[derive(Debug)]
pub enum Sock {
    Stream(Stream),
    Dgram(Dgram),
    Port(Port),
    Pair(Pair),
}

/// A socket the forwarder closed, for tests to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub id: usize,
    pub peer: Option<SocketAddr>,
    pub how: Close,
    /// A stream the forwarder shut down before (a FIN went first).
    pub fin: bool,
}

/// Bytes a stream buffers each way before `WouldBlock`.
pub const STREAM_BUFFER: usize = 256 << 10;

/// Bytes of datagrams a socket queues each way.
const DGRAM_BUFFER: usize = 64 << 10;

/// The in-memory host; see the module's header.
pub struct MemHost {
    pub socks: Vec<Option<Sock>>,
    /// Readiness not yet handed to the forwarder.
    pub events: Vec<Ready>,
    /// The driver's second event list (swapped with `events` each turn).
    pub spare: Vec<Ready>,
    /// What a TCP connect meets, by address; others meet [`default_tcp`](Self::default_tcp).
    pub remotes: HashMap<SocketAddr, Remote>,
    pub default_tcp: Remote,
    /// Datagram and ping sockets to these addresses fail to open with this error number.
    pub unreachable: HashMap<IpAddr, i32>,
    /// Whether segmented sends are supported.
    pub gso: bool,
    /// Echo requests on ping sockets are answered at once.
    pub echo: bool,
    /// Listening addresses taken (a second rule for one fails with `EADDRINUSE`).
    pub bound: Vec<SocketAddr>,
    pub closed: Vec<Closed>,
    /// Splices meet this error number when opening the namespace's side.
    pub splice_error: Option<i32>,
    /// Sockets opened, of any kind.
    pub opened: usize,
}

impl Default for MemHost {
    fn default() -> MemHost {
        MemHost {
            socks: Vec::new(),
            events: Vec::with_capacity(1024),
            spare: Vec::with_capacity(1024),
            remotes: HashMap::new(),
            default_tcp: Remote::Refuse,
            unreachable: HashMap::new(),
            gso: true,
            echo: true,
            bound: Vec::new(),
            closed: Vec::new(),
            splice_error: None,
            opened: 0,
        }
    }
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

fn would_block() -> io::Error {
    io::Error::from(io::ErrorKind::WouldBlock)
}

fn push_dgram(q: &mut VecDeque<u8>, data: &[u8]) -> bool {
    if q.len() + 2 + data.len() > DGRAM_BUFFER {
        return false;
    }
    q.extend((data.len() as u16).to_le_bytes());
    q.extend(data);
    true
}

fn pop_dgram(q: &mut VecDeque<u8>, buf: &mut [u8]) -> Option<usize> {
    let len = usize::from(u16::from_le_bytes([*q.front()?, *q.get(1)?]));
    q.drain(..2);
    let n = len.min(buf.len());
    for (i, b) in q.drain(..len).enumerate() {
        if i < n {
            buf[i] = b;
        }
    }
    Some(n)
}

impl MemHost {
    fn event(&mut self, id: usize, readable: bool, writable: bool, hup: bool) {
        self.events.push(Ready {
            id,
            readable,
            writable,
            hup,
            error: false,
        });
    }

    /// A reset or a failed connect: everything at once, as epoll reports it.
    fn error_event(&mut self, id: usize) {
        self.events.push(Ready {
            id,
            readable: true,
            writable: true,
            hup: true,
            error: true,
        });
    }

    fn put(&mut self, id: usize, sock: Sock) {
        if self.socks.len() <= id {
            self.socks.resize_with(id + 1, || None);
        }
        self.socks[id] = Some(sock);
        self.opened += 1;
    }

    fn stream_mut(&mut self, id: usize) -> io::Result<&mut Stream> {
        match self.socks.get_mut(id) {
            Some(Some(Sock::Stream(s))) => Ok(s),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn dgram_mut(&mut self, id: usize) -> io::Result<&mut Dgram> {
        match self.socks.get_mut(id) {
            Some(Some(Sock::Dgram(d))) => Ok(d),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn port_mut(&mut self, id: usize) -> io::Result<&mut Port> {
        match self.socks.get_mut(id) {
            Some(Some(Sock::Port(p))) => Ok(p),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// The spliced flow `id`.
    pub fn pair(&self, id: usize) -> &Pair {
        match self.socks.get(id) {
            Some(Some(Sock::Pair(p))) => p,
            other => panic!("no spliced flow at {id}: {other:?}"),
        }
    }

    fn pair_mut(&mut self, id: usize) -> &mut Pair {
        match self.socks.get_mut(id) {
            Some(Some(Sock::Pair(p))) => p,
            other => panic!("no spliced flow at {id}: {other:?}"),
        }
    }

    /// The ids of the spliced flows open.
    pub fn pairs(&self) -> Vec<usize> {
        (0..self.socks.len())
            .filter(|&i| matches!(self.socks[i], Some(Sock::Pair(_))))
            .collect()
    }

    /// The loopback client of spliced flow `id` sends `data`.
    pub fn client_write(&mut self, id: usize, data: &[u8]) {
        self.pair_mut(id).from_client.extend(data);
        self.event(id, true, false, false);
    }

    /// The namespace's server of spliced flow `id` sends `data`.
    pub fn ns_write(&mut self, id: usize, data: &[u8]) {
        self.pair_mut(id).from_ns.extend(data);
        self.event(id, true, false, false);
    }

    /// The loopback client of spliced flow `id` shuts down its sending side.
    pub fn client_fin(&mut self, id: usize) {
        self.pair_mut(id).client_fin = true;
        self.event(id, true, false, true);
    }

    /// The namespace's server of spliced flow `id` shuts down its sending side.
    pub fn ns_fin(&mut self, id: usize) {
        self.pair_mut(id).ns_fin = true;
        self.event(id, true, false, true);
    }

    /// The loopback client of spliced flow `id` resets its connection.
    pub fn client_reset(&mut self, id: usize) {
        self.pair_mut(id).reset = true;
        self.error_event(id);
    }

    /// Makes TCP connects to `addr` meet `remote`.
    pub fn tcp(&mut self, addr: SocketAddr, remote: Remote) {
        self.remotes.insert(addr, remote);
    }

    /// The open streams to `peer` (by id).
    pub fn streams_to(&self, peer: SocketAddr) -> Vec<usize> {
        self.find(|s| matches!(s, Sock::Stream(s) if s.peer == peer))
    }

    /// The stream to `peer` (the only one).
    pub fn stream_to(&self, peer: SocketAddr) -> Option<usize> {
        let all = self.streams_to(peer);
        assert!(all.len() <= 1, "several streams to {peer}");
        all.first().copied()
    }

    /// The datagram socket to `peer`.
    pub fn dgram_to(&self, peer: SocketAddr) -> Option<usize> {
        self.dgrams_to(peer).first().copied()
    }

    /// Every open datagram socket connected to `peer`, oldest first.
    pub fn dgrams_to(&self, peer: SocketAddr) -> Vec<usize> {
        self.find(|s| matches!(s, Sock::Dgram(d) if d.peer == peer))
    }

    /// The published port listening on `addr`.
    pub fn port_at(&self, addr: SocketAddr) -> Option<usize> {
        self.find(|s| matches!(s, Sock::Port(p) if p.rule.host == addr))
            .first()
            .copied()
    }

    fn find(&self, f: impl Fn(&Sock) -> bool) -> Vec<usize> {
        self.socks
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| f(s)).map(|_| i))
            .collect()
    }

    /// Open sockets.
    pub fn open_sockets(&self) -> usize {
        self.socks.iter().flatten().count()
    }

    /// The stream `id`, as the peer sees it.
    pub fn stream(&self, id: usize) -> &Stream {
        match &self.socks[id] {
            Some(Sock::Stream(s)) => s,
            other => panic!("no stream at {id}: {other:?}"),
        }
    }

    /// The peer takes up to `max` bytes of what the forwarder wrote.
    pub fn peer_read(&mut self, id: usize, max: usize) -> Vec<u8> {
        let s = self.stream_mut(id).expect("stream");
        let n = max.min(s.to_peer.len());
        let got: Vec<u8> = s.to_peer.drain(..n).collect();
        let wake = s.blocked && n > 0;
        if wake {
            s.blocked = false;
            self.event(id, false, true, false);
        }
        got
    }

    /// The peer drops what the forwarder wrote; returns how much (allocates nothing).
    pub fn peer_discard(&mut self, id: usize) -> usize {
        let s = self.stream_mut(id).expect("stream");
        let n = s.to_peer.len();
        s.to_peer.clear();
        if s.blocked && n > 0 {
            s.blocked = false;
            self.event(id, false, true, false);
        }
        n
    }

    /// The peer of datagram socket `id` sends back every datagram it got (allocates
    /// nothing); returns how many.
    pub fn dgram_echo(&mut self, id: usize) -> usize {
        let d = self.dgram_mut(id).expect("datagram socket");
        let mut n = 0;
        while let Some(len) = d.sent.front().copied().zip(d.sent.get(1).copied()) {
            let len = 2 + usize::from(u16::from_le_bytes([len.0, len.1]));
            if d.inbox.len() + len > DGRAM_BUFFER {
                break;
            }
            d.inbox.extend(d.sent.drain(..len));
            n += 1;
        }
        if n > 0 {
            self.event(id, true, false, false);
        }
        n
    }

    /// The peer takes everything the forwarder wrote.
    pub fn peer_read_all(&mut self, id: usize) -> Vec<u8> {
        self.peer_read(id, usize::MAX)
    }

    /// The peer sends `data` (what fits; returns how much).
    pub fn peer_write(&mut self, id: usize, data: &[u8]) -> usize {
        let s = self.stream_mut(id).expect("stream");
        let n = data.len().min(STREAM_BUFFER - s.to_fwd.len());
        s.to_fwd.extend(&data[..n]);
        if n > 0 {
            self.event(id, true, false, false);
        }
        n
    }

    /// The peer shuts down its sending side (FIN).
    pub fn peer_fin(&mut self, id: usize) {
        self.stream_mut(id).expect("stream").peer_fin = true;
        self.event(id, true, false, true);
    }

    /// The peer resets the connection (RST).
    /// What it sent before stays readable; the reset is reported after it, as the kernel's
    /// `recv` does.
    pub fn peer_reset(&mut self, id: usize) {
        self.stream_mut(id).expect("stream").peer_reset = true;
        self.error_event(id);
    }

    /// Datagrams the forwarder sent on `id` since the last call.
    pub fn take_sent(&mut self, id: usize) -> Vec<Vec<u8>> {
        let d = self.dgram_mut(id).expect("datagram socket");
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Some(n) = pop_dgram(&mut d.sent, &mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// The peer of datagram socket `id` sends `data`.
    pub fn dgram_reply(&mut self, id: usize, data: &[u8]) {
        let d = self.dgram_mut(id).expect("datagram socket");
        if push_dgram(&mut d.inbox, data) {
            self.event(id, true, false, false);
        }
    }

    /// The next receive on `id` reports `errno` (an ICMP error for an earlier datagram).
    pub fn dgram_error(&mut self, id: usize, n: i32) {
        self.dgram_mut(id).expect("datagram socket").error = Some(n);
        self.event(id, true, false, false);
    }

    /// A client connects to the published port at `addr` from `client`.
    pub fn connect_in(&mut self, addr: SocketAddr, client: SocketAddr) {
        let id = self.port_at(addr).expect("a published port there");
        self.port_mut(id).unwrap().backlog.push_back(client);
        self.event(id, true, false, false);
    }

    /// A client sends `data` to the published UDP port at `addr` from `client`, to the
    /// local address `local`.
    pub fn datagram_in(
        &mut self,
        addr: SocketAddr,
        client: SocketAddr,
        local: Option<IpAddr>,
        data: &[u8],
    ) {
        let id = self.port_at(addr).expect("a published port there");
        let p = self.port_mut(id).unwrap();
        p.inbox.push_back((client, local, data.to_vec()));
        self.event(id, true, false, false);
    }

    /// Datagrams sent back through the published port at `addr`.
    pub fn port_sent(
        &mut self,
        addr: SocketAddr,
    ) -> Vec<(Option<SocketAddr>, Option<IpAddr>, Vec<u8>)> {
        let id = self.port_at(addr).expect("a published port there");
        std::mem::take(&mut self.port_mut(id).unwrap().sent)
    }

    fn open_dgram(&mut self, id: usize, peer: SocketAddr, icmp: bool) -> io::Result<()> {
        if let Some(&n) = self.unreachable.get(&peer.ip()) {
            return Err(errno(n));
        }
        self.put(
            id,
            Sock::Dgram(Dgram {
                peer,
                icmp,
                sent: VecDeque::with_capacity(DGRAM_BUFFER),
                inbox: VecDeque::with_capacity(DGRAM_BUFFER),
                error: None,
                gso_sends: 0,
            }),
        );
        Ok(())
    }

    fn new_stream(peer: SocketAddr, conn: Conn, watched: bool) -> Stream {
        Stream {
            peer,
            conn,
            to_peer: VecDeque::with_capacity(STREAM_BUFFER),
            to_fwd: VecDeque::with_capacity(STREAM_BUFFER),
            fwd_fin: false,
            peer_fin: false,
            peer_reset: false,
            watched,
            blocked: false,
            reads: 0,
        }
    }
}

impl HostIo for MemHost {
    fn tcp_connect(
        &mut self,
        id: usize,
        target: SocketAddr,
        _bind: Option<IpAddr>,
    ) -> io::Result<bool> {
        let remote = self
            .remotes
            .get(&target)
            .copied()
            .unwrap_or(self.default_tcp);
        let conn = match remote {
            Remote::FailNow(n) => return Err(errno(n)),
            Remote::Accept | Remote::Silent => Conn::Connecting,
            Remote::Refuse => Conn::Failed(libc::ECONNREFUSED),
            Remote::Unreachable => Conn::Failed(libc::EHOSTUNREACH),
        };
        self.put(id, Sock::Stream(MemHost::new_stream(target, conn, true)));
        match remote {
            Remote::Silent => {}
            Remote::Accept => self.event(id, false, true, false),
            _ => self.error_event(id),
        }
        // Connects complete at their first readiness event, as a remote host's would.
        Ok(false)
    }

    fn tcp_connected(&mut self, id: usize) -> io::Result<bool> {
        let s = self.stream_mut(id)?;
        match s.conn {
            Conn::Open => Ok(true),
            Conn::Connecting => {
                // Completes at the first readiness (as the kernel's SYN-ACK); a
                // black-holed connect raises none.
                s.conn = Conn::Open;
                Ok(true)
            }
            Conn::Failed(n) => Err(errno(n)),
        }
    }

    fn read(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.stream_mut(id)?;
        s.reads += 1;
        if s.to_fwd.is_empty() {
            if s.peer_reset {
                return Err(errno(libc::ECONNRESET));
            }
            return if s.peer_fin {
                Ok(0)
            } else {
                Err(would_block())
            };
        }
        let n = buf.len().min(s.to_fwd.len());
        let (a, b) = s.to_fwd.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.to_fwd.drain(..n);
        Ok(n)
    }

    fn write(&mut self, id: usize, buf: &[u8]) -> io::Result<usize> {
        let s = self.stream_mut(id)?;
        if s.peer_reset {
            return Err(errno(libc::EPIPE));
        }
        let room = STREAM_BUFFER - s.to_peer.len();
        if room == 0 {
            s.blocked = true;
            return Err(would_block());
        }
        let n = buf.len().min(room);
        s.to_peer.extend(&buf[..n]);
        if n < buf.len() {
            s.blocked = true;
        }
        Ok(n)
    }

    fn shutdown_write(&mut self, id: usize) {
        if let Ok(s) = self.stream_mut(id) {
            s.fwd_fin = true;
        }
    }

    fn udp_open(&mut self, id: usize, target: SocketAddr, _bind: Option<IpAddr>) -> io::Result<()> {
        self.open_dgram(id, target, false)
    }

    fn udp_connect(&mut self, id: usize, to: SocketAddr) -> io::Result<()> {
        self.dgram_mut(id)?.peer = to;
        Ok(())
    }

    fn icmp_open(&mut self, id: usize, dst: IpAddr, _bind: Option<IpAddr>) -> io::Result<()> {
        self.open_dgram(id, SocketAddr::new(dst, 0), true)
    }

    fn send(&mut self, id: usize, data: &[u8]) -> io::Result<usize> {
        let echo = self.echo;
        let d = self.dgram_mut(id)?;
        if !push_dgram(&mut d.sent, data) {
            return Err(would_block());
        }
        if d.icmp && echo && data.len() >= 8 {
            let mut reply = [0u8; 1500];
            let n = data.len().min(reply.len());
            reply[..n].copy_from_slice(&data[..n]);
            reply[0] = match reply[0] {
                8 => 0,
                128 => 129,
                other => other,
            };
            if push_dgram(&mut d.inbox, &reply[..n]) {
                self.event(id, true, false, false);
            }
        }
        Ok(data.len())
    }

    fn recv(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.dgram_mut(id)?;
        if let Some(n) = d.error.take() {
            return Err(errno(n));
        }
        pop_dgram(&mut d.inbox, buf).ok_or_else(would_block)
    }

    fn send_msg(
        &mut self,
        id: usize,
        data: &[u8],
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
        seg: Option<u16>,
    ) -> io::Result<usize> {
        if let Ok(p) = self.port_mut(id) {
            p.sent.push((to, from, data.to_vec()));
            return Ok(data.len());
        }
        let d = self.dgram_mut(id)?;
        match seg {
            None => {
                if !push_dgram(&mut d.sent, data) {
                    return Err(would_block());
                }
            }
            Some(seg) => {
                d.gso_sends += 1;
                for datagram in data.chunks(usize::from(seg.max(1))) {
                    if !push_dgram(&mut d.sent, datagram) {
                        return Err(would_block());
                    }
                }
            }
        }
        Ok(data.len())
    }

    fn recv_from(
        &mut self,
        id: usize,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        let p = self.port_mut(id)?;
        let (client, local, data) = p.inbox.pop_front().ok_or_else(would_block)?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok((n, client, local))
    }

    fn udp_gso(&self) -> bool {
        self.gso
    }

    fn listen(&mut self, id: usize, rule: &PortRule) -> Result<(), PortError> {
        if self.bound.contains(&rule.host) {
            return Err(PortError::InUse {
                addr: rule.host,
                source: errno(libc::EADDRINUSE),
            });
        }
        self.bound.push(rule.host);
        self.put(
            id,
            Sock::Port(Port {
                rule: rule.clone(),
                backlog: VecDeque::new(),
                inbox: VecDeque::new(),
                sent: Vec::new(),
            }),
        );
        Ok(())
    }

    fn accept(&mut self, listener: usize, id: usize) -> io::Result<SocketAddr> {
        let p = self.port_mut(listener)?;
        if p.rule.proto != Proto::Tcp {
            return Err(errno(libc::EINVAL));
        }
        let client = p.backlog.pop_front().ok_or_else(would_block)?;
        self.put(
            id,
            Sock::Stream(MemHost::new_stream(client, Conn::Open, false)),
        );
        Ok(client)
    }

    fn adopt(&mut self, id: usize) -> io::Result<()> {
        self.stream_mut(id)?.watched = true;
        Ok(())
    }

    fn splice_tcp(&mut self, id: usize, to: SpliceTo) -> io::Result<()> {
        let client = match self.socks.get(id) {
            Some(Some(Sock::Stream(s))) => s.peer,
            _ => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        if let Some(n) = self.splice_error {
            self.socks[id] = None;
            return Err(errno(n));
        }
        self.socks[id] = Some(Sock::Pair(Pair {
            client,
            to,
            from_client: VecDeque::new(),
            from_ns: VecDeque::new(),
            to_ns: Vec::new(),
            to_client: Vec::new(),
            client_fin: false,
            ns_fin: false,
            ns_got_fin: false,
            client_got_fin: false,
            reset: false,
        }));
        // Both sockets are watched from now on: what the client sent already is there.
        self.event(id, true, true, false);
        Ok(())
    }

    fn splice_relay(&mut self, id: usize) -> (usize, bool) {
        let Some(Some(Sock::Pair(p))) = self.socks.get_mut(id) else {
            return (0, true);
        };
        if p.reset {
            return (0, true);
        }
        let n = p.from_client.len() + p.from_ns.len();
        p.to_ns.extend(p.from_client.drain(..));
        p.to_client.extend(p.from_ns.drain(..));
        p.ns_got_fin |= p.client_fin;
        p.client_got_fin |= p.ns_fin;
        (n, p.ns_got_fin && p.client_got_fin)
    }

    fn splice_listen(&mut self, id: usize, proto: Proto, addr: SocketAddr) -> io::Result<()> {
        if let Some(n) = self.splice_error {
            return Err(errno(n));
        }
        let rule = PortRule {
            id: 0,
            proto,
            host: addr,
            guest: std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            device: None,
        };
        self.listen(id, &rule).map_err(|_| errno(libc::EADDRINUSE))
    }

    /// The namespace's socket is a datagram socket to the guest's port (at the client's
    /// address: this host has no namespace).
    fn splice_udp(&mut self, id: usize, client: SocketAddr, guest_port: u16) -> io::Result<()> {
        if let Some(n) = self.splice_error {
            return Err(errno(n));
        }
        self.open_dgram(id, SocketAddr::new(client.ip(), guest_port), false)
    }

    fn close(&mut self, id: usize, how: Close) {
        let Some(sock) = self.socks.get_mut(id).and_then(Option::take) else {
            return;
        };
        let (peer, fin) = match &sock {
            Sock::Stream(s) => (Some(s.peer), s.fwd_fin),
            Sock::Dgram(d) => (Some(d.peer), false),
            Sock::Port(p) => {
                self.bound.retain(|a| *a != p.rule.host);
                (None, false)
            }
            Sock::Pair(p) => (Some(p.client), p.client_got_fin),
        };
        self.closed.push(Closed { id, peer, how, fin });
        // A closed socket raises nothing more (its id may be reused at once).
        self.events.retain(|e| e.id != id);
    }
}
