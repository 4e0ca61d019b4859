//! The datagram system calls of the host sockets ([`crate::host`]) beyond
//! std/mio/socket2: datagrams with their local address (`IP_PKTINFO`/`IPV6_PKTINFO`) and
//! segmented sends (`UDP_SEGMENT`), without allocating (nix's `sendmsg` allocates its
//! control buffer per call).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Room for the control messages of one call: an `in_pktinfo` or `in6_pktinfo` and a
/// `UDP_SEGMENT` size (40 + 24 bytes at most), 8-byte aligned.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Asks the kernel to report the local address of received datagrams.
///
/// # Errors
/// When `setsockopt` fails.
pub fn enable_pktinfo(fd: RawFd, v6: bool) -> io::Result<()> {
    let one: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: `one` is a live c_int and its size is passed; setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn to_socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is larger
            // and suitably aligned for it.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Receives one datagram: its length, its sender and the local address it was sent to
/// (when [`enable_pktinfo`] is on).
///
/// # Errors
/// `WouldBlock` when nothing is queued, or the error of `recvmsg`.
pub fn recv_with_dst(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut from = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = from.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths that
    // outlive the call; the kernel writes within those lengths.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg filled (or left zeroed) the sockaddr_storage.
    let from = unsafe { from.assume_init() };
    let sender =
        to_socket_addr(&from).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    let mut local = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // `msg_controllen`; each header they return lies inside `cmsg`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = data.cast::<libc::in_pktinfo>().read_unaligned();
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        info.ipi_addr.s_addr,
                    ))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    // `n` is non-negative here.
    Ok((n.unsigned_abs(), sender, local))
}

/// Whether the kernel cuts datagrams apart for us (`UDP_SEGMENT`, Linux 4.18): probed once
/// on a throw-away socket. An older kernel would not reject the control message of
/// [`send_msg`] but ignore it and send one large datagram, hence the probe.
pub fn udp_gso_supported() -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None) else {
        return false;
    };
    let seg: libc::c_int = 1400;
    // SAFETY: `seg` is a live c_int and its size is passed; setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&raw const seg).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Sends `data` on a datagram socket with one `sendmsg`: to `to` (`None`: the connected
/// peer), from the local address `from` (`IP_PKTINFO`/`IPV6_PKTINFO`: a socket bound to a
/// wildcard address otherwise picks its source by route), and, with `seg`, as datagrams
/// of `seg` bytes each, the last maybe shorter (`UDP_SEGMENT`: the kernel builds one
/// packet and cuts it apart late, or on loopback only at the receiving socket; only after
/// [`udp_gso_supported`]).
///
/// # Errors
/// The error of `sendmsg`. With `seg`: `EIO`, `EINVAL` or `EMSGSIZE` when this route
/// cannot segment (no checksum offload, `seg` above the path MTU); the caller then sends
/// one by one.
pub fn send_msg(
    fd: RawFd,
    data: &[u8],
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
    seg: Option<u16>,
) -> io::Result<usize> {
    let to: Option<socket2::SockAddr> = to.map(Into::into);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some(to) = &to {
        msg.msg_name = to.as_ptr().cast_mut().cast();
        msg.msg_namelen = to.len();
    }
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let pktinfo = from.map(|from| match from {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>() as u32,
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>() as u32,
        ),
    });
    let seg_len = size_of::<u16>() as u32;
    // SAFETY: CMSG_SPACE only computes sizes. Both messages together take 40 + 24 bytes
    // (in6_pktinfo, u16), which the 64-byte buffer holds.
    let space = unsafe {
        pktinfo.map_or(0, |(_, _, len)| libc::CMSG_SPACE(len))
            + seg.map_or(0, |_| libc::CMSG_SPACE(seg_len))
    };
    if space > 0 {
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
    }
    // SAFETY: `msg_control` points to `cmsg` and `msg_controllen` is the sum of the
    // CMSG_SPACE of the messages written, so CMSG_FIRSTHDR/CMSG_NXTHDR return headers
    // (non-null, checked) whose data lie inside the buffer; payloads are written unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        if let (Some(from), Some((level, kind, len))) = (from, pktinfo) {
            if c.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(len) as _;
            let data = libc::CMSG_DATA(c);
            match from {
                IpAddr::V4(a) => {
                    data.cast::<libc::in_pktinfo>()
                        .write_unaligned(libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr {
                                s_addr: u32::from(a).to_be(),
                            },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        })
                }
                IpAddr::V6(a) => {
                    data.cast::<libc::in6_pktinfo>()
                        .write_unaligned(libc::in6_pktinfo {
                            ipi6_addr: libc::in6_addr {
                                s6_addr: a.octets(),
                            },
                            ipi6_ifindex: 0,
                        })
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
        if let Some(seg) = seg {
            if c.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(seg_len) as _;
            libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg);
        }
    }
    // SAFETY: all pointers in `msg` refer to live buffers of the stated lengths; the
    // kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &raw const msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}
