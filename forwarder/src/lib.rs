//! # usernet forwarder: the host-facing side
//!
//! The [`Forwarder`] serves one network: the members' frames and the host sockets'
//! readiness go in, frames for the members and host socket I/O come out. It is three
//! parts, each its own type:
//! - [`switch::Switch`]: the Ethernet segment, one port per member TAP (a single
//!   namespace is a network of one port); frames between members never leave it;
//! - [`gateway::Gateway`]: the internal port, the virtual router with its services
//!   (ARP/NDP for the virtual addresses, DHCP, router advertisements, local pings);
//! - [`flow::Nat`]: every guest flow turned into an ordinary host socket (outbound NAT
//!   in user space) and the published ports (inbound).
//!
//! Layering:
//! - [`nat`]: where a guest destination goes on the host (gateway = host loopback, DNS).
//! - [`egress`]: whether a new flow may go there at all (the egress policy: rules by
//!   address, protocol and port, names learned by the DNS forwarder).
//! - [`tcp`]: one smoltcp socket per flow, each in its own `SocketSet`, relayed to a
//!   host stream; [`udp`] and [`icmp`] bypass smoltcp with connected host sockets (all
//!   of them the [`HostIo`]'s, [`host`]); [`dhcp`] and [`dns`] are the virtual services.
//! - [`emit`] builds packets straight into the transmit queue, [`timer`] wakes flows.
//!
//! ## How to drive it
//! The event loop (the `usernet` binary) owns the TAPs, the host sockets (its
//! [`HostIo`]) and the `Poll` that watches both, and per turn:
//! 1. feeds each frame read from a member's TAP to [`Forwarder::handle_port_frame`]
//!    ([`Forwarder::handle_frame`] for the first port);
//! 2. feeds each readiness event of a flow's host socket to [`Forwarder::handle_ready`];
//! 3. calls [`Forwarder::handle_timeouts`], then [`Forwarder::poll_flows`], which relays
//!    data of every flow touched in this turn and sends what smoltcp has to send;
//! 4. writes out the transmit queue and the ports' queues ([`Forwarder::flush`]) and
//!    sleeps until [`Forwarder::poll_timeout`].
//!
//! Host I/O (socket creation, `read`/`write` on flow sockets, readiness) is the caller's,
//! behind [`HostIo`] ([`host`]), and the TAPs are behind [`FrameSink`]; both come in the
//! [`Io`] handed to every call, so tests run the forwarder over memory on a fake clock.
//!
//! ## Invariants
//! - No allocation per packet: buffers are sized when a flow opens.
//! - Every table is bounded by [`Limits`]; when full, new flows are refused (TCP: RST,
//!   UDP/ICMP: dropped) and counted, existing flows keep going.
//! - What leaves as it is leaves finished: a partial checksum (checksum offload) in data
//!   the gateway relays unchanged, such as the inner TCP/UDP checksum of a VXLAN
//!   datagram, is completed first ([`stack::csum`]); frames without one cost a flag test.
//! - Guest input is never trusted: malformed packets are dropped and counted in
//!   [`Counters`], never a panic.

#![deny(unsafe_code)]
// The modules' theory-of-operation headers are written for the people who change them and
// name the private types they are about: read them with `cargo doc -p forwarder
// --document-private-items`, where every such link resolves.
#![allow(rustdoc::private_intra_doc_links)]

/// Declares a counter struct, its name/value listing and its explanations in one place:
/// each counter's doc comment is also its explanation (`usernet stats --explain`).
macro_rules! counters {
    ($(#[$meta:meta])* pub struct $Name:ident {
        $($(#[doc = $doc:literal])* $name:ident,)*
    }) => {
        $(#[$meta])*
        pub struct $Name {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl $Name {
            /// Every counter's name with its one-line meaning (its doc comment), in
            /// declaration order.
            pub const EXPLANATIONS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($name), concat!($($doc),*)),)*];

            /// Every counter with its name, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name),)*].into_iter()
            }

            /// The meaning of the counter `name`, if there is one of that name.
            pub fn explain(name: &str) -> Option<&'static str> {
                Self::EXPLANATIONS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, doc)| doc.trim())
            }
        }
    };
}

pub mod dhcp;
pub mod dns;
pub mod dns_relay;
pub mod egress;
pub mod emit;
pub mod flow;
pub mod frag;
pub mod gateway;
pub mod host;
pub mod icmp;
pub mod names;
pub mod nat;
pub mod ndp;
pub mod port;
pub mod splice;
pub mod switch;
mod sys;
pub mod tcp;
pub mod timer;
pub mod udp;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use smoltcp::iface::Interface;
use smoltcp::phy::DeviceCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use stack::device::GuestDevice;
use stack::l2::L2;
use stack::txq::TxQueue;

use crate::flow::Nat;
use crate::gateway::{Cx, Gateway};
pub use crate::host::{Close, HostIo, Ready, SpliceTo};
use crate::nat::NatConfig;
pub use crate::switch::{FrameSink, PortId, Verdict};
use crate::switch::{Switch, SwitchError};

/// The outside world handed to the forwarder for one call: the host's sockets and the
/// members' TAPs.
pub struct Io<'a, H> {
    /// The host sockets, by flow id ([`host`]).
    pub host: &'a mut H,
    /// The members' TAPs.
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
    /// Spliced flows (pasta's loopback clients, [`Config::loopback_handoff`]).
    pub spliced: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tcp_flows: 16384,
            tcp_half_open: 1024,
            udp_flows: 4096,
            icmp_flows: 256,
            ports: port::MAX_RULES,
            spliced: 4096,
        }
    }
}

/// The protocol handlers and virtual services, each of which can be turned off (pasta's
/// `--no-tcp`, `--no-udp`, `--no-icmp`, `--no-dhcp`, `--no-ndp`, `--dhcp-dns`). What is
/// off is dropped and counted in `drop_service_off`, never forwarded otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services {
    /// TCP from the guest is forwarded.
    pub tcp: bool,
    /// UDP from the guest is forwarded (the DNS forwarder included; DHCP is [`dhcp`]).
    ///
    /// [`dhcp`]: Services::dhcp
    pub udp: bool,
    /// ICMP and ICMPv6 echo requests are answered (ours) and forwarded.
    pub icmp: bool,
    /// The DHCP server answers.
    pub dhcp: bool,
    /// Neighbour solicitations and router solicitations are answered, and router
    /// advertisements sent (when the IPv6 network has them on).
    pub ndp: bool,
    /// DHCP and router advertisements name the DNS forwarder (when it is enabled).
    pub announce_dns: bool,
}

impl Default for Services {
    /// Everything on.
    fn default() -> Self {
        Services {
            tcp: true,
            udp: true,
            icmp: true,
            dhcp: true,
            ndp: true,
            announce_dns: true,
        }
    }
}

/// Forwarder configuration: fixed for the forwarder's life and shared by its parts.
/// What changes while it runs (the nameservers' order, learned addresses) is state of
/// the part that changes it. Front ends write the fields they set and take the rest
/// from [`Config::default`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses and NAT policy.
    pub nat: NatConfig,
    /// Which protocol handlers and services are on.
    pub services: Services,
    /// Whether the DNS forwarder is offered (and announced by DHCP).
    pub dns_enabled: bool,
    /// The DNS forwarder's upstreams at start, in order (empty: it does not answer);
    /// [`Forwarder::set_nameservers`] replaces them.
    pub nameservers: Vec<std::net::SocketAddr>,
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
    /// Flows to the host's loopback (the gateway's mapping) leave from the outbound
    /// address too, as in slirp4netns, whose callers see that address at their loopback
    /// listeners; false: from loopback, as pasta (`-o`) does.
    pub outbound_to_loopback: bool,
    /// The guest's IPv4 address when it is known in advance (`--configure`): usernet
    /// asks for its MAC address at start, so that published ports work before the guest
    /// has sent anything.
    pub guest_v4: Option<Ipv4Addr>,
    /// The guest's IPv6 address when it is known in advance (`--configure`); otherwise
    /// learned from the guest's traffic. Published ports reach the guest there.
    pub guest_v6: Option<Ipv6Addr>,
    /// Bytes of smoltcp buffer per TCP flow and direction.
    pub tcp_buffer: usize,
    /// TCP connections and UDP datagrams of published ports from loopback clients are
    /// not forwarded through the guest link but sent on inside the guest's namespace
    /// by the host ([`HostIo::splice_tcp`], [`HostIo::splice_udp`]): pasta's "splice"
    /// path.
    pub loopback_handoff: bool,
    /// UDP flows are closed after this long without traffic.
    pub udp_idle: Duration,
    /// Table sizes.
    pub limits: Limits,
    /// Seed for smoltcp's initial sequence numbers.
    pub seed: u64,
}

impl Default for Config {
    /// slirp4netns's defaults ([`NatConfig::default`], every service on, MTU 1500, DNS on
    /// with no upstream yet, no vnet header), 2 MiB of TCP buffer per flow and direction, UDP flows idle
    /// for 60 s, [`Limits::default`], and a random seed.
    fn default() -> Config {
        Config {
            nat: NatConfig::default(),
            services: Services::default(),
            dns_enabled: true,
            nameservers: Vec::new(),
            mtu: 1500,
            vnet_hdr_len: 0,
            offload: false,
            outbound_v4: None,
            outbound_v6: None,
            outbound_to_loopback: true,
            guest_v4: None,
            guest_v6: None,
            tcp_buffer: 2 << 20,
            loopback_handoff: false,
            udp_idle: Duration::from_secs(60),
            limits: Limits::default(),
            seed: random_seed(),
        }
    }
}

/// A random 64-bit value from std's per-process random hash keys (the forwarder has no
/// random source of its own; the binary passes its own seed where it has one).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// What the forwarder serves: one namespace, or a network of members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One namespace, on the port [`Forwarder::new`] attaches; its addresses are learned
    /// from its traffic (DHCP, SLAAC and router advertisements as a home router).
    Single,
    /// A network: members attach and leave ([`Forwarder::attach`], `add_member`), frames
    /// are addressed by member, members are configured statically (no router
    /// advertisements; DHCP offers each member its reserved address only).
    Network {
        /// Most flows one member address may have open.
        member_flows: usize,
        /// No flow leaves the network.
        internal: bool,
    },
}

counters! {
    /// Counters, exposed by the API's `get_stats`: events and drops by reason.
    #[derive(Debug, Default, Clone)]
    pub struct Counters {
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
        /// Packets for a service or protocol handler that is turned off ([`Services`]:
        /// pasta's `--no-tcp`, `--no-udp`, `--no-icmp`, `--no-dhcp`, `--no-ndp`).
        drop_service_off,
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
        /// Published-port connections from loopback clients spliced to the guest's port
        /// inside its namespace (pasta mode; they do not cross the guest link).
        tcp_handed_off,
        /// Spliced flows closed.
        splice_closed,
        /// Spliced flows refused: their limit ([`Limits::spliced`]) reached.
        splice_table_full,
        /// Bytes moved by spliced flows (either way).
        splice_bytes,
        /// TCP segments of no flow (answered with RST).
        tcp_stray_segments,
        /// Published-port datagrams from loopback clients spliced to the guest's port
        /// inside its namespace (pasta mode; they do not cross the guest link).
        udp_handed_off,
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
        /// Frames from a member whose source MAC address is not its own (spoofing).
        drop_mac_spoof,
        /// Frames from a member that only the network's router sends (IPv6 router
        /// advertisements and redirects, ICMP redirects, DHCP server replies), dropped.
        drop_rogue_router,
        /// Frames switched between members (flooded frames once per copy).
        switched_frames,
        /// DNS queries for member names answered by the network's DNS.
        dns_names_answered,
        /// New flows the egress policy denied (also counted in `tcp_denied`, `udp_denied`,
        /// `icmp_denied`, which count a SYN sent again twice; this does not).
        egress_denied,
        /// DNS queries the egress policy answered NXDOMAIN (a name it does not allow).
        egress_names_refused,
        /// Open flows closed because a changed egress policy denies them.
        egress_reset,
        /// Flows refused because the member had as many open as a member may.
        member_flow_limit,
        /// Frames whose partial checksum (checksum offload) lay in data usernet relays as
        /// it is, such as the inner TCP/UDP checksum of a VXLAN datagram, finished by
        /// usernet before relaying.
        csum_finished,
        /// Frames whose partial-checksum offsets (vnet header) lay outside the packet.
        drop_csum_offsets,
    }
}

/// The gateway's link: smoltcp's interface and our L2 in front of the transmit queue,
/// whose frames the switch delivers.
pub(crate) struct Link {
    pub iface: Interface,
    pub caps: DeviceCapabilities,
    pub l2: L2,
    pub txq: TxQueue,
    pub mtu: usize,
    pub switch: Switch,
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

    /// Writes queued frames to the members, each to the port that owns its destination
    /// (every port for broadcast, multicast and unknown destinations). Returns false when
    /// a TAP would block (the rest stays queued).
    pub fn flush(&mut self, tap: &mut dyn FrameSink, c: &mut Counters) -> bool {
        let vnet = self.l2.header_len() > stack::l2::ETHERNET_HEADER_LEN;
        while let Some(frame) = self.txq.front() {
            let sent = match self.switch.route(frame) {
                Verdict::Port(port) => match self.switch.send_from_gateway(port, frame, tap) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) => {
                        log::debug!("TAP write failed: {e}");
                        c.tx_errors += 1;
                        false
                    }
                },
                Verdict::Flood { .. } => {
                    self.switch.flood(None, frame, tap);
                    true
                }
                Verdict::Gateway | Verdict::Drop | Verdict::Rogue => false,
            };
            if sent {
                c.tx_frames += 1;
                c.tx_bytes += frame.len() as u64;
                // The vnet header's gso_type, second byte.
                if vnet && frame.get(1).is_some_and(|&gso| gso != 0) {
                    c.tx_gso_frames += 1;
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
/// Frames queued for the members by the gateway: room for a burst of full-size segments.
const TXQ_SLOTS: usize = 256;

/// The forwarder: one network's switch, its gateway and its NAT.
pub struct Forwarder {
    cfg: Arc<Config>,
    link: Link,
    gateway: Gateway,
    nat: Nat,
    counters: Counters,
}

impl Forwarder {
    /// A forwarder for `topology` with `cfg`: [`Topology::Single`] with its one port
    /// attached ([`handle_frame`](Self::handle_frame)'s), a [`Topology::Network`] with no
    /// member yet. `now` is the current time on the clock that every later call uses.
    pub fn new(cfg: Config, topology: Topology, now: Instant) -> Forwarder {
        let mut fwd = Forwarder::build(Arc::new(cfg), topology, now);
        if topology == Topology::Single {
            // The first port of an empty switch, whose address is learned: cannot fail.
            let _ = fwd.attach(now, None);
        }
        fwd
    }

    fn build(cfg: Arc<Config>, topology: Topology, now: Instant) -> Forwarder {
        let net = cfg.nat.net;
        let gateway = net.gateway();
        let dns = net.dns().unwrap_or(gateway);
        let mac = L2::mac_for(gateway);
        let mut l2 = L2::new(mac, [gateway, dns], cfg.vnet_hdr_len);
        if net.neighbours == nat::Neighbours::AllButGuest {
            l2.answer_all_but(net.guest());
        }
        // The largest frame: vnet header + Ethernet header + the largest IP packet.
        let slot = cfg.vnet_hdr_len + stack::l2::ETHERNET_HEADER_LEN + 65536;
        let mut txq = TxQueue::new(TXQ_SLOTS, slot);
        let caps = stack::iface::capabilities(cfg.mtu, cfg.offload);
        let mut addrs = vec![IpCidr::new(IpAddress::Ipv4(gateway), net.prefix_len)];
        if let Some(net6) = cfg.nat.net6 {
            let gw6 = net6.gateway();
            addrs.push(IpCidr::new(IpAddress::Ipv6(gw6), net6.prefix_len));
        }
        let iface = stack::iface::interface(now, &caps, &mut l2, &mut txq, &addrs, cfg.seed);
        let mut switch = Switch::new(mac, cfg.vnet_hdr_len);
        switch.set_now(now);
        if let Topology::Network { .. } = topology {
            l2.set_shared();
        }
        Forwarder {
            link: Link {
                iface,
                caps,
                l2,
                txq,
                mtu: cfg.mtu,
                switch,
                icmp_limit: icmp::ErrorLimit::new(now),
            },
            gateway: Gateway::new(Arc::clone(&cfg), topology, now),
            nat: Nat::new(Arc::clone(&cfg), topology),
            cfg,
            counters: Counters::default(),
        }
    }

    /// Attaches a member port; `mac`: the member's address when known (frames from any
    /// other address are dropped), else learned from its first frame.
    ///
    /// # Errors
    /// [`SwitchError`] when the switch is full or the address is taken.
    pub fn attach(
        &mut self,
        now: Instant,
        mac: Option<EthernetAddress>,
    ) -> Result<PortId, SwitchError> {
        self.link.switch.attach(now, mac)
    }

    /// Detaches a member port (its TAP is gone). Its flows end by themselves.
    pub fn detach(&mut self, port: PortId) {
        self.link.switch.detach(port);
    }

    /// Registers a member on `port`: its addresses (its frames must come from them; its
    /// DHCP client is offered its IPv4 one, nobody else is), its MAC address for frames
    /// to them, and its names for the network's DNS.
    /// Returns false when the name table is full (addresses are set anyway).
    pub fn add_member(
        &mut self,
        port: PortId,
        mac: EthernetAddress,
        addrs: names::Addrs,
        name: &str,
        aliases: &[String],
    ) -> bool {
        self.link.switch.set_addresses(port, addrs.v4, addrs.v6);
        if let Some(v4) = addrs.v4 {
            self.link.l2.set_neighbor(IpAddress::Ipv4(v4), Some(mac));
            self.gateway.reserve_dhcp(v4, Some(mac));
        }
        if let Some(v6) = addrs.v6 {
            self.link.l2.set_neighbor(IpAddress::Ipv6(v6), Some(mac));
        }
        self.nat.names_mut().add(name, aliases, addrs)
    }

    /// Withdraws a member's names and addresses (its port is detached separately).
    pub fn remove_member(&mut self, addrs: names::Addrs, name: &str, aliases: &[String]) {
        if let Some(v4) = addrs.v4 {
            self.link.l2.set_neighbor(IpAddress::Ipv4(v4), None);
            self.gateway.reserve_dhcp(v4, None);
        }
        if let Some(v6) = addrs.v6 {
            self.link.l2.set_neighbor(IpAddress::Ipv6(v6), None);
        }
        self.nat.names_mut().remove(name, aliases);
    }

    /// The switch: ports and their counters.
    pub fn switch(&self) -> &Switch {
        &self.link.switch
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Closed TCP sockets waiting for reuse.
    pub fn pooled_sockets(&self) -> usize {
        self.nat.pooled_sockets()
    }

    /// Entries in the timer heap (stale ones included): a diagnostic.
    pub fn timer_entries(&self) -> usize {
        self.nat.timer_entries()
    }

    /// TCP flows whose host connection is still being made.
    pub fn half_open(&self) -> usize {
        self.nat.half_open()
    }

    /// The table limits in force.
    pub fn limits(&self) -> Limits {
        self.nat.limits()
    }

    /// Spliced flows open (pasta's loopback clients, [`Config::loopback_handoff`]).
    pub fn spliced_flows(&self) -> usize {
        self.nat.spliced_flows()
    }

    /// Open flows by protocol: (tcp, udp, icmp).
    pub fn flow_counts(&self) -> (usize, usize, usize) {
        self.nat.flow_counts()
    }

    /// Takes one frame read from the first member port's TAP (vnet header included).
    pub fn handle_frame<H: HostIo>(&mut self, now: Instant, frame: &mut [u8], io: &mut Io<'_, H>) {
        self.handle_port_frame(now, 0, frame, io);
    }

    /// Takes one frame read from `port`'s TAP (vnet header included): switched to other
    /// members as it is, or handled by the gateway. The frame is the caller's read buffer:
    /// a partial checksum the gateway would relay unfinished is finished in it
    /// ([`stack::csum`]), once it has gone to any other member.
    pub fn handle_port_frame<H: HostIo>(
        &mut self,
        now: Instant,
        port: PortId,
        frame: &mut [u8],
        io: &mut Io<'_, H>,
    ) {
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += frame.len() as u64;
        let to_gateway = match self.link.switch.handle_frame(now, port, frame) {
            Verdict::Gateway => true,
            Verdict::Port(to) => {
                self.counters.switched_frames += 1;
                self.link.switch.send(to, frame, io.tap);
                false
            }
            Verdict::Flood { gateway } => {
                self.counters.switched_frames += self.link.switch.len() as u64 - 1;
                self.link.switch.flood(Some(port), frame, io.tap);
                gateway
            }
            Verdict::Drop => {
                if frame.len() < self.link.l2.header_len() {
                    self.counters.drop_truncated += 1;
                } else {
                    self.counters.drop_mac_spoof += 1;
                }
                false
            }
            Verdict::Rogue => {
                self.counters.drop_rogue_router += 1;
                false
            }
        };
        if to_gateway {
            // A partial checksum in data the gateway relays as it is (a tunnel's inner
            // TCP/UDP checksum) is finished first, in place: members already got the
            // frame as it came (their TAPs take partial checksums, as every port of the
            // switch).
            match stack::csum::check(frame, self.cfg.vnet_hdr_len) {
                stack::csum::Check::None | stack::csum::Check::Own => {}
                stack::csum::Check::Bad => {
                    self.counters.drop_csum_offsets += 1;
                    return;
                }
                stack::csum::Check::Finish(p) => {
                    self.counters.csum_finished += 1;
                    if let Some(eth) = frame.get_mut(self.cfg.vnet_hdr_len..) {
                        stack::csum::finish(eth, p);
                    }
                }
            }
            let frame = &*frame;
            let mut cx = Cx {
                link: &mut self.link,
                c: &mut self.counters,
                nat: &mut self.nat,
                io,
            };
            self.gateway.handle_frame(now, frame, &mut cx);
        }
    }

    /// Takes a readiness event of the host socket of flow `flow` (the id the
    /// [`HostIo`] was given).
    pub fn handle_ready<H: HostIo>(
        &mut self,
        now: Instant,
        flow: usize,
        ready: Ready,
        io: &mut Io<'_, H>,
    ) {
        let cx = flow::Cx {
            link: &mut self.link,
            c: &mut self.counters,
            io,
            now,
        };
        self.nat.handle_ready(cx, flow, ready);
    }

    /// Services the flows whose timers are due, sends router advertisements and asks
    /// for the guest's MAC address while it is unknown.
    pub fn handle_timeouts<H: HostIo>(&mut self, now: Instant, io: &mut Io<'_, H>) {
        self.link.switch.set_now(now);
        self.gateway
            .handle_timeouts(now, &mut self.link, &mut self.counters);
        self.nat
            .handle_timeouts(&mut self.link, &mut self.counters, now, io);
    }

    /// Sends the guest datagrams that wait in a batch, then relays data and sends
    /// segments for every flow touched since the last call. Call after every batch of
    /// guest frames.
    pub fn poll_flows<H: HostIo>(&mut self, now: Instant, io: &mut Io<'_, H>) {
        self.nat
            .poll_flows(&mut self.link, &mut self.counters, now, io);
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
        sockets: &mut impl HostIo,
    ) -> Result<port::PortRule, port::PortError> {
        self.nat
            .add_port(proto, host, None, guest_addr, guest_port, sockets)
    }

    /// [`add_port`](Self::add_port) with the host socket bound to the interface `device`
    /// (`SO_BINDTODEVICE`; `None`: any): only what arrives through it is forwarded.
    ///
    /// # Errors
    /// [`port::PortError::Device`] when there is no such interface, otherwise as
    /// [`add_port`](Self::add_port).
    pub fn add_port_on(
        &mut self,
        proto: port::Proto,
        host: std::net::SocketAddr,
        device: Option<&str>,
        guest_addr: Option<Ipv4Addr>,
        guest_port: u16,
        sockets: &mut impl HostIo,
    ) -> Result<port::PortRule, port::PortError> {
        self.nat
            .add_port(proto, host, device, guest_addr, guest_port, sockets)
    }

    /// Unpublishes a port. Connections already made through it keep going; the spliced
    /// UDP associations of its loopback clients, whose replies leave by its socket, end
    /// with it.
    ///
    /// # Errors
    /// [`port::PortError::NotFound`] for an unknown id.
    pub fn remove_port<H: HostIo>(
        &mut self,
        rule_id: u32,
        io: &mut Io<'_, H>,
    ) -> Result<(), port::PortError> {
        self.nat.remove_port(&mut self.counters, rule_id, io)
    }

    /// Opens a pasta `-T` (TCP) or `-U` (UDP) listener on `addr` inside the guest's
    /// namespace, whose connections and datagrams are spliced to `to` on the host
    /// ([`splice`]); returns its id, for
    /// [`remove_splice_listener`](Self::remove_splice_listener).
    ///
    /// # Errors
    /// The host's, when the socket cannot be had there (`EADDRINUSE`...).
    pub fn add_splice_listener<H: HostIo>(
        &mut self,
        proto: port::Proto,
        addr: std::net::SocketAddr,
        to: std::net::SocketAddr,
        io: &mut Io<'_, H>,
    ) -> io::Result<usize> {
        self.nat.add_splice_listener(proto, addr, to, io)
    }

    /// Closes the `-T/-U` listener `id` and its UDP associations.
    pub fn remove_splice_listener<H: HostIo>(&mut self, id: usize, io: &mut Io<'_, H>) {
        self.nat.remove_splice_listener(&mut self.counters, id, io);
    }

    /// The published ports, by id.
    pub fn port_rules(&self) -> Vec<port::PortRule> {
        self.nat.port_rules()
    }

    /// Replaces the DNS forwarder's nameservers (the host's resolv.conf changed). Its UDP
    /// flows are closed, so that the guest's next queries go to the new servers; TCP
    /// connections finish with the old ones. Nothing with the forwarder disabled.
    pub fn set_nameservers<H: HostIo>(
        &mut self,
        list: Vec<std::net::SocketAddr>,
        io: &mut Io<'_, H>,
    ) {
        if !self.cfg.dns_enabled {
            return;
        }
        self.nat.set_nameservers(&mut self.counters, list, io);
    }

    /// The host's own addresses, which every egress policy's `deny-private` covers, before
    /// or after the policies are set. Read them once at start: a sandboxed process may not
    /// be able to later.
    pub fn set_host_addrs(&mut self, addrs: Vec<IpAddr>) {
        self.nat.egress.host_addrs = addrs;
    }

    /// Sets (`Some`) or removes (`None`) the egress policy of the network (`member`
    /// empty; in a single namespace: its policy) or of the member with these addresses.
    /// New flows follow it at once; open flows are left alone (see
    /// [`reset_denied_flows`](Self::reset_denied_flows)).
    pub fn set_egress(&mut self, member: &[IpAddr], spec: Option<&egress::Spec>) {
        self.nat.egress.set(member, spec);
    }

    /// The egress policy of the network (`None`) or of the member with this address.
    pub fn egress(&self, member: Option<IpAddr>) -> Option<&egress::Policy> {
        self.nat.egress.get(member)
    }

    /// See [`egress`](Self::egress): to change its rules.
    pub fn egress_mut(&mut self, member: Option<IpAddr>) -> Option<&mut egress::Policy> {
        self.nat.egress.get_mut(member)
    }

    /// Resets the open flows the egress policies now deny (TCP: a RST both ways; UDP and
    /// ICMP flows are closed). Returns how many. Called between turns (the API): the time
    /// is that of the latest frame or turn.
    pub fn reset_denied_flows<H: HostIo>(&mut self, io: &mut Io<'_, H>) -> usize {
        let now = self.link.switch.now();
        self.nat
            .reset_denied(&mut self.link, &mut self.counters, now, io)
    }

    /// Writes the gateway's transmit queue and the frames waiting in the ports' queues
    /// to the members. Returns false when a device would block; call again when it is
    /// writable.
    pub fn flush(&mut self, tap: &mut dyn FrameSink) -> bool {
        let ports = self.link.switch.flush(tap);
        self.link.flush(tap, &mut self.counters) && ports
    }

    /// Whether frames are waiting for the members.
    pub fn has_pending_tx(&self) -> bool {
        !self.link.txq.is_empty() || self.link.switch.has_queued()
    }

    /// When [`handle_timeouts`](Self::handle_timeouts) is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.nat.poll_timeout(),
            self.gateway.poll_timeout(&self.link),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
