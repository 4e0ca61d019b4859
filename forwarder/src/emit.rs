//! Building IPv4 packets for the guest straight into the transmit queue.
//!
//! Used for everything that does not come out of smoltcp: UDP datagrams, ICMP replies
//! and errors, DHCP. The payload is written first (often by a `recv()` straight into the
//! slot), then the headers and checksums around it: no intermediate buffer.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr,
};
use stack::l2::L2;
use stack::txq::TxQueue;
use stack::vnet::VnetRepr;

/// IPv4 header length of every packet we build (no options).
pub const IPV4_HEADER_LEN: usize = 20;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;

/// Why a packet for the guest could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// The transmit queue is full: flush and retry.
    QueueFull,
    /// The guest's MAC address is not known yet.
    NoNeighbor,
    /// The payload builder gave up (e.g. nothing to read).
    Empty,
    /// The payload does not fit the guest MTU.
    TooBig,
}

/// Builds an IPv4 packet from `src` to `dst` in the next queue slot. `payload` gets the
/// rest of the slot (so that a `recv()` into it sees whole datagrams) and returns how much
/// it wrote, or `None` to abandon the packet; more than `mtu - 20` bytes is
/// [`EmitError::TooBig`]. `dst_mac` overrides the guest's learned MAC address.
///
/// # Errors
/// [`EmitError`] when nothing was queued.
#[allow(clippy::too_many_arguments)]
pub fn ipv4(
    l2: &L2,
    txq: &mut TxQueue,
    mtu: usize,
    src: Ipv4Address,
    dst: Ipv4Address,
    protocol: IpProtocol,
    dst_mac: Option<EthernetAddress>,
    payload: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Result<usize, EmitError> {
    if dst_mac.or(l2.guest_mac()).is_none() {
        return Err(EmitError::NoNeighbor);
    }
    let hdr = l2.header_len();
    let slot = txq.slot().ok_or(EmitError::QueueFull)?;
    let Some(len) = payload(&mut slot[hdr + IPV4_HEADER_LEN..]) else {
        return Err(EmitError::Empty);
    };
    if IPV4_HEADER_LEN + len > mtu {
        return Err(EmitError::TooBig);
    }
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len: len,
        hop_limit: 64,
    };
    let total = IPV4_HEADER_LEN + len;
    repr.emit(
        &mut Ipv4Packet::new_unchecked(&mut slot[hdr..hdr + total]),
        &ChecksumCapabilities::default(),
    );
    l2.write_headers(slot, EthernetProtocol::Ipv4, &VnetRepr::PLAIN, dst_mac);
    txq.commit(hdr + total);
    Ok(total)
}

/// Builds a UDP datagram: `data` writes the UDP payload in place and returns its
/// length; more than `mtu - 28` bytes is [`EmitError::TooBig`].
///
/// # Errors
/// [`EmitError`] when nothing was queued.
#[allow(clippy::too_many_arguments)]
pub fn udp(
    l2: &L2,
    txq: &mut TxQueue,
    mtu: usize,
    src: (Ipv4Address, u16),
    dst: (Ipv4Address, u16),
    dst_mac: Option<EthernetAddress>,
    data: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Result<usize, EmitError> {
    ipv4(
        l2,
        txq,
        mtu,
        src.0,
        dst.0,
        IpProtocol::Udp,
        dst_mac,
        |area| {
            let n = data(area.get_mut(UDP_HEADER_LEN..)?)?;
            let repr = UdpRepr {
                src_port: src.1,
                dst_port: dst.1,
            };
            let mut packet = UdpPacket::new_unchecked(&mut area[..UDP_HEADER_LEN + n]);
            repr.emit(
                &mut packet,
                &src.0.into(),
                &dst.0.into(),
                n,
                |_| {},
                &ChecksumCapabilities::default(),
            );
            Some(UDP_HEADER_LEN + n)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_datagram_checks_out_with_etherparse() {
        let gw = Ipv4Address::new(10, 0, 2, 2);
        let guest = Ipv4Address::new(10, 0, 2, 100);
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let l2 = L2::new(L2::mac_for(gw), [gw, Ipv4Address::new(10, 0, 2, 3)], 0);
        let mut q = TxQueue::new(2, 2048);
        let n = udp(
            &l2,
            &mut q,
            1500,
            (gw, 53),
            (guest, 4000),
            Some(mac),
            |buf| {
                buf[..5].copy_from_slice(b"hello");
                Some(5)
            },
        )
        .unwrap();
        assert_eq!(n, 33);
        let frame = q.front().unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not ipv4")
        };
        assert_eq!(ip.header().source(), gw.octets());
        assert_eq!(ip.header().destination(), guest.octets());
        let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else {
            panic!("not udp")
        };
        assert_eq!(u.payload(), b"hello");
        let expect = u
            .to_header()
            .calc_checksum_ipv4_raw(gw.octets(), guest.octets(), b"hello")
            .unwrap();
        assert_eq!(u.checksum(), expect);
        let ip_hdr = ip.header().to_header();
        assert_eq!(ip_hdr.header_checksum, ip_hdr.calc_header_checksum());
    }

    #[test]
    fn queue_full_and_unknown_neighbor_reported() {
        let gw = Ipv4Address::new(10, 0, 2, 2);
        let l2 = L2::new(L2::mac_for(gw), [gw, gw], 0);
        let mut q = TxQueue::new(1, 2048);
        let guest = (Ipv4Address::new(10, 0, 2, 100), 1);
        assert_eq!(
            udp(&l2, &mut q, 1500, (gw, 1), guest, None, |_| Some(0)),
            Err(EmitError::NoNeighbor)
        );
        let mac = Some(EthernetAddress([2, 0, 0, 0, 0, 1]));
        udp(&l2, &mut q, 1500, (gw, 1), guest, mac, |_| Some(0)).unwrap();
        assert_eq!(
            udp(&l2, &mut q, 1500, (gw, 1), guest, mac, |_| Some(0)),
            Err(EmitError::QueueFull)
        );
    }
}
