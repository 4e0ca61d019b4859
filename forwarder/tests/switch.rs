//! The forwarder as a switch: several member ports on one gateway, over memory.

mod common;

use common::{sealed_config, MemHost, GUEST, GUEST_MAC, GW, GW_MAC, NET6};
use etherparse::PacketBuilder;
use forwarder::{Forwarder, FrameSink, Io, PortId, Topology};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;
use std::net::Ipv6Addr;

const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x65];
const B: [u8; 4] = [10, 0, 2, 101];
const C_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x66];

/// Frames per port, in order.
#[derive(Default)]
struct Ports(Vec<(PortId, Vec<u8>)>);

impl FrameSink for Ports {
    fn send_frame(&mut self, port: PortId, frame: &[u8]) -> std::io::Result<()> {
        self.0.push((port, frame.to_vec()));
        Ok(())
    }
}

impl Ports {
    fn take(&mut self, port: PortId) -> Vec<Vec<u8>> {
        let (mine, rest) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(p, _)| *p == port);
        self.0 = rest;
        mine.into_iter().map(|(_, f)| f).collect()
    }
}

struct Net {
    host: MemHost,
    fwd: Forwarder,
    out: Ports,
    ports: [PortId; 3],
    /// The read buffer frames are handed over in, as the event loop's.
    rx: Vec<u8>,
}

impl Net {
    fn new(vnet: usize) -> Net {
        let now = Instant::from_millis(1);
        let mut fwd = Forwarder::new(sealed_config(vnet), Topology::Single, now);
        let b = fwd.attach(now, None).unwrap();
        let c = fwd.attach(now, Some(EthernetAddress(C_MAC))).unwrap();
        Net {
            host: MemHost::default(),
            fwd,
            out: Ports::default(),
            ports: [0, b, c],
            rx: Vec::new(),
        }
    }

    fn send(&mut self, port: PortId, frame: &[u8]) {
        let now = Instant::from_millis(2);
        let mut io = Io {
            host: &mut self.host,
            tap: &mut self.out,
        };
        self.rx.clear();
        self.rx.extend_from_slice(frame);
        self.fwd.handle_port_frame(now, port, &mut self.rx, &mut io);
        self.fwd.poll_flows(now, &mut io);
        self.fwd.flush(&mut self.out);
    }
}

fn arp_request(vnet: usize, mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let arp = etherparse::ArpPacket::new(
        etherparse::ArpHardwareId::ETHERNET,
        etherparse::EtherType::IPV4,
        etherparse::ArpOperation::REQUEST,
        &mac,
        &ip,
        &[0; 6],
        &target,
    )
    .unwrap();
    let mut frame = vec![0u8; vnet];
    etherparse::Ethernet2Header {
        source: mac,
        destination: [0xff; 6],
        ether_type: etherparse::EtherType::ARP,
    }
    .write(&mut frame)
    .unwrap();
    arp.write(&mut frame).unwrap();
    frame
}

#[test]
fn broadcast_reaches_every_member_and_the_gateway() {
    let mut net = Net::new(0);
    let [a, b, c] = net.ports;
    // A asks for the gateway: every other member sees the request, A gets the answer.
    let req = arp_request(0, GUEST_MAC, GUEST, GW);
    net.send(a, &req);
    assert_eq!(net.out.take(b), vec![req.clone()]);
    assert_eq!(net.out.take(c), vec![req]);
    let answers = net.out.take(a);
    assert_eq!(answers.len(), 1, "the gateway's ARP reply");
    assert_eq!(&answers[0][..6], &GUEST_MAC);
    assert_eq!(&answers[0][6..12], &GW_MAC);
    // A member's question for another member is not the gateway's to answer.
    let req = arp_request(0, B_MAC, B, GUEST);
    net.send(b, &req);
    assert_eq!(net.out.take(a), vec![req.clone()]);
    assert!(net.out.take(b).is_empty());
    assert_eq!(net.fwd.counters().drop_mac_spoof, 0);
}

#[test]
fn unicast_between_members_is_switched_unchanged_with_its_vnet_header() {
    let vnet = 10;
    let mut net = Net::new(vnet);
    let [a, b, _] = net.ports;
    // Both members speak once: the switch learns where they are.
    net.send(a, &arp_request(vnet, GUEST_MAC, GUEST, GW));
    net.send(b, &arp_request(vnet, B_MAC, B, GW));
    net.out.0.clear();
    let before = *net.fwd.switch().counters(b).unwrap();
    let switched = net.fwd.counters().switched_frames;
    // A TCP super-frame (GSO, 60 KB) from A to B, vnet header and all.
    let mut frame = vec![0u8; vnet];
    frame[0] = 1; // NEEDS_CSUM
    frame[1] = 1; // GSO_TCPV4
    frame[4..6].copy_from_slice(&1448u16.to_le_bytes());
    PacketBuilder::ethernet2(GUEST_MAC, B_MAC)
        .ipv4(GUEST, B, 64)
        .tcp(40000, 5201, 1, 65535)
        .write(&mut frame, &vec![0x5a; 60_000])
        .unwrap();
    let frame_len = frame.len();
    net.send(a, &frame);
    assert_eq!(net.out.take(b), vec![frame]);
    assert!(net.out.0.is_empty(), "nothing for anyone else");
    let stats = net.fwd.switch().counters(b).unwrap();
    assert_eq!(stats.tx_frames, before.tx_frames + 1);
    assert_eq!(stats.tx_bytes, before.tx_bytes + frame_len as u64);
    assert_eq!(net.fwd.counters().switched_frames, switched + 1);
}

#[test]
fn spoofed_source_mac_is_dropped_and_counted() {
    let mut net = Net::new(0);
    let [a, b, c] = net.ports;
    net.send(a, &arp_request(0, GUEST_MAC, GUEST, GW));
    net.out.0.clear();
    // B claims A's MAC, then the gateway's; C (configured MAC) any other one.
    net.send(b, &arp_request(0, GUEST_MAC, B, GW));
    net.send(b, &arp_request(0, GW_MAC, B, GW));
    net.send(c, &arp_request(0, B_MAC, B, GW));
    assert!(net.out.0.is_empty(), "{:?}", net.out.0);
    assert_eq!(net.fwd.counters().drop_mac_spoof, 3);
    assert_eq!(net.fwd.switch().counters(b).unwrap().drop_spoofed, 2);
    assert_eq!(net.fwd.switch().counters(c).unwrap().drop_spoofed, 1);
    // A's traffic still reaches A.
    let mut to_a = Vec::new();
    PacketBuilder::ethernet2(B_MAC, GUEST_MAC)
        .ipv4(B, GUEST, 64)
        .udp(1, 2)
        .write(&mut to_a, b"x")
        .unwrap();
    net.send(b, &to_a);
    assert_eq!(net.out.take(a), vec![to_a]);
}

/// A neighbour advertisement from `mac`/`src` for `target`, to all nodes; `hop_by_hop`
/// puts an (empty) hop-by-hop options header before the ICMPv6 one.
fn neighbour_advert(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, hop_by_hop: bool) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    let ext: &[u8] = if hop_by_hop {
        &[58, 0, 1, 4, 0, 0, 0, 0]
    } else {
        &[]
    };
    let len = (ext.len() + 32) as u16;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[if hop_by_hop { 0 } else { 58 }, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
    f.extend_from_slice(ext);
    // Type 136, code 0, checksum (the switch does not look), override flag.
    f.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    f.extend_from_slice(&target.octets());
    // Target link-layer address option.
    f.extend_from_slice(&[2, 1]);
    f.extend_from_slice(&mac);
    f
}

/// The link-local address SLAAC makes of `mac`.
fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

#[test]
fn spoofed_neighbour_advertisements_are_dropped_and_counted() {
    let mut net = Net::new(0);
    let [a, b, c] = net.ports;
    let b6: Ipv6Addr = "fd00::65".parse().unwrap();
    let c6: Ipv6Addr = "fd00::66".parse().unwrap();
    net.send(a, &arp_request(0, GUEST_MAC, GUEST, GW));
    net.send(b, &arp_request(0, B_MAC, B, GW));
    let addrs = |v4: [u8; 4], v6| forwarder::names::Addrs {
        v4: Some(v4.into()),
        v6: Some(v6),
    };
    net.fwd
        .add_member(b, EthernetAddress(B_MAC), addrs(B, b6), "b", &[]);
    net.fwd.add_member(
        c,
        EthernetAddress(C_MAC),
        addrs([10, 0, 2, 102], c6),
        "c",
        &[],
    );
    net.out.0.clear();
    // B may advertise its own addresses: assigned, SLAAC-made and link-local.
    for target in [b6, eui64_link_local(B_MAC), "fe80::1234".parse().unwrap()] {
        for hbh in [false, true] {
            let na = neighbour_advert(B_MAC, b6, target, hbh);
            net.send(b, &na);
            assert_eq!(net.out.take(a), vec![na.clone()], "{target}");
            assert_eq!(net.out.take(c), vec![na], "{target}");
        }
    }
    assert_eq!(net.fwd.switch().counters(b).unwrap().drop_spoofed, 0);
    // Not the gateway's (global or link-local), nor another member's.
    let stolen: [Ipv6Addr; 5] = [
        NET6.gateway(),
        forwarder::nat::ROUTER_LINK_LOCAL,
        eui64_link_local(GW_MAC),
        c6,
        eui64_link_local(GUEST_MAC),
    ];
    for target in stolen {
        for hbh in [false, true] {
            net.send(b, &neighbour_advert(B_MAC, b6, target, hbh));
            assert!(net.out.0.is_empty(), "{target}: {:?}", net.out.0);
        }
    }
    assert_eq!(net.fwd.switch().counters(b).unwrap().drop_spoofed, 10);
    // B's other traffic still flows.
    let req = arp_request(0, B_MAC, B, GUEST);
    net.send(b, &req);
    assert_eq!(net.out.take(a), vec![req]);
}

/// An IPv4 frame with protocol `proto` and `payload` (checksums left zero: the switch
/// does not look).
fn ipv4_frame(
    mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(payload);
    f
}

/// An ICMPv6 message `msg` from `mac`/`src` to all nodes.
fn icmpv6_to_all(mac: [u8; 6], src: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
    f.extend_from_slice(msg);
    f
}

#[test]
fn router_messages_from_members_are_dropped_and_counted() {
    let mut net = Net::new(0);
    let [a, b, c] = net.ports;
    let c4 = [10, 0, 2, 102];
    net.send(a, &arp_request(0, GUEST_MAC, GUEST, GW));
    net.send(b, &arp_request(0, B_MAC, B, GW));
    let addrs = |v4: [u8; 4], v6: &str| forwarder::names::Addrs {
        v4: Some(v4.into()),
        v6: Some(v6.parse().unwrap()),
    };
    net.fwd
        .add_member(b, EthernetAddress(B_MAC), addrs(B, "fd00::65"), "b", &[]);
    net.fwd
        .add_member(c, EthernetAddress(C_MAC), addrs(c4, "fd00::66"), "c", &[]);
    net.out.0.clear();
    let ll: Ipv6Addr = "fe80::65".parse().unwrap();
    // A router advertisement with a prefix and a default route, and a redirect.
    let mut ra = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    ra.extend_from_slice(&[
        3, 4, 64, 0xc0, 0, 0, 0x0e, 0x10, 0, 0, 0x0e, 0x10, 0, 0, 0, 0,
    ]);
    ra.extend_from_slice(&"2001:db8:99::".parse::<Ipv6Addr>().unwrap().octets());
    let mut redirect = vec![137, 0, 0, 0, 0, 0, 0, 0];
    redirect.extend_from_slice(&ll.octets());
    redirect.extend_from_slice(&"fd00::66".parse::<Ipv6Addr>().unwrap().octets());
    // An ICMP redirect to C (host, via B), and a DHCP offer from B's "server".
    let mut icmp_redirect = vec![5, 1, 0, 0];
    icmp_redirect.extend_from_slice(&B);
    icmp_redirect.extend_from_slice(&[0x45; 28]);
    let mut offer = Vec::new();
    PacketBuilder::ethernet2(B_MAC, [0xff; 6])
        .ipv4(B, [255; 4], 64)
        .udp(67, 68)
        .write(&mut offer, &[2; 300])
        .unwrap();
    let rogue = [
        icmpv6_to_all(B_MAC, ll, &ra),
        icmpv6_to_all(B_MAC, ll, &redirect),
        ipv4_frame(B_MAC, C_MAC, B, c4, 1, &icmp_redirect),
        offer,
    ];
    for f in &rogue {
        net.send(b, f);
        assert!(net.out.0.is_empty(), "{f:?} got through: {:?}", net.out.0);
    }
    assert_eq!(net.fwd.switch().counters(b).unwrap().drop_rogue_router, 4);
    assert_eq!(net.fwd.counters().drop_rogue_router, 4);
    assert_eq!(net.fwd.switch().counters(b).unwrap().drop_spoofed, 0);
    assert_eq!(net.fwd.counters().drop_mac_spoof, 0);
    // B's other ICMP and UDP still reach C: an echo request, a datagram to port 67.
    let echo = ipv4_frame(B_MAC, C_MAC, B, c4, 1, &[8, 0, 0, 0, 0, 1, 0, 1]);
    net.send(b, &echo);
    assert_eq!(net.out.take(c), vec![echo]);
    let mut to_67 = Vec::new();
    PacketBuilder::ethernet2(B_MAC, C_MAC)
        .ipv4(B, c4, 64)
        .udp(40000, 67)
        .write(&mut to_67, b"x")
        .unwrap();
    net.send(b, &to_67);
    assert_eq!(net.out.take(c), vec![to_67]);
    // A port without assigned addresses (a lone guest's) is not held to this.
    let from_a = icmpv6_to_all(GUEST_MAC, "fe80::64".parse().unwrap(), &ra);
    net.send(a, &from_a);
    assert_eq!(net.out.take(b), vec![from_a]);
    assert_eq!(net.fwd.switch().counters(a).unwrap().drop_rogue_router, 0);
}
