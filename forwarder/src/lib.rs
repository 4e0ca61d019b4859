//! # usernet forwarder: the host-facing side
//!
//! The [`Forwarder`] takes the guest's frames and the host sockets' readiness and turns
//! every guest flow into an ordinary host socket: outbound NAT in user space.
//!
//! Layering:
//! - [`nat`]: where a guest destination goes on the host (gateway = host loopback, DNS).
//! - [`tcp`]: one smoltcp socket per flow, each in its own `SocketSet`, relayed to a
//!   host `TcpStream`; [`udp`] and [`icmp`] bypass smoltcp with connected host sockets;
//!   [`dhcp`] and [`dns`] are the virtual services.
//! - [`emit`] builds packets straight into the transmit queue, [`timer`] wakes flows.
//!
//! ## How to drive it
//! The event loop (the `usernet` binary) owns the TAP and the mio `Poll`, and per turn:
//! 1. feeds each frame read from the TAP to [`Forwarder::handle_frame`];
//! 2. feeds each readiness event of a flow token to [`Forwarder::handle_ready`];
//! 3. calls [`Forwarder::handle_timeouts`], then [`Forwarder::poll_flows`], which relays
//!    data of every flow touched in this turn and sends what smoltcp has to send;
//! 4. writes out the transmit queue ([`Forwarder::flush`]) and sleeps until
//!    [`Forwarder::poll_timeout`].
//!
//! Host I/O (socket creation, `read`/`write` on flow sockets, registration) happens here
//! through the [`Io`] handed in; the TAP itself is behind [`FrameSink`], so tests can run
//! the forwarder over memory.
//!
//! ## Invariants
//! - No allocation per packet: buffers are sized when a flow opens.
//! - Every table is bounded by [`Limits`]; when full, new flows are refused (TCP: RST,
//!   UDP/ICMP: dropped) and counted, existing flows keep going.
//! - Guest input is never trusted: malformed packets are dropped and counted in
//!   [`Counters`], never a panic.

#![deny(unsafe_code)]

pub mod dhcp;
pub mod dns;
pub mod dns_relay;
pub mod emit;
pub mod frag;
pub mod icmp;
pub mod nat;
pub mod ndp;
pub mod port;
mod sys;
pub mod tcp;
pub mod timer;
pub mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use mio::Token;
use slab::Slab;
use smoltcp::iface::{Interface, SocketSet};
use smoltcp::phy::{ChecksumCapabilities, DeviceCapabilities};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet,
    Ipv6Repr, TcpPacket,
};
use stack::device::GuestDevice;
use stack::l2::{Ingress, L2Drop, L2};
use stack::txq::TxQueue;
use stack::vnet::{self, VnetRepr};

use crate::nat::NatConfig;

/// Tokens from this value up belong to flows; the event loop keeps the ones below.
pub const FLOW_TOKEN_BASE: usize = 16;

/// Where frames for the guest go: the TAP in production, memory in tests.
pub trait FrameSink {
    /// Writes one frame (vnet header included).
    ///
    /// # Errors
    /// `WouldBlock` when the device cannot take it now; other errors drop the frame.
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// The host side handed to the forwarder for one call.
pub struct Io<'a> {
    /// Registry for flow sockets.
    pub registry: &'a mio::Registry,
    /// The guest link.
    pub tap: &'a mut dyn FrameSink,
}

/// Table sizes. When a table is full, new flows of that kind are refused (TCP with a
/// RST, UDP and ICMP dropped) and counted; established flows are never evicted.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TCP flows, any state.
    pub tcp_flows: usize,
    /// TCP flows whose host connection is still being set up (pending SYNs).
    pub tcp_half_open: usize,
    /// UDP flows.
    pub udp_flows: usize,
    /// ICMP echo flows.
    pub icmp_flows: usize,
    /// Published ports (rules).
    pub ports: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tcp_flows: 16384,
            tcp_half_open: 1024,
            udp_flows: 4096,
            icmp_flows: 256,
            ports: port::MAX_RULES,
        }
    }
}

/// Forwarder configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses and NAT policy.
    pub nat: NatConfig,
    /// Whether the DNS forwarder is offered (and announced by DHCP).
    pub dns_enabled: bool,
    /// The guest link's MTU.
    pub mtu: usize,
    /// 0, or the vnet header length of the TAP.
    pub vnet_hdr_len: usize,
    /// The TAP has checksum and TCP segmentation offloads (`TUN_F_CSUM | TUN_F_TSO4 |
    /// TUN_F_TSO6`): TCP super-frames both ways.
    pub offload: bool,
    /// Source address for IPv4 host sockets (`--outbound-addr`).
    pub outbound_v4: Option<Ipv4Addr>,
    /// Source address for IPv6 host sockets (`--outbound-addr6`).
    pub outbound_v6: Option<Ipv6Addr>,
    /// The guest's IPv4 address when it is known in advance (`--configure`): usernet
    /// asks for its MAC address at start, so that published ports work before the guest
    /// has sent anything.
    pub guest_v4: Option<Ipv4Addr>,
    /// The guest's IPv6 address when it is known in advance (`--configure`); otherwise
    /// learned from the guest's traffic. Published ports reach the guest there.
    pub guest_v6: Option<Ipv6Addr>,
    /// Bytes of smoltcp buffer per TCP flow and direction.
    pub tcp_buffer: usize,
    /// UDP flows are closed after this long without traffic.
    pub udp_idle: Duration,
    /// Table sizes.
    pub limits: Limits,
    /// Seed for smoltcp's initial sequence numbers.
    pub seed: u64,
}

/// Declares [`Counters`] and its name/value listing in one place.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters, exposed by the API's `get_stats`: events and drops by reason.
        #[derive(Debug, Default, Clone)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Counters {
            /// Every counter with its name, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name),)*].into_iter()
            }
        }
    };
}

counters! {
    /// Frames read from the guest.
    rx_frames,
    /// Bytes read from the guest.
    rx_bytes,
    /// Frames written to the guest.
    tx_frames,
    /// Bytes written to the guest.
    tx_bytes,
    /// Frames the TAP refused (lost).
    tx_errors,
    /// TCP super-frames written for the kernel to segment (TSO, IPv4 and IPv6).
    tx_gso_frames,
    /// Frames shorter than their headers.
    drop_truncated,
    /// Frames for another MAC address.
    drop_not_for_us,
    /// Frames of an ethertype we do not handle.
    drop_ethertype,
    /// Malformed ARP.
    drop_arp_malformed,
    /// ARP claiming one of our addresses.
    drop_arp_spoof,
    /// Malformed IPv4 (bad header, length or checksum).
    drop_ipv4_malformed,
    /// IPv4 fragments that cannot be (beyond 64 KiB, misaligned).
    drop_ipv4_fragment,
    /// IPv4 fragments received.
    ipv4_fragments,
    /// IPv4 datagrams reassembled from fragments.
    ipv4_reassembled,
    /// IPv4 packets whose options were stripped (the flow is re-originated without).
    ipv4_options_stripped,
    /// IPv6 packets while IPv6 is off.
    drop_ipv6,
    /// Malformed IPv6.
    drop_ipv6_malformed,
    /// IPv6 with extension headers (not handled).
    drop_ipv6_ext,
    /// ARP requests sent to learn the guest MAC address.
    arp_probes,
    /// Neighbor advertisements sent.
    ndp_adverts,
    /// Router advertisements sent.
    ndp_router_adverts,
    /// Packets from a source address the guest may not use.
    drop_bad_source,
    /// Packets of a transport protocol we do not handle.
    drop_protocol,
    /// Malformed TCP.
    drop_tcp_malformed,
    /// TCP with a bad checksum.
    drop_bad_checksum,
    /// Malformed UDP (or bad checksum).
    drop_udp_malformed,
    /// Malformed ICMP (or bad checksum).
    drop_icmp_malformed,
    /// TCP flows opened.
    tcp_opened,
    /// TCP flows closed.
    tcp_closed,
    /// TCP connections refused by the destination.
    tcp_refused,
    /// TCP destinations unreachable.
    tcp_unreachable,
    /// TCP destinations refused by policy.
    tcp_denied,
    /// TCP flows refused: table or half-open limit reached.
    tcp_table_full,
    /// TCP flows refused by a local error (EMFILE, no memory for buffers...).
    tcp_host_errors,
    /// TCP segments of no flow (answered with RST).
    tcp_stray_segments,
    /// UDP flows opened.
    udp_opened,
    /// UDP flows closed.
    udp_closed,
    /// UDP destinations refused by policy.
    udp_denied,
    /// UDP flows refused: table limit reached.
    udp_table_full,
    /// UDP flows refused by a local error.
    udp_host_errors,
    /// UDP datagrams the host socket could not take (dropped).
    udp_send_dropped,
    /// UDP datagrams larger than the guest MTU (dropped).
    udp_too_big,
    /// DNS queries moved to the next nameserver (the current one did not answer).
    dns_failovers,
    /// DNS queries answered SERVFAIL (no nameserver answered in time).
    dns_servfail,
    /// DNS queries answered by a nameserver (followed ones).
    dns_answers,
    /// Runs of guest datagrams sent with one `sendmsg` (UDP GSO).
    udp_gso_sends,
    /// Guest datagrams sent in such runs.
    udp_gso_datagrams,
    /// Echo requests answered by usernet (gateway, DNS).
    icmp_echo_local,
    /// Echo requests to usernet whose reply could not be sent (beyond the MTU).
    icmp_reply_dropped,
    /// ICMP echo flows opened.
    icmp_opened,
    /// ICMP echo flows closed.
    icmp_closed,
    /// Echo requests refused (policy, limit, ping sockets not allowed).
    icmp_denied,
    /// ICMP messages other than echo requests.
    icmp_ignored,
    /// DHCP replies sent.
    dhcp_replies,
    /// DHCP requests dropped.
    dhcp_drops,
}

/// The guest link: smoltcp's interface and our L2 in front of the transmit queue.
pub(crate) struct Link {
    pub iface: Interface,
    pub caps: DeviceCapabilities,
    pub l2: L2,
    pub txq: TxQueue,
    pub mtu: usize,
    /// Rate of the ICMP errors about host-side failures.
    pub icmp_limit: icmp::ErrorLimit,
}

impl Link {
    /// A device for one smoltcp call.
    pub fn device<'a>(
        l2: &'a mut L2,
        txq: &'a mut TxQueue,
        caps: &'a DeviceCapabilities,
        rx: Option<&'a [u8]>,
        guest: IpAddress,
        mtu: usize,
    ) -> GuestDevice<'a> {
        GuestDevice::new(rx, l2, txq, caps, Some(guest), mtu)
    }

    /// Writes queued frames to the guest. Returns false when the device would block
    /// (the rest stays queued).
    pub fn flush(&mut self, tap: &mut dyn FrameSink, c: &mut Counters) -> bool {
        let vnet = self.l2.header_len() > stack::l2::ETHERNET_HEADER_LEN;
        while let Some(frame) = self.txq.front() {
            match tap.send_frame(frame) {
                Ok(()) => {
                    c.tx_frames += 1;
                    c.tx_bytes += frame.len() as u64;
                    // The vnet header's gso_type, second byte.
                    if vnet && frame.get(1).is_some_and(|&gso| gso != 0) {
                        c.tx_gso_frames += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    log::debug!("TAP write failed: {e}");
                    c.tx_errors += 1;
                }
            }
            self.txq.pop();
        }
        true
    }
}

/// A guest flow: the key the guest sees on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The guest's address and port (or ICMP identifier).
    pub guest: (IpAddress, u16),
    /// The destination as the guest addressed it.
    pub remote: (IpAddress, u16),
}

/// An entry of the token table: a flow, or a published port's listener.
pub(crate) enum Flow {
    Tcp(Box<tcp::TcpFlow>),
    Udp(udp::UdpFlow),
    UdpIn(udp::InboundFlow),
    Icmp(icmp::IcmpFlow),
    Port(Box<port::Listener>),
}

impl Flow {
    fn timer_slot(&mut self) -> Option<&mut Option<Instant>> {
        match self {
            Flow::Tcp(f) => Some(&mut f.timer),
            Flow::Udp(f) => Some(&mut f.timer),
            Flow::UdpIn(f) => Some(&mut f.timer),
            Flow::Icmp(f) => Some(&mut f.timer),
            Flow::Port(l) => Some(&mut l.retry),
        }
    }
}

/// Our address of `addr`'s family that reports errors: the gateway.
fn gateway_for(nat: &NatConfig, addr: &IpAddress) -> IpAddress {
    match addr {
        IpAddress::Ipv4(_) => IpAddress::Ipv4(nat.net.gateway()),
        IpAddress::Ipv6(_) => {
            IpAddress::Ipv6(nat.net6.map_or(nat::ROUTER_LINK_LOCAL, |n| n.gateway()))
        }
    }
}

/// The forwarder: all flows between the guest and the host.
pub struct Forwarder {
    cfg: Config,
    link: Link,
    flows: Slab<Flow>,
    tcp_map: HashMap<FlowKey, usize>,
    udp_map: HashMap<FlowKey, usize>,
    icmp_map: HashMap<FlowKey, usize>,
    timers: timer::Timers,
    dirty: Vec<usize>,
    no_flow: SocketSet<'static>,
    dhcp: dhcp::DhcpServer,
    epoch: std::time::Instant,
    half_open: usize,
    counters: Counters,
    /// Published ports: rule id -> token table entry.
    ports: std::collections::BTreeMap<u32, usize>,
    next_port_id: u32,
    /// Receive buffer for datagrams of published UDP ports.
    scratch: Box<[u8]>,
    /// The guest's global IPv6 address, configured or learned.
    guest_v6: Option<Ipv6Address>,
    /// When the next unsolicited router advertisement is due (IPv6 enabled).
    next_ra: Option<Instant>,
    /// Unsolicited router advertisements sent so far.
    ra_sent: u32,
    /// Frames for a guest whose MAC address is not known yet (published-port datagrams
    /// that arrive before the guest has spoken), released once it is. At most
    /// [`MAX_PARKED`]; a rare path, so plain `Vec`s.
    parked: Vec<Vec<u8>>,
    /// IPv4 reassembly; `None` only while a reassembled packet is being handled.
    reasm: Option<frag::Reassembler>,
    /// Closed guest sockets kept for the next flows (at most [`SOCKET_POOL`]).
    socket_pool: Vec<tcp::Guest>,
    /// Published-port UDP associations by (guest port, client as the guest sees it):
    /// a guest with several addresses may answer from another one than it was sent to.
    udp_in_by_port: HashMap<(u16, (IpAddress, u16)), usize>,
    /// Guest datagrams of one flow waiting to leave together.
    udp_batch: udp::Batch,
    /// Set when a DNS query got SERVFAIL, to the `dns_answers` count then: while no
    /// answer came since, new DNS flows are quick ([`dns_relay`]).
    dns_down: Option<u64>,
}

/// How guest datagrams of the UDP flow `id` leave, and its flag of whether that route
/// segments. `None` for other flows and for a published port whose rule is gone.
fn udp_route(flows: &mut Slab<Flow>, id: usize) -> Option<(udp::Route, &mut bool)> {
    let route = match flows.get(id)? {
        Flow::Udp(f) => f.route(),
        Flow::UdpIn(f) => {
            let Some(Flow::Port(l)) = flows.get(f.listener) else {
                return None;
            };
            let port::ListenSocket::Udp(sock) = &l.socket else {
                return None;
            };
            if l.rule.id != f.rule_id {
                return None;
            }
            // Replies from the address the client used (the rule's socket may be bound
            // to a wildcard address).
            udp::Route {
                fd: sock.as_raw_fd(),
                to: Some(f.client),
                from: f.local,
                key: f.key,
            }
        }
        _ => return None,
    };
    match flows.get_mut(id)? {
        Flow::Udp(f) => Some((route, &mut f.gso)),
        Flow::UdpIn(f) => Some((route, &mut f.gso)),
        _ => None,
    }
}

/// Closed TCP sockets kept for reuse: connection churn then allocates nothing. Their
/// buffers' touched pages stay resident, so the pool is small and takes only sockets
/// of flows that moved at most [`POOL_MAX_MOVED`] bytes (the pool's memory is then at
/// most 64 x 128 KiB); a bulk flow's buffers are freed when it ends.
const SOCKET_POOL: usize = 64;

/// Largest transfer (both directions) whose socket is pooled.
const POOL_MAX_MOVED: usize = 128 << 10;

/// How soon `accept` is tried again after it failed for lack of fds.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Frames kept while the guest's MAC address is being resolved.
const MAX_PARKED: usize = 16;

/// Frames queued for the guest: room for a burst of full-size segments.
const TXQ_SLOTS: usize = 256;

impl Forwarder {
    /// A forwarder for a guest link with `cfg`. `now` is the current time on the clock
    /// that every later call uses.
    pub fn new(cfg: Config, now: Instant) -> Forwarder {
        let net = cfg.nat.net;
        let gateway = net.gateway();
        let dns = net.dns();
        let mut l2 = L2::new(L2::mac_for(gateway), [gateway, dns], cfg.vnet_hdr_len);
        // The largest frame: vnet header + Ethernet header + the largest IP packet.
        let slot = cfg.vnet_hdr_len + stack::l2::ETHERNET_HEADER_LEN + 65536;
        let mut txq = TxQueue::new(TXQ_SLOTS, slot);
        let caps = stack::iface::capabilities(cfg.mtu, cfg.offload);
        let mut addrs = vec![IpCidr::new(IpAddress::Ipv4(gateway), net.prefix_len)];
        if let Some(net6) = cfg.nat.net6 {
            let gw6 = net6.gateway();
            addrs.push(IpCidr::new(IpAddress::Ipv6(gw6), nat::Network6::PREFIX_LEN));
        }
        let iface = stack::iface::interface(now, &caps, &mut l2, &mut txq, &addrs, cfg.seed);
        let (cfg_net6, cfg_guest_v6) = (cfg.nat.net6, cfg.guest_v6);
        let dhcp = dhcp::DhcpServer::new(dhcp::DhcpConfig {
            server: net.gateway(),
            prefix_len: net.prefix_len,
            router: net.gateway(),
            dns: cfg.dns_enabled.then(|| net.dns()),
            pool_start: net.dhcp_start(),
            pool_len: 16,
            lease: std::time::Duration::from_secs(24 * 3600),
        });
        Forwarder {
            link: Link {
                iface,
                caps,
                l2,
                txq,
                mtu: cfg.mtu,
                icmp_limit: icmp::ErrorLimit::new(now),
            },
            cfg,
            flows: Slab::new(),
            tcp_map: HashMap::new(),
            udp_map: HashMap::new(),
            icmp_map: HashMap::new(),
            timers: timer::Timers::new(),
            dirty: Vec::new(),
            no_flow: SocketSet::new(Vec::new()),
            dhcp,
            // DHCP leases count on std's clock: anchor it so that `now` maps onto it.
            epoch: std::time::Instant::now()
                .checked_sub(std::time::Duration::from_micros(
                    now.total_micros().unsigned_abs(),
                ))
                .unwrap_or_else(std::time::Instant::now),
            half_open: 0,
            counters: Counters::default(),
            ports: std::collections::BTreeMap::new(),
            next_port_id: 1,
            scratch: vec![0u8; 65536].into_boxed_slice(),
            guest_v6: cfg_guest_v6,
            next_ra: cfg_net6.map(|_| now),
            ra_sent: 0,
            parked: Vec::new(),
            reasm: Some(frag::Reassembler::default()),
            socket_pool: Vec::with_capacity(SOCKET_POOL),
            udp_in_by_port: HashMap::new(),
            udp_batch: udp::Batch::new(sys::udp_gso_supported()),
            dns_down: None,
        }
    }

    /// Closed TCP sockets waiting for reuse.
    pub fn pooled_sockets(&self) -> usize {
        self.socket_pool.len()
    }

    /// A closed guest socket: pooled, or new. `None` (counted) when the memory for a new
    /// one's buffers cannot be had.
    fn guest_socket(&mut self) -> Option<tcp::Guest> {
        let guest = self
            .socket_pool
            .pop()
            .or_else(|| tcp::Guest::new(self.cfg.tcp_buffer));
        if guest.is_none() {
            log::debug!(
                "no memory for the buffers of a TCP flow ({} bytes): refused",
                2 * self.cfg.tcp_buffer
            );
            self.counters.tcp_host_errors += 1;
        }
        guest
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries in the timer heap (stale ones included): a diagnostic.
    pub fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// TCP flows whose host connection is still being made.
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// The table limits in force.
    pub fn limits(&self) -> Limits {
        self.cfg.limits
    }

    /// Open flows by protocol: (tcp, udp, icmp).
    pub fn flow_counts(&self) -> (usize, usize, usize) {
        (self.tcp_map.len(), self.udp_map.len(), self.icmp_map.len())
    }

    /// Takes one frame read from the TAP (vnet header included).
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8], io: &mut Io<'_>) {
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += frame.len() as u64;
        if self.link.txq.is_full() {
            self.link.flush(io.tap, &mut self.counters);
        }
        let c = &mut self.counters;
        match self.link.l2.handle_frame(frame, &mut self.link.txq) {
            Ok(Ingress::Ipv4(ip, vnet)) => self.handle_ipv4(now, ip, &vnet, io),
            Ok(Ingress::Ipv6(ip, vnet)) => {
                if self.cfg.nat.net6.is_some() {
                    self.handle_ipv6(now, ip, &vnet, io);
                } else {
                    c.drop_ipv6 += 1;
                }
            }
            Ok(Ingress::Consumed) => {}
            Err(L2Drop::Truncated) => c.drop_truncated += 1,
            Err(L2Drop::NotForUs) => c.drop_not_for_us += 1,
            Err(L2Drop::UnknownEthertype) => c.drop_ethertype += 1,
            Err(L2Drop::ArpMalformed) => c.drop_arp_malformed += 1,
            Err(L2Drop::ArpSpoof) => c.drop_arp_spoof += 1,
        }
        if !self.parked.is_empty() {
            self.release_parked(io);
        }
    }

    fn handle_ipv4(&mut self, now: Instant, ip: &[u8], vnet: &VnetRepr, io: &mut Io<'_>) {
        // The guest's kernel leaves transport checksums to us ("partial") when the TAP
        // has checksum offload, or says it verified them; else they are checked here.
        let verify = vnet.flags & (vnet::FLAG_NEEDS_CSUM | vnet::FLAG_DATA_VALID) == 0;
        let Ok(packet) = Ipv4Packet::new_checked(ip) else {
            self.counters.drop_ipv4_malformed += 1;
            return;
        };
        // Checked here for fragments too: reassembly writes a fresh header checksum.
        if packet.version() != 4 || !packet.verify_checksum() {
            self.counters.drop_ipv4_malformed += 1;
            return;
        }
        if packet.header_len() > 20 {
            // Options never reach the host: the flow is re-originated without them.
            self.counters.ipv4_options_stripped += 1;
        }
        if packet.more_frags() || packet.frag_offset() != 0 {
            self.handle_fragment(now, &packet, vnet, io);
            return;
        }
        // The header checksum was verified above: do not let smoltcp compute it again.
        let mut caps = ChecksumCapabilities::default();
        caps.ipv4 = smoltcp::phy::Checksum::None;
        let Ok(repr) = Ipv4Repr::parse(&packet, &caps) else {
            self.counters.drop_ipv4_malformed += 1;
            return;
        };
        // The IP packet without Ethernet padding.
        let ip = &ip[..usize::from(packet.total_len())];
        let payload = packet.payload();
        let net = self.cfg.nat.net;
        let src = repr.src_addr;
        let valid_source = net.contains(src)
            && src != net.addr
            && src != net.gateway()
            && src != net.dns()
            && src != net.broadcast();
        if repr.next_header == IpProtocol::Udp && udp::is_dhcp_request(&repr, payload) {
            let (src, dst) = (
                IpAddress::Ipv4(repr.src_addr),
                IpAddress::Ipv4(repr.dst_addr),
            );
            if udp::parse_any(&src, &dst, payload, verify).is_none() {
                self.counters.drop_udp_malformed += 1;
                return;
            }
            self.handle_dhcp(now, payload);
            return;
        }
        if !valid_source {
            self.counters.drop_bad_source += 1;
            return;
        }
        let (src, dst) = (
            IpAddress::Ipv4(repr.src_addr),
            IpAddress::Ipv4(repr.dst_addr),
        );
        self.handle_l4(now, src, dst, repr.next_header, ip, payload, verify, io);
    }

    /// Collects a fragment; handles the datagram it completes.
    fn handle_fragment(
        &mut self,
        now: Instant,
        packet: &Ipv4Packet<&[u8]>,
        vnet: &VnetRepr,
        io: &mut Io<'_>,
    ) {
        let Some(mut reasm) = self.reasm.take() else {
            return;
        };
        self.counters.ipv4_fragments += 1;
        match reasm.add(now, packet) {
            Ok(Some(idx)) => {
                self.counters.ipv4_reassembled += 1;
                self.handle_ipv4(now, reasm.packet(idx), vnet, io);
                reasm.release(idx);
            }
            Ok(None) => {}
            Err(_) => self.counters.drop_ipv4_fragment += 1,
        }
        self.reasm = Some(reasm);
    }

    fn handle_ipv6(&mut self, now: Instant, ip: &[u8], vnet: &VnetRepr, io: &mut Io<'_>) {
        let verify = vnet.flags & (vnet::FLAG_NEEDS_CSUM | vnet::FLAG_DATA_VALID) == 0;
        let Ok(packet) = Ipv6Packet::new_checked(ip) else {
            self.counters.drop_ipv6_malformed += 1;
            return;
        };
        let Ok(repr) = Ipv6Repr::parse(&packet) else {
            self.counters.drop_ipv6_malformed += 1;
            return;
        };
        let Some(net6) = self.cfg.nat.net6 else {
            return;
        };
        let ip = &ip[..emit::IPV6_HEADER_LEN + repr.payload_len];
        let payload = packet.payload();
        let (src, dst) = (
            IpAddress::Ipv6(repr.src_addr),
            IpAddress::Ipv6(repr.dst_addr),
        );
        if repr.next_header == IpProtocol::Icmpv6 {
            // Neighbor discovery comes from link-local or unspecified sources.
            match icmp::parse_v6(&src, &dst, payload) {
                None => self.counters.drop_icmp_malformed += 1,
                Some(icmp::Message::NeighborSolicit | icmp::Message::RouterSolicit)
                    if ndp::ours(&net6, &repr.src_addr) =>
                {
                    // Someone claiming our address.
                    self.counters.drop_bad_source += 1;
                }
                Some(icmp::Message::NeighborSolicit) => {
                    if ndp::answer_solicitation(&mut self.link, &net6, repr.src_addr, payload) {
                        self.counters.ndp_adverts += 1;
                    }
                }
                Some(icmp::Message::RouterSolicit) => {
                    let to = if repr.src_addr.is_unspecified() {
                        ndp::ALL_NODES
                    } else {
                        repr.src_addr
                    };
                    if ndp::advertise(&mut self.link, &net6, self.cfg.dns_enabled, to) {
                        self.counters.ndp_router_adverts += 1;
                    }
                }
                Some(msg @ icmp::Message::Echo(_)) => {
                    if self.valid_source_v6(&net6, repr.src_addr) {
                        self.handle_icmp(now, src, dst, ip, payload, msg, io);
                    } else {
                        self.counters.drop_bad_source += 1;
                    }
                }
                Some(icmp::Message::Other) => self.counters.icmp_ignored += 1,
            }
            return;
        }
        if !self.valid_source_v6(&net6, repr.src_addr) {
            self.counters.drop_bad_source += 1;
            return;
        }
        // Learn the guest's address for published ports, unless it was configured (a
        // guest with SLAAC has several: stick to one).
        if self.cfg.guest_v6.is_none() && self.guest_v6 != Some(repr.src_addr) {
            self.guest_v6 = Some(repr.src_addr);
        }
        match repr.next_header {
            IpProtocol::Tcp | IpProtocol::Udp => {
                self.handle_l4(now, src, dst, repr.next_header, ip, payload, verify, io);
            }
            // Extension headers (hop-by-hop of MLD, fragments, ...) are not handled.
            _ => self.counters.drop_ipv6_ext += 1,
        }
    }

    /// Whether `addr` is a unicast address (for ICMP errors).
    fn is_unicast(&self, addr: &IpAddress) -> bool {
        match addr {
            IpAddress::Ipv4(a) => {
                !(a.is_broadcast()
                    || a.is_multicast()
                    || a.is_unspecified()
                    || *a == self.cfg.nat.net.broadcast())
            }
            IpAddress::Ipv6(a) => !(a.is_multicast() || a.is_unspecified()),
        }
    }

    /// A guest source address for flows: in the /64, not one of ours.
    fn valid_source_v6(&self, net6: &nat::Network6, src: Ipv6Address) -> bool {
        let a = src;
        net6.contains(a) && a != net6.gateway() && a != net6.dns() && a != net6.prefix
    }

    /// Our address of `addr`'s family that reports errors: the gateway.
    fn gateway_for(&self, addr: &IpAddress) -> IpAddress {
        gateway_for(&self.cfg.nat, addr)
    }

    /// Host socket source address for a destination of `addr`'s family.
    fn outbound_for(&self, addr: &IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.cfg.outbound_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.cfg.outbound_v6.map(IpAddr::V6),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_l4(
        &mut self,
        now: Instant,
        src: IpAddress,
        dst: IpAddress,
        proto: IpProtocol,
        ip: &[u8],
        payload: &[u8],
        verify: bool,
        io: &mut Io<'_>,
    ) {
        match proto {
            IpProtocol::Udp => self.handle_udp(now, src, dst, ip, payload, verify, io),
            IpProtocol::Tcp => self.handle_tcp(now, src, dst, ip, payload, verify, io),
            IpProtocol::Icmp => match icmp::parse_v4(payload) {
                None => self.counters.drop_icmp_malformed += 1,
                Some(msg @ icmp::Message::Echo(_)) => {
                    self.handle_icmp(now, src, dst, ip, payload, msg, io)
                }
                Some(_) => self.counters.icmp_ignored += 1,
            },
            _ => self.counters.drop_protocol += 1,
        }
    }

    fn handle_dhcp(&mut self, now: Instant, payload: &[u8]) {
        let now = self.epoch + std::time::Duration::from_micros(now.total_micros().unsigned_abs());
        let Some(data) = payload.get(emit::UDP_HEADER_LEN..) else {
            self.counters.drop_udp_malformed += 1;
            return;
        };
        let gateway = self.cfg.nat.net.gateway();
        let Some(slot) = self.link.txq.slot() else {
            self.counters.dhcp_drops += 1;
            return;
        };
        // Build the reply in the slot's payload area, then the headers around it.
        let off = self.link.l2.header_len() + emit::IPV4_HEADER_LEN + emit::UDP_HEADER_LEN;
        let limit = (self.link.l2.header_len() + self.link.mtu).min(slot.len());
        let reply = match self.dhcp.handle(now, data, &mut slot[off..limit]) {
            Ok(reply) => reply,
            Err(drop) => {
                log::trace!("DHCP request dropped: {drop:?}");
                self.counters.dhcp_drops += 1;
                return;
            }
        };
        let res = emit::udp(
            &self.link.l2,
            &mut self.link.txq,
            self.link.mtu,
            (gateway.into(), 67),
            (reply.dst_ip.into(), 68),
            Some(reply.dst_mac),
            |_| Some(reply.len),
        );
        match res {
            Ok(_) => self.counters.dhcp_replies += 1,
            Err(_) => self.counters.dhcp_drops += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_tcp(
        &mut self,
        now: Instant,
        src: IpAddress,
        dst: IpAddress,
        ip: &[u8],
        payload: &[u8],
        verify: bool,
        io: &mut Io<'_>,
    ) {
        let Ok(segment) = TcpPacket::new_checked(payload) else {
            self.counters.drop_tcp_malformed += 1;
            return;
        };
        if verify && !segment.verify_checksum(&src, &dst) {
            self.counters.drop_bad_checksum += 1;
            return;
        }
        if segment.src_port() == 0 || segment.dst_port() == 0 {
            self.counters.drop_tcp_malformed += 1;
            return;
        }
        let key = FlowKey {
            guest: (src, segment.src_port()),
            remote: (dst, segment.dst_port()),
        };
        if let Some(&id) = self.tcp_map.get(&key) {
            if let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) {
                flow.ingress(now, &mut self.link, ip);
                self.mark_dirty(id);
            }
            return;
        }
        if !(segment.syn() && !segment.ack() && !segment.rst()) {
            self.counters.tcp_stray_segments += 1;
            self.reset_stray(now, src, ip);
            return;
        }
        self.open_tcp(now, key, ip, io);
    }

    /// Lets smoltcp answer a segment that belongs to no flow: a RST, as a host would.
    fn reset_stray(&mut self, now: Instant, guest: IpAddress, ip: &[u8]) {
        let l = &mut self.link;
        let mut dev = Link::device(&mut l.l2, &mut l.txq, &l.caps, Some(ip), guest, l.mtu);
        l.iface
            .poll_ingress_single(now, &mut dev, &mut self.no_flow);
    }

    fn open_tcp(&mut self, now: Instant, key: FlowKey, ip: &[u8], io: &mut Io<'_>) {
        let limits = self.cfg.limits;
        if self.tcp_map.len() >= limits.tcp_flows || self.half_open >= limits.tcp_half_open {
            self.counters.tcp_table_full += 1;
            self.reset_stray(now, key.guest.0, ip);
            return;
        }
        let target = match self.cfg.nat.translate(key.remote.0.into(), key.remote.1) {
            Ok(target) => target,
            Err(deny) => {
                log::debug!("TCP to {:?} denied: {deny:?}", key.remote);
                self.counters.tcp_denied += 1;
                match icmp::deny_reason(deny) {
                    // The host's loopback behind the gateway is switched off: the gateway
                    // has no route there ("Network is unreachable"), as in slirp4netns.
                    Some(code) => {
                        let gw = self.gateway_for(&key.remote.0);
                        icmp::emit_unreachable(&mut self.link, gw, code, ip);
                    }
                    None => self.reset_stray(now, key.guest.0, ip),
                }
                return;
            }
        };
        let opts = tcp::OpenOptions {
            outbound: self.outbound_for(&target.ip()),
            buffer: self.cfg.tcp_buffer,
        };
        let Some(guest) = self.guest_socket() else {
            self.reset_stray(now, key.guest.0, ip);
            return;
        };
        let entry = self.flows.vacant_entry();
        let id = entry.key();
        let token = Token(FLOW_TOKEN_BASE + id);
        match tcp::TcpFlow::open(key, target, ip, &opts, io.registry, token, guest) {
            Ok(mut flow) => {
                flow.ingress(now, &mut self.link, ip);
                entry.insert(Flow::Tcp(Box::new(flow)));
                self.tcp_map.insert(key, id);
                self.half_open += 1;
                self.counters.tcp_opened += 1;
                self.mark_dirty(id);
            }
            Err(tcp::OpenError::Refused) => {
                self.counters.tcp_refused += 1;
                self.reset_stray(now, key.guest.0, ip);
            }
            Err(tcp::OpenError::Unreachable(code)) => {
                self.counters.tcp_unreachable += 1;
                let gw = self.gateway_for(&key.remote.0);
                icmp::emit_unreachable(&mut self.link, gw, code, ip);
            }
            Err(tcp::OpenError::Local(e)) => {
                log::debug!("cannot open host socket for {:?}: {e}", key.remote);
                self.counters.tcp_host_errors += 1;
                self.reset_stray(now, key.guest.0, ip);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_udp(
        &mut self,
        now: Instant,
        src: IpAddress,
        dst: IpAddress,
        ip: &[u8],
        payload: &[u8],
        verify: bool,
        io: &mut Io<'_>,
    ) {
        let Some((key, data)) = udp::parse(&src, &dst, payload, verify) else {
            self.counters.drop_udp_malformed += 1;
            return;
        };
        let known = self
            .udp_map
            .get(&key)
            .or_else(|| self.udp_in_by_port.get(&(key.guest.1, key.remote)));
        let id = match known {
            Some(&id) => id,
            None => match self.open_udp(now, key, ip, io) {
                Some(id) => id,
                None => return,
            },
        };
        if !self.udp_batch.accepts(id, data) {
            self.send_udp_batch();
        }
        match self.flows.get_mut(id) {
            Some(Flow::Udp(flow)) => {
                flow.last_active = now;
                if let Some(dns) = flow.dns.as_deref_mut() {
                    dns.set_quick(self.dns_down == Some(self.counters.dns_answers));
                    dns.query(now, data);
                    if let Some(at) = dns.deadline() {
                        self.timers.arm(&mut flow.timer, id, at);
                    }
                }
            }
            Some(Flow::UdpIn(flow)) => flow.last_active = now,
            _ => return,
        }
        // A published port whose rule is gone has no route: the reply is dropped.
        if let Some((route, gso)) = udp_route(&mut self.flows, id) {
            let gso = *gso;
            self.udp_batch
                .push(id, route, gso, data, &mut self.counters);
        }
        self.report_udp_failure(now);
    }

    /// Tells the guest, by an ICMP error from the gateway (port unreachable: from the
    /// destination), of a datagram the host could not send.
    fn report_udp_failure(&mut self, now: Instant) {
        if let Some(f) = self.udp_batch.take_failure() {
            let from = match f.code {
                icmp::Unreachable::Port => f.key.remote.0,
                _ => self.gateway_for(&f.key.remote.0),
            };
            let (remote, guest) = (f.key.remote, f.key.guest);
            icmp::emit_unreachable_udp(
                &mut self.link,
                now,
                from,
                remote,
                guest,
                f.code,
                f.len,
                f.head(),
            );
        }
    }

    fn open_udp(
        &mut self,
        now: Instant,
        key: FlowKey,
        ip: &[u8],
        io: &mut Io<'_>,
    ) -> Option<usize> {
        if self.udp_map.len() >= self.cfg.limits.udp_flows {
            self.counters.udp_table_full += 1;
            return None;
        }
        let target = match self.cfg.nat.translate(key.remote.0.into(), key.remote.1) {
            Ok(target) => target,
            Err(deny) => {
                log::debug!("UDP to {:?} denied: {deny:?}", key.remote);
                self.counters.udp_denied += 1;
                let code = match deny {
                    nat::Deny::NoService => icmp::Unreachable::Port,
                    deny => icmp::deny_reason(deny).unwrap_or(icmp::Unreachable::Prohibited),
                };
                // Never an ICMP error about (or from) a broadcast or multicast address
                // (RFC 1122 3.2.2): the guest's mDNS and SSDP end here.
                if self.is_unicast(&key.remote.0) {
                    icmp::emit_unreachable(&mut self.link, key.remote.0, code, ip);
                }
                return None;
            }
        };
        let id = self.flows.vacant_key();
        let token = Token(FLOW_TOKEN_BASE + id);
        let dns = self.cfg.nat.is_dns(key.remote.0.into(), key.remote.1);
        let servers = if dns {
            &self.cfg.nat.nameservers[..]
        } else {
            std::slice::from_ref(&target)
        };
        // A nameserver the host cannot reach is skipped for the next one.
        let mut opened = Err(io::Error::from_raw_os_error(libc::ENETUNREACH));
        for (i, server) in servers.iter().enumerate() {
            let outbound = self.outbound_for(&server.ip());
            opened = udp::UdpFlow::open(now, key, *server, outbound, io.registry, token).map(
                |mut flow| {
                    if dns {
                        let quick = self.dns_down == Some(self.counters.dns_answers);
                        flow.follow_dns(servers, i, now, quick);
                    }
                    flow
                },
            );
            if opened.is_ok() {
                break;
            }
        }
        match opened {
            Ok(flow) => {
                self.flows.insert(Flow::Udp(flow));
                self.udp_map.insert(key, id);
                self.counters.udp_opened += 1;
                let at = now + self.cfg.udp_idle;
                if let Some(slot) = self.flows.get_mut(id).and_then(Flow::timer_slot) {
                    self.timers.arm(slot, id, at);
                }
                Some(id)
            }
            Err(e) => {
                log::debug!("cannot open UDP socket for {:?}: {e}", key.remote);
                self.counters.udp_host_errors += 1;
                // No route, a firewall: the guest hears of it at once, as from a router.
                if let Some(code) = icmp::unreachable_for(&e) {
                    if self.link.icmp_limit.allow(now) {
                        let gw = self.gateway_for(&key.remote.0);
                        icmp::emit_unreachable(&mut self.link, gw, code, ip);
                    }
                }
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_icmp(
        &mut self,
        now: Instant,
        src: IpAddress,
        dst: IpAddress,
        ip: &[u8],
        payload: &[u8],
        msg: icmp::Message,
        io: &mut Io<'_>,
    ) {
        let icmp::Message::Echo(ident) = msg else {
            self.counters.icmp_ignored += 1;
            return;
        };
        let ours = match dst {
            IpAddress::Ipv4(d) => d == self.cfg.nat.net.gateway() || d == self.cfg.nat.net.dns(),
            IpAddress::Ipv6(d) => self.cfg.nat.net6.is_some_and(|n| ndp::ours(&n, &d)),
        };
        if ours {
            if icmp::emit_echo_reply(&mut self.link, dst, src, payload) {
                self.counters.icmp_echo_local += 1;
            } else {
                self.counters.icmp_reply_dropped += 1;
            }
            return;
        }
        if self.cfg.nat.translate(dst.into(), 0).is_err() {
            self.counters.icmp_denied += 1;
            return;
        }
        let key = FlowKey {
            guest: (src, ident),
            remote: (dst, 0),
        };
        let id = match self.icmp_map.get(&key) {
            Some(&id) => id,
            None => {
                if self.icmp_map.len() >= self.cfg.limits.icmp_flows {
                    self.counters.icmp_denied += 1;
                    return;
                }
                let outbound = self.outbound_for(&dst.into());
                let entry = self.flows.vacant_entry();
                let id = entry.key();
                let token = Token(FLOW_TOKEN_BASE + id);
                match icmp::IcmpFlow::open(now, key, outbound, io.registry, token) {
                    Ok(flow) => {
                        entry.insert(Flow::Icmp(flow));
                        self.icmp_map.insert(key, id);
                        self.counters.icmp_opened += 1;
                        if let Some(slot) = self.flows.get_mut(id).and_then(Flow::timer_slot) {
                            self.timers.arm(slot, id, now + icmp::IDLE);
                        }
                        id
                    }
                    Err(e) => {
                        // Typically EACCES: net.ipv4.ping_group_range excludes our gid.
                        // Never fake a reply: tell the guest the echo cannot pass.
                        log::debug!("cannot open ping socket: {e}");
                        self.counters.icmp_denied += 1;
                        let gw = self.gateway_for(&dst);
                        icmp::emit_unreachable(
                            &mut self.link,
                            gw,
                            icmp::Unreachable::Prohibited,
                            ip,
                        );
                        return;
                    }
                }
            }
        };
        if let Some(Flow::Icmp(flow)) = self.flows.get_mut(id) {
            flow.send(now, payload);
        }
    }

    /// Replaces the DNS forwarder's nameservers (the host's resolv.conf changed). Its UDP
    /// flows are closed, so that the guest's next queries go to the new servers; TCP
    /// connections finish with the old ones. Nothing with the forwarder disabled.
    pub fn set_nameservers(&mut self, list: Vec<std::net::SocketAddr>, io: &mut Io<'_>) {
        if !self.cfg.dns_enabled {
            return;
        }
        self.cfg.nat.nameservers = list;
        self.dns_down = None;
        let stale: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, f)| matches!(f, Flow::Udp(u) if u.dns.is_some()))
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.close_flow(id, io);
        }
    }

    /// Takes a readiness event for `token` (a flow token, `>= FLOW_TOKEN_BASE`); `hup`:
    /// the peer of a stream socket closed its sending side (`EPOLLRDHUP`).
    pub fn handle_ready(
        &mut self,
        now: Instant,
        token: Token,
        readable: bool,
        writable: bool,
        hup: bool,
        io: &mut Io<'_>,
    ) {
        let Some(id) = token.0.checked_sub(FLOW_TOKEN_BASE) else {
            return;
        };
        let mtu = self.link.mtu;
        match self.flows.get_mut(id) {
            Some(Flow::Tcp(flow)) => {
                flow.on_ready(readable, writable, hup);
                self.mark_dirty(id);
            }
            Some(Flow::Udp(flow)) => {
                if readable {
                    let done = flow.receive(now, &mut self.link, mtu, io, &mut self.counters);
                    if !done {
                        self.mark_dirty(id);
                    }
                }
            }
            Some(Flow::Icmp(flow)) => {
                if readable {
                    flow.receive(now, &mut self.link, io, &mut self.counters);
                }
            }
            Some(Flow::Port(_)) => {
                if readable {
                    self.port_ready(now, id, io);
                }
            }
            Some(Flow::UdpIn(_)) | None => {}
        }
    }

    fn mark_dirty(&mut self, id: usize) {
        if let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) {
            if flow.dirty {
                return;
            }
            flow.dirty = true;
        }
        self.dirty.push(id);
    }

    /// Services the flows whose timers are due, sends router advertisements and asks
    /// for the guest's MAC address while it is unknown.
    pub fn handle_timeouts(&mut self, now: Instant, io: &mut Io<'_>) {
        if let (Some(at), Some(net6)) = (self.next_ra, self.cfg.nat.net6) {
            if now >= at {
                if ndp::advertise(&mut self.link, &net6, self.cfg.dns_enabled, ndp::ALL_NODES) {
                    self.counters.ndp_router_adverts += 1;
                }
                self.next_ra = Some(ndp::next_advert(now, self.ra_sent));
                self.ra_sent = self.ra_sent.saturating_add(1);
            }
        }
        if let (None, Some(guest)) = (self.link.l2.guest_mac(), self.cfg.guest_v4) {
            let before = self.link.l2.counters.arp_probes;
            self.link.l2.probe_guest(now, guest, &mut self.link.txq);
            self.counters.arp_probes += self.link.l2.counters.arp_probes - before;
        }
        while let Some((at, id)) = self.timers.pop_due(now) {
            let Some(flow) = self.flows.get_mut(id) else {
                continue;
            };
            let Some(slot) = flow.timer_slot() else {
                continue;
            };
            if *slot != Some(at) {
                continue;
            }
            *slot = None;
            // Datagram flows close after their idle time; TCP flows let smoltcp decide.
            let idle = match flow {
                Flow::Tcp(_) => {
                    self.mark_dirty(id);
                    continue;
                }
                Flow::Udp(f) => {
                    let idle = f.last_active + self.cfg.udp_idle;
                    let servfail = self.counters.dns_servfail;
                    let (silent, dns_at) = f.poll_dns(now, &mut self.link, &mut self.counters);
                    if let Some(server) = silent {
                        self.cfg.nat.demote_nameserver(server);
                    }
                    if self.counters.dns_servfail != servfail {
                        // No nameserver answers: quick flows until one does.
                        self.dns_down = Some(self.counters.dns_answers);
                    }
                    match dns_at {
                        Some(at) if at < idle => {
                            if let Some(slot) = self.flows.get_mut(id).and_then(Flow::timer_slot) {
                                self.timers.arm(slot, id, at);
                            }
                            continue;
                        }
                        _ => idle,
                    }
                }
                Flow::UdpIn(f) => f.last_active + self.cfg.udp_idle,
                Flow::Icmp(f) => f.last_active + icmp::IDLE,
                Flow::Port(_) => {
                    // A retry after EMFILE.
                    self.port_ready(now, id, io);
                    continue;
                }
            };
            if now >= idle {
                self.close_flow(id, io);
            } else if let Some(slot) = self.flows.get_mut(id).and_then(Flow::timer_slot) {
                self.timers.arm(slot, id, idle);
            }
        }
    }

    /// Sends the guest datagrams waiting in the UDP batch.
    fn send_udp_batch(&mut self) {
        let Some(id) = self.udp_batch.flow() else {
            return;
        };
        match udp_route(&mut self.flows, id) {
            Some((route, gso)) => {
                if !self.udp_batch.send(route, &mut self.counters) {
                    *gso = false;
                }
            }
            None => self.udp_batch.clear(),
        }
    }

    /// Sends the guest datagrams that wait in a batch, then relays data and sends
    /// segments for every flow touched since the last call. Call after every batch of
    /// guest frames.
    pub fn poll_flows(&mut self, now: Instant, io: &mut Io<'_>) {
        self.send_udp_batch();
        self.report_udp_failure(now);
        // A flow serviced here may be marked dirty again (its host socket became
        // writable meanwhile): the outer loop picks that up.
        while !self.dirty.is_empty() {
            let batch = std::mem::take(&mut self.dirty);
            for &id in &batch {
                self.poll_flow(now, id, io);
            }
            // Reuse the allocation.
            let mut batch = batch;
            batch.clear();
            if self.dirty.is_empty() {
                self.dirty = batch;
            }
        }
    }

    fn poll_flow(&mut self, now: Instant, id: usize, io: &mut Io<'_>) {
        match self.flows.get_mut(id) {
            Some(Flow::Tcp(flow)) => {
                flow.dirty = false;
                let was_connecting = flow.is_connecting();
                let status = flow.poll(now, &mut self.link, io, &mut self.counters);
                if was_connecting && !flow.is_connecting() {
                    self.half_open -= 1;
                }
                match status {
                    tcp::Status::Alive(Some(at)) => {
                        // Until the guest's MAC is known smoltcp keeps asking to send
                        // now; the ARP probe is under way, do not spin.
                        let at = if self.link.l2.guest_mac().is_none() {
                            at.max(now + Duration::from_millis(20))
                        } else {
                            at
                        };
                        self.timers.arm(&mut flow.timer, id, at);
                    }
                    tcp::Status::Alive(None) => {}
                    tcp::Status::Unreachable(code) => {
                        self.counters.tcp_unreachable += 1;
                        let gw = gateway_for(&self.cfg.nat, &flow.key.remote.0);
                        icmp::emit_unreachable(&mut self.link, gw, code, flow.syn());
                        self.close_flow(id, io);
                    }
                    tcp::Status::Done => self.close_flow(id, io),
                }
            }
            Some(Flow::Udp(flow)) => {
                let mtu = self.link.mtu;
                if !flow.receive(now, &mut self.link, mtu, io, &mut self.counters) {
                    // The guest link is congested: retry shortly.
                    let at = now + Duration::from_millis(1);
                    self.timers.arm(&mut flow.timer, id, at);
                }
            }
            _ => {}
        }
    }

    fn close_flow(&mut self, id: usize, io: &mut Io<'_>) {
        if self.udp_batch.flow() == Some(id) {
            self.send_udp_batch();
        }
        let Some(flow) = self.flows.try_remove(id) else {
            return;
        };
        match flow {
            Flow::Tcp(f) => {
                if f.is_connecting() {
                    self.half_open -= 1;
                }
                self.tcp_map.remove(&f.key);
                let light = f.moved() <= POOL_MAX_MOVED;
                let guest = f.close(io.registry);
                if light && self.socket_pool.len() < SOCKET_POOL {
                    self.socket_pool.push(guest);
                }
                self.counters.tcp_closed += 1;
            }
            Flow::Udp(mut f) => {
                self.udp_map.remove(&f.key);
                f.close(io.registry);
                self.counters.udp_closed += 1;
            }
            Flow::UdpIn(f) => {
                self.udp_map.remove(&f.key);
                self.udp_in_by_port.remove(&(f.key.guest.1, f.key.remote));
                self.counters.udp_closed += 1;
            }
            Flow::Icmp(mut f) => {
                self.icmp_map.remove(&f.key);
                f.close(io.registry);
                self.counters.icmp_closed += 1;
            }
            Flow::Port(mut l) => l.close(io.registry),
        }
    }

    /// Publishes a port: listens on `host` and forwards to `guest_addr` (default: the
    /// guest's `net+100`) port `guest_port`.
    ///
    /// # Errors
    /// [`port::PortError`] when the rule is invalid or the host socket cannot listen.
    pub fn add_port(
        &mut self,
        proto: port::Proto,
        host: std::net::SocketAddr,
        guest_addr: Option<Ipv4Addr>,
        guest_port: u16,
        registry: &mio::Registry,
    ) -> Result<port::PortRule, port::PortError> {
        let net = self.cfg.nat.net;
        let guest_ip = guest_addr.unwrap_or(net.guest());
        if host.port() == 0 || guest_port == 0 {
            return Err(port::PortError::Invalid("ports must be 1..65535"));
        }
        if !net.contains(guest_ip)
            || [net.addr, net.gateway(), net.dns(), net.broadcast()].contains(&guest_ip)
        {
            return Err(port::PortError::Invalid(
                "the guest address must be a host address of the guest network",
            ));
        }
        if self.ports.len() >= self.cfg.limits.ports {
            return Err(port::PortError::TooMany(self.cfg.limits.ports));
        }
        let rule = port::PortRule {
            id: self.next_port_id,
            proto,
            host,
            guest: std::net::SocketAddrV4::new(guest_ip, guest_port),
        };
        let entry = self.flows.vacant_entry();
        let id = entry.key();
        let listener = port::Listener::open(rule.clone(), registry, Token(FLOW_TOKEN_BASE + id))?;
        entry.insert(Flow::Port(Box::new(listener)));
        self.ports.insert(rule.id, id);
        self.next_port_id += 1;
        Ok(rule)
    }

    /// Unpublishes a port. Connections already made through it keep going.
    ///
    /// # Errors
    /// [`port::PortError::NotFound`] for an unknown id.
    pub fn remove_port(&mut self, rule_id: u32, io: &mut Io<'_>) -> Result<(), port::PortError> {
        let id = self
            .ports
            .remove(&rule_id)
            .ok_or(port::PortError::NotFound(rule_id))?;
        self.close_flow(id, io);
        Ok(())
    }

    /// The published ports, by id.
    pub fn port_rules(&self) -> Vec<port::PortRule> {
        self.ports
            .values()
            .filter_map(|&id| match self.flows.get(id) {
                Some(Flow::Port(l)) => Some(l.rule.clone()),
                _ => None,
            })
            .collect()
    }

    /// The two ends of a published-port flow for `client`: the guest end (the rule's
    /// IPv4 target, or the guest's IPv6 address for an IPv6 client when the guest has
    /// one) and the source the guest sees (the client itself where the guest can route
    /// back to it, else the gateway, with a port free for that guest end).
    fn inbound_ends(
        &self,
        client: std::net::SocketAddr,
        rule_guest: std::net::SocketAddrV4,
        tcp: bool,
    ) -> ((IpAddress, u16), (IpAddress, u16)) {
        let net6 = self.cfg.nat.net6;
        let guest = match (client, net6, self.guest_v6) {
            (std::net::SocketAddr::V6(_), Some(_), Some(g6)) => {
                (IpAddress::Ipv6(g6), rule_guest.port())
            }
            _ => (IpAddress::Ipv4(*rule_guest.ip()), rule_guest.port()),
        };
        if let Some(c) = port::routable_client(client, &self.cfg.nat.net, net6.as_ref()) {
            let ip = IpAddress::from(c.ip());
            if std::mem::discriminant(&ip) == std::mem::discriminant(&guest.0) {
                return (guest, (ip, c.port()));
            }
        }
        let gw = self.gateway_for(&guest.0);
        let map = if tcp { &self.tcp_map } else { &self.udp_map };
        let mut p = client.port().max(1024);
        for _ in 0..64 {
            if !map.contains_key(&FlowKey {
                guest,
                remote: (gw, p),
            }) {
                break;
            }
            p = if p == u16::MAX { 1024 } else { p + 1 };
        }
        (guest, (gw, p))
    }

    fn port_ready(&mut self, now: Instant, id: usize, io: &mut Io<'_>) {
        loop {
            let Some(Flow::Port(l)) = self.flows.get(id) else {
                return;
            };
            let (rule_id, host, guest) = (l.rule.id, l.rule.host, l.rule.guest);
            let listener = match &l.socket {
                port::ListenSocket::Tcp(listener) => listener,
                port::ListenSocket::Udp(_) => {
                    return self.port_datagrams(now, id, rule_id, guest, io)
                }
            };
            let (stream, client) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog, and no
                    // new edge will announce it: try again shortly.
                    log::debug!("accept on {host} failed: {e}");
                    self.counters.tcp_host_errors += 1;
                    if let Some(Flow::Port(l)) = self.flows.get_mut(id) {
                        self.timers.arm(&mut l.retry, id, now + ACCEPT_RETRY);
                    }
                    return;
                }
            };
            if self.tcp_map.len() >= self.cfg.limits.tcp_flows {
                self.counters.tcp_table_full += 1;
                let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            } else {
                self.accept_tcp(stream, client, guest, io);
            }
        }
    }

    fn accept_tcp(
        &mut self,
        stream: mio::net::TcpStream,
        client: std::net::SocketAddr,
        rule_guest: std::net::SocketAddrV4,
        io: &mut Io<'_>,
    ) {
        let (guest, remote) = self.inbound_ends(client, rule_guest, true);
        let key = FlowKey { guest, remote };
        let Some(guest) = self.guest_socket() else {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        };
        let entry = self.flows.vacant_entry();
        let id = entry.key();
        let token = Token(FLOW_TOKEN_BASE + id);
        match tcp::TcpFlow::accept(key, stream, &mut self.link, io.registry, token, guest) {
            Ok(flow) => {
                entry.insert(Flow::Tcp(Box::new(flow)));
                self.tcp_map.insert(key, id);
                self.counters.tcp_opened += 1;
                self.mark_dirty(id);
            }
            Err(e) => {
                log::debug!("cannot forward connection from {client}: {e:?}");
                self.counters.tcp_host_errors += 1;
            }
        }
    }

    /// Moves datagrams received on a published UDP port into the guest.
    fn port_datagrams(
        &mut self,
        now: Instant,
        id: usize,
        rule_id: u32,
        rule_guest: std::net::SocketAddrV4,
        io: &mut Io<'_>,
    ) {
        loop {
            let Some(Flow::Port(l)) = self.flows.get(id) else {
                return;
            };
            let port::ListenSocket::Udp(sock) = &l.socket else {
                return;
            };
            let (n, client, local) = match sys::recv_with_dst(sock.as_raw_fd(), &mut self.scratch) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let (guest, remote) = self.inbound_ends(client, rule_guest, false);
            let key = FlowKey { guest, remote };
            match self.udp_map.get(&key).and_then(|&f| self.flows.get_mut(f)) {
                Some(Flow::UdpIn(f)) => {
                    f.last_active = now;
                    f.client = client;
                    f.local = local;
                }
                Some(_) => {}
                None => {
                    if self.udp_map.len() >= self.cfg.limits.udp_flows {
                        self.counters.udp_table_full += 1;
                        continue;
                    }
                    let fid = self.flows.insert(Flow::UdpIn(udp::InboundFlow {
                        key,
                        listener: id,
                        rule_id,
                        client,
                        local,
                        last_active: now,
                        timer: None,
                        gso: true,
                    }));
                    self.udp_map.insert(key, fid);
                    self.udp_in_by_port.insert((key.guest.1, key.remote), fid);
                    self.counters.udp_opened += 1;
                    if let Some(slot) = self.flows.get_mut(fid).and_then(Flow::timer_slot) {
                        self.timers.arm(slot, fid, now + self.cfg.udp_idle);
                    }
                }
            }
            let data = &self.scratch[..n];
            let mtu = self.link.mtu;
            let send = |link: &mut Link| {
                emit::udp(&link.l2, &mut link.txq, mtu, remote, guest, None, |buf| {
                    buf.get_mut(..data.len())?.copy_from_slice(data);
                    Some(data.len())
                })
            };
            let mut res = send(&mut self.link);
            if res == Err(emit::EmitError::QueueFull) && self.link.flush(io.tap, &mut self.counters)
            {
                res = send(&mut self.link);
            }
            match res {
                Ok(_) => {}
                Err(emit::EmitError::TooBig) => self.counters.udp_too_big += 1,
                Err(emit::EmitError::NoNeighbor) => {
                    // `park` needs `&mut self`: lend it the buffer (a move, no copy).
                    let scratch = std::mem::take(&mut self.scratch);
                    self.park(now, guest.0, remote, guest, &scratch[..n]);
                    self.scratch = scratch;
                }
                Err(_) => self.counters.udp_send_dropped += 1,
            }
        }
    }

    /// Keeps a datagram for the guest until its MAC address is known, and asks for it.
    fn park(
        &mut self,
        now: Instant,
        to: IpAddress,
        src: (IpAddress, u16),
        dst: (IpAddress, u16),
        data: &[u8],
    ) {
        if let IpAddress::Ipv4(g) = to {
            self.link.l2.probe_guest(now, g, &mut self.link.txq);
        }
        if self.parked.len() >= MAX_PARKED {
            self.counters.udp_send_dropped += 1;
            return;
        }
        let mtu = self.link.mtu;
        let built = emit::udp(
            &self.link.l2,
            &mut self.link.txq,
            mtu,
            src,
            dst,
            Some(EthernetAddress::BROADCAST),
            |buf| {
                buf.get_mut(..data.len())?.copy_from_slice(data);
                Some(data.len())
            },
        );
        match built {
            Ok(_) => {
                if let Some(frame) = self.link.txq.uncommit_last() {
                    self.parked.push(frame.to_vec());
                }
            }
            Err(_) => self.counters.udp_send_dropped += 1,
        }
    }

    /// Sends the parked frames now that the guest's MAC address is known.
    fn release_parked(&mut self, io: &mut Io<'_>) {
        let Some(mac) = self.link.l2.guest_mac() else {
            return;
        };
        let at = self.link.l2.header_len() - stack::l2::ETHERNET_HEADER_LEN;
        for frame in std::mem::take(&mut self.parked) {
            if self.link.txq.is_full() {
                self.link.flush(io.tap, &mut self.counters);
            }
            let Some(slot) = self.link.txq.slot() else {
                self.counters.udp_send_dropped += 1;
                continue;
            };
            slot[..frame.len()].copy_from_slice(&frame);
            slot[at..at + 6].copy_from_slice(mac.as_bytes());
            self.link.txq.commit(frame.len());
        }
    }

    /// Writes the transmit queue to the guest. Returns false when the device would
    /// block; call again when it is writable.
    pub fn flush(&mut self, tap: &mut dyn FrameSink) -> bool {
        self.link.flush(tap, &mut self.counters)
    }

    /// Whether frames are waiting for the guest.
    pub fn has_pending_tx(&self) -> bool {
        !self.link.txq.is_empty()
    }

    /// When [`handle_timeouts`](Self::handle_timeouts) is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let probe = (self.link.l2.guest_mac().is_none() && self.cfg.guest_v4.is_some())
            .then(|| self.link.l2.next_probe());
        [self.timers.next(), self.next_ra, probe.flatten()]
            .into_iter()
            .flatten()
            .min()
    }
}
