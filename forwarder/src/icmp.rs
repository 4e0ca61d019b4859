//! ICMP: echo through unprivileged ping sockets, and the errors we report to the guest.
//!
//! # Theory of operation
//!
//! - Echo requests to our own addresses (gateway, DNS) are answered here.
//! - Echo requests to anything else go out through an unprivileged ping socket
//!   (`SOCK_DGRAM`, `IPPROTO_ICMP`), one per (guest, destination, identifier). The kernel
//!   rewrites the identifier to the socket's; replies get the guest's identifier back.
//!   Ping sockets need `net.ipv4.ping_group_range` to cover our gid; where it does not,
//!   the guest gets "communication administratively prohibited". A reply is never faked.
//! - Errors for the guest (destination unreachable) quote the offending packet's IP
//!   header and first 8 payload bytes, as RFC 792 asks.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use mio::{Interest, Registry, Token};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::emit::{self, EmitError};
use crate::{FlowKey, Io, Link};

/// Echo flows close after this long without traffic.
pub const IDLE: Duration = Duration::from_secs(10);

/// Destination unreachable codes we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Code 0: no route to the network.
    Net,
    /// Code 1: the host does not answer.
    Host,
    /// Code 3: nothing listens on that port.
    Port,
    /// Code 13: communication administratively prohibited.
    Prohibited,
}

impl Unreachable {
    fn code(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Host => 1,
            Unreachable::Port => 3,
            Unreachable::Prohibited => 13,
        }
    }
}

/// The identifier of a guest echo request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// The echo identifier.
    pub ident: u16,
}

/// Parses a guest ICMP message: `None` when malformed (bad length or checksum),
/// `Some(None)` for valid messages other than echo requests (ignored, as a router would
/// not forward our way), `Some(Some(echo))` for an echo request.
pub fn parse_echo_request(payload: &[u8]) -> Option<Option<Echo>> {
    let packet = Icmpv4Packet::new_checked(payload).ok()?;
    if !packet.verify_checksum() {
        return None;
    }
    if packet.msg_type() != Icmpv4Message::EchoRequest || packet.msg_code() != 0 {
        return Some(None);
    }
    Some(Some(Echo {
        ident: packet.echo_ident(),
    }))
}

/// Answers an echo request to one of our addresses: the same message with type 0.
pub(crate) fn emit_echo_reply(
    link: &mut Link,
    ours: Ipv4Address,
    guest: Ipv4Address,
    request: &[u8],
) -> bool {
    let mtu = link.mtu;
    let res = emit::ipv4(
        &link.l2,
        &mut link.txq,
        mtu,
        ours,
        guest,
        IpProtocol::Icmp,
        None,
        |buf| {
            let out = buf.get_mut(..request.len())?;
            out.copy_from_slice(request);
            let mut packet = Icmpv4Packet::new_unchecked(out);
            packet.set_msg_type(Icmpv4Message::EchoReply);
            packet.fill_checksum();
            Some(request.len())
        },
    );
    res.is_ok()
}

/// Sends "destination unreachable" from `from` to the sender of `original` (a whole
/// IPv4 packet from the guest).
pub(crate) fn emit_unreachable(
    link: &mut Link,
    from: Ipv4Address,
    code: Unreachable,
    original: &[u8],
) {
    let Ok(orig) = Ipv4Packet::new_checked(original) else {
        return;
    };
    let to = orig.src_addr();
    let quote_len = (usize::from(orig.header_len()) + 8).min(original.len());
    let quote = &original[..quote_len];
    let mtu = link.mtu;
    let res = emit::ipv4(
        &link.l2,
        &mut link.txq,
        mtu,
        from,
        to,
        IpProtocol::Icmp,
        None,
        |buf| {
            let len = 8 + quote.len();
            let out = buf.get_mut(..len)?;
            out[..8].fill(0);
            out[8..].copy_from_slice(quote);
            let mut packet = Icmpv4Packet::new_unchecked(out);
            packet.set_msg_type(Icmpv4Message::DstUnreachable);
            packet.set_msg_code(code.code());
            packet.fill_checksum();
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
    remote: (Ipv4Address, u16),
    guest: (Ipv4Address, u16),
    code: Unreachable,
) {
    let mut quote = [0u8; emit::IPV4_HEADER_LEN + emit::UDP_HEADER_LEN];
    let ip = Ipv4Repr {
        src_addr: guest.0,
        dst_addr: remote.0,
        next_header: IpProtocol::Udp,
        payload_len: emit::UDP_HEADER_LEN,
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut quote[..]), &caps);
    let udp = UdpRepr {
        src_port: guest.1,
        dst_port: remote.1,
    };
    let mut packet = UdpPacket::new_unchecked(&mut quote[emit::IPV4_HEADER_LEN..]);
    udp.emit(
        &mut packet,
        &guest.0.into(),
        &remote.0.into(),
        0,
        |_| {},
        &caps,
    );
    emit_unreachable(link, remote.0, code, &quote);
}

/// One echo flow through a ping socket.
pub struct IcmpFlow {
    pub(crate) key: FlowKey,
    host: mio::net::UdpSocket,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
}

impl IcmpFlow {
    /// Opens a ping socket to the flow's destination.
    ///
    /// # Errors
    /// When ping sockets are not permitted (`EACCES`) or other socket calls fail.
    pub fn open(
        now: Instant,
        key: FlowKey,
        outbound: Option<Ipv4Addr>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<IcmpFlow> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::ICMPV4),
        )?;
        if let Some(addr) = outbound {
            socket.bind(&SocketAddr::new(addr.into(), 0).into())?;
        }
        let dst = SocketAddr::new(Ipv4Addr::from(key.remote.0).into(), 0);
        socket.connect(&dst.into())?;
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
    pub(crate) fn receive(&mut self, now: Instant, link: &mut Link, io: &mut Io<'_>) {
        let (remote, guest) = (self.key.remote.0, self.key.guest);
        loop {
            let mtu = link.mtu;
            let mut done = false;
            let res = emit::ipv4(
                &link.l2,
                &mut link.txq,
                mtu,
                remote,
                guest.0,
                IpProtocol::Icmp,
                None,
                |buf| {
                    let n = match self.host.recv(buf) {
                        Ok(n) => n,
                        Err(_) => {
                            done = true;
                            return None;
                        }
                    };
                    let mut packet = Icmpv4Packet::new_checked(&mut buf[..n]).ok()?;
                    if packet.msg_type() != Icmpv4Message::EchoReply {
                        return None;
                    }
                    packet.set_echo_ident(guest.1);
                    packet.fill_checksum();
                    Some(n)
                },
            );
            match res {
                Ok(_) => self.last_active = now,
                Err(EmitError::QueueFull) => {
                    let mut c = crate::Counters::default();
                    if !link.flush(io.tap, &mut c) {
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

    fn echo(kind: u8, ident: u16) -> Vec<u8> {
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
    fn echo_request_parsed() {
        assert_eq!(
            parse_echo_request(&echo(8, 0x1234)),
            Some(Some(Echo { ident: 0x1234 }))
        );
    }

    #[test]
    fn echo_reply_from_guest_ignored() {
        assert_eq!(parse_echo_request(&echo(0, 1)), Some(None));
    }

    #[test]
    fn bad_checksum_or_truncated_malformed() {
        let mut m = echo(8, 1);
        m[9] ^= 1;
        assert_eq!(parse_echo_request(&m), None);
        assert_eq!(parse_echo_request(&m[..3]), None);
    }
}
