//! UDP flows: one connected host socket per guest (source, destination) pair.
//!
//! # Theory of operation
//!
//! UDP bypasses smoltcp. A guest datagram to a new destination opens a non-blocking host
//! socket, `connect`ed to the translated destination, so the kernel filters replies for
//! us. Guest datagrams of one flow that arrive in one TAP read batch leave together, as
//! one `sendmsg` with `UDP_SEGMENT` (see [`Batch`]); the kernel cuts them apart. Replies
//! are received straight into a transmit queue slot, behind room for the headers, which
//! are then written around them: one copy from the kernel, none of our own. A flow closes
//! after `udp_idle` without traffic in either direction.
//!
//! Limits: datagrams larger than the guest MTU allows are dropped and counted (IPv4
//! fragmentation is not implemented); so are datagrams the host socket cannot take right
//! now (UDP may drop, the guest's protocol recovers).
//!
//! Host-side errors reach the guest as a router's ICMP/ICMPv6 errors about its datagram
//! ([`icmp::unreachable_for`]): a flow whose socket cannot connect or send
//! (`ENETUNREACH`, `EHOSTUNREACH`, `EACCES`/`EPERM`) gets network or host unreachable or
//! administratively prohibited from the gateway, quoting the datagram (rebuilt from its
//! headers and first bytes when the batch sent it); an ICMP port unreachable the host
//! socket reports (`ECONNREFUSED`) comes back as port unreachable from the destination.
//! The guest's resolver, ping and traceroute (which ask for every ICMP error) then fail
//! at once instead of timing out. These errors share one token bucket
//! ([`icmp::ErrorLimit`], the kernel's 50 burst and 1000/s).

use std::io;
use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, Ipv4Repr, UdpPacket, UdpRepr};

use crate::dns_relay::{DnsState, Failover};
use crate::egress::Egress;
use crate::emit::{self, EmitError};
use crate::icmp::{self, Unreachable};
use crate::{Counters, FlowKey, HostIo, Io, Link};

/// One UDP flow.
pub struct UdpFlow {
    pub(crate) key: FlowKey,
    /// The flow's id: its host socket's name for the [`HostIo`].
    id: usize,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
    /// Whether the host route takes segmented sends (false after it refused one).
    pub(crate) gso: bool,
    /// For a flow to the DNS forwarder: its queries, followed for failover.
    pub(crate) dns: Option<Box<DnsState>>,
}

/// How guest datagrams of a flow leave: a host socket (a flow's or a published port's id),
/// the peer (`None`: the socket's connected one) and the local address to send from (`None`: by route); `key` is the
/// flow as the guest sees it, for errors about its datagrams.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    pub id: usize,
    pub to: Option<SocketAddr>,
    pub from: Option<IpAddr>,
    pub key: FlowKey,
}

/// A guest datagram the host could not send, to be reported to the guest as an ICMP
/// error ([`icmp::unreachable_for`]): the flow, why, and enough of the datagram to
/// quote it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendFailure {
    pub key: FlowKey,
    pub code: Unreachable,
    /// The datagram's payload length.
    pub len: usize,
    head: [u8; icmp::QUOTE_PAYLOAD],
    head_len: usize,
}

impl SendFailure {
    /// The first payload bytes of the datagram.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }
}

/// Records the first failure worth an ICMP error in `slot` (one per send call: the
/// errors are rate-limited anyway).
fn note_failure(slot: &mut Option<SendFailure>, key: FlowKey, e: &io::Error, data: &[u8]) {
    let Some(code) = icmp::unreachable_for(e) else {
        return;
    };
    if slot.is_some() {
        return;
    }
    let mut head = [0u8; icmp::QUOTE_PAYLOAD];
    let head_len = data.len().min(head.len());
    head[..head_len].copy_from_slice(&data[..head_len]);
    *slot = Some(SendFailure {
        key,
        code,
        len: data.len(),
        head,
        head_len,
    });
}

impl Route {
    /// Sends one datagram; a failure is counted (UDP may drop, the guest's protocol
    /// recovers) and, when the guest should hear of it, noted in `failure`.
    fn send_one(
        self,
        data: &[u8],
        c: &mut Counters,
        failure: &mut Option<SendFailure>,
        host: &mut impl HostIo,
    ) {
        if let Err(e) = host.send_msg(self.id, data, self.to, self.from, None) {
            log::trace!("UDP send ({:?}) failed: {e}", self.to);
            c.udp_send_dropped += 1;
            note_failure(failure, self.key, &e, data);
        }
    }

    /// Sends `count` datagrams, `data` cut every `seg` bytes, with one `sendmsg`. Returns
    /// false when the route cannot segment: they are then sent one by one.
    fn send_run(
        self,
        data: &[u8],
        seg: usize,
        count: usize,
        c: &mut Counters,
        failure: &mut Option<SendFailure>,
        host: &mut impl HostIo,
    ) -> bool {
        // `seg` is at most MAX_BATCH_BYTES.
        let seg16 = u16::try_from(seg).unwrap_or(u16::MAX);
        match host.send_msg(self.id, data, self.to, self.from, Some(seg16)) {
            Ok(_) => {
                c.udp_gso_sends += 1;
                c.udp_gso_datagrams += count as u64;
                true
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
                ) =>
            {
                log::debug!(
                    "UDP ({:?}): the route does not segment ({e}); one by one",
                    self.to
                );
                for datagram in data.chunks(seg) {
                    self.send_one(datagram, c, failure, host);
                }
                false
            }
            Err(e) => {
                log::trace!("UDP send ({:?}) failed: {e}", self.to);
                c.udp_send_dropped += count as u64;
                note_failure(failure, self.key, &e, &data[..seg.min(data.len())]);
                true
            }
        }
    }
}

/// Most datagrams in one segmented send: `UDP_MAX_SEGMENTS` of older kernels (newer ones
/// take 128).
const MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one segmented send: one IPv4 datagram's worth.
const MAX_BATCH_BYTES: usize = 65_507;

/// Guest datagrams of one flow waiting to leave with one `sendmsg` (UDP GSO).
///
/// A guest that streams sends runs of equal-sized datagrams to one destination, and one
/// TAP read batch holds many of them. They are copied here (a few hundred ns each) so
/// that the host kernel builds, routes and hands over one packet instead of one per
/// datagram: on loopback it is cut apart only at the receiving socket. The batch is sent
/// as soon as a datagram of another flow, a larger one or one after a short one comes,
/// when it is full, and at the end of every TAP read batch
/// ([`crate::Forwarder::poll_flows`]): it never waits for more traffic.
pub(crate) struct Batch {
    /// Token table entry of the flow whose datagrams wait.
    flow: Option<usize>,
    /// Size of every datagram but the last (never 0: empty datagrams do not wait).
    seg: usize,
    buf: Vec<u8>,
    /// A send that failed in a way the guest should hear of, not yet reported.
    failure: Option<SendFailure>,
}

impl Batch {
    /// An empty batch (datagrams wait only where the host segments, [`HostIo::udp_gso`]).
    pub(crate) fn new() -> Batch {
        Batch {
            flow: None,
            seg: 0,
            buf: Vec::new(),
            failure: None,
        }
    }

    /// The flow whose datagrams wait, if any.
    pub(crate) fn flow(&self) -> Option<usize> {
        self.flow
    }

    /// Whether `data` for `flow` can be pushed without sending the batch first: nothing
    /// waits, or it joins datagrams of the same flow, no larger than the first, with
    /// none shorter before it, and room left. An empty datagram never joins (it cannot be
    /// a segment): it leaves on its own, after those waiting.
    pub(crate) fn accepts(&self, flow: usize, data: &[u8]) -> bool {
        self.flow.is_none()
            || (self.flow == Some(flow)
                && !data.is_empty()
                && data.len() <= self.seg
                && self.buf.len().is_multiple_of(self.seg)
                && self.count() < MAX_SEGMENTS
                && self.buf.len() + data.len() <= MAX_BATCH_BYTES)
    }

    /// Sends `data` of the flow `id`, leaving by `route`, now or later. The caller has sent
    /// the batch first unless it [`Batch::accepts`] `data`. `gso` is the flow's: whether
    /// its route segments.
    pub(crate) fn push(
        &mut self,
        id: usize,
        route: Route,
        gso: bool,
        data: &[u8],
        c: &mut Counters,
        host: &mut impl HostIo,
    ) {
        if !host.udp_gso() || !gso || data.is_empty() {
            route.send_one(data, c, &mut self.failure, host);
            return;
        }
        if self.flow.is_none() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(MAX_BATCH_BYTES);
            }
            self.flow = Some(id);
            self.seg = data.len();
        }
        self.buf.extend_from_slice(data);
    }

    /// Datagrams waiting.
    fn count(&self) -> usize {
        if self.seg == 0 {
            0
        } else {
            self.buf.len().div_ceil(self.seg)
        }
    }

    /// Sends the waiting datagrams by `route` (that of [`Batch::flow`]). Returns false when
    /// the route could not segment them (they went one by one): the flow's `gso` is off
    /// from then on.
    pub(crate) fn send(&mut self, route: Route, c: &mut Counters, host: &mut impl HostIo) -> bool {
        let segmented = match self.count() {
            0 => true,
            1 => {
                route.send_one(&self.buf, c, &mut self.failure, host);
                true
            }
            n => route.send_run(&self.buf, self.seg, n, c, &mut self.failure, host),
        };
        self.clear();
        segmented
    }

    /// The failed send to report to the guest, if any (taken: reported once).
    pub(crate) fn take_failure(&mut self) -> Option<SendFailure> {
        self.failure.take()
    }

    /// Forgets the waiting datagrams (their flow is gone).
    pub(crate) fn clear(&mut self) {
        self.flow = None;
        self.seg = 0;
        self.buf.clear();
    }
}

/// An association of a published UDP port: a client of the host socket `listener`
/// and the guest address it was forwarded to. Replies leave through the listener.
pub struct InboundFlow {
    pub(crate) key: FlowKey,
    /// Token table entry of the rule's listener.
    pub(crate) listener: usize,
    /// The rule's id (the entry may have been reused by another rule).
    pub(crate) rule_id: u32,
    /// The client on the host side.
    pub(crate) client: std::net::SocketAddr,
    /// The host address the client sent to (replies must come from it).
    pub(crate) local: Option<std::net::IpAddr>,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
    /// Whether the route to the client takes segmented sends (false after it refused one).
    pub(crate) gso: bool,
}

/// Whether a guest datagram is a DHCP request (client port 68 to server port 67).
pub fn is_dhcp_request(ip: &Ipv4Repr, payload: &[u8]) -> bool {
    let Ok(packet) = UdpPacket::new_checked(payload) else {
        return false;
    };
    let dst = ip.dst_addr;
    packet.src_port() == 68
        && packet.dst_port() == 67
        && (dst.is_broadcast() || dst.octets()[3] == 2 || ip.src_addr.is_unspecified())
}

/// Checks a guest datagram (length, and checksum when `verify`), ports 0 included.
pub fn parse_any<'a>(
    src: &IpAddress,
    dst: &IpAddress,
    payload: &'a [u8],
    verify: bool,
) -> Option<&'a [u8]> {
    let packet = UdpPacket::new_checked(payload).ok()?;
    if verify && packet.checksum() != 0 && !packet.verify_checksum(src, dst) {
        return None;
    }
    Some(&payload[emit::UDP_HEADER_LEN..usize::from(packet.len())])
}

/// Parses a guest datagram from `src` to `dst`: its flow key and payload. The checksum
/// is checked when `verify` (the guest's kernel did not leave it to us).
pub fn parse<'a>(
    src: &IpAddress,
    dst: &IpAddress,
    payload: &'a [u8],
    verify: bool,
) -> Option<(FlowKey, &'a [u8])> {
    let packet = UdpPacket::new_checked(payload).ok()?;
    let mut caps = ChecksumCapabilities::default();
    if !verify {
        caps.udp = smoltcp::phy::Checksum::None;
    }
    let repr = UdpRepr::parse(&packet, src, dst, &caps).ok()?;
    if repr.src_port == 0 || repr.dst_port == 0 {
        return None;
    }
    let key = FlowKey {
        guest: (*src, repr.src_port),
        remote: (*dst, repr.dst_port),
    };
    // `new_checked` verified the length field against the buffer.
    let data = &payload[emit::UDP_HEADER_LEN..usize::from(packet.len())];
    Some((key, data))
}

impl UdpFlow {
    /// Opens the host socket (`id`) for a new flow to `target`, from `outbound` if given.
    ///
    /// # Errors
    /// When the socket cannot be created, bound, connected or registered.
    pub(crate) fn open(
        now: Instant,
        id: usize,
        key: FlowKey,
        target: SocketAddr,
        outbound: Option<IpAddr>,
        host: &mut impl HostIo,
    ) -> io::Result<UdpFlow> {
        host.udp_open(id, target, outbound)?;
        Ok(UdpFlow {
            key,
            id,
            last_active: now,
            timer: None,
            gso: true,
            dns: None,
        })
    }

    /// Makes this a DNS flow connected to `servers[current]`, failing over to the
    /// servers after it ([`crate::dns_relay`]).
    pub(crate) fn follow_dns(
        &mut self,
        servers: &[SocketAddr],
        current: usize,
        now: Instant,
        quick: bool,
    ) {
        self.dns = Some(Box::new(DnsState::new(servers, current, now, quick)));
    }

    /// At a DNS flow's deadline: moves its pending queries to the next nameserver, or
    /// answers SERVFAIL for those the last one left unanswered. Returns the server that
    /// did not answer (if the flow moved on) and the next deadline.
    pub(crate) fn poll_dns(
        &mut self,
        now: Instant,
        link: &mut Link,
        c: &mut Counters,
        host: &mut impl HostIo,
    ) -> (Option<SocketAddr>, Option<Instant>) {
        let Some(dns) = self.dns.as_deref_mut() else {
            return (None, None);
        };
        let mut silent = None;
        if let Failover::Next { from, to } = dns.poll(now) {
            log::debug!("DNS: {from} did not answer within 1 s, asking {to}");
            c.dns_failovers += 1;
            silent = Some(from);
            if let Err(e) = host.udp_connect(self.id, to) {
                log::debug!("DNS: cannot connect to {to}: {e}");
            }
            for q in dns.pending_queries() {
                if let Err(e) = host.send(self.id, q) {
                    log::trace!("DNS: resend to {to} failed: {e}");
                }
            }
        }
        let (remote, guest) = (self.key.remote, self.key.guest);
        dns.expire(now, |reply| {
            c.dns_servfail += 1;
            let res = emit::udp(emit::Out::of(link), remote, guest, None, |buf| {
                let out = buf.get_mut(..reply.len())?;
                out.copy_from_slice(reply);
                Some(reply.len())
            });
            if res.is_err() {
                c.udp_send_dropped += 1;
            }
        });
        (silent, dns.deadline())
    }

    /// Where the guest's datagrams go: the connected host socket.
    pub(crate) fn route(&self) -> Route {
        Route {
            id: self.id,
            to: None,
            from: None,
            key: self.key,
        }
    }

    /// Moves the host socket's datagrams to the guest; the answers of a DNS forwarder's
    /// flow teach `egress` (the policies in force now). Returns false when the guest
    /// link is congested and datagrams are left to read.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut Counters,
        egress: &mut Egress,
    ) -> bool {
        let (remote, guest, id) = (self.key.remote, self.key.guest, self.id);
        loop {
            let mut outcome: io::Result<usize> = Ok(0);
            let (host, dns) = (&mut *io.host, &mut self.dns);
            let res = emit::udp(emit::Out::of(link), remote, guest, None, |buf| {
                outcome = host.recv(id, buf);
                let n = *outcome.as_ref().ok()?;
                if let Some(dns) = dns {
                    if dns.answered(&buf[..n]) {
                        c.dns_answers += 1;
                        egress.learn(now, guest.0.into(), &buf[..n]);
                    }
                }
                Some(n)
            });
            match res {
                Ok(_) => {
                    self.last_active = now;
                    continue;
                }
                Err(EmitError::QueueFull) => {
                    if !link.flush(io.tap, c) {
                        return false;
                    }
                    continue;
                }
                Err(EmitError::TooBig) => {
                    c.udp_too_big += 1;
                    continue;
                }
                Err(EmitError::NoNeighbor) => {
                    // Drain and drop: the guest has never spoken, nobody to deliver to.
                    let _ = io.host.recv(id, &mut [0u8; 1]);
                    if matches!(outcome, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock) {
                        return true;
                    }
                    continue;
                }
                Err(EmitError::Empty) => {}
            }
            match outcome {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    // The host got a port unreachable for one of the guest's datagrams:
                    // which one is not known, so the quote holds the headers only.
                    let (key, code) = (self.key, Unreachable::Port);
                    icmp::emit_unreachable_udp(link, now, remote.0, key, code, (0, &[]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("UDP receive from {:?} failed: {e}", remote);
                    return true;
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpProtocol, Ipv4Address};

    fn ip(src: [u8; 4], dst: [u8; 4], len: usize) -> Ipv4Repr {
        Ipv4Repr {
            src_addr: Ipv4Address::from(src),
            dst_addr: Ipv4Address::from(dst),
            next_header: IpProtocol::Udp,
            payload_len: len,
            hop_limit: 64,
        }
    }

    fn ep(a: [u8; 4]) -> IpAddress {
        IpAddress::Ipv4(Ipv4Address::from(a))
    }

    fn datagram(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, data)
            .unwrap();
        out[20..].to_vec()
    }

    #[test]
    fn parse_valid_datagram() {
        let (g, w) = ([10, 0, 2, 100], [203, 0, 113, 1]);
        let d = datagram(g, w, 4000, 53, b"query");
        let (key, data) = parse(&ep(g), &ep(w), &d, true).unwrap();
        assert_eq!(key.guest, (ep(g), 4000));
        assert_eq!(key.remote, (ep(w), 53));
        assert_eq!(data, b"query");
    }

    #[test]
    fn parse_bad_checksum_rejected() {
        let (g, w) = ([10, 0, 2, 100], [203, 0, 113, 1]);
        let mut d = datagram(g, w, 4000, 53, b"query");
        d[8] ^= 0xff;
        assert!(parse(&ep(g), &ep(w), &d, true).is_none());
    }

    #[test]
    fn parse_truncated_or_port_zero_rejected() {
        let (g, w) = ([10, 0, 2, 100], [203, 0, 113, 1]);
        let d = datagram(g, w, 4000, 53, b"query");
        for cut in 0..d.len() {
            assert!(
                parse(&ep(g), &ep(w), &d[..cut], true).is_none(),
                "cut {cut}"
            );
        }
        let z = datagram(g, w, 4000, 0, b"x");
        assert!(parse(&ep(g), &ep(w), &z, true).is_none());
    }

    #[test]
    fn dhcp_request_recognised() {
        let d = datagram([0; 4], [255; 4], 68, 67, b"dhcp");
        assert!(is_dhcp_request(&ip([0; 4], [255; 4], d.len()), &d));
        let other = datagram([10, 0, 2, 100], [203, 0, 113, 1], 68, 67, b"dhcp");
        assert!(!is_dhcp_request(
            &ip([10, 0, 2, 100], [203, 0, 113, 1], other.len()),
            &other
        ));
    }
}
