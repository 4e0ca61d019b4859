//! The smoltcp device: one received frame in, the transmit queue out.
//!
//! # Theory of operation
//!
//! smoltcp runs with the IP medium; [`GuestDevice`] is built for one call into the
//! interface (`poll_ingress_single` with the frame just read, or `poll_egress` with none)
//! and borrows the [`L2`] layer and the [`TxQueue`] for that call. Outgoing packets are
//! built by smoltcp directly in a queue slot, after room for the vnet and Ethernet
//! headers, which are filled in once smoltcp is done. When the queue is full or the
//! guest's MAC address is still unknown, `transmit` says so and smoltcp keeps the segment
//! for a later poll: nothing is dropped silently.

use smoltcp::phy::{self, DeviceCapabilities, PacketMeta};
use smoltcp::time::Instant;
use smoltcp::wire::{checksum, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::l2::{ETHERNET_HEADER_LEN, L2};
use crate::txq::TxQueue;
use crate::vnet::{GsoType, VnetRepr, FLAG_NEEDS_CSUM};

/// A device for one smoltcp call.
#[derive(Debug)]
pub struct GuestDevice<'a> {
    rx: Option<&'a [u8]>,
    l2: &'a mut L2,
    txq: &'a mut TxQueue,
    caps: &'a DeviceCapabilities,
    guest: Option<IpAddress>,
    link_mtu: usize,
}

impl<'a> GuestDevice<'a> {
    /// A device that yields `rx` (an IP packet) once, and transmits into `txq`. `guest` is
    /// the guest address of the flow being polled, to ask for its MAC address if needed.
    pub fn new(
        rx: Option<&'a [u8]>,
        l2: &'a mut L2,
        txq: &'a mut TxQueue,
        caps: &'a DeviceCapabilities,
        guest: Option<IpAddress>,
        link_mtu: usize,
    ) -> GuestDevice<'a> {
        GuestDevice {
            rx,
            l2,
            txq,
            caps,
            guest,
            link_mtu,
        }
    }

    fn can_transmit(&mut self, now: Instant) -> bool {
        if self.txq.is_full() {
            return false;
        }
        let known = match &self.guest {
            Some(g) => self.l2.neighbor(g).is_some(),
            None => self.l2.guest_mac().is_some(),
        };
        if !known {
            // IPv6 guests announce themselves (router solicitation, DAD); IPv4 ones
            // are asked.
            if let Some(IpAddress::Ipv4(guest)) = self.guest {
                self.l2.probe_guest(now, guest, self.txq);
            }
            return false;
        }
        true
    }
}

/// The receive token: the one frame.
#[derive(Debug)]
pub struct Rx<'a>(&'a [u8]);

/// The transmit token: a queue slot.
#[derive(Debug)]
pub struct Tx<'a> {
    l2: &'a L2,
    txq: &'a mut TxQueue,
    meta: PacketMeta,
    offload: bool,
    link_mtu: usize,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let hdr = self.l2.header_len();
        let Some(slot) = self.txq.slot() else {
            // Unreachable: `transmit`/`receive` hand out a token only when a slot is
            // free, and a token is consumed at most once. Build into a scratch buffer
            // rather than panic.
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        };
        let ret = f(&mut slot[hdr..hdr + len]);
        let (ethertype, vnet) = finish_ip(
            &mut slot[hdr..hdr + len],
            &self.meta,
            self.offload,
            self.link_mtu,
        );
        if self.l2.write_headers(slot, ethertype, &vnet, None) {
            self.txq.commit(hdr + len);
        }
        ret
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }
}

/// smoltcp runs with TCP checksums off (its segmentation offload requires it); this
/// finishes a TCP packet it built: with `offload`, the checksum field gets the
/// pseudo-header sum and the vnet header asks the kernel to complete it (and to cut a
/// super-frame into `gso_size` segments); without, the checksum is computed here.
/// Returns the ethertype and the vnet header.
pub fn finish_ip(
    ip: &mut [u8],
    meta: &PacketMeta,
    offload: bool,
    link_mtu: usize,
) -> (EthernetProtocol, VnetRepr) {
    let v6 = ip.first().is_some_and(|b| b >> 4 == 6);
    let ethertype = if v6 {
        EthernetProtocol::Ipv6
    } else {
        EthernetProtocol::Ipv4
    };
    let (l4, proto, src, dst) = if v6 {
        let Ok(p) = Ipv6Packet::new_checked(&*ip) else {
            return (ethertype, VnetRepr::PLAIN);
        };
        let (s, d) = (IpAddress::Ipv6(p.src_addr()), IpAddress::Ipv6(p.dst_addr()));
        (IPV6_HEADER_LEN, p.next_header(), s, d)
    } else {
        let Ok(p) = Ipv4Packet::new_checked(&*ip) else {
            return (ethertype, VnetRepr::PLAIN);
        };
        let (s, d) = (IpAddress::Ipv4(p.src_addr()), IpAddress::Ipv4(p.dst_addr()));
        (usize::from(p.header_len()), p.next_header(), s, d)
    };
    if proto != IpProtocol::Tcp || ip.len() < l4 + 20 {
        return (ethertype, VnetRepr::PLAIN);
    }
    // At most 65535 bytes: the slot holds no more, and TSO_MAX bounds smoltcp's segments.
    let tcp_len = u32::try_from(ip.len() - l4).unwrap_or(u32::MAX);
    let pseudo = match (src, dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            checksum::pseudo_header_v4(&s, &d, IpProtocol::Tcp, tcp_len)
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            checksum::pseudo_header_v6(&s, &d, IpProtocol::Tcp, tcp_len)
        }
        _ => return (ethertype, VnetRepr::PLAIN),
    };
    let field = l4 + TCP_CHECKSUM_OFFSET;
    if !offload {
        ip[field..field + 2].fill(0);
        let sum = !checksum::combine(&[pseudo, checksum::data(&ip[l4..])]);
        ip[field..field + 2].copy_from_slice(&sum.to_be_bytes());
        return (ethertype, VnetRepr::PLAIN);
    }
    ip[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let csum_start = ETHERNET_HEADER_LEN + l4;
    let mut vnet = VnetRepr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GsoType::None,
        hdr_len: 0,
        gso_size: 0,
        csum_start: u16::try_from(csum_start).unwrap_or(u16::MAX),
        csum_offset: TCP_CHECKSUM_OFFSET as u16,
    };
    let tcp_hdr_len = usize::from(ip[l4 + 12] >> 4) * 4;
    // smoltcp 0.14 does not pass the segment size along for IPv6 (its IPv4 path does):
    // a packet above the link MTU is a super-frame, cut to fit the link.
    let mss = meta.segmentation_offload_size.or_else(|| {
        (v6 && ip.len() > link_mtu)
            .then(|| u16::try_from(link_mtu.saturating_sub(l4 + tcp_hdr_len)).ok())
            .flatten()
            .and_then(core::num::NonZeroU16::new)
    });
    if let Some(mss) = mss {
        vnet.gso_type = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
        vnet.gso_size = mss.get();
        vnet.hdr_len = u16::try_from(csum_start + tcp_hdr_len).unwrap_or(u16::MAX);
    }
    (ethertype, vnet)
}

/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_OFFSET: usize = 16;
/// Length of an IPv6 header (smoltcp emits no extension headers).
const IPV6_HEADER_LEN: usize = 40;

impl phy::Device for GuestDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.can_transmit(timestamp) {
            // smoltcp may answer any packet; keep the frame until there is room.
            return None;
        }
        let frame = self.rx.take()?;
        Some((
            Rx(frame),
            Tx {
                l2: self.l2,
                txq: self.txq,
                meta: PacketMeta::default(),
                offload: self.caps.segmentation.tcpv4.is_some(),
                link_mtu: self.link_mtu,
            },
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Tx<'_>> {
        if !self.can_transmit(timestamp) {
            return None;
        }
        Some(Tx {
            l2: self.l2,
            txq: self.txq,
            meta: PacketMeta::default(),
            offload: self.caps.segmentation.tcpv4.is_some(),
            link_mtu: self.link_mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}
