//! The transmit queue: frames bound for the guest, built in place.
//!
//! # Theory of operation
//!
//! Every frame the guest receives (smoltcp's TCP segments, our UDP, ICMP, ARP and DHCP
//! replies) is written straight into a slot of this queue; the event loop then hands each
//! slot to one `write()` on the TAP. Slots are allocated once, at start-up, each large
//! enough for the largest frame (vnet header + Ethernet header + the biggest IP packet);
//! the pages of a slot are committed by the kernel only when a frame first touches them.
//!
//! When the queue is full, producers are told so (`slot()` returns `None`): smoltcp then
//! keeps its segment and retries on the next poll, so nothing is dropped silently. The
//! event loop flushes the queue whenever it fills and at the end of every turn.

/// A ring of fixed-size frame slots, in one allocation (large enough to be mapped
/// lazily by the allocator: untouched slots cost no memory).
#[derive(Debug)]
pub struct TxQueue {
    buf: Box<[u8]>,
    slot_size: usize,
    lens: Box<[usize]>,
    head: usize,
    len: usize,
}

impl TxQueue {
    /// Allocates `slots` slots of `slot_size` bytes each.
    ///
    /// # Panics
    /// When `slots` is zero.
    pub fn new(slots: usize, slot_size: usize) -> TxQueue {
        assert!(slots > 0, "a transmit queue needs at least one slot");
        TxQueue {
            buf: vec![0u8; slots * slot_size].into_boxed_slice(),
            slot_size,
            lens: vec![0; slots].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    /// Size of one slot: the largest frame the queue can hold.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    fn slots(&self) -> usize {
        self.lens.len()
    }

    fn range(&self, idx: usize) -> std::ops::Range<usize> {
        idx * self.slot_size..(idx + 1) * self.slot_size
    }

    /// Whether no slot is free.
    pub fn is_full(&self) -> bool {
        self.len == self.slots()
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of queued frames.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The next free slot, to be filled and then [`commit`](Self::commit)ted; `None` when
    /// the queue is full. A slot that is not committed stays free.
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        let idx = (self.head + self.len) % self.slots();
        let r = self.range(idx);
        Some(&mut self.buf[r])
    }

    /// Queues the slot last returned by [`slot`](Self::slot), holding a frame of `len` bytes.
    ///
    /// # Panics
    /// When the queue is full or `len` exceeds the slot size (a caller bug).
    pub fn commit(&mut self, len: usize) {
        assert!(!self.is_full() && len <= self.slot_size());
        let idx = (self.head + self.len) % self.slots();
        self.lens[idx] = len;
        self.len += 1;
    }

    /// Takes back the newest queued frame, which stays readable (the returned slice)
    /// until the next [`slot`](Self::slot). For frames that cannot leave yet.
    pub fn uncommit_last(&mut self) -> Option<&[u8]> {
        if self.is_empty() {
            return None;
        }
        self.len -= 1;
        let idx = (self.head + self.len) % self.slots();
        let start = self.range(idx).start;
        Some(&self.buf[start..start + self.lens[idx]])
    }

    /// The oldest queued frame.
    pub fn front(&self) -> Option<&[u8]> {
        if self.is_empty() {
            return None;
        }
        let start = self.range(self.head).start;
        Some(&self.buf[start..start + self.lens[self.head]])
    }

    /// Removes the oldest queued frame.
    pub fn pop(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % self.slots();
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_wraparound() {
        let mut q = TxQueue::new(2, 8);
        for round in 0..5u8 {
            q.slot().unwrap()[0] = round;
            q.commit(1);
            q.slot().unwrap()[..2].copy_from_slice(&[round, round]);
            q.commit(2);
            assert!(q.is_full());
            assert!(q.slot().is_none());
            assert_eq!(q.front(), Some(&[round][..]));
            q.pop();
            assert_eq!(q.front(), Some(&[round, round][..]));
            q.pop();
            assert!(q.is_empty());
        }
    }

    #[test]
    fn uncommitted_slot_stays_free() {
        let mut q = TxQueue::new(1, 4);
        q.slot().unwrap()[0] = 9;
        assert!(q.is_empty());
        assert!(q.front().is_none());
    }
}
