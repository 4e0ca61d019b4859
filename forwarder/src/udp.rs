//! UDP flows: one connected host socket per guest (source, destination) pair.
//!
//! # Theory of operation
//!
//! UDP bypasses smoltcp. A guest datagram to a new destination opens a non-blocking host
//! socket, `connect`ed to the translated destination, so the kernel filters replies for
//! us; datagrams are sent as they come. Replies are received straight into a transmit
//! queue slot, behind room for the headers, which are then written around them: one copy
//! from the kernel, none of our own. A flow closes after `udp_idle` without traffic in
//! either direction.
//!
//! Limits: datagrams larger than the guest MTU allows are dropped and counted (IPv4
//! fragmentation is not implemented); so are datagrams the host socket cannot take right
//! now (UDP may drop, the guest's protocol recovers). An ICMP port unreachable seen by
//! the host socket (`ECONNREFUSED`) is reported to the guest the same way.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::{Interest, Registry, Token};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, Ipv4Repr, UdpPacket, UdpRepr};
use socket2::{Domain, Protocol, Socket, Type};

use crate::emit::{self, EmitError};
use crate::icmp::{self, Unreachable};
use crate::{Counters, FlowKey, Io, Link};

/// One UDP flow.
pub struct UdpFlow {
    pub(crate) key: FlowKey,
    host: mio::net::UdpSocket,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
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
    /// Opens the host socket for a new flow to `target`.
    ///
    /// # Errors
    /// When the socket cannot be created, bound, connected or registered.
    pub fn open(
        now: Instant,
        key: FlowKey,
        target: SocketAddr,
        outbound: Option<IpAddr>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<UdpFlow> {
        let socket = Socket::new(
            Domain::for_address(target),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if let Some(addr) = outbound {
            if addr.is_ipv4() == target.is_ipv4() && !target.ip().is_loopback() {
                socket.bind(&SocketAddr::new(addr, 0).into())?;
            }
        }
        socket.connect(&target.into())?;
        let mut host = mio::net::UdpSocket::from_std(socket.into());
        registry.register(&mut host, token, Interest::READABLE)?;
        Ok(UdpFlow {
            key,
            host,
            last_active: now,
            timer: None,
        })
    }

    /// Sends one guest datagram.
    pub(crate) fn send(&mut self, now: Instant, data: &[u8], c: &mut Counters) {
        self.last_active = now;
        match self.host.send(data) {
            Ok(_) => {}
            Err(e) => {
                log::trace!("UDP send to {:?} failed: {e}", self.key.remote);
                c.udp_send_dropped += 1;
            }
        }
    }

    /// Moves the host socket's datagrams to the guest. Returns false when the guest link
    /// is congested and datagrams are left to read.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        link: &mut Link,
        mtu: usize,
        io: &mut Io<'_>,
        c: &mut Counters,
    ) -> bool {
        let (remote, guest) = (self.key.remote, self.key.guest);
        loop {
            let mut outcome: io::Result<usize> = Ok(0);
            let res = emit::udp(&link.l2, &mut link.txq, mtu, remote, guest, None, |buf| {
                outcome = self.host.recv(buf);
                outcome.as_ref().ok().copied()
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
                    let _ = self.host.recv(&mut [0u8; 1]);
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
                    icmp::emit_unreachable_udp(link, remote, guest, Unreachable::Port);
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

    /// Deregisters and closes the host socket.
    pub(crate) fn close(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.host);
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
