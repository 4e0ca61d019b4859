//! The forwarder driven over memory, quinn-proto `Pair` style: guest frames built and
//! checked with etherparse (an implementation independent of smoltcp::wire), host sockets
//! in memory ([`host::MemHost`]), time on a fake clock that jumps to the forwarder's next
//! deadline. Nothing sleeps, nothing leaves the process, every run is the same.
#![allow(dead_code)]

pub mod host;
pub mod pair;

use std::net::Ipv4Addr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use forwarder::nat::{NatConfig, Network};
use forwarder::{Config, Forwarder, FrameSink, Io, Limits, Topology};
use smoltcp::time::{Duration, Instant};

#[allow(unused_imports)]
pub use host::{MemHost, Remote};

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const GW_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];
pub const GUEST: [u8; 4] = [10, 0, 2, 100];
pub const GW: [u8; 4] = [10, 0, 2, 2];

#[derive(Default)]
pub struct Wire(pub Vec<Vec<u8>>);

impl FrameSink for Wire {
    fn send_frame(&mut self, _port: forwarder::PortId, frame: &[u8]) -> std::io::Result<()> {
        self.0.push(frame.to_vec());
        Ok(())
    }
}

pub struct Sim {
    pub host: MemHost,
    pub fwd: Forwarder,
    pub wire: Wire,
    /// The fake clock, in microseconds.
    pub micros: i64,
    /// The read buffer frames are handed over in, as the event loop's.
    rx: Vec<u8>,
}

impl Sim {
    pub fn new(host_loopback: bool) -> Sim {
        Sim::with_config(Sim::config(host_loopback))
    }

    /// [`Sim::new`]'s configuration: IPv4 only, no vnet header, 64 KiB TCP buffers.
    pub fn config(host_loopback: bool) -> Config {
        Config {
            nat: NatConfig {
                net: Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24),
                net6: None,
                host_loopback,
                aliases: vec![],
            },
            nameservers: vec![],
            services: forwarder::Services::default(),
            dns_enabled: true,
            mtu: 1500,
            vnet_hdr_len: 0,
            offload: false,
            outbound_v4: None,
            outbound_v6: None,
            outbound_to_loopback: false,
            guest_v4: None,
            guest_v6: None,
            tcp_buffer: 64 * 1024,
            loopback_handoff: false,
            udp_idle: Duration::from_secs(60),
            limits: Limits::default(),
            seed: 1,
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.micros)
    }

    /// Feeds a guest frame and runs the forwarder's turn.
    pub fn send(&mut self, frame: &[u8]) {
        let now = self.now();
        let mut io = Io {
            host: &mut self.host,
            tap: &mut self.wire,
        };
        self.rx.clear();
        self.rx.extend_from_slice(frame);
        self.fwd.handle_frame(now, &mut self.rx, &mut io);
        self.fwd.poll_flows(now, &mut io);
        self.fwd.flush(&mut self.wire);
    }

    /// One event loop turn at the current time: readiness, timers, flows, flush.
    pub fn turn(&mut self) {
        let now = self.now();
        finish_turn(&mut self.fwd, &mut self.host, now, &mut self.wire);
    }

    /// Runs event loop turns until `done` holds for a frame sent to the guest or `ms`
    /// of fake time have passed; returns that frame. Between turns the clock jumps to
    /// the forwarder's next deadline when no readiness is pending (10 us otherwise).
    pub fn run_until(&mut self, ms: u64, mut done: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = self.micros + ms as i64 * 1000;
        loop {
            if let Some(i) = self.wire.0.iter().position(|f| done(f)) {
                return Some(self.wire.0.remove(i));
            }
            if self.micros >= deadline {
                return None;
            }
            let next = if self.host.events.is_empty() {
                self.fwd
                    .poll_timeout()
                    .map_or(deadline, |at| at.total_micros())
            } else {
                self.micros
            };
            self.micros = next.clamp(self.micros + 10, deadline);
            self.turn();
        }
    }

    /// Runs turns for `ms` of fake time, whatever comes out.
    pub fn run_for(&mut self, ms: u64) {
        self.run_until(ms, |_| false);
    }

    /// Lends the forwarder this simulation's host and wire, as the event loop does for a
    /// call outside a turn (publishing a port, a splice listener, resetting flows).
    pub fn with_io<R>(&mut self, f: impl FnOnce(&mut Forwarder, &mut Io<'_, MemHost>) -> R) -> R {
        let mut io = Io {
            host: &mut self.host,
            tap: &mut self.wire,
        };
        f(&mut self.fwd, &mut io)
    }
}

pub fn guest() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv4(GUEST, GW, 64)
}

pub fn tcp_of(frame: &[u8]) -> Option<(etherparse::TcpHeader, Vec<u8>, [u8; 4])> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        return None;
    };
    Some((t.to_header(), t.payload().to_vec(), ip.header().source()))
}

/// What `pick` finds in each of `frames` (IPv4 network and transport layers parsed).
pub fn seen<T>(
    frames: &[Vec<u8>],
    pick: impl Fn(&etherparse::Ipv4Slice<'_>, &TransportSlice<'_>) -> Option<T>,
) -> Vec<T> {
    frames
        .iter()
        .filter_map(|f| {
            let p = SlicedPacket::from_ethernet(f).ok()?;
            let (Some(NetSlice::Ipv4(ip)), Some(t)) = (&p.net, &p.transport) else {
                return None;
            };
            pick(ip, t)
        })
        .collect()
}

/// A UDP datagram from the guest to `dst`.
pub fn udp_frame(dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GUEST, dst, 64)
        .udp(sport, dport)
        .write(&mut f, data)
        .unwrap();
    f
}

pub fn tcp_frame(
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    build: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    data: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GUEST, dst, 64)
        .tcp(sport, dport, seq, 65535);
    let b = build(b);
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}

// Hostile input (tests/hostile.rs and the fuzz targets, which include this file): a
// forwarder that cannot reach anything, fed frames whose destinations are confined.

/// The IPv6 network of [`sealed_config`]: `fd00::/64`.
pub const NET6: forwarder::nat::Network6 = forwarder::nat::Network6::DEFAULT;

/// A configuration under which every destination [`confine`] writes is refused by the
/// NAT: host loopback off (the gateway reaches nothing), no DNS upstream (the DNS
/// address reaches nothing), IPv6 on so that NDP and ICMPv6 are parsed. Offloads follow
/// the vnet header, as in `usernet`.
pub fn sealed_config(vnet_hdr_len: usize) -> Config {
    Config {
        nat: NatConfig {
            net: Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24),
            net6: Some(NET6),
            host_loopback: false,
            aliases: vec![],
        },
        nameservers: vec![],
        services: forwarder::Services::default(),
        dns_enabled: true,
        mtu: 1500,
        vnet_hdr_len,
        offload: vnet_hdr_len > 0,
        outbound_v4: None,
        outbound_v6: None,
        outbound_to_loopback: false,
        guest_v4: None,
        guest_v6: None,
        tcp_buffer: 64 * 1024,
        loopback_handoff: false,
        udp_idle: Duration::from_secs(60),
        limits: Limits::default(),
        seed: 1,
    }
}

/// Where the IP destination address of `frame` sits, as the forwarder reads it
/// (ethertype at Ethernet offset 12, IPv4 destination at IP offset 16, IPv6 at 24).
fn dst_field(frame: &[u8], vnet: usize) -> Option<(std::ops::Range<usize>, bool)> {
    let eth = frame.get(vnet..)?;
    let ip = vnet + 14;
    match u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]) {
        0x0800 if frame.len() >= ip + 20 => Some((ip + 16..ip + 20, true)),
        0x86dd if frame.len() >= ip + 40 => Some((ip + 24..ip + 40, false)),
        _ => None,
    }
}

/// Rewrites the IP destination of `frame` (vnet header of `vnet` bytes included) into
/// an address the NAT of [`sealed_config`] refuses; `pick` chooses which. Frames too
/// short to hold a destination are left alone: the forwarder cannot parse them as IP.
pub fn confine(frame: &mut [u8], vnet: usize, pick: u64) {
    let Some((field, v4)) = dst_field(frame, vnet) else {
        return;
    };
    let low = (pick >> 8) as u8;
    if v4 {
        let dst: [u8; 4] = match pick % 8 {
            0 | 1 => [10, 0, 2, 2],
            2 => [10, 0, 2, 3],
            3 | 4 => [10, 0, 2, low],
            5 => [255, 255, 255, 255],
            6 => [224 + low % 16, 0, 0, low],
            _ => [127, low, 0, 1],
        };
        frame[field].copy_from_slice(&dst);
    } else {
        let mut dst = [0u8; 16];
        match pick % 8 {
            0 | 1 => dst = NET6.gateway().octets(),
            2 => dst = NET6.dns.unwrap_or(NET6.gateway).octets(),
            3 | 4 => {
                dst = NET6.prefix.octets();
                dst[15] = low;
                dst[9] = (pick >> 16) as u8;
            }
            5 => dst = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, low],
            6 => {
                // Link-local, or the solicited-node group of a low address.
                dst[..2].copy_from_slice(&[0xfe, 0x80]);
                if low & 1 == 1 {
                    dst[..2].copy_from_slice(&[0xff, 0x02]);
                    dst[11..13].copy_from_slice(&[1, 0xff]);
                }
                dst[15] = low;
            }
            _ => {
                // Loopback, unspecified or IPv4-mapped loopback.
                match low % 3 {
                    0 => dst[15] = 1,
                    1 => {}
                    _ => dst[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]),
                }
            }
        }
        frame[field].copy_from_slice(&dst);
    }
}

/// Whether the NAT refuses the IP destination of `frame` for every port: the check
/// run on every frame before it is fed (frames without a destination pass).
pub fn reaches_nothing(nat: &NatConfig, frame: &[u8], vnet: usize) -> bool {
    let Some((field, v4)) = dst_field(frame, vnet) else {
        return true;
    };
    let b = &frame[field];
    let dst = if v4 {
        std::net::IpAddr::from(<[u8; 4]>::try_from(b).unwrap())
    } else {
        std::net::IpAddr::from(<[u8; 16]>::try_from(b).unwrap())
    };
    [0, 1, 53, 67, 80, 443, 65535]
        .iter()
        .all(|&port| nat.translate(dst, port, &[]).is_err())
}

/// The Internet checksum of `data` added to `sum`, not yet folded.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the checksum of a TCP, UDP, ICMP or ICMPv6 message in place.
fn fix_transport(seg: &mut [u8], proto: u8, pseudo: u32) {
    let at = match proto {
        6 => 16,
        17 => 6,
        1 | 58 => 2,
        _ => return,
    };
    if seg.len() < at + 2 {
        return;
    }
    seg[at..at + 2].fill(0);
    let mut csum = if proto == 1 {
        fold(sum16(0, seg))
    } else {
        fold(sum16(pseudo + seg.len() as u32 + u32::from(proto), seg))
    };
    if proto == 17 && csum == 0 {
        csum = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&csum.to_be_bytes());
}

/// Recomputes the IPv4 header checksum and the transport checksum of `frame` where its
/// length fields allow (mutated frames then get past the checksum checks).
pub fn fix_checksums(frame: &mut [u8], vnet: usize) {
    let Some(eth) = frame.get_mut(vnet..) else {
        return;
    };
    if eth.len() < 14 {
        return;
    }
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let ip = &mut eth[14..];
    match ethertype {
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            if ihl < 20 || ihl > ip.len() {
                return;
            }
            ip[10..12].fill(0);
            let csum = fold(sum16(0, &ip[..ihl]));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            // A fragment's transport checksum covers the whole datagram: left alone.
            let fragment = ip[6] & 0x3f != 0 || ip[7] != 0;
            if total < ihl || total > ip.len() || fragment {
                return;
            }
            let proto = ip[9];
            let pseudo = sum16(0, &ip[12..20]);
            fix_transport(&mut ip[ihl..total], proto, pseudo);
        }
        0x86dd if ip.len() >= 40 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + len > ip.len() {
                return;
            }
            let proto = ip[6];
            let pseudo = sum16(0, &ip[8..40]);
            fix_transport(&mut ip[40..40 + len], proto, pseudo);
        }
        _ => {}
    }
}

/// Frames for the guest, checked and dropped: each must hold its headers, must not
/// exceed the MTU unless the vnet header asks for segmentation, and a checksum the
/// vnet header leaves to the kernel must lie inside the frame.
#[derive(Debug, Default)]
pub struct Discard {
    /// vnet header length of the link.
    pub vnet: usize,
    /// The link MTU.
    pub mtu: usize,
    /// Frames taken.
    pub frames: u64,
    /// Bytes taken.
    pub bytes: u64,
    /// Frames that failed a check.
    pub bad: u64,
    /// The first frame that failed a check.
    pub first_bad: Option<Vec<u8>>,
}

impl Discard {
    fn check(&self, frame: &[u8]) -> bool {
        let v = self.vnet;
        let Some(ip_len) = frame.len().checked_sub(v + 14) else {
            return false;
        };
        let (gso, needs_csum, start, offset) = if v > 0 {
            let u = |i: usize| usize::from(u16::from_le_bytes([frame[i], frame[i + 1]]));
            (frame[1] != 0, frame[0] & 1 != 0, u(6), u(8))
        } else {
            (false, false, 0, 0)
        };
        let src_ok = frame[v + 6..v + 12] == GW_MAC;
        let size_ok = gso || ip_len <= self.mtu;
        let csum_ok = !needs_csum || start + offset + 2 <= frame.len() - v;
        src_ok && size_ok && csum_ok
    }
}

impl FrameSink for Discard {
    fn send_frame(&mut self, _port: forwarder::PortId, frame: &[u8]) -> std::io::Result<()> {
        self.frames += 1;
        self.bytes += frame.len() as u64;
        if !self.check(frame) {
            self.bad += 1;
            if self.first_bad.is_none() {
                self.first_bad = Some(frame.to_vec());
            }
        }
        Ok(())
    }
}

/// A forwarder with [`sealed_config`] on a synthetic clock, for floods of hostile
/// frames: [`feed`](Self::feed) takes one frame, [`turn`](Self::turn) runs the rest of
/// an event loop turn (timers, flows, flush) once per batch.
pub struct Sealed {
    pub host: MemHost,
    pub fwd: Forwarder,
    pub sink: Discard,
    pub vnet: usize,
    nat: NatConfig,
    micros: i64,
    /// The read buffer frames are handed over in, as the event loop's.
    rx: Vec<u8>,
}

impl Sealed {
    pub fn new(vnet: usize) -> Sealed {
        let cfg = sealed_config(vnet);
        let nat = cfg.nat.clone();
        let sink = Discard {
            vnet,
            mtu: cfg.mtu,
            ..Discard::default()
        };
        Sealed {
            host: MemHost::default(),
            fwd: Forwarder::new(cfg, Topology::Single, Instant::from_micros(0)),
            sink,
            vnet,
            nat,
            micros: 0,
            rx: Vec::new(),
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.micros)
    }

    /// Feeds one frame (vnet header included).
    ///
    /// # Panics
    /// When the frame's destination is one the NAT would let through: a generator bug
    /// that could send traffic off this machine.
    pub fn feed(&mut self, frame: &[u8]) {
        assert!(
            reaches_nothing(&self.nat, frame, self.vnet),
            "unconfined destination in {frame:02x?}"
        );
        self.micros += 10;
        let now = self.now();
        let mut io = Io {
            host: &mut self.host,
            tap: &mut self.sink,
        };
        self.rx.clear();
        self.rx.extend_from_slice(frame);
        self.fwd.handle_frame(now, &mut self.rx, &mut io);
    }

    /// The rest of an event loop turn: readiness (none is expected), timers, flows,
    /// flush.
    pub fn turn(&mut self) {
        self.micros += 1000;
        let now = self.now();
        finish_turn(&mut self.fwd, &mut self.host, now, &mut self.sink);
    }
}

impl Sim {
    /// A simulation of a forwarder with `cfg` (limits, NAT policy, vnet header).
    pub fn with_config(cfg: Config) -> Sim {
        Sim {
            host: MemHost::default(),
            fwd: Forwarder::new(cfg, Topology::Single, Instant::from_micros(0)),
            wire: Wire::default(),
            micros: 0,
            rx: Vec::new(),
        }
    }
}

/// The rest of an event loop turn after the wait, as `src/event_loop.rs` does it:
/// readiness, timers, flows, then the frames for the guest.
pub fn finish_turn(fwd: &mut Forwarder, host: &mut MemHost, now: Instant, tap: &mut dyn FrameSink) {
    // Events raised while these are handled wait for the next turn, as epoll's would.
    let mut events = std::mem::take(&mut host.spare);
    std::mem::swap(&mut events, &mut host.events);
    let mut io = Io {
        host: &mut *host,
        tap: &mut *tap,
    };
    for ev in events.drain(..) {
        let ready = forwarder::Ready {
            readable: ev.readable,
            writable: ev.writable,
            hup: ev.hup,
            error: ev.error,
            urgent: false,
        };
        fwd.handle_ready(now, ev.id, ready, &mut io);
    }
    host.spare = events;
    let mut io = Io {
        host: &mut *host,
        tap: &mut *tap,
    };
    fwd.handle_timeouts(now, &mut io);
    fwd.poll_flows(now, &mut io);
    fwd.flush(tap);
}

/// The largest frame a guest input may be: vnet header + Ethernet + a 65535-byte IP
/// packet, and then some.
pub const MAX_FRAME: usize = 65560;

/// A forwarder open to everything, over the in-memory host: host loopback on, a DNS
/// upstream, IPv6 on, offloads following the vnet header. Nothing needs sealing: the
/// only host is [`MemHost`], so every flow a guest frame asks for is opened, in memory.
pub fn open_config(vnet_hdr_len: usize) -> Config {
    let mut cfg = sealed_config(vnet_hdr_len);
    cfg.nat.host_loopback = true;
    cfg.nameservers = vec![std::net::SocketAddr::from(([192, 0, 2, 53], 53))];
    cfg.limits = Limits {
        tcp_flows: 64,
        tcp_half_open: 16,
        udp_flows: 32,
        icmp_flows: 8,
        ports: 4,
        spliced: 8,
    };
    cfg
}

/// What the in-memory host does in a [`replay_frames`] run, from the mode byte.
fn host_for(mode: u8) -> MemHost {
    let default_tcp = match (mode >> 2) & 7 {
        0 | 1 => Remote::Accept,
        2 => Remote::Refuse,
        3 => Remote::Unreachable,
        4 => Remote::Silent,
        5 => Remote::FailNow(libc::ENETUNREACH),
        6 => Remote::FailNow(libc::EMFILE),
        _ => Remote::FailNow(libc::EACCES),
    };
    MemHost {
        default_tcp,
        echo: mode & 0x20 != 0,
        ..MemHost::default()
    }
}

/// The host's peers act: datagram peers send back what they got (mode bit 5), stream
/// peers read everything, answer and close (mode bit 6).
fn peers_act(host: &mut MemHost, mode: u8, round: usize) {
    for id in 0..host.socks.len() {
        match &host.socks[id] {
            Some(host::Sock::Dgram(_)) if mode & 0x20 != 0 => {
                host.dgram_echo(id);
            }
            Some(host::Sock::Stream(s)) if mode & 0x40 != 0 && s.watched => {
                host.peer_read_all(id);
                match round {
                    0 => {
                        host.peer_write(id, b"HTTP/1.0 200 OK\r\n\r\n");
                    }
                    1 => host.peer_fin(id),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Checks the forwarder against its host: the tables within their limits, and exactly
/// one host socket per open flow (none leaked, none missing).
fn assert_consistent(fwd: &Forwarder, host: &MemHost) {
    let l = fwd.limits();
    let (tcp, udp, icmp) = fwd.flow_counts();
    assert!(tcp <= l.tcp_flows && udp <= l.udp_flows && icmp <= l.icmp_flows);
    assert!(fwd.half_open() <= l.tcp_half_open);
    assert_eq!(
        host.open_sockets(),
        tcp + udp + icmp,
        "host sockets and flows disagree: {:?}",
        fwd.flow_counts()
    );
}

/// One input of the `frame_parser` fuzz target, also replayed from its corpus by
/// `tests/hostile.rs`: a mode byte, then the frame. Mode bit 0: vnet header (10 bytes)
/// or none; bit 1: recompute checksums (so mutations get past them); bit 7: the rest is
/// frames, each prefixed by its length (2 bytes, little endian), all fed to one
/// forwarder; bits 2-4: what TCP connects meet on the host ([`host_for`]); bit 5: the
/// host's datagram peers answer; bit 6: its stream peers answer and close.
///
/// The frames go in as they are, to a forwarder of [`open_config`] over the in-memory
/// host, which then runs on its fake clock (the host's peers acting) until every
/// datagram flow has expired.
///
/// # Panics
/// When the forwarder panics, sends the guest a malformed frame, exceeds a limit, or
/// its flows and the host's sockets disagree.
pub fn replay_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let vnet = if mode & 1 == 0 { 0 } else { 10 };
    let cfg = open_config(vnet);
    let idle = cfg.udp_idle;
    let mut sink = Discard {
        vnet,
        mtu: cfg.mtu,
        ..Discard::default()
    };
    let mut fwd = Forwarder::new(cfg, Topology::Single, Instant::from_micros(0));
    let mut host = host_for(mode);
    let mut micros = 0i64;
    let mut rx = Vec::new();
    let mut feed = |fwd: &mut Forwarder, host: &mut MemHost, sink: &mut Discard, frame: &[u8]| {
        rx.clear();
        rx.extend_from_slice(&frame[..frame.len().min(MAX_FRAME)]);
        if mode & 2 != 0 {
            fix_checksums(&mut rx, vnet);
        }
        micros += 10;
        let mut io = Io { host, tap: sink };
        fwd.handle_frame(Instant::from_micros(micros), &mut rx, &mut io);
    };
    if mode & 0x80 == 0 {
        feed(&mut fwd, &mut host, &mut sink, rest);
    } else {
        let mut rest = rest;
        while let [a, b, tail @ ..] = rest {
            let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
            let (frame, next) = tail.split_at(len);
            feed(&mut fwd, &mut host, &mut sink, frame);
            rest = next;
        }
    }
    // The host's answers, then the clock runs to the end of every datagram flow (and of
    // every half-open connect), a bounded number of turns.
    let end = micros + (idle + Duration::from_secs(30)).total_micros() as i64;
    for round in 0..256 {
        if micros >= end {
            break;
        }
        peers_act(&mut host, mode, round);
        finish_turn(&mut fwd, &mut host, Instant::from_micros(micros), &mut sink);
        assert_consistent(&fwd, &host);
        micros = if host.events.is_empty() {
            fwd.poll_timeout()
                .map_or(end, |at| at.total_micros())
                .clamp(micros + 1000, end)
        } else {
            micros + 1000
        };
    }
    finish_turn(&mut fwd, &mut host, Instant::from_micros(micros), &mut sink);
    assert_consistent(&fwd, &host);
    assert_eq!(
        sink.bad, 0,
        "malformed frame to the guest: {:02x?}",
        sink.first_bad
    );
}
