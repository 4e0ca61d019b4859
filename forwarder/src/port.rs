//! Published ports: host listeners whose connections and datagrams go into the guest.
//!
//! # Theory of operation
//!
//! The rootless form of DNAT (`docker run -p`). Each rule owns one host socket bound to
//! `host` (a TCP listener or a UDP socket). A TCP connection accepted there becomes a TCP
//! flow whose smoltcp socket *connects* into the guest; a UDP datagram received there
//! opens (or refreshes) an inbound association, and the guest's replies go back to that
//! client through the rule's socket.
//!
//! **Client addresses.** The guest sees the real address and port of a client that it
//! can route back to (an IPv4 address outside the guest network): smoltcp's `any_ip`
//! lets the flow's local end be any address. Loopback clients, IPv6 clients and clients
//! whose address would collide with the guest network appear as the gateway (`net+2`),
//! keeping their port where it is free.
//!
//! **Loopback clients in pasta mode.** With [`crate::Config::loopback_handoff`], a TCP
//! connection or a UDP datagram from a loopback client is not forwarded at all: the host
//! sends it on inside the guest's namespace (pasta's model): it becomes a spliced flow
//! ([`crate::splice`]).
//! A datagram is a copy: loopback UDP is not the path bulk traffic takes.
//!
//! Limits: a rule count bound ([`MAX_RULES`]); connections and associations count
//! against the TCP and UDP flow limits like outbound flows.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::wire::{IpAddress, Ipv6Address};

/// Most rules at once, by default.
pub const MAX_RULES: usize = 1024;

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `"tcp"` or `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// Identifier, from 1, never reused.
    pub id: u32,
    /// Protocol.
    pub proto: Proto,
    /// Host address and port listened on.
    pub host: SocketAddr,
    /// Guest address and port connected to.
    pub guest: SocketAddrV4,
    /// The host interface the socket is bound to (`SO_BINDTODEVICE`): only connections
    /// and datagrams arriving through it are accepted. `None`: any interface.
    pub device: Option<String>,
}

/// Why a rule could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Another socket holds the host address and port.
    #[error("host address {addr} is already in use")]
    InUse {
        /// The host address.
        addr: SocketAddr,
        /// The failure (`EADDRINUSE`), whose text callers look for.
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed otherwise.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The host address.
        addr: SocketAddr,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A port below `net.ipv4.ip_unprivileged_port_start` without the right to bind it.
    #[error(
        "cannot listen on {addr}: ports below net.ipv4.ip_unprivileged_port_start (1024 by \
         default) need root or CAP_NET_BIND_SERVICE; publish a port above it, or lower it \
         (sysctl -w net.ipv4.ip_unprivileged_port_start={port})", port = .addr.port()
    )]
    Privileged {
        /// The host address.
        addr: SocketAddr,
        /// The failure (`EACCES`).
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound to the interface (`ENODEV`: there is none of that
    /// name).
    #[error("cannot bind {addr} to interface {device}")]
    Device {
        /// The host address.
        addr: SocketAddr,
        /// The interface name.
        device: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The limit of rules (`--max-published-ports`) is reached.
    #[error("too many published ports (at most {0})")]
    TooMany(usize),
    /// No rule with that id.
    #[error("no published port with id {0}")]
    NotFound(u32),
    /// The guest address is not in the guest network, or a port is 0.
    #[error("{0}")]
    Invalid(&'static str),
}

impl PortError {
    /// The system call's failure behind this error, if one is.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            PortError::InUse { source, .. }
            | PortError::Listen { source, .. }
            | PortError::Privileged { source, .. }
            | PortError::Device { source, .. } => Some(source),
            PortError::TooMany(_) | PortError::NotFound(_) | PortError::Invalid(_) => None,
        }
    }
}

/// The published ports' state apart from the flow table: the rules, the receive buffer
/// of their UDP sockets, the inbound UDP associations and frames waiting for the guest's
/// MAC address.
pub(crate) struct Published {
    /// Rule id -> its listener's entry in the flow table.
    pub ports: std::collections::BTreeMap<u32, usize>,
    pub next_port_id: u32,
    /// Receive buffer for datagrams of published UDP ports.
    pub scratch: Box<[u8]>,
    /// Frames for a guest whose MAC address is not known yet (published-port datagrams
    /// that arrive before the guest has spoken), released once it is. A rare path, so
    /// plain `Vec`s, and few of them.
    pub parked: Vec<Vec<u8>>,
    /// UDP associations by (guest port, client as the guest sees it): a guest with
    /// several addresses may answer from another one than it was sent to.
    pub udp_in_by_port: HashMap<(u16, (IpAddress, u16)), usize>,
    /// UDP associations by (rule, client as the host sees it): every datagram of one
    /// client socket reaches the guest from the same address and port, also when that
    /// client is shown as the gateway with a port of its own.
    pub udp_in_by_client: HashMap<(u32, SocketAddr), usize>,
    /// The guest's global IPv6 address, configured or learned: published ports reach it.
    pub guest_v6: Option<Ipv6Address>,
    /// Several members: the IPv6 address of published ports is not learned.
    pub shared: bool,
}

impl Published {
    /// No rule yet; `guest_v6` when configured, `shared` for a network.
    pub fn new(guest_v6: Option<Ipv6Address>, shared: bool) -> Published {
        Published {
            ports: std::collections::BTreeMap::new(),
            next_port_id: 1,
            scratch: vec![0u8; 65536].into_boxed_slice(),
            parked: Vec::new(),
            udp_in_by_port: HashMap::new(),
            udp_in_by_client: HashMap::new(),
            guest_v6,
            shared,
        }
    }
}

/// A rule of the flow table; its host socket is the [`crate::HostIo`]'s, under the
/// rule's entry id.
pub(crate) struct Listener {
    pub rule: PortRule,
    /// When to try `accept` again after it failed for lack of fds (EMFILE): the
    /// connection waits in the backlog and no new edge will say so.
    pub retry: Option<smoltcp::time::Instant>,
}

impl Listener {
    /// The rule whose socket the host has just opened.
    pub fn new(rule: PortRule) -> Listener {
        Listener { rule, retry: None }
    }
}

/// Whether the guest can be shown `client` as the source of a published-port flow: an
/// address it can route back to through us (IPv6 only when the guest has IPv6).
pub fn routable_client(
    client: SocketAddr,
    guest_net: &crate::nat::Network,
    guest_net6: Option<&crate::nat::Network6>,
) -> Option<SocketAddr> {
    let hidden = match client {
        SocketAddr::V4(v4) => {
            let ip = *v4.ip();
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_broadcast()
                || guest_net.hides(ip)
        }
        SocketAddr::V6(v6) => {
            let ip = *v6.ip();
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            guest_net6.is_none_or(|n| n.hides(ip))
                || ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || link_local
                || ip.to_ipv4_mapped().is_some()
        }
    };
    (!hidden).then_some(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::Network;
    use std::net::Ipv4Addr;

    fn net() -> Network {
        Network::slirp(Ipv4Addr::new(10, 0, 2, 0), 24)
    }

    #[test]
    fn world_clients_kept() {
        let n6 = crate::nat::Network6::DEFAULT;
        for c in ["203.0.113.9:5555", "[2001:db8::9]:5555"] {
            let c: SocketAddr = c.parse().unwrap();
            assert_eq!(routable_client(c, &net(), Some(&n6)), Some(c));
        }
    }

    #[test]
    fn loopback_link_local_and_in_network_clients_hidden() {
        let n6 = crate::nat::Network6::DEFAULT;
        for c in [
            "127.0.0.1:1",
            "[::1]:1",
            "[fe80::1]:1",
            "[fd00::9]:1",
            "10.0.2.7:1",
            "0.0.0.0:1",
        ] {
            assert_eq!(
                routable_client(c.parse().unwrap(), &net(), Some(&n6)),
                None,
                "{c}"
            );
        }
        let c = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(
            routable_client(c, &net(), None),
            None,
            "no IPv6 in the guest"
        );
    }
}
