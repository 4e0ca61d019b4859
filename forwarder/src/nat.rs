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
//! | gateway (`net+2`) | `127.0.0.1` (`::1` for IPv6 targets) unless host loopback is disabled |
//! | DNS (`net+3`), port 53 | the first nameserver of the host's resolv.conf |
//! | anything else in our subnet, loopback, multicast, broadcast, unspecified | refused |
//! | any other address | itself |
//!
//! IPv6 (with `--enable-ipv6`) follows the same table with the `fd00::/64` network:
//! gateway `fd00::2` is the host's `::1`, DNS `fd00::3`; link-local and IPv4-mapped
//! destinations are refused too.
//!
//! Security: loopback is reachable only through the gateway address, and only while host
//! loopback is enabled; the guest cannot name `127.0.0.1` directly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The guest-facing network: addresses derived from `--cidr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// Network address, e.g. `10.0.2.0`.
    pub addr: Ipv4Addr,
    /// Prefix length, 1..=25.
    pub prefix_len: u8,
}

impl Network {
    fn offset(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + n)
    }
    /// The gateway, `net+2`.
    pub fn gateway(&self) -> Ipv4Addr {
        self.offset(2)
    }
    /// The DNS forwarder, `net+3`.
    pub fn dns(&self) -> Ipv4Addr {
        self.offset(3)
    }
    /// The guest's address with `--configure`, `net+100`.
    pub fn guest(&self) -> Ipv4Addr {
        self.offset(100)
    }
    /// The first address of the DHCP pool, `net+15`.
    pub fn dhcp_start(&self) -> Ipv4Addr {
        self.offset(15)
    }
    /// The netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
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
}

/// The guest-facing IPv6 network, a /64: gateway `::2`, DNS `::3`, guest `::100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network6 {
    /// The prefix, e.g. `fd00::`.
    pub prefix: Ipv6Addr,
}

impl Network6 {
    /// The default, `fd00::/64`.
    pub const DEFAULT: Network6 = Network6 {
        prefix: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0),
    };
    /// Prefix length: always 64 (SLAAC needs it).
    pub const PREFIX_LEN: u8 = 64;

    fn offset(&self, n: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix) + n)
    }
    /// The gateway, `prefix::2`.
    pub fn gateway(&self) -> Ipv6Addr {
        self.offset(2)
    }
    /// The DNS forwarder, `prefix::3`.
    pub fn dns(&self) -> Ipv6Addr {
        self.offset(3)
    }
    /// The guest's address with `--configure`, `prefix::100`.
    pub fn guest(&self) -> Ipv6Addr {
        self.offset(0x100)
    }
    /// Whether `ip` is inside the /64.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) >> 64 == u128::from(self.prefix) >> 64
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
    /// Whether the gateway reaches the host's loopback.
    pub host_loopback: bool,
    /// The DNS forwarder's upstreams, in order; empty disables the forwarder.
    pub nameservers: Vec<SocketAddr>,
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
}

impl NatConfig {
    /// Whether `dst:port` is the DNS forwarder (`net+3` or the IPv6 one, port 53) and it
    /// is enabled: its flows fail over between [`NatConfig::nameservers`].
    pub fn is_dns(&self, dst: IpAddr, port: u16) -> bool {
        port == 53
            && !self.nameservers.is_empty()
            && match dst {
                IpAddr::V4(v4) => v4 == self.net.dns(),
                IpAddr::V6(v6) => self.net6.is_some_and(|n| n.dns() == v6),
            }
    }

    /// Moves `server`, which did not answer, to the end of the nameservers: new DNS
    /// flows start with one that does.
    pub fn demote_nameserver(&mut self, server: SocketAddr) {
        if let Some(pos) = self.nameservers.iter().position(|s| *s == server) {
            let s = self.nameservers.remove(pos);
            self.nameservers.push(s);
        }
    }

    /// The host destination for a guest flow to `dst:port`, either family.
    ///
    /// # Errors
    /// [`Deny`] when the destination is refused.
    pub fn translate(&self, dst: IpAddr, port: u16) -> Result<SocketAddr, Deny> {
        match dst {
            IpAddr::V4(v4) => self.translate_v4(v4, port),
            IpAddr::V6(v6) => self.translate_v6(v6, port),
        }
    }

    fn translate_v6(&self, dst: Ipv6Addr, port: u16) -> Result<SocketAddr, Deny> {
        let Some(net) = &self.net6 else {
            return Err(Deny::NotRoutable);
        };
        if dst == net.gateway() {
            if !self.host_loopback {
                return Err(Deny::HostLoopbackDisabled);
            }
            return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
        }
        if dst == net.dns() {
            return match self.nameservers.first() {
                Some(ns) if port == 53 => Ok(*ns),
                _ => Err(Deny::NoService),
            };
        }
        let link_local = dst.segments()[0] & 0xffc0 == 0xfe80;
        if net.contains(dst)
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

    fn translate_v4(&self, dst: Ipv4Addr, port: u16) -> Result<SocketAddr, Deny> {
        let net = &self.net;
        if dst == net.gateway() {
            if !self.host_loopback {
                return Err(Deny::HostLoopbackDisabled);
            }
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
        if dst == net.dns() {
            return match self.nameservers.first() {
                Some(ns) if port == 53 => Ok(*ns),
                _ => Err(Deny::NoService),
            };
        }
        if net.contains(dst)
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

    fn nat(host_loopback: bool) -> NatConfig {
        NatConfig {
            net: Network {
                addr: Ipv4Addr::new(10, 0, 2, 0),
                prefix_len: 24,
            },
            net6: Some(Network6::DEFAULT),
            host_loopback,
            nameservers: vec!["127.0.0.53:53".parse().unwrap()],
        }
    }

    #[test]
    fn network_addresses_default_cidr() {
        let n = nat(true).net;
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(n.dns(), Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(n.guest(), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(n.dhcp_start(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 0, 2, 255));
    }

    #[test]
    fn gateway_maps_to_host_loopback() {
        let to = nat(true).translate(Ipv4Addr::new(10, 0, 2, 2).into(), 8080);
        assert_eq!(to, Ok("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn gateway_with_loopback_disabled_denied() {
        let to = nat(false).translate(Ipv4Addr::new(10, 0, 2, 2).into(), 8080);
        assert_eq!(to, Err(Deny::HostLoopbackDisabled));
    }

    #[test]
    fn dns_port_53_maps_to_first_nameserver_other_ports_denied() {
        let n = nat(true);
        let dns = IpAddr::from(Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(n.translate(dns, 53), Ok("127.0.0.53:53".parse().unwrap()));
        assert_eq!(n.translate(dns, 80), Err(Deny::NoService));
        let mut off = nat(true);
        off.nameservers.clear();
        assert_eq!(off.translate(dns, 53), Err(Deny::NoService));
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
                n.translate(Ipv4Addr::from(dst).into(), 80),
                Err(Deny::NotRoutable),
                "{dst:?}"
            );
        }
    }

    #[test]
    fn world_destination_kept() {
        let to = nat(true).translate(Ipv4Addr::new(203, 0, 113, 1).into(), 443);
        assert_eq!(to, Ok("203.0.113.1:443".parse().unwrap()));
    }

    #[test]
    fn ipv6_gateway_dns_world_and_refusals() {
        let n = nat(true);
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            n.translate(v6("fd00::2"), 80),
            Ok("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            n.translate(v6("fd00::3"), 53),
            Ok("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            n.translate(v6("2001:db8::1"), 443),
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
            assert_eq!(n.translate(v6(dst), 80), Err(Deny::NotRoutable), "{dst}");
        }
        assert_eq!(
            nat(false).translate(v6("fd00::2"), 80),
            Err(Deny::HostLoopbackDisabled)
        );
        let mut off = nat(true);
        off.net6 = None;
        assert_eq!(
            off.translate(v6("2001:db8::1"), 443),
            Err(Deny::NotRoutable)
        );
        let net = Network6::DEFAULT;
        assert_eq!(net.guest(), "fd00::100".parse::<Ipv6Addr>().unwrap());
        assert!(net.contains("fd00::abcd:1".parse().unwrap()));
        assert!(!net.contains("fd00:0:0:1::1".parse().unwrap()));
    }

    #[test]
    fn small_and_large_prefixes() {
        let n = Network {
            addr: Ipv4Addr::new(10, 10, 0, 0),
            prefix_len: 16,
        };
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 10, 0, 2));
        assert!(n.contains(Ipv4Addr::new(10, 10, 200, 1)));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 10, 255, 255));
        let wide = Network {
            addr: Ipv4Addr::new(0, 0, 0, 0),
            prefix_len: 1,
        };
        assert_eq!(wide.netmask(), Ipv4Addr::new(128, 0, 0, 0));
    }
}
