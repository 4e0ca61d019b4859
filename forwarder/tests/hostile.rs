//! Hostile guest frames (issue 5): over a million generated and mutated frames through
//! one forwarder per vnet header length (0 and 10) without a panic or a hang, the drop
//! counters of every targeted class moving; then one test per hostile class with an
//! exact verdict.
//!
//! Safety: the forwarder runs with `sealed_config` (host loopback off, no DNS upstream)
//! and every generated frame has its IP destination rewritten by `confine` into an
//! address that NAT refuses, checked again by `Sealed::feed` before the frame goes in.
//! No host socket is ever opened, which every test asserts (`*_opened == 0`). The one
//! test with host sockets (`flows_stay_within_limits`) builds its frames itself and
//! reaches only its own listeners on 127.0.0.1.
//!
//! Reproducing: every random frame depends on the seed, the vnet length and its index
//! only (`Gen::frame`). `HOSTILE_SEED=<n>` picks the seed (printed by every run),
//! `HOSTILE_FRAMES=<n>` the number of random frames per vnet length.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration as StdDuration;

use common::*;
use etherparse::PacketBuilder;
use forwarder::nat::NatConfig;
use forwarder::Counters;

/// Random frames per vnet header length, after the deterministic sweeps.
const FRAMES: u64 = 1_000_000;
/// The default seed: CI runs the same frames every time.
const SEED: u64 = 0x005e_ed0f_ba5e_f00d;
/// A run taking longer than this is reported as a hang.
const HANG: StdDuration = StdDuration::from_secs(300);
/// Frames fed between two event loop turns.
const BATCH: u64 = 256;

const DNS: [u8; 4] = [10, 0, 2, 3];
const GUEST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const GW6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ROUTER_LL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const GUEST_LL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// xorshift64*: small, fast, deterministic.
#[derive(Clone)]
struct Rng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn u16(&mut self) -> u16 {
        self.next() as u16
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.byte();
        }
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    /// One of `items`, or (as often as each of them) any byte.
    fn pick_or_byte(&mut self, items: &[u8]) -> u8 {
        match self.below(items.len() + 1) {
            i if i < items.len() => items[i],
            _ => self.byte(),
        }
    }
    /// One of `items`, or (as often as each of them) any value.
    fn pick_or_u16(&mut self, items: &[u16]) -> u16 {
        match self.below(items.len() + 1) {
            i if i < items.len() => items[i],
            _ => self.u16(),
        }
    }
}

/// What a generated frame tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Valid,
    Truncated,
    BitFlip,
    ByteSubst,
    BadChecksum,
    BadLength,
    Ipv4Options,
    Fragment,
    Oversized,
    BogusVnet,
    ArpSpoof,
    NdpSpoof,
    TcpFlags,
    ZeroPorts,
    BadSource,
    Ipv6Ext,
    Dhcp,
    Random,
}

/// Classes and their weights (per mille).
const CLASSES: [(Class, u32); 18] = [
    (Class::Valid, 60),
    (Class::Truncated, 90),
    (Class::BitFlip, 150),
    (Class::ByteSubst, 120),
    (Class::BadChecksum, 60),
    (Class::BadLength, 70),
    (Class::Ipv4Options, 50),
    (Class::Fragment, 40),
    (Class::Oversized, 8),
    (Class::BogusVnet, 60),
    (Class::ArpSpoof, 30),
    (Class::NdpSpoof, 50),
    (Class::TcpFlags, 60),
    (Class::ZeroPorts, 20),
    (Class::BadSource, 30),
    (Class::Ipv6Ext, 30),
    (Class::Dhcp, 50),
    (Class::Random, 22),
];

/// The kind of a valid template frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Arp,
    Udp4,
    Dns4,
    Tcp4,
    Icmp4,
    Dhcp,
    Udp6,
    Tcp6,
    Icmp6,
    Ndp,
}

impl Kind {
    fn v4(self) -> bool {
        matches!(
            self,
            Kind::Udp4 | Kind::Dns4 | Kind::Tcp4 | Kind::Icmp4 | Kind::Dhcp
        )
    }
    fn v6(self) -> bool {
        matches!(self, Kind::Udp6 | Kind::Tcp6 | Kind::Icmp6 | Kind::Ndp)
    }
    fn tcp(self) -> bool {
        matches!(self, Kind::Tcp4 | Kind::Tcp6)
    }
    fn udp(self) -> bool {
        matches!(self, Kind::Udp4 | Kind::Dns4 | Kind::Udp6)
    }
}

struct Template {
    kind: Kind,
    /// The frame, vnet header (plain) included.
    frame: Vec<u8>,
}

/// Builds a frame with etherparse (an implementation independent of smoltcp::wire).
fn build(
    step: impl FnOnce(&mut Vec<u8>) -> Result<(), etherparse::err::packet::BuildWriteError>,
) -> Vec<u8> {
    let mut out = Vec::new();
    step(&mut out).unwrap();
    out
}

fn arp_frame(op: u16, sender: [u8; 4], target: [u8; 4], eth_dst: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// A BOOTP/DHCP message: `msg_type` and then `options` (without the end option).
fn dhcp_message(msg_type: u8, options: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 240];
    d[0] = 1;
    d[1] = 1;
    d[2] = 6;
    d[4..8].copy_from_slice(&[1, 2, 3, 4]);
    d[10] = 0x80;
    d[28..34].copy_from_slice(&GUEST_MAC);
    d[236..240].copy_from_slice(&[99, 130, 83, 99]);
    d.extend_from_slice(&[53, 1, msg_type]);
    d.extend_from_slice(options);
    d.push(255);
    d
}

fn dhcp_frame(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    build(|out| {
        PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
            .ipv4(src, dst, 64)
            .udp(68, 67)
            .write(out, payload)
    })
}

fn icmp6_frame(src: [u8; 16], dst: [u8; 16], eth_dst: [u8; 6], msg: &[u8]) -> Vec<u8> {
    let t = etherparse::Icmpv6Type::Unknown {
        type_u8: msg[0],
        code_u8: msg[1],
        bytes5to8: [msg[4], msg[5], msg[6], msg[7]],
    };
    build(|out| {
        PacketBuilder::ethernet2(GUEST_MAC, eth_dst)
            .ipv6(src, dst, 255)
            .icmpv6(t)
            .write(out, &msg[8..])
    })
}

/// A neighbor solicitation for `target` with a source link-layer address option.
fn ns_body(target: [u8; 16]) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target);
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&GUEST_MAC);
    m
}

fn tcp_opts() -> [etherparse::TcpOptionElement; 4] {
    use etherparse::TcpOptionElement::*;
    [
        MaximumSegmentSize(1460),
        WindowScale(7),
        SelectiveAcknowledgementPermitted,
        Timestamp(1, 0),
    ]
}

/// The valid frames every mutation starts from, each a different path through the
/// forwarder.
fn templates(vnet: usize) -> Vec<Template> {
    let sol_node = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2];
    let all_routers = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let dns_query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
        b'c', b'o', b'm', 0, 0, 1, 0, 1,
    ];
    let rs = [133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0x64];
    let eth = |dst| PacketBuilder::ethernet2(GUEST_MAC, dst);
    let list = vec![
        (Kind::Arp, arp_frame(1, GUEST, GW, [0xff; 6])),
        (Kind::Arp, arp_frame(2, GUEST, GW, GW_MAC)),
        (
            Kind::Udp4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, [10, 0, 2, 50], 64)
                    .udp(4444, 9)
                    .write(o, &[0x55; 24])
            }),
        ),
        (
            Kind::Dns4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, DNS, 64)
                    .udp(5353, 53)
                    .write(o, &dns_query)
            }),
        ),
        (
            Kind::Tcp4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, GW, 64)
                    .tcp(40000, 80, 1000, 65535)
                    .syn()
                    .options(&tcp_opts())
                    .unwrap()
                    .write(o, &[])
            }),
        ),
        (
            Kind::Tcp4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, [10, 0, 2, 60], 64)
                    .tcp(40001, 443, 5000, 65535)
                    .ack(77)
                    .psh()
                    .write(o, &[0xaa; 100])
            }),
        ),
        (
            Kind::Icmp4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, GW, 64)
                    .icmpv4_echo_request(7, 1)
                    .write(o, &[0x33; 56])
            }),
        ),
        (
            Kind::Icmp4,
            build(|o| {
                eth(GW_MAC)
                    .ipv4(GUEST, [10, 0, 2, 77], 64)
                    .icmpv4_echo_request(8, 1)
                    .write(o, &[0x34; 16])
            }),
        ),
        (
            Kind::Dhcp,
            dhcp_frame(
                [0; 4],
                [255; 4],
                &dhcp_message(1, &[55, 3, 1, 3, 6, 61, 7, 1, 2, 0, 0, 0, 0, 0x64]),
            ),
        ),
        (
            Kind::Dhcp,
            dhcp_frame(
                [0; 4],
                [255; 4],
                &dhcp_message(
                    3,
                    &[50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2, 12, 2, b'g', b'1'],
                ),
            ),
        ),
        (
            Kind::Udp6,
            build(|o| {
                let mut dst = GW6;
                dst[15] = 0x50;
                eth(GW_MAC)
                    .ipv6(GUEST6, dst, 64)
                    .udp(4444, 9)
                    .write(o, &[0x66; 24])
            }),
        ),
        (
            Kind::Tcp6,
            build(|o| {
                eth(GW_MAC)
                    .ipv6(GUEST6, GW6, 64)
                    .tcp(40002, 80, 9000, 65535)
                    .syn()
                    .options(&tcp_opts())
                    .unwrap()
                    .write(o, &[])
            }),
        ),
        (
            Kind::Icmp6,
            build(|o| {
                eth(GW_MAC)
                    .ipv6(GUEST6, GW6, 64)
                    .icmpv6_echo_request(9, 1)
                    .write(o, &[0x36; 32])
            }),
        ),
        (
            Kind::Ndp,
            icmp6_frame(GUEST6, sol_node, [0x33, 0x33, 0xff, 0, 0, 2], &ns_body(GW6)),
        ),
        (
            Kind::Ndp,
            icmp6_frame(GUEST_LL, all_routers, [0x33, 0x33, 0, 0, 0, 2], &rs),
        ),
    ];
    list.into_iter()
        .map(|(kind, eth)| {
            let mut frame = vec![0u8; vnet];
            frame.extend_from_slice(&eth);
            Template { kind, frame }
        })
        .collect()
}

/// Frames of a run: templates for one vnet length and the NAT they must not get past.
struct Gen {
    vnet: usize,
    nat: NatConfig,
    templates: Vec<Template>,
}

/// Header field values that tend to find edges.
const INTERESTING: [u8; 16] = [
    0, 1, 2, 4, 5, 6, 0x0f, 0x10, 0x40, 0x45, 0x60, 0x7f, 0x80, 0xfe, 0xff, 0x3f,
];

impl Gen {
    fn new(vnet: usize) -> Gen {
        Gen {
            vnet,
            nat: sealed_config(vnet).nat,
            templates: templates(vnet),
        }
    }

    fn ip0(&self) -> usize {
        self.vnet + 14
    }

    /// Offset of the transport header of a template-shaped frame.
    fn l4(&self, f: &[u8], kind: Kind) -> usize {
        let ip0 = self.ip0();
        if kind.v4() {
            ip0 + usize::from(f[ip0] & 0xf) * 4
        } else {
            ip0 + 40
        }
    }

    fn proto(&self, f: &[u8], kind: Kind) -> u8 {
        if kind.v4() {
            f[self.ip0() + 9]
        } else {
            f[self.ip0() + 6]
        }
    }

    /// A template whose kind passes `pred` (some always does).
    fn pick(&self, r: &mut Rng, pred: impl Fn(Kind) -> bool) -> (Kind, Vec<u8>) {
        loop {
            let t = &self.templates[r.below(self.templates.len())];
            if pred(t.kind) {
                return (t.kind, t.frame.clone());
            }
        }
    }

    /// Varies the fields that select flows and sequence space.
    fn vary(&self, f: &mut [u8], kind: Kind, r: &mut Rng) {
        let ip0 = self.ip0();
        if kind.v4() {
            f[ip0 + 4..ip0 + 6].copy_from_slice(&r.u16().to_be_bytes());
            f[ip0 + 8] = r.byte().max(1);
        }
        let l4 = self.l4(f, kind);
        if kind.tcp() || kind.udp() {
            let sport = 1024 + r.below(64000) as u16;
            f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
        }
        if kind.tcp() {
            r.fill(&mut f[l4 + 4..l4 + 12]);
            f[l4 + 14..l4 + 16].copy_from_slice(&r.u16().to_be_bytes());
        }
        if matches!(kind, Kind::Icmp4 | Kind::Icmp6) {
            r.fill(&mut f[l4 + 4..l4 + 8]);
        }
        if kind == Kind::Dhcp {
            r.fill(&mut f[l4 + 8 + 4..l4 + 8 + 8]);
        }
    }

    /// Confines the destination (keeping the template's when `keep` and it is refused
    /// already) and recomputes the checksums when `fix`.
    fn finish(&self, f: &mut [u8], r: &mut Rng, keep: bool, fix: bool) {
        if !keep || r.chance(50) || !reaches_nothing(&self.nat, f, self.vnet) {
            confine(f, self.vnet, r.next());
        }
        if fix {
            fix_checksums(f, self.vnet);
        }
    }

    /// Frame `index` of the random part of a run.
    /// Frames `index` of the random part of a run: one frame, or a fragment train.
    fn frames(&self, seed: u64, index: u64) -> (Class, Vec<Vec<u8>>) {
        let mut r = Rng::new(seed ^ splitmix(index ^ (self.vnet as u64) << 56));
        let total: u32 = CLASSES.iter().map(|c| c.1).sum();
        let mut roll = r.below(total as usize) as u32;
        let mut class = Class::Valid;
        for (c, w) in CLASSES {
            if roll < w {
                class = c;
                break;
            }
            roll -= w;
        }
        if class == Class::Fragment && r.chance(50) {
            return (class, self.fragment_train(&mut r));
        }
        let f = self.class_frame(class, &mut r);
        (class, vec![f])
    }

    fn class_frame(&self, class: Class, r: &mut Rng) -> Vec<u8> {
        match class {
            Class::Valid => self.valid(r),
            Class::Truncated => {
                let mut f = self.valid(r);
                let cut = r.below(f.len());
                f.truncate(cut);
                f
            }
            Class::BitFlip => {
                let (kind, mut f) = self.pick(r, |_| true);
                self.vary(&mut f, kind, r);
                for _ in 0..1 + r.below(8) {
                    let bit = r.below(f.len() * 8);
                    f[bit / 8] ^= 1 << (bit % 8);
                }
                let fix = r.chance(50);
                self.finish(&mut f, r, true, fix);
                f
            }
            Class::ByteSubst => {
                let (kind, mut f) = self.pick(r, |_| true);
                self.vary(&mut f, kind, r);
                let head = f.len().min(self.ip0() + 64);
                for _ in 0..1 + r.below(6) {
                    let at = if r.chance(80) {
                        r.below(head)
                    } else {
                        r.below(f.len())
                    };
                    f[at] = if r.chance(70) {
                        r.pick(&INTERESTING)
                    } else {
                        r.byte()
                    };
                }
                let fix = r.chance(50);
                self.finish(&mut f, r, true, fix);
                f
            }
            Class::BadChecksum => self.bad_checksum(r),
            Class::BadLength => self.bad_length(r),
            Class::Ipv4Options => self.ipv4_options(r),
            Class::Fragment => self.fragment(r),
            Class::Oversized => self.oversized(r),
            Class::BogusVnet => {
                let mut f = self.valid(r);
                if self.vnet > 0 {
                    self.bogus_vnet(&mut f, r);
                }
                f
            }
            Class::ArpSpoof => self.arp_spoof(r),
            Class::NdpSpoof => self.ndp_spoof(r),
            Class::TcpFlags => {
                let flags = r.u16() & 0x1ff;
                self.tcp_flags(r, flags)
            }
            Class::ZeroPorts => self.zero_ports(r),
            Class::BadSource => self.bad_source(r),
            Class::Ipv6Ext => self.ipv6_ext(r),
            Class::Dhcp => self.dhcp(r),
            Class::Random => self.random(r),
        }
    }

    fn valid(&self, r: &mut Rng) -> Vec<u8> {
        let (kind, mut f) = self.pick(r, |_| true);
        self.vary(&mut f, kind, r);
        self.finish(&mut f, r, true, true);
        f
    }

    /// A checksum at `at` made wrong, never into its one's complement twin (0 and
    /// 0xffff are the same sum) nor into UDP's "no checksum".
    fn corrupt16(f: &mut [u8], at: usize, r: &mut Rng) {
        let old = u16::from_be_bytes([f[at], f[at + 1]]);
        let zero = |v: u16| v == 0 || v == 0xffff;
        let mut new = old;
        while new == old || zero(new) && zero(old) || new == 0 {
            new = r.u16();
        }
        f[at..at + 2].copy_from_slice(&new.to_be_bytes());
    }

    fn bad_checksum(&self, r: &mut Rng) -> Vec<u8> {
        // DHCP is left out: its UDP checksum is not checked (see the report).
        let (kind, mut f) = self.pick(r, |k| k != Kind::Arp && k != Kind::Dhcp);
        self.vary(&mut f, kind, r);
        self.finish(&mut f, r, true, true);
        if kind.v4() && r.chance(40) {
            Self::corrupt16(&mut f, self.ip0() + 10, r);
        } else {
            let at = match self.proto(&f, kind) {
                6 => 16,
                17 => 6,
                _ => 2,
            };
            let l4 = self.l4(&f, kind);
            Self::corrupt16(&mut f, l4 + at, r);
        }
        f
    }

    fn bad_length(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, |k| k.v4() && k != Kind::Dhcp || k.v6());
        self.vary(&mut f, kind, r);
        let ip_len = f.len() - ip0;
        let l4 = self.l4(&f, kind);
        let set16 =
            |f: &mut [u8], at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_be_bytes());
        match (kind.v4(), r.below(5)) {
            // IHL below 5.
            (true, 0) => f[ip0] = 0x40 | r.below(5) as u8,
            // IHL beyond the total length.
            (true, 1) => {
                let ihl = 6 + r.below(10);
                f[ip0] = 0x40 | ihl as u8;
                set16(&mut f, ip0 + 2, (20 + r.below(ihl * 4 - 20)) as u16);
            }
            // Total length below the header, or beyond the frame.
            (true, 2) => {
                let total = if r.chance(50) {
                    r.below(20)
                } else {
                    ip_len + 1 + r.below(65535 - ip_len)
                };
                set16(&mut f, ip0 + 2, total as u16);
            }
            // A version other than 4.
            (true, 3) => f[ip0] = (r.pick(&[0u8, 1, 5, 6, 15]) << 4) | 5,
            (false, 0 | 1) => set16(&mut f, ip0 + 4, (ip_len - 40 + 1 + r.below(2000)) as u16),
            (false, 2 | 3) => f[ip0] = (r.pick(&[0u8, 4, 5, 7, 15]) << 4) | (f[ip0] & 0xf),
            // The transport header cut by the IP length, or its own length fields wrong.
            (v4, _) => {
                if kind.tcp() && r.chance(50) {
                    // Below 5 words, or beyond the segment where 4 bits can say so.
                    let beyond = (f.len() - l4) / 4 + 1;
                    let off = if beyond > 15 || r.chance(50) {
                        r.below(5)
                    } else {
                        beyond + r.below(16 - beyond)
                    };
                    f[l4 + 12] = (off as u8) << 4 | (f[l4 + 12] & 0xf);
                } else if kind.udp() && r.chance(50) {
                    let len = if r.chance(50) {
                        r.below(8)
                    } else {
                        f.len() - l4 + 1 + r.below(100)
                    };
                    set16(&mut f, l4 + 4, len as u16);
                } else if kind.tcp() || kind.udp() {
                    let cut = l4 - ip0 + r.below(if kind.tcp() { 20 } else { 8 });
                    if v4 {
                        set16(&mut f, ip0 + 2, cut as u16);
                    } else {
                        set16(&mut f, ip0 + 4, (cut - 40) as u16);
                    }
                } else {
                    f[ip0] = 0x40 | r.below(5) as u8;
                    if !v4 {
                        set16(&mut f, ip0 + 4, (ip_len - 40 + 1) as u16);
                    }
                }
            }
        }
        self.finish(&mut f, r, true, true);
        f
    }

    fn ipv4_options(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, Kind::v4);
        self.vary(&mut f, kind, r);
        let opts = Gen::option_bytes(r);
        let words = opts.len() / 4;
        f.splice(ip0 + 20..ip0 + 20, opts);
        f[ip0] = 0x40 | (5 + words) as u8;
        let total = u16::from_be_bytes([f[ip0 + 2], f[ip0 + 3]]) + (words * 4) as u16;
        f[ip0 + 2..ip0 + 4].copy_from_slice(&total.to_be_bytes());
        self.finish(&mut f, r, true, true);
        f
    }

    /// 4 to 40 bytes of IPv4 options, well-formed or not.
    fn option_bytes(r: &mut Rng) -> Vec<u8> {
        let words = 1 + r.below(10);
        let len = words * 4;
        let mut o = vec![0u8; len];
        match r.below(7) {
            0 => r.fill(&mut o),
            1 => {
                o.fill(1);
                o[..4].copy_from_slice(&[148, 4, 0, 0]);
            }
            2 | 3 => {
                // Record route, loose or strict source route: addresses after a pointer.
                o[0] = r.pick(&[7u8, 131, 137]);
                o[1] = (len - 1).min(39) as u8;
                o[2] = 4;
                r.fill(&mut o[3..len - 1]);
            }
            4 => {
                o[..4].copy_from_slice(&[68, len as u8, 5, 0]);
            }
            5 => {
                // Option lengths of 0, 1 or beyond the header.
                o.fill(1);
                o[0] = r.pick(&[7u8, 68, 130, 131, 148, 0x99]);
                o[1] = r.pick(&[0u8, 1, 2, len as u8 + 1, 255]);
            }
            _ => o.fill(1),
        }
        o
    }

    fn fragment(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, Kind::v4);
        self.vary(&mut f, kind, r);
        let mf = r.chance(60);
        let offset = if mf && r.chance(50) {
            0
        } else {
            1 + r.below(0x1fff) as u16
        };
        let df = if r.chance(20) { 0x4000 } else { 0 };
        let field = offset | df | if mf { 0x2000 } else { 0 };
        f[ip0 + 6..ip0 + 8].copy_from_slice(&field.to_be_bytes());
        self.finish(&mut f, r, true, true);
        f
    }

    /// The fragments of one IPv4 datagram (a template, maybe enlarged to a few KiB), in
    /// order or not, with now and then a duplicate, an overlap, a hole, options in the
    /// first fragment or an impossible fragment.
    fn fragment_train(&self, r: &mut Rng) -> Vec<Vec<u8>> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, Kind::v4);
        self.vary(&mut f, kind, r);
        if kind != Kind::Dhcp && r.chance(50) {
            let extra = r.below(9000);
            let fill = r.byte();
            f.resize(f.len() + extra, fill);
            let total = (f.len() - ip0) as u16;
            f[ip0 + 2..ip0 + 4].copy_from_slice(&total.to_be_bytes());
            if kind.udp() {
                let l4 = self.l4(&f, kind);
                let len = (f.len() - l4) as u16;
                f[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
            }
        }
        if kind == Kind::Dhcp {
            fix_checksums(&mut f, self.vnet);
        } else {
            self.finish(&mut f, r, true, true);
        }
        fragment(&f, self.vnet, r, |r, pieces| {
            let n = pieces.len();
            if r.chance(30) {
                for i in (1..n).rev() {
                    pieces.swap(i, r.below(i + 1));
                }
            }
            if r.chance(20) {
                let dup = pieces[r.below(n)].clone();
                pieces.insert(r.below(n + 1), dup);
            }
            if r.chance(20) {
                // An overlap, other bytes: later bytes win.
                let mut o = pieces[r.below(n)].clone();
                r.fill(&mut o.data);
                o.more = true;
                pieces.insert(r.below(n + 1), o);
            }
            if r.chance(10) {
                pieces.remove(r.below(pieces.len()));
            }
            if r.chance(10) {
                // Impossible: a non-final fragment of odd length, or beyond 64 KiB.
                let i = r.below(pieces.len());
                if r.chance(50) {
                    pieces[i].more = true;
                    let keep = pieces[i].data.len().saturating_sub(1).max(1);
                    pieces[i].data.truncate(keep);
                } else {
                    pieces[i].offset = 65528 - r.below(8) * 8;
                }
            }
            if r.chance(10) {
                pieces.retain(|p| p.offset != 0 || p.options.is_empty());
                if let Some(p) = pieces.iter_mut().find(|p| p.offset == 0) {
                    p.options = Gen::option_bytes(r);
                }
            }
        })
    }

    fn oversized(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, |k| {
            matches!(
                k,
                Kind::Udp4 | Kind::Tcp4 | Kind::Icmp4 | Kind::Udp6 | Kind::Icmp6
            )
        });
        self.vary(&mut f, kind, r);
        let room = MAX_FRAME - ip0;
        let ip_len = if r.chance(30) {
            r.pick(&[1501, 1518, 2000, 9001, 16385, 65535])
        } else {
            1501 + r.below(64035)
        }
        .min(if kind.v4() { 65535 } else { room });
        let fill = if r.chance(50) { 0 } else { r.byte() };
        f.resize(ip0 + ip_len, fill);
        if kind.v4() {
            f[ip0 + 2..ip0 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        } else {
            f[ip0 + 4..ip0 + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
        }
        if kind.udp() {
            let l4 = self.l4(&f, kind);
            let udp_len = (f.len() - l4).min(65535) as u16;
            f[l4 + 4..l4 + 6].copy_from_slice(&udp_len.to_be_bytes());
        }
        self.finish(&mut f, r, true, true);
        if r.chance(30) {
            // Trailing bytes after the IP packet, up to the largest frame.
            let more = r.below(MAX_FRAME - f.len() + 1);
            f.resize(f.len() + more, 0xee);
        }
        f
    }

    /// Overwrites the vnet header with nonsense: any GSO type, header lengths and
    /// checksum positions beyond the frame, any flags.
    fn bogus_vnet(&self, f: &mut [u8], r: &mut Rng) {
        let len = f.len() as u16;
        f[0] = r.pick_or_byte(&[0u8, 1, 2, 3, 4, 0x80, 0xff]);
        f[1] = r.pick_or_byte(&[0u8, 1, 3, 4, 5, 0x81, 0x84, 0xff]);
        let fields: [u16; 4] = [
            r.pick_or_u16(&[0, 1, 54, len, len.wrapping_add(1), 0xffff]),
            r.pick_or_u16(&[0, 1, 536, 1448, 0xffff]),
            r.pick_or_u16(&[0, 14, 34, 54, len, len.wrapping_add(100), 0xffff]),
            r.pick_or_u16(&[0, 6, 16, len, 0xfffe, 0xffff]),
        ];
        for (i, v) in fields.iter().enumerate() {
            f[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn arp_spoof(&self, r: &mut Rng) -> Vec<u8> {
        let sender = if r.chance(50) { GW } else { DNS };
        let target = [10, 0, 2, r.byte()];
        let op = r.pick_or_u16(&[1u16, 2, 2, 1]);
        let dst = if r.chance(50) { [0xff; 6] } else { GW_MAC };
        let mut eth = arp_frame(op, sender, target, dst);
        if r.chance(30) {
            // The sender hardware address: ours, or random.
            let sha = if r.chance(50) {
                GW_MAC
            } else {
                [2, 9, 9, 9, 9, 9]
            };
            eth[22..28].copy_from_slice(&sha);
        }
        if r.chance(50) {
            eth.resize(60, 0);
        }
        let mut f = vec![0u8; self.vnet];
        f.extend_from_slice(&eth);
        f
    }

    fn ndp_spoof(&self, r: &mut Rng) -> Vec<u8> {
        let ty = r.pick(&[135u8, 136, 136, 134, 137, 133]);
        let src = r.pick(&[GUEST6, GUEST_LL, GW6, ROUTER_LL, [0; 16]]);
        let dst = r.pick(&[
            [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2],
            GW6,
            ROUTER_LL,
        ]);
        let mut dns6 = GW6;
        dns6[15] = 3;
        let target = r.pick(&[GW6, dns6, ROUTER_LL, GUEST6]);
        let mut m = vec![ty, if r.chance(90) { 0 } else { r.byte() }, 0, 0];
        // Flags: router, solicited, override.
        m.extend_from_slice(&[r.pick(&[0xe0u8, 0x20, 0x40, 0]), 0, 0, 0]);
        if ty != 133 {
            m.extend_from_slice(&target);
        }
        if ty == 137 {
            m.extend_from_slice(&GUEST6);
        }
        for _ in 0..r.below(4) {
            let opt_ty = r.pick_or_byte(&[1u8, 2, 3, 4, 5, 25]);
            let units = r.pick(&[0u8, 1, 1, 2, 4, 255]);
            m.push(opt_ty);
            m.push(units);
            let body = (usize::from(units) * 8).saturating_sub(2).min(64);
            let mut b = vec![0u8; body];
            if opt_ty <= 2 && body >= 6 {
                b[..6].copy_from_slice(if r.chance(50) { &GW_MAC } else { &GUEST_MAC });
            } else {
                r.fill(&mut b);
            }
            m.extend_from_slice(&b);
        }
        let eth_dst = if dst[0] == 0xff {
            [0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]
        } else {
            GW_MAC
        };
        let mut f = vec![0u8; self.vnet];
        f.extend_from_slice(&icmp6_frame(src, dst, eth_dst, &m));
        self.finish(&mut f, r, true, true);
        f
    }

    /// A TCP segment with `flags` (the 9 flag bits, NS included), random sequence
    /// space and ports that may be 0.
    fn tcp_flags(&self, r: &mut Rng, flags: u16) -> Vec<u8> {
        let (kind, mut f) = self.pick(r, Kind::tcp);
        self.vary(&mut f, kind, r);
        let l4 = self.l4(&f, kind);
        f[l4 + 12] = (f[l4 + 12] & 0xf0) | (flags >> 8) as u8;
        f[l4 + 13] = flags as u8;
        f[l4 + 18..l4 + 20].copy_from_slice(&r.u16().to_be_bytes());
        if r.chance(5) {
            f[l4..l4 + 2].fill(0);
        }
        if r.chance(5) {
            f[l4 + 2..l4 + 4].fill(0);
        }
        self.finish(&mut f, r, true, true);
        f
    }

    fn zero_ports(&self, r: &mut Rng) -> Vec<u8> {
        let (kind, mut f) = self.pick(r, |k| k.tcp() || k.udp());
        self.vary(&mut f, kind, r);
        let l4 = self.l4(&f, kind);
        match r.below(3) {
            0 => f[l4..l4 + 2].fill(0),
            1 => f[l4 + 2..l4 + 4].fill(0),
            _ => f[l4..l4 + 4].fill(0),
        }
        self.finish(&mut f, r, true, true);
        f
    }

    fn bad_source(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, |k| {
            k.v4() && k != Kind::Dhcp || matches!(k, Kind::Udp6 | Kind::Tcp6 | Kind::Icmp6)
        });
        self.vary(&mut f, kind, r);
        if kind.v4() {
            let src: [u8; 4] = r.pick(&[
                GW,
                DNS,
                [10, 0, 2, 0],
                [10, 0, 2, 255],
                [0, 0, 0, 0],
                [127, 0, 0, 1],
                [192, 168, 1, 5],
                [224, 0, 0, 1],
                [255, 255, 255, 255],
            ]);
            f[ip0 + 12..ip0 + 16].copy_from_slice(&src);
        } else {
            let mut src = r.pick(&[GW6, GUEST_LL, ROUTER_LL, [0; 16], GW6]);
            match r.below(4) {
                0 => src[15] = 3,
                1 => src[15] = 0,
                2 => src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]),
                _ => {}
            }
            f[ip0 + 8..ip0 + 24].copy_from_slice(&src);
        }
        self.finish(&mut f, r, true, true);
        f
    }

    fn ipv6_ext(&self, r: &mut Rng) -> Vec<u8> {
        let ip0 = self.ip0();
        let (kind, mut f) = self.pick(r, |k| matches!(k, Kind::Udp6 | Kind::Tcp6 | Kind::Icmp6));
        self.vary(&mut f, kind, r);
        let next = f[ip0 + 6];
        let ext = r.pick(&[0u8, 0, 43, 44, 60, 59, 50, 51, 135, 139, 140, 253, 255]);
        let mut hdr = [0u8; 8];
        hdr[0] = next;
        if r.chance(30) {
            r.fill(&mut hdr[1..]);
        } else if ext == 0 {
            // Hop-by-hop with a router alert, as MLD sends.
            hdr[2..6].copy_from_slice(&[5, 2, 0, 0]);
            hdr[6] = 1;
        }
        f[ip0 + 6] = ext;
        f.splice(ip0 + 40..ip0 + 40, hdr);
        let len = u16::from_be_bytes([f[ip0 + 4], f[ip0 + 5]]) + 8;
        f[ip0 + 4..ip0 + 6].copy_from_slice(&len.to_be_bytes());
        self.finish(&mut f, r, true, true);
        f
    }

    /// A DHCP message with mutated fixed fields and random options.
    fn dhcp(&self, r: &mut Rng) -> Vec<u8> {
        let msg = dhcp_payload(r);
        let src = if r.chance(80) {
            [0; 4]
        } else {
            [10, 0, 2, r.byte()]
        };
        let dst = if r.chance(80) { [255; 4] } else { GW };
        let mut f = vec![0u8; self.vnet];
        f.extend_from_slice(&dhcp_frame(src, dst, &msg));
        if r.chance(20) {
            // Another unicast source MAC.
            f[self.vnet + 6..self.vnet + 12].copy_from_slice(&[2, 0, 0, 0, r.byte(), r.byte()]);
        }
        // The broadcast or gateway destination stays: the NAT refuses both.
        assert!(reaches_nothing(&self.nat, &f, self.vnet));
        fix_checksums(&mut f, self.vnet);
        f
    }

    fn random(&self, r: &mut Rng) -> Vec<u8> {
        let len = if r.chance(2) {
            r.below(9100)
        } else {
            r.below(1600)
        };
        let mut f = vec![0u8; len];
        r.fill(&mut f);
        let v = self.vnet;
        if r.chance(60) && len >= v + 14 {
            let dst = r.pick(&[
                GW_MAC,
                [0xff; 6],
                [0x33, 0x33, 0, 0, 0, 1],
                [1, 0, 0x5e, 0, 0, 1],
            ]);
            f[v..v + 6].copy_from_slice(&dst);
            let et: u16 = r.pick_or_u16(&[0x0800, 0x0800, 0x86dd, 0x86dd, 0x0806, 0x8100, 0x88cc]);
            f[v + 12..v + 14].copy_from_slice(&et.to_be_bytes());
            if len > v + 14 && r.chance(70) {
                f[v + 14] = if et == 0x86dd {
                    0x60
                } else {
                    0x40 | (5 + r.below(3)) as u8
                };
            }
        }
        let fix = r.chance(50);
        self.finish(&mut f, r, true, fix);
        f
    }
}

/// One fragment to be: where its data goes, the data, whether more follow, and IPv4
/// options to put in its header.
#[derive(Clone)]
struct Piece {
    offset: usize,
    data: Vec<u8>,
    more: bool,
    options: Vec<u8>,
}

/// Cuts the IPv4 datagram in `frame` (vnet and Ethernet headers included) into
/// fragments of a random size, lets `mangle` reorder or spoil them, and builds their
/// frames (header checksums right).
fn fragment(
    frame: &[u8],
    vnet: usize,
    r: &mut Rng,
    mangle: impl FnOnce(&mut Rng, &mut Vec<Piece>),
) -> Vec<Vec<u8>> {
    let ip0 = vnet + 14;
    let hl = usize::from(frame[ip0] & 0xf) * 4;
    let payload = &frame[ip0 + hl..];
    let most = ((payload.len() - 1) / 8 * 8).max(8);
    let per = (8 * (1 + r.below(185))).min(most);
    let mut pieces: Vec<Piece> = payload
        .chunks(per)
        .enumerate()
        .map(|(i, c)| Piece {
            offset: i * per,
            data: c.to_vec(),
            more: (i + 1) * per < payload.len(),
            options: Vec::new(),
        })
        .collect();
    mangle(r, &mut pieces);
    let ident = r.u16();
    pieces
        .iter()
        .map(|p| {
            let mut f = frame[..ip0 + 20].to_vec();
            f.extend_from_slice(&p.options);
            f.extend_from_slice(&p.data);
            let hl = 20 + p.options.len();
            f[ip0] = 0x40 | (hl / 4) as u8;
            f[ip0 + 2..ip0 + 4].copy_from_slice(&((hl + p.data.len()) as u16).to_be_bytes());
            f[ip0 + 4..ip0 + 6].copy_from_slice(&ident.to_be_bytes());
            let field = (p.offset / 8) as u16 | if p.more { 0x2000 } else { 0 };
            f[ip0 + 6..ip0 + 8].copy_from_slice(&field.to_be_bytes());
            fix_checksums(&mut f, vnet);
            f
        })
        .collect()
}

/// A BOOTP message: fixed fields mostly sane, options anything.
fn dhcp_payload(r: &mut Rng) -> Vec<u8> {
    let mut d = vec![0u8; 236];
    d[0] = r.pick_or_byte(&[1u8, 1, 1, 2]);
    d[1] = r.pick_or_byte(&[1u8, 1, 6]);
    d[2] = r.pick(&[6u8, 6, 0, 16, 17, 255]);
    d[3] = r.pick(&[0u8, 0, 1, 255]);
    r.fill(&mut d[4..12]);
    if r.chance(70) {
        d[12..16].fill(0);
    } else {
        d[12..16].copy_from_slice(&[10, 0, 2, r.pick_or_byte(&[15u8, 16, 30, 100])]);
    }
    if r.chance(10) {
        r.fill(&mut d[16..28]);
    }
    if r.chance(5) {
        // A relay address: relayed messages are not ours.
        d[24..28].copy_from_slice(&[192, 0, 2, 1]);
    }
    d[28..34].copy_from_slice(&GUEST_MAC);
    if r.chance(20) {
        r.fill(&mut d[28..44]);
    }
    if r.chance(10) {
        r.fill(&mut d[44..236]);
    }
    d.extend_from_slice(if r.chance(95) {
        &[99, 130, 83, 99]
    } else {
        &[99, 130, 83, 98]
    });
    let msg_type = r.pick_or_byte(&[1u8, 1, 3, 3, 4, 7, 8, 2, 5, 6, 0, 9]);
    if r.chance(95) {
        d.extend_from_slice(&[53, 1, msg_type]);
    }
    for _ in 0..r.below(8) {
        match r.below(12) {
            0 => {
                d.extend_from_slice(&[50, 4, 10, 0, 2, r.pick_or_byte(&[15u8, 16, 20, 31, 2, 255])])
            }
            1 => d.extend_from_slice(&[54, 4, 10, 0, 2, r.pick_or_byte(&[2u8, 3])]),
            2 => {
                let n = r.below(256);
                d.extend_from_slice(&[55, n as u8]);
                d.extend((0..n).map(|_| r.byte()));
            }
            3 => {
                let n = r.below(256);
                d.extend_from_slice(&[61, n as u8]);
                d.extend((0..n).map(|_| r.byte()));
            }
            4 => d.extend_from_slice(&[52, 1, r.pick(&[1u8, 2, 3, 0, 255])]),
            5 => d.extend_from_slice(&[57, 2, r.byte(), r.byte()]),
            6 => d.extend_from_slice(&[51, 4, r.byte(), r.byte(), r.byte(), r.byte()]),
            7 => d.extend_from_slice(&[53, r.pick(&[0u8, 1, 2, 255]), r.byte()]),
            8 => d.extend(std::iter::repeat_n(0u8, r.below(20))),
            9 => {
                // Any option with a length that may run past the end.
                d.extend_from_slice(&[r.byte(), r.byte()]);
                for _ in 0..r.below(40) {
                    d.push(r.byte());
                }
            }
            10 => d.push(255),
            _ => {
                let n = r.below(64);
                d.extend_from_slice(&[12, n as u8]);
                d.extend((0..n).map(|_| b'a' + r.below(26) as u8));
            }
        }
    }
    if r.chance(80) {
        d.push(255);
    }
    if r.chance(10) {
        d.truncate(r.below(d.len() + 1));
    }
    d
}

/// Counters that say what became of a guest frame (the traffic totals aside).
fn verdict_counter(name: &str) -> bool {
    !matches!(
        name,
        "rx_frames" | "rx_bytes" | "tx_frames" | "tx_bytes" | "tx_errors"
    )
}

/// The verdict counters that moved from `before` to `after`, and by how much.
fn moved(before: &Counters, after: &Counters) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after.iter())
        .filter(|((name, a), (_, b))| a != b && verdict_counter(name))
        .map(|((name, a), (_, b))| (name, b - a))
        .collect()
}

/// Feeds one frame; returns the counters it moved and whether anything was queued for
/// the guest in answer.
fn verdict(s: &mut Sealed, frame: &[u8]) -> (Vec<(&'static str, u64)>, bool) {
    s.fwd.flush(&mut s.sink);
    let before = s.fwd.counters().clone();
    s.feed(frame);
    let answered = s.fwd.has_pending_tx();
    s.fwd.flush(&mut s.sink);
    (moved(&before, s.fwd.counters()), answered)
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts that nothing reached the host and every table is within its limits.
fn assert_sealed(s: &Sealed) {
    let c = s.fwd.counters();
    assert_eq!(
        (c.tcp_opened, c.udp_opened, c.icmp_opened),
        (0, 0, 0),
        "a host socket was opened"
    );
    let l = s.fwd.limits();
    let (tcp, udp, icmp) = s.fwd.flow_counts();
    assert!(tcp <= l.tcp_flows && udp <= l.udp_flows && icmp <= l.icmp_flows);
    assert_eq!((tcp, udp, icmp), (0, 0, 0));
    assert!(s.fwd.half_open() <= l.tcp_half_open);
    assert_eq!(s.fwd.half_open(), 0);
    assert!(
        s.fwd.timer_entries() < 16,
        "timers: {}",
        s.fwd.timer_entries()
    );
    assert_eq!(
        s.sink.bad,
        0,
        "malformed frame sent to the guest: {}",
        hex(s.sink.first_bad.as_deref().unwrap_or_default())
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            }
        })
        .unwrap_or(default)
}

/// Per-class outcome of a run: frames, and how often each counter moved.
#[derive(Default)]
struct Tally {
    frames: u64,
    uncounted: u64,
    counters: BTreeMap<&'static str, u64>,
}

/// Counters a frame of `class` may move: exactly one of a set for most classes; for
/// fragments, the fragment counter and maybe a drop, or anything once a datagram is
/// reassembled. `None`: any verdict.
fn expected(class: Class) -> Option<&'static [&'static str]> {
    Some(match class {
        Class::Truncated => &[
            "drop_truncated",
            "drop_ipv4_malformed",
            "drop_ipv6_malformed",
            "drop_arp_malformed",
        ],
        Class::BadChecksum => &[
            "drop_ipv4_malformed",
            "drop_bad_checksum",
            "drop_udp_malformed",
            "drop_icmp_malformed",
        ],
        Class::BadLength => &[
            "drop_ipv4_malformed",
            "drop_ipv6_malformed",
            "drop_tcp_malformed",
            "drop_udp_malformed",
            "drop_icmp_malformed",
        ],
        Class::ArpSpoof => &["drop_arp_spoof"],
        Class::BadSource => &["drop_bad_source"],
        Class::Ipv6Ext => &["drop_ipv6_ext"],
        Class::Dhcp => &["dhcp_replies", "dhcp_drops"],
        _ => return None,
    })
}

/// Whether the counters `m` a frame of `class` moved are a verdict it may get.
fn verdict_ok(class: Class, m: &[(&str, u64)]) -> bool {
    let has = |name: &str| m.iter().any(|(n, _)| *n == name);
    if class == Class::Fragment {
        // Options in a fragment's header are stripped and counted on the side.
        let m: Vec<_> = m
            .iter()
            .filter(|(n, _)| *n != "ipv4_options_stripped")
            .collect();
        return has("ipv4_reassembled")
            || m == [&("drop_ipv4_malformed", 1)]
            || has("ipv4_fragments")
                && m.iter().all(|&&(n, v)| {
                    v == 1 && matches!(n, "ipv4_fragments" | "drop_ipv4_fragment")
                });
    }
    match expected(class) {
        Some(set) => m.len() == 1 && m[0].1 == 1 && set.contains(&m[0].0),
        None => true,
    }
}

/// What the watchdog can report about a hang: the frame being fed.
struct Current {
    class: Class,
    index: u64,
    frame: Vec<u8>,
}

/// Feeds the sweeps and `frames` random frames through one forwarder; returns the
/// per-class tallies and the forwarder's final state.
fn run(
    vnet: usize,
    seed: u64,
    frames: u64,
    current: &Mutex<Current>,
) -> (BTreeMap<Class, Tally>, Sealed, u64) {
    let gen = Gen::new(vnet);
    let mut s = Sealed::new(vnet);
    let mut tallies: BTreeMap<Class, Tally> = BTreeMap::new();
    let mut fed = 0u64;
    let mut since_turn = 0u64;
    let mut violations = Vec::new();
    let mut one = |s: &mut Sealed, class: Class, index: u64, frame: &[u8]| {
        {
            let mut cur = current.lock().unwrap();
            cur.class = class;
            cur.index = index;
            cur.frame.clear();
            cur.frame.extend_from_slice(frame);
        }
        let before = s.fwd.counters().clone();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| s.feed(frame))) {
            eprintln!(
                "PANIC: vnet {vnet} seed {seed:#x} class {class:?} index {index} frame {}",
                hex(frame)
            );
            resume_unwind(p);
        }
        let m = moved(&before, s.fwd.counters());
        let t = tallies.entry(class).or_default();
        t.frames += 1;
        if m.is_empty() {
            t.uncounted += 1;
        }
        for (name, _) in &m {
            *t.counters.entry(name).or_default() += 1;
        }
        if !verdict_ok(class, &m) && violations.len() < 5 {
            violations.push(format!("{class:?} #{index}: {m:?} {}", hex(frame)));
        }
        fed += 1;
        since_turn += 1;
        if since_turn == BATCH {
            since_turn = 0;
            s.turn();
        }
    };

    // Sweep: every truncation of every template; every TCP flag combination.
    let mut r = Rng::new(seed ^ 0x5eed);
    for (t, tpl) in gen.templates.iter().enumerate() {
        let mut f = tpl.frame.clone();
        gen.finish(&mut f, &mut r, true, true);
        for cut in 0..f.len() {
            one(&mut s, Class::Truncated, (t << 16 | cut) as u64, &f[..cut]);
        }
    }
    for flags in 0..0x200u16 {
        let f = gen.tcp_flags(&mut r, flags);
        one(&mut s, Class::TcpFlags, u64::from(flags), &f);
    }
    // Random frames.
    for i in 0..frames {
        let (class, train) = gen.frames(seed, i);
        for f in &train {
            one(&mut s, class, i, f);
        }
    }
    s.turn();
    assert!(violations.is_empty(), "inexact verdicts: {violations:#?}");
    (tallies, s, fed)
}

/// Runs [`run`] on a thread under a watchdog: a hang is reported with the frame that
/// was being fed.
fn run_watched(vnet: usize) {
    let seed = env_u64("HOSTILE_SEED", SEED);
    let frames = env_u64("HOSTILE_FRAMES", FRAMES);
    println!("hostile: vnet {vnet}, seed {seed:#x}, {frames} random frames");
    let current = Arc::new(Mutex::new(Current {
        class: Class::Valid,
        index: 0,
        frame: Vec::with_capacity(MAX_FRAME),
    }));
    let (tx, rx) = mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let worker = {
        let current = Arc::clone(&current);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let out = run(vnet, seed, frames, &current);
            done.store(true, Ordering::SeqCst);
            let _ = tx.send(start.elapsed());
            out
        })
    };
    let elapsed = match rx.recv_timeout(HANG) {
        Ok(elapsed) => elapsed,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: its message and the frame are printed already.
            let err = worker.join().err().unwrap();
            resume_unwind(err);
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let cur = current.lock().unwrap();
            panic!(
                "HANG: vnet {vnet} seed {seed:#x} class {:?} index {} frame {}",
                cur.class,
                cur.index,
                hex(&cur.frame)
            );
        }
    };
    assert!(done.load(Ordering::SeqCst));
    let (tallies, s, fed) = worker.join().unwrap();
    let c = s.fwd.counters();
    println!(
        "hostile: vnet {vnet}: {fed} frames in {:.1} s, {} frames answered",
        elapsed.as_secs_f64(),
        s.sink.frames
    );
    for (class, t) in &tallies {
        println!(
            "  {class:?}: {} frames, {} moved no counter, {:?}",
            t.frames, t.uncounted, t.counters
        );
    }
    let nonzero: Vec<_> = c.iter().filter(|(_, v)| *v > 0).collect();
    println!("  counters: {nonzero:?}");

    assert_eq!(c.rx_frames, fed);
    assert!(fed >= 1_000_000 || frames < FRAMES);
    assert_sealed(&s);
    let mut targeted = vec![
        "drop_truncated",
        "drop_not_for_us",
        "drop_ethertype",
        "drop_arp_malformed",
        "drop_arp_spoof",
        "drop_ipv4_malformed",
        "drop_ipv4_fragment",
        "drop_ipv6_malformed",
        "drop_ipv6_ext",
        "drop_bad_source",
        "drop_protocol",
        "drop_tcp_malformed",
        "drop_bad_checksum",
        "drop_udp_malformed",
        "drop_icmp_malformed",
        "tcp_denied",
        "tcp_stray_segments",
        "udp_denied",
        "icmp_denied",
        "icmp_echo_local",
        "icmp_ignored",
        "ndp_adverts",
        "ndp_router_adverts",
        "dhcp_replies",
        "dhcp_drops",
    ];
    if frames < 10_000 {
        targeted.truncate(4);
    }
    for name in targeted {
        let v = c.iter().find(|(n, _)| *n == name).unwrap().1;
        assert!(v > 0, "{name} never moved");
    }
}

#[test]
fn million_hostile_frames_no_vnet_header() {
    run_watched(0);
}

#[test]
fn million_hostile_frames_vnet_header() {
    run_watched(10);
}

// One test per hostile class, exact verdicts.

/// A template of `kind`, with its checksums right.
fn template(vnet: usize, kind: Kind, nth: usize) -> Vec<u8> {
    templates(vnet)
        .into_iter()
        .filter(|t| t.kind == kind)
        .nth(nth)
        .unwrap()
        .frame
}

fn set_dst4(f: &mut [u8], vnet: usize, dst: [u8; 4]) {
    f[vnet + 30..vnet + 34].copy_from_slice(&dst);
    fix_checksums(f, vnet);
}

#[test]
fn every_truncation_dropped_and_counted_once() {
    let allowed = expected(Class::Truncated).unwrap();
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for t in templates(vnet) {
            for cut in 0..t.frame.len() {
                let (m, answered) = verdict(&mut s, &t.frame[..cut]);
                assert!(
                    m.len() == 1 && m[0].1 == 1 && allowed.contains(&m[0].0) && !answered,
                    "{:?} cut at {cut}: {m:?}, answered {answered}",
                    t.kind
                );
            }
        }
        assert_sealed(&s);
    }
}

/// A fragment as the guest would send it: `template` cut at `offset` (bytes of IP
/// payload), `len` bytes, more to follow or not.
fn one_fragment(
    vnet: usize,
    kind: Kind,
    offset: usize,
    len: usize,
    more: bool,
    id: u16,
) -> Vec<u8> {
    let whole = template(vnet, kind, 0);
    let ip0 = vnet + 14;
    let mut f = whole[..ip0 + 20].to_vec();
    let data = &whole[ip0 + 20..];
    let avail = &data[offset.min(data.len())..];
    f.extend_from_slice(&avail[..len.min(avail.len())]);
    f.resize(ip0 + 20 + len, 0x77);
    f[ip0 + 2..ip0 + 4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
    f[ip0 + 4..ip0 + 6].copy_from_slice(&id.to_be_bytes());
    let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    f[ip0 + 6..ip0 + 8].copy_from_slice(&field.to_be_bytes());
    fix_checksums(&mut f, vnet);
    f
}

#[test]
fn lone_fragments_held_counted_nothing_sent() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let mut id = 0;
        for kind in [Kind::Udp4, Kind::Tcp4, Kind::Icmp4, Kind::Dhcp] {
            // First, middle and last fragments of datagrams that never complete.
            for (offset, more) in [(0, true), (8, true), (16, false), (1480, false)] {
                id += 1;
                let f = one_fragment(vnet, kind, offset, 8, more, id);
                let (m, answered) = verdict(&mut s, &f);
                assert_eq!(m, [("ipv4_fragments", 1)], "{kind:?} at {offset}");
                assert!(!answered);
            }
        }
        assert_sealed(&s);
    }
}

#[test]
fn impossible_fragments_dropped_counted_nothing_sent() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        // A non-final fragment whose length is not a multiple of 8; one ending beyond
        // 64 KiB; an empty one.
        for (offset, len, more) in [
            (0, 12, true),
            (8, 9, true),
            (65528, 8, false),
            (65512, 16, true),
            (64, 0, true),
        ] {
            let f = one_fragment(vnet, Kind::Udp4, offset, len, more, 7);
            let (m, answered) = verdict(&mut s, &f);
            assert_eq!(
                m,
                [("drop_ipv4_fragment", 1), ("ipv4_fragments", 1)],
                "{offset} {len} {more}"
            );
            assert!(!answered);
        }
        assert_sealed(&s);
    }
}

/// A datagram sent in fragments (any size, any order, duplicates) gets the verdict the
/// whole datagram gets.
#[test]
fn fragments_reassembled_like_the_whole_datagram() {
    for vnet in [0, 10] {
        let gen = Gen::new(vnet);
        let mut r = Rng::new(21);
        for kind in [Kind::Udp4, Kind::Dns4, Kind::Tcp4, Kind::Icmp4, Kind::Dhcp] {
            for _ in 0..50 {
                let mut whole = template(vnet, kind, 0);
                gen.vary(&mut whole, kind, &mut r);
                fix_checksums(&mut whole, vnet);
                let mut a = Sealed::new(vnet);
                let expect = verdict(&mut a, &whole);
                let train = fragment(&whole, vnet, &mut r, |r, pieces| {
                    for i in (1..pieces.len()).rev() {
                        pieces.swap(i, r.below(i + 1));
                    }
                    let dup = pieces[0].clone();
                    pieces.insert(r.below(pieces.len()), dup);
                });
                let mut b = Sealed::new(vnet);
                let before = b.fwd.counters().clone();
                let mut answered = false;
                for f in &train {
                    answered |= verdict(&mut b, f).1;
                }
                let m: Vec<_> = moved(&before, b.fwd.counters())
                    .into_iter()
                    .filter(|(n, _)| !matches!(*n, "ipv4_fragments" | "ipv4_reassembled"))
                    .collect();
                assert_eq!((m, answered), expect, "{kind:?}");
                assert_eq!(b.fwd.counters().ipv4_fragments, train.len() as u64);
                assert_eq!(b.fwd.counters().ipv4_reassembled, 1, "{kind:?}");
                assert_sealed(&b);
            }
        }
    }
}

/// A fragment whose IPv4 header is broken must be dropped as a whole packet with that
/// header would be, not reassembled (the reassembled header gets a fresh checksum).
#[test]
fn fragments_with_broken_headers_dropped() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let ip0 = vnet + 14;
        let mut first = one_fragment(vnet, Kind::Udp4, 0, 16, true, 5);
        first[ip0 + 10] ^= 0x5a;
        let last = one_fragment(vnet, Kind::Udp4, 16, 16, false, 5);
        assert_eq!(verdict(&mut s, &first).0, [("drop_ipv4_malformed", 1)]);
        verdict(&mut s, &last);
        assert_eq!(s.fwd.counters().ipv4_reassembled, 0);
        let mut bad_version = one_fragment(vnet, Kind::Udp4, 16, 16, false, 6);
        bad_version[ip0] = 0x65;
        fix_checksums(&mut bad_version, vnet);
        assert_eq!(
            verdict(&mut s, &bad_version).0,
            [("drop_ipv4_malformed", 1)]
        );
    }
}

#[test]
fn bad_checksums_dropped_counted_nothing_sent() {
    // (template, byte offset from the Ethernet header, counter).
    let cases = [
        (Kind::Udp4, 14 + 10, "drop_ipv4_malformed"),
        (Kind::Tcp4, 14 + 11, "drop_ipv4_malformed"),
        (Kind::Tcp4, 34 + 16, "drop_bad_checksum"),
        (Kind::Udp4, 34 + 6, "drop_udp_malformed"),
        (Kind::Icmp4, 34 + 2, "drop_icmp_malformed"),
        (Kind::Tcp6, 54 + 17, "drop_bad_checksum"),
        (Kind::Udp6, 54 + 6, "drop_udp_malformed"),
        (Kind::Icmp6, 54 + 2, "drop_icmp_malformed"),
        (Kind::Ndp, 54 + 3, "drop_icmp_malformed"),
    ];
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for (kind, at, counter) in cases {
            let at = vnet + at;
            let mut f = template(vnet, kind, 0);
            f[at] ^= 0x5a;
            let (m, answered) = verdict(&mut s, &f);
            assert_eq!(m, [(counter, 1)], "{kind:?} byte {at}");
            assert!(!answered);
        }
        assert_sealed(&s);
    }
}

#[test]
fn bad_ipv4_header_lengths_dropped_counted_nothing_sent() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let ip0 = vnet + 14;
        let good = template(vnet, Kind::Udp4, 0);
        let total = good.len() - ip0;
        let mut cases: Vec<(u8, usize)> = (0..5).map(|ihl| (0x40 | ihl, total)).collect();
        // IHL beyond the total length, and beyond the frame.
        cases.extend([(0x4f, 40), (0x4f, total), (0x46, 21)]);
        // Total length below the header and beyond the frame.
        cases.extend([(0x45, 0), (0x45, 19), (0x45, total + 1), (0x45, 65535)]);
        for (ver_ihl, total_len) in cases {
            let mut f = good.clone();
            f[ip0] = ver_ihl;
            f[ip0 + 2..ip0 + 4].copy_from_slice(&(total_len as u16).to_be_bytes());
            fix_checksums(&mut f, vnet);
            let (m, answered) = verdict(&mut s, &f);
            assert_eq!(
                m,
                [("drop_ipv4_malformed", 1)],
                "{ver_ihl:#x} total {total_len}"
            );
            assert!(!answered);
        }
        assert_sealed(&s);
    }
}

/// IPv4 options are stripped and counted: a packet with options otherwise gets the verdict
/// and the answer the same packet without them gets.
#[test]
fn ipv4_options_do_not_change_the_verdict() {
    let mut r = Rng::new(3);
    for kind in [Kind::Udp4, Kind::Tcp4, Kind::Icmp4] {
        for _ in 0..50 {
            let plain = template(0, kind, 0);
            let opts = Gen::option_bytes(&mut r);
            let words = opts.len() / 4;
            let mut f = plain.clone();
            f.splice(34..34, opts);
            f[14] = 0x40 | (5 + words) as u8;
            let total = (f.len() - 14) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            fix_checksums(&mut f, 0);
            let mut a = Sealed::new(0);
            let mut b = Sealed::new(0);
            let expect = verdict(&mut a, &plain);
            let (mut moved, answered) = verdict(&mut b, &f);
            // Options are stripped (and counted), the packet otherwise handled alike.
            assert!(moved.contains(&("ipv4_options_stripped", 1)), "{moved:?}");
            moved.retain(|(name, _)| *name != "ipv4_options_stripped");
            let got = (moved, answered);
            assert_eq!(
                got,
                expect,
                "{kind:?} with options {}",
                hex(&f[34..34 + words * 4])
            );
            assert_sealed(&b);
        }
    }
}

#[test]
fn oversized_frames_handled_and_answers_fit_the_mtu() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let ip0 = vnet + 14;
        // A 65535-byte UDP datagram to a refused destination, then padded to 65560.
        let mut f = template(vnet, Kind::Udp4, 0);
        f.resize(ip0 + 65535, 0x11);
        f[ip0 + 2..ip0 + 4].copy_from_slice(&65535u16.to_be_bytes());
        f[ip0 + 24..ip0 + 26].copy_from_slice(&(65535u16 - 20).to_be_bytes());
        fix_checksums(&mut f, vnet);
        let (m, answered) = verdict(&mut s, &f);
        assert_eq!(m, [("udp_denied", 1)]);
        assert!(answered, "port unreachable");
        f.resize(MAX_FRAME, 0xee);
        let (m, _) = verdict(&mut s, &f);
        assert_eq!(m, [("udp_denied", 1)], "trailing bytes are padding");
        // The IP length claims more than the frame holds.
        let mut g = template(vnet, Kind::Udp4, 0);
        g[ip0 + 2..ip0 + 4].copy_from_slice(&65535u16.to_be_bytes());
        fix_checksums(&mut g, vnet);
        assert_eq!(verdict(&mut s, &g).0, [("drop_ipv4_malformed", 1)]);
        // A jumbo TCP SYN to a refused destination: a RST, no more.
        let mut t = template(vnet, Kind::Tcp4, 0);
        set_dst4(&mut t, vnet, [10, 0, 2, 99]);
        t.resize(ip0 + 60000, 0x22);
        t[ip0 + 2..ip0 + 4].copy_from_slice(&60000u16.to_be_bytes());
        fix_checksums(&mut t, vnet);
        let (m, answered) = verdict(&mut s, &t);
        assert_eq!(m, [("tcp_denied", 1)]);
        assert!(answered, "RST");
        // Every answer fits the MTU (`Discard` checks).
        assert_sealed(&s);
    }
}

/// Whether the vnet header of the IPv4 frame `f` asks for a checksum at offsets a
/// kernel's tun would refuse (`NEEDS_CSUM`, the sum starting inside the Ethernet header
/// or the field beyond the IP packet): such frames are dropped and counted.
fn refused_csum_offsets(f: &[u8], vnet: usize) -> bool {
    let le = |i: usize| usize::from(u16::from_le_bytes([f[i], f[i + 1]]));
    let total = usize::from(u16::from_be_bytes([f[vnet + 16], f[vnet + 17]]));
    let ip_end = 14 + total.min(f.len() - vnet - 14);
    f[0] & 1 != 0 && (le(6) < 14 || le(6) + le(8) + 2 > ip_end)
}

#[test]
fn bogus_vnet_headers_change_nothing_and_answers_stay_sane() {
    let vnet = 10;
    let gen = Gen::new(vnet);
    let mut r = Rng::new(5);
    let mut s = Sealed::new(vnet);
    // A header shorter than a vnet header.
    for cut in 0..10 {
        let f = template(vnet, Kind::Tcp4, 0);
        assert_eq!(verdict(&mut s, &f[..cut]).0, [("drop_truncated", 1)]);
    }
    let mut refusals = 0;
    for _ in 0..2000 {
        // A SYN to a refused destination: denied and reset whatever the vnet header
        // says, the RST with a vnet header of our own; unless the header asks for a
        // checksum at offsets a kernel would refuse: dropped and counted.
        let mut f = template(vnet, Kind::Tcp4, 0);
        gen.bogus_vnet(&mut f, &mut r);
        let flags = f[0];
        let refused = refused_csum_offsets(&f, vnet);
        refusals += u32::from(refused);
        let (m, answered) = verdict(&mut s, &f);
        let expect = if refused {
            "drop_csum_offsets"
        } else {
            "tcp_denied"
        };
        assert_eq!(m, [(expect, 1)], "vnet {}", hex(&f[..10]));
        assert_eq!(answered, !refused);
        // A fragment stays a fragment.
        let mut g = one_fragment(vnet, Kind::Udp4, 8, 8, true, r.u16());
        g[..10].copy_from_slice(&f[..10]);
        let expect = if refused_csum_offsets(&g, vnet) {
            "drop_csum_offsets"
        } else {
            "ipv4_fragments"
        };
        assert_eq!(
            verdict(&mut s, &g).0,
            [(expect, 1)],
            "vnet {}",
            hex(&g[..10])
        );
        // A bad TCP checksum is dropped unless the header says the kernel left or
        // checked it (NEEDS_CSUM, DATA_VALID).
        let mut h = f.clone();
        h[vnet + 34 + 16] ^= 0x5a;
        let expect = if refused {
            "drop_csum_offsets"
        } else if flags & 3 == 0 {
            "drop_bad_checksum"
        } else {
            "tcp_denied"
        };
        assert_eq!(verdict(&mut s, &h).0, [(expect, 1)]);
    }
    // Both kinds of header were tried.
    assert!(
        (100..1900).contains(&refusals),
        "{refusals} refused of 2000"
    );
    assert_sealed(&s);
}

#[test]
fn arp_claiming_gateway_or_dns_dropped_counted_nothing_sent() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for sender in [GW, DNS] {
            for op in [1u16, 2, 3, 0xffff] {
                for (target, dst) in [(GW, [0xff; 6]), (GUEST, GW_MAC), (sender, [0xff; 6])] {
                    let mut f = vec![0u8; vnet];
                    f.extend_from_slice(&arp_frame(op, sender, target, dst));
                    let (m, answered) = verdict(&mut s, &f);
                    assert_eq!(m, [("drop_arp_spoof", 1)], "{sender:?} op {op}");
                    assert!(!answered);
                }
            }
        }
        assert_sealed(&s);
    }
}

#[test]
fn ndp_claiming_gateway_ignored_counted_nothing_sent() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        // Unsolicited advertisements (override set) claiming our addresses, a router
        // advertisement and a redirect from the guest.
        for target in [GW6, ROUTER_LL] {
            let mut na = vec![136, 0, 0, 0, 0xa0, 0, 0, 0];
            na.extend_from_slice(&target);
            na.extend_from_slice(&[2, 1]);
            na.extend_from_slice(&GUEST_MAC);
            let ra = [134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
            let mut redirect = vec![137, 0, 0, 0, 0, 0, 0, 0];
            redirect.extend_from_slice(&target);
            redirect.extend_from_slice(&GUEST6);
            for msg in [&na[..], &ra[..], &redirect[..]] {
                for src in [GUEST6, GUEST_LL] {
                    let mut f = vec![0u8; vnet];
                    f.extend_from_slice(&icmp6_frame(
                        src,
                        all_nodes,
                        [0x33, 0x33, 0, 0, 0, 1],
                        msg,
                    ));
                    let (m, answered) = verdict(&mut s, &f);
                    assert_eq!(m, [("icmp_ignored", 1)], "type {}", msg[0]);
                    assert!(!answered);
                }
            }
        }
        assert_sealed(&s);
    }
}

#[test]
fn tcp_every_flag_combination_to_refused_destinations() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for kind in [Kind::Tcp4, Kind::Tcp6] {
            for flags in 0..0x200u16 {
                let mut f = template(vnet, kind, 0);
                let l4 = vnet + if kind == Kind::Tcp4 { 34 } else { 54 };
                f[l4 + 12] = (f[l4 + 12] & 0xf0) | (flags >> 8) as u8;
                f[l4 + 13] = flags as u8;
                fix_checksums(&mut f, vnet);
                let (syn, rst, ack) = (flags & 2 != 0, flags & 4 != 0, flags & 0x10 != 0);
                let (m, answered) = verdict(&mut s, &f);
                let expect = if syn && !ack && !rst {
                    "tcp_denied"
                } else {
                    "tcp_stray_segments"
                };
                assert_eq!(m, [(expect, 1)], "{kind:?} flags {flags:#05x}");
                // A RST is never answered (anything else is, with a RST, unless smoltcp
                // finds the flags impossible, SYN with FIN).
                assert!(!(rst && answered), "{kind:?} flags {flags:#05x}");
                assert!(
                    rst || answered || syn && flags & 1 != 0,
                    "{kind:?} flags {flags:#05x}"
                );
            }
        }
        assert_sealed(&s);
    }
}

#[test]
fn zero_ports_dropped_or_refused() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for kind in [Kind::Udp4, Kind::Udp6, Kind::Tcp4, Kind::Tcp6] {
            for ports in [0..2, 2..4, 0..4] {
                let mut f = template(vnet, kind, 0);
                let l4 = vnet + if kind.v4() { 34 } else { 54 };
                f[l4 + ports.start..l4 + ports.end].fill(0);
                fix_checksums(&mut f, vnet);
                let (m, answered) = verdict(&mut s, &f);
                if kind.udp() {
                    assert_eq!(m, [("drop_udp_malformed", 1)], "{kind:?} {ports:?}");
                    assert!(!answered);
                } else {
                    // Port 0 is never a connection.
                    assert_eq!(m, [("drop_tcp_malformed", 1)], "{kind:?} {ports:?}");
                    assert!(!answered);
                }
            }
        }
        assert_sealed(&s);
    }
}

#[test]
fn bad_sources_dropped_counted_nothing_sent() {
    let gen = Gen::new(0);
    let mut r = Rng::new(9);
    let mut s = Sealed::new(0);
    for _ in 0..2000 {
        let f = gen.bad_source(&mut r);
        let (m, answered) = verdict(&mut s, &f);
        assert_eq!(m, [("drop_bad_source", 1)], "{}", hex(&f));
        assert!(!answered);
    }
    assert_sealed(&s);
}

#[test]
fn ipv6_extension_headers_dropped_counted_nothing_sent() {
    for vnet in [0, 10] {
        let gen = Gen::new(vnet);
        let mut r = Rng::new(11);
        let mut s = Sealed::new(vnet);
        for _ in 0..1000 {
            let f = gen.ipv6_ext(&mut r);
            let (m, answered) = verdict(&mut s, &f);
            assert_eq!(m, [("drop_ipv6_ext", 1)], "{}", hex(&f));
            assert!(!answered);
        }
        assert_sealed(&s);
    }
}

#[test]
fn hostile_dhcp_answered_or_dropped_once() {
    let gen = Gen::new(0);
    let mut r = Rng::new(13);
    let mut s = Sealed::new(0);
    let mut replies = 0;
    for _ in 0..5000 {
        let f = gen.dhcp(&mut r);
        let (m, answered) = verdict(&mut s, &f);
        assert!(
            m == [("dhcp_replies", 1)] && answered || m == [("dhcp_drops", 1)] && !answered,
            "{m:?} answered {answered}: {}",
            hex(&f)
        );
        replies += u64::from(answered);
    }
    assert!(replies > 0);
    // A relayed message is never answered.
    let mut msg = dhcp_message(1, &[]);
    msg[24..28].copy_from_slice(&[192, 0, 2, 1]);
    let f = dhcp_frame([0; 4], [255; 4], &msg);
    assert_eq!(verdict(&mut s, &f), (vec![("dhcp_drops", 1)], false));
    assert_sealed(&s);
}

#[test]
fn random_bytes_never_open_anything() {
    for vnet in [0, 10] {
        let gen = Gen::new(vnet);
        let mut r = Rng::new(17);
        let mut s = Sealed::new(vnet);
        for i in 0..20_000 {
            let f = gen.random(&mut r);
            s.feed(&f);
            if i % 256 == 0 {
                s.turn();
            }
        }
        s.turn();
        assert_sealed(&s);
    }
}

/// The tables stay within their limits under a SYN burst and a UDP spray from many
/// source ports (gateway with host loopback on, to the in-memory host's listener).
#[test]
fn flows_stay_within_limits() {
    let (tcp_port, udp_port) = (8080, 5353);

    let mut cfg = sealed_config(0);
    cfg.nat.host_loopback = true;
    cfg.limits = forwarder::Limits {
        tcp_flows: 32,
        tcp_half_open: 8,
        udp_flows: 16,
        icmp_flows: 4,
        ports: 4,
        spliced: 4,
    };
    let limits = cfg.limits;
    let mut sim = Sim::with_config(cfg);
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], tcp_port));
    sim.host.tcp(listener, Remote::Accept);
    for i in 0..400u16 {
        let syn = tcp_frame(GW, 10_000 + i, tcp_port, 1, |b| b.syn(), &[]);
        sim.send(&syn);
        let mut dgram = Vec::new();
        guest()
            .udp(20_000 + i, udp_port)
            .write(&mut dgram, b"spray")
            .unwrap();
        sim.send(&dgram);
        let (tcp, udp_flows, _) = sim.fwd.flow_counts();
        assert!(tcp <= limits.tcp_flows, "{tcp} TCP flows");
        assert!(sim.fwd.half_open() <= limits.tcp_half_open);
        assert!(udp_flows <= limits.udp_flows, "{udp_flows} UDP flows");
        if i % 16 == 0 {
            sim.run_for(5);
        }
    }
    let c = sim.fwd.counters();
    assert!(c.tcp_table_full > 0, "TCP limit never hit");
    assert!(c.udp_table_full > 0, "UDP limit never hit");
    assert!(c.udp_opened as usize <= limits.udp_flows);
    assert!(
        !sim.host.streams_to(listener).is_empty(),
        "no flow reached the listener"
    );
}

// Findings of the first hardening pass, now fixed.

/// Feeds one frame and returns what it made the forwarder send to the guest.
fn answers(s: &mut Sealed, frame: &[u8]) -> Vec<Vec<u8>> {
    s.fwd.flush(&mut s.sink);
    s.feed(frame);
    let mut wire = Wire::default();
    s.fwd.flush(&mut wire);
    wire.0
}

/// RFC 1122 3.2.2: no ICMP error for a datagram to a broadcast or multicast address,
/// and never from such an address (mDNS and SSDP from the guest trigger this).
#[test]
fn no_icmp_error_for_broadcast_or_multicast_datagrams() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        for dst in [
            [255; 4],
            [10, 0, 2, 255],
            [224, 0, 0, 251],
            [239, 255, 255, 250],
        ] {
            let mut f = template(vnet, Kind::Udp4, 0);
            set_dst4(&mut f, vnet, dst);
            let out = answers(&mut s, &f);
            assert!(out.is_empty(), "to {dst:?}: {}", hex(&out[0]));
        }
        let mut f = template(vnet, Kind::Udp6, 0);
        let mdns6 = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb];
        f[vnet + 38..vnet + 54].copy_from_slice(&mdns6);
        fix_checksums(&mut f, vnet);
        let out = answers(&mut s, &f);
        assert!(out.is_empty(), "to ff02::fb: {}", hex(&out[0]));
    }
}

/// An echo request to the gateway whose reply cannot be sent (beyond the MTU) is
/// dropped without any counter moving.
#[test]
fn oversized_echo_request_counted() {
    for vnet in [0, 10] {
        let mut s = Sealed::new(vnet);
        let mut f = template(vnet, Kind::Icmp4, 0);
        f.resize(vnet + 14 + 4000, 0x42);
        f[vnet + 16..vnet + 18].copy_from_slice(&4000u16.to_be_bytes());
        fix_checksums(&mut f, vnet);
        let (m, answered) = verdict(&mut s, &f);
        assert!(!answered);
        assert!(!m.is_empty(), "dropped, uncounted");
    }
}

/// Every input of the `frame_parser` fuzz target's corpus (seeds, and what fuzzing
/// added there) goes through `replay_frames` as the fuzz target would feed it.
#[test]
fn fuzz_corpus_replays_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_parser");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(p) = catch_unwind(|| replay_frames(&data)) {
            eprintln!("corpus input {} failed", path.display());
            resume_unwind(p);
        }
        n += 1;
    }
    println!("replayed {n} inputs of {}", dir.display());
}

/// Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/`) from the
/// generators: `cargo test -p forwarder --test hostile write_seed_corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the generators change"]
fn write_seed_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |target: &str, name: String, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    };
    // frame_parser: mode byte (bit 0: vnet header, bit 7: length-prefixed frames), then
    // the frame(s). Checksums are right already: bit 1 stays clear.
    let with_len = |frames: &[Vec<u8>]| {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    };
    for vnet in [0usize, 10] {
        let mode = u8::from(vnet > 0);
        let gen = Gen::new(vnet);
        for (i, t) in gen.templates.iter().enumerate() {
            let mut bytes = vec![mode];
            bytes.extend_from_slice(&t.frame);
            write(
                "frame_parser",
                format!("v{vnet}-template-{i:02}-{:?}", t.kind),
                &bytes,
            );
        }
        let mut written = BTreeMap::new();
        for i in 0.. {
            let (class, frames) = gen.frames(SEED, i);
            let n = written.entry(class).or_insert(0);
            let len: usize = frames.iter().map(Vec::len).sum();
            // Small seeds: libFuzzer grows inputs itself (see fuzz/README.md).
            if *n >= 3 || len > 4096 {
                if written.len() == CLASSES.len() && written.values().all(|&n| n >= 3) {
                    break;
                }
                continue;
            }
            *n += 1;
            let bytes = if frames.len() == 1 {
                let mut b = vec![mode];
                b.extend_from_slice(&frames[0]);
                b
            } else {
                let mut b = vec![mode | 0x80];
                b.extend_from_slice(&with_len(&frames));
                b
            };
            write("frame_parser", format!("v{vnet}-{class:?}-{n}"), &bytes);
        }
    }
    // dhcp: length-prefixed messages to one server.
    let discover = dhcp_message(1, &[55, 3, 1, 3, 6]);
    let request = dhcp_message(3, &[50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2]);
    write(
        "dhcp",
        "discover".into(),
        &with_len(std::slice::from_ref(&discover)),
    );
    write(
        "dhcp",
        "discover-request".into(),
        &with_len(&[discover, request]),
    );
    let mut r = Rng::new(SEED);
    for i in 0..16 {
        let msg = dhcp_payload(&mut r);
        write("dhcp", format!("generated-{i:02}"), &with_len(&[msg]));
    }
    // dns: resolv.conf texts.
    for (name, text) in [
        ("plain", "nameserver 1.1.1.1\nnameserver 2001:db8::1\nsearch example.com\n"),
        ("scoped", "# comment\nnameserver fe80::1%lo\n;x\nnameserver\t10.0.0.1 trailing\n"),
        ("many", "nameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\nnameserver 4.4.4.4\n"),
        ("junk", "nameserver 300.1.1.1\nnameserverx 1.2.3.4\noptions ndots:5\nnameserver ::ffff:1.2.3.4%\n"),
    ] {
        write("dns", name.into(), text.as_bytes());
    }
}
