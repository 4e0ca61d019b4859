//! The forwarder driven over memory (see `common`): an in-memory host, a fake clock.

mod common;

use std::net::SocketAddr;

use common::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

#[test]
fn arp_for_gateway_answered() {
    let mut sim = Sim::new(true);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REQUEST,
                &GUEST_MAC,
                &GUEST,
                &[0; 6],
                &GW,
            )
            .unwrap(),
        )
        .write(&mut frame)
        .unwrap();
    sim.send(&frame);
    let reply = sim.wire.0.pop().expect("ARP reply");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Arp(arp)) = p.net else {
        panic!("not ARP: {p:?}")
    };
    assert_eq!(arp.sender_hw_addr(), GW_MAC);
    assert_eq!(arp.target_protocol_addr(), GUEST);
}

#[test]
fn ping_gateway_answered_with_same_payload() {
    let mut sim = Sim::new(true);
    let mut frame = Vec::new();
    guest()
        .icmpv4_echo_request(0x77, 3)
        .write(&mut frame, b"abcdefgh")
        .unwrap();
    sim.send(&frame);
    let reply = sim.wire.0.pop().expect("echo reply");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), GW);
    assert_eq!(ip.header().destination(), GUEST);
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x77, seq: 3 })
    );
    assert_eq!(icmp.payload(), b"abcdefgh");
    let hdr = icmp.header();
    assert_eq!(hdr.checksum, hdr.icmp_type.calc_checksum(icmp.payload()));
}

#[test]
fn syn_to_closed_port_reset() {
    // A loopback port with nothing listening.
    let port = 8080;
    let mut sim = Sim::new(true);
    sim.host.tcp(loopback(port), Remote::Refuse);
    sim.send(&tcp_frame(GW, 40000, port, 1000, |b| b.syn(), &[]));
    let rst = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(t, _, _)| t.rst))
        .expect("RST for a refused connection");
    let (t, _, src) = tcp_of(&rst).unwrap();
    assert_eq!(src, GW);
    assert_eq!(t.acknowledgment_number, 1001);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0));
}

/// As slirp4netns: a SYN to the gateway with host loopback disabled gets ICMP network
/// unreachable from the gateway ("Network is unreachable"), not a RST.
#[test]
fn syn_with_host_loopback_disabled_network_unreachable_without_connecting() {
    let port = 8080;
    let mut sim = Sim::new(false);
    sim.host.tcp(loopback(port), Remote::Accept);
    sim.send(&tcp_frame(GW, 40000, port, 1, |b| b.syn(), &[]));
    let err = sim.wire.0.pop().expect("ICMP error");
    let p = SlicedPacket::from_ethernet(&err).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP: {p:?}");
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Network
        )
    );
    assert_eq!(sim.host.opened, 0, "nothing may reach the host's loopback");
    assert_eq!(sim.fwd.counters().tcp_denied, 1);
}

#[test]
fn stray_ack_reset() {
    let mut sim = Sim::new(true);
    sim.send(&tcp_frame(
        [203, 0, 113, 1],
        40000,
        80,
        5,
        |b| b.ack(77),
        &[],
    ));
    let rst = sim.wire.0.pop().expect("RST");
    let (t, _, _) = tcp_of(&rst).unwrap();
    assert!(t.rst);
    assert_eq!(t.sequence_number, 77);
}

#[test]
fn tcp_handshake_data_both_ways_and_close() {
    let port = 8080;
    let mut sim = Sim::new(true);
    sim.host.tcp(loopback(port), Remote::Accept);
    sim.send(&tcp_frame(GW, 40001, port, 5000, |b| b.syn(), &[]));
    let synack = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(t, _, _)| t.syn && t.ack))
        .expect("SYN-ACK once the host connection is up");
    let (t, _, _) = tcp_of(&synack).unwrap();
    assert_eq!(t.acknowledgment_number, 5001);
    let server_isn = t.sequence_number;
    let conn = sim.host.stream_to(loopback(port)).expect("host connection");

    sim.send(&tcp_frame(
        GW,
        40001,
        port,
        5001,
        |b| b.ack(server_isn + 1).psh(),
        b"hello host",
    ));
    sim.run_for(200);
    assert_eq!(sim.host.peer_read_all(conn), b"hello host");

    sim.host.peer_write(conn, b"hello guest");
    let data = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(_, d, _)| !d.is_empty()))
        .expect("data for the guest");
    let (t, payload, _) = tcp_of(&data).unwrap();
    assert_eq!(payload, b"hello guest");
    assert_eq!(t.acknowledgment_number, 5011);

    // Host closes: FIN to the guest; guest acknowledges and closes too.
    sim.host.peer_fin(conn);
    let fin = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(t, _, _)| t.fin))
        .expect("FIN after the host closed");
    let (t, _, _) = tcp_of(&fin).unwrap();
    let ack = t.sequence_number + 1;
    sim.send(&tcp_frame(GW, 40001, port, 5011, |b| b.ack(ack).fin(), &[]));
    sim.run_for(200);
    assert!(sim
        .host
        .closed
        .iter()
        .any(|c| c.id == conn && c.fin && c.how == forwarder::Close::Clean));
    assert_eq!(
        sim.fwd.flow_counts(),
        (0, 0, 0),
        "flow freed after both FINs"
    );
    assert_eq!(
        sim.fwd.pooled_sockets(),
        1,
        "a light flow's socket is reused"
    );
}

/// A bulk flow's socket is freed, not pooled: its buffers' pages would stay resident.
#[test]
fn bulk_flow_socket_not_pooled() {
    let port = 8080;
    let mut sim = Sim::with_config(forwarder::Config {
        tcp_buffer: 1 << 20,
        loopback_handoff: false,
        ..Sim::config(true)
    });
    sim.host.tcp(loopback(port), Remote::Accept);
    sim.send(&tcp_frame(GW, 40002, port, 7000, |b| b.syn(), &[]));
    let synack = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(t, _, _)| t.syn && t.ack))
        .expect("SYN-ACK");
    let server_isn = tcp_of(&synack).unwrap().0.sequence_number;
    let conn = sim.host.stream_to(loopback(port)).unwrap();
    sim.send(&tcp_frame(
        GW,
        40002,
        port,
        7001,
        |b| b.ack(server_isn + 1),
        &[],
    ));
    // 512 KiB from the host: smoltcp takes it into its buffer whether or not the guest
    // acknowledges it.
    let mut sent = 0;
    while sent < 512 << 10 {
        sent += sim.host.peer_write(conn, &vec![7u8; (512 << 10) - sent]);
        sim.run_for(5);
    }
    sim.run_for(300);
    sim.send(&tcp_frame(GW, 40002, port, 7001, |b| b.rst(), &[]));
    sim.run_for(100);
    assert!(
        sim.host
            .closed
            .iter()
            .any(|c| c.id == conn && c.how == forwarder::Close::Reset),
        "the guest's RST resets the host side"
    );
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0), "flow freed after RST");
    assert_eq!(sim.fwd.pooled_sockets(), 0, "bulk socket freed");
}

#[test]
fn udp_round_trip_through_gateway() {
    let port = 5353;
    let mut sim = Sim::new(true);
    let mut frame = Vec::new();
    guest().udp(4444, port).write(&mut frame, b"ping").unwrap();
    sim.send(&frame);
    let sock = sim.host.dgram_to(loopback(port)).expect("a host socket");
    assert_eq!(sim.host.take_sent(sock), [b"ping".to_vec()]);
    sim.host.dgram_reply(sock, b"pong!");
    let reply = sim
        .run_until(2000, |f| {
            matches!(
                SlicedPacket::from_ethernet(f).map(|p| p.transport),
                Ok(Some(TransportSlice::Udp(_)))
            )
        })
        .expect("UDP reply");
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!()
    };
    assert_eq!((ip.header().source(), u.source_port()), (GW, port));
    assert_eq!(
        (ip.header().destination(), u.destination_port()),
        (GUEST, 4444)
    );
    assert_eq!(u.payload(), b"pong!");
    let expect = u
        .to_header()
        .calc_checksum_ipv4_raw(GW, GUEST, b"pong!")
        .unwrap();
    assert_eq!(u.checksum(), expect);
    assert_eq!(sim.fwd.flow_counts(), (0, 1, 0));
}

#[test]
fn dhcp_discover_offered_pool_address() {
    let mut sim = Sim::new(true);
    // A minimal DISCOVER: BOOTREQUEST, htype 1, hlen 6, xid, chaddr, magic, option 53 = 1.
    let mut dhcp = vec![0u8; 240];
    dhcp[0] = 1;
    dhcp[1] = 1;
    dhcp[2] = 6;
    dhcp[4..8].copy_from_slice(&[1, 2, 3, 4]);
    dhcp[10] = 0x80; // broadcast flag
    dhcp[28..34].copy_from_slice(&GUEST_MAC);
    dhcp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    dhcp.extend_from_slice(&[53, 1, 1, 255]);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67)
        .write(&mut frame, &dhcp)
        .unwrap();
    sim.send(&frame);
    let offer = sim.wire.0.pop().expect("DHCP offer");
    let p = SlicedPacket::from_ethernet(&offer).unwrap();
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!()
    };
    assert_eq!((u.source_port(), u.destination_port()), (67, 68));
    let body = u.payload();
    assert_eq!(body[0], 2, "BOOTREPLY");
    assert_eq!(&body[16..20], &[10, 0, 2, 15], "yiaddr: first pool address");
}

#[test]
fn malformed_frames_dropped_and_counted() {
    let mut sim = Sim::new(true);
    let mut good = Vec::new();
    guest().udp(4444, 9).write(&mut good, b"x").unwrap();
    // Every truncation of a valid frame.
    for cut in 0..good.len() {
        sim.send(&good[..cut]);
    }
    // A bad IPv4 header checksum.
    let mut bad = good.clone();
    bad[14 + 10] ^= 0xff;
    sim.send(&bad);
    // A fragment.
    let mut frag = good.clone();
    frag[14 + 6] = 0x20; // more fragments
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&frag[14..])
        .unwrap()
        .to_header();
    let csum = ip.calc_header_checksum();
    frag[14 + 10..14 + 12].copy_from_slice(&csum.to_be_bytes());
    sim.send(&frag);
    // A spoofed source (the gateway's address).
    let mut spoof = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GW, [203, 0, 113, 1], 64)
        .udp(1, 2)
        .write(&mut spoof, b"x")
        .unwrap();
    sim.send(&spoof);
    let c = sim.fwd.counters();
    assert!(c.drop_truncated > 0);
    assert!(c.drop_ipv4_malformed > 0);
    assert_eq!(c.ipv4_fragments, 1, "a lone fragment waits for the rest");
    assert_eq!(c.drop_bad_source, 1);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0));
    assert!(sim.wire.0.is_empty(), "nothing answered: {:?}", sim.wire.0);
}

/// A DHCP DISCOVER from the guest (broadcast).
fn dhcp_discover() -> Vec<u8> {
    let mut dhcp = vec![0u8; 240];
    dhcp[0] = 1;
    dhcp[1] = 1;
    dhcp[2] = 6;
    dhcp[4..8].copy_from_slice(&[1, 2, 3, 4]);
    dhcp[10] = 0x80;
    dhcp[28..34].copy_from_slice(&GUEST_MAC);
    dhcp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    dhcp.extend_from_slice(&[53, 1, 1, 255]);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67)
        .write(&mut frame, &dhcp)
        .unwrap();
    frame
}

/// pasta's `--no-tcp --no-udp --no-icmp --no-dhcp`: each is dropped and counted, nothing
/// reaches the host or is answered; what stays on (ARP) still works.
#[test]
fn services_turned_off_are_dropped_and_counted() {
    let (uport, tport) = (5353, 8080);
    let mut cfg = Sim::config(true);
    cfg.services = forwarder::Services {
        tcp: false,
        udp: false,
        icmp: false,
        dhcp: false,
        ndp: false,
        announce_dns: false,
    };
    let mut sim = Sim::with_config(cfg);
    let mut udp = Vec::new();
    guest().udp(4444, uport).write(&mut udp, b"ping").unwrap();
    let mut ping = Vec::new();
    guest()
        .icmpv4_echo_request(0x77, 3)
        .write(&mut ping, b"abcdefgh")
        .unwrap();
    let syn = tcp_frame(GW, 40000, tport, 1, |b| b.syn(), &[]);
    for frame in [&dhcp_discover(), &udp, &ping, &syn] {
        sim.send(frame);
    }
    assert!(sim.wire.0.is_empty(), "answered: {:?}", sim.wire.0);
    assert_eq!(sim.fwd.counters().drop_service_off, 4);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(sim.host.opened, 0, "a flow reached the host");
}

/// The DNS forwarder is named by DHCP only with `announce_dns` (pasta's `--dhcp-dns`).
#[test]
fn dhcp_names_the_dns_forwarder_only_when_announced() {
    for announce in [true, false] {
        let mut cfg = Sim::config(true);
        cfg.services.announce_dns = announce;
        let mut sim = Sim::with_config(cfg);
        sim.send(&dhcp_discover());
        let offer = sim.wire.0.pop().expect("DHCP offer");
        let p = SlicedPacket::from_ethernet(&offer).unwrap();
        let Some(TransportSlice::Udp(u)) = &p.transport else {
            panic!()
        };
        // Option 6 (domain name servers) naming 10.0.2.3, among the options after the
        // magic cookie.
        let opts = &u.payload()[240..];
        let mut i = 0;
        let mut dns = None;
        while i + 1 < opts.len() && opts[i] != 255 {
            if opts[i] == 0 {
                i += 1;
                continue;
            }
            let len = usize::from(opts[i + 1]);
            if opts[i] == 6 {
                dns = Some(opts[i + 2..i + 2 + len].to_vec());
            }
            i += 2 + len;
        }
        assert_eq!(
            dns,
            announce.then(|| vec![10, 0, 2, 3]),
            "announce_dns {announce}"
        );
    }
}

/// The host's loopback at `port`: where the gateway's address leads.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
