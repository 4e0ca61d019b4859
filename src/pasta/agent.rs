//! The namespace agent: a forked helper that stays inside the target's namespaces.
//!
//! # Theory of operation
//!
//! Two pasta features need the target's network namespace after start-up: `auto` port
//! forwarding (which ports does the namespace listen on now?) and `-T/-U` (listening
//! sockets on the namespace's loopback). usernet itself stays in the host's namespaces, so
//! a helper forked at start joins the target's user and network namespaces (as the TAP
//! helper does) and then answers requests on a `SOCK_SEQPACKET` socket pair, one message
//! each way:
//!
//! - `S`: scan. The answer lists the sockets listening in the namespace (TCP `LISTEN`,
//!   unconnected bound UDP), from its `/proc/net/{tcp,tcp6,udp,udp6}`, 4 bytes each:
//!   protocol (`t`/`u`), 1 if bound to a loopback address only, the port (big endian).
//! - `L` + protocol + a 16-byte IPv6 (or IPv4-mapped) address + port: a socket bound to
//!   that address in the namespace (TCP: listening, urgent data inline for its
//!   connections, see [`crate::splice`]), sent back with `SCM_RIGHTS` after a `K`; or
//!   `E` + errno.
//!
//! - `C` + the same address form: a TCP socket of the namespace, non-blocking, whose
//!   connection to that address is under way (pasta mode's loopback clients of `-t`
//!   ports, urgent data inline), sent back the same way.
//! - `U` + the same address form + a local port: a UDP socket of the namespace bound to
//!   that local port (any port if it is taken) and connected to the address (loopback
//!   clients of `-u` ports, whose source port pasta keeps).
//!
//! The helper dies with usernet (`PR_SET_PDEATHSIG`) and exits when its socket closes;
//! its fds 0-2 are on `/dev/null` (it must not hold the caller's pipes).
//! It runs with usernet's credentials and creates nothing but sockets on request.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use forwarder::port::Proto;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::{getpid, getppid, Pid};

use crate::netns::{self, NetnsError, Target};
use crate::sys;

/// Most sockets one scan reports.
const MAX_SCAN: usize = 4096;

/// A socket found listening by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listening {
    /// TCP or UDP.
    pub proto: Proto,
    /// Bound to a loopback address only.
    pub loopback: bool,
    /// The port.
    pub port: u16,
}

/// The helper, from usernet's side.
#[derive(Debug)]
pub struct Agent {
    sock: OwnedFd,
    pid: Pid,
}

fn proto_byte(p: Proto) -> u8 {
    match p {
        Proto::Tcp => b't',
        Proto::Udp => b'u',
    }
}

impl Agent {
    /// Forks the helper into `target`'s namespaces (`userns` as for the TAP).
    ///
    /// # Errors
    /// [`NetnsError`] when the helper cannot be started or cannot join.
    pub fn spawn(target: &Target, userns: Option<&Path>) -> Result<Agent, NetnsError> {
        let netns_path = target.netns_path();
        let userns_path = target.userns_path(userns);
        let (parent, child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(NetnsError::Socketpair)?;
        let me = getpid();
        let pid = sys::fork_child(&[parent.as_fd()], move || {
            if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != me {
                return 1;
            }
            // It never prints, and must not keep the caller's pipes open after usernet
            // detached from them.
            if sys::fd::stdio_to_dev_null().is_err() {
                return 1;
            }
            let first = match netns::join_paths(&netns_path, userns_path.as_deref()) {
                Ok(()) => b"K".to_vec(),
                Err(e) => format!("E{e}").into_bytes(),
            };
            if send(&child, &first).is_err() || first[0] != b'K' {
                return 1;
            }
            serve(&child)
        })
        .map_err(NetnsError::Fork)?;
        let agent = Agent { sock: parent, pid };
        let mut buf = [0u8; 512];
        let n = nix::sys::socket::recv(agent.sock.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(NetnsError::Receive)?;
        match buf.get(..n) {
            Some([b'K']) => Ok(agent),
            Some([b'E', text @ ..]) => Err(NetnsError::Helper {
                message: String::from_utf8_lossy(text).into_owned(),
                source: None,
            }),
            _ => Err(NetnsError::Garbled),
        }
    }

    /// The sockets listening in the namespace now.
    ///
    /// # Errors
    /// The helper is gone or answered garbage.
    pub fn scan(&self) -> io::Result<Vec<Listening>> {
        send(&self.sock, b"S")?;
        let mut buf = vec![0u8; MAX_SCAN * 4 + 1];
        let n = nix::sys::socket::recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 || buf[0] != b'S' {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad scan answer",
            ));
        }
        Ok(buf[1..n]
            .chunks_exact(4)
            .filter_map(|c| {
                let proto = match c[0] {
                    b't' => Proto::Tcp,
                    b'u' => Proto::Udp,
                    _ => return None,
                };
                Some(Listening {
                    proto,
                    loopback: c[1] == 1,
                    port: u16::from_be_bytes([c[2], c[3]]),
                })
            })
            .collect())
    }

    /// A socket bound to `addr` inside the namespace (TCP: listening), non-blocking.
    ///
    /// # Errors
    /// The helper's errno (`EADDRINUSE`, ...), or the helper is gone.
    pub fn bind(&self, proto: Proto, addr: SocketAddr) -> io::Result<OwnedFd> {
        self.socket_request(&[b'L', proto_byte(proto)], addr, &[])
    }

    /// A TCP socket inside the namespace connecting to `addr`, non-blocking (the
    /// connection completes or fails later, as with any non-blocking `connect`).
    ///
    /// # Errors
    /// The helper's errno, or the helper is gone.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        self.socket_request(b"C", addr, &[])
    }

    /// A UDP socket inside the namespace bound to `local_port` (any port if that one is
    /// taken) and connected to `addr`, non-blocking.
    ///
    /// # Errors
    /// The helper's errno, or the helper is gone.
    pub fn udp_connect(&self, addr: SocketAddr, local_port: u16) -> io::Result<OwnedFd> {
        self.socket_request(b"U", addr, &local_port.to_be_bytes())
    }

    /// Sends `head` + `addr` + `tail` and receives a socket or an errno.
    fn socket_request(&self, head: &[u8], addr: SocketAddr, tail: &[u8]) -> io::Result<OwnedFd> {
        let mut req = [0u8; 24];
        let ip6 = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut n = 0;
        for part in [head, &ip6.octets(), &addr.port().to_be_bytes(), tail] {
            req[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        send(&self.sock, &req[..n])?;
        let mut buf = [0u8; 8];
        let (n, fd) = sys::recv_with_fd(self.sock.as_fd(), &mut buf)?;
        match (buf.get(..n), fd) {
            (Some([b'K']), Some(fd)) => Ok(fd),
            (Some([b'E', e @ ..]), None) if e.len() == 4 => {
                Err(io::Error::from_raw_os_error(i32::from_ne_bytes([
                    e[0], e[1], e[2], e[3],
                ])))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad bind answer",
            )),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Closing our end ends the helper; reap it.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

fn send(sock: &OwnedFd, data: &[u8]) -> io::Result<()> {
    nix::sys::socket::send(sock.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// The helper's loop (inside the namespace).
fn serve(sock: &OwnedFd) -> i32 {
    let mut buf = [0u8; 64];
    loop {
        let n = match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => n,
        };
        let ok = match &buf[..n] {
            [b'S'] => {
                let mut out = vec![b'S'];
                for (file, proto) in [
                    ("/proc/self/net/tcp", Proto::Tcp),
                    ("/proc/self/net/tcp6", Proto::Tcp),
                    ("/proc/self/net/udp", Proto::Udp),
                    ("/proc/self/net/udp6", Proto::Udp),
                ] {
                    let text = std::fs::read_to_string(file).unwrap_or_default();
                    for l in parse_proc_net(&text, proto).into_iter().take(MAX_SCAN) {
                        out.extend_from_slice(&[proto_byte(l.proto), u8::from(l.loopback)]);
                        out.extend_from_slice(&l.port.to_be_bytes());
                    }
                }
                out.truncate(1 + MAX_SCAN * 4);
                send(sock, &out).is_ok()
            }
            [b'L', p, rest @ ..] if rest.len() == 18 => {
                answer(sock, bind_here(*p, socket_addr(rest)))
            }
            [b'C', rest @ ..] if rest.len() == 18 => answer(sock, connect_here(socket_addr(rest))),
            [b'U', rest @ ..] if rest.len() == 20 => {
                let local = u16::from_be_bytes([rest[18], rest[19]]);
                answer(sock, udp_connect_here(socket_addr(rest), local))
            }
            _ => false,
        };
        if !ok {
            return 1;
        }
    }
}

/// The address of a request: 16 bytes of IPv6 (or IPv4-mapped) address, the port.
fn socket_addr(rest: &[u8]) -> SocketAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&rest[..16]);
    let ip6 = Ipv6Addr::from(a);
    let ip = ip6.to_ipv4_mapped().map_or(IpAddr::V6(ip6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([rest[16], rest[17]]))
}

/// Sends a socket (`K`) or an errno (`E`); false when the answer cannot be sent.
fn answer(sock: &OwnedFd, res: io::Result<OwnedFd>) -> bool {
    match res {
        Ok(fd) => sys::send_with_fd(sock.as_fd(), b"K", fd.as_fd()).is_ok(),
        Err(e) => {
            let mut msg = [b'E', 0, 0, 0, 0];
            msg[1..].copy_from_slice(&e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes());
            send(sock, &msg).is_ok()
        }
    }
}

fn connect_here(addr: SocketAddr) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    // Non-blocking and close-on-exec from `socket(2)` itself: two calls fewer per spliced
    // connection than setting them after.
    let stream = Type::STREAM.nonblocking().cloexec();
    let sock = Socket::new(Domain::for_address(addr), stream, None)?;
    sock.set_tcp_nodelay(true)?;
    // Urgent data inline: the splice relay passes the urgent mark with a read, which
    // would skip the urgent byte without it.
    sock.set_out_of_band_inline(true)?;
    crate::host::start_connect(&sock, addr)?;
    Ok(sock.into())
}

fn udp_connect_here(addr: SocketAddr, local_port: u16) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(addr);
    let sock = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?;
    let any: IpAddr = if addr.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    if sock.bind(&SocketAddr::new(any, local_port).into()).is_err() {
        sock.bind(&SocketAddr::new(any, 0).into())?;
    }
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

fn bind_here(proto: u8, addr: SocketAddr) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(addr);
    let sock = match proto {
        b't' => Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?,
        b'u' => Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    if proto == b't' {
        // Inherited by the connections, as on `connect_here`'s socket: the splice relay
        // sets no option per connection.
        sock.set_tcp_nodelay(true)?;
        sock.set_out_of_band_inline(true)?;
        sock.listen(1024)?;
    }
    Ok(sock.into())
}

/// The listening sockets of `/proc/net/{tcp,tcp6,udp,udp6}` text: TCP in `LISTEN`, UDP
/// unconnected (state 07, no remote port).
pub fn parse_proc_net(text: &str, proto: Proto) -> Vec<Listening> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let listening = match proto {
            Proto::Tcp => *state == "0A",
            Proto::Udp => *state == "07" && remote.ends_with(":0000"),
        };
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        if !listening || port == 0 {
            continue;
        }
        let loopback = match ip.len() {
            // Little-endian words: 127.x.y.z ends in 7F.
            8 => u32::from_str_radix(ip, 16)
                .is_ok_and(|w| Ipv4Addr::from(w.swap_bytes()).is_loopback()),
            32 => ip == "00000000000000000000000001000000",
            _ => false,
        };
        out.push(Listening {
            proto,
            loopback,
            port,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_listeners() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n\
   2: 0100007F:9C40 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 3\n";
        assert_eq!(
            parse_proc_net(tcp, Proto::Tcp),
            [
                Listening {
                    proto: Proto::Tcp,
                    loopback: false,
                    port: 8080
                },
                Listening {
                    proto: Proto::Tcp,
                    loopback: true,
                    port: 53
                },
            ]
        );
        let udp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:14E9 00000000000000000000000000000000:0000 07 0\n\
   1: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 0\n";
        assert_eq!(
            parse_proc_net(udp6, Proto::Udp),
            [
                Listening {
                    proto: Proto::Udp,
                    loopback: true,
                    port: 5353
                },
                Listening {
                    proto: Proto::Udp,
                    loopback: false,
                    port: 53
                },
            ]
        );
    }
}
