//! The NAT: every flow between the members and the host, and the published ports.
//!
//! # Theory of operation
//!
//! [`Nat`] is the part of the gateway port that re-originates guest flows with host
//! sockets (outbound NAT in user space) and brings host connections in (published ports,
//! DNAT). The gateway ([`crate::gateway`]) hands it every IP packet from a member that is
//! not for the virtual services; it answers through the gateway's [`Link`], whose frames
//! the switch ([`crate::switch`]) delivers to the member that owns the destination.
//!
//! - One token table ([`Flow`] in a `Slab`) holds TCP, UDP, ICMP flows and the published
//!   ports' listeners; a flow's index there is its id, which names its host socket to
//!   the [`HostIo`] ([`crate::host`]). Three maps find a flow by the key the guest sees on
//!   the wire.
//! - TCP: one smoltcp socket per flow, each in its own `SocketSet` ([`crate::tcp`]); UDP
//!   and ICMP bypass smoltcp with connected host sockets ([`crate::udp`], [`crate::icmp`]).
//! - Where a destination goes (host loopback, DNS, denied) is [`crate::nat::NatConfig`]'s
//!   decision; this type keeps the state, in three parts by concern: the flow table
//!   ([`FlowTable`]: flows and listeners, key maps, timers, the turn's dirty list, limits
//!   and per-member quotas, the pool of guest sockets), the published ports' own state
//!   ([`port::Published`]: rules, inbound UDP associations, parked frames) and
//!   the DNS forwarder's upstreams and health ([`crate::dns_relay::Upstreams`]).
//!
//! Limits: every table is bounded by [`Limits`] (one flow table and one set of limits for
//! all members of a network); when full, new flows are refused (TCP: RST, UDP/ICMP:
//! dropped) and counted, established flows keep going. Closed TCP sockets are pooled
//! ([`SOCKET_POOL`]) so that connection churn allocates nothing.
//!
//! Security: keys are guest-controlled, so the maps keep std's random-keyed SipHash.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use slab::Slab;
use smoltcp::iface::SocketSet;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, IpAddress, IpProtocol, Ipv6Address, TcpPacket};

use crate::{
    dns_relay, egress, emit, icmp, names, nat, port, splice, tcp, timer, udp, Close, Config,
    Counters, FlowKey, HostIo, Io, Limits, Link, Ready, SpliceTo, Topology,
};

/// An entry of the token table: a flow, or a published port's listener.
pub(crate) enum Flow {
    Tcp(Box<tcp::TcpFlow>),
    Udp(udp::UdpFlow),
    UdpIn(udp::InboundFlow),
    Icmp(icmp::IcmpFlow),
    Port(Box<port::Listener>),
    /// A flow the host relays by itself, pasta's splice path ([`crate::splice`]).
    Splice(splice::SpliceFlow),
}

impl Flow {
    fn timer_slot(&mut self) -> Option<&mut Option<Instant>> {
        match self {
            Flow::Tcp(f) => Some(&mut f.timer),
            Flow::Udp(f) => Some(&mut f.timer),
            Flow::UdpIn(f) => Some(&mut f.timer),
            Flow::Icmp(f) => Some(&mut f.timer),
            Flow::Port(l) => Some(&mut l.retry),
            Flow::Splice(splice::SpliceFlow::Assoc { timer, .. }) => Some(timer),
            Flow::Splice(_) => None,
        }
    }
}

/// Our address of `addr`'s family that reports errors: the gateway.
fn gateway_for(nat: &nat::NatConfig, addr: &IpAddress) -> IpAddress {
    match addr {
        IpAddress::Ipv4(_) => IpAddress::Ipv4(nat.net.gateway()),
        IpAddress::Ipv6(_) => {
            IpAddress::Ipv6(nat.net6.map_or(nat::ROUTER_LINK_LOCAL, |n| n.gateway()))
        }
    }
}

/// Room for an answer the DNS address gives itself: the question (at most 274 bytes)
/// and its records (two addresses, or a member's name), a few hundred bytes at most.
const ANSWER_HERE_MAX: usize = 1024;

/// Answers the guest's DNS query of flow `key` from usernet itself when `answer` writes
/// an answer and returns its length; `None` when it does not (the query goes on), else
/// whether the answer went into the guest's queue (`udp_send_dropped` when not). The
/// answer is decided before it takes a slot of the queue: a full queue loses an answer,
/// never a query that was to go on.
fn answer_here(
    link: &mut Link,
    c: &mut Counters,
    key: FlowKey,
    answer: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> Option<bool> {
    let mut buf = [0u8; ANSWER_HERE_MAX];
    let n = answer(&mut buf)?;
    let sent = emit::udp(emit::Out::of(link), key.remote, key.guest, None, |out| {
        let out = out.get_mut(..n)?;
        out.copy_from_slice(&buf[..n]);
        Some(n)
    });
    if sent.is_err() {
        c.udp_send_dropped += 1;
    }
    Some(sent.is_ok())
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
            if l.rule.proto != port::Proto::Udp || l.rule.id != f.rule_id {
                return None;
            }
            // Replies from the address the client used (the rule's socket may be bound
            // to a wildcard address).
            udp::Route {
                id: f.listener,
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

/// The NAT: flows, published ports and their tables.
pub struct Nat {
    cfg: Arc<Config>,
    /// Every flow and listener, and the ways to find them.
    table: FlowTable,
    /// The published ports' rules and their inbound state.
    published: port::Published,
    /// The DNS forwarder's upstreams and health, and the member names it answers.
    dns: dns_relay::Upstreams,
    /// Guest datagrams of one flow waiting to leave together.
    udp_batch: udp::Batch,
    /// No flow leaves the network (an `--internal` network).
    internal: bool,
    /// The egress policies, checked once per new flow.
    pub(crate) egress: egress::Egress,
    /// The SYNs the egress policies denied last.
    denied_syns: DeniedSyns,
}

/// The last SYNs the egress policies denied, by flow and initial sequence number: a
/// guest that sends one again (no ICMP error reached it, or its stack goes on despite
/// one) makes the same attempt, which the rules' hits and `egress_denied` count once.
#[derive(Default)]
struct DeniedSyns {
    recent: [Option<(FlowKey, u32)>; 16],
    next: usize,
}

impl DeniedSyns {
    fn contains(&self, key: &FlowKey, isn: u32) -> bool {
        self.recent.contains(&Some((*key, isn)))
    }

    fn insert(&mut self, key: FlowKey, isn: u32) {
        self.recent[self.next] = Some((key, isn));
        self.next = (self.next + 1) % self.recent.len();
    }
}

/// What a protocol handler works with for one packet or event: the link its answers go
/// to, the counters, the host side, and the time.
pub(crate) struct Cx<'a, 'io, H> {
    pub link: &'a mut Link,
    pub c: &'a mut Counters,
    pub io: &'a mut Io<'io, H>,
    pub now: Instant,
}

/// A guest's IP packet, parsed down to its transport payload.
#[derive(Clone, Copy)]
pub(crate) struct Packet<'a> {
    pub src: IpAddress,
    pub dst: IpAddress,
    /// The whole IP packet (quoted in ICMP errors, parked SYNs).
    pub ip: &'a [u8],
    /// The transport header and data.
    pub payload: &'a [u8],
    /// Check the transport checksum (not when the TAP said it is partial or verified).
    pub verify: bool,
}

/// The token table: every flow and published port's listener, the maps that find a flow
/// by the key the guest sees, its timers and the flows to relay this turn, with the
/// limits that bound them (per member too, in a network).
pub(crate) struct FlowTable {
    flows: Slab<Flow>,
    tcp_map: HashMap<FlowKey, usize>,
    udp_map: HashMap<FlowKey, usize>,
    icmp_map: HashMap<FlowKey, usize>,
    timers: timer::Timers,
    /// TCP flows touched this turn, to relay.
    dirty: Vec<usize>,
    /// An empty socket set, for smoltcp calls that need one.
    no_flow: SocketSet<'static>,
    /// TCP flows whose host connect is pending.
    half_open: usize,
    /// Spliced flows.
    spliced: usize,
    /// Spliced UDP associations (of `-U` listeners and of published ports' loopback
    /// clients) by (listener, client, local address the client sent to): a client that
    /// sends from one socket to two local addresses has an association for each, each
    /// answering from its own address.
    splice_assoc: HashMap<(usize, std::net::SocketAddr, Option<IpAddr>), usize>,
    /// Flows per guest address, when [`member_limit`](Self::member_limit) is set.
    member_flows: HashMap<IpAddress, usize>,
    /// Most flows (TCP, UDP, ICMP together) one guest address may have open.
    member_limit: Option<usize>,
    /// Closed guest sockets kept for the next flows (at most [`SOCKET_POOL`]).
    socket_pool: Vec<tcp::Guest>,
}

impl FlowTable {
    fn new(member_limit: Option<usize>) -> FlowTable {
        FlowTable {
            flows: Slab::new(),
            tcp_map: HashMap::new(),
            udp_map: HashMap::new(),
            icmp_map: HashMap::new(),
            timers: timer::Timers::new(),
            dirty: Vec::new(),
            no_flow: SocketSet::new(Vec::new()),
            spliced: 0,
            splice_assoc: HashMap::new(),
            half_open: 0,
            member_flows: HashMap::new(),
            member_limit,
            socket_pool: Vec::with_capacity(SOCKET_POOL),
        }
    }

    /// A datagram passed through spliced association `id`, either way, at `now`: its idle
    /// time starts again.
    fn touch_assoc(&mut self, id: usize, now: Instant) {
        if let Some(Flow::Splice(splice::SpliceFlow::Assoc { last_active, .. })) =
            self.flows.get_mut(id)
        {
            *last_active = now;
        }
    }

    /// Whether `guest` has as many flows open as a member may (counted).
    fn member_full(&self, c: &mut Counters, guest: &IpAddress) -> bool {
        let full = self
            .member_limit
            .is_some_and(|limit| self.member_flows.get(guest).is_some_and(|&n| n >= limit));
        if full {
            c.member_flow_limit += 1;
        }
        full
    }

    /// A flow of `guest` opened.
    fn member_opened(&mut self, guest: IpAddress) {
        if self.member_limit.is_some() {
            *self.member_flows.entry(guest).or_insert(0) += 1;
        }
    }

    /// A flow of `guest` ended.
    fn member_release(&mut self, guest: IpAddress) {
        if self.member_limit.is_none() {
            return;
        }
        if let Some(n) = self.member_flows.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.member_flows.remove(&guest);
            }
        }
    }

    /// Puts flow `id` on this turn's list to relay.
    fn mark_dirty(&mut self, id: usize) {
        if let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) {
            if flow.dirty {
                return;
            }
            flow.dirty = true;
        }
        self.dirty.push(id);
    }
}

impl Nat {
    /// Empty tables for `cfg`; a [`Topology::Network`] shares them between members
    /// (each with at most its share of flows; no flow leaves an internal one).
    pub fn new(cfg: Arc<Config>, topology: Topology) -> Nat {
        let (member_limit, internal) = match topology {
            Topology::Single => (None, false),
            Topology::Network {
                member_flows,
                internal,
            } => (Some(member_flows), internal),
        };
        Nat {
            table: FlowTable::new(member_limit),
            published: port::Published::new(cfg.guest_v6, member_limit.is_some()),
            dns: dns_relay::Upstreams::new(cfg.nameservers.clone()),
            udp_batch: udp::Batch::new(),
            internal,
            egress: egress::Egress::default(),
            denied_syns: DeniedSyns::default(),
            cfg,
        }
    }

    /// The member names the DNS address answers.
    pub(crate) fn names_mut(&mut self) -> &mut names::Names {
        &mut self.dns.names
    }

    /// Where a guest destination goes on the host.
    fn translate(&self, dst: IpAddr, port: u16) -> Result<std::net::SocketAddr, nat::Deny> {
        if self.internal {
            return Err(nat::Deny::NotRoutable);
        }
        if !self.cfg.dns_enabled && self.cfg.nat.is_dns_address(dst) {
            return Err(nat::Deny::Nobody);
        }
        self.cfg.nat.translate(dst, port, &self.dns.nameservers)
    }

    /// Where a new flow of `key` goes on the host, if the NAT and the egress policy let
    /// it: [`translate`](Self::translate), then the policy (once per flow, never per
    /// packet). `again`: an attempt the policy already counted (a SYN sent again), now
    /// decided without counting or logging it.
    fn admit(
        &mut self,
        now: Instant,
        c: &mut Counters,
        proto: egress::Proto,
        key: &FlowKey,
        again: bool,
    ) -> Result<std::net::SocketAddr, nat::Deny> {
        let target = self.translate(key.remote.0.into(), key.remote.1)?;
        if self.egress.is_empty() {
            return Ok(target);
        }
        let f = self.flow_dst(proto, key, target.ip());
        let guest = key.guest.0.into();
        let denied = if again {
            self.egress.denies(now, guest, &f)
        } else {
            self.egress.check(now, guest, &f).action == egress::Action::Deny
        };
        if !denied {
            return Ok(target);
        }
        if !again {
            c.egress_denied += 1;
        }
        Err(nat::Deny::Egress)
    }

    /// What the egress policy looks at of a flow of `key` that goes to `host`.
    fn flow_dst(&self, proto: egress::Proto, key: &FlowKey, host: IpAddr) -> egress::FlowDst {
        egress::FlowDst {
            proto,
            dst: key.remote.0.into(),
            host,
            port: key.remote.1,
            dns_service: self.to_dns_forwarder(*key),
        }
    }

    /// Whether a guest's flow goes to the DNS forwarder (the DNS address, port 53).
    fn to_dns_forwarder(&self, key: FlowKey) -> bool {
        key.remote.1 == 53 && self.cfg.nat.is_dns_address(key.remote.0.into())
    }

    /// With names filtered by the egress policy: answers NXDOMAIN to a DNS query for a
    /// name it does not allow; false when the query may go on.
    fn refuse_name(&self, link: &mut Link, c: &mut Counters, key: FlowKey, query: &[u8]) -> bool {
        if self.egress.is_empty() || !self.to_dns_forwarder(key) {
            return false;
        }
        let guest = IpAddr::from(key.guest.0);
        match answer_here(link, c, key, |buf| self.egress.refuse(guest, query, buf)) {
            None => return false,
            Some(true) => c.egress_names_refused += 1,
            Some(false) => {}
        }
        true
    }

    /// Answers a DNS query for a member name; false when the query is not for one.
    fn answer_name(&self, link: &mut Link, c: &mut Counters, key: FlowKey, query: &[u8]) -> bool {
        if self.dns.names.is_empty() || !self.to_dns_forwarder(key) {
            return false;
        }
        match answer_here(link, c, key, |buf| self.dns.names.answer(query, buf)) {
            None => return false,
            Some(true) => c.dns_names_answered += 1,
            Some(false) => {}
        }
        true
    }

    /// Learns the guest's IPv6 address from its traffic, unless it was configured (a
    /// guest with SLAAC has several: stick to one).
    pub(crate) fn learn_guest_v6(&mut self, src: Ipv6Address) {
        if !self.published.shared
            && self.cfg.guest_v6.is_none()
            && self.published.guest_v6 != Some(src)
        {
            self.published.guest_v6 = Some(src);
        }
    }

    /// Whether frames wait for the guest's MAC address.
    pub(crate) fn has_parked(&self) -> bool {
        !self.published.parked.is_empty()
    }

    /// When the next flow timer is due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.table.timers.next()
    }

    /// Closed TCP sockets waiting for reuse.
    pub fn pooled_sockets(&self) -> usize {
        self.table.socket_pool.len()
    }

    /// A closed guest socket: pooled, or new. `None` (counted) when the memory for a new
    /// one's buffers cannot be had.
    fn guest_socket(&mut self, c: &mut Counters) -> Option<tcp::Guest> {
        let guest = self
            .table
            .socket_pool
            .pop()
            .or_else(|| tcp::Guest::new(self.cfg.tcp_buffer));
        if guest.is_none() {
            log::debug!(
                "no memory for the buffers of a TCP flow ({} bytes): refused",
                2 * self.cfg.tcp_buffer
            );
            c.tcp_host_errors += 1;
        }
        guest
    }

    /// Entries in the timer heap (stale ones included): a diagnostic.
    pub fn timer_entries(&self) -> usize {
        self.table.timers.len()
    }

    /// TCP flows whose host connection is still being made.
    pub fn half_open(&self) -> usize {
        self.table.half_open
    }

    /// Spliced flows open.
    pub fn spliced_flows(&self) -> usize {
        self.table.spliced
    }

    /// The table limits in force.
    pub fn limits(&self) -> Limits {
        self.cfg.limits
    }

    /// Open flows by protocol: (tcp, udp, icmp).
    pub fn flow_counts(&self) -> (usize, usize, usize) {
        (
            self.table.tcp_map.len(),
            self.table.udp_map.len(),
            self.table.icmp_map.len(),
        )
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

    /// Our address of `addr`'s family that reports errors: the gateway.
    fn gateway_for(&self, addr: &IpAddress) -> IpAddress {
        gateway_for(&self.cfg.nat, addr)
    }

    /// Host socket source address for a destination `addr` (of its family; for the host's
    /// loopback only with [`Config::outbound_to_loopback`]).
    fn outbound_for(&self, addr: &IpAddr) -> Option<IpAddr> {
        if addr.is_loopback() && !self.cfg.outbound_to_loopback {
            return None;
        }
        match addr {
            IpAddr::V4(_) => self.cfg.outbound_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.cfg.outbound_v6.map(IpAddr::V6),
        }
    }

    /// A guest packet of transport protocol `proto` that is not for the gateway itself.
    pub(crate) fn handle_l4<H: HostIo>(
        &mut self,
        cx: Cx<'_, '_, H>,
        proto: IpProtocol,
        pkt: Packet<'_>,
    ) {
        match proto {
            IpProtocol::Udp => self.handle_udp(cx, pkt),
            IpProtocol::Tcp => self.handle_tcp(cx, pkt),
            IpProtocol::Icmp => match icmp::parse_v4(pkt.payload) {
                None => cx.c.drop_icmp_malformed += 1,
                Some(msg @ icmp::Message::Echo(_)) => self.handle_icmp(cx, pkt, msg),
                Some(_) => cx.c.icmp_ignored += 1,
            },
            _ => cx.c.drop_protocol += 1,
        }
    }

    fn handle_tcp<H: HostIo>(&mut self, cx: Cx<'_, '_, H>, pkt: Packet<'_>) {
        let Cx { link, c, io, now } = cx;
        let Packet {
            src,
            dst,
            ip,
            payload,
            verify,
        } = pkt;
        let Ok(segment) = TcpPacket::new_checked(payload) else {
            c.drop_tcp_malformed += 1;
            return;
        };
        if verify && !segment.verify_checksum(&src, &dst) {
            c.drop_bad_checksum += 1;
            return;
        }
        if segment.src_port() == 0 || segment.dst_port() == 0 {
            c.drop_tcp_malformed += 1;
            return;
        }
        let key = FlowKey {
            guest: (src, segment.src_port()),
            remote: (dst, segment.dst_port()),
        };
        if let Some(&id) = self.table.tcp_map.get(&key) {
            if let Some(Flow::Tcp(flow)) = self.table.flows.get_mut(id) {
                flow.ingress(now, link, ip);
                self.table.mark_dirty(id);
            }
            return;
        }
        if !(segment.syn() && !segment.ack() && !segment.rst()) {
            c.tcp_stray_segments += 1;
            self.reset_stray(link, now, src, ip);
            return;
        }
        let isn = segment.seq_number().0 as u32;
        self.open_tcp(Cx { link, c, io, now }, key, isn, ip);
    }

    /// Lets smoltcp answer a segment that belongs to no flow: a RST, as a host would.
    fn reset_stray(&mut self, link: &mut Link, now: Instant, guest: IpAddress, ip: &[u8]) {
        let l = link;
        let mut dev = Link::device(&mut l.l2, &mut l.txq, &l.caps, Some(ip), guest, l.mtu);
        l.iface
            .poll_ingress_single(now, &mut dev, &mut self.table.no_flow);
    }

    /// Opens the flow of the guest's SYN `ip` (`key`, initial sequence number `isn`).
    fn open_tcp<H: HostIo>(&mut self, cx: Cx<'_, '_, H>, key: FlowKey, isn: u32, ip: &[u8]) {
        let Cx { link, c, io, now } = cx;
        let limits = self.cfg.limits;
        if self.table.tcp_map.len() >= limits.tcp_flows
            || self.table.half_open >= limits.tcp_half_open
        {
            c.tcp_table_full += 1;
            self.reset_stray(link, now, key.guest.0, ip);
            return;
        }
        if self.table.member_full(c, &key.guest.0) {
            self.reset_stray(link, now, key.guest.0, ip);
            return;
        }
        // Without a policy, no SYN was denied by one: no look.
        let again = !self.egress.is_empty() && self.denied_syns.contains(&key, isn);
        let target = match self.admit(now, c, egress::Proto::Tcp, &key, again) {
            Ok(target) => target,
            Err(deny) => {
                log::debug!("TCP to {:?} denied: {deny:?}", key.remote);
                c.tcp_denied += 1;
                if deny == nat::Deny::Egress && !again {
                    self.denied_syns.insert(key, isn);
                }
                if deny == nat::Deny::Nobody {
                    return;
                }
                match icmp::deny_reason(deny) {
                    // The host's loopback behind the gateway is switched off: the gateway
                    // has no route there ("Network is unreachable"), as in slirp4netns.
                    // The egress policy refuses: "administratively prohibited", as a
                    // filtering router answers.
                    Some(code) => {
                        let gw = self.gateway_for(&key.remote.0);
                        icmp::emit_unreachable(link, gw, code, ip);
                    }
                    None => self.reset_stray(link, now, key.guest.0, ip),
                }
                return;
            }
        };
        let opts = tcp::OpenOptions {
            outbound: self.outbound_for(&target.ip()),
            buffer: self.cfg.tcp_buffer,
        };
        let Some(guest) = self.guest_socket(c) else {
            self.reset_stray(link, now, key.guest.0, ip);
            return;
        };
        let entry = self.table.flows.vacant_entry();
        let id = entry.key();
        match tcp::TcpFlow::open(id, key, target, ip, &opts, io.host, guest) {
            Ok(mut flow) => {
                let flow_connecting = flow.is_connecting();
                flow.ingress(now, link, ip);
                entry.insert(Flow::Tcp(Box::new(flow)));
                self.table.tcp_map.insert(key, id);
                self.table.member_opened(key.guest.0);
                if flow_connecting {
                    self.table.half_open += 1;
                }
                c.tcp_opened += 1;
                self.table.mark_dirty(id);
            }
            Err(tcp::OpenError::Refused) => {
                c.tcp_refused += 1;
                self.reset_stray(link, now, key.guest.0, ip);
            }
            Err(tcp::OpenError::Unreachable(code)) => {
                c.tcp_unreachable += 1;
                let gw = self.gateway_for(&key.remote.0);
                icmp::emit_unreachable(link, gw, code, ip);
            }
            Err(tcp::OpenError::Local(e)) => {
                log::debug!("cannot open host socket for {:?}: {e}", key.remote);
                c.tcp_host_errors += 1;
                self.reset_stray(link, now, key.guest.0, ip);
            }
        }
    }

    fn handle_udp<H: HostIo>(&mut self, cx: Cx<'_, '_, H>, pkt: Packet<'_>) {
        let Cx { link, c, io, now } = cx;
        let Packet {
            src,
            dst,
            ip,
            payload,
            verify,
        } = pkt;
        let Some((key, data)) = udp::parse(&src, &dst, payload, verify) else {
            c.drop_udp_malformed += 1;
            return;
        };
        if self.answer_name(link, c, key, data) || self.refuse_name(link, c, key, data) {
            return;
        }
        let known = self.table.udp_map.get(&key).or_else(|| {
            self.published
                .udp_in_by_port
                .get(&(key.guest.1, key.remote))
        });
        let id = match known {
            Some(&id) => id,
            None => match self.open_udp(link, c, now, key, ip, io) {
                Some(id) => id,
                None => return,
            },
        };
        if !self.udp_batch.accepts(id, data) {
            self.send_udp_batch(c, io.host);
        }
        match self.table.flows.get_mut(id) {
            Some(Flow::Udp(flow)) => {
                flow.last_active = now;
                if let Some(dns) = flow.dns.as_deref_mut() {
                    dns.set_quick(self.dns.dns_down == Some(c.dns_answers));
                    dns.query(now, data);
                    if let Some(at) = dns.deadline() {
                        self.table.timers.arm(&mut flow.timer, id, at);
                    }
                }
            }
            Some(Flow::UdpIn(flow)) => flow.last_active = now,
            _ => return,
        }
        // A published port whose rule is gone has no route: the reply is dropped.
        if let Some((route, gso)) = udp_route(&mut self.table.flows, id) {
            let gso = *gso;
            self.udp_batch.push(id, route, gso, data, c, io.host);
        }
        self.report_udp_failure(link, now);
    }

    /// Tells the guest, by an ICMP error from the gateway (port unreachable: from the
    /// destination), of a datagram the host could not send.
    fn report_udp_failure(&mut self, link: &mut Link, now: Instant) {
        if let Some(f) = self.udp_batch.take_failure() {
            let from = match f.code {
                icmp::Unreachable::Port => f.key.remote.0,
                _ => self.gateway_for(&f.key.remote.0),
            };
            icmp::emit_unreachable_udp(link, now, from, f.key, f.code, (f.len, f.head()));
        }
    }

    /// Takes the new nameservers: closes the DNS forwarder's UDP flows.
    pub(crate) fn set_nameservers<H: HostIo>(
        &mut self,
        c: &mut Counters,
        list: Vec<std::net::SocketAddr>,
        io: &mut Io<'_, H>,
    ) {
        self.dns.nameservers = list;
        self.dns.dns_down = None;
        let stale: Vec<usize> = self
            .table
            .flows
            .iter()
            .filter(|(_, f)| matches!(f, Flow::Udp(u) if u.dns.is_some()))
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.close_flow(c, id, io);
        }
    }

    fn open_udp<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        key: FlowKey,
        ip: &[u8],
        io: &mut Io<'_, H>,
    ) -> Option<usize> {
        if self.table.udp_map.len() >= self.cfg.limits.udp_flows {
            c.udp_table_full += 1;
            return None;
        }
        if self.table.member_full(c, &key.guest.0) {
            return None;
        }
        let target = match self.admit(now, c, egress::Proto::Udp, &key, false) {
            Ok(target) => target,
            Err(deny) => {
                log::debug!("UDP to {:?} denied: {deny:?}", key.remote);
                c.udp_denied += 1;
                if deny == nat::Deny::Nobody {
                    return None;
                }
                let code = match deny {
                    nat::Deny::NoService => icmp::Unreachable::Port,
                    deny => icmp::deny_reason(deny).unwrap_or(icmp::Unreachable::Prohibited),
                };
                // Never an ICMP error about (or from) a broadcast or multicast address
                // (RFC 1122 3.2.2): the guest's mDNS and SSDP end here. The policy's
                // refusal comes from the gateway, as a filtering router's.
                let from = match deny {
                    nat::Deny::Egress => self.gateway_for(&key.remote.0),
                    _ => key.remote.0,
                };
                if self.is_unicast(&key.remote.0) {
                    icmp::emit_unreachable(link, from, code, ip);
                }
                return None;
            }
        };
        let id = self.table.flows.vacant_key();
        // The DNS forwarder's flows fail over between the nameservers.
        let dns = !self.dns.nameservers.is_empty() && self.to_dns_forwarder(key);
        let servers = if dns {
            &self.dns.nameservers[..]
        } else {
            std::slice::from_ref(&target)
        };
        // A nameserver the host cannot reach is skipped for the next one.
        let mut opened = Err(io::Error::from_raw_os_error(libc::ENETUNREACH));
        for (i, server) in servers.iter().enumerate() {
            let outbound = self.outbound_for(&server.ip());
            opened =
                udp::UdpFlow::open(now, id, key, *server, outbound, io.host).map(|mut flow| {
                    if dns {
                        let quick = self.dns.dns_down == Some(c.dns_answers);
                        flow.follow_dns(servers, i, now, quick);
                    }
                    flow
                });
            if opened.is_ok() {
                break;
            }
        }
        match opened {
            Ok(flow) => {
                self.table.flows.insert(Flow::Udp(flow));
                self.table.udp_map.insert(key, id);
                self.table.member_opened(key.guest.0);
                c.udp_opened += 1;
                let at = now + self.cfg.udp_idle;
                if let Some(slot) = self.table.flows.get_mut(id).and_then(Flow::timer_slot) {
                    self.table.timers.arm(slot, id, at);
                }
                Some(id)
            }
            Err(e) => {
                log::debug!("cannot open UDP socket for {:?}: {e}", key.remote);
                c.udp_host_errors += 1;
                // No route, a firewall: the guest hears of it at once, as from a router.
                if let Some(code) = icmp::unreachable_for(&e) {
                    if link.icmp_limit.allow(now) {
                        let gw = self.gateway_for(&key.remote.0);
                        icmp::emit_unreachable(link, gw, code, ip);
                    }
                }
                None
            }
        }
    }

    /// A guest's ICMP or ICMPv6 message `msg` (echo requests are forwarded).
    pub(crate) fn handle_icmp<H: HostIo>(
        &mut self,
        cx: Cx<'_, '_, H>,
        pkt: Packet<'_>,
        msg: icmp::Message,
    ) {
        let Cx { link, c, io, now } = cx;
        let Packet {
            src,
            dst,
            ip,
            payload,
            ..
        } = pkt;
        let icmp::Message::Echo(ident) = msg else {
            c.icmp_ignored += 1;
            return;
        };
        if self.translate(dst.into(), 0).is_err() {
            c.icmp_denied += 1;
            return;
        }
        let key = FlowKey {
            guest: (src, ident),
            remote: (dst, 0),
        };
        let id = match self.table.icmp_map.get(&key) {
            Some(&id) => id,
            None => {
                if self.table.member_full(c, &key.guest.0) {
                    return;
                }
                if self.table.icmp_map.len() >= self.cfg.limits.icmp_flows {
                    c.icmp_denied += 1;
                    return;
                }
                if let Err(deny) = self.admit(now, c, egress::Proto::Icmp, &key, false) {
                    c.icmp_denied += 1;
                    let code = icmp::deny_reason(deny).unwrap_or(icmp::Unreachable::Prohibited);
                    let gw = self.gateway_for(&dst);
                    icmp::emit_unreachable(link, gw, code, ip);
                    return;
                }
                let outbound = self.outbound_for(&dst.into());
                let entry = self.table.flows.vacant_entry();
                let id = entry.key();
                match icmp::IcmpFlow::open(now, id, key, outbound, io.host) {
                    Ok(flow) => {
                        entry.insert(Flow::Icmp(flow));
                        self.table.member_opened(key.guest.0);
                        self.table.icmp_map.insert(key, id);
                        c.icmp_opened += 1;
                        if let Some(slot) = self.table.flows.get_mut(id).and_then(Flow::timer_slot)
                        {
                            self.table.timers.arm(slot, id, now + icmp::IDLE);
                        }
                        id
                    }
                    Err(e) => {
                        // Typically EACCES: net.ipv4.ping_group_range excludes our gid.
                        // Never fake a reply: tell the guest the echo cannot pass.
                        log::debug!("cannot open ping socket: {e}");
                        c.icmp_denied += 1;
                        let gw = self.gateway_for(&dst);
                        icmp::emit_unreachable(link, gw, icmp::Unreachable::Prohibited, ip);
                        return;
                    }
                }
            }
        };
        if let Some(Flow::Icmp(flow)) = self.table.flows.get_mut(id) {
            flow.send(now, payload, io.host);
        }
    }

    /// A readiness event of the host socket of flow (or listener) `id`; `hup`: the peer
    /// of a stream closed its sending side.
    pub(crate) fn handle_ready<H: HostIo>(&mut self, cx: Cx<'_, '_, H>, id: usize, ready: Ready) {
        let Cx { link, c, io, now } = cx;
        let Ready { readable, .. } = ready;
        match self.table.flows.get_mut(id) {
            Some(Flow::Tcp(flow)) => {
                flow.on_ready(ready);
                self.table.mark_dirty(id);
            }
            Some(Flow::Udp(flow)) => {
                if readable {
                    let done = flow.receive(now, link, io, c, &mut self.egress);
                    if !done {
                        self.table.mark_dirty(id);
                    }
                }
            }
            Some(Flow::Icmp(flow)) => {
                if readable {
                    flow.receive(now, link, io, c);
                }
            }
            Some(Flow::Port(_)) => {
                if readable {
                    self.port_ready(link, c, now, id, io);
                }
            }
            Some(Flow::Splice(_)) => self.splice_ready(c, now, id, io),
            Some(Flow::UdpIn(_)) | None => {}
        }
    }

    /// Services the flows whose timers are due.
    pub(crate) fn handle_timeouts<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        io: &mut Io<'_, H>,
    ) {
        while let Some((at, id)) = self.table.timers.pop_due(now) {
            let Some(flow) = self.table.flows.get_mut(id) else {
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
                    self.table.mark_dirty(id);
                    continue;
                }
                Flow::Udp(f) => {
                    let idle = f.last_active + self.cfg.udp_idle;
                    let servfail = c.dns_servfail;
                    let (silent, dns_at) = f.poll_dns(now, link, c, io.host);
                    if let Some(server) = silent {
                        self.dns.demote(server);
                    }
                    if c.dns_servfail != servfail {
                        // No nameserver answers: quick flows until one does.
                        self.dns.dns_down = Some(c.dns_answers);
                    }
                    match dns_at {
                        Some(at) if at < idle => {
                            if let Some(slot) =
                                self.table.flows.get_mut(id).and_then(Flow::timer_slot)
                            {
                                self.table.timers.arm(slot, id, at);
                            }
                            continue;
                        }
                        _ => idle,
                    }
                }
                Flow::UdpIn(f) => f.last_active + self.cfg.udp_idle,
                Flow::Icmp(f) => f.last_active + icmp::IDLE,
                Flow::Splice(splice::SpliceFlow::Assoc { last_active, .. }) => {
                    *last_active + splice::UDP_IDLE
                }
                // No timer (`timer_slot`).
                Flow::Splice(_) => continue,
                Flow::Port(_) => {
                    // A retry after EMFILE.
                    self.port_ready(link, c, now, id, io);
                    continue;
                }
            };
            if now >= idle {
                self.close_flow(c, id, io);
            } else if let Some(slot) = self.table.flows.get_mut(id).and_then(Flow::timer_slot) {
                self.table.timers.arm(slot, id, idle);
            }
        }
    }

    /// Sends the guest datagrams waiting in the UDP batch.
    fn send_udp_batch(&mut self, c: &mut Counters, host: &mut impl HostIo) {
        let Some(id) = self.udp_batch.flow() else {
            return;
        };
        match udp_route(&mut self.table.flows, id) {
            Some((route, gso)) => {
                if !self.udp_batch.send(route, c, host) {
                    *gso = false;
                }
            }
            None => self.udp_batch.clear(),
        }
    }

    /// Sends the guest datagrams that wait in a batch, then relays data and sends
    /// segments for every flow touched since the last call. Call after every batch of
    /// guest frames.
    pub(crate) fn poll_flows<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        io: &mut Io<'_, H>,
    ) {
        self.send_udp_batch(c, io.host);
        self.report_udp_failure(link, now);
        // A flow serviced here may be marked dirty again (its host socket became
        // writable meanwhile): the outer loop picks that up.
        while !self.table.dirty.is_empty() {
            let batch = std::mem::take(&mut self.table.dirty);
            for &id in &batch {
                self.poll_flow(link, c, now, id, io);
            }
            // Reuse the allocation.
            let mut batch = batch;
            batch.clear();
            if self.table.dirty.is_empty() {
                self.table.dirty = batch;
            }
        }
    }

    fn poll_flow<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        id: usize,
        io: &mut Io<'_, H>,
    ) {
        match self.table.flows.get_mut(id) {
            Some(Flow::Tcp(flow)) => {
                flow.dirty = false;
                let was_connecting = flow.is_connecting();
                let status = flow.poll(now, link, io, c);
                if was_connecting && !flow.is_connecting() {
                    self.table.half_open -= 1;
                }
                match status {
                    tcp::Status::Alive(Some(at)) => {
                        // Until the guest's MAC is known smoltcp keeps asking to send
                        // now; the ARP probe is under way, do not spin.
                        let at = if link.l2.guest_mac().is_none() {
                            at.max(now + Duration::from_millis(20))
                        } else {
                            at
                        };
                        self.table.timers.arm(&mut flow.timer, id, at);
                    }
                    tcp::Status::Alive(None) => {}
                    tcp::Status::Unreachable(code) => {
                        c.tcp_unreachable += 1;
                        let gw = gateway_for(&self.cfg.nat, &flow.key.remote.0);
                        icmp::emit_unreachable(link, gw, code, flow.syn());
                        self.close_flow(c, id, io);
                    }
                    tcp::Status::Done => self.close_flow(c, id, io),
                }
            }
            Some(Flow::Udp(flow)) => {
                let drained = flow.receive(now, link, io, c, &mut self.egress);
                if !drained {
                    // The guest link is congested: retry shortly.
                    let at = now + Duration::from_millis(1);
                    self.table.timers.arm(&mut flow.timer, id, at);
                }
            }
            _ => {}
        }
    }

    fn close_flow<H: HostIo>(&mut self, c: &mut Counters, id: usize, io: &mut Io<'_, H>) {
        if self.udp_batch.flow() == Some(id) {
            self.send_udp_batch(c, io.host);
        }
        let Some(flow) = self.table.flows.try_remove(id) else {
            return;
        };
        match flow {
            Flow::Tcp(f) => {
                if f.is_connecting() {
                    self.table.half_open -= 1;
                }
                self.table.tcp_map.remove(&f.key);
                self.table.member_release(f.key.guest.0);
                let light = f.moved() <= POOL_MAX_MOVED;
                let guest = f.close(io.host);
                if light && self.table.socket_pool.len() < SOCKET_POOL {
                    self.table.socket_pool.push(guest);
                }
                c.tcp_closed += 1;
            }
            Flow::Udp(f) => {
                self.table.udp_map.remove(&f.key);
                self.table.member_release(f.key.guest.0);
                io.host.close(id, Close::Clean);
                c.udp_closed += 1;
            }
            Flow::UdpIn(f) => {
                self.table.udp_map.remove(&f.key);
                self.table.member_release(f.key.guest.0);
                self.published
                    .udp_in_by_port
                    .remove(&(f.key.guest.1, f.key.remote));
                self.published
                    .udp_in_by_client
                    .remove(&(f.rule_id, f.client));
                c.udp_closed += 1;
            }
            Flow::Icmp(f) => {
                self.table.icmp_map.remove(&f.key);
                self.table.member_release(f.key.guest.0);
                io.host.close(id, Close::Clean);
                c.icmp_closed += 1;
            }
            Flow::Port(_) => {
                io.host.close(id, Close::Clean);
                self.close_assocs(c, id, io);
            }
            Flow::Splice(f) => {
                io.host.close(id, Close::Clean);
                match f {
                    splice::SpliceFlow::Listener { .. } => {
                        self.close_assocs(c, id, io);
                        return;
                    }
                    splice::SpliceFlow::Pair => {}
                    splice::SpliceFlow::Assoc {
                        listener,
                        client,
                        local,
                        ..
                    } => {
                        self.table.splice_assoc.remove(&(listener, client, local));
                    }
                }
                self.table.spliced -= 1;
                c.splice_closed += 1;
            }
        }
    }

    /// Closes the spliced associations whose replies leave through `listener` (a `-U`
    /// listener or a published UDP port), which was just closed.
    fn close_assocs<H: HostIo>(&mut self, c: &mut Counters, listener: usize, io: &mut Io<'_, H>) {
        let ends: Vec<usize> = self
            .table
            .splice_assoc
            .iter()
            .filter(|((l, _, _), _)| *l == listener)
            .map(|(_, &a)| a)
            .collect();
        for a in ends {
            self.close_flow(c, a, io);
        }
    }

    /// Resets the open flows the egress policies now deny; how many.
    pub(crate) fn reset_denied(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        io: &mut Io<'_, impl HostIo>,
    ) -> usize {
        if self.egress.is_empty() {
            return 0;
        }
        let denied: Vec<usize> = self
            .table
            .flows
            .iter()
            .filter_map(|(id, f)| {
                let (proto, key) = match f {
                    Flow::Tcp(f) => (egress::Proto::Tcp, f.key),
                    Flow::Udp(f) => (egress::Proto::Udp, f.key),
                    Flow::Icmp(f) => (egress::Proto::Icmp, f.key),
                    _ => return None,
                };
                let dst = IpAddr::from(key.remote.0);
                let host = self.translate(dst, key.remote.1).map_or(dst, |t| t.ip());
                let flow = self.flow_dst(proto, &key, host);
                self.egress
                    .denies(now, key.guest.0.into(), &flow)
                    .then_some(id)
            })
            .collect();
        for &id in &denied {
            if let Some(Flow::Tcp(f)) = self.table.flows.get_mut(id) {
                log::info!("egress: reset TCP flow to {:?}", f.key.remote);
                f.reset(now, link, io, c);
            }
            self.close_flow(c, id, io);
            c.egress_reset += 1;
        }
        denied.len()
    }

    /// Publishes a port: listens on `host` (bound to interface `device`, if given) and
    /// forwards to `guest_addr` (default: the guest's `net+100`) port `guest_port`.
    ///
    /// # Errors
    /// [`port::PortError`] when the rule is invalid or the host socket cannot listen.
    pub fn add_port(
        &mut self,
        proto: port::Proto,
        host: std::net::SocketAddr,
        device: Option<&str>,
        guest_addr: Option<Ipv4Addr>,
        guest_port: u16,
        sockets: &mut impl HostIo,
    ) -> Result<port::PortRule, port::PortError> {
        let net = self.cfg.nat.net;
        let guest_ip = guest_addr.unwrap_or(net.guest());
        if host.port() == 0 || guest_port == 0 {
            return Err(port::PortError::Invalid("ports must be 1..65535"));
        }
        if !net.contains(guest_ip) || !net.valid_source(guest_ip) {
            return Err(port::PortError::Invalid(
                "the guest address must be a host address of the guest network",
            ));
        }
        if self.published.ports.len() >= self.cfg.limits.ports {
            return Err(port::PortError::TooMany(self.cfg.limits.ports));
        }
        let rule = port::PortRule {
            id: self.published.next_port_id,
            proto,
            host,
            guest: std::net::SocketAddrV4::new(guest_ip, guest_port),
            device: device.map(str::to_owned),
        };
        let entry = self.table.flows.vacant_entry();
        let id = entry.key();
        sockets.listen(id, &rule)?;
        let listener = port::Listener::new(rule.clone());
        entry.insert(Flow::Port(Box::new(listener)));
        self.published.ports.insert(rule.id, id);
        self.published.next_port_id += 1;
        Ok(rule)
    }

    /// Unpublishes a port. Connections already made through it keep going; the spliced
    /// UDP associations of its loopback clients, whose replies leave by its socket, end
    /// with it.
    ///
    /// # Errors
    /// [`port::PortError::NotFound`] for an unknown id.
    pub(crate) fn remove_port<H: HostIo>(
        &mut self,
        c: &mut Counters,
        rule_id: u32,
        io: &mut Io<'_, H>,
    ) -> Result<(), port::PortError> {
        let id = self
            .published
            .ports
            .remove(&rule_id)
            .ok_or(port::PortError::NotFound(rule_id))?;
        self.close_flow(c, id, io);
        Ok(())
    }

    /// The published ports, by id.
    pub fn port_rules(&self) -> Vec<port::PortRule> {
        self.published
            .ports
            .values()
            .filter_map(|&id| match self.table.flows.get(id) {
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
        // Several members: the rule's IPv4 address says which; IPv6 clients reach it
        // from the gateway's address.
        let guest_v6 = self.published.guest_v6.filter(|_| !self.published.shared);
        let guest = match (client, net6, guest_v6) {
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
        let map = if tcp {
            &self.table.tcp_map
        } else {
            &self.table.udp_map
        };
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

    fn port_ready<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        id: usize,
        io: &mut Io<'_, H>,
    ) {
        loop {
            let Some(Flow::Port(l)) = self.table.flows.get(id) else {
                return;
            };
            let (rule_id, host, guest) = (l.rule.id, l.rule.host, l.rule.guest);
            if l.rule.proto == port::Proto::Udp {
                let cx = Cx { link, c, io, now };
                return self.port_datagrams(cx, id, (rule_id, guest));
            }
            // The connection is kept as the next flow's; the entry is taken only if it
            // becomes one.
            let conn = self.table.flows.vacant_key();
            let client = match io.host.accept(id, conn) {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog, and no
                    // new edge will announce it: try again shortly.
                    log::debug!("accept on {host} failed: {e}");
                    c.tcp_host_errors += 1;
                    if let Some(Flow::Port(l)) = self.table.flows.get_mut(id) {
                        self.table.timers.arm(&mut l.retry, id, now + ACCEPT_RETRY);
                    }
                    return;
                }
            };
            if self.cfg.loopback_handoff && client.ip().is_loopback() {
                c.tcp_handed_off += 1;
                let to = SpliceTo::Guest {
                    client,
                    port: guest.port(),
                };
                self.splice_pair(c, conn, to, io);
            } else if self.table.tcp_map.len() >= self.cfg.limits.tcp_flows {
                c.tcp_table_full += 1;
                io.host.close(conn, Close::Reset);
            } else {
                self.accept_tcp(link, c, conn, client, guest, io);
            }
        }
    }

    /// Splices the accepted connection `conn` to `to`, as flow `conn`.
    fn splice_pair<H: HostIo>(
        &mut self,
        c: &mut Counters,
        conn: usize,
        to: SpliceTo,
        io: &mut Io<'_, H>,
    ) {
        if self.table.spliced >= self.cfg.limits.spliced {
            c.splice_table_full += 1;
            io.host.close(conn, Close::Clean);
            return;
        }
        if let Err(e) = io.host.splice_tcp(conn, to) {
            log::debug!("cannot splice a connection to {to:?}: {e}");
            return;
        }
        let id = self
            .table
            .flows
            .insert(Flow::Splice(splice::SpliceFlow::Pair));
        debug_assert_eq!(id, conn, "the accepted connection's id is the next entry");
        self.table.spliced += 1;
    }

    /// The new spliced association `assoc` (a [`splice::SpliceFlow::Assoc`]) as the next
    /// entry, with its idle timer; `open` opens its host socket (given the entry's id).
    fn splice_assoc<H: HostIo>(
        &mut self,
        c: &mut Counters,
        now: Instant,
        assoc: splice::SpliceFlow,
        io: &mut Io<'_, H>,
        open: impl FnOnce(&mut H, usize) -> io::Result<()>,
    ) -> Option<usize> {
        if self.table.spliced >= self.cfg.limits.spliced {
            c.splice_table_full += 1;
            return None;
        }
        let id = self.table.flows.vacant_key();
        if let Err(e) = open(io.host, id) {
            log::debug!("cannot open a spliced association ({assoc:?}): {e}");
            c.udp_send_dropped += 1;
            return None;
        }
        if let splice::SpliceFlow::Assoc {
            listener,
            client,
            local,
            ..
        } = assoc
        {
            self.table
                .splice_assoc
                .insert((listener, client, local), id);
        }
        self.table.flows.insert(Flow::Splice(assoc));
        self.table.spliced += 1;
        if let Some(slot) = self.table.flows.get_mut(id).and_then(Flow::timer_slot) {
            self.table.timers.arm(slot, id, now + splice::UDP_IDLE);
        }
        Some(id)
    }

    /// Readiness of spliced entry `id`.
    fn splice_ready<H: HostIo>(
        &mut self,
        c: &mut Counters,
        now: Instant,
        id: usize,
        io: &mut Io<'_, H>,
    ) {
        let Some(Flow::Splice(f)) = self.table.flows.get_mut(id) else {
            return;
        };
        match *f {
            splice::SpliceFlow::Pair => {
                // A pair has no idle time: it lives as long as its two connections.
                let (moved, done) = io.host.splice_relay(id);
                c.splice_bytes += moved as u64;
                if done {
                    self.close_flow(c, id, io);
                }
            }
            splice::SpliceFlow::Listener {
                proto: port::Proto::Tcp,
                to,
            } => loop {
                let conn = self.table.flows.vacant_key();
                match io.host.accept(id, conn) {
                    Ok(_) => self.splice_pair(c, conn, SpliceTo::Host(to), io),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::debug!("-T accept: {e}");
                        }
                        return;
                    }
                }
            },
            splice::SpliceFlow::Listener {
                proto: port::Proto::Udp,
                to,
            } => self.splice_from_listener(c, now, id, to, io),
            // Replies, to the client through its `-U` listener or published port, from
            // the address it sent to.
            splice::SpliceFlow::Assoc {
                listener,
                client,
                local,
                ..
            } => loop {
                let buf = &mut self.published.scratch;
                let n = match io.host.recv(id, buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                self.table.touch_assoc(id, now);
                if io
                    .host
                    .send_msg(listener, &buf[..n], Some(client), local, None)
                    .is_ok()
                {
                    c.splice_bytes += n as u64;
                }
            },
        }
    }

    /// Datagrams on the `-U` listener `id`, each to its client's association with `to`.
    fn splice_from_listener<H: HostIo>(
        &mut self,
        c: &mut Counters,
        now: Instant,
        id: usize,
        to: std::net::SocketAddr,
        io: &mut Io<'_, H>,
    ) {
        loop {
            let (n, client, local) = match io.host.recv_from(id, &mut self.published.scratch) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let aid = match self.table.splice_assoc.get(&(id, client, local)) {
                Some(&a) => a,
                None => {
                    let assoc = splice::SpliceFlow::Assoc {
                        listener: id,
                        client,
                        local,
                        last_active: now,
                        timer: None,
                    };
                    let bind: IpAddr = if to.is_ipv6() {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    } else {
                        Ipv4Addr::LOCALHOST.into()
                    };
                    let open = |h: &mut H, a| h.udp_open(a, to, Some(bind));
                    match self.splice_assoc(c, now, assoc, io, open) {
                        Some(a) => a,
                        None => continue,
                    }
                }
            };
            self.table.touch_assoc(aid, now);
            match io.host.send(aid, &self.published.scratch[..n]) {
                Ok(_) => c.splice_bytes += n as u64,
                Err(_) => c.udp_send_dropped += 1,
            }
        }
    }

    /// Opens a `-T` (TCP) or `-U` (UDP) listener on `addr` inside the guest's namespace
    /// whose connections and datagrams are spliced to `to` on the host; returns its id.
    ///
    /// # Errors
    /// The host's, when the socket cannot be had there.
    pub(crate) fn add_splice_listener<H: HostIo>(
        &mut self,
        proto: port::Proto,
        addr: std::net::SocketAddr,
        to: std::net::SocketAddr,
        io: &mut Io<'_, H>,
    ) -> io::Result<usize> {
        let id = self.table.flows.vacant_key();
        io.host.splice_listen(id, proto, addr)?;
        self.table
            .flows
            .insert(Flow::Splice(splice::SpliceFlow::Listener { proto, to }));
        Ok(id)
    }

    /// Closes the `-T/-U` listener `id` (and its associations).
    pub(crate) fn remove_splice_listener<H: HostIo>(
        &mut self,
        c: &mut Counters,
        id: usize,
        io: &mut Io<'_, H>,
    ) {
        if let Some(Flow::Splice(f)) = self.table.flows.get(id) {
            if matches!(f, splice::SpliceFlow::Listener { .. }) {
                self.close_flow(c, id, io);
            }
        }
    }

    /// Sends the datagram of the loopback client `client`, received on the published
    /// UDP port `listener` at the local address `local`, to `guest_port` inside the
    /// guest's namespace, through the client's spliced association (opened if new,
    /// its replies to leave from `local`).
    fn splice_datagram<H: HostIo>(
        &mut self,
        cx: Cx<'_, '_, H>,
        listener: usize,
        client: std::net::SocketAddr,
        local: Option<IpAddr>,
        guest_port: u16,
        data: &[u8],
    ) {
        let Cx { c, io, now, .. } = cx;
        c.udp_handed_off += 1;
        let id = match self.table.splice_assoc.get(&(listener, client, local)) {
            Some(&id) => id,
            None => {
                let assoc = splice::SpliceFlow::Assoc {
                    listener,
                    client,
                    local,
                    last_active: now,
                    timer: None,
                };
                let open = |h: &mut H, id| h.splice_udp(id, client, guest_port);
                match self.splice_assoc(c, now, assoc, io, open) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        self.table.touch_assoc(id, now);
        match io.host.send(id, data) {
            Ok(n) => c.splice_bytes += n as u64,
            Err(_) => c.udp_send_dropped += 1,
        }
    }

    fn accept_tcp<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        conn: usize,
        client: std::net::SocketAddr,
        rule_guest: std::net::SocketAddrV4,
        io: &mut Io<'_, H>,
    ) {
        let (guest, remote) = self.inbound_ends(client, rule_guest, true);
        let key = FlowKey { guest, remote };
        let Some(guest) = self.guest_socket(c) else {
            io.host.close(conn, Close::Reset);
            return;
        };
        let entry = self.table.flows.vacant_entry();
        let id = entry.key();
        debug_assert_eq!(id, conn, "the accepted connection's id is the next entry");
        match tcp::TcpFlow::accept(id, key, link, io.host, guest) {
            Ok(flow) => {
                entry.insert(Flow::Tcp(Box::new(flow)));
                self.table.member_opened(key.guest.0);
                self.table.tcp_map.insert(key, id);
                c.tcp_opened += 1;
                self.table.mark_dirty(id);
            }
            Err(e) => {
                log::debug!("cannot forward connection from {client}: {e:?}");
                c.tcp_host_errors += 1;
            }
        }
    }

    /// Moves datagrams received on a published UDP port into the guest.
    fn port_datagrams<H: HostIo>(
        &mut self,
        cx: Cx<'_, '_, H>,
        id: usize,
        rule: (u32, std::net::SocketAddrV4),
    ) {
        let Cx { link, c, io, now } = cx;
        let (rule_id, rule_guest) = rule;
        loop {
            if !matches!(self.table.flows.get(id), Some(Flow::Port(_))) {
                return;
            }
            let (n, client, local) = match io.host.recv_from(id, &mut self.published.scratch) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.cfg.loopback_handoff && client.ip().is_loopback() {
                // `splice_datagram` needs `&mut self`: lend it the buffer (a move).
                let scratch = std::mem::take(&mut self.published.scratch);
                let cx = Cx {
                    link: &mut *link,
                    c: &mut *c,
                    io: &mut *io,
                    now,
                };
                let guest_port = rule_guest.port();
                self.splice_datagram(cx, id, client, local, guest_port, &scratch[..n]);
                self.published.scratch = scratch;
                continue;
            }
            // A known client keeps its association (and so the address and port the guest
            // sees); only a new one is given ends, which may move a hidden client's port.
            let known = self
                .published
                .udp_in_by_client
                .get(&(rule_id, client))
                .copied();
            let key = match known.and_then(|f| self.table.flows.get(f)) {
                Some(Flow::UdpIn(f)) => f.key,
                _ => {
                    let (guest, remote) = self.inbound_ends(client, rule_guest, false);
                    FlowKey { guest, remote }
                }
            };
            let (guest, remote) = (key.guest, key.remote);
            match self
                .table
                .udp_map
                .get(&key)
                .and_then(|&f| self.table.flows.get_mut(f))
            {
                Some(Flow::UdpIn(f)) => {
                    f.last_active = now;
                    f.local = local;
                }
                Some(_) => {}
                None => {
                    if self.table.udp_map.len() >= self.cfg.limits.udp_flows {
                        c.udp_table_full += 1;
                        continue;
                    }
                    let fid = self.table.flows.insert(Flow::UdpIn(udp::InboundFlow {
                        key,
                        listener: id,
                        rule_id,
                        client,
                        local,
                        last_active: now,
                        timer: None,
                        gso: true,
                    }));
                    self.table.udp_map.insert(key, fid);
                    self.table.member_opened(key.guest.0);
                    self.published
                        .udp_in_by_port
                        .insert((key.guest.1, key.remote), fid);
                    self.published
                        .udp_in_by_client
                        .insert((rule_id, client), fid);
                    c.udp_opened += 1;
                    if let Some(slot) = self.table.flows.get_mut(fid).and_then(Flow::timer_slot) {
                        self.table.timers.arm(slot, fid, now + self.cfg.udp_idle);
                    }
                }
            }
            let data = &self.published.scratch[..n];
            let send = |link: &mut Link| {
                emit::udp(emit::Out::of(link), remote, guest, None, |buf| {
                    buf.get_mut(..data.len())?.copy_from_slice(data);
                    Some(data.len())
                })
            };
            let mut res = send(link);
            if res == Err(emit::EmitError::QueueFull) && link.flush(io.tap, c) {
                res = send(link);
            }
            match res {
                Ok(_) => {}
                Err(emit::EmitError::TooBig) => c.udp_too_big += 1,
                Err(emit::EmitError::NoNeighbor) => {
                    // `park` needs `&mut self`: lend it the buffer (a move, no copy).
                    let scratch = std::mem::take(&mut self.published.scratch);
                    self.park(link, c, now, remote, guest, &scratch[..n]);
                    self.published.scratch = scratch;
                }
                Err(_) => c.udp_send_dropped += 1,
            }
        }
    }

    /// Keeps a datagram for the guest until its MAC address is known, and asks for it.
    fn park(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        now: Instant,
        src: (IpAddress, u16),
        dst: (IpAddress, u16),
        data: &[u8],
    ) {
        if let IpAddress::Ipv4(g) = dst.0 {
            link.l2.probe_guest(now, g, &mut link.txq);
        }
        if self.published.parked.len() >= MAX_PARKED {
            c.udp_send_dropped += 1;
            return;
        }
        let built = emit::udp(
            emit::Out::of(link),
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
                if let Some(frame) = link.txq.uncommit_last() {
                    self.published.parked.push(frame.to_vec());
                }
            }
            Err(_) => c.udp_send_dropped += 1,
        }
    }

    /// Sends the parked frames now that the guest's MAC address is known.
    pub(crate) fn release_parked<H: HostIo>(
        &mut self,
        link: &mut Link,
        c: &mut Counters,
        io: &mut Io<'_, H>,
    ) {
        let Some(mac) = link.l2.guest_mac() else {
            return;
        };
        let at = link.l2.header_len() - stack::l2::ETHERNET_HEADER_LEN;
        for frame in std::mem::take(&mut self.published.parked) {
            if link.txq.is_full() {
                link.flush(io.tap, c);
            }
            let Some(slot) = link.txq.slot() else {
                c.udp_send_dropped += 1;
                continue;
            };
            slot[..frame.len()].copy_from_slice(&frame);
            slot[at..at + 6].copy_from_slice(mac.as_bytes());
            link.txq.commit(frame.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u8) -> IpAddress {
        IpAddress::v4(10, 0, 2, n)
    }

    #[test]
    fn member_quota_counts_each_member_apart_and_frees_on_release() {
        let mut t = FlowTable::new(Some(2));
        let mut c = Counters::default();
        let (a, b) = (member(100), member(101));
        assert!(!t.member_full(&mut c, &a));
        t.member_opened(a);
        t.member_opened(a);
        assert!(t.member_full(&mut c, &a), "a has its 2 flows");
        assert!(!t.member_full(&mut c, &b), "b's share is its own");
        assert_eq!(c.member_flow_limit, 1, "one refusal counted");
        t.member_release(a);
        assert!(!t.member_full(&mut c, &a));
        t.member_release(a);
        assert!(
            t.member_flows.is_empty(),
            "a member with no flow leaves no entry"
        );
        // Releasing more than was opened (a flow of before the limit) changes nothing.
        t.member_release(b);
        assert!(t.member_flows.is_empty());
    }

    #[test]
    fn single_namespace_has_no_quota() {
        let mut t = FlowTable::new(None);
        let mut c = Counters::default();
        for _ in 0..10_000 {
            t.member_opened(member(100));
        }
        assert!(!t.member_full(&mut c, &member(100)));
        assert!(
            t.member_flows.is_empty(),
            "nothing is counted without a limit"
        );
        assert_eq!(c.member_flow_limit, 0);
    }
}
