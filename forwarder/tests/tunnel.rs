//! Tunnelled traffic with checksum offload: a VXLAN datagram whose inner TCP/UDP checksum
//! the guest's kernel left partial (`NEEDS_CSUM`, `csum_start` inside the UDP payload)
//! leaves through the host socket with that checksum finished; bad offsets are dropped
//! and counted; the guest's own partial checksums cost nothing.

mod common;

use std::net::SocketAddr;

use common::*;
use etherparse::PacketBuilder;

const VNET: usize = 10;

fn sim() -> Sim {
    let mut cfg = Sim::config(true);
    cfg.vnet_hdr_len = VNET;
    cfg.offload = true;
    Sim::with_config(cfg)
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0)))
        .sum()
}

/// A flannel-style VXLAN payload (VXLAN header, inner Ethernet, inner IPv4 or IPv6, TCP
/// or UDP, correct checksums) and the offset of its inner transport header.
fn vxlan_payload(v6: bool, udp: bool, data: &[u8]) -> (Vec<u8>, usize) {
    let mut out = vec![8, 0, 0, 0, 0, 0, 1, 0];
    let b = PacketBuilder::ethernet2([0x0e, 0, 0, 0, 0, 1], [0x0e, 0, 0, 0, 0, 2]);
    let b = if v6 {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s[..2].copy_from_slice(&[0xfd, 0x44]);
        d[..4].copy_from_slice(&[0xfd, 0x44, 0, 1]);
        (s[15], d[15]) = (2, 2);
        b.ipv6(s, d, 64)
    } else {
        b.ipv4([10, 244, 0, 2], [10, 244, 1, 2], 64)
    };
    if udp {
        b.udp(40000, 9999).write(&mut out, data).unwrap();
    } else {
        b.tcp(40000, 8080, 1, 65535).write(&mut out, data).unwrap();
    }
    (out, 8 + 14 + if v6 { 40 } else { 20 })
}

/// The guest frame that carries `payload` to the gateway's `port` (the host's loopback)
/// as the kernel hands it over with checksum offload: vnet header `NEEDS_CSUM`, the inner
/// checksum at `inner_l4` holding only the pseudo-header sum.
fn partial_frame(payload: &[u8], inner_l4: usize, udp: bool, port: u16) -> Vec<u8> {
    let mut frame = vec![0u8; VNET];
    guest().udp(51000, port).write(&mut frame, payload).unwrap();
    let outer = 14 + 20 + 8;
    let start = outer + inner_l4;
    let offset = if udp { 6 } else { 16 };
    frame[0] = 1;
    frame[6..8].copy_from_slice(&(start as u16).to_le_bytes());
    frame[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
    // Pseudo-header sum: inner addresses, protocol, transport length.
    let inner_ip = &payload[8 + 14..];
    let len = (payload.len() - inner_l4) as u32;
    let (addrs, proto) = if inner_l4 == 8 + 14 + 40 {
        (&inner_ip[8..40], inner_ip[6])
    } else {
        (&inner_ip[12..20], inner_ip[9])
    };
    let seed = fold(sum(addrs) + u32::from(proto) + (len >> 16) + (len & 0xffff));
    let at = VNET + start + offset;
    frame[at..at + 2].copy_from_slice(&seed.to_be_bytes());
    frame
}

/// The VXLAN endpoint on the host's loopback: its address and port.
fn server() -> (SocketAddr, u16) {
    (SocketAddr::from(([127, 0, 0, 1], 4789)), 4789)
}

/// The datagrams the host's socket to `server` sent.
fn sent(sim: &mut Sim, server: SocketAddr) -> Vec<Vec<u8>> {
    match sim.host.dgram_to(server) {
        Some(id) => sim.host.take_sent(id),
        None => Vec::new(),
    }
}

#[test]
fn inner_partial_checksums_leave_finished() {
    let (server, port) = server();
    let mut sim = sim();
    let mut n = 0;
    for v6 in [false, true] {
        for udp in [false, true] {
            for len in [0, 1, 1401] {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
                let (good, inner_l4) = vxlan_payload(v6, udp, &data);
                let frame = partial_frame(&good, inner_l4, udp, port);
                assert_ne!(&frame[VNET + 42..], &good[..], "the checksum is partial");
                sim.send(&frame);
                n += 1;
                assert_eq!(
                    sent(&mut sim, server),
                    std::slice::from_ref(&good),
                    "v6 {v6} udp {udp} len {len}: the inner checksum is finished"
                );
            }
        }
    }
    assert_eq!(sim.fwd.counters().csum_finished, n);
    assert_eq!(sim.fwd.counters().drop_csum_offsets, 0);
}

#[test]
fn offsets_outside_the_packet_are_dropped_and_counted() {
    let (server, port) = server();
    let mut sim = sim();
    let (good, inner_l4) = vxlan_payload(false, false, b"data");
    let frame = partial_frame(&good, inner_l4, false, port);
    for (start, offset) in [(5u16, 0u16), (60, 4000), (u16::MAX, u16::MAX)] {
        let mut f = frame.clone();
        f[6..8].copy_from_slice(&start.to_le_bytes());
        f[8..10].copy_from_slice(&offset.to_le_bytes());
        sim.send(&f);
    }
    assert_eq!(sim.fwd.counters().drop_csum_offsets, 3);
    assert!(sent(&mut sim, server).is_empty(), "nothing relayed");
    assert_eq!(sim.fwd.counters().csum_finished, 0);
}

#[test]
fn the_guests_own_partial_checksum_is_left_to_usernet() {
    let (server, port) = server();
    let mut sim = sim();
    // A plain datagram whose own UDP checksum is partial: nothing to finish.
    let mut frame = vec![0u8; VNET];
    guest()
        .udp(51001, port)
        .write(&mut frame, b"plain")
        .unwrap();
    frame[0] = 1;
    frame[6..8].copy_from_slice(&34u16.to_le_bytes());
    frame[8..10].copy_from_slice(&6u16.to_le_bytes());
    frame[VNET + 40..VNET + 42].copy_from_slice(&[0x12, 0x34]);
    sim.send(&frame);
    assert_eq!(sent(&mut sim, server), [b"plain".to_vec()]);
    assert_eq!(sim.fwd.counters().csum_finished, 0);
    assert_eq!(sim.fwd.counters().drop_csum_offsets, 0);
}
