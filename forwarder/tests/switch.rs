//! The forwarder as a switch: several member ports on one gateway, over memory.

mod common;

use common::{sealed_config, GUEST, GUEST_MAC, GW, GW_MAC};
use etherparse::PacketBuilder;
use forwarder::{Forwarder, FrameSink, Io, PortId};
use mio::Poll;
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;

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
    poll: Poll,
    fwd: Forwarder,
    out: Ports,
    ports: [PortId; 3],
}

impl Net {
    fn new(vnet: usize) -> Net {
        let now = Instant::from_millis(1);
        let mut fwd = Forwarder::new(sealed_config(vnet), now);
        let b = fwd.attach(now, None).unwrap();
        let c = fwd.attach(now, Some(EthernetAddress(C_MAC))).unwrap();
        Net {
            poll: Poll::new().unwrap(),
            fwd,
            out: Ports::default(),
            ports: [0, b, c],
        }
    }

    fn send(&mut self, port: PortId, frame: &[u8]) {
        let now = Instant::from_millis(2);
        let mut io = Io {
            registry: self.poll.registry(),
            tap: &mut self.out,
        };
        self.fwd.handle_port_frame(now, port, frame, &mut io);
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
