//! IPv6 neighbor discovery: our side of NDP and router advertisements.
//!
//! # Theory of operation
//!
//! The guest learns everything from us the way it would from a real router:
//! - **Neighbor solicitations** for our addresses (gateway `::2`, DNS `::3` and the
//!   router's link-local `fe80::2`) get a neighbor advertisement with our MAC. Other
//!   targets are not ours and get nothing, so the guest's duplicate address detection
//!   completes undisturbed.
//! - **Router advertisements** go to all nodes at start-up, a few times during the first
//!   seconds, then every [`RA_INTERVAL`], and in answer to each router solicitation. They
//!   carry the /64 prefix for SLAAC (on-link, autonomous), our MTU, our MAC and, when the
//!   DNS forwarder is on, an RDNSS option naming it (RFC 8106).
//!
//! smoltcp's `NdiscRepr` has no RDNSS option, so the messages are laid out here, with the
//! checksum from smoltcp's `Icmpv6Packet`.

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, Icmpv6Packet, IpAddress, IpProtocol, Ipv6Address};

use crate::emit;
use crate::nat::{Neighbours, Network6, ROUTER_LINK_LOCAL};
use crate::Link;

/// Interval of unsolicited router advertisements once settled.
pub const RA_INTERVAL: Duration = Duration::from_secs(60);
/// Interval of the first unsolicited router advertisements.
pub const RA_INITIAL_INTERVAL: Duration = Duration::from_secs(1);
/// How many advertisements are followed by the initial interval (RFC 4861's
/// MAX_INITIAL_RTR_ADVERTISEMENTS): with the one at start, four go out in the first 3 s.
pub const RA_INITIAL_COUNT: u32 = 3;

const ROUTER_LIFETIME_S: u16 = 1800;
const PREFIX_VALID_S: u32 = 86400;
const PREFIX_PREFERRED_S: u32 = 14400;
const RDNSS_LIFETIME_S: u32 = 1800;

/// All-nodes multicast, `ff02::1`.
pub const ALL_NODES: Ipv6Address = Ipv6Address::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The Ethernet multicast address for an IPv6 multicast address (RFC 2464).
fn multicast_mac(ip: &Ipv6Address) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// Our IPv6 addresses.
pub fn ours(net: &Network6, ip: &Ipv6Address) -> bool {
    net.is_ours(*ip)
}

/// Whether a neighbor solicitation from `src` for `target` gets our answer: one of our
/// addresses; in the pasta model any address but the guest's, and never for duplicate
/// address detection (the guest probing an address it is about to take).
fn answers(net: &Network6, src: &Ipv6Address, target: &Ipv6Address) -> bool {
    match net.neighbours {
        Neighbours::Ours => ours(net, target),
        Neighbours::AllButGuest => {
            !src.is_unspecified()
                && *target != net.guest
                && *target != *src
                && !target.is_multicast()
                && !target.is_unspecified()
        }
    }
}

/// Answers a neighbor solicitation (`message`, a checksum-verified ICMPv6 message from
/// `src`) when it asks for one of our addresses. Returns whether it did.
pub(crate) fn answer_solicitation(
    link: &mut Link,
    net: &Network6,
    src: Ipv6Address,
    message: &[u8],
) -> bool {
    // Type, code, checksum, reserved (8 bytes), then the 16-byte target.
    let Some(target) = message.get(8..24) else {
        return false;
    };
    let mut t = [0u8; 16];
    t.copy_from_slice(target);
    let target = Ipv6Address::from(t);
    if !answers(net, &src, &target) {
        return false;
    }
    let dad = src.is_unspecified();
    let dst = if dad { ALL_NODES } else { src };
    let dst_mac = dad.then(|| multicast_mac(&ALL_NODES));
    let mac = link.l2.mac();
    let res = emit::ip(
        emit::Out::of(link),
        IpAddress::Ipv6(target),
        IpAddress::Ipv6(dst),
        IpProtocol::Icmpv6,
        dst_mac,
        |buf| {
            let out = buf.get_mut(..32)?;
            out.fill(0);
            out[0] = 136; // neighbor advertisement
                          // Router; solicited unless answering duplicate address detection; override.
            out[4] = 0x80 | if dad { 0 } else { 0x40 } | 0x20;
            out[8..24].copy_from_slice(&target.octets());
            out[24] = 2; // target link-layer address option
            out[25] = 1;
            out[26..32].copy_from_slice(mac.as_bytes());
            Icmpv6Packet::new_unchecked(&mut out[..]).fill_checksum(&target, &dst);
            Some(32)
        },
    );
    res.is_ok()
}

/// Sends a router advertisement to `dst` (all nodes, or a soliciting guest address).
pub(crate) fn advertise(link: &mut Link, net: &Network6, dns: bool, dst: Ipv6Address) -> bool {
    let src = ROUTER_LINK_LOCAL;
    let dst_mac = dst.is_multicast().then(|| multicast_mac(&dst));
    let mac = link.l2.mac();
    let mtu = link.mtu;
    let link_mtu = u32::try_from(mtu).unwrap_or(u32::MAX);
    let dns = if dns { net.dns() } else { None };
    let len = if dns.is_some() { 88 } else { 64 };
    let res = emit::ip(
        emit::Out::of(link),
        IpAddress::Ipv6(src),
        IpAddress::Ipv6(dst),
        IpProtocol::Icmpv6,
        dst_mac,
        |buf| {
            let out = buf.get_mut(..len)?;
            out.fill(0);
            out[0] = 134; // router advertisement
            out[4] = 64; // current hop limit
            out[6..8].copy_from_slice(&ROUTER_LIFETIME_S.to_be_bytes());
            // Source link-layer address.
            out[16] = 1;
            out[17] = 1;
            out[18..24].copy_from_slice(mac.as_bytes());
            // MTU.
            out[24] = 5;
            out[25] = 1;
            out[28..32].copy_from_slice(&link_mtu.to_be_bytes());
            // Prefix information: on-link and autonomous (SLAAC).
            out[32] = 3;
            out[33] = 4;
            out[34] = net.prefix_len;
            out[35] = 0xc0;
            out[36..40].copy_from_slice(&PREFIX_VALID_S.to_be_bytes());
            out[40..44].copy_from_slice(&PREFIX_PREFERRED_S.to_be_bytes());
            out[48..64].copy_from_slice(&net.prefix.octets());
            if let Some(dns) = dns {
                // Recursive DNS server.
                out[64] = 25;
                out[65] = 3;
                out[68..72].copy_from_slice(&RDNSS_LIFETIME_S.to_be_bytes());
                out[72..88].copy_from_slice(&dns.octets());
            }
            Icmpv6Packet::new_unchecked(&mut out[..]).fill_checksum(&src, &dst);
            Some(len)
        },
    );
    res.is_ok()
}

/// When the next unsolicited advertisement is due, after `sent` of them.
pub fn next_advert(now: Instant, sent: u32) -> Instant {
    if sent < RA_INITIAL_COUNT {
        now + RA_INITIAL_INTERVAL
    } else {
        now + RA_INTERVAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multicast_mac_of_all_nodes() {
        assert_eq!(
            multicast_mac(&ALL_NODES),
            EthernetAddress([0x33, 0x33, 0, 0, 0, 1])
        );
    }

    #[test]
    fn our_addresses() {
        let net = Network6::DEFAULT;
        assert!(ours(&net, &"fd00::2".parse().unwrap()));
        assert!(ours(&net, &"fd00::3".parse().unwrap()));
        assert!(ours(&net, &"fe80::2".parse().unwrap()));
        assert!(!ours(&net, &"fd00::100".parse().unwrap()));
    }

    #[test]
    fn advert_schedule_initial_then_settled() {
        let t = Instant::from_secs(10);
        assert_eq!(next_advert(t, 0), t + RA_INITIAL_INTERVAL);
        assert_eq!(next_advert(t, RA_INITIAL_COUNT), t + RA_INTERVAL);
    }
}
