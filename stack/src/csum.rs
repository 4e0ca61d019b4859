//! Partial checksums (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) that usernet must finish itself.
//!
//! # Theory of operation
//!
//! With checksum offload on the TAP (`TUN_F_CSUM`), the guest's kernel may hand us a frame
//! whose checksum at `csum_start + csum_offset` is not finished: the field holds the
//! pseudo-header sum, and whoever takes the frame owes the ones-complement sum of the
//! bytes from `csum_start` to the end of the packet. Usually that checksum is the frame's
//! own TCP or UDP one, and usernet owes nothing: it terminates TCP (smoltcp) and strips
//! the UDP header before the payload leaves through a host socket.
//!
//! Tunnels are different. A VXLAN device in the guest (flannel's `flannel.1`, with its
//! default offloads) encapsulates a pod's TCP segment, whose checksum is still partial,
//! in a UDP datagram: `csum_start` then points at the *inner* TCP header, inside the
//! UDP payload that usernet relays as it is. Unfinished, the receiving pod's kernel drops
//! every such segment (`TcpInCsumErrors`, `UdpInCsumErrors`).
//!
//! [`check`] tells these frames apart at the cost of a flag test for frames without
//! `NEEDS_CSUM`, and a few header reads for those with it: a partial checksum that starts
//! exactly at the outer transport header, or whose field lies in any header, is
//! usernet's to ignore ([`Check::Own`]: usernet rebuilds headers, and never rewrites one
//! after it was checked); one whose field lies in the transport payload of a TCP, UDP or
//! ICMP packet (not a fragment) is in data usernet passes on ([`Check::Finish`]), and
//! [`finish`] completes it, as the kernel's `skb_checksum_help` would: fold the sum over
//! `[start, end)`, complement it, store it (`0xffff` for a result of 0, which a UDP
//! receiver would read as "no checksum"). Offsets a kernel's tun would refuse (the field
//! beyond the packet, the start inside the Ethernet header) are bad input
//! ([`Check::Bad`]): the caller drops and counts the frame.
//!
//! The end of the packet is the end of the IP packet (its length field), not of the
//! frame: Ethernet padding is not summed. Nothing here allocates.
//!
//! ## Where partial checksums and super-frames go (audit)
//!
//! - Gateway to host sockets (UDP payloads, TCP streams, ICMP echo data, DNS queries):
//!   [`check`] runs on every frame the switch hands the gateway
//!   (`forwarder::Forwarder::handle_port_frame`), before anything parses it.
//! - Switch to other members: frames keep their vnet header, unchanged. Every port of a
//!   switch has the network's vnet header length and offloads (a TAP that differs is
//!   refused when it joins, `src/network.rs`), and a TAP takes `NEEDS_CSUM` and GSO
//!   frames on write whatever its own offload flags: the member's kernel finishes them.
//! - TCP super-frames (GSO) reach smoltcp, which takes them as one segment. The TAP
//!   never negotiates UDP or tunnel segmentation, so a guest's kernel cuts those frames
//!   itself; a frame that claims it anyway is relayed as the one datagram it holds.
//! - ICMP errors quote the guest's packet as it came, partial checksum included, back to
//!   the guest only, whose kernel matches quotes by addresses and ports.
//! - `--pcap`: finished in the recorded copy ([`announced`]), super-frames excepted.

use crate::l2::ETHERNET_HEADER_LEN;
use crate::vnet::{FLAG_NEEDS_CSUM, HEADER_LEN};

/// A partial checksum to finish, in offsets from the start of the Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    /// Where the summed region starts (`csum_start`).
    pub start: usize,
    /// Where the checksum field sits (`csum_start + csum_offset`).
    pub field: usize,
    /// Where the packet ends (the end of the IP packet).
    pub end: usize,
}

/// What a frame's vnet header asks of usernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing: no partial checksum, or not an IP packet usernet can place.
    None,
    /// The partial checksum is not in data usernet passes on: the frame's own transport
    /// checksum (usernet terminates it), or a field in headers usernet rebuilds.
    Own,
    /// The partial checksum's field lies in data usernet passes on (a transport
    /// payload): [`finish`] it first.
    Finish(Partial),
    /// `NEEDS_CSUM` with offsets a kernel would refuse (the field beyond the packet, the
    /// start inside the Ethernet header): drop and count.
    Bad,
}

/// The outer IP packet of an Ethernet frame, in offsets from the start of the frame.
struct Outer {
    /// Where its transport header starts.
    l4: usize,
    /// Where it ends (bounded by the frame).
    end: usize,
    /// Where the data usernet passes on starts (the transport payload of TCP, UDP and
    /// ICMP); `None` for fragments and other protocols, which usernet does not relay.
    data: Option<usize>,
}

fn outer_ip(eth: &[u8]) -> Option<Outer> {
    let ip = eth.get(ETHERNET_HEADER_LEN..)?;
    let (l4, end, proto) = match eth.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            // More fragments, or a fragment offset: no transport header of its own.
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff != 0;
            let proto = if frag { None } else { Some(*ip.get(9)?) };
            (ihl, total.min(ip.len()), proto)
        }
        [0x86, 0xdd] => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (40, (40 + payload).min(ip.len()), Some(*ip.get(6)?))
        }
        _ => return None,
    };
    let header = match proto {
        Some(6) => usize::from(ip.get(l4 + 12)? >> 4) * 4,
        Some(17 | 1 | 58) => 8,
        _ => 0,
    };
    Some(Outer {
        l4: ETHERNET_HEADER_LEN + l4,
        end: ETHERNET_HEADER_LEN + end,
        data: (header > 0).then_some(ETHERNET_HEADER_LEN + l4 + header),
    })
}

/// What `frame` (a vnet header of `vnet_hdr_len` bytes, 0 or [`HEADER_LEN`], then the
/// Ethernet frame) asks: see [`Check`].
#[inline]
pub fn check(frame: &[u8], vnet_hdr_len: usize) -> Check {
    if vnet_hdr_len < HEADER_LEN || frame.first().is_none_or(|f| f & FLAG_NEEDS_CSUM == 0) {
        return Check::None;
    }
    check_partial(frame, vnet_hdr_len)
}

#[cold]
fn bad() -> Check {
    Check::Bad
}

fn check_partial(frame: &[u8], vnet_hdr_len: usize) -> Check {
    if frame.len() < HEADER_LEN {
        return Check::None;
    }
    let le = |i: usize| usize::from(u16::from_le_bytes([frame[i], frame[i + 1]]));
    let (start, field) = (le(6), le(6) + le(8));
    let Some(eth) = frame.get(vnet_hdr_len..) else {
        return Check::None;
    };
    let Some(outer) = outer_ip(eth) else {
        return Check::None;
    };
    // Offsets a kernel would refuse (tun: virtio_net_hdr_to_skb).
    if start < ETHERNET_HEADER_LEN || field + 2 > outer.end {
        return bad();
    }
    // Only a checksum field inside the data usernet passes on is finished: headers are
    // usernet's to rebuild, and are never rewritten after they were checked.
    match outer.data {
        Some(data) if start != outer.l4 && field >= data => Check::Finish(Partial {
            start,
            field,
            end: outer.end,
        }),
        _ => Check::Own,
    }
}

/// Any partial checksum `frame` announces (its own transport checksum included), for a
/// copy that must show finished checksums (a packet capture); `None` without one, for
/// TCP super-frames (GSO: their checksums are the segments') and for offsets outside
/// the packet.
pub fn announced(frame: &[u8], vnet_hdr_len: usize) -> Option<Partial> {
    if vnet_hdr_len < HEADER_LEN
        || frame.len() < HEADER_LEN
        || frame[0] & FLAG_NEEDS_CSUM == 0
        || frame[1] != 0
    {
        return None;
    }
    let le = |i: usize| usize::from(u16::from_le_bytes([frame[i], frame[i + 1]]));
    let (start, field) = (le(6), le(6) + le(8));
    let end = outer_ip(frame.get(vnet_hdr_len..)?)?.end;
    (start >= ETHERNET_HEADER_LEN && field + 2 <= end).then_some(Partial { start, field, end })
}

/// The ones-complement sum of `data` (big-endian 16-bit words, an odd last byte padded
/// with zero), not folded.
fn sum(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]))
            + u64::from(u16::from_be_bytes([w[2], w[3]]))
            + u64::from(u16::from_be_bytes([w[4], w[5]]))
            + u64::from(u16::from_be_bytes([w[6], w[7]]));
    }
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a ones-complement sum to 16 bits.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Finishes the partial checksum `p` of the Ethernet frame `eth` (no vnet header): the
/// complemented sum of `[p.start, p.end)`, whose checksum field holds the pseudo-header
/// sum, is stored at `p.field` (`0xffff` instead of 0). `p` comes from [`check`] on the
/// same bytes, so it fits; a `p` that does not is left alone.
pub fn finish(eth: &mut [u8], p: Partial) {
    if p.field + 2 > p.end || p.start > p.field || p.end > eth.len() {
        return;
    }
    let c = !fold(sum(&eth[p.start..p.end]));
    let c = if c == 0 { 0xffff } else { c };
    eth[p.field..p.field + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const VNET: usize = HEADER_LEN;

    /// The folded, uncomplemented pseudo-header sum a kernel leaves in a partial TCP or
    /// UDP checksum field.
    fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u16 {
        let mut p = Vec::new();
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        if src.len() == 4 {
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        fold(sum(&p))
    }

    /// A VXLAN-style frame: outer IPv4/UDP whose payload is an inner Ethernet frame with
    /// IPv4 (or IPv6) and TCP (or UDP); returns the frame with a correct inner checksum,
    /// the same frame as the guest's kernel hands it over (vnet header, inner checksum
    /// partial), and where the inner transport header starts.
    fn tunnelled(inner_v6: bool, inner_udp: bool, payload: &[u8]) -> (Vec<u8>, Vec<u8>, usize) {
        let mut inner = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let (src, dst): (Vec<u8>, Vec<u8>) = if inner_v6 {
            (
                vec![0xfd, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                vec![0xfd, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            )
        } else {
            (vec![10, 244, 0, 2], vec![10, 244, 1, 2])
        };
        let b = if inner_v6 {
            b.ipv6(
                src.clone().try_into().unwrap(),
                dst.clone().try_into().unwrap(),
                64,
            )
        } else {
            b.ipv4(
                src.clone().try_into().unwrap(),
                dst.clone().try_into().unwrap(),
                64,
            )
        };
        if inner_udp {
            b.udp(40000, 5353).write(&mut inner, payload).unwrap();
        } else {
            b.tcp(40000, 8080, 7, 65535)
                .write(&mut inner, payload)
                .unwrap();
        }
        let mut vxlan = vec![8, 0, 0, 0, 0, 0, 1, 0];
        vxlan.extend_from_slice(&inner);
        let mut good = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x64], [0x52, 0x55, 10, 0, 2, 2])
            .ipv4([10, 0, 2, 100], [172, 31, 0, 2], 64)
            .udp(51000, 8472)
            .write(&mut good, &vxlan)
            .unwrap();
        // Outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet.
        let inner_eth = 14 + 20 + 8 + 8;
        let l4 = inner_eth + 14 + if inner_v6 { 40 } else { 20 };
        let (proto, field) = if inner_udp { (17, 6) } else { (6, 16) };
        let mut partial = vec![0u8; VNET];
        partial[0] = FLAG_NEEDS_CSUM;
        partial[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
        partial[8..10].copy_from_slice(&(field as u16).to_le_bytes());
        partial.extend_from_slice(&good);
        let seed = pseudo(&src, &dst, proto, good.len() - l4);
        partial[VNET + l4 + field..VNET + l4 + field + 2].copy_from_slice(&seed.to_be_bytes());
        (good, partial, l4)
    }

    #[test]
    fn inner_checksums_of_every_family_and_protocol_are_finished() {
        for (v6, udp) in [(false, false), (false, true), (true, false), (true, true)] {
            for len in [0, 1, 2, 3, 1400, 1401] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let (good, mut partial, l4) = tunnelled(v6, udp, &data);
                assert_ne!(&partial[VNET..], &good[..], "v6 {v6} udp {udp} len {len}");
                let Check::Finish(p) = check(&partial, VNET) else {
                    panic!("not to finish: v6 {v6} udp {udp} len {len}");
                };
                assert_eq!(p.start, l4);
                assert_eq!(p.end, good.len());
                finish(&mut partial[VNET..], p);
                assert_eq!(&partial[VNET..], &good[..], "v6 {v6} udp {udp} len {len}");
            }
        }
    }

    #[test]
    fn own_checksum_and_plain_frames_are_left_alone() {
        let (_, mut partial, _) = tunnelled(false, false, b"x");
        // Without the flag, without a vnet header: nothing to do.
        let mut plain = partial.clone();
        plain[0] = 0;
        assert_eq!(check(&plain, VNET), Check::None);
        assert_eq!(check(&partial[VNET..], 0), Check::None);
        // The outer UDP checksum itself: usernet strips that header.
        partial[6..8].copy_from_slice(&34u16.to_le_bytes());
        partial[8..10].copy_from_slice(&6u16.to_le_bytes());
        assert_eq!(check(&partial, VNET), Check::Own);
        // A field in a header (the outer IPv4 addresses, the UDP ports) is never
        // rewritten, wherever the sum would start.
        for (start, offset) in [(14, 12), (20, 10), (34, 0), (14, 26)] {
            let mut f = partial.clone();
            f[6..8].copy_from_slice(&(start as u16).to_le_bytes());
            f[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
            assert_eq!(check(&f, VNET), Check::Own, "start {start} offset {offset}");
        }
        // A fragment has no transport payload of its own until it is reassembled.
        let mut frag = partial.clone();
        frag[6..8].copy_from_slice(&60u16.to_le_bytes());
        assert!(matches!(check(&frag, VNET), Check::Finish(_)));
        frag[VNET + 14 + 6] = 0x20; // more fragments
        assert_eq!(check(&frag, VNET), Check::Own);
        // Not IP (ARP): nothing usernet relays as it is.
        partial[VNET + 12..VNET + 14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(check(&partial, VNET), Check::None);
        assert_eq!(check(&partial[..4], VNET), Check::None);
    }

    #[test]
    fn offsets_outside_the_packet_are_bad() {
        let (_, partial, _) = tunnelled(false, true, b"abcd");
        let len = partial.len() - VNET;
        for (start, offset) in [(len - 1, 0), (len - 2, 1), (60, 60_000), (0, 20), (13, 30)] {
            let mut f = partial.clone();
            f[6..8].copy_from_slice(&(start as u16).to_le_bytes());
            f[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
            assert_eq!(check(&f, VNET), Check::Bad, "start {start} offset {offset}");
        }
        // The last two bytes are still inside.
        let mut f = partial.clone();
        f[6..8].copy_from_slice(&((len - 2) as u16).to_le_bytes());
        f[8..10].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(check(&f, VNET), Check::Finish(_)));
        // Ethernet padding beyond the IP packet is not part of it.
        let mut padded = partial.clone();
        padded.extend_from_slice(&[0; 8]);
        padded[6..8].copy_from_slice(&((len + 2) as u16).to_le_bytes());
        assert_eq!(check(&padded, VNET), Check::Bad);
    }

    #[test]
    fn announced_covers_the_own_checksum_too_but_not_super_frames() {
        let (good, mut partial, _) = tunnelled(false, true, b"own");
        // The outer UDP checksum, partial: seeded with the outer pseudo-header sum.
        let outer_len = good.len() - 34;
        let seed = pseudo(&[10, 0, 2, 100], &[172, 31, 0, 2], 17, outer_len);
        let mut own = partial.clone();
        own[6..8].copy_from_slice(&34u16.to_le_bytes());
        own[8..10].copy_from_slice(&6u16.to_le_bytes());
        own[VNET + 40..VNET + 42].copy_from_slice(&seed.to_be_bytes());
        let p = announced(&own, VNET).expect("own checksum announced");
        finish(&mut own[VNET..], p);
        let s = fold(sum(&own[VNET + 34..]) + u64::from(seed));
        assert_eq!(s, 0xffff, "the outer UDP checksum verifies");
        partial[1] = 1;
        assert_eq!(announced(&partial, VNET), None, "super-frame");
        partial[1] = 0;
        partial[0] = 0;
        assert_eq!(announced(&partial, VNET), None, "no flag");
    }

    #[test]
    fn a_zero_result_is_stored_as_all_ones() {
        // Data whose sum is 0xffff: the complement is 0, stored as 0xffff.
        let mut eth = vec![0u8; 14];
        eth.extend_from_slice(&[0xff, 0xff, 0, 0]);
        finish(
            &mut eth,
            Partial {
                start: 14,
                field: 16,
                end: 18,
            },
        );
        assert_eq!(&eth[16..18], &[0xff, 0xff]);
    }

    #[test]
    fn sum_matches_a_bytewise_reference() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut reference = 0u64;
            for (i, b) in data.iter().enumerate() {
                reference += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
            }
            assert_eq!(fold(sum(&data)), fold(reference), "len {len}");
        }
    }
}
