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
use smoltcp::wire::{EthernetProtocol, Ipv4Address};

use crate::l2::L2;
use crate::txq::TxQueue;
use crate::vnet::{GsoType, VnetRepr, FLAG_NEEDS_CSUM};

/// A device for one smoltcp call.
#[derive(Debug)]
pub struct GuestDevice<'a> {
    rx: Option<&'a [u8]>,
    l2: &'a mut L2,
    txq: &'a mut TxQueue,
    caps: &'a DeviceCapabilities,
    guest: Option<Ipv4Address>,
}

impl<'a> GuestDevice<'a> {
    /// A device that yields `rx` (an IP packet) once, and transmits into `txq`. `guest` is
    /// the guest address of the flow being polled, to ask for its MAC address if needed.
    pub fn new(
        rx: Option<&'a [u8]>,
        l2: &'a mut L2,
        txq: &'a mut TxQueue,
        caps: &'a DeviceCapabilities,
        guest: Option<Ipv4Address>,
    ) -> GuestDevice<'a> {
        GuestDevice {
            rx,
            l2,
            txq,
            caps,
            guest,
        }
    }

    fn can_transmit(&mut self, now: Instant) -> bool {
        if self.txq.is_full() {
            return false;
        }
        if self.l2.guest_mac().is_none() {
            if let Some(guest) = self.guest {
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
        let ethertype = if slot[hdr] >> 4 == 6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        };
        let vnet = vnet_for(&self.meta, ethertype, slot, hdr);
        if self.l2.write_headers(slot, ethertype, &vnet, None) {
            self.txq.commit(hdr + len);
        }
        ret
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }
}

/// The vnet header for a packet smoltcp built: plain, or a TSO super-frame.
fn vnet_for(meta: &PacketMeta, ethertype: EthernetProtocol, slot: &[u8], hdr: usize) -> VnetRepr {
    let Some(mss) = meta.segmentation_offload_size else {
        return VnetRepr::PLAIN;
    };
    let ip = &slot[hdr..];
    let (gso_type, ip_hdr_len) = match ethertype {
        EthernetProtocol::Ipv6 => (GsoType::TcpV6, 40),
        _ => (GsoType::TcpV4, usize::from(ip[0] & 0x0f) * 4),
    };
    let l4 = crate::l2::ETHERNET_HEADER_LEN + ip_hdr_len;
    let tcp_hdr_len = ip
        .get(ip_hdr_len + 12)
        .map_or(20, |b| usize::from(b >> 4) * 4);
    VnetRepr {
        flags: FLAG_NEEDS_CSUM,
        gso_type,
        hdr_len: u16::try_from(l4 + tcp_hdr_len).unwrap_or(u16::MAX),
        gso_size: mss.get(),
        csum_start: u16::try_from(l4).unwrap_or(u16::MAX),
        csum_offset: 16,
    }
}

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
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

impl GuestDevice<'_> {
    /// Whether the received frame is still there (smoltcp did not take it).
    pub fn rx_pending(&self) -> bool {
        self.rx.is_some()
    }
}
