//! Outbound NAT policy: where a guest's destination goes on the host.
//!
//! # Theory of operation
//!
//! The guest addresses the world as if it were routed; usernet re-originates each flow
//! from an ordinary host socket. This module decides the host destination of a flow, in
//! the order a router with MASQUERADE and a few local services would:
//!
//! | guest destination | host destination |
//! |---|---|
//! | an alias of a host address (pasta's `--map-guest-addr`) | that host address |
//! | the loopback address (the gateway by default) | `127.0.0.1` (`::1` for IPv6 targets) unless host loopback is disabled |
//! | the DNS address, port 53 | the first nameserver of the host's resolv.conf |
//! | anything else in our subnet (slirp4netns model), loopback, multicast, broadcast, unspecified | refused |
//! | any other address | itself |
//!
//! Two models of the guest link share the table ([`Neighbours`]):
//!
//! - **slirp4netns** ([`Network::slirp`]): everything is derived from `--cidr`, a private
//!   subnet of which usernet owns the gateway (`net+2`) and DNS (`net+3`) addresses and the
//!   guest is `net+100`. Other addresses of the subnet are nobody's: refused.
//! - **pasta** ([`Neighbours::AllButGuest`]): the guest holds a copy of the host's address
//!   and prefix, so the subnet is the host's real LAN. usernet answers ARP and NDP for every
//!   address but the guest's own, and an on-link destination (the real gateway too, when it
//!   is not mapped to loopback) is re-originated to itself like any other.
//!
//! IPv6 (with `--enable-ipv6`, or a copied IPv6 address) follows the same table with the
//! [`Network6`]: in the slirp4netns model `fd00::/64`, gateway `fd00::2` is the host's
//! `::1`, DNS `fd00::3`; link-local and IPv4-mapped destinations are refused.
//!
//! Security: loopback is reachable only through the loopback address, and only while host
//! loopback is enabled; the guest cannot name `127.0.0.1` directly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which addresses of the guest link usernet answers for (ARP, NDP) and how it treats
/// on-link destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neighbours {
    /// Only our own addresses (gateway, DNS); other on-link destinations are refused
    /// (slirp4netns).
    Ours,
    /// Every address but the guest's own (pasta): on-link destinations are forwarded to
    /// themselves.
    AllButGuest,
}

/// The guest-facing IPv4 link: its subnet, the guest's address and ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// Network address, e.g. `10.0.2.0` (host bits clear).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32 (slirp4netns: 1..=25).
    pub prefix_len: u8,
    /// The guest's default gateway (ours).
    pub gateway: Ipv4Addr,
    /// The DNS forwarder's address, if any.
    pub dns: Option<Ipv4Addr>,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The address that reaches the host's `127.0.0.1` (unless host loopback is off).
    pub loopback: Ipv4Addr,
    /// Which neighbours we are.
    pub neighbours: Neighbours,
}

impl Network {
    /// slirp4netns's network of `--cidr addr/prefix_len`: gateway `net+2`, DNS `net+3`,
    /// guest `net+100`. `addr` must be a network address with room for them (prefix
    /// 1..=25; checked by the command line).
    pub fn slirp(addr: Ipv4Addr, prefix_len: u8) -> Network {
        let at = |n: u32| Ipv4Addr::from(u32::from(addr).wrapping_add(n));
        Network {
            addr,
            prefix_len,
            gateway: at(2),
            dns: Some(at(3)),
            guest: at(100),
            loopback: at(2),
            neighbours: Neighbours::Ours,
        }
    }
    /// The gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    /// The DNS forwarder's address, if any.
    pub fn dns(&self) -> Option<Ipv4Addr> {
        self.dns
    }
    /// The guest's address.
    pub fn guest(&self) -> Ipv4Addr {
        self.guest
    }
    /// The first address of the DHCP pool: `net+15` (slirp4netns), the guest's address in
    /// pasta's model (where the subnet is the host's LAN, only the copied address is ours
    /// to hand out).
    pub fn dhcp_start(&self) -> Ipv4Addr {
        match self.neighbours {
            Neighbours::Ours => Ipv4Addr::from(u32::from(self.addr).wrapping_add(15)),
            Neighbours::AllButGuest => self.guest,
        }
    }
    /// How many addresses the DHCP pool has: 16 from [`dhcp_start`](Self::dhcp_start),
    /// or only the guest's in pasta's model.
    pub fn dhcp_pool_len(&self) -> u8 {
        match self.neighbours {
            Neighbours::Ours => 16,
            Neighbours::AllButGuest => 1,
        }
    }
    /// The netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len.min(32)))
                .unwrap_or(0),
        )
    }
    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !u32::from(self.netmask()))
    }
    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.addr)
    }
    /// Whether `ip` is one of our addresses on the link (answered by ARP, local echo).
    pub fn is_ours(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway || Some(ip) == self.dns
    }
    /// Whether the guest may send from `ip`: an address of the subnet that is not ours,
    /// nor the network or broadcast address.
    pub fn valid_source(&self, ip: Ipv4Addr) -> bool {
        let special = ip == self.addr || ip == self.broadcast();
        self.contains(ip) && !self.is_ours(ip) && (!special || self.prefix_len >= 31)
    }
    /// Whether a host peer at `ip` must be hidden from the guest (shown as the gateway):
    /// the guest cannot route back to it through us.
    pub fn hides(&self, ip: Ipv4Addr) -> bool {
        match self.neighbours {
            Neighbours::Ours => self.contains(ip),
            Neighbours::AllButGuest => ip == self.guest,
        }
    }
}

/// The guest-facing IPv6 link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network6 {
    /// The prefix, e.g. `fd00::` (host bits clear).
    pub prefix: Ipv6Addr,
    /// Prefix length (slirp4netns model: 64, which SLAAC needs).
    pub prefix_len: u8,
    /// The guest's default gateway (ours; may be link-local).
    pub gateway: Ipv6Addr,
    /// The DNS forwarder's address, if any.
    pub dns: Option<Ipv6Addr>,
    /// The guest's address (when configured; otherwise learned from its traffic).
    pub guest: Ipv6Addr,
    /// The address that reaches the host's `::1` (unless host loopback is off).
    pub loopback: Ipv6Addr,
    /// Which neighbours we are.
    pub neighbours: Neighbours,
    /// Whether usernet sends router advertisements (the prefix for SLAAC, RDNSS).
    pub router_adverts: bool,
}

impl Network6 {
    /// The default, `fd00::/64`.
    pub const DEFAULT: Network6 = Network6::slirp(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0));
    /// Prefix length of the slirp4netns model (SLAAC needs it).
    pub const PREFIX_LEN: u8 = 64;

    /// The slirp4netns-style network of the /64 `prefix`: gateway `::2`, DNS `::3`,
    /// guest `::100`, router advertisements on.
    pub const fn slirp(prefix: Ipv6Addr) -> Network6 {
        let p = prefix.to_bits();
        Network6 {
            prefix,
            prefix_len: Self::PREFIX_LEN,
            gateway: Ipv6Addr::from_bits(p + 2),
            dns: Some(Ipv6Addr::from_bits(p + 3)),
            guest: Ipv6Addr::from_bits(p + 0x100),
            loopback: Ipv6Addr::from_bits(p + 2),
            neighbours: Neighbours::Ours,
            router_adverts: true,
        }
    }
    /// The gateway.
    pub fn gateway(&self) -> Ipv6Addr {
        self.gateway
    }
    /// The DNS forwarder's address, if any.
    pub fn dns(&self) -> Option<Ipv6Addr> {
        self.dns
    }
    /// The guest's address.
    pub fn guest(&self) -> Ipv6Addr {
        self.guest
    }
    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        let len = u32::from(self.prefix_len.min(128));
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        u128::from(ip) & mask == u128::from(self.prefix) & mask
    }
    /// Whether `ip` is one of our addresses on the link.
    pub fn is_ours(&self, ip: Ipv6Addr) -> bool {
        ip == self.gateway || Some(ip) == self.dns || ip == ROUTER_LINK_LOCAL
    }
    /// Whether a host peer at `ip` must be hidden from the guest (see [`Network::hides`]).
    pub fn hides(&self, ip: Ipv6Addr) -> bool {
        match self.neighbours {
            Neighbours::Ours => self.contains(ip),
            Neighbours::AllButGuest => ip == self.guest,
        }
    }
}

/// The router's link-local address, source of router advertisements.
pub const ROUTER_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

/// What the NAT needs to know.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// The guest network.
    pub net: Network,
    /// The guest IPv6 network, when IPv6 is enabled.
    pub net6: Option<Network6>,
    /// Whether the loopback addresses reach the host's loopback.
    pub host_loopback: bool,
    /// Guest destinations that stand for a host address (pasta's `--map-guest-addr`):
    /// (what the guest addresses, the host address it reaches).
    pub aliases: Vec<(IpAddr, IpAddr)>,
}

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    /// The gateway, with host loopback disabled.
    HostLoopbackDisabled,
    /// The DNS address on another port, or with DNS disabled.
    NoService,
    /// An address that is never routed (ours, loopback, multicast, broadcast, unspecified).
    NotRoutable,
    /// The egress policy refuses it ([`crate::egress`]): answered "administratively
    /// prohibited", as a filtering router does.
    Egress,
    /// The DNS address with DNS disabled: nobody is there, so nothing answers (no reset,
    /// no ICMP error) and a connection times out, as with libslirp, which still answers
    /// ARP for that address.
    Nobody,
}

impl Default for NatConfig {
    /// slirp4netns's: `10.0.2.0/24`, no IPv6, the gateway reaches the host's loopback.
    fn default() -> NatConfig {
        NatConfig {
            net: Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24),
            net6: None,
            host_loopback: true,
            aliases: Vec::new(),
        }
    }
}

impl NatConfig {
    /// Whether `dst` is the DNS forwarder's address (`net+3` or the IPv6 one).
    pub fn is_dns_address(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(v4) => Some(v4) == self.net.dns(),
            IpAddr::V6(v6) => self.net6.is_some_and(|n| n.dns() == Some(v6)),
        }
    }

    /// The host destination for a guest flow to `dst:port`, either family; the DNS
    /// address's port 53 goes to the first of `nameservers` (the DNS forwarder's upstreams
    /// now, in order; none: refused).
    ///
    /// # Errors
    /// [`Deny`] when the destination is refused.
    pub fn translate(
        &self,
        dst: IpAddr,
        port: u16,
        nameservers: &[SocketAddr],
    ) -> Result<SocketAddr, Deny> {
        if let Some(&(_, to)) = self.aliases.iter().find(|(from, _)| *from == dst) {
            return Ok(SocketAddr::new(to, port));
        }
        match dst {
            IpAddr::V4(v4) => self.translate_v4(v4, port, nameservers),
            IpAddr::V6(v6) => self.translate_v6(v6, port, nameservers),
        }
    }

    fn translate_v6(
        &self,
        dst: Ipv6Addr,
        port: u16,
        nameservers: &[SocketAddr],
    ) -> Result<SocketAddr, Deny> {
        let Some(net) = &self.net6 else {
            return Err(Deny::NotRoutable);
        };
        if dst == net.loopback && self.host_loopback {
            return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
        }
        if Some(dst) == net.dns {
            return match nameservers.first() {
                Some(ns) if port == 53 => Ok(*ns),
                _ => Err(Deny::NoService),
            };
        }
        let own = match net.neighbours {
            Neighbours::Ours if dst == net.loopback || dst == net.gateway => {
                return Err(Deny::HostLoopbackDisabled)
            }
            Neighbours::Ours => net.contains(dst),
            Neighbours::AllButGuest => dst == net.guest,
        };
        let link_local = dst.segments()[0] & 0xffc0 == 0xfe80;
        if own
            || link_local
            || dst.is_loopback()
            || dst.is_multicast()
            || dst.is_unspecified()
            || dst.to_ipv4_mapped().is_some()
        {
            return Err(Deny::NotRoutable);
        }
        Ok(SocketAddr::new(IpAddr::V6(dst), port))
    }

    fn translate_v4(
        &self,
        dst: Ipv4Addr,
        port: u16,
        nameservers: &[SocketAddr],
    ) -> Result<SocketAddr, Deny> {
        let net = &self.net;
        if dst == net.loopback && self.host_loopback {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
        if Some(dst) == net.dns {
            return match nameservers.first() {
                Some(ns) if port == 53 => Ok(*ns),
                _ => Err(Deny::NoService),
            };
        }
        let own = match net.neighbours {
            Neighbours::Ours if dst == net.loopback || dst == net.gateway => {
                return Err(Deny::HostLoopbackDisabled)
            }
            Neighbours::Ours => net.contains(dst),
            Neighbours::AllButGuest => {
                dst == net.guest
                    || (net.prefix_len < 31 && (dst == net.addr || dst == net.broadcast()))
            }
        };
        if own
            || dst.is_loopback()
            || dst.is_multicast()
            || dst.is_broadcast()
            || dst.is_unspecified()
        {
            return Err(Deny::NotRoutable);
        }
        Ok(SocketAddr::new(IpAddr::V4(dst), port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DNS forwarder's upstreams in these tests.
    const NS: &[SocketAddr] = &[SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
        53,
    )];

    fn nat(host_loopback: bool) -> NatConfig {
        NatConfig {
            net: Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24),
            net6: Some(Network6::DEFAULT),
            host_loopback,
            aliases: vec![],
        }
    }

    #[test]
    fn network_addresses_default_cidr() {
        let n = nat(true).net;
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(n.dns(), Some(Ipv4Addr::new(10, 0, 2, 3)));
        assert_eq!(n.guest(), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(n.dhcp_start(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 0, 2, 255));
    }

    #[test]
    fn gateway_maps_to_host_loopback() {
        let to = nat(true).translate(Ipv4Addr::new(10, 0, 2, 2).into(), 8080, NS);
        assert_eq!(to, Ok("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn gateway_with_loopback_disabled_denied() {
        let to = nat(false).translate(Ipv4Addr::new(10, 0, 2, 2).into(), 8080, NS);
        assert_eq!(to, Err(Deny::HostLoopbackDisabled));
    }

    #[test]
    fn dns_port_53_maps_to_first_nameserver_other_ports_denied() {
        let n = nat(true);
        let dns = IpAddr::from(Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(
            n.translate(dns, 53, NS),
            Ok("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(n.translate(dns, 80, NS), Err(Deny::NoService));
        assert_eq!(n.translate(dns, 53, &[]), Err(Deny::NoService));
    }

    #[test]
    fn unroutable_destinations_denied() {
        let n = nat(true);
        for dst in [
            [10, 0, 2, 50],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
        ] {
            assert_eq!(
                n.translate(Ipv4Addr::from(dst).into(), 80, NS),
                Err(Deny::NotRoutable),
                "{dst:?}"
            );
        }
    }

    #[test]
    fn world_destination_kept() {
        let to = nat(true).translate(Ipv4Addr::new(203, 0, 113, 1).into(), 443, NS);
        assert_eq!(to, Ok("203.0.113.1:443".parse().unwrap()));
    }

    #[test]
    fn ipv6_gateway_dns_world_and_refusals() {
        let n = nat(true);
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            n.translate(v6("fd00::2"), 80, NS),
            Ok("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            n.translate(v6("fd00::3"), 53, NS),
            Ok("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            n.translate(v6("2001:db8::1"), 443, NS),
            Ok("[2001:db8::1]:443".parse().unwrap())
        );
        for dst in [
            "fd00::50",
            "fe80::1",
            "::1",
            "ff02::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(
                n.translate(v6(dst), 80, NS),
                Err(Deny::NotRoutable),
                "{dst}"
            );
        }
        assert_eq!(
            nat(false).translate(v6("fd00::2"), 80, NS),
            Err(Deny::HostLoopbackDisabled)
        );
        let mut off = nat(true);
        off.net6 = None;
        assert_eq!(
            off.translate(v6("2001:db8::1"), 443, NS),
            Err(Deny::NotRoutable)
        );
        let net = Network6::DEFAULT;
        assert_eq!(net.guest(), "fd00::100".parse::<Ipv6Addr>().unwrap());
        assert!(net.contains("fd00::abcd:1".parse().unwrap()));
        assert!(!net.contains("fd00:0:0:1::1".parse().unwrap()));
    }

    #[test]
    fn small_and_large_prefixes() {
        let n = Network::slirp(Ipv4Addr::new(10, 10, 0, 0), 16);
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 10, 0, 2));
        assert!(n.contains(Ipv4Addr::new(10, 10, 200, 1)));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 10, 255, 255));
        let wide = Network::slirp(Ipv4Addr::new(0, 0, 0, 0), 1);
        assert_eq!(wide.netmask(), Ipv4Addr::new(128, 0, 0, 0));
    }

    /// pasta's model: the guest holds the host's 192.0.2.10/24, gateway 192.0.2.1.
    fn pasta(host_loopback: bool) -> NatConfig {
        let net = Network {
            addr: Ipv4Addr::new(192, 0, 2, 0),
            prefix_len: 24,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            dns: Some(Ipv4Addr::new(169, 254, 1, 1)),
            guest: Ipv4Addr::new(192, 0, 2, 10),
            loopback: Ipv4Addr::new(192, 0, 2, 1),
            neighbours: Neighbours::AllButGuest,
        };
        NatConfig {
            net,
            net6: None,
            host_loopback,
            aliases: vec![(
                "169.254.1.2".parse().unwrap(),
                "192.0.2.10".parse().unwrap(),
            )],
        }
    }

    #[test]
    fn pasta_on_link_destinations_reach_themselves_guest_refused() {
        let n = pasta(true);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            n.translate(ip("192.0.2.7"), 80, NS),
            Ok("192.0.2.7:80".parse().unwrap())
        );
        assert_eq!(
            n.translate(ip("192.0.2.10"), 80, NS),
            Err(Deny::NotRoutable)
        );
        assert_eq!(
            n.translate(ip("192.0.2.255"), 80, NS),
            Err(Deny::NotRoutable)
        );
        assert_eq!(
            n.translate(ip("192.0.2.1"), 80, NS),
            Ok("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            n.translate(ip("169.254.1.1"), 53, NS),
            Ok("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            n.translate(ip("169.254.1.2"), 22, NS),
            Ok("192.0.2.10:22".parse().unwrap())
        );
        // --no-map-gw: the gateway is just another neighbour.
        let n = pasta(false);
        assert_eq!(
            n.translate(ip("192.0.2.1"), 80, NS),
            Ok("192.0.2.1:80".parse().unwrap())
        );
        assert!(n.net.valid_source(Ipv4Addr::new(192, 0, 2, 10)));
        assert!(!n.net.valid_source(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(n.net.hides(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!(
            (n.net.dhcp_start(), n.net.dhcp_pool_len()),
            (Ipv4Addr::new(192, 0, 2, 10), 1)
        );
        assert!(!n.net.hides(Ipv4Addr::new(192, 0, 2, 7)));
    }

    #[test]
    fn slirp_network_keeps_its_derived_addresses() {
        let n = Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24);
        assert_eq!(n.loopback, n.gateway);
        assert!(n.hides(Ipv4Addr::new(10, 0, 2, 7)));
        let n6 = Network6::DEFAULT;
        assert_eq!(n6.dns(), Some("fd00::3".parse().unwrap()));
        assert!(n6.router_adverts);
        let wide = Network6 {
            prefix_len: 48,
            ..Network6::DEFAULT
        };
        assert!(wide.contains("fd00:0:0:1::1".parse().unwrap()));
    }
}
