//! ICMP and ICMPv6: echo through unprivileged ping sockets, and the errors we report.
//!
//! # Theory of operation
//!
//! - Echo requests to our own addresses (gateway, DNS) are answered here.
//! - Echo requests to anything else go out through an unprivileged ping socket
//!   (`SOCK_DGRAM` with `IPPROTO_ICMP` or `IPPROTO_ICMPV6`), one per (guest, destination,
//!   identifier). The kernel rewrites the identifier to the socket's; replies get the
//!   guest's identifier back. Ping sockets need `net.ipv4.ping_group_range` (it covers
//!   IPv6 too) to include our gid; where it does not, the guest gets "communication
//!   administratively prohibited". A reply is never faked.
//! - Errors for the guest (destination unreachable) quote the offending packet: its IP
//!   header and first 8 payload bytes for IPv4 (RFC 792), as much as fits in the minimum
//!   MTU for IPv6 (RFC 4443).

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::{Interest, Registry, Token};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::emit::{self, EmitError};
use crate::{FlowKey, Io, Link};

/// Echo flows close after this long without traffic.
pub const IDLE: Duration = Duration::from_secs(10);

/// The IPv6 minimum MTU, which bounds an ICMPv6 error.
const IPV6_MIN_MTU: usize = 1280;

/// Destination unreachable reasons we report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No route to the network (ICMP code 0, ICMPv6 code 0).
    Net,
    /// The host does not answer (ICMP code 1, ICMPv6 code 3 "address unreachable").
    Host,
    /// Nothing listens on that port (ICMP code 3, ICMPv6 code 4).
    Port,
    /// Communication administratively prohibited (ICMP code 13, ICMPv6 code 1).
    Prohibited,
}

impl Unreachable {
    fn code_v4(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Host => 1,
            Unreachable::Port => 3,
            Unreachable::Prohibited => 13,
        }
    }
    fn code_v6(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Prohibited => 1,
            Unreachable::Host => 3,
            Unreachable::Port => 4,
        }
    }
}

/// The ICMP error that tells the guest why NAT refused a destination, where one is owed
/// whatever the protocol: the gateway's host-loopback mapping switched off
/// (`--disable-host-loopback`) is "network unreachable", as slirp4netns answers. `None`:
/// the protocol decides (TCP resets, UDP says port unreachable or prohibited).
pub fn deny_reason(deny: crate::nat::Deny) -> Option<Unreachable> {
    match deny {
        crate::nat::Deny::HostLoopbackDisabled => Some(Unreachable::Net),
        crate::nat::Deny::NoService | crate::nat::Deny::NotRoutable => None,
    }
}

/// A guest ICMP message that matters to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// An echo request with this identifier.
    Echo(u16),
    /// An ICMPv6 router solicitation.
    RouterSolicit,
    /// An ICMPv6 neighbor solicitation.
    NeighborSolicit,
    /// Anything else: ignored, as a router would not forward it our way.
    Other,
}

/// Parses a guest ICMP (IPv4) message; `None` when malformed (bad length or checksum).
pub fn parse_v4(payload: &[u8]) -> Option<Message> {
    let packet = Icmpv4Packet::new_checked(payload).ok()?;
    if !packet.verify_checksum() {
        return None;
    }
    Some(match (packet.msg_type(), packet.msg_code()) {
        (Icmpv4Message::EchoRequest, 0) => Message::Echo(packet.echo_ident()),
        _ => Message::Other,
    })
}

/// Parses a guest ICMPv6 message; `None` when malformed (bad length or checksum).
pub fn parse_v6(src: &IpAddress, dst: &IpAddress, payload: &[u8]) -> Option<Message> {
    let (IpAddress::Ipv6(src), IpAddress::Ipv6(dst)) = (src, dst) else {
        return None;
    };
    let packet = Icmpv6Packet::new_checked(payload).ok()?;
    if !packet.verify_checksum(src, dst) {
        return None;
    }
    Some(match (packet.msg_type(), packet.msg_code()) {
        (Icmpv6Message::EchoRequest, 0) => Message::Echo(packet.echo_ident()),
        (Icmpv6Message::RouterSolicit, 0) => Message::RouterSolicit,
        (Icmpv6Message::NeighborSolicit, 0) => Message::NeighborSolicit,
        _ => Message::Other,
    })
}

/// Turns an echo request in `buf` into a reply from `src` to `dst`: type and checksum.
fn make_reply(buf: &mut [u8], src: &IpAddress, dst: &IpAddress, ident: Option<u16>) -> Option<()> {
    match (src, dst) {
        (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => {
            let mut p = Icmpv4Packet::new_checked(buf).ok()?;
            p.set_msg_type(Icmpv4Message::EchoReply);
            if let Some(id) = ident {
                p.set_echo_ident(id);
            }
            p.fill_checksum();
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            let mut p = Icmpv6Packet::new_checked(buf).ok()?;
            p.set_msg_type(Icmpv6Message::EchoReply);
            if let Some(id) = ident {
                p.set_echo_ident(id);
            }
            p.fill_checksum(s, d);
        }
        _ => return None,
    }
    Some(())
}

fn protocol(addr: &IpAddress) -> IpProtocol {
    match addr {
        IpAddress::Ipv4(_) => IpProtocol::Icmp,
        IpAddress::Ipv6(_) => IpProtocol::Icmpv6,
    }
}

/// Answers an echo request to one of our addresses: the same message, as a reply.
pub(crate) fn emit_echo_reply(
    link: &mut Link,
    ours: IpAddress,
    guest: IpAddress,
    request: &[u8],
) -> bool {
    let mtu = link.mtu;
    let res = emit::ip(
        &link.l2,
        &mut link.txq,
        mtu,
        ours,
        guest,
        protocol(&ours),
        None,
        |buf| {
            let out = buf.get_mut(..request.len())?;
            out.copy_from_slice(request);
            make_reply(out, &ours, &guest, None)?;
            Some(request.len())
        },
    );
    res.is_ok()
}

/// Sends "destination unreachable" from `from` to the sender of `original` (a whole IP
/// packet from the guest, of `from`'s family).
pub(crate) fn emit_unreachable(
    link: &mut Link,
    from: IpAddress,
    code: Unreachable,
    original: &[u8],
) {
    let (to, quote_len) = match from {
        IpAddress::Ipv4(_) => {
            let Ok(orig) = Ipv4Packet::new_checked(original) else {
                return;
            };
            let len = usize::from(orig.header_len()) + 8;
            (IpAddress::Ipv4(orig.src_addr()), len.min(original.len()))
        }
        IpAddress::Ipv6(_) => {
            let Ok(orig) = Ipv6Packet::new_checked(original) else {
                return;
            };
            let room = IPV6_MIN_MTU - emit::IPV6_HEADER_LEN - 8;
            (IpAddress::Ipv6(orig.src_addr()), original.len().min(room))
        }
    };
    let quote = &original[..quote_len];
    let mtu = link.mtu;
    let res = emit::ip(
        &link.l2,
        &mut link.txq,
        mtu,
        from,
        to,
        protocol(&from),
        None,
        |buf| {
            let len = 8 + quote.len();
            let out = buf.get_mut(..len)?;
            out[..8].fill(0);
            out[8..].copy_from_slice(quote);
            match (from, to) {
                (IpAddress::Ipv4(_), _) => {
                    let mut p = Icmpv4Packet::new_unchecked(out);
                    p.set_msg_type(Icmpv4Message::DstUnreachable);
                    p.set_msg_code(code.code_v4());
                    p.fill_checksum();
                }
                (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
                    let mut p = Icmpv6Packet::new_unchecked(out);
                    p.set_msg_type(Icmpv6Message::DstUnreachable);
                    p.set_msg_code(code.code_v6());
                    p.fill_checksum(&s, &d);
                }
                _ => return None,
            }
            Some(len)
        },
    );
    if let Err(e) = res {
        log::debug!("cannot send ICMP unreachable: {e:?}");
    }
}

/// Sends "destination unreachable" for a UDP flow, quoting a reconstructed datagram
/// header (the original datagram is long gone when the host socket reports it).
pub(crate) fn emit_unreachable_udp(
    link: &mut Link,
    remote: (IpAddress, u16),
    guest: (IpAddress, u16),
    code: Unreachable,
) {
    let mut quote = [0u8; emit::IPV6_HEADER_LEN + emit::UDP_HEADER_LEN];
    let caps = ChecksumCapabilities::default();
    let ip_len = match (guest.0, remote.0) {
        (IpAddress::Ipv4(src_addr), IpAddress::Ipv4(dst_addr)) => {
            let ip = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: IpProtocol::Udp,
                payload_len: emit::UDP_HEADER_LEN,
                hop_limit: 64,
            };
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut quote[..]), &caps);
            emit::IPV4_HEADER_LEN
        }
        (IpAddress::Ipv6(src_addr), IpAddress::Ipv6(dst_addr)) => {
            let ip = Ipv6Repr {
                src_addr,
                dst_addr,
                next_header: IpProtocol::Udp,
                payload_len: emit::UDP_HEADER_LEN,
                hop_limit: 64,
            };
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut quote[..]));
            emit::IPV6_HEADER_LEN
        }
        _ => return,
    };
    let udp = UdpRepr {
        src_port: guest.1,
        dst_port: remote.1,
    };
    let mut packet = UdpPacket::new_unchecked(&mut quote[ip_len..ip_len + emit::UDP_HEADER_LEN]);
    udp.emit(&mut packet, &guest.0, &remote.0, 0, |_| {}, &caps);
    emit_unreachable(
        link,
        remote.0,
        code,
        &quote[..ip_len + emit::UDP_HEADER_LEN],
    );
}

/// One echo flow through a ping socket.
pub struct IcmpFlow {
    pub(crate) key: FlowKey,
    host: mio::net::UdpSocket,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
}

impl IcmpFlow {
    /// Opens a ping socket to the flow's destination, bound to `outbound` if given (of
    /// the destination's family).
    ///
    /// # Errors
    /// When ping sockets are not permitted (`EACCES`) or other socket calls fail.
    pub fn open(
        now: Instant,
        key: FlowKey,
        outbound: Option<IpAddr>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<IcmpFlow> {
        let dst: IpAddr = key.remote.0.into();
        let (domain, proto) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(proto))?;
        if let Some(addr) = outbound.filter(|a| a.is_ipv4() == dst.is_ipv4()) {
            socket.bind(&SocketAddr::new(addr, 0).into())?;
        }
        socket.connect(&SocketAddr::new(dst, 0).into())?;
        let mut host = mio::net::UdpSocket::from_std(socket.into());
        registry.register(&mut host, token, Interest::READABLE)?;
        Ok(IcmpFlow {
            key,
            host,
            last_active: now,
            timer: None,
        })
    }

    /// Sends a guest echo request (the whole ICMP message).
    pub(crate) fn send(&mut self, now: Instant, message: &[u8]) {
        self.last_active = now;
        if let Err(e) = self.host.send(message) {
            log::trace!("ping send failed: {e}");
        }
    }

    /// Moves echo replies to the guest.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_>,
        c: &mut crate::Counters,
    ) {
        let (remote, guest) = (self.key.remote.0, self.key.guest);
        loop {
            let mtu = link.mtu;
            let mut done = false;
            let proto = protocol(&remote);
            let res = emit::ip(
                &link.l2,
                &mut link.txq,
                mtu,
                remote,
                guest.0,
                proto,
                None,
                |buf| {
                    let n = match self.host.recv(buf) {
                        Ok(n) => n,
                        Err(_) => {
                            done = true;
                            return None;
                        }
                    };
                    let reply = buf.get_mut(..n)?;
                    let is_reply = match remote {
                        IpAddress::Ipv4(_) => {
                            reply.first() == Some(&u8::from(Icmpv4Message::EchoReply))
                        }
                        IpAddress::Ipv6(_) => {
                            reply.first() == Some(&u8::from(Icmpv6Message::EchoReply))
                        }
                    };
                    if !is_reply {
                        return None;
                    }
                    make_reply(reply, &remote, &guest.0, Some(guest.1))?;
                    Some(n)
                },
            );
            match res {
                Ok(_) => self.last_active = now,
                Err(EmitError::QueueFull) => {
                    if !link.flush(io.tap, c) {
                        return;
                    }
                }
                Err(_) if done => return,
                Err(_) => {}
            }
        }
    }

    /// Deregisters and closes the ping socket.
    pub(crate) fn close(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Ipv6Address;

    fn echo_v4(kind: u8, ident: u16) -> Vec<u8> {
        let mut m = vec![
            kind,
            0,
            0,
            0,
            (ident >> 8) as u8,
            ident as u8,
            0,
            1,
            b'p',
            b'i',
            b'n',
            b'g',
        ];
        let mut p = Icmpv4Packet::new_unchecked(&mut m[..]);
        p.fill_checksum();
        m
    }

    #[test]
    fn echo_request_v4_parsed() {
        assert_eq!(parse_v4(&echo_v4(8, 0x1234)), Some(Message::Echo(0x1234)));
    }

    #[test]
    fn echo_reply_from_guest_v4_ignored() {
        assert_eq!(parse_v4(&echo_v4(0, 1)), Some(Message::Other));
    }

    #[test]
    fn bad_checksum_or_truncated_v4_malformed() {
        let mut m = echo_v4(8, 1);
        m[9] ^= 1;
        assert_eq!(parse_v4(&m), None);
        assert_eq!(parse_v4(&m[..3]), None);
    }

    #[test]
    fn echo_request_v6_parsed_and_checksum_checked() {
        let src = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
        let dst = Ipv6Address::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let mut m = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1, b'x'];
        Icmpv6Packet::new_unchecked(&mut m[..]).fill_checksum(&src, &dst);
        let (s, d) = (IpAddress::Ipv6(src), IpAddress::Ipv6(dst));
        assert_eq!(parse_v6(&s, &d, &m), Some(Message::Echo(0x1234)));
        let other = IpAddress::Ipv6(Ipv6Address::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
        assert_eq!(
            parse_v6(&s, &other, &m),
            None,
            "checksum covers the addresses"
        );
    }

    #[test]
    fn unreachable_codes() {
        assert_eq!(Unreachable::Port.code_v4(), 3);
        assert_eq!(Unreachable::Port.code_v6(), 4);
        assert_eq!(Unreachable::Prohibited.code_v4(), 13);
        assert_eq!(Unreachable::Prohibited.code_v6(), 1);
    }
}
