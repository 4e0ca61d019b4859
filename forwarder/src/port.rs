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
//! connection or a UDP datagram from a loopback client is not forwarded at all: it is
//! handed to the caller as a [`Handoff`], who sends it on inside the guest's namespace
//! (pasta's model; see `src/pasta/ports.rs`). A datagram is a copy and comes with a
//! duplicate of the rule's socket (made once per rule): loopback UDP is not the path bulk
//! traffic takes.
//!
//! Limits: a rule count bound ([`MAX_RULES`]); connections and associations count
//! against the TCP and UDP flow limits like outbound flows.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use mio::{Interest, Registry, Token};
use smoltcp::wire::{IpAddress, Ipv6Address};
use socket2::{Domain, Protocol, Socket, Type};

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

/// What a published port received from a loopback client and handed to the caller
/// instead of forwarding it through the guest link ([`crate::Config::loopback_handoff`]).
#[derive(Debug)]
pub enum Handoff {
    /// An accepted TCP connection.
    Tcp {
        /// The connection.
        stream: mio::net::TcpStream,
        /// The client (a loopback address).
        client: SocketAddr,
        /// The guest port the rule forwards to.
        guest_port: u16,
    },
    /// A datagram; answers go to `client` through `socket`.
    Udp {
        /// A duplicate of the rule's socket (non-blocking), shared by its handoffs.
        socket: std::sync::Arc<std::net::UdpSocket>,
        /// The client (a loopback address).
        client: SocketAddr,
        /// The datagram.
        data: Vec<u8>,
        /// The guest port the rule forwards to.
        guest_port: u16,
    },
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
/// of their UDP sockets, the inbound UDP associations, frames waiting for the guest's MAC
/// address, and the loopback clients handed to the caller.
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
    /// Loopback connections for the caller ([`crate::Config::loopback_handoff`]).
    pub handoffs: Vec<Handoff>,
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
            handoffs: Vec::new(),
            guest_v6,
            shared,
        }
    }
}

pub(crate) enum ListenSocket {
    Tcp(mio::net::TcpListener),
    Udp(mio::net::UdpSocket),
}

/// A rule and its host socket.
pub(crate) struct Listener {
    pub rule: PortRule,
    pub socket: ListenSocket,
    /// When to try `accept` again after it failed for lack of fds (EMFILE): the
    /// connection waits in the backlog and no new edge will say so.
    pub retry: Option<smoltcp::time::Instant>,
    /// A duplicate of a UDP rule's socket for [`Handoff::Udp`], made on the first one.
    handoff_socket: Option<std::sync::Arc<std::net::UdpSocket>>,
}

impl Listener {
    /// Binds the host socket of `rule` and registers it.
    pub fn open(rule: PortRule, registry: &Registry, token: Token) -> Result<Listener, PortError> {
        let addr = rule.host;
        let fail = |source: io::Error| {
            if source.kind() == io::ErrorKind::AddrInUse {
                PortError::InUse { addr, source }
            } else if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
                PortError::Privileged { addr, source }
            } else {
                PortError::Listen { addr, source }
            }
        };
        let ty = match rule.proto {
            Proto::Tcp => Type::STREAM,
            Proto::Udp => Type::DGRAM,
        };
        let proto = match rule.proto {
            Proto::Tcp => Protocol::TCP,
            Proto::Udp => Protocol::UDP,
        };
        let socket = Socket::new(
            Domain::for_address(addr),
            ty.nonblocking().cloexec(),
            Some(proto),
        )
        .map_err(fail)?;
        if addr.is_ipv6() {
            // `[::]` means IPv6 only, so that a rule for 0.0.0.0 can coexist.
            socket.set_only_v6(true).map_err(fail)?;
        }
        if let Some(dev) = &rule.device {
            socket
                .bind_device(Some(dev.as_bytes()))
                .map_err(|source| PortError::Device {
                    addr,
                    device: dev.clone(),
                    source,
                })?;
        }
        if rule.proto == Proto::Tcp {
            // Re-publishing a port right after removing it must not trip over TIME-WAIT.
            socket.set_reuse_address(true).map_err(fail)?;
        }
        socket.bind(&addr.into()).map_err(fail)?;
        let socket = match rule.proto {
            Proto::Tcp => {
                socket.listen(1024).map_err(fail)?;
                let mut l = mio::net::TcpListener::from_std(socket.into());
                registry
                    .register(&mut l, token, Interest::READABLE)
                    .map_err(fail)?;
                ListenSocket::Tcp(l)
            }
            Proto::Udp => {
                crate::udp::widen_receive_buffer(&socket);
                if addr.ip().is_unspecified() {
                    // Learn each datagram's local address, to reply from it.
                    crate::sys::enable_pktinfo(socket.as_raw_fd(), addr.is_ipv6()).map_err(fail)?;
                }
                let mut u = mio::net::UdpSocket::from_std(socket.into());
                registry
                    .register(&mut u, token, Interest::READABLE)
                    .map_err(fail)?;
                ListenSocket::Udp(u)
            }
        };
        Ok(Listener {
            rule,
            socket,
            retry: None,
            handoff_socket: None,
        })
    }

    /// The duplicate of a UDP rule's socket that handed-off datagrams are answered
    /// through: one `dup` per rule, not one per datagram.
    pub fn handoff_socket(&mut self) -> io::Result<std::sync::Arc<std::net::UdpSocket>> {
        if let Some(s) = &self.handoff_socket {
            return Ok(s.clone());
        }
        let ListenSocket::Udp(u) = &self.socket else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let dup = std::sync::Arc::new(std::net::UdpSocket::from(
            socket2::SockRef::from(u).try_clone()?,
        ));
        self.handoff_socket = Some(dup.clone());
        Ok(dup)
    }

    /// Deregisters and closes the host socket.
    pub fn close(&mut self, registry: &Registry) {
        let _ = match &mut self.socket {
            ListenSocket::Tcp(l) => registry.deregister(l),
            ListenSocket::Udp(u) => registry.deregister(u),
        };
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

    #[test]
    fn device_bound_listener_and_unknown_device() {
        let poll = mio::Poll::new().unwrap();
        let rule = |id, device: &str| PortRule {
            id,
            proto: Proto::Tcp,
            host: "127.0.0.1:0".parse().unwrap(),
            guest: "10.0.2.100:80".parse().unwrap(),
            device: Some(device.to_owned()),
        };
        match Listener::open(rule(1, "lo"), poll.registry(), Token(1)) {
            Ok(l) => {
                let ListenSocket::Tcp(t) = &l.socket else {
                    panic!()
                };
                let s = socket2::SockRef::from(t);
                assert_eq!(s.device().unwrap().as_deref(), Some(&b"lo"[..]));
            }
            // Before Linux 5.7 SO_BINDTODEVICE needs CAP_NET_RAW.
            Err(PortError::Device { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => panic!("unexpected error {e}"),
        }
        match Listener::open(rule(2, "nosuch-if0"), poll.registry(), Token(2)) {
            Err(PortError::Device { device, .. }) => assert_eq!(device, "nosuch-if0"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("bound to an interface that does not exist"),
        }
    }

    #[test]
    fn second_bind_same_address_in_use() {
        let poll = mio::Poll::new().unwrap();
        let rule = |id| PortRule {
            id,
            proto: Proto::Tcp,
            host: "127.0.0.1:0".parse().unwrap(),
            guest: "10.0.2.100:80".parse().unwrap(),
            device: None,
        };
        let first = Listener::open(rule(1), poll.registry(), Token(1)).unwrap();
        let ListenSocket::Tcp(l) = &first.socket else {
            panic!()
        };
        let taken = l.local_addr().unwrap();
        let mut second = rule(2);
        second.host = taken;
        match Listener::open(second, poll.registry(), Token(2)) {
            Err(PortError::InUse { addr, source }) => {
                assert_eq!(addr, taken);
                assert_eq!(source.raw_os_error(), Some(libc::EADDRINUSE));
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("second bind succeeded"),
        }
    }
}
