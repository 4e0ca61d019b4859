//! The gateway port: the virtual router and its services on the network's segment.
//!
//! # Theory of operation
//!
//! The gateway is the switch's internal port ([`crate::switch`]). Every virtual address
//! of the network (gateway, DNS, their IPv6 twins) sits behind its one MAC address. It
//! takes the frames the switch hands it (to its MAC, broadcast, multicast, unknown
//! unicast) and:
//! - answers ARP for the virtual IPv4 addresses (in [`stack::l2`]) and neighbour
//!   solicitations for the IPv6 ones ([`crate::ndp`]); sends router advertisements (on
//!   start, then periodically; not on a network, whose members are configured
//!   statically) and ARP probes for a configured member address;
//! - serves DHCP ([`crate::dhcp`]; on a network only each member's assigned address, to
//!   that member) and answers pings to its own addresses;
//! - validates and reassembles IP ([`crate::frag`]), and checks that the source is an
//!   address a member may use (in the subnet, not a virtual one);
//! - hands everything else to the NAT ([`crate::flow::Nat`]), which re-originates it on
//!   the host (the DNS forwarder is one of its destinations).
//!
//! Its output (replies, the NAT's segments and datagrams) is built in the [`Link`]'s
//! transmit queue, which the switch delivers by destination MAC.
//!
//! Security: everything is member-controlled. Malformed packets, fragments that cannot
//! be reassembled, spoofed sources and claims of the gateway's addresses (ARP, NDP) are
//! dropped and counted in [`Counters`], never a panic.

use std::sync::Arc;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr,
};
use stack::l2::{Ingress, L2Drop};
use stack::vnet::{self, VnetRepr};

use crate::flow::{self, Nat};
use crate::{dhcp, emit, frag, icmp, nat, ndp, udp, Config, Counters, HostIo, Io, Link, Topology};

/// What the gateway works with for one frame: the link, the counters, the NAT that takes
/// what is not for the gateway itself, and the host side.
pub(crate) struct Cx<'a, 'io, H> {
    pub link: &'a mut Link,
    pub c: &'a mut Counters,
    pub nat: &'a mut Nat,
    pub io: &'a mut Io<'io, H>,
}

impl<'io, H: HostIo> Cx<'_, 'io, H> {
    /// The NAT, and its handler context for this frame at `now`.
    fn nat_cx(&mut self, now: Instant) -> (&mut Nat, flow::Cx<'_, 'io, H>) {
        let cx = flow::Cx {
            link: &mut *self.link,
            c: &mut *self.c,
            io: &mut *self.io,
            now,
        };
        (&mut *self.nat, cx)
    }
}

/// The gateway's own state: DHCP leases, router advertisements, reassembly.
pub struct Gateway {
    cfg: Arc<Config>,
    dhcp: dhcp::DhcpServer,
    /// DHCP leases count on std's clock: `now` maps onto it from here.
    epoch: std::time::Instant,
    /// When the next unsolicited router advertisement is due (IPv6 enabled).
    next_ra: Option<Instant>,
    /// Unsolicited router advertisements sent so far.
    ra_sent: u32,
    /// IPv4 reassembly; `None` only while a reassembled packet is being handled.
    reasm: Option<frag::Reassembler>,
    /// No router advertisements: a network's members are configured statically, and
    /// SLAAC would give them a second address that answers for the first.
    no_ra: bool,
}

impl Gateway {
    /// The gateway of `cfg`'s network; `now` is the current time on the clock that every
    /// later call uses. A [`Topology::Network`]'s members are configured statically: no
    /// router advertisements (SLAAC would give them a second address that answers for
    /// the first), and DHCP hands out only the members' reserved addresses.
    pub fn new(cfg: Arc<Config>, topology: Topology, now: Instant) -> Gateway {
        let members = matches!(topology, Topology::Network { .. });
        let net = cfg.nat.net;
        let mut dhcp = dhcp::DhcpServer::new(dhcp::DhcpConfig {
            server: net.gateway(),
            prefix_len: net.prefix_len,
            router: net.gateway(),
            dns: net
                .dns()
                .filter(|_| cfg.dns_enabled && cfg.services.announce_dns),
            pool_start: net.dhcp_start(),
            pool_len: net.dhcp_pool_len(),
            lease: std::time::Duration::from_secs(24 * 3600),
        });
        dhcp.set_reserved_only(members);
        Gateway {
            next_ra: cfg
                .nat
                .net6
                .filter(|n| n.router_adverts && cfg.services.ndp && !members)
                .map(|_| now),
            cfg,
            dhcp,
            epoch: std::time::Instant::now()
                .checked_sub(std::time::Duration::from_micros(
                    now.total_micros().unsigned_abs(),
                ))
                .unwrap_or_else(std::time::Instant::now),
            ra_sent: 0,
            reasm: Some(frag::Reassembler::default()),
            no_ra: members,
        }
    }

    /// Whether DHCP and router advertisements name the DNS forwarder.
    fn announce_dns(&self) -> bool {
        self.cfg.dns_enabled && self.cfg.services.announce_dns
    }

    /// A member's assigned address, for its DHCP client (`None`: withdrawn).
    pub(crate) fn reserve_dhcp(&mut self, ip: std::net::Ipv4Addr, mac: Option<EthernetAddress>) {
        match mac {
            Some(mac) => self.dhcp.reserve(mac, ip),
            None => self.dhcp.unreserve(ip),
        }
    }

    /// Sends router advertisements and asks for the guest's MAC address while it is
    /// unknown.
    pub(crate) fn handle_timeouts(&mut self, now: Instant, link: &mut Link, c: &mut Counters) {
        if let (Some(at), Some(net6)) = (self.next_ra, self.cfg.nat.net6) {
            if now >= at {
                if ndp::advertise(link, &net6, self.announce_dns(), ndp::ALL_NODES) {
                    c.ndp_router_adverts += 1;
                }
                self.next_ra = Some(ndp::next_advert(now, self.ra_sent));
                self.ra_sent = self.ra_sent.saturating_add(1);
            }
        }
        if let (None, Some(guest)) = (link.l2.guest_mac(), self.cfg.guest_v4) {
            let before = link.l2.counters.arp_probes;
            link.l2.probe_guest(now, guest, &mut link.txq);
            c.arp_probes += link.l2.counters.arp_probes - before;
        }
    }

    /// When [`handle_timeouts`](Self::handle_timeouts) is next due.
    pub(crate) fn poll_timeout(&self, link: &Link) -> Option<Instant> {
        let probe = (link.l2.guest_mac().is_none() && self.cfg.guest_v4.is_some())
            .then(|| link.l2.next_probe())
            .flatten();
        [self.next_ra, probe].into_iter().flatten().min()
    }

    /// Answers an echo request to one of our addresses; false when `dst` is not ours.
    fn echo_local(
        &self,
        link: &mut Link,
        c: &mut Counters,
        src: IpAddress,
        dst: IpAddress,
        payload: &[u8],
    ) -> bool {
        let ours = match dst {
            IpAddress::Ipv4(d) => self.cfg.nat.net.is_ours(d),
            IpAddress::Ipv6(d) => self.cfg.nat.net6.is_some_and(|n| ndp::ours(&n, &d)),
        };
        if ours {
            if icmp::emit_echo_reply(link, dst, src, payload) {
                c.icmp_echo_local += 1;
            } else {
                c.icmp_reply_dropped += 1;
            }
        }
        ours
    }

    /// Takes one frame read from the TAP (vnet header included).
    pub(crate) fn handle_frame<H: HostIo>(
        &mut self,
        now: Instant,
        frame: &[u8],
        cx: &mut Cx<'_, '_, H>,
    ) {
        if cx.link.txq.is_full() {
            cx.link.flush(cx.io.tap, cx.c);
        }
        match cx.link.l2.handle_frame(frame, &mut cx.link.txq) {
            Ok(Ingress::Ipv4(ip, vnet)) => self.handle_ipv4(now, ip, &vnet, cx),
            Ok(Ingress::Ipv6(ip, vnet)) => {
                if self.cfg.nat.net6.is_some() {
                    self.handle_ipv6(now, ip, &vnet, cx);
                } else {
                    cx.c.drop_ipv6 += 1;
                }
            }
            Ok(Ingress::Consumed) => {}
            Err(L2Drop::Truncated) => cx.c.drop_truncated += 1,
            Err(L2Drop::NotForUs) => cx.c.drop_not_for_us += 1,
            Err(L2Drop::UnknownEthertype) => cx.c.drop_ethertype += 1,
            Err(L2Drop::ArpMalformed) => cx.c.drop_arp_malformed += 1,
            Err(L2Drop::ArpSpoof) => cx.c.drop_arp_spoof += 1,
        }
        if cx.nat.has_parked() {
            cx.nat.release_parked(cx.link, cx.c, cx.io);
        }
    }

    fn handle_ipv4<H: HostIo>(
        &mut self,
        now: Instant,
        ip: &[u8],
        vnet: &VnetRepr,
        cx: &mut Cx<'_, '_, H>,
    ) {
        // The guest's kernel leaves transport checksums to us ("partial") when the TAP
        // has checksum offload, or says it verified them; else they are checked here.
        let verify = vnet.flags & (vnet::FLAG_NEEDS_CSUM | vnet::FLAG_DATA_VALID) == 0;
        let Ok(packet) = Ipv4Packet::new_checked(ip) else {
            cx.c.drop_ipv4_malformed += 1;
            return;
        };
        // Checked here for fragments too: reassembly writes a fresh header checksum.
        if packet.version() != 4 || !packet.verify_checksum() {
            cx.c.drop_ipv4_malformed += 1;
            return;
        }
        if packet.header_len() > 20 {
            // Options never reach the host: the flow is re-originated without them.
            cx.c.ipv4_options_stripped += 1;
        }
        if packet.more_frags() || packet.frag_offset() != 0 {
            self.handle_fragment(now, &packet, vnet, cx);
            return;
        }
        // The header checksum was verified above: do not let smoltcp compute it again.
        let mut caps = ChecksumCapabilities::default();
        caps.ipv4 = smoltcp::phy::Checksum::None;
        let Ok(repr) = Ipv4Repr::parse(&packet, &caps) else {
            cx.c.drop_ipv4_malformed += 1;
            return;
        };
        // The IP packet without Ethernet padding.
        let ip = &ip[..usize::from(packet.total_len())];
        let payload = packet.payload();
        let net = self.cfg.nat.net;
        let src = repr.src_addr;
        let valid_source = net.valid_source(src);
        if repr.next_header == IpProtocol::Udp && udp::is_dhcp_request(&repr, payload) {
            let (src, dst) = (
                IpAddress::Ipv4(repr.src_addr),
                IpAddress::Ipv4(repr.dst_addr),
            );
            if udp::parse_any(&src, &dst, payload, verify).is_none() {
                cx.c.drop_udp_malformed += 1;
                return;
            }
            if !self.cfg.services.dhcp {
                cx.c.drop_service_off += 1;
                return;
            }
            self.handle_dhcp(now, payload, cx);
            return;
        }
        if !valid_source {
            cx.c.drop_bad_source += 1;
            return;
        }
        let (src, dst) = (
            IpAddress::Ipv4(repr.src_addr),
            IpAddress::Ipv4(repr.dst_addr),
        );
        if !self.service_on(repr.next_header) {
            cx.c.drop_service_off += 1;
            return;
        }
        if repr.next_header == IpProtocol::Icmp
            && matches!(icmp::parse_v4(payload), Some(icmp::Message::Echo(_)))
            && self.echo_local(cx.link, cx.c, src, dst, payload)
        {
            return;
        }
        let pkt = flow::Packet {
            src,
            dst,
            ip,
            payload,
            verify,
        };
        let (nat, fcx) = cx.nat_cx(now);
        nat.handle_l4(fcx, repr.next_header, pkt);
    }

    /// Collects a fragment; handles the datagram it completes.
    fn handle_fragment<H: HostIo>(
        &mut self,
        now: Instant,
        packet: &Ipv4Packet<&[u8]>,
        vnet: &VnetRepr,
        cx: &mut Cx<'_, '_, H>,
    ) {
        let Some(mut reasm) = self.reasm.take() else {
            return;
        };
        cx.c.ipv4_fragments += 1;
        match reasm.add(now, packet) {
            Ok(Some(idx)) => {
                cx.c.ipv4_reassembled += 1;
                self.handle_ipv4(now, reasm.packet(idx), vnet, cx);
                reasm.release(idx);
            }
            Ok(None) => {}
            Err(_) => cx.c.drop_ipv4_fragment += 1,
        }
        self.reasm = Some(reasm);
    }

    fn handle_ipv6<H: HostIo>(
        &mut self,
        now: Instant,
        ip: &[u8],
        vnet: &VnetRepr,
        cx: &mut Cx<'_, '_, H>,
    ) {
        let verify = vnet.flags & (vnet::FLAG_NEEDS_CSUM | vnet::FLAG_DATA_VALID) == 0;
        let Ok(packet) = Ipv6Packet::new_checked(ip) else {
            cx.c.drop_ipv6_malformed += 1;
            return;
        };
        let Ok(repr) = Ipv6Repr::parse(&packet) else {
            cx.c.drop_ipv6_malformed += 1;
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
            // Neighbor discovery comes from cx.link-local or unspecified sources.
            match icmp::parse_v6(&src, &dst, payload) {
                None => cx.c.drop_icmp_malformed += 1,
                Some(icmp::Message::NeighborSolicit | icmp::Message::RouterSolicit)
                    if ndp::ours(&net6, &repr.src_addr) =>
                {
                    // Someone claiming our address.
                    cx.c.drop_bad_source += 1;
                }
                Some(icmp::Message::NeighborSolicit | icmp::Message::RouterSolicit)
                    if !self.cfg.services.ndp =>
                {
                    cx.c.drop_service_off += 1;
                }
                Some(icmp::Message::Echo(_)) if !self.cfg.services.icmp => {
                    cx.c.drop_service_off += 1;
                }
                Some(icmp::Message::NeighborSolicit) => {
                    if ndp::answer_solicitation(cx.link, &net6, repr.src_addr, payload) {
                        cx.c.ndp_adverts += 1;
                    }
                }
                Some(icmp::Message::RouterSolicit) if self.no_ra || !net6.router_adverts => {
                    cx.c.icmp_ignored += 1;
                }
                Some(icmp::Message::RouterSolicit) => {
                    let to = if repr.src_addr.is_unspecified() {
                        ndp::ALL_NODES
                    } else {
                        repr.src_addr
                    };
                    if ndp::advertise(cx.link, &net6, self.announce_dns(), to) {
                        cx.c.ndp_router_adverts += 1;
                    }
                }
                Some(msg @ icmp::Message::Echo(_)) => {
                    if self.valid_source_v6(&net6, repr.src_addr) {
                        if !self.echo_local(cx.link, cx.c, src, dst, payload) {
                            let pkt = flow::Packet {
                                src,
                                dst,
                                ip,
                                payload,
                                verify: false,
                            };
                            let (nat, fcx) = cx.nat_cx(now);
                            nat.handle_icmp(fcx, pkt, msg);
                        };
                    } else {
                        cx.c.drop_bad_source += 1;
                    }
                }
                Some(icmp::Message::Other) => cx.c.icmp_ignored += 1,
            }
            return;
        }
        if !self.valid_source_v6(&net6, repr.src_addr) {
            cx.c.drop_bad_source += 1;
            return;
        }
        // Learn the guest's address for published ports.
        cx.nat.learn_guest_v6(repr.src_addr);
        if !self.service_on(repr.next_header) {
            cx.c.drop_service_off += 1;
            return;
        }
        match repr.next_header {
            IpProtocol::Tcp | IpProtocol::Udp => {
                let pkt = flow::Packet {
                    src,
                    dst,
                    ip,
                    payload,
                    verify,
                };
                let (nat, fcx) = cx.nat_cx(now);
                nat.handle_l4(fcx, repr.next_header, pkt);
            }
            // Extension headers (hop-by-hop of MLD, fragments, ...) are not handled.
            _ => cx.c.drop_ipv6_ext += 1,
        }
    }

    /// Whether the handler of transport `proto` is on ([`crate::Services`]); other
    /// protocols are not a service (their own checks apply).
    fn service_on(&self, proto: IpProtocol) -> bool {
        let s = &self.cfg.services;
        match proto {
            IpProtocol::Tcp => s.tcp,
            IpProtocol::Udp => s.udp,
            IpProtocol::Icmp | IpProtocol::Icmpv6 => s.icmp,
            _ => true,
        }
    }

    /// A guest source address for flows: in the /64, not one of ours.
    fn valid_source_v6(&self, net6: &nat::Network6, src: Ipv6Address) -> bool {
        let a = src;
        net6.contains(a) && !net6.is_ours(a) && a != net6.prefix
    }

    fn handle_dhcp<H: HostIo>(&mut self, now: Instant, payload: &[u8], cx: &mut Cx<'_, '_, H>) {
        let now = self.epoch + std::time::Duration::from_micros(now.total_micros().unsigned_abs());
        let Some(data) = payload.get(emit::UDP_HEADER_LEN..) else {
            cx.c.drop_udp_malformed += 1;
            return;
        };
        let gateway = self.cfg.nat.net.gateway();
        let Some(slot) = cx.link.txq.slot() else {
            cx.c.dhcp_drops += 1;
            return;
        };
        // Build the reply in the slot's payload area, then the headers around it.
        let off = cx.link.l2.header_len() + emit::IPV4_HEADER_LEN + emit::UDP_HEADER_LEN;
        let limit = (cx.link.l2.header_len() + cx.link.mtu).min(slot.len());
        let reply = match self.dhcp.handle(now, data, &mut slot[off..limit]) {
            Ok(reply) => reply,
            Err(drop) => {
                log::trace!("DHCP request dropped: {drop:?}");
                cx.c.dhcp_drops += 1;
                return;
            }
        };
        let res = emit::udp(
            emit::Out::of(cx.link),
            (gateway.into(), 67),
            (reply.dst_ip.into(), 68),
            Some(reply.dst_mac),
            |_| Some(reply.len),
        );
        match res {
            Ok(_) => cx.c.dhcp_replies += 1,
            Err(_) => cx.c.dhcp_drops += 1,
        }
    }
}
