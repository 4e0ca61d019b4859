//! Link configuration inside a network namespace, with the classic interface ioctls.
//!
//! # Theory of operation
//!
//! [`configure`] does what `slirp4netns --configure` does, in the calling *thread's*
//! network namespace, with ioctls on an `AF_INET` datagram socket (no `ip` binary), and one
//! netlink request for the IPv6 address. In order:
//!
//! 1. `lo` up (`SIOCGIFFLAGS` / `SIOCSIFFLAGS`);
//! 2. on the link: the MAC address if one is given (`SIOCSIFHWADDR`, with the link down:
//!    an up link may refuse the change);
//! 3. the MTU (`SIOCSIFMTU`);
//! 4. the IPv4 address and netmask (`SIOCSIFADDR`, `SIOCSIFNETMASK`);
//! 5. the link up;
//! 6. a default route via the gateway on that link (`SIOCADDRT`), which needs the link up
//!    and the gateway inside the configured subnet.
//!
//! With IPv6 (`ipv6` set), duplicate address detection is turned off on the link before
//! it goes up (`/proc/sys/net/ipv6/conf/NAME/accept_dad`: nothing else can hold our
//! addresses on a point-to-point TAP, and DAD would delay the container by a second),
//! then the address is added without duplicate address detection (`RTM_NEWADDR` with
//! `IFA_F_NODAD`, which no ioctl can ask for: the address is usable at once instead of
//! tentative until a kernel job runs) and a default route via the IPv6 gateway
//! (`SIOCADDRT` with `struct in6_rtmsg`). SLAAC from our router
//! advertisements adds the guest's own address on top.
//!
//! It never touches `/etc/resolv.conf`, as slirp4netns does not. It is not atomic: on
//! error the link is left half configured, and the caller is expected to give up on the
//! namespace.
//!
//! Security: inputs (name, prefix length, MTU) are checked before they reach a syscall
//! structure; the kernel checks the rest and needs `CAP_NET_ADMIN` in the namespace.

use std::ffi::{c_short, CString};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::tap::{ifreq_with_name, ioctl_ptr};

/// What [`configure`] sets up on one link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Interface name (at most 15 bytes), e.g. `tap0`.
    pub name: String,
    /// MTU in bytes (the kernel bounds it; TAP accepts 68..=65535).
    pub mtu: u32,
    /// IPv4 address of the guest, e.g. `10.0.2.100`; `0.0.0.0` leaves the link without
    /// IPv4 (no address, netmask or IPv4 route: pasta's `--ipv6-only`).
    pub addr: Ipv4Addr,
    /// Prefix length of the subnet, 0..=32.
    pub prefix_len: u8,
    /// Default gateway, inside the subnet, e.g. `10.0.2.2`.
    pub gateway: Ipv4Addr,
    /// MAC address to set, or `None` to keep the kernel's random one.
    pub mac: Option<[u8; 6]>,
    /// IPv6 address and default route, if any.
    pub ipv6: Option<Ipv6Link>,
    /// More routes on the link, added after the default routes (pasta's `--config-net`
    /// copies the host's); IPv6 ones only with `ipv6`.
    pub routes: Vec<Route>,
}

/// A route via a gateway on the configured link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// IPv4: `dst/prefix_len via gateway`, or on the link itself (`scope link`) when the
    /// gateway is `0.0.0.0`.
    V4 {
        /// Destination network.
        dst: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
        /// The next hop.
        gateway: Ipv4Addr,
    },
    /// IPv6: `dst/prefix_len via gateway`, or on the link itself when the gateway is `::`.
    V6 {
        /// Destination network.
        dst: Ipv6Addr,
        /// Its prefix length.
        prefix_len: u8,
        /// The next hop.
        gateway: Ipv6Addr,
    },
}

/// The IPv6 part of a [`LinkConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Link {
    /// The guest's address, e.g. `fd00::100`.
    pub addr: Ipv6Addr,
    /// Prefix length, e.g. 64.
    pub prefix_len: u8,
    /// Default gateway, e.g. `fd00::2`.
    pub gateway: Ipv6Addr,
}

/// Errors of [`configure`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Turning duplicate address detection off failed.
    #[error("cannot turn off IPv6 duplicate address detection on link {name}")]
    NoDad {
        /// The link.
        name: String,
        /// The error writing the sysctl.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFADDR` (IPv6) failed.
    #[error("cannot set IPv6 address {addr}/{prefix_len} on link {name}")]
    Addr6 {
        /// The link.
        name: String,
        /// The address.
        addr: Ipv6Addr,
        /// Its prefix length.
        prefix_len: u8,
        /// The error of `ioctl(SIOCSIFADDR)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCADDRT` (IPv6) failed.
    #[error("cannot add an IPv6 default route via {gateway} on link {name}")]
    Route6 {
        /// The link.
        name: String,
        /// The gateway.
        gateway: Ipv6Addr,
        /// The error of `ioctl(SIOCADDRT)`.
        #[source]
        source: io::Error,
    },
    /// The name does not fit in `struct ifreq` or contains a NUL byte.
    #[error("invalid link name {name:?}: at most 15 bytes, no NUL")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The prefix length is above 32.
    #[error("invalid prefix length {prefix_len}: at most 32")]
    InvalidPrefix {
        /// The rejected prefix length.
        prefix_len: u8,
    },
    /// The MTU does not fit in the kernel's `int`.
    #[error("invalid MTU {mtu}")]
    InvalidMtu {
        /// The rejected MTU.
        mtu: u32,
    },
    /// The `AF_INET` socket for the ioctls cannot be created.
    #[error("cannot open a socket for link configuration")]
    Socket(#[source] io::Error),
    /// `SIOCGIFFLAGS` failed (typically `ENODEV`: no such link).
    #[error("cannot read the flags of link {name}")]
    GetFlags {
        /// The link.
        name: String,
        /// The error of `ioctl(SIOCGIFFLAGS)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFFLAGS` failed while bringing the link up.
    #[error("cannot bring link {name} up")]
    Up {
        /// The link.
        name: String,
        /// The error of `ioctl(SIOCSIFFLAGS)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFFLAGS` failed while bringing the link down to change its MAC address.
    #[error("cannot bring link {name} down")]
    Down {
        /// The link.
        name: String,
        /// The error of `ioctl(SIOCSIFFLAGS)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFHWADDR` failed.
    #[error("cannot set MAC address {} on link {name}", fmt_mac(mac))]
    Mac {
        /// The link.
        name: String,
        /// The address.
        mac: [u8; 6],
        /// The error of `ioctl(SIOCSIFHWADDR)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFMTU` failed (`EINVAL`: out of the device's range).
    #[error("cannot set MTU {mtu} on link {name}")]
    Mtu {
        /// The link.
        name: String,
        /// The MTU.
        mtu: u32,
        /// The error of `ioctl(SIOCSIFMTU)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFADDR` failed.
    #[error("cannot set address {addr} on link {name}")]
    Addr {
        /// The link.
        name: String,
        /// The address.
        addr: Ipv4Addr,
        /// The error of `ioctl(SIOCSIFADDR)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFNETMASK` failed.
    #[error("cannot set netmask /{prefix_len} on link {name}")]
    Netmask {
        /// The link.
        name: String,
        /// The prefix length.
        prefix_len: u8,
        /// The error of `ioctl(SIOCSIFNETMASK)`.
        #[source]
        source: io::Error,
    },
    /// `SIOCADDRT` failed (`ENETUNREACH`: gateway outside the subnet; `EEXIST`: a default
    /// route exists already).
    #[error("cannot add a default route via {gateway} on link {name}")]
    Route {
        /// The link.
        name: String,
        /// The gateway.
        gateway: Ipv4Addr,
        /// The error of `ioctl(SIOCADDRT)`.
        #[source]
        source: io::Error,
    },
}

/// Configures `lo` and `cfg.name` in the calling thread's network namespace, as
/// `slirp4netns --configure` does: `lo` up; on `cfg.name`: MAC address (if any, while the
/// link is down), MTU, address and netmask, up, default route via `cfg.gateway`.
///
/// Never touches `/etc/resolv.conf`.
///
/// # Errors
///
/// [`LinkError::InvalidName`], [`LinkError::InvalidPrefix`], [`LinkError::InvalidMtu`] for
/// bad input (checked before any change); otherwise the variant of the step that failed,
/// after the earlier steps took effect. Without `CAP_NET_ADMIN` in the namespace every
/// step fails with `EPERM`.
pub fn configure(cfg: &LinkConfig) -> Result<(), LinkError> {
    let name = cfg.name.as_str();
    if ifreq_with_name(name).is_none() {
        return Err(LinkError::InvalidName {
            name: cfg.name.clone(),
        });
    }
    if cfg.prefix_len > 32 {
        return Err(LinkError::InvalidPrefix {
            prefix_len: cfg.prefix_len,
        });
    }
    let mtu = libc::c_int::try_from(cfg.mtu).map_err(|_| LinkError::InvalidMtu { mtu: cfg.mtu })?;
    let rt_dev = CString::new(name).map_err(|_| LinkError::InvalidName {
        name: cfg.name.clone(),
    })?;

    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| LinkError::Socket(e.into()))?;
    let sock = Sock(sock);

    let lo_flags = sock.flags("lo")?;
    sock.set_flags("lo", lo_flags | IFF_UP)
        .map_err(|source| LinkError::Up {
            name: "lo".into(),
            source,
        })?;

    let mut flags = sock.flags(name)?;
    if let Some(mac) = cfg.mac {
        if flags & IFF_UP != 0 {
            flags &= !IFF_UP;
            sock.set_flags(name, flags)
                .map_err(|source| LinkError::Down {
                    name: cfg.name.clone(),
                    source,
                })?;
        }
        let mut ifr = sock.ifreq(name);
        ifr.ifr_ifru.ifru_hwaddr = sockaddr_mac(mac);
        // SAFETY: SIOCSIFHWADDR reads a `struct ifreq`; `ifr` is one, fully initialised.
        unsafe { ioctl_ptr(sock.fd(), libc::SIOCSIFHWADDR, &mut ifr) }.map_err(|source| {
            LinkError::Mac {
                name: cfg.name.clone(),
                mac,
                source,
            }
        })?;
    }

    let mut ifr = sock.ifreq(name);
    ifr.ifr_ifru.ifru_mtu = mtu;
    // SAFETY: SIOCSIFMTU reads a `struct ifreq`; `ifr` is one, fully initialised.
    unsafe { ioctl_ptr(sock.fd(), libc::SIOCSIFMTU, &mut ifr) }.map_err(|source| {
        LinkError::Mtu {
            name: cfg.name.clone(),
            mtu: cfg.mtu,
            source,
        }
    })?;

    let ipv4 = !cfg.addr.is_unspecified();
    if ipv4 {
        let mut ifr = sock.ifreq(name);
        ifr.ifr_ifru.ifru_addr = sockaddr_in(cfg.addr);
        // SAFETY: SIOCSIFADDR reads a `struct ifreq`; `ifr` is one, fully initialised.
        unsafe { ioctl_ptr(sock.fd(), libc::SIOCSIFADDR, &mut ifr) }.map_err(|source| {
            LinkError::Addr {
                name: cfg.name.clone(),
                addr: cfg.addr,
                source,
            }
        })?;

        let mut ifr = sock.ifreq(name);
        ifr.ifr_ifru.ifru_netmask = sockaddr_in(netmask(cfg.prefix_len));
        // SAFETY: SIOCSIFNETMASK reads a `struct ifreq`; `ifr` is one, fully initialised.
        unsafe { ioctl_ptr(sock.fd(), libc::SIOCSIFNETMASK, &mut ifr) }.map_err(|source| {
            LinkError::Netmask {
                name: cfg.name.clone(),
                prefix_len: cfg.prefix_len,
                source,
            }
        })?;
    }

    if cfg.ipv6.is_some() {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_dad");
        std::fs::write(path, "0").map_err(|source| LinkError::NoDad {
            name: cfg.name.clone(),
            source,
        })?;
    }

    sock.set_flags(name, flags | IFF_UP)
        .map_err(|source| LinkError::Up {
            name: cfg.name.clone(),
            source,
        })?;

    if ipv4 {
        let routes = cfg.routes.iter().filter_map(|r| match *r {
            Route::V4 {
                dst,
                prefix_len,
                gateway,
            } => Some((dst, prefix_len, gateway)),
            Route::V6 { .. } => None,
        });
        // On-link prefixes first: the gateways of the others may lie in them.
        let (on_link, via): (Vec<_>, Vec<_>) = routes.partition(|r| r.2.is_unspecified());
        let all = on_link
            .into_iter()
            .chain(std::iter::once((Ipv4Addr::UNSPECIFIED, 0, cfg.gateway)))
            .chain(via);
        for (dst, prefix_len, gateway) in all {
            add_route4(&sock, &rt_dev, dst, prefix_len, gateway).map_err(|source| {
                LinkError::Route {
                    name: cfg.name.clone(),
                    gateway,
                    source,
                }
            })?;
        }
    }
    if let Some(v6) = &cfg.ipv6 {
        configure_ipv6(name, v6, &cfg.routes)?;
    }
    Ok(())
}

/// `dst/prefix_len via gateway dev rt_dev` (IPv4).
fn add_route4(
    sock: &Sock,
    rt_dev: &CString,
    dst: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> io::Result<()> {
    // SAFETY: an all-zero `struct rtentry` is valid: integers, sockaddrs and a null
    // `rt_dev` pointer.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(dst);
    rt.rt_genmask = sockaddr_in(netmask(prefix_len));
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP;
    if !gateway.is_unspecified() {
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    // The kernel only reads the name (it copies it with strncpy_from_user).
    rt.rt_dev = rt_dev.as_ptr().cast_mut();
    // SAFETY: SIOCADDRT reads a `struct rtentry`; `rt` is one, fully initialised, and
    // `rt_dev` points to a NUL-terminated string (`rt_dev`) that outlives the call.
    unsafe { ioctl_ptr(sock.fd(), libc::SIOCADDRT, &mut rt) }.map(|_| ())
}

/// The kernel's `struct in6_rtmsg` (libc's has private fields).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6_addr(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

/// Adds the IPv6 address, the default route and the IPv6 ones of `routes`; the link is
/// up.
fn configure_ipv6(name: &str, v6: &Ipv6Link, routes: &[Route]) -> Result<(), LinkError> {
    let sock = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| LinkError::Socket(e.into()))?;
    let addr_err = |source| LinkError::Addr6 {
        name: name.to_owned(),
        addr: v6.addr,
        prefix_len: v6.prefix_len,
        source,
    };
    let index = nix::net::if_::if_nametoindex(name).map_err(|e| addr_err(e.into()))?;
    let ifindex = libc::c_int::try_from(index)
        .map_err(|_| addr_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    add_addr6_nodad(index, v6.addr, v6.prefix_len).map_err(addr_err)?;
    let extra = routes.iter().filter_map(|r| match *r {
        Route::V6 {
            dst,
            prefix_len,
            gateway,
        } => Some((dst, prefix_len, gateway)),
        Route::V4 { .. } => None,
    });
    // On-link prefixes first: the gateways of the others may lie in them.
    let (on_link, via): (Vec<_>, Vec<_>) = extra.partition(|r| r.2.is_unspecified());
    let all = on_link
        .into_iter()
        .chain(std::iter::once((Ipv6Addr::UNSPECIFIED, 0, v6.gateway)))
        .chain(via);
    for (dst, dst_len, gateway) in all {
        let mut rt = In6Rtmsg {
            dst: in6_addr(dst),
            src: in6_addr(Ipv6Addr::UNSPECIFIED),
            gateway: in6_addr(gateway),
            kind: 0,
            dst_len: dst_len.into(),
            src_len: 0,
            metric: 1,
            info: 0,
            flags: if gateway.is_unspecified() {
                libc::RTF_UP.into()
            } else {
                (libc::RTF_UP | libc::RTF_GATEWAY).into()
            },
            ifindex,
        };
        // SAFETY: SIOCADDRT on an AF_INET6 socket reads a `struct in6_rtmsg`; `rt` has its
        // layout (`#[repr(C)]`, the kernel's field order and types) and is fully
        // initialised.
        unsafe { ioctl_ptr(sock.as_fd(), libc::SIOCADDRT, &mut rt) }.map_err(|source| {
            LinkError::Route6 {
                name: name.to_owned(),
                gateway,
                source,
            }
        })?;
    }
    warn_if_tentative(v6.addr, name);
    Ok(())
}

/// Adds `addr/prefix_len` to link `index` without duplicate address detection
/// (`IFA_F_NODAD`): one `RTM_NEWADDR` request over rtnetlink, answered by an ACK.
///
/// Netlink here, ioctls for the rest: only netlink can ask for `IFA_F_NODAD`. An address
/// added by `SIOCSIFADDR` is tentative until a kernel job runs, even with `accept_dad` 0,
/// and waiting for that job was a third of the start-up on a 2-vCPU VM (0.1-2.5 ms, its
/// median 1 ms). With the flag the address is usable at once.
fn add_addr6_nodad(index: u32, addr: Ipv6Addr, prefix_len: u8) -> io::Result<()> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REQUEST,
    };
    use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
    use netlink_packet_route::{AddressFamily as Family, RouteNetlinkMessage};
    use nix::sys::socket::{recv, sendto, MsgFlags, NetlinkAddr, SockProtocol};

    let mut msg = AddressMessage::default();
    msg.header.family = Family::Inet6;
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    msg.header.flags = AddressHeaderFlags::Nodad | AddressHeaderFlags::Permanent;
    msg.attributes = vec![
        AddressAttribute::Local(addr.into()),
        AddressAttribute::Address(addr.into()),
    ];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, RouteNetlinkMessage::NewAddress(msg).into());
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);

    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    sendto(
        sock.as_raw_fd(),
        &buf,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    // The socket joined no group: the answer to the request is all it can receive.
    let mut answer = [0u8; 1024];
    let n = recv(sock.as_raw_fd(), &mut answer, MsgFlags::empty())?;
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n]) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::Error(e),
            ..
        }) => match e.code {
            None => Ok(()),
            Some(_) => Err(e.to_io()),
        },
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "RTM_NEWADDR: the kernel's answer is not an acknowledgement",
        )),
    }
}

/// Warns if `addr` on link `name` is still tentative: never with [`add_addr6_nodad`]'s
/// address, which is usable at once. A guard for a kernel that sets the flag anyway: until
/// its background job clears it the address cannot be bound, and the guest's first
/// connections would leave from its link-local address instead. Reads
/// `/proc/net/if_inet6`, which shows the calling thread's network namespace.
fn warn_if_tentative(addr: Ipv6Addr, name: &str) {
    const IFA_F_TENTATIVE: u32 = 0x40;
    let Ok(table) = std::fs::read_to_string("/proc/net/if_inet6") else {
        return;
    };
    let hex: String = addr.octets().iter().map(|b| format!("{b:02x}")).collect();
    let flags = table.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 6 && f[0] == hex && f[5] == name).then(|| u32::from_str_radix(f[4], 16).ok())?
    });
    if flags.is_some_and(|flags| flags & IFA_F_TENTATIVE != 0) {
        log::warn!(
            "{addr} on {name} is tentative despite IFA_F_NODAD: unusable until the kernel clears it"
        );
    }
}

/// `IFF_UP` as the `short` of `ifr_flags`.
const IFF_UP: c_short = libc::IFF_UP as c_short;

/// The configuration socket.
struct Sock(OwnedFd);

impl Sock {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// An `ifreq` for a name already validated by [`configure`].
    fn ifreq(&self, name: &str) -> libc::ifreq {
        // Invariant: `configure` checked the name with `ifreq_with_name` ("lo" is valid).
        ifreq_with_name(name).unwrap_or_else(|| unreachable!("link name validated"))
    }

    /// `SIOCGIFFLAGS`.
    fn flags(&self, name: &str) -> Result<c_short, LinkError> {
        let mut ifr = self.ifreq(name);
        // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a `struct ifreq`;
        // `ifr` is one and lives across the call.
        unsafe { ioctl_ptr(self.fd(), libc::SIOCGIFFLAGS, &mut ifr) }.map_err(|source| {
            LinkError::GetFlags {
                name: name.to_owned(),
                source,
            }
        })?;
        // SAFETY: SIOCGIFFLAGS filled `ifru_flags`, a plain integer.
        Ok(unsafe { ifr.ifr_ifru.ifru_flags })
    }

    /// `SIOCSIFFLAGS`.
    fn set_flags(&self, name: &str, flags: c_short) -> io::Result<()> {
        let mut ifr = self.ifreq(name);
        ifr.ifr_ifru.ifru_flags = flags;
        // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`; `ifr` is one, fully initialised.
        unsafe { ioctl_ptr(self.fd(), libc::SIOCSIFFLAGS, &mut ifr) }.map(drop)
    }
}

/// `struct sockaddr_in` for `addr` (port 0), in its generic `struct sockaddr` shape: the
/// port in `sa_data[0..2]`, the address in `sa_data[2..6]`, both big endian.
fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

/// The hardware address `struct sockaddr` of `SIOCSIFHWADDR` for an Ethernet MAC.
fn sockaddr_mac(mac: [u8; 6]) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (dst, src) in sa.sa_data[..6].iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    sa
}

/// The netmask of a prefix length (at most 32).
fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nix::sched::{unshare, CloneFlags};

    use super::*;
    use crate::sys::tap::Tap;

    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
            f()
        })
        .join()
        .expect("test thread panicked")
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn slirp_cfg(name: &str) -> LinkConfig {
        LinkConfig {
            name: name.into(),
            mtu: 65520,
            addr: Ipv4Addr::new(10, 0, 2, 100),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            mac: Some([0x02, 0x50, 0x00, 0x00, 0x00, 0x01]),
            ipv6: None,
            routes: Vec::new(),
        }
    }

    #[test]
    fn netmask_of_prefix() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn sockaddr_in_layout() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[..6], &[0, 0, 10, 0, 2, 100]);
    }

    #[test]
    fn configure_bad_input_rejected() {
        let mut cfg = slirp_cfg("0123456789abcdef");
        assert!(matches!(
            configure(&cfg),
            Err(LinkError::InvalidName { .. })
        ));
        cfg.name = "tap0".into();
        cfg.prefix_len = 33;
        assert!(matches!(
            configure(&cfg),
            Err(LinkError::InvalidPrefix { prefix_len: 33 })
        ));
        cfg.prefix_len = 24;
        cfg.mtu = u32::MAX;
        assert!(matches!(configure(&cfg), Err(LinkError::InvalidMtu { .. })));
    }

    #[test]
    fn configure_tap_like_slirp4netns() {
        in_new_netns(|| {
            let _tap = Tap::create("tap0", true).unwrap();
            configure(&slirp_cfg("tap0")).unwrap();

            let addr = ip(&["-o", "-4", "addr", "show", "dev", "tap0"]);
            assert!(addr.contains("inet 10.0.2.100/24 brd 10.0.2.255"), "{addr}");
            let link = ip(&["-o", "link", "show", "tap0"]);
            assert!(link.contains("mtu 65520"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            assert!(link.contains("link/ether 02:50:00:00:00:01"), "{link}");
            let lo = ip(&["-o", "link", "show", "lo"]);
            assert!(lo.contains(",UP"), "{lo}");
            let route = ip(&["-4", "route"]);
            assert!(route.contains("default via 10.0.2.2 dev tap0"), "{route}");
            assert!(route.contains("10.0.2.0/24 dev tap0"), "{route}");
        });
    }

    #[test]
    fn configure_up_link_changes_mac() {
        in_new_netns(|| {
            let _tap = Tap::create("tap0", false).unwrap();
            ip(&["link", "set", "tap0", "up"]);
            let mut cfg = slirp_cfg("tap0");
            cfg.mtu = 1500;
            configure(&cfg).unwrap();
            let link = ip(&["-o", "link", "show", "tap0"]);
            assert!(link.contains("link/ether 02:50:00:00:00:01"), "{link}");
            assert!(link.contains("mtu 1500"), "{link}");
        });
    }

    #[test]
    fn configure_missing_link_fails() {
        in_new_netns(|| {
            let err = configure(&slirp_cfg("nosuch0")).unwrap_err();
            assert!(matches!(err, LinkError::GetFlags { .. }), "{err:?}");
            assert_eq!(err.to_string(), "cannot read the flags of link nosuch0");
        });
    }

    #[test]
    fn configure_gateway_outside_subnet_fails() {
        in_new_netns(|| {
            let _tap = Tap::create("tap0", false).unwrap();
            let mut cfg = slirp_cfg("tap0");
            cfg.gateway = Ipv4Addr::new(192, 168, 1, 1);
            let err = configure(&cfg).unwrap_err();
            assert!(matches!(err, LinkError::Route { .. }), "{err:?}");
        });
    }
}
