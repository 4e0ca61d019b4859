//! TCP flows: a smoltcp socket facing the guest, a host stream facing the world.
//!
//! # Theory of operation
//!
//! Lifecycle of a flow (one per guest 4-tuple):
//!
//! ```text
//!  guest SYN ──> Connecting ──(host connect ok)──> Open ──(both sides closed)──> freed
//!                    │                               │
//!                    │ refused: RST to the guest      │ reset on either side: RST to
//!                    │ unreachable: ICMP to the guest │ the other, freed
//!                    └──> freed                       └──> freed
//! ```
//!
//! - **Connecting.** The SYN is fed to a fresh smoltcp socket that listens on exactly the
//!   destination the guest asked for (`any_ip`), with `pause_synack` set, while the host
//!   socket connects. Only when the host connection succeeds does smoltcp answer SYN-ACK,
//!   so a refused connection reaches the guest as a RST and an unreachable one as an ICMP
//!   error, as a kernel router would report them. The SYN's first bytes are kept to quote
//!   in that ICMP error.
//! - **Open.** Data moves through smoltcp's buffers straight to and from the host socket
//!   (`recv`/`send` closures call the host's `write`/`read`, [`HostIo`]): one copy each
//!   way. Readiness is
//!   edge-triggered, so the flow remembers whether the host socket is readable/writable
//!   and stops reading when smoltcp's transmit buffer is full (the guest's window
//!   throttles the host through TCP flow control on the host socket).
//! - **Half-close.** Host EOF closes smoltcp's send side (FIN after the buffered data); a
//!   guest FIN shuts down the host socket's write side once smoltcp's receive buffer is
//!   drained.
//! - **Urgent data.** smoltcp cannot send an urgent pointer, so a host peer's urgent byte
//!   (`MSG_OOB`) reaches the guest as an ordinary byte in its place in the stream: the
//!   host socket keeps it inline (`SO_OOBINLINE`) and reports its arrival
//!   ([`Ready::urgent`]). A read ends at the urgent mark, so once urgent data came a
//!   short read no longer counts as a drained socket, nor, after the FIN, as its end.
//! - **Teardown.** A flow is freed when smoltcp reaches CLOSED or TIME-WAIT (TIME-WAIT
//!   would otherwise pin the flow for 10 s). If the host side did not close cleanly, the
//!   host socket is closed with a RST (`SO_LINGER` 0), as a kernel would on reset.
//!
//! Settings: Nagle off, ACKs delayed 1 ms at most, no congestion control (the guest link is local),
//! a 60 s user timeout for unacknowledged data so a vanished guest cannot pin a flow.
//!
//! A pending host connect has a deadline of its own, [`CONNECT_TIMEOUT`] (20 s, where
//! Linux's default SYN retries take about 127 s): a destination that never answers is then
//! reported to the guest as host unreachable and the flow leaves the half-open table, so
//! that after a SYN flood into a black hole the table drains by itself within 20 s.

use std::io;
use std::net::SocketAddr;

use smoltcp::iface::{PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpListenEndpoint;

use crate::icmp::Unreachable;
use crate::{sys, Close, Counters, FlowKey, HostIo, Io, Link, Ready};

/// Bytes of the guest's SYN kept for an ICMP error: the IPv4 header (with options) and
/// the first 8 bytes of TCP.
const SYN_QUOTE: usize = 60 + 8;

/// Queued bytes at which a flow's segments are written to the guest at once, rather than
/// at the end of the turn: frames leave while their bytes are still in the CPU cache
/// (a turn can otherwise queue 256 64 KiB super-frames, 16 MiB, before the first write).
const FLUSH_BYTES: usize = 256 << 10;

/// How long a host connect may stay pending before the flow gives up (host unreachable to
/// the guest). The host's own SYN retries end it sooner where they are set lower.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How a flow's host connection could not be made.
#[derive(Debug)]
pub enum OpenError {
    /// The destination refused (ECONNREFUSED).
    Refused,
    /// No route, or the host did not answer.
    Unreachable(Unreachable),
    /// A local failure (EMFILE, ENOBUFS, ...).
    Local(io::Error),
}

/// Host socket options for new flows.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Source address for the host socket (of the target's family).
    pub outbound: Option<std::net::IpAddr>,
    /// smoltcp buffer bytes per direction.
    pub buffer: usize,
}

/// What the flow needs after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Keep it; wake it at this time (if any).
    Alive(Option<Instant>),
    /// The host connection failed: tell the guest, then free it.
    Unreachable(Unreachable),
    /// Free it.
    Done,
}

#[derive(Debug)]
enum Phase {
    /// The host connection is in progress until the deadline (set at the first poll);
    /// the guest's SYN waits in SYN-RECEIVED.
    Connecting(Option<Instant>),
    /// Both sides are connected.
    Open,
}

/// One TCP flow.
pub struct TcpFlow {
    pub(crate) key: FlowKey,
    /// The flow's id: its host socket's name for the [`HostIo`].
    id: usize,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    phase: Phase,
    syn: [u8; SYN_QUOTE],
    syn_len: usize,
    host_readable: bool,
    host_writable: bool,
    host_eof: bool,
    /// The peer closed its sending side: what is left to read ends in an end of stream,
    /// or in an error if `host_error`.
    host_hup: bool,
    /// An error is pending on the host socket (a reset).
    host_error: bool,
    /// Urgent data came on the host socket: a read may end at its mark, short with more
    /// to follow, so a short read tells nothing (kept for the flow's life: one read more
    /// per drain, only on the rare flows with urgent data).
    host_urgent: bool,
    host_wr_shut: bool,
    /// The host side is to be reset when the flow is closed.
    host_reset: bool,
    /// Bytes relayed, both directions together (saturating): how much of smoltcp's
    /// buffers was touched.
    moved: usize,
    pub(crate) dirty: bool,
    pub(crate) timer: Option<Instant>,
}

fn classify(e: &io::Error) -> OpenError {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => OpenError::Refused,
        Some(libc::ENETUNREACH) => OpenError::Unreachable(Unreachable::Net),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) | Some(libc::EHOSTDOWN) => {
            OpenError::Unreachable(Unreachable::Host)
        }
        Some(libc::EACCES) | Some(libc::EPERM) => OpenError::Unreachable(Unreachable::Prohibited),
        _ => OpenError::Local(io::Error::new(e.kind(), e.to_string())),
    }
}

/// The guest-facing end of a flow: one smoltcp socket in a set of its own. Closed ones
/// are pooled and reused by later flows (`listen`/`connect` reset them), so that a new
/// connection allocates nothing and maps no buffer memory.
pub(crate) struct Guest {
    sockets: SocketSet<'static>,
    handle: SocketHandle,
}

impl Guest {
    /// A fresh socket with `buffer` bytes per direction, or `None` when that memory cannot
    /// be allocated (the flow is then refused; the process goes on).
    pub(crate) fn new(buffer: usize) -> Option<Guest> {
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(new_socket(buffer)?);
        Some(Guest { sockets, handle })
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }
}

impl TcpFlow {
    /// Starts the host connection for a guest SYN (`syn` is the whole IPv4 packet).
    /// `guest` is a closed socket (fresh or pooled).
    ///
    /// # Errors
    /// [`OpenError`] when the connection fails at once.
    pub(crate) fn open(
        id: usize,
        key: FlowKey,
        target: SocketAddr,
        syn: &[u8],
        opts: &OpenOptions,
        host: &mut impl HostIo,
        mut guest: Guest,
    ) -> Result<TcpFlow, OpenError> {
        let connected = host
            .tcp_connect(id, target, opts.outbound)
            .map_err(|e| classify(&e))?;

        let socket = guest.socket();
        // Connected already (the host's own addresses): the SYN-ACK leaves in this turn,
        // without a wait for the readiness event.
        socket.pause_synack(!connected);
        let endpoint = IpListenEndpoint {
            addr: Some(key.remote.0),
            port: key.remote.1,
        };
        // Cannot fail: the port is non-zero (a SYN to port 0 is refused by smoltcp's
        // parser before it gets here) and the socket is closed.
        if socket.listen(endpoint).is_err() {
            host.close(id, Close::Reset);
            return Err(OpenError::Refused);
        }
        let Guest { sockets, handle } = guest;
        let mut quote = [0u8; SYN_QUOTE];
        let syn_len = syn.len().min(SYN_QUOTE);
        quote[..syn_len].copy_from_slice(&syn[..syn_len]);
        Ok(TcpFlow {
            key,
            id,
            sockets,
            handle,
            phase: if connected {
                Phase::Open
            } else {
                Phase::Connecting(None)
            },
            syn: quote,
            syn_len,
            host_readable: false,
            host_writable: connected,
            host_eof: false,
            host_hup: false,
            host_error: false,
            host_urgent: false,
            host_wr_shut: false,
            host_reset: false,
            moved: 0,
            dirty: false,
            timer: None,
        })
    }

    /// A flow for a connection accepted on a published port: smoltcp connects from
    /// `key.remote` (the client as the guest will see it) to `key.guest`.
    ///
    /// The accepted connection is the host's under `id`.
    ///
    /// # Errors
    /// [`OpenError::Local`] when the host socket cannot be watched or smoltcp refuses
    /// the endpoints.
    pub(crate) fn accept(
        id: usize,
        key: FlowKey,
        link: &mut Link,
        host: &mut impl HostIo,
        mut guest: Guest,
    ) -> Result<TcpFlow, OpenError> {
        host.adopt(id).map_err(OpenError::Local)?;
        let socket = guest.socket();
        socket.pause_synack(false);
        let (remote, local) = (key.guest, key.remote);
        if let Err(e) = socket.connect(link.iface.context(), remote, local) {
            host.close(id, Close::Clean);
            return Err(OpenError::Local(io::Error::other(format!(
                "smoltcp connect: {e}"
            ))));
        }
        let Guest { sockets, handle } = guest;
        Ok(TcpFlow {
            key,
            id,
            sockets,
            handle,
            phase: Phase::Open,
            syn: [0; SYN_QUOTE],
            syn_len: 0,
            host_readable: true,
            host_writable: true,
            host_eof: false,
            host_hup: false,
            host_error: false,
            host_urgent: false,
            host_wr_shut: false,
            host_reset: false,
            moved: 0,
            dirty: false,
            timer: None,
        })
    }

    /// Whether the host connection is still being made.
    pub fn is_connecting(&self) -> bool {
        matches!(self.phase, Phase::Connecting(_))
    }

    /// The start of the guest's SYN, to quote in an ICMP error.
    pub fn syn(&self) -> &[u8] {
        &self.syn[..self.syn_len]
    }

    /// Feeds one guest segment (a whole IPv4 packet) to smoltcp.
    pub(crate) fn ingress(&mut self, now: Instant, link: &mut Link, ip: &[u8]) {
        let guest = self.key.guest.0;
        let mut dev = Link::device(
            &mut link.l2,
            &mut link.txq,
            &link.caps,
            Some(ip),
            guest,
            link.mtu,
        );
        link.iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
    }

    /// Records host socket readiness.
    pub(crate) fn on_ready(&mut self, r: Ready) {
        self.host_readable |= r.readable;
        self.host_writable |= r.writable;
        self.host_hup |= r.hup;
        self.host_error |= r.error;
        self.host_urgent |= r.urgent;
    }

    /// Moves data, sends segments, and says what the flow needs next (while the host
    /// connect is pending, a wake-up by its deadline at the latest).
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
    ) -> Status {
        let status = self.poll_phase(now, link, io, c);
        match (status, &self.phase) {
            (Status::Alive(at), Phase::Connecting(Some(deadline))) => {
                Status::Alive(Some(at.map_or(*deadline, |at| at.min(*deadline))))
            }
            (status, _) => status,
        }
    }

    fn poll_phase(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
    ) -> Status {
        if let Phase::Connecting(deadline) = self.phase {
            let deadline = deadline.unwrap_or(now + CONNECT_TIMEOUT);
            self.phase = Phase::Connecting(Some(deadline));
            if !self.host_writable && !self.host_readable {
                if now >= deadline {
                    log::debug!(
                        "TCP connect to {:?}: no answer in {CONNECT_TIMEOUT}",
                        self.key.remote
                    );
                    return Status::Unreachable(Unreachable::Host);
                }
                return self.egress(now, link, io, c);
            }
            match io.host.tcp_connected(self.id) {
                Ok(true) => {
                    self.phase = Phase::Open;
                    self.socket().pause_synack(false);
                }
                Ok(false) => {
                    // Spurious wake-up: still connecting.
                    self.host_writable = false;
                    self.host_readable = false;
                    return self.egress(now, link, io, c);
                }
                Err(e) => return self.connect_failed(&e, now, link, io, c),
            }
        }
        self.relay(io.host);
        self.egress(now, link, io, c)
    }

    fn connect_failed(
        &mut self,
        e: &io::Error,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
    ) -> Status {
        log::debug!("TCP connect to {:?} failed: {e}", self.key.remote);
        match classify(e) {
            OpenError::Unreachable(code) => Status::Unreachable(code),
            OpenError::Refused => {
                c.tcp_refused += 1;
                self.socket().abort();
                self.egress(now, link, io, c);
                Status::Done
            }
            OpenError::Local(_) => {
                c.tcp_host_errors += 1;
                self.socket().abort();
                self.egress(now, link, io, c);
                Status::Done
            }
        }
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// Copies data both ways between smoltcp and the host socket.
    fn relay(&mut self, host: &mut impl HostIo) {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
        let id = self.id;

        // Guest -> host.
        while self.host_writable && !self.host_wr_shut && socket.can_recv() {
            let res = socket.recv(|buf| match host.write(id, buf) {
                Ok(n) => (n, Ok((n, buf.len()))),
                Err(e) => (0, Err(e)),
            });
            if let Ok(Ok((n, _))) = res {
                self.moved = self.moved.saturating_add(n);
            }
            match res {
                Ok(Ok((0, _))) | Err(_) => break,
                // A short write means the socket buffer is full: EPOLLOUT will say when
                // it is not, no need for a write that fails with EAGAIN.
                Ok(Ok((n, len))) if n < len => self.host_writable = false,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    log::debug!("host write failed: {e}");
                    socket.abort();
                    return;
                }
            }
        }
        let guest_fin = matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        );
        if guest_fin && !socket.can_recv() && !self.host_wr_shut {
            host.shutdown_write(id);
            self.host_wr_shut = true;
        }

        // Host -> guest.
        while self.host_readable && !self.host_eof && socket.can_send() {
            let res = socket.send(|buf| match host.read(id, buf) {
                Ok(n) => (n, Ok((n, buf.len()))),
                Err(e) => (0, Err(e)),
            });
            if let Ok(Ok((n, _))) = res {
                self.moved = self.moved.saturating_add(n);
            }
            match res {
                Ok(Ok((0, _))) => {
                    self.host_eof = true;
                    socket.close();
                }
                // A short read drained the socket. Before the peer's FIN, the next data
                // raises a new edge: skip the read that would fail with EAGAIN. After
                // it, nothing more can come: that read would return the end of stream,
                // so take it as read (and the guest gets the FIN with the last data).
                // Unless an error is pending: a reset must be read, to reset the guest.
                // Nor after urgent data: a read ends at its mark (Linux's tcp_recvmsg),
                // with the rest still queued, and only the next read can tell.
                Ok(Ok((n, len))) if n < len && self.host_urgent => {}
                Ok(Ok((n, len))) if n < len && !self.host_hup => self.host_readable = false,
                Ok(Ok((n, len))) if n < len && !self.host_error => {
                    self.host_eof = true;
                    socket.close();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    log::debug!("host read failed: {e}");
                    socket.abort();
                    return;
                }
                Err(_) => break,
            }
        }
    }

    /// Sends what smoltcp has to send; decides whether the flow is over.
    fn egress(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
    ) -> Status {
        let guest = self.key.guest.0;
        loop {
            let mut dev = Link::device(
                &mut link.l2,
                &mut link.txq,
                &link.caps,
                None,
                guest,
                link.mtu,
            );
            let res = link.iface.poll_egress(now, &mut dev, &mut self.sockets);
            if link.txq.is_full() || link.txq.bytes() >= FLUSH_BYTES {
                if !link.flush(io.tap, c) {
                    break;
                }
                continue;
            }
            if res == PollResult::None {
                break;
            }
        }
        let socket = self.sockets.get::<tcp::Socket>(self.handle);
        match socket.state() {
            State::Closed => {
                if !(self.host_eof && self.host_wr_shut) {
                    // The guest reset, or we aborted: reset the host side too.
                    self.host_reset = true;
                }
                Status::Done
            }
            State::TimeWait if !socket.can_recv() => {
                if !self.host_wr_shut {
                    io.host.shutdown_write(self.id);
                }
                Status::Done
            }
            _ => Status::Alive(link.iface.poll_at(now, &self.sockets)),
        }
    }

    /// Bytes relayed in both directions together: an upper bound on the pages of
    /// smoltcp's buffers this flow made resident.
    pub(crate) fn moved(&self) -> usize {
        self.moved
    }

    /// Resets the flow both ways (the egress policy now denies it): a RST to the guest
    /// now, and one to the host peer when the flow is closed.
    pub(crate) fn reset(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
    ) {
        self.socket().abort();
        let _ = self.egress(now, link, io, c);
    }

    /// Closes the host socket (with a RST when the flow ended in one); hands back the
    /// guest socket, closed, for reuse.
    pub(crate) fn close(self, host: &mut impl HostIo) -> Guest {
        let TcpFlow {
            id,
            host_reset,
            sockets,
            handle,
            ..
        } = self;
        let how = if host_reset {
            Close::Reset
        } else {
            Close::Clean
        };
        host.close(id, how);
        let mut guest = Guest { sockets, handle };
        if guest.socket().is_open() {
            // Never dispatched again: the flow is gone. `listen`/`connect` reset it.
            guest.socket().abort();
        }
        guest
    }
}

/// A guest-facing socket with our settings, or `None` when its buffers cannot be had.
fn new_socket(buffer: usize) -> Option<tcp::Socket<'static>> {
    let rx = tcp::SocketBuffer::new(sys::zeroed_buffer(buffer)?);
    let tx = tcp::SocketBuffer::new(sys::zeroed_buffer(buffer)?);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    // A reply from the host within 1 ms carries the ACK (one frame to the guest instead
    // of two per request/response); bulk data is still acknowledged at once (smoltcp
    // ACKs immediately once more than one MSS is unacknowledged).
    socket.set_ack_delay(Some(Duration::from_millis(1)));
    socket.set_timeout(Some(Duration::from_secs(60)));
    Some(socket)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::IpAddr;

    use etherparse::{SlicedPacket, TransportSlice};
    use smoltcp::wire::{EthernetAddress, IpAddress};

    use super::*;
    use crate::port::{PortError, PortRule, Proto};
    use crate::{Config, Forwarder, Topology};

    const READABLE: Ready = Ready {
        readable: true,
        writable: false,
        hup: false,
        error: false,
        urgent: false,
    };
    const WRITABLE: Ready = Ready {
        readable: false,
        writable: true,
        hup: false,
        error: false,
        urgent: false,
    };

    /// A host of one stream, scripted by the test.
    #[derive(Default)]
    struct OneStream {
        /// The connect's outcome so far: `None` pending, `Some(0)` made, else an errno.
        outcome: Option<i32>,
        to_peer: Vec<u8>,
        to_fwd: VecDeque<u8>,
        /// Bytes the next writes may take before `WouldBlock`.
        room: usize,
        writes: usize,
        fin: bool,
        closed: Option<Close>,
    }

    impl HostIo for OneStream {
        fn tcp_connect(&mut self, _: usize, _: SocketAddr, _: Option<IpAddr>) -> io::Result<bool> {
            Ok(false)
        }
        fn tcp_connected(&mut self, _: usize) -> io::Result<bool> {
            match self.outcome {
                None => Ok(false),
                Some(0) => Ok(true),
                Some(n) => Err(io::Error::from_raw_os_error(n)),
            }
        }
        fn read(&mut self, _: usize, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.to_fwd.len());
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            for (b, d) in buf.iter_mut().zip(self.to_fwd.drain(..n)) {
                *b = d;
            }
            Ok(n)
        }
        fn write(&mut self, _: usize, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            let n = buf.len().min(self.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= n;
            self.to_peer.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn shutdown_write(&mut self, _: usize) {
            self.fin = true;
        }
        fn close(&mut self, _: usize, how: Close) {
            self.closed = Some(how);
        }
        // Not a stream's: never called by a TCP flow.
        fn udp_open(&mut self, _: usize, _: SocketAddr, _: Option<IpAddr>) -> io::Result<()> {
            unreachable!()
        }
        fn udp_connect(&mut self, _: usize, _: SocketAddr) -> io::Result<()> {
            unreachable!()
        }
        fn icmp_open(&mut self, _: usize, _: IpAddr, _: Option<IpAddr>) -> io::Result<()> {
            unreachable!()
        }
        fn send(&mut self, _: usize, _: &[u8]) -> io::Result<usize> {
            unreachable!()
        }
        fn recv(&mut self, _: usize, _: &mut [u8]) -> io::Result<usize> {
            unreachable!()
        }
        fn send_msg(
            &mut self,
            _: usize,
            _: &[u8],
            _: Option<SocketAddr>,
            _: Option<IpAddr>,
            _: Option<u16>,
        ) -> io::Result<usize> {
            unreachable!()
        }
        fn recv_from(
            &mut self,
            _: usize,
            _: &mut [u8],
        ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
            unreachable!()
        }
        fn udp_gso(&self) -> bool {
            false
        }
        fn listen(&mut self, _: usize, _: &PortRule) -> Result<(), PortError> {
            unreachable!()
        }
        fn accept(&mut self, _: usize, _: usize) -> io::Result<SocketAddr> {
            unreachable!()
        }
        fn adopt(&mut self, _: usize) -> io::Result<()> {
            unreachable!()
        }
        fn splice_tcp(&mut self, _: usize, _: crate::SpliceTo) -> io::Result<()> {
            unreachable!()
        }
        fn splice_listen(&mut self, _: usize, _: Proto, _: SocketAddr) -> io::Result<()> {
            unreachable!()
        }
        fn splice_relay(&mut self, _: usize) -> (usize, bool) {
            unreachable!()
        }
        fn splice_udp(&mut self, _: usize, _: SocketAddr, _: u16) -> io::Result<()> {
            unreachable!()
        }
    }

    struct NoTap;

    impl crate::FrameSink for NoTap {
        fn send_frame(&mut self, _: crate::PortId, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
    }

    const GUEST: [u8; 4] = [10, 0, 2, 100];
    const GW: [u8; 4] = [10, 0, 2, 2];

    /// A forwarder whose link knows the guest's MAC address, a flow key and its SYN.
    fn setup() -> (Forwarder, FlowKey, Vec<u8>) {
        let cfg = Config {
            tcp_buffer: 64 << 10,
            seed: 1,
            ..Config::default()
        };
        let topology = Topology::Network {
            member_flows: 16,
            internal: false,
        };
        let mut fwd = Forwarder::new(cfg, topology, Instant::from_millis(1));
        let mac = EthernetAddress([2, 0, 0, 0, 0, 0x64]);
        fwd.link
            .l2
            .set_neighbor(IpAddress::v4(10, 0, 2, 100), Some(mac));
        let key = FlowKey {
            guest: (IpAddress::v4(10, 0, 2, 100), 40000),
            remote: (IpAddress::v4(10, 0, 2, 2), 80),
        };
        (fwd, key, segment(1000, None, |b| b.syn(), &[]))
    }

    /// A guest segment (an IPv4 packet) to the gateway's port 80.
    fn segment(
        seq: u32,
        ack: Option<u32>,
        f: impl FnOnce(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        data: &[u8],
    ) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(GUEST, GW, 64).tcp(40000, 80, seq, 65535);
        let b = match ack {
            Some(a) => f(b.ack(a)),
            None => f(b),
        };
        let mut out = Vec::new();
        b.write(&mut out, data).unwrap();
        out
    }

    /// The TCP segments queued for the guest (taken): (syn, ack, rst, seq, ack number).
    fn queued(link: &mut Link) -> Vec<(bool, bool, bool, u32, u32)> {
        let mut out = Vec::new();
        while let Some(frame) = link.txq.front() {
            if let Ok(p) = SlicedPacket::from_ethernet(frame) {
                if let Some(TransportSlice::Tcp(t)) = p.transport {
                    let h = t.to_header();
                    out.push((
                        h.syn,
                        h.ack,
                        h.rst,
                        h.sequence_number,
                        h.acknowledgment_number,
                    ));
                }
            }
            link.txq.pop();
        }
        out
    }

    fn open(fwd: &mut Forwarder, key: FlowKey, syn: &[u8], host: &mut OneStream) -> TcpFlow {
        let opts = OpenOptions {
            outbound: None,
            buffer: 64 << 10,
        };
        let guest = Guest::new(64 << 10).unwrap();
        let target = SocketAddr::from(([127, 0, 0, 1], 80));
        let mut flow = TcpFlow::open(3, key, target, syn, &opts, host, guest).unwrap();
        flow.ingress(Instant::from_millis(2), &mut fwd.link, syn);
        flow
    }

    fn poll(fwd: &mut Forwarder, flow: &mut TcpFlow, host: &mut OneStream, ms: i64) -> Status {
        let mut io = Io {
            host,
            tap: &mut NoTap,
        };
        let mut c = Counters::default();
        flow.poll(Instant::from_millis(ms), &mut fwd.link, &mut io, &mut c)
    }

    #[test]
    fn syn_ack_waits_for_the_host_connection() {
        let (mut fwd, key, syn) = setup();
        let mut host = OneStream::default();
        let mut flow = open(&mut fwd, key, &syn, &mut host);
        assert!(matches!(
            poll(&mut fwd, &mut flow, &mut host, 2),
            Status::Alive(Some(_))
        ));
        assert_eq!(
            queued(&mut fwd.link),
            [],
            "nothing before the host connected"
        );
        // A spurious wake-up: still connecting.
        flow.on_ready(WRITABLE);
        poll(&mut fwd, &mut flow, &mut host, 3);
        assert!(flow.is_connecting());
        assert_eq!(queued(&mut fwd.link), []);
        host.outcome = Some(0);
        flow.on_ready(WRITABLE);
        poll(&mut fwd, &mut flow, &mut host, 4);
        assert!(!flow.is_connecting());
        let q = queued(&mut fwd.link);
        assert_eq!(q.len(), 1);
        let (syn, ack, rst, _, ack_no) = q[0];
        assert_eq!((syn, ack, rst, ack_no), (true, true, false, 1001));
    }

    #[test]
    fn a_connect_without_answer_gives_up_at_the_deadline() {
        let (mut fwd, key, syn) = setup();
        let mut host = OneStream::default();
        let mut flow = open(&mut fwd, key, &syn, &mut host);
        let deadline = 2 + CONNECT_TIMEOUT.total_millis() as i64;
        match poll(&mut fwd, &mut flow, &mut host, 2) {
            Status::Alive(Some(at)) => assert!(at.total_millis() <= deadline),
            other => panic!("{other:?}"),
        }
        let before = poll(&mut fwd, &mut flow, &mut host, deadline - 1);
        assert!(matches!(before, Status::Alive(_)), "{before:?}");
        let at = poll(&mut fwd, &mut flow, &mut host, deadline);
        assert_eq!(at, Status::Unreachable(Unreachable::Host));
        assert_eq!(flow.syn(), &syn[..], "the SYN is quoted in the ICMP error");
    }

    #[test]
    fn a_refused_connect_resets_both_sides() {
        let (mut fwd, key, syn) = setup();
        let mut host = OneStream {
            outcome: Some(libc::ECONNREFUSED),
            ..OneStream::default()
        };
        let mut flow = open(&mut fwd, key, &syn, &mut host);
        flow.on_ready(Ready {
            readable: true,
            writable: true,
            hup: true,
            error: true,
            urgent: false,
        });
        assert_eq!(poll(&mut fwd, &mut flow, &mut host, 2), Status::Done);
        let q = queued(&mut fwd.link);
        assert!(
            q.iter().any(|&(_, _, rst, _, _)| rst),
            "RST to the guest: {q:?}"
        );
        flow.close(&mut host);
        assert_eq!(host.closed, Some(Close::Reset));
    }

    #[test]
    fn a_short_write_waits_for_writable() {
        let (mut fwd, key, syn) = setup();
        let mut host = OneStream {
            outcome: Some(0),
            room: 3,
            ..OneStream::default()
        };
        let mut flow = open(&mut fwd, key, &syn, &mut host);
        flow.on_ready(WRITABLE);
        poll(&mut fwd, &mut flow, &mut host, 2);
        let isn = queued(&mut fwd.link)[0].3;
        let data = segment(1001, Some(isn + 1), |b| b.psh(), b"0123456789");
        flow.ingress(Instant::from_millis(3), &mut fwd.link, &data);
        poll(&mut fwd, &mut flow, &mut host, 3);
        assert_eq!((host.to_peer.as_slice(), host.writes), (&b"012"[..], 1));
        // No writable edge yet: no write tried, however often the flow is polled.
        poll(&mut fwd, &mut flow, &mut host, 4);
        poll(&mut fwd, &mut flow, &mut host, 5);
        assert_eq!(host.writes, 1);
        host.room = 100;
        flow.on_ready(WRITABLE);
        poll(&mut fwd, &mut flow, &mut host, 6);
        assert_eq!(host.to_peer, b"0123456789");
        // The guest's FIN: the host's write side is shut once everything is written.
        let fin = segment(1011, Some(isn + 1), |b| b.fin(), &[]);
        flow.ingress(Instant::from_millis(7), &mut fwd.link, &fin);
        poll(&mut fwd, &mut flow, &mut host, 7);
        assert!(host.fin);
        assert_eq!(flow.moved(), 10);
    }

    #[test]
    fn host_data_reaches_the_guest_and_an_unreset_flow_closes_clean() {
        let (mut fwd, key, syn) = setup();
        let mut host = OneStream {
            outcome: Some(0),
            room: 100,
            ..OneStream::default()
        };
        let mut flow = open(&mut fwd, key, &syn, &mut host);
        flow.on_ready(WRITABLE);
        poll(&mut fwd, &mut flow, &mut host, 2);
        let isn = queued(&mut fwd.link)[0].3;
        let ack = segment(1001, Some(isn + 1), |b| b, &[]);
        flow.ingress(Instant::from_millis(3), &mut fwd.link, &ack);
        host.to_fwd.extend(b"reply");
        flow.on_ready(READABLE);
        poll(&mut fwd, &mut flow, &mut host, 3);
        assert!(host.to_fwd.is_empty(), "read into smoltcp's buffer");
        assert!(!queued(&mut fwd.link).is_empty(), "data for the guest");
        assert_eq!(flow.moved(), 5);
        let guest = flow.close(&mut host);
        assert_eq!(host.closed, Some(Close::Clean), "no reset asked for");
        drop(guest);
    }
}
