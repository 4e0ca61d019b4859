//! Flow timers: one min-heap, lazily cleaned.
//!
//! # Theory of operation
//!
//! Each flow remembers the earliest deadline it has in the heap (`Flow::timer`). A flow
//! pushes a new entry only when it wants to wake *earlier* than that; when an entry pops,
//! the flow is serviced and re-arms itself with its current deadline. Entries of freed
//! flows and superseded entries are recognised on pop (the deadline does not match the
//! flow's) and skipped. The heap therefore holds about one entry per flow, and no entry
//! is ever searched for.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use smoltcp::time::Instant;

/// A min-heap of `(deadline, flow key)`.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

/// Entries reserved up front: the heap grows with the number of flows (about one entry
/// each), never with the number of packets.
const INITIAL_CAPACITY: usize = 1024;

impl Timers {
    /// An empty heap with room for [`INITIAL_CAPACITY`] entries.
    pub fn new() -> Timers {
        Timers {
            heap: BinaryHeap::with_capacity(INITIAL_CAPACITY),
        }
    }

    /// Arms `slot` (a flow's `timer` field) to fire at `at` for flow `key`, unless it is
    /// already armed earlier.
    pub fn arm(&mut self, slot: &mut Option<Instant>, key: usize, at: Instant) {
        if slot.is_some_and(|cur| cur <= at) {
            return;
        }
        *slot = Some(at);
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pops one entry due at `now`: `(deadline, key)`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Number of entries, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether the heap is empty.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_later_than_current_is_ignored() {
        let mut t = Timers::default();
        let mut slot = None;
        t.arm(&mut slot, 1, Instant::from_millis(10));
        t.arm(&mut slot, 1, Instant::from_millis(20));
        assert_eq!(t.len(), 1);
        t.arm(&mut slot, 1, Instant::from_millis(5));
        assert_eq!(slot, Some(Instant::from_millis(5)));
        assert_eq!(t.next(), Some(Instant::from_millis(5)));
    }

    #[test]
    fn pop_due_in_order() {
        let mut t = Timers::default();
        let (mut a, mut b) = (None, None);
        t.arm(&mut a, 1, Instant::from_millis(30));
        t.arm(&mut b, 2, Instant::from_millis(10));
        assert_eq!(t.pop_due(Instant::from_millis(5)), None);
        assert_eq!(
            t.pop_due(Instant::from_millis(40)),
            Some((Instant::from_millis(10), 2))
        );
        assert_eq!(
            t.pop_due(Instant::from_millis(40)),
            Some((Instant::from_millis(30), 1))
        );
        assert!(t.is_empty());
    }
}
