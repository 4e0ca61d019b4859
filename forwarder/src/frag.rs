//! IPv4 reassembly of the guest's fragmented datagrams.
//!
//! # Theory of operation
//!
//! A guest sending a UDP datagram larger than its MTU (an 8000-byte datagram at MTU
//! 1500, say) fragments it; the host socket needs it whole. Fragments are collected in
//! one of [`SLOTS`] fixed buffers, keyed by (source, destination, protocol,
//! identification), with a bitmap of the 8-byte blocks received. When every block up to
//! the last fragment's end is there, the slot yields one ordinary IPv4 packet (the first
//! fragment's header, fragment fields cleared, length and checksum recomputed) that the
//! forwarder handles like any other.
//!
//! Limits and policy: a slot lives [`TIMEOUT`] at most; when every slot is busy, the
//! oldest is evicted (a flood of partial datagrams costs the flooder, not others, beyond
//! [`SLOTS`] reassemblies). Overlapping fragments are accepted, later bytes win, and the
//! bitmap makes holes impossible to mistake for data. A slot's 64 KiB buffer is allocated
//! on its first use and kept.

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Ipv4Address, Ipv4Packet};

/// Concurrent reassemblies.
pub const SLOTS: usize = 8;
/// How long a reassembly may wait for its missing fragments.
pub const TIMEOUT: Duration = Duration::from_secs(5);

const MAX_PAYLOAD: usize = 65535 - 20;
const BLOCKS: usize = MAX_PAYLOAD.div_ceil(8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    src: Ipv4Address,
    dst: Ipv4Address,
    proto: u8,
    ident: u16,
}

struct Slot {
    key: Option<Key>,
    started: Instant,
    /// The first fragment's header, once seen.
    header: [u8; 60],
    header_len: usize,
    /// Payload length, once the last fragment is seen.
    total: Option<usize>,
    bitmap: Box<[u64]>,
    /// Header room in front, then the payload.
    buf: Box<[u8]>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            key: None,
            started: Instant::from_millis(0),
            header: [0; 60],
            header_len: 0,
            total: None,
            bitmap: Box::default(),
            buf: Box::default(),
        }
    }

    fn reset(&mut self, key: Key, now: Instant) {
        self.key = Some(key);
        self.started = now;
        self.header_len = 0;
        self.total = None;
        if self.buf.is_empty() {
            self.buf = vec![0u8; 60 + MAX_PAYLOAD].into_boxed_slice();
            self.bitmap = vec![0u64; BLOCKS.div_ceil(64)].into_boxed_slice();
        }
        self.bitmap.fill(0);
    }

    fn complete(&self) -> bool {
        let Some(total) = self.total else {
            return false;
        };
        if self.header_len == 0 {
            return false;
        }
        (0..total.div_ceil(8)).all(|b| self.bitmap[b / 64] & (1 << (b % 64)) != 0)
    }
}

/// Why a fragment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragDrop {
    /// Offsets or lengths that cannot be (beyond 64 KiB, a non-final fragment whose
    /// length is not a multiple of 8).
    Malformed,
}

/// The reassembly table.
pub struct Reassembler {
    slots: Vec<Slot>,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler {
            slots: (0..SLOTS).map(|_| Slot::empty()).collect(),
        }
    }
}

impl Reassembler {
    /// Adds a fragment. When it completes a datagram, returns the slot holding it: pass
    /// it to [`packet`](Self::packet) and then [`release`](Self::release) it.
    ///
    /// # Errors
    /// [`FragDrop`] for impossible fragments.
    pub fn add(
        &mut self,
        now: Instant,
        packet: &Ipv4Packet<&[u8]>,
    ) -> Result<Option<usize>, FragDrop> {
        let key = Key {
            src: packet.src_addr(),
            dst: packet.dst_addr(),
            proto: packet.next_header().into(),
            ident: packet.ident(),
        };
        let offset = usize::from(packet.frag_offset());
        let payload = packet.payload();
        let more = packet.more_frags();
        let end = offset + payload.len();
        if end > MAX_PAYLOAD || (more && !payload.len().is_multiple_of(8)) || payload.is_empty() {
            return Err(FragDrop::Malformed);
        }
        let idx = match self
            .slots
            .iter()
            .position(|s| s.key == Some(key) && now < s.started + TIMEOUT)
        {
            Some(i) => i,
            None => {
                // A free or expired slot, else the oldest.
                let i = self
                    .slots
                    .iter()
                    .position(|s| s.key.is_none() || now >= s.started + TIMEOUT)
                    .unwrap_or_else(|| {
                        (0..self.slots.len())
                            .min_by_key(|&i| self.slots[i].started)
                            .unwrap_or(0)
                    });
                self.slots[i].reset(key, now);
                i
            }
        };
        let slot = &mut self.slots[idx];
        slot.buf[60 + offset..60 + end].copy_from_slice(payload);
        for b in offset / 8..end.div_ceil(8) {
            slot.bitmap[b / 64] |= 1 << (b % 64);
        }
        if offset == 0 {
            let hl = usize::from(packet.header_len());
            slot.header[..hl].copy_from_slice(&packet.as_ref()[..hl]);
            slot.header_len = hl;
        }
        if !more {
            slot.total = Some(end);
        }
        if !slot.complete() {
            return Ok(None);
        }
        if slot.header_len + slot.total.unwrap_or(0) > 65535 {
            // Options in the first fragment pushed the whole past the IPv4 limit.
            slot.key = None;
            return Err(FragDrop::Malformed);
        }
        Ok(Some(idx))
    }

    /// The reassembled IPv4 packet of a completed slot.
    pub fn packet(&mut self, idx: usize) -> &[u8] {
        let slot = &mut self.slots[idx];
        let (hl, total) = (slot.header_len, slot.total.unwrap_or(0));
        let start = 60 - hl;
        slot.buf[start..60].copy_from_slice(&slot.header[..hl]);
        let out = &mut slot.buf[start..60 + total];
        let mut p = Ipv4Packet::new_unchecked(&mut *out);
        // hl + total <= 65535: `add` refuses larger wholes.
        p.set_total_len(u16::try_from(hl + total).unwrap_or(u16::MAX));
        p.set_more_frags(false);
        p.set_frag_offset(0);
        p.fill_checksum();
        &slot.buf[start..60 + total]
    }

    /// Frees a slot.
    pub fn release(&mut self, idx: usize) {
        self.slots[idx].key = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fragments of a UDP datagram carrying `data`, each at most `mtu` bytes, built by
    /// hand (etherparse does not fragment).
    fn fragments(data: &[u8], mtu: usize, ident: u16) -> Vec<Vec<u8>> {
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 2, 100], [203, 0, 113, 1], 64)
            .udp(4000, 5000)
            .write(&mut udp, data)
            .unwrap();
        let l4 = &udp[20..];
        let per = (mtu - 20) / 8 * 8;
        l4.chunks(per)
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = udp[..20].to_vec();
                f.extend_from_slice(chunk);
                let last = (i + 1) * per >= l4.len();
                let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
                p.set_total_len((20 + chunk.len()) as u16);
                p.set_ident(ident);
                p.set_more_frags(!last);
                p.set_dont_frag(false);
                p.set_frag_offset((i * per) as u16);
                p.fill_checksum();
                f
            })
            .collect()
    }

    fn feed(r: &mut Reassembler, frags: &[Vec<u8>], now: Instant) -> Option<Vec<u8>> {
        let mut out = None;
        for f in frags {
            let p = Ipv4Packet::new_checked(&f[..]).unwrap();
            if let Some(idx) = r.add(now, &p).unwrap() {
                out = Some(r.packet(idx).to_vec());
                r.release(idx);
            }
        }
        out
    }

    fn payload_of(packet: &[u8]) -> Vec<u8> {
        let p = etherparse::SlicedPacket::from_ip(packet).unwrap();
        let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
            panic!("not udp")
        };
        assert_eq!(
            u.checksum(),
            u.to_header()
                .calc_checksum_ipv4_raw([10, 0, 2, 100], [203, 0, 113, 1], u.payload())
                .unwrap()
        );
        u.payload().to_vec()
    }

    #[test]
    fn in_order_fragments_reassembled() {
        let data: Vec<u8> = (0..8000u32).map(|i| i as u8).collect();
        let frags = fragments(&data, 1500, 7);
        assert_eq!(frags.len(), 6);
        let mut r = Reassembler::default();
        let whole = feed(&mut r, &frags, Instant::from_secs(1)).expect("complete");
        assert_eq!(payload_of(&whole), data);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&whole)
            .unwrap()
            .to_header();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    }

    #[test]
    fn out_of_order_and_duplicate_fragments_reassembled() {
        let data = vec![0xabu8; 5000];
        let mut frags = fragments(&data, 1500, 9);
        frags.reverse();
        frags.insert(1, frags[0].clone());
        let mut r = Reassembler::default();
        assert_eq!(
            payload_of(&feed(&mut r, &frags, Instant::from_secs(1)).unwrap()),
            data
        );
    }

    #[test]
    fn missing_fragment_never_completes_and_expires() {
        let frags = fragments(&[1u8; 4000], 1500, 3);
        let mut r = Reassembler::default();
        assert!(feed(&mut r, &frags[1..], Instant::from_secs(1)).is_none());
        // Past the timeout the slot starts over: the late first fragment alone is not enough.
        assert!(feed(&mut r, &frags[..1], Instant::from_secs(1) + TIMEOUT).is_none());
    }

    #[test]
    fn more_partial_datagrams_than_slots_evicts_oldest() {
        let mut r = Reassembler::default();
        for id in 0..(SLOTS as u16 + 4) {
            let frags = fragments(&[2u8; 3000], 1500, id);
            assert!(feed(&mut r, &frags[..1], Instant::from_millis(i64::from(id))).is_none());
        }
        let frags = fragments(&[5u8; 3000], 1500, 999);
        assert!(feed(&mut r, &frags, Instant::from_secs(2)).is_some());
    }

    #[test]
    fn impossible_fragment_malformed() {
        let mut f = fragments(&[1u8; 3000], 1500, 1)[0].clone();
        let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
        p.set_frag_offset(65528);
        p.fill_checksum();
        let mut r = Reassembler::default();
        let p = Ipv4Packet::new_checked(&f[..]).unwrap();
        assert_eq!(r.add(Instant::from_secs(1), &p), Err(FragDrop::Malformed));
    }
}
