//! Member names: the network's own DNS answers for its members.
//!
//! # Theory of operation
//!
//! A usernet network registers each member's name and aliases with its addresses when
//! the member joins, and withdraws them when it leaves. Queries to the DNS address whose
//! question is a member name (`A`, `AAAA`) or a member address (`PTR` under
//! `in-addr.arpa` / `ip6.arpa`) are answered here with a short TTL ([`TTL`]), so that a
//! name that moves is not cached for long; every other query goes to the upstream
//! resolvers as before ([`crate::dns`]). A name without a record of the asked type gets an
//! empty answer (NODATA), not a forward: the name is ours.
//!
//! Limits: one question per query (what resolvers send), names up to 255 bytes, at most
//! [`MAX_NAMES`] names. Security: the query is guest-controlled; anything that does not
//! parse is left to the forwarder, which forwards or drops it as before. Nothing here
//! allocates per query: the reply is built in the caller's buffer.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

/// TTL of the answers, in seconds.
pub const TTL: u32 = 5;

/// Names a network holds (members times names each).
pub const MAX_NAMES: usize = 8192;

/// The addresses of one name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Addrs {
    /// IPv4.
    pub v4: Option<Ipv4Addr>,
    /// IPv6.
    pub v6: Option<Ipv6Addr>,
}

/// The member names of a network.
#[derive(Debug, Default)]
pub struct Names {
    /// Lower-case name without trailing dot -> addresses.
    by_name: HashMap<String, Addrs>,
    /// The canonical name (the member's name) of each address, for PTR.
    by_v4: HashMap<Ipv4Addr, String>,
    by_v6: HashMap<Ipv6Addr, String>,
}

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;
const TYPE_ANY: u16 = 255;

impl Names {
    /// Whether no name is registered.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Registers `name` (the member's; used for PTR) and its `aliases`. Returns false
    /// (nothing registered) when the table is full.
    pub fn add(&mut self, name: &str, aliases: &[String], addrs: Addrs) -> bool {
        if self.by_name.len() + 1 + aliases.len() > MAX_NAMES {
            return false;
        }
        for n in std::iter::once(name).chain(aliases.iter().map(String::as_str)) {
            self.by_name.insert(normalize(n), addrs);
        }
        if let Some(v4) = addrs.v4 {
            self.by_v4.insert(v4, normalize(name));
        }
        if let Some(v6) = addrs.v6 {
            self.by_v6.insert(v6, normalize(name));
        }
        true
    }

    /// Withdraws `name` and `aliases` and the addresses' PTR records.
    pub fn remove(&mut self, name: &str, aliases: &[String]) {
        for n in std::iter::once(name).chain(aliases.iter().map(String::as_str)) {
            if let Some(a) = self.by_name.remove(&normalize(n)) {
                if let Some(v4) = a.v4 {
                    self.by_v4.remove(&v4);
                }
                if let Some(v6) = a.v6 {
                    self.by_v6.remove(&v6);
                }
            }
        }
    }

    /// Answers `query` (a DNS message) into `out` when its question is ours; the reply's
    /// length, or `None` when the query is not ours (or not understood).
    pub fn answer(&self, query: &[u8], out: &mut [u8]) -> Option<usize> {
        if self.by_name.is_empty() || query.len() < 12 {
            return None;
        }
        // A standard query (QR = 0, opcode 0) with one question.
        if query[2] & 0xf8 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
            return None;
        }
        let mut name = [0u8; 256];
        let (name_len, qend) = read_name(query, 12, &mut name)?;
        let q = query.get(qend..qend + 4)?;
        let qtype = u16::from_be_bytes([q[0], q[1]]);
        let qclass = u16::from_be_bytes([q[2], q[3]]);
        if qclass != 1 {
            return None;
        }
        let name = std::str::from_utf8(&name[..name_len]).ok()?;
        let qlen = qend + 4;
        enum Rec<'a> {
            A(Ipv4Addr),
            Aaaa(Ipv6Addr),
            Ptr(&'a str),
        }
        let mut recs: [Option<Rec<'_>>; 2] = [None, None];
        if let Some(a) = self.by_name.get(name) {
            if matches!(qtype, TYPE_A | TYPE_ANY) {
                recs[0] = a.v4.map(Rec::A);
            }
            if matches!(qtype, TYPE_AAAA | TYPE_ANY) {
                recs[1] = a.v6.map(Rec::Aaaa);
            }
        } else if let Some(target) = self.ptr(name) {
            if matches!(qtype, TYPE_PTR | TYPE_ANY) {
                recs[0] = Some(Rec::Ptr(target));
            }
        } else {
            return None;
        }
        // Header and question, copied.
        let head = out.get_mut(..qlen)?;
        head.copy_from_slice(&query[..qlen]);
        // QR, opcode 0, AA, RD as asked; RA; NOERROR.
        out[2] = 0x84 | (query[2] & 0x01);
        out[3] = 0x80;
        out[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut at = qlen;
        let mut count = 0u16;
        for rec in recs.iter().flatten() {
            let (rtype, rdata_len) = match rec {
                Rec::A(_) => (TYPE_A, 4),
                Rec::Aaaa(_) => (TYPE_AAAA, 16),
                Rec::Ptr(t) => (TYPE_PTR, encoded_len(t)),
            };
            let rr = out.get_mut(at..at + 12 + rdata_len)?;
            // Name: a pointer to the question's.
            rr[..2].copy_from_slice(&[0xc0, 12]);
            rr[2..4].copy_from_slice(&rtype.to_be_bytes());
            rr[4..6].copy_from_slice(&1u16.to_be_bytes());
            rr[6..10].copy_from_slice(&TTL.to_be_bytes());
            rr[10..12].copy_from_slice(&u16::try_from(rdata_len).ok()?.to_be_bytes());
            match rec {
                Rec::A(a) => rr[12..16].copy_from_slice(&a.octets()),
                Rec::Aaaa(a) => rr[12..28].copy_from_slice(&a.octets()),
                Rec::Ptr(t) => encode_name(t, &mut rr[12..])?,
            }
            at += 12 + rdata_len;
            count += 1;
        }
        out[6..8].copy_from_slice(&count.to_be_bytes());
        Some(at)
    }

    /// The name of the address a reverse name stands for.
    fn ptr(&self, name: &str) -> Option<&str> {
        if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            let mut o = [0u8; 4];
            let mut parts = rev.split('.');
            for i in (0..4).rev() {
                o[i] = parts.next()?.parse().ok()?;
            }
            if parts.next().is_some() {
                return None;
            }
            return self.by_v4.get(&Ipv4Addr::from(o)).map(String::as_str);
        }
        let rev = name.strip_suffix(".ip6.arpa")?;
        let mut addr = 0u128;
        let mut n = 0;
        for (i, nibble) in rev.split('.').enumerate() {
            let v = u128::from_str_radix(nibble, 16).ok()?;
            if nibble.len() != 1 || i >= 32 {
                return None;
            }
            addr |= v << (4 * i);
            n += 1;
        }
        if n != 32 {
            return None;
        }
        self.by_v6.get(&Ipv6Addr::from(addr)).map(String::as_str)
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Reads the uncompressed name at `at` (a question's) as lower-case dotted text into
/// `out`, without allocating: (its length, the offset after the name). `None` for a name
/// longer than `out` or not uncompressed. The egress policy reads its questions with it too.
pub(crate) fn read_name(msg: &[u8], mut at: usize, out: &mut [u8]) -> Option<(usize, usize)> {
    let mut len = 0;
    loop {
        let l = usize::from(*msg.get(at)?);
        at += 1;
        if l == 0 {
            return Some((len, at));
        }
        if l > 63 {
            return None;
        }
        if len > 0 {
            *out.get_mut(len)? = b'.';
            len += 1;
        }
        let label = msg.get(at..at + l)?;
        out.get_mut(len..len + l)?.copy_from_slice(label);
        out[len..len + l].make_ascii_lowercase();
        len += l;
        at += l;
    }
}

fn encoded_len(name: &str) -> usize {
    name.len() + 2
}

fn encode_name(name: &str, out: &mut [u8]) -> Option<()> {
    let mut at = 0;
    for label in name.split('.') {
        let l = label.len();
        if l == 0 || l > 63 {
            return None;
        }
        *out.get_mut(at)? = u8::try_from(l).ok()?;
        out.get_mut(at + 1..at + 1 + l)?
            .copy_from_slice(label.as_bytes());
        at += 1 + l;
    }
    *out.get_mut(at)? = 0;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let mut buf = [0u8; 300];
        encode_name(name, &mut buf).unwrap();
        q.extend_from_slice(&buf[..encoded_len(name)]);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    fn names() -> Names {
        let mut n = Names::default();
        n.add(
            "web",
            &["www".to_owned()],
            Addrs {
                v4: Some(Ipv4Addr::new(10, 89, 0, 100)),
                v6: Some("fd00::64".parse().unwrap()),
            },
        );
        n
    }

    #[test]
    fn a_aaaa_ptr_answered_others_not() {
        let n = names();
        let mut out = [0u8; 512];
        let len = n.answer(&query("WEB", TYPE_A), &mut out).unwrap();
        assert_eq!(&out[..2], &[0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 1);
        assert_eq!(&out[len - 4..len], &[10, 89, 0, 100]);
        let len = n.answer(&query("www", TYPE_AAAA), &mut out).unwrap();
        assert_eq!(
            &out[len - 16..len],
            &"fd00::64".parse::<Ipv6Addr>().unwrap().octets()
        );
        let len = n
            .answer(&query("100.0.89.10.in-addr.arpa", TYPE_PTR), &mut out)
            .unwrap();
        assert_eq!(&out[len - 5..len], &[3, b'w', b'e', b'b', 0]);
        assert!(n.answer(&query("example.com", TYPE_A), &mut out).is_none());
        // NODATA for a type the name has no record of.
        let len = n.answer(&query("web", 16), &mut out).unwrap();
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 0);
        assert!(len > 12);
    }

    #[test]
    fn removed_names_are_forwarded_again() {
        let mut n = names();
        n.remove("web", &["www".to_owned()]);
        let mut out = [0u8; 512];
        assert!(n.answer(&query("web", TYPE_A), &mut out).is_none());
        assert!(n
            .answer(&query("100.0.89.10.in-addr.arpa", TYPE_PTR), &mut out)
            .is_none());
    }

    #[test]
    fn garbage_is_not_ours() {
        let n = names();
        let mut out = [0u8; 512];
        for cut in 0..query("web", TYPE_A).len() {
            let q = query("web", TYPE_A);
            assert!(n.answer(&q[..cut], &mut out).is_none() || cut == q.len());
        }
        assert!(n.answer(&[0xff; 40], &mut out).is_none());
    }
}
