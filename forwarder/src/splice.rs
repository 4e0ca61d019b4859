//! Spliced flows: pasta's loopback clients of published ports, relayed by the host.
//!
//! # Theory of operation
//!
//! With [`crate::Config::loopback_handoff`] (pasta mode), a connection or datagram that a
//! loopback client sends to a published port does not cross the guest link: the host
//! opens the other side inside the guest's namespace and moves the bytes itself
//! ([`crate::HostIo::splice_tcp`], [`crate::HostIo::splice_udp`],
//! [`crate::HostIo::splice_relay`]: for TCP by `splice(2)` through pipes). Such a flow
//! is one more kind in the flow table, as in passt: the table gives it its id (which
//! names its sockets to the host), bounds it by [`crate::Limits::spliced`], counts it
//! ([`crate::Counters`]: `tcp_handed_off`, `udp_handed_off`, `splice_closed`,
//! `splice_table_full`, `splice_bytes`, the last also read by the event loop's busy
//! polling as bulk traffic) and ends it:
//!
//! - a TCP one when the host says it is over (both sides closed theirs and everything
//!   was delivered, or an error);
//! - a UDP one, an association of one client with the guest's port found by
//!   (client, guest port), after [`UDP_IDLE`] without a datagram either way, on the
//!   flow timers.

use smoltcp::time::{Duration, Instant};

/// A spliced UDP association ends after this long without traffic (pasta's 180 s,
/// where [`crate::Config::udp_idle`] of flows through the guest link is 60 s).
pub const UDP_IDLE: Duration = Duration::from_secs(180);

/// A spliced flow's entry in the flow table.
pub(crate) struct SpliceFlow {
    /// A UDP association's (client, guest port); `None` for TCP.
    pub udp: Option<(std::net::SocketAddr, u16)>,
    pub last_active: Instant,
    /// A UDP association's idle timer.
    pub timer: Option<Instant>,
}
