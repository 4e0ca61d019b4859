//! Building IP packets for the guest straight into the transmit queue.
//!
//! Used for everything that does not come out of smoltcp: UDP datagrams, ICMP replies
//! and errors, DHCP. The payload is written first (often by a `recv()` straight into the
//! slot), then the headers and checksums around it: no intermediate buffer.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet,
    Ipv6Repr, UdpPacket, UdpRepr,
};
use stack::l2::L2;
use stack::txq::TxQueue;
use stack::vnet::VnetRepr;

/// IPv4 header length of every packet we build (no options).
pub const IPV4_HEADER_LEN: usize = 20;
/// IPv6 header length (we build no extension headers).
pub const IPV6_HEADER_LEN: usize = 40;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;

/// Why a packet for the guest could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// The transmit queue is full: flush and retry.
    QueueFull,
    /// The guest's MAC address is not known yet.
    NoNeighbor,
    /// The payload builder gave up (e.g. nothing to read), or the addresses mix families.
    Empty,
    /// The payload does not fit the guest MTU.
    TooBig,
}

/// Length of the IP header we build for `addr`'s family.
pub fn ip_header_len(addr: &IpAddress) -> usize {
    match addr {
        IpAddress::Ipv4(_) => IPV4_HEADER_LEN,
        IpAddress::Ipv6(_) => IPV6_HEADER_LEN,
    }
}

/// Where a packet is built: the link layer that frames it, the queue slot it goes in, and
/// the MTU it must fit.
pub struct Out<'a> {
    /// The link layer (headers, the guest's MAC address).
    pub l2: &'a L2,
    /// The transmit queue.
    pub txq: &'a mut TxQueue,
    /// The guest link's MTU.
    pub mtu: usize,
}

impl<'a> Out<'a> {
    /// A link's queue.
    pub(crate) fn of(link: &'a mut crate::Link) -> Out<'a> {
        Out {
            l2: &link.l2,
            txq: &mut link.txq,
            mtu: link.mtu,
        }
    }
}

/// Builds an IP packet (IPv4 or IPv6, after `src`/`dst`) in the next queue slot.
/// `payload` gets the rest of the slot (so that a `recv()` into it sees whole datagrams)
/// and returns how much it wrote, or `None` to abandon the packet; more than the MTU
/// allows is [`EmitError::TooBig`]. `dst_mac` overrides the guest's learned MAC address.
///
/// # Errors
/// [`EmitError`] when nothing was queued.
pub fn ip(
    out: Out<'_>,
    src: IpAddress,
    dst: IpAddress,
    protocol: IpProtocol,
    dst_mac: Option<EthernetAddress>,
    payload: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Result<usize, EmitError> {
    let Out { l2, txq, mtu } = out;
    let Some(dst_mac) = dst_mac.or_else(|| l2.neighbor(&dst)) else {
        return Err(EmitError::NoNeighbor);
    };
    let hdr = l2.header_len();
    let ip_len = ip_header_len(&src);
    let slot = txq.slot().ok_or(EmitError::QueueFull)?;
    let Some(len) = payload(&mut slot[hdr + ip_len..]) else {
        return Err(EmitError::Empty);
    };
    if ip_len + len > mtu {
        return Err(EmitError::TooBig);
    }
    let total = ip_len + len;
    let ethertype = match (src, dst) {
        (IpAddress::Ipv4(src_addr), IpAddress::Ipv4(dst_addr)) => {
            let repr = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: protocol,
                payload_len: len,
                hop_limit: 64,
            };
            repr.emit(
                &mut Ipv4Packet::new_unchecked(&mut slot[hdr..hdr + total]),
                &ChecksumCapabilities::default(),
            );
            EthernetProtocol::Ipv4
        }
        (IpAddress::Ipv6(src_addr), IpAddress::Ipv6(dst_addr)) => {
            let repr = Ipv6Repr {
                src_addr,
                dst_addr,
                next_header: protocol,
                payload_len: len,
                hop_limit: if protocol == IpProtocol::Icmpv6 {
                    255
                } else {
                    64
                },
            };
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut slot[hdr..hdr + total]));
            EthernetProtocol::Ipv6
        }
        _ => return Err(EmitError::Empty),
    };
    l2.write_headers(slot, ethertype, &VnetRepr::PLAIN, Some(dst_mac));
    txq.commit(hdr + total);
    Ok(total)
}

/// Builds a UDP datagram: `data` writes the UDP payload in place and returns its
/// length; more than the MTU allows is [`EmitError::TooBig`].
///
/// # Errors
/// [`EmitError`] when nothing was queued.
pub fn udp(
    out: Out<'_>,
    src: (IpAddress, u16),
    dst: (IpAddress, u16),
    dst_mac: Option<EthernetAddress>,
    data: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Result<usize, EmitError> {
    ip(out, src.0, dst.0, IpProtocol::Udp, dst_mac, |area| {
        let n = data(area.get_mut(UDP_HEADER_LEN..)?)?;
        let repr = UdpRepr {
            src_port: src.1,
            dst_port: dst.1,
        };
        let mut packet = UdpPacket::new_unchecked(&mut area[..UDP_HEADER_LEN + n]);
        repr.emit(
            &mut packet,
            &src.0,
            &dst.0,
            n,
            |_| {},
            &ChecksumCapabilities::default(),
        );
        Some(UDP_HEADER_LEN + n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Ipv4Address;

    #[test]
    fn udp_datagram_checks_out_with_etherparse() {
        let gw = Ipv4Address::new(10, 0, 2, 2);
        let guest = Ipv4Address::new(10, 0, 2, 100);
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let l2 = L2::new(L2::mac_for(gw), [gw, Ipv4Address::new(10, 0, 2, 3)], 0);
        let mut q = TxQueue::new(2, 2048);
        let out = Out {
            l2: &l2,
            txq: &mut q,
            mtu: 1500,
        };
        let n = udp(
            out,
            (gw.into(), 53),
            (guest.into(), 4000),
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

    fn out<'a>(l2: &'a L2, txq: &'a mut TxQueue) -> Out<'a> {
        Out { l2, txq, mtu: 1500 }
    }

    #[test]
    fn queue_full_and_unknown_neighbor_reported() {
        let gw = Ipv4Address::new(10, 0, 2, 2);
        let l2 = L2::new(L2::mac_for(gw), [gw, gw], 0);
        let mut q = TxQueue::new(1, 2048);
        let guest = (Ipv4Address::new(10, 0, 2, 100).into(), 1);
        let gw_ep = (IpAddress::from(gw), 1);
        assert_eq!(
            udp(out(&l2, &mut q), gw_ep, guest, None, |_| Some(0)),
            Err(EmitError::NoNeighbor)
        );
        let mac = Some(EthernetAddress([2, 0, 0, 0, 0, 1]));
        udp(out(&l2, &mut q), gw_ep, guest, mac, |_| Some(0)).unwrap();
        assert_eq!(
            udp(out(&l2, &mut q), gw_ep, guest, mac, |_| Some(0)),
            Err(EmitError::QueueFull)
        );
    }
}
