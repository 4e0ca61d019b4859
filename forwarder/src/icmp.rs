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
use std::net::IpAddr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, UdpPacket,
};

use crate::emit::{self, EmitError};
use crate::{FlowKey, HostIo, Io, Link};

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

/// ICMP errors that may leave at once (Linux's `net.ipv4.icmp_msgs_burst`).
const ERROR_BURST: u32 = 50;

/// ICMP errors per second in the long run (Linux's `net.ipv4.icmp_msgs_per_sec`).
const ERRORS_PER_SEC: u64 = 1000;

/// A token bucket for the ICMP errors usernet sends the guest about host-side failures,
/// like the kernel's global ICMP limit: a burst of [`ERROR_BURST`], then
/// [`ERRORS_PER_SEC`]. A guest that keeps sending into an unreachable network gets its
/// errors at that rate, never one per datagram.
#[derive(Debug)]
pub(crate) struct ErrorLimit {
    tokens: u32,
    last: Instant,
}

impl ErrorLimit {
    /// A full bucket.
    pub(crate) fn new(now: Instant) -> ErrorLimit {
        ErrorLimit {
            tokens: ERROR_BURST,
            last: now,
        }
    }

    /// Takes a token if one is left (refilled for the time since the last call).
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let elapsed = (now - self.last).total_micros();
        let earned = elapsed.saturating_mul(ERRORS_PER_SEC) / 1_000_000;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(ERROR_BURST);
            // Keep the remainder: advance by the time the earned tokens took.
            self.last = if self.tokens == ERROR_BURST {
                now
            } else {
                self.last + Duration::from_micros(u64::from(earned) * 1_000_000 / ERRORS_PER_SEC)
            };
        } else if now < self.last {
            self.last = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// The ICMP error that tells the guest of a host socket's failure to send (or of an
/// error the connected socket reported), as a router would: `ENETUNREACH` network,
/// `EHOSTUNREACH` host, `EACCES`/`EPERM` (a firewall, a broadcast) administratively
/// prohibited, `ECONNREFUSED` (an ICMP port unreachable the host got) port unreachable.
/// `None` for local conditions the guest cannot act on (`ENOBUFS`, `EAGAIN`...).
pub(crate) fn unreachable_for(err: &io::Error) -> Option<Unreachable> {
    match err.raw_os_error()? {
        libc::ENETUNREACH => Some(Unreachable::Net),
        libc::EHOSTUNREACH => Some(Unreachable::Host),
        libc::EACCES | libc::EPERM => Some(Unreachable::Prohibited),
        libc::ECONNREFUSED => Some(Unreachable::Port),
        _ => None,
    }
}

/// The ICMP error that tells the guest why NAT refused a destination, where one is owed
/// whatever the protocol: the gateway's host-loopback mapping switched off
/// (`--disable-host-loopback`) is "network unreachable", as slirp4netns answers. `None`:
/// the protocol decides (TCP resets, UDP says port unreachable or prohibited).
pub fn deny_reason(deny: crate::nat::Deny) -> Option<Unreachable> {
    match deny {
        crate::nat::Deny::HostLoopbackDisabled => Some(Unreachable::Net),
        crate::nat::Deny::Egress => Some(Unreachable::Prohibited),
        crate::nat::Deny::NoService | crate::nat::Deny::NotRoutable | crate::nat::Deny::Nobody => {
            None
        }
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
    let res = emit::ip(
        emit::Out::of(link),
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
    // `original` may be a quote already cut short: only its header must be whole.
    let (to, quote_len) = match from {
        IpAddress::Ipv4(_) => {
            if original.len() < emit::IPV4_HEADER_LEN {
                return;
            }
            let orig = Ipv4Packet::new_unchecked(original);
            let header_len = usize::from(orig.header_len());
            if header_len < emit::IPV4_HEADER_LEN || header_len > original.len() {
                return;
            }
            let len = header_len + 8;
            (IpAddress::Ipv4(orig.src_addr()), len.min(original.len()))
        }
        IpAddress::Ipv6(_) => {
            if original.len() < emit::IPV6_HEADER_LEN {
                return;
            }
            let orig = Ipv6Packet::new_unchecked(original);
            let room = IPV6_MIN_MTU - emit::IPV6_HEADER_LEN - 8;
            (IpAddress::Ipv6(orig.src_addr()), original.len().min(room))
        }
    };
    let quote = &original[..quote_len];
    let res = emit::ip(
        emit::Out::of(link),
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

/// Most payload bytes of a guest datagram quoted in an error about it: the quote of an
/// IPv4 error stops after the UDP header anyway (RFC 792), IPv6 quotes as much as fits
/// (RFC 4443); the guest's kernel matches on the headers.
pub(crate) const QUOTE_PAYLOAD: usize = 64;

/// Sends "destination unreachable" from `from` about a guest datagram of the flow `key`
/// (guest -> remote), quoting it rebuilt from its addresses, ports, and `datagram`: its
/// payload length and first payload bytes (the datagram itself is gone when the host
/// socket reports the failure). Nothing when the link's [`ErrorLimit`] has no token left.
pub(crate) fn emit_unreachable_udp(
    link: &mut Link,
    now: Instant,
    from: IpAddress,
    key: crate::FlowKey,
    code: Unreachable,
    datagram: (usize, &[u8]),
) {
    let (remote, guest) = (key.remote, key.guest);
    let (data_len, head) = datagram;
    if !link.icmp_limit.allow(now) {
        return;
    }
    let head = &head[..head.len().min(QUOTE_PAYLOAD)];
    let mut quote = [0u8; emit::IPV6_HEADER_LEN + emit::UDP_HEADER_LEN + QUOTE_PAYLOAD];
    let caps = ChecksumCapabilities::default();
    let udp_len = emit::UDP_HEADER_LEN + data_len;
    let ip_len = match (guest.0, remote.0) {
        (IpAddress::Ipv4(src_addr), IpAddress::Ipv4(dst_addr)) => {
            let ip = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
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
                payload_len: udp_len,
                hop_limit: 64,
            };
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut quote[..]));
            emit::IPV6_HEADER_LEN
        }
        _ => return,
    };
    let end = ip_len + emit::UDP_HEADER_LEN;
    let mut packet = UdpPacket::new_unchecked(&mut quote[ip_len..end]);
    packet.set_src_port(guest.1);
    packet.set_dst_port(remote.1);
    packet.set_len(u16::try_from(udp_len).unwrap_or(u16::MAX));
    packet.set_checksum(0);
    quote[end..end + head.len()].copy_from_slice(head);
    emit_unreachable(link, from, code, &quote[..end + head.len()]);
}

/// One echo flow through a ping socket.
pub struct IcmpFlow {
    pub(crate) key: FlowKey,
    /// The flow's id: its ping socket's name for the [`HostIo`].
    id: usize,
    pub(crate) last_active: Instant,
    pub(crate) timer: Option<Instant>,
}

impl IcmpFlow {
    /// Opens a ping socket to the flow's destination, bound to `outbound` if given (of
    /// the destination's family).
    ///
    /// # Errors
    /// When ping sockets are not permitted (`EACCES`) or other socket calls fail.
    pub(crate) fn open(
        now: Instant,
        id: usize,
        key: FlowKey,
        outbound: Option<IpAddr>,
        host: &mut impl HostIo,
    ) -> io::Result<IcmpFlow> {
        host.icmp_open(id, key.remote.0.into(), outbound)?;
        Ok(IcmpFlow {
            key,
            id,
            last_active: now,
            timer: None,
        })
    }

    /// Sends a guest echo request (the whole ICMP message).
    pub(crate) fn send(&mut self, now: Instant, message: &[u8], host: &mut impl HostIo) {
        self.last_active = now;
        if let Err(e) = host.send(self.id, message) {
            log::trace!("ping send failed: {e}");
        }
    }

    /// Moves echo replies to the guest.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        link: &mut Link,
        io: &mut Io<'_, impl HostIo>,
        c: &mut crate::Counters,
    ) {
        let (remote, guest, id) = (self.key.remote.0, self.key.guest, self.id);
        loop {
            let mut done = false;
            let proto = protocol(&remote);
            let res = emit::ip(emit::Out::of(link), remote, guest.0, proto, None, |buf| {
                let n = match io.host.recv(id, buf) {
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
            });
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Ipv6Address;

    #[test]
    fn error_limit_burst_then_rate_like_the_kernel() {
        let t0 = Instant::from_millis(1_000);
        let mut l = ErrorLimit::new(t0);
        let burst = (0..200).filter(|_| l.allow(t0)).count();
        assert_eq!(burst, ERROR_BURST as usize);
        // 1000 per second: one per millisecond from then on, none in between.
        assert!(!l.allow(t0 + Duration::from_micros(500)));
        assert!(l.allow(t0 + Duration::from_millis(1)));
        assert!(!l.allow(t0 + Duration::from_millis(1)));
        let later = t0 + Duration::from_millis(10);
        assert_eq!((0..100).filter(|_| l.allow(later)).count(), 9);
        // Idle long enough, the bucket is full again, never fuller.
        let idle = later + Duration::from_secs(5);
        assert_eq!(
            (0..200).filter(|_| l.allow(idle)).count(),
            ERROR_BURST as usize
        );
    }

    #[test]
    fn unreachable_for_maps_host_errnos() {
        let code = |n| unreachable_for(&io::Error::from_raw_os_error(n));
        assert_eq!(code(libc::ENETUNREACH), Some(Unreachable::Net));
        assert_eq!(code(libc::EHOSTUNREACH), Some(Unreachable::Host));
        assert_eq!(code(libc::EACCES), Some(Unreachable::Prohibited));
        assert_eq!(code(libc::EPERM), Some(Unreachable::Prohibited));
        assert_eq!(code(libc::ECONNREFUSED), Some(Unreachable::Port));
        assert_eq!(code(libc::ENOBUFS), None);
    }

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
