//! Spliced flows: pasta's loopback clients of published ports and its `-T/-U` ports,
//! relayed by the host.
//!
//! # Theory of operation
//!
//! In pasta mode some flows never cross the guest link. The host relays TCP by itself,
//! by `splice(2)` through pipes ([`crate::HostIo::splice_tcp`],
//! [`crate::HostIo::splice_relay`]); datagrams pass through the forwarder's buffer, as a
//! published port's, but never become frames:
//!
//! - **Loopback clients of published ports** ([`crate::Config::loopback_handoff`]): a
//!   connection becomes a pair whose other side the host opens to the guest's port from
//!   inside the guest's namespace; a client's datagrams go through a UDP association,
//!   a socket opened there ([`crate::HostIo::splice_udp`]).
//! - **`-T/-U`**: a listener inside the namespace ([`crate::HostIo::splice_listen`],
//!   [`crate::Forwarder::add_splice_listener`]) whose connections become pairs with a
//!   connection to an address on the host's loopback, and whose datagrams go through a
//!   UDP association per client: a host socket connected to that address.
//!
//! Both kinds of association are one [`SpliceFlow::Assoc`], found again by (listener,
//! client, local address): the forwarder sends the client's datagrams on the
//! association's socket, receives the replies there and sends them to the client through
//! the listener's socket (the published port's or the `-U` one), both named by flow id,
//! from the local address the client's datagrams arrived on. A listener bound to a
//! wildcard address learns it with each datagram (`IP_PKTINFO`, as a published port does
//! for its flows through the guest link): a client that sent to 127.0.0.2, or to another
//! local address, takes its replies from there, where the route would pick 127.0.0.1 and
//! a `connect()`ed client would drop them. One client socket that sends to two local
//! addresses has two associations, as a kernel NAT has two connections: each reply leaves
//! from the address its request went to. (Through the guest link this cannot be: the guest
//! sees one client address and port for both, so a published port's flow answers from
//! the address of the latest datagram.)
//!
//! Each is one more kind in the flow table, as in passt: the table gives it its id
//! (which names its sockets to the host), bounds the pairs and associations by
//! [`crate::Limits::spliced`], counts them ([`crate::Counters`]: `tcp_handed_off`,
//! `udp_handed_off`, `splice_closed`, `splice_table_full`, `splice_bytes`, the last also
//! read by the event loop's busy polling as bulk traffic) and ends them: a pair when
//! the host says it is over (both sides closed theirs and everything was delivered, or
//! an error), an association after [`UDP_IDLE`] without a datagram either way, on the
//! flow timers, or with its listener (a `-U` listener, or a published port whose rule
//! is removed: its replies would have no socket to leave by).

use std::net::{IpAddr, SocketAddr};

use smoltcp::time::{Duration, Instant};

use crate::port::Proto;

/// A spliced UDP association ends after this long without traffic (pasta's 180 s,
/// where [`crate::Config::udp_idle`] of flows through the guest link is 60 s).
pub const UDP_IDLE: Duration = Duration::from_secs(180);

/// A spliced entry of the flow table.
#[derive(Debug)]
pub(crate) enum SpliceFlow {
    /// A relayed TCP connection (no idle time: it lives as long as its connections).
    Pair,
    /// A `-T/-U` listener inside the namespace, relayed to `to` on the host (no idle time:
    /// it lives until removed).
    Listener { proto: Proto, to: SocketAddr },
    /// A UDP client's association: a socket connected to the `-U` listener's `to`, or
    /// to the published port's guest port inside the namespace; replies go back
    /// through `listener` (the `-U` listener or the published port) to `client`, from
    /// `local`, the address the client's datagrams arrived on (`None`: by route, for a
    /// listener bound to one address). It ends [`UDP_IDLE`] after `last_active`,
    /// its last datagram either way, on its idle `timer`.
    Assoc {
        listener: usize,
        client: SocketAddr,
        local: Option<IpAddr>,
        last_active: Instant,
        timer: Option<Instant>,
    },
}
