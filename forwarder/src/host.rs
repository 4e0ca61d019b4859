//! The host side of the forwarder: every host socket behind one trait, [`HostIo`].
//!
//! # Theory of operation
//!
//! The forwarder never opens, reads, writes or registers a host socket itself. It names
//! each host socket by the flow it belongs to, the flow's entry in the flow table (a
//! `usize` id, reused once the flow is closed), and asks a [`HostIo`] to act on it, as it
//! asks a [`crate::FrameSink`] to write frames to the members. The two meet in
//! [`crate::Io`], handed in with every call, and so events come in and work goes out the
//! way quinn-proto's `Endpoint` does it:
//!
//! - **In**: frames ([`crate::Forwarder::handle_port_frame`]), readiness of a flow's host
//!   socket by flow id ([`crate::Forwarder::handle_ready`], a [`Ready`]: readable,
//!   writable, the peer closed its sending side, an error is pending, urgent data came) and the clock ([`crate::Forwarder::handle_timeouts`]).
//! - **Out**: calls on the [`HostIo`] (connect, send, receive, shut down, close by flow
//!   id), frames for the members, and the next deadline
//!   ([`crate::Forwarder::poll_timeout`]).
//!
//! A host implementation owns the sockets. Once a socket is open for a flow (connect,
//! datagram socket, ping socket, listener, accepted connection adopted), the host reports
//! its readiness under that flow id, edge-triggered, until [`HostIo::close`]: stream
//! sockets for reading and writing, every other socket for reading. Errors are
//! `io::Error`s with the system's error numbers (`ECONNREFUSED`, `EHOSTUNREACH`...), which
//! the forwarder turns into RSTs and ICMP errors for the guest; `WouldBlock` means "not
//! now, an event will say when".
//!
//! The implementations: the `usernet` binary's, over mio and socket2 (`src/host.rs`),
//! and the in-memory one of the forwarder's tests and fuzz targets
//! (`forwarder/tests/common/host.rs`), on a fake clock.
//!
//! This is the per-packet path: the forwarder is generic over its host (no dynamic
//! dispatch), every call names its flow by index, and data moves through the caller's
//! buffers (a TCP relay reads from the host straight into smoltcp's buffer and writes
//! from it, as before).

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::port::{PortError, PortRule, Proto};

/// What a readiness event says of a flow's host socket ([`crate::Forwarder::handle_ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// Data, an end of stream or an error is there to read (`EPOLLIN`).
    pub readable: bool,
    /// Room to write (`EPOLLOUT`).
    pub writable: bool,
    /// The peer of a stream socket closed its sending side (`EPOLLRDHUP`, or `EPOLLHUP`):
    /// what is left to read ends in an end of stream, or in an error if `error` is set.
    pub hup: bool,
    /// An error is pending (`EPOLLERR`: a reset, a failed connect, an ICMP error).
    pub error: bool,
    /// Urgent data is pending on a stream (`EPOLLPRI`: the peer sent with `MSG_OOB`).
    /// Its byte stays in the stream (the host keeps it inline, `SO_OOBINLINE`), but a
    /// read ends at its mark: short, with more to follow, even after `hup`.
    pub urgent: bool,
}

/// How a flow's host socket is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// An orderly close (for a stream: FIN after what was written).
    Clean,
    /// A stream is reset (`SO_LINGER` 0: RST), as a kernel would on an aborted
    /// connection.
    Reset,
}

/// Where the host opens the other side of a spliced connection
/// ([`HostIo::splice_tcp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceTo {
    /// The guest's `port` inside its namespace, for the loopback client `client` of a
    /// published port (pasta's `-t`).
    Guest {
        /// The client.
        client: SocketAddr,
        /// The guest's port.
        port: u16,
    },
    /// This address on the host (pasta's `-T`: a connection accepted inside the
    /// namespace, for the host's loopback).
    Host(SocketAddr),
}

/// The host's sockets, named by flow id. See the module's header.
pub trait HostIo {
    /// Starts a non-blocking TCP connect to `target` for flow `id`, from `bind` (an
    /// address of the target's family) if given, Nagle off. `Ok(true)` when it is
    /// connected already (a connect to one of the host's own addresses is made within the
    /// call); otherwise its outcome comes as readiness ([`tcp_connected`](Self::tcp_connected)
    /// then tells). Urgent data stays in the stream (`SO_OOBINLINE`); its arrival is
    /// reported ([`Ready::urgent`]).
    ///
    /// # Errors
    /// When the connect fails at once (`ECONNREFUSED`, `ENETUNREACH`, `EMFILE`...).
    fn tcp_connect(
        &mut self,
        id: usize,
        target: SocketAddr,
        bind: Option<IpAddr>,
    ) -> io::Result<bool>;

    /// After readiness of a connecting stream: `Ok(true)` when connected, `Ok(false)` when
    /// still connecting (a spurious wake-up).
    ///
    /// # Errors
    /// Why the connect failed (the socket's pending error).
    fn tcp_connected(&mut self, id: usize) -> io::Result<bool>;

    /// Reads from flow `id`'s stream; 0 at its end.
    ///
    /// # Errors
    /// `WouldBlock` when nothing is there, or the read's error.
    fn read(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes to flow `id`'s stream; may take fewer bytes than given.
    ///
    /// # Errors
    /// `WouldBlock` when its buffer is full, or the write's error.
    fn write(&mut self, id: usize, buf: &[u8]) -> io::Result<usize>;

    /// Shuts down the sending side of flow `id`'s stream (FIN).
    fn shutdown_write(&mut self, id: usize);

    /// Opens a non-blocking UDP socket for flow `id`, connected to `target`, from `bind`
    /// (of the target's family) if given, with a large receive buffer.
    ///
    /// # Errors
    /// When the socket cannot be created, bound or connected.
    fn udp_open(&mut self, id: usize, target: SocketAddr, bind: Option<IpAddr>) -> io::Result<()>;

    /// Connects flow `id`'s datagram socket to another peer (DNS failover).
    ///
    /// # Errors
    /// The connect's.
    fn udp_connect(&mut self, id: usize, to: SocketAddr) -> io::Result<()>;

    /// Opens a ping socket (ICMP or ICMPv6 echo, `SOCK_DGRAM`) for flow `id`, connected
    /// to `dst`, from `bind` (of its family) if given.
    ///
    /// # Errors
    /// When ping sockets are not permitted (`EACCES`) or a socket call fails.
    fn icmp_open(&mut self, id: usize, dst: IpAddr, bind: Option<IpAddr>) -> io::Result<()>;

    /// Sends one datagram (or echo request) on flow `id`'s connected socket.
    ///
    /// # Errors
    /// The send's (`WouldBlock`, `ECONNREFUSED` for an earlier datagram...).
    fn send(&mut self, id: usize, data: &[u8]) -> io::Result<usize>;

    /// Receives one datagram (or echo reply) from flow `id`'s connected socket.
    ///
    /// # Errors
    /// `WouldBlock` when none is queued, or the receive's error.
    fn recv(&mut self, id: usize, buf: &mut [u8]) -> io::Result<usize>;

    /// Sends `data` on the datagram socket of `id` (a flow or a published port): to `to`
    /// (`None`: the connected peer), from the local address `from` (`None`: by route),
    /// and with `seg`, as datagrams of `seg` bytes each (`UDP_SEGMENT`, only when
    /// [`udp_gso`](Self::udp_gso)).
    ///
    /// # Errors
    /// The send's. With `seg`: `EIO`, `EINVAL` or `EMSGSIZE` when the route cannot
    /// segment (the caller then sends one by one).
    fn send_msg(
        &mut self,
        id: usize,
        data: &[u8],
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
        seg: Option<u16>,
    ) -> io::Result<usize>;

    /// Receives one datagram on the datagram socket of `id` (a published port): its
    /// length, its sender and the local address it was sent to (when the socket is bound
    /// to a wildcard address).
    ///
    /// # Errors
    /// `WouldBlock` when none is queued, or the receive's error.
    fn recv_from(
        &mut self,
        id: usize,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)>;

    /// Whether segmented sends ([`send_msg`](Self::send_msg)'s `seg`) are supported.
    fn udp_gso(&self) -> bool;

    /// Opens the listening socket of a published port as `id`: a TCP listener or a UDP
    /// socket bound to `rule.host` (and `rule.device`), reporting local addresses when
    /// bound to a wildcard address.
    ///
    /// # Errors
    /// [`PortError`] naming why the address cannot be had.
    fn listen(&mut self, id: usize, rule: &PortRule) -> Result<(), PortError>;

    /// Accepts a connection on listener `listener` and keeps it as `id`, not yet watched:
    /// the caller then [`adopt`](Self::adopt)s it, [`splice_tcp`](Self::splice_tcp)s
    /// it or [`close`](Self::close)s it. Returns the client's address.
    ///
    /// # Errors
    /// `WouldBlock` when none is waiting, or the accept's error (`EMFILE`...).
    fn accept(&mut self, listener: usize, id: usize) -> io::Result<SocketAddr>;

    /// Starts watching the accepted connection `id` as a flow's (Nagle off, urgent data
    /// inline and reported as for [`tcp_connect`](Self::tcp_connect)).
    ///
    /// # Errors
    /// When it cannot be watched; it is closed then.
    fn adopt(&mut self, id: usize) -> io::Result<()>;

    /// Splices the accepted connection `id`: opens a connection to `to` (for a loopback
    /// client of a published port, [`crate::Config::loopback_handoff`]: the guest's port
    /// from inside the guest's namespace, not through the guest link) and watches both
    /// under `id` (readable, urgent data and writable, edge-triggered; urgent data kept
    /// inline and relayed in its place) until [`close`](Self::close).
    /// The bytes then move between the two host-side
    /// ([`splice_relay`](Self::splice_relay)), never through the forwarder.
    ///
    /// # Errors
    /// When the other side cannot be opened; `id` is closed then.
    fn splice_tcp(&mut self, id: usize, to: SpliceTo) -> io::Result<()>;

    /// Opens listener `id` inside the guest's namespace (pasta's `-T/-U`): a TCP listener
    /// or a UDP socket bound to `addr` there, watched for reading; its connections are
    /// [`accept`](Self::accept)ed and its datagrams received
    /// ([`recv_from`](Self::recv_from), with their local address when `addr` is a
    /// wildcard one) and answered ([`send_msg`](Self::send_msg)) as a published port's.
    ///
    /// # Errors
    /// When the socket cannot be had there (`EADDRINUSE`...).
    fn splice_listen(&mut self, id: usize, proto: Proto, addr: SocketAddr) -> io::Result<()>;

    /// After readiness of either socket of spliced TCP flow `id`: moves what waits in the
    /// directions that socket's readiness lets move (the host knows which socket it
    /// was, and watches each under a token of its own). Returns the bytes written to
    /// either side, and whether the flow is over (both sides closed theirs and everything
    /// was delivered, or an error).
    fn splice_relay(&mut self, id: usize) -> (usize, bool);

    /// Opens spliced UDP association `id` of the loopback client `client` of a published
    /// UDP port ([`crate::Config::loopback_handoff`]): a datagram socket inside the
    /// guest's namespace connected to the guest's `guest_port`, with a large receive buffer
    /// (as [`udp_open`](Self::udp_open)'s), watched for reading under `id`. The forwarder [`send`](Self::send)s the client's datagrams on it and
    /// [`recv`](Self::recv)s the replies, which it sends to `client` through the
    /// published port's socket ([`send_msg`](Self::send_msg)), from the local address
    /// the client's first datagram arrived on ([`recv_from`](Self::recv_from)).
    ///
    /// # Errors
    /// When the socket cannot be opened.
    fn splice_udp(&mut self, id: usize, client: SocketAddr, guest_port: u16) -> io::Result<()>;

    /// Stops watching and closes the socket of `id` (`how`: for a stream, a RST or not).
    fn close(&mut self, id: usize, how: Close);
}
