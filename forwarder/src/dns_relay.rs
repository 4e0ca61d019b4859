//! The DNS forwarder's failover: queries that get no answer move to the next nameserver,
//! and when none answers the guest gets SERVFAIL.
//!
//! # Theory of operation
//!
//! Guest queries to the DNS address (`net+3`, `fd00::3`) on port 53 travel as an ordinary
//! UDP flow ([`crate::udp`]): one connected host socket per guest (address, port), to the
//! first nameserver of the host's list. The guest only knows usernet's address, so it
//! cannot fail over itself the way glibc would with the host's list; this module does it
//! for it, per flow:
//!
//! - every query the guest sends (its ID, its bytes, up to [`MAX_QUERY`]) is remembered
//!   with a deadline, [`PER_SERVER`] (1 s) for every server but the last;
//! - a reply from the nameserver forgets the query with its ID;
//! - at a deadline, the flow's socket is connected to the next nameserver and every
//!   query still pending is sent there again; the server that did not answer goes to the
//!   end of the forwarder's list ([`Failover::Next`]), so that the next flows start with
//!   one that works;
//! - when the last nameserver has not answered [`TOTAL`] (4 s) after the query, the guest
//!   gets a SERVFAIL reply built from its query (header and question), before glibc's and
//!   dig's own 5 s timeout, rather than silence.
//!
//! A nameserver the host cannot reach at all is skipped when the flow opens (the next
//! one is connected instead). Once a query got SERVFAIL, and until any nameserver answers
//! again, flows are *quick*: their queries still go to the first nameserver (so that
//! its return is noticed) but get SERVFAIL after [`QUICK`] (0.5 s). glibc asks twice per
//! address family and `getent hosts` asks for both: with every upstream silent it fails in
//! about 6 s instead of 16 s.
//!
//! Limits: at most [`MAX_PENDING`] queries per flow are followed (the oldest is forgotten
//! beyond; glibc has two in flight, A and AAAA); a query longer than [`MAX_QUERY`] is
//! forwarded but not followed. A late answer from a server the flow has left is dropped
//! by the kernel (the socket is connected to the next one). DNS over TCP goes to the
//! first nameserver of the current list, without failover.
//!
//! An answer to a followed query also goes to the egress policies of the flow's guest in
//! force when it arrives ([`crate::egress::Policy::learn`]), which learn the addresses of
//! the names they allow.
//!
//! Security: nothing of the reply is trusted beyond its ID (two bytes, checked for
//! length), and the egress policy's parser, bounded by the reply; the SERVFAIL is built
//! from the guest's own query, bounded by its length.

use std::net::SocketAddr;

use smoltcp::time::{Duration, Instant};

/// How long a query waits for a nameserver that is not the last one.
pub const PER_SERVER: Duration = Duration::from_secs(1);

/// How long after it was sent a query gets SERVFAIL if no nameserver answered.
pub const TOTAL: Duration = Duration::from_secs(4);

/// How long a query of a quick flow (opened while no nameserver answers) waits.
pub const QUICK: Duration = Duration::from_millis(500);

/// Most queries followed per flow.
pub const MAX_PENDING: usize = 4;

/// Longest query followed (a plain query without EDNS padding is well below).
pub const MAX_QUERY: usize = 512;

/// Most nameservers (glibc's `MAXNS`).
const MAX_SERVERS: usize = crate::dns::MAXNS;

/// DNS header length.
const HEADER_LEN: usize = 12;

/// One query waiting for its answer (a slot: `active` false when free).
#[derive(Clone)]
struct Pending {
    active: bool,
    id: u16,
    /// When it was first sent.
    sent: Instant,
    len: usize,
    buf: [u8; MAX_QUERY],
}

impl Pending {
    const FREE: Pending = Pending {
        active: false,
        id: 0,
        sent: Instant::ZERO,
        len: 0,
        buf: [0; MAX_QUERY],
    };
}

/// Failover state of one DNS flow (boxed once per flow: its slots hold the queries, so
/// following a query allocates nothing).
pub struct DnsState {
    /// The nameservers, in the order the flow tries them.
    servers: [Option<SocketAddr>; MAX_SERVERS],
    /// Index of the one the socket is connected to.
    current: usize,
    /// When the current server was given the pending queries.
    since: Instant,
    /// Opened while no nameserver answers: no failover, SERVFAIL after [`QUICK`].
    quick: bool,
    pending: [Pending; MAX_PENDING],
}

/// What the flow must do at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// Nothing due.
    Wait,
    /// Connect to `to` and send the pending queries again; `from` did not answer (the
    /// forwarder moves it to the end of its list).
    Next {
        /// The server that did not answer.
        from: SocketAddr,
        /// The server to try now.
        to: SocketAddr,
    },
}

impl DnsState {
    /// State for a flow connected to `servers[current]`; `quick` while no nameserver
    /// answers (see the module documentation).
    pub fn new(servers: &[SocketAddr], current: usize, now: Instant, quick: bool) -> DnsState {
        let mut list = [None; MAX_SERVERS];
        for (slot, s) in list.iter_mut().zip(servers) {
            *slot = Some(*s);
        }
        DnsState {
            servers: list,
            current: current.min(MAX_SERVERS - 1),
            since: now,
            quick,
            pending: [const { Pending::FREE }; MAX_PENDING],
        }
    }

    fn is_last(&self) -> bool {
        self.quick
            || self
                .servers
                .get(self.current + 1)
                .is_none_or(|s| s.is_none())
    }

    fn active(&self) -> impl Iterator<Item = &Pending> {
        self.pending.iter().filter(|p| p.active)
    }

    /// When the last server's wait for `p` ends: [`TOTAL`] after the query, and at least
    /// [`PER_SERVER`] after that server got it.
    fn last_deadline(&self, p: &Pending) -> Instant {
        if self.quick {
            return p.sent + QUICK;
        }
        (p.sent + TOTAL).max(self.since + PER_SERVER)
    }

    /// Makes the flow quick (or not) from now on: the forwarder says so with every query.
    pub fn set_quick(&mut self, quick: bool) {
        self.quick = quick;
    }

    /// Remembers a guest query (its first two bytes are the ID).
    pub fn query(&mut self, now: Instant, data: &[u8]) {
        if data.len() < HEADER_LEN || data.len() > MAX_QUERY {
            return;
        }
        let id = u16::from_be_bytes([data[0], data[1]]);
        if self.active().next().is_none() {
            self.since = now;
        }
        // A retransmission replaces the entry of the same ID; else a free slot; else
        // the oldest.
        let slot = self
            .pending
            .iter()
            .position(|p| p.active && p.id == id)
            .or_else(|| self.pending.iter().position(|p| !p.active))
            .or_else(|| (0..MAX_PENDING).min_by_key(|&i| self.pending[i].sent))
            .unwrap_or(0);
        let entry = &mut self.pending[slot];
        if !(entry.active && entry.id == id) {
            entry.sent = now;
        }
        entry.active = true;
        entry.id = id;
        entry.len = data.len();
        entry.buf[..data.len()].copy_from_slice(data);
    }

    /// Forgets the query a reply answers; true if it was pending (the answer to a
    /// pending query then teaches the egress policies: [`crate::egress`]).
    pub fn answered(&mut self, reply_head: &[u8]) -> bool {
        let Some(id) = reply_head
            .get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
        else {
            return false;
        };
        let mut found = false;
        for p in &mut self.pending {
            if p.active && p.id == id {
                p.active = false;
                found = true;
            }
        }
        found
    }

    /// The next deadline, if any query waits.
    pub fn deadline(&self) -> Option<Instant> {
        if self.is_last() {
            self.active().map(|p| self.last_deadline(p)).min()
        } else {
            self.active().next().map(|_| self.since + PER_SERVER)
        }
    }

    /// At a deadline: the server to move to, if the current one did not answer in time
    /// and another is left.
    pub fn poll(&mut self, now: Instant) -> Failover {
        if self.is_last() || self.active().next().is_none() || now < self.since + PER_SERVER {
            return Failover::Wait;
        }
        let (Some(from), Some(to)) = (self.servers[self.current], self.servers[self.current + 1])
        else {
            return Failover::Wait;
        };
        self.current += 1;
        self.since = now;
        Failover::Next { from, to }
    }

    /// The pending queries, to send again after a failover.
    pub fn pending_queries(&self) -> impl Iterator<Item = &[u8]> {
        self.active().map(|p| &p.buf[..p.len])
    }

    /// Ends the queries the last server left unanswered past their deadline: `emit` gets
    /// a SERVFAIL reply for each.
    pub fn expire(&mut self, now: Instant, mut emit: impl FnMut(&[u8])) {
        if !self.is_last() {
            return;
        }
        for i in 0..MAX_PENDING {
            let p = &self.pending[i];
            if !p.active || now < self.last_deadline(p) {
                continue;
            }
            let p = &mut self.pending[i];
            p.active = false;
            let len = p.len;
            if let Some(n) = servfail(&mut p.buf[..len]) {
                emit(&p.buf[..n]);
            }
        }
    }
}

/// Turns the query in `buf` into a SERVFAIL reply in place: the header with QR, RA and
/// RCODE 2 and no records, and the question if it parses (else none). Returns its length.
pub fn servfail(buf: &mut [u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let qdcount = u16::from_be_bytes([buf[4], buf[5]]);
    let end = if qdcount == 1 {
        question_end(buf, HEADER_LEN)
    } else {
        None
    };
    // QR = 1, keep opcode and RD; RA = 1, RCODE = 2 (server failure).
    buf[2] = (buf[2] & 0x79) | 0x80;
    buf[3] = 0x80 | 2;
    let qd: u16 = if end.is_some() { 1 } else { 0 };
    buf[4..6].copy_from_slice(&qd.to_be_bytes());
    buf[6..12].fill(0);
    Some(end.unwrap_or(HEADER_LEN))
}

/// The end of the question starting at `at`: a name of labels (no compression in a
/// query), then type and class.
fn question_end(buf: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = usize::from(*buf.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    let end = at + 4;
    (end <= buf.len()).then_some(end)
}

/// The DNS forwarder's state in the NAT: the upstreams in use and in what order, whether
/// they answer, and the member names answered without them.
pub(crate) struct Upstreams {
    /// The upstreams now, in the order new DNS flows try them: replaced when resolv.conf
    /// changes, one that did not answer moved to the end.
    pub nameservers: Vec<std::net::SocketAddr>,
    /// Set when a query got SERVFAIL, to the `dns_answers` count then: while no answer
    /// came since, new DNS flows are quick.
    pub dns_down: Option<u64>,
    /// Member names the DNS address answers itself.
    pub names: crate::names::Names,
}

impl Upstreams {
    /// `nameservers` in use, healthy so far, no names.
    pub fn new(nameservers: Vec<std::net::SocketAddr>) -> Upstreams {
        Upstreams {
            nameservers,
            dns_down: None,
            names: crate::names::Names::default(),
        }
    }

    /// Moves `server`, which did not answer, to the end: new DNS flows start with one that
    /// does.
    pub fn demote(&mut self, server: std::net::SocketAddr) {
        if let Some(pos) = self.nameservers.iter().position(|s| *s == server) {
            let s = self.nameservers.remove(pos);
            self.nameservers.push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut q = vec![0u8; 12];
        q[0..2].copy_from_slice(&id.to_be_bytes());
        q[2] = 0x01; // RD
        q[5] = 1; // QDCOUNT
        for label in ["example", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&[0, 1, 0, 1]);
        q.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]); // an OPT record
        q[11] = 1; // ARCOUNT
        q
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 53))
    }

    #[test]
    fn servfail_keeps_id_and_question_drops_records() {
        let mut q = query(0xbeef);
        let qlen = 12 + 14 + 4;
        let n = servfail(&mut q).unwrap();
        assert_eq!(n, qlen);
        assert_eq!(&q[0..2], &[0xbe, 0xef]);
        assert_eq!(q[2] & 0x80, 0x80, "QR");
        assert_eq!(q[2] & 0x01, 0x01, "RD kept");
        assert_eq!(q[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&q[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        let mut bad = query(1);
        bad[12] = 0xc0; // a pointer: no question then
        assert_eq!(servfail(&mut bad), Some(12));
        assert_eq!(servfail(&mut [0u8; 5]), None);
    }

    #[test]
    fn silent_first_server_fails_over_after_1_s_then_servfail_at_4_s() {
        let t0 = Instant::from_secs(100);
        let mut s = DnsState::new(&[addr(9), addr(1)], 0, t0, false);
        s.query(t0, &query(7));
        assert_eq!(s.deadline(), Some(t0 + PER_SERVER));
        assert_eq!(s.poll(t0 + Duration::from_millis(999)), Failover::Wait);
        let t1 = t0 + PER_SERVER;
        assert_eq!(
            s.poll(t1),
            Failover::Next {
                from: addr(9),
                to: addr(1)
            }
        );
        assert_eq!(s.pending_queries().count(), 1);
        // The last server has until 4 s after the query.
        assert_eq!(s.deadline(), Some(t0 + TOTAL));
        let mut out = Vec::new();
        s.expire(t0 + Duration::from_millis(3999), |r| out.push(r.to_vec()));
        assert!(out.is_empty());
        s.expire(t0 + TOTAL, |r| out.push(r.to_vec()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0][3] & 0x0f, 2);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn quick_flow_never_fails_over_and_servfails_after_half_a_second() {
        let t0 = Instant::from_secs(1);
        let mut s = DnsState::new(&[addr(1), addr(2)], 0, t0, true);
        s.query(t0, &query(3));
        assert_eq!(s.deadline(), Some(t0 + QUICK));
        assert_eq!(s.poll(t0 + TOTAL), Failover::Wait);
        let mut n = 0;
        s.expire(t0 + QUICK, |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn answered_query_is_forgotten() {
        let t0 = Instant::from_secs(1);
        let mut s = DnsState::new(&[addr(1), addr(2)], 0, t0, false);
        s.query(t0, &query(1));
        s.query(t0, &query(2));
        s.answered(&query(1)[..2]);
        assert_eq!(s.pending_queries().count(), 1);
        s.answered(&query(2));
        assert_eq!(s.deadline(), None);
        assert_eq!(s.poll(t0 + TOTAL), Failover::Wait);
    }

    #[test]
    fn retransmission_replaces_and_table_is_bounded() {
        let t0 = Instant::from_secs(1);
        let mut s = DnsState::new(&[addr(1)], 0, t0, false);
        for id in 0..10 {
            s.query(t0 + Duration::from_millis(u64::from(id)), &query(id));
        }
        assert_eq!(s.pending_queries().count(), MAX_PENDING);
        s.query(t0, &query(9));
        assert_eq!(s.pending_queries().count(), MAX_PENDING);
        s.query(t0, &[0u8; 4]);
        assert_eq!(s.pending_queries().count(), MAX_PENDING);
    }
}
