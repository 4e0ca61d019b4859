//! A thin Ethernet + ARP layer in front of the IP stack.
//!
//! # Theory of operation
//!
//! The guest sees one virtual router: every address usernet serves (gateway, DNS) sits
//! behind one MAC address, [`L2::mac`]. This layer
//! - strips the vnet header and the Ethernet header of guest frames and hands IPv4/IPv6
//!   packets up ([`Ingress`]);
//! - answers ARP requests for our own addresses only (smoltcp's Ethernet medium would
//!   answer for every address once `any_ip` is on, which is why the stack runs smoltcp with
//!   the IP medium and keeps L2 here);
//! - learns the guest's MAC address from the frames it sends, and prefixes every outgoing
//!   IP packet with the vnet and Ethernet headers ([`L2::write_headers`]).
//!
//! With several guests on one segment (a usernet network, [`L2::set_shared`]), frames
//! are addressed by a neighbour table instead of the one learned MAC address: entries are
//! set for the members' configured addresses and learned from the source addresses of
//! the frames that reach us (the switch in front has already dropped frames whose
//! addresses are not their member's); at most [`MAX_NEIGHBORS`] of them.
//!
//! Security: every field is guest-controlled. Frames for other MACs, unknown ethertypes,
//! malformed ARP and ARP that claims one of our addresses are dropped and counted.
//! Nothing here allocates.

use std::collections::HashMap;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, Ipv4Address, Ipv6Address,
};

use crate::txq::TxQueue;
use crate::vnet::{VnetHeader, VnetRepr};

/// Length of an Ethernet II header.
pub const ETHERNET_HEADER_LEN: usize = 14;

/// Why a guest frame was dropped at L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Drop {
    /// Shorter than its headers.
    Truncated,
    /// Destined to another MAC address.
    NotForUs,
    /// An ethertype we do not handle.
    UnknownEthertype,
    /// An ARP packet we cannot parse.
    ArpMalformed,
    /// An ARP packet claiming one of our addresses.
    ArpSpoof,
}

/// A guest frame after L2 processing.
#[derive(Debug, PartialEq, Eq)]
pub enum Ingress<'a> {
    /// An IPv4 packet, with the vnet header that came with it.
    Ipv4(&'a [u8], VnetRepr),
    /// An IPv6 packet, with the vnet header that came with it.
    Ipv6(&'a [u8], VnetRepr),
    /// Handled here (ARP).
    Consumed,
}

/// Counters of this layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct L2Counters {
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ARP requests for addresses that are not ours (ignored, as a host would).
    pub arp_ignored: u64,
    /// ARP probes sent to learn the guest's MAC.
    pub arp_probes: u64,
}

/// Neighbours a shared segment remembers.
pub const MAX_NEIGHBORS: usize = 4096;

/// The L2 state: our MAC, our addresses, the guest's MAC.
#[derive(Debug)]
pub struct L2 {
    mac: EthernetAddress,
    vnet_hdr_len: usize,
    ours: [Ipv4Address; 2],
    /// Answer ARP for every address but this one (the guest's), as pasta does.
    all_but: Option<Ipv4Address>,
    guest_mac: Option<EthernetAddress>,
    /// Several guests: frames are addressed by this table, not by `guest_mac`.
    shared: bool,
    neighbors: HashMap<IpAddress, EthernetAddress>,
    last_probe: Option<Instant>,
    /// Counters.
    pub counters: L2Counters,
}

/// How often we may ask for the guest's MAC address.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

impl L2 {
    /// A layer answering ARP for `ours` (gateway and DNS addresses) with `mac`.
    /// `vnet_hdr_len` is 0 or [`crate::vnet::HEADER_LEN`].
    pub fn new(mac: EthernetAddress, ours: [Ipv4Address; 2], vnet_hdr_len: usize) -> L2 {
        L2 {
            mac,
            vnet_hdr_len,
            ours,
            all_but: None,
            guest_mac: None,
            shared: false,
            neighbors: HashMap::new(),
            last_probe: None,
            counters: L2Counters::default(),
        }
    }

    /// Answers ARP for every address but `guest` from now on (pasta's model: the guest
    /// holds a copy of the host's address on the host's subnet, whose other addresses are
    /// all reached through us). Probes for the guest's own address (duplicate address
    /// detection, gratuitous ARP) stay unanswered.
    pub fn answer_all_but(&mut self, guest: Ipv4Address) {
        self.all_but = Some(guest);
    }

    /// The MAC address of our virtual hosts: `52:55:` followed by the gateway's IPv4
    /// address, as slirp does.
    pub fn mac_for(gateway: Ipv4Address) -> EthernetAddress {
        let o = gateway.octets();
        EthernetAddress([0x52, 0x55, o[0], o[1], o[2], o[3]])
    }

    /// Our MAC address.
    pub fn mac(&self) -> EthernetAddress {
        self.mac
    }

    /// The guest's MAC address, once learned.
    pub fn guest_mac(&self) -> Option<EthernetAddress> {
        self.guest_mac
    }

    /// Several guests share the segment: address frames by the neighbour table.
    pub fn set_shared(&mut self) {
        self.shared = true;
    }

    /// Whether several guests share the segment.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Sets (`Some`) or forgets (`None`) the MAC address of a guest address. Ignored
    /// when the table is full.
    pub fn set_neighbor(&mut self, ip: IpAddress, mac: Option<EthernetAddress>) {
        match mac {
            Some(mac)
                if self.neighbors.len() < MAX_NEIGHBORS || self.neighbors.contains_key(&ip) =>
            {
                self.neighbors.insert(ip, mac);
            }
            Some(_) => {}
            None => {
                self.neighbors.remove(&ip);
            }
        }
    }

    /// The MAC address frames to `ip` go to: the guest's on a segment of one, the
    /// neighbour table's on a shared one (multicast and broadcast addresses map to
    /// their group addresses).
    pub fn neighbor(&self, ip: &IpAddress) -> Option<EthernetAddress> {
        if !self.shared {
            return self.guest_mac;
        }
        match ip {
            IpAddress::Ipv4(a) if a.is_broadcast() => Some(EthernetAddress::BROADCAST),
            IpAddress::Ipv6(a) if a.is_multicast() => {
                let o = a.octets();
                Some(EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]]))
            }
            _ => self.neighbors.get(ip).copied(),
        }
    }

    /// The destination of the IP packet at the start of `ip`, if it is long enough.
    fn packet_dst(ip: &[u8]) -> Option<IpAddress> {
        match ip.first()? >> 4 {
            4 => Some(IpAddress::Ipv4(Ipv4Address::from_octets(
                ip.get(16..20)?.try_into().ok()?,
            ))),
            6 => Some(IpAddress::Ipv6(Ipv6Address::from_octets(
                ip.get(24..40)?.try_into().ok()?,
            ))),
            _ => None,
        }
    }

    /// Learns the MAC address of the source of an IP packet on a shared segment.
    fn learn(&mut self, ethertype: EthernetProtocol, ip: &[u8], mac: EthernetAddress) {
        let src = match ethertype {
            EthernetProtocol::Ipv4 => ip
                .get(12..16)
                .and_then(|a| a.try_into().ok())
                .map(|a| IpAddress::Ipv4(Ipv4Address::from_octets(a))),
            EthernetProtocol::Ipv6 => ip
                .get(8..24)
                .and_then(|a| a.try_into().ok())
                .map(|a| IpAddress::Ipv6(Ipv6Address::from_octets(a))),
            _ => None,
        };
        if let Some(src) = src.filter(|s| s.is_unicast() && !s.is_unspecified()) {
            if self.neighbors.get(&src) != Some(&mac) {
                self.set_neighbor(src, Some(mac));
            }
        }
    }

    /// Bytes in front of the IP packet in every frame: vnet header + Ethernet header.
    pub fn header_len(&self) -> usize {
        self.vnet_hdr_len + ETHERNET_HEADER_LEN
    }

    /// Takes one frame read from the TAP (vnet header included). ARP is answered into
    /// `txq` (when it has room; the guest retries otherwise).
    ///
    /// # Errors
    /// The reason the frame was dropped.
    pub fn handle_frame<'a>(
        &mut self,
        frame: &'a [u8],
        txq: &mut TxQueue,
    ) -> Result<Ingress<'a>, L2Drop> {
        let vnet = if self.vnet_hdr_len > 0 {
            let hdr = VnetHeader::new_checked(frame).map_err(|_| L2Drop::Truncated)?;
            VnetRepr::parse(&hdr)
        } else {
            VnetRepr::PLAIN
        };
        let eth = frame.get(self.vnet_hdr_len..).ok_or(L2Drop::Truncated)?;
        let eth = EthernetFrame::new_checked(eth).map_err(|_| L2Drop::Truncated)?;
        let dst = eth.dst_addr();
        if dst != self.mac && !dst.is_broadcast() && !dst.is_multicast() {
            return Err(L2Drop::NotForUs);
        }
        let src = eth.src_addr();
        if src.is_unicast() && src != self.mac {
            self.guest_mac = Some(src);
            if self.shared {
                self.learn(eth.ethertype(), eth.payload(), src);
            }
        }
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => Ok(Ingress::Ipv4(payload(frame, self.vnet_hdr_len), vnet)),
            EthernetProtocol::Ipv6 => Ok(Ingress::Ipv6(payload(frame, self.vnet_hdr_len), vnet)),
            EthernetProtocol::Arp => {
                self.handle_arp(eth.payload(), txq)?;
                Ok(Ingress::Consumed)
            }
            _ => Err(L2Drop::UnknownEthertype),
        }
    }

    fn handle_arp(&mut self, packet: &[u8], txq: &mut TxQueue) -> Result<(), L2Drop> {
        let packet = ArpPacket::new_checked(packet).map_err(|_| L2Drop::ArpMalformed)?;
        let repr = ArpRepr::parse(&packet).map_err(|_| L2Drop::ArpMalformed)?;
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return Err(L2Drop::ArpMalformed);
        };
        if self.ours.contains(&source_protocol_addr) {
            return Err(L2Drop::ArpSpoof);
        }
        if operation != ArpOperation::Request {
            return Ok(());
        }
        let answer = match self.all_but {
            None => self.ours.contains(&target_protocol_addr),
            Some(guest) => {
                target_protocol_addr != guest
                    && target_protocol_addr != source_protocol_addr
                    && !source_protocol_addr.is_unspecified()
                    && !target_protocol_addr.is_unspecified()
                    && !target_protocol_addr.is_broadcast()
                    && !target_protocol_addr.is_multicast()
            }
        };
        if !answer {
            self.counters.arp_ignored += 1;
            return Ok(());
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.mac,
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        if self.emit_arp(source_hardware_addr, &reply, txq) {
            self.counters.arp_replies += 1;
        }
        Ok(())
    }

    fn emit_arp(&self, dst: EthernetAddress, repr: &ArpRepr, txq: &mut TxQueue) -> bool {
        let vnet_len = self.vnet_hdr_len;
        let Some(slot) = txq.slot() else {
            return false;
        };
        let len = vnet_len + ETHERNET_HEADER_LEN + repr.buffer_len();
        if vnet_len > 0 {
            VnetRepr::PLAIN.emit(&mut VnetHeader::new_unchecked(&mut slot[..vnet_len]));
        }
        let mut eth = EthernetFrame::new_unchecked(&mut slot[vnet_len..len]);
        EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        txq.commit(len);
        true
    }

    /// Asks the guest for its MAC address (ARP who-has `guest_ip`), at most once per
    /// [`PROBE_INTERVAL`]. Frames to the guest cannot be sent before it is known.
    pub fn probe_guest(&mut self, now: Instant, guest_ip: Ipv4Address, txq: &mut TxQueue) {
        if self.last_probe.is_some_and(|t| now < t + PROBE_INTERVAL) {
            return;
        }
        let request = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.ours[0],
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: guest_ip,
        };
        if self.emit_arp(EthernetAddress::BROADCAST, &request, txq) {
            self.last_probe = Some(now);
            self.counters.arp_probes += 1;
        }
    }

    /// When [`probe_guest`](Self::probe_guest) may send again (`None`: now).
    pub fn next_probe(&self) -> Option<Instant> {
        Some(
            self.last_probe
                .map_or(Instant::from_millis(0), |t| t + PROBE_INTERVAL),
        )
    }

    /// Writes the vnet header and the Ethernet header in front of an IP packet of
    /// `ethertype` in `slot`, to `dst` (when `None`: the guest's MAC, or on a shared
    /// segment the neighbour of the packet's destination, which must be in place).
    /// Returns false when that MAC is unknown.
    ///
    /// # Panics
    /// When `slot` is shorter than [`header_len`](Self::header_len).
    pub fn write_headers(
        &self,
        slot: &mut [u8],
        ethertype: EthernetProtocol,
        vnet: &VnetRepr,
        dst: Option<EthernetAddress>,
    ) -> bool {
        let hdr = self.header_len();
        let dst = match dst {
            Some(dst) => dst,
            None if self.shared => {
                let Some(mac) = slot
                    .get(hdr..)
                    .and_then(Self::packet_dst)
                    .and_then(|ip| self.neighbor(&ip))
                else {
                    return false;
                };
                mac
            }
            None => match self.guest_mac {
                Some(mac) => mac,
                None => return false,
            },
        };
        let vnet_len = self.vnet_hdr_len;
        if vnet_len > 0 {
            vnet.emit(&mut VnetHeader::new_unchecked(&mut slot[..vnet_len]));
        }
        EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst,
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(
            &mut slot[vnet_len..vnet_len + ETHERNET_HEADER_LEN],
        ));
        true
    }
}

fn payload(frame: &[u8], vnet_hdr_len: usize) -> &[u8] {
    &frame[vnet_hdr_len + ETHERNET_HEADER_LEN..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet;
    use etherparse::{ArpHardwareId, ArpOperation as EpArpOp, ArpPacket as EpArp, EtherType};

    const GW: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
    const DNS: Ipv4Address = Ipv4Address::new(10, 0, 2, 3);
    const GUEST: Ipv4Address = Ipv4Address::new(10, 0, 2, 100);
    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

    fn layer(vnet: usize) -> (L2, TxQueue) {
        (
            L2::new(L2::mac_for(GW), [GW, DNS], vnet),
            TxQueue::new(4, 2048),
        )
    }

    /// An ARP request built by etherparse, an independent implementation.
    fn arp_request(sender_ip: Ipv4Address, target_ip: Ipv4Address, vnet: usize) -> Vec<u8> {
        let arp = EpArp::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            EpArpOp::REQUEST,
            &GUEST_MAC,
            &sender_ip.octets(),
            &[0; 6],
            &target_ip.octets(),
        )
        .unwrap();
        let mut frame = vec![0u8; vnet];
        etherparse::Ethernet2Header {
            source: GUEST_MAC,
            destination: [0xff; 6],
            ether_type: EtherType::ARP,
        }
        .write(&mut frame)
        .unwrap();
        arp.write(&mut frame).unwrap();
        frame
    }

    #[test]
    fn arp_request_for_gateway_is_answered() {
        for vnet in [0, vnet::HEADER_LEN] {
            let (mut l2, mut q) = layer(vnet);
            let req = arp_request(GUEST, GW, vnet);
            assert_eq!(l2.handle_frame(&req, &mut q), Ok(Ingress::Consumed));
            assert_eq!(l2.guest_mac(), Some(EthernetAddress(GUEST_MAC)));
            let reply = q.front().unwrap();
            let (eth, rest) = etherparse::Ethernet2Header::from_slice(&reply[vnet..]).unwrap();
            assert_eq!(eth.destination, GUEST_MAC);
            assert_eq!(eth.source, L2::mac_for(GW).0);
            let arp = EpArp::from_slice(rest).unwrap();
            assert_eq!(arp.operation, EpArpOp::REPLY);
            assert_eq!(arp.sender_protocol_addr(), &GW.octets());
            assert_eq!(arp.sender_hw_addr(), &L2::mac_for(GW).0);
            assert_eq!(arp.target_protocol_addr(), &GUEST.octets());
        }
    }

    #[test]
    fn arp_request_for_other_address_is_ignored() {
        let (mut l2, mut q) = layer(0);
        let req = arp_request(GUEST, Ipv4Address::new(10, 0, 2, 50), 0);
        assert_eq!(l2.handle_frame(&req, &mut q), Ok(Ingress::Consumed));
        assert!(q.is_empty());
        assert_eq!(l2.counters.arp_ignored, 1);
    }

    #[test]
    fn all_but_guest_answers_any_neighbour_but_not_the_guest_itself() {
        let (mut l2, mut q) = layer(0);
        l2.answer_all_but(GUEST);
        let other = Ipv4Address::new(10, 0, 2, 50);
        assert_eq!(
            l2.handle_frame(&arp_request(GUEST, other, 0), &mut q),
            Ok(Ingress::Consumed)
        );
        let reply = q.front().unwrap();
        let (_, rest) = etherparse::Ethernet2Header::from_slice(reply).unwrap();
        assert_eq!(
            EpArp::from_slice(rest).unwrap().sender_protocol_addr(),
            &other.octets()
        );
        q.pop();
        // Duplicate address detection and gratuitous ARP of the guest's own address.
        let unspecified = Ipv4Address::new(0, 0, 0, 0);
        for req in [
            arp_request(unspecified, GUEST, 0),
            arp_request(GUEST, GUEST, 0),
        ] {
            assert_eq!(l2.handle_frame(&req, &mut q), Ok(Ingress::Consumed));
            assert!(q.is_empty());
        }
    }

    #[test]
    fn arp_claiming_gateway_is_spoof() {
        let (mut l2, mut q) = layer(0);
        let req = arp_request(GW, DNS, 0);
        assert_eq!(l2.handle_frame(&req, &mut q), Err(L2Drop::ArpSpoof));
        assert!(q.is_empty());
    }

    #[test]
    fn truncated_frames_are_dropped() {
        let (mut l2, mut q) = layer(vnet::HEADER_LEN);
        let req = arp_request(GUEST, GW, vnet::HEADER_LEN);
        for cut in 0..vnet::HEADER_LEN + ETHERNET_HEADER_LEN {
            assert_eq!(l2.handle_frame(&req[..cut], &mut q), Err(L2Drop::Truncated));
        }
        let arp_cut = vnet::HEADER_LEN + ETHERNET_HEADER_LEN + 10;
        assert_eq!(
            l2.handle_frame(&req[..arp_cut], &mut q),
            Err(L2Drop::ArpMalformed)
        );
    }

    #[test]
    fn frame_for_other_mac_is_dropped() {
        let (mut l2, mut q) = layer(0);
        let mut frame = arp_request(GUEST, GW, 0);
        frame[..6].copy_from_slice(&[0x02, 1, 2, 3, 4, 5]);
        assert_eq!(l2.handle_frame(&frame, &mut q), Err(L2Drop::NotForUs));
    }

    #[test]
    fn ipv4_is_handed_up_without_headers() {
        let (mut l2, mut q) = layer(0);
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST_MAC, L2::mac_for(GW).0)
            .ipv4(GUEST.octets(), GW.octets(), 64)
            .udp(1000, 53)
            .write(&mut frame, b"hi")
            .unwrap();
        match l2.handle_frame(&frame, &mut q) {
            Ok(Ingress::Ipv4(ip, _)) => assert_eq!(ip, &frame[14..]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn probe_is_rate_limited() {
        let (mut l2, mut q) = layer(0);
        let t0 = Instant::from_millis(1000);
        l2.probe_guest(t0, GUEST, &mut q);
        l2.probe_guest(t0 + Duration::from_millis(10), GUEST, &mut q);
        assert_eq!(q.len(), 1);
        l2.probe_guest(t0 + PROBE_INTERVAL, GUEST, &mut q);
        assert_eq!(q.len(), 2);
    }
}
