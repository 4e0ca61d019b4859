//! IPv6 (issue 4): `-6/--enable-ipv6` in attach mode and IPv6 by default in `usernet run`.
//!
//! The topology is [`Topology::new_ipv6`]: the world W serves 2001:db8:2::1 ([`WORLD6`]) and
//! reaches H over 2001:db8:1::/64; H has no route to 2001:db8:ff::/48 ([`UNREACHABLE6`]).
//! usernet gives the container C `fd00::/64` by router advertisements (SLAAC), `fd00::100`
//! with `-c`, the gateway `fd00::2` (H's `::1`), the DNS forwarder `fd00::3` and the router
//! link-local `fe80::2`.
//!
//! Covered: TCP both ways (64 MiB each way to the world, 16 MiB each way to H's `::1` via
//! `fd00::2`, SHA-256 compared), half-close both ways, a 65520-byte MTU, refused and
//! unreachable destinations, UDP round trips, ping6 of the gateway and of the world (with and
//! without `net.ipv4.ping_group_range` in H), DNS over `fd00::3` (UDP and TCP, IPv4 and IPv6
//! upstreams), the router advertisements (contents, start-up burst, answer to router
//! solicitations), SLAAC, `-c` without a tentative address,
//! `--disable-host-loopback`, `--outbound-addr6` (address, interface, wrong family),
//! published ports from IPv6 clients (`-p [::]`, `-p [::1]`, the API with `::`; TCP and UDP;
//! the client address the container observes; also to a SLAAC-only guest), no IPv6 service
//! without `-6`, and run mode with and without `--disable-ipv6`.
//!
//! Not covered: the 60 s advertisement interval (too slow), and whether the TAP really
//! offers TSO6 to the guest (no ethtool here; the 64 MiB upload passes either way).

mod util;

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use util::*;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

fn any6(ip: Ipv6Addr) -> SocketAddrV6 {
    SocketAddrV6::new(ip, 0, 0, 0)
}

fn at6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// A running usernet plus, if the test fails while it runs, a dump of C's IPv6 state (taken
/// before usernet is killed, which removes `tap0`).
struct Started<'t> {
    t: &'t Topology,
    _u: Usernet,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        // Plain commands with a deadline (`ip` already ran for the topology; nothing here
        // may panic while unwinding).
        let mut dump = String::new();
        let c = self.t.container.clone();
        for args in [
            &["-n", &c, "-6", "addr", "show"][..],
            &["-n", &c, "-6", "route", "show"],
            &["-n", &c, "-6", "neigh", "show"],
            &["-n", &c, "-s", "link", "show", "tap0"],
            &[
                "netns",
                "exec",
                &c,
                "sysctl",
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.tap0.accept_dad",
            ],
        ] {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(args);
            let f = run_with_timeout(cmd, Duration::from_secs(5));
            dump.push_str(&format!("$ ip {}\n{}", args.join(" "), f.stdout));
        }
        eprintln!("--- C's IPv6 state at the failure ---\n{dump}--- end ---");
    }
}

/// Starts `cmd` (with `-r`) and waits until ready; see [`Started`].
fn started<'t>(t: &'t Topology, cmd: UsernetCmd<'_>) -> Started<'t> {
    Started { t, _u: cmd.start() }
}

/// usernet `-6 -c EXTRA...`, ready.
fn start6<'t>(t: &'t Topology, extra: &[&str]) -> Started<'t> {
    started(t, UsernetCmd::new(t).args(["-6", "-c"]).args(extra))
}

/// `ping -6 -n -c COUNT -W 10 DST` inside C, bounded by 30 s: for a destination that
/// answers (a reply, or an ICMPv6 error), which may take a while on a loaded machine.
fn ping6(t: &Topology, dst: &str, count: &str) -> Finished {
    ping6_within(t, dst, count, "10")
}

/// `ping -6 -n -c COUNT -W 1 DST` inside C: for a destination that must not answer. A
/// wrong reply comes as fast as a right one, so load can only hide it, never fail the test.
fn ping6_briefly(t: &Topology, dst: &str, count: &str) -> Finished {
    ping6_within(t, dst, count, "1")
}

fn ping6_within(t: &Topology, dst: &str, count: &str, wait: &str) -> Finished {
    t.run_in_container(
        "ping",
        &["-6", "-n", "-c", count, "-W", wait, dst],
        Duration::from_secs(30),
    )
}

/// A global `fd00::/64` address of C's `tap0` other than `fd00::100`, with whether it is
/// still tentative.
fn slaac_address(t: &Topology) -> Option<(Ipv6Addr, bool)> {
    let out = t.container_addrs6("tap0");
    out.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        w.find(|x| *x == "inet6")?;
        let (addr, prefix) = w.next()?.split_once('/')?;
        let addr: Ipv6Addr = addr.parse().ok()?;
        let in_net = addr.segments()[..4] == [0xfd00, 0, 0, 0];
        (in_net && prefix == "64" && addr != GUEST6 && l.contains("scope global"))
            .then(|| (addr, l.contains("tentative")))
    })
}

/// Creates a persistent TAP `tap0` in C and brings it (and `lo`) up before usernet attaches,
/// as RootlessKit does; the kernel's IPv6 defaults (DAD, accept_ra, autoconf) stay on.
fn precreate_tap_up(t: &Topology) {
    let c = &t.container;
    ip(&["-n", c, "link", "set", "lo", "up"]);
    ip(&["-n", c, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&["-n", c, "link", "set", "tap0", "up"]);
}

/// Waits up to `t` for a usable (non-tentative) SLAAC address in C.
fn wait_slaac_usable(t: &Topology, within: Duration) -> Ipv6Addr {
    wait_for(within, || match slaac_address(t) {
        Some((a, false)) => Some(a),
        _ => None,
    })
    .unwrap_or_else(|| {
        panic!(
            "no usable SLAAC address in C within {within:?}:\n{}",
            t.container_addrs6("tap0")
        )
    })
}

/// A TCP client bound to `src` (port 0) connecting to `dst` with a timeout; call it inside
/// the client's namespace.
fn tcp_connect6_from(src: Ipv6Addr, dst: SocketAddrV6) -> io::Result<TcpStream> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn6::from(any6(src)))?;
    match connect(fd.as_raw_fd(), &SockaddrIn6::from(dst)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    let n = poll(&mut fds, PollTimeout::from(10_000u16))?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
    }
    let err = getsockopt(&fd, sockopt::SocketError)?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    let s = TcpStream::from(fd);
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A TCP server in C on `[::]:0` that writes `PEER LOCAL\n` (the client address it sees and
/// its own address), half-closes, then waits for the client's EOF.
fn peer_reporter6(t: &Topology) -> TcpServer6 {
    TcpServer6::start(
        &t.container_ns(),
        any6(Ipv6Addr::UNSPECIFIED),
        |s, peer, _| {
            let local = s.local_addr()?;
            s.write_all(format!("{peer} {local}\n").as_bytes())?;
            s.shutdown(Shutdown::Write)?;
            let mut b = [0u8; 64];
            while s.read(&mut b)? > 0 {}
            Ok(())
        },
    )
}

/// Reads what a [`peer_reporter6`] sent: (the client address, the server's own address).
#[track_caller]
fn reported(s: &mut TcpStream) -> (SocketAddr, SocketAddr) {
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading the reported peer: {e} (got {text:?})"));
    let (peer, local) = text
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("container reported {text:?}"));
    let parse = |a: &str| -> SocketAddr {
        a.parse()
            .unwrap_or_else(|_| panic!("container reported {text:?}, not addresses"))
    };
    (parse(peer), parse(local))
}

/// A UDP server in C that answers every datagram with `PEER|` + the datagram.
struct UdpReporter6 {
    addr: SocketAddrV6,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpReporter6 {
    /// Binds `addr` (port 0: any) in C.
    fn start(t: &Topology, addr: SocketAddrV6) -> Self {
        let sock = in_netns(&t.container_ns(), || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in C: {e}"));
        let addr = match sock.local_addr().expect("local_addr") {
            SocketAddr::V6(a) => a,
            SocketAddr::V4(_) => unreachable!("bound an IPv6 address"),
        };
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let mut reply = format!("{peer}|").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
        });
        UdpReporter6 {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpReporter6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// Sends `payload` from `sock` to `dst` until a [`UdpReporter6`] answers (3 tries of 2 s);
/// returns the peer address the container saw.
#[track_caller]
fn udp_ask(sock: &UdpSocket, dst: SocketAddr, payload: &[u8]) -> SocketAddr {
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        sock.send_to(payload, dst)
            .unwrap_or_else(|e| panic!("send_to {dst}: {e}"));
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(
                from, dst,
                "the container's reply came from {from}, not from the published port {dst}: \
                 usernet forwarded it as a new outbound flow instead of through the published \
                 port's flow (did the guest reply from another of its addresses?)"
            );
            let text = &buf[..n];
            let bar = text
                .iter()
                .position(|&b| b == b'|')
                .expect("reply has PEER|DATA");
            assert_eq!(&text[bar + 1..], payload, "payload echoed back differs");
            let peer = std::str::from_utf8(&text[..bar]).expect("utf-8");
            return peer
                .parse()
                .unwrap_or_else(|_| panic!("bad reported peer {peer:?}"));
        }
    }
    panic!("no UDP reply from {dst} after 3 tries");
}

/// One API exchange (request, `\n`, half-close, reply to EOF), bounded by 10 s.
fn api_raw(path: &Path, req: &str) -> String {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect API socket {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("{req}\n").as_bytes())
        .expect("write request");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reply to {req}: {e} (got {out:?})"));
    out
}

/// One captured router advertisement: its source, destination and kernel receive time,
/// and the options the tests check.
#[derive(Debug, Default)]
struct RouterAdvert {
    from: Option<Ipv6Addr>,
    /// The destination address: all nodes (`ff02::1`) for an unsolicited advertisement,
    /// the soliciting address for an answer to a router solicitation.
    to: Option<Ipv6Addr>,
    /// When C's kernel received it (`SO_TIMESTAMPNS`, since the epoch): unlike the instant
    /// the test thread gets it, not delayed by the test's own scheduling.
    received: Option<Duration>,
    router_lifetime: u16,
    /// (prefix, length, on-link, autonomous, valid lifetime).
    prefixes: Vec<(Ipv6Addr, u8, bool, bool, u32)>,
    mtu: Option<u32>,
    /// (lifetime, servers).
    rdnss: Vec<(u32, Vec<Ipv6Addr>)>,
    source_mac: Option<[u8; 6]>,
}

fn parse_ra(m: &[u8]) -> Option<RouterAdvert> {
    if m.len() < 16 || m[0] != 134 || m[1] != 0 {
        return None;
    }
    let mut ra = RouterAdvert {
        router_lifetime: u16::from_be_bytes([m[6], m[7]]),
        ..RouterAdvert::default()
    };
    let mut pos = 16;
    while pos + 2 <= m.len() {
        let (kind, len) = (m[pos], m[pos + 1] as usize * 8);
        if len == 0 || pos + len > m.len() {
            return None;
        }
        let o = &m[pos..pos + len];
        match kind {
            1 if len >= 8 => ra.source_mac = o[2..8].try_into().ok(),
            3 if len == 32 => {
                let p: [u8; 16] = o[16..32].try_into().ok()?;
                ra.prefixes.push((
                    Ipv6Addr::from(p),
                    o[2],
                    o[3] & 0x80 != 0,
                    o[3] & 0x40 != 0,
                    u32::from_be_bytes(o[4..8].try_into().ok()?),
                ));
            }
            5 if len == 8 => ra.mtu = Some(u32::from_be_bytes(o[4..8].try_into().ok()?)),
            25 if len >= 24 => {
                let life = u32::from_be_bytes(o[4..8].try_into().ok()?);
                let servers = o[8..]
                    .chunks_exact(16)
                    .map(|c| Ipv6Addr::from(<[u8; 16]>::try_from(c).expect("16 bytes")))
                    .collect();
                ra.rdnss.push((life, servers));
            }
            _ => {}
        }
        pos += len;
    }
    Some(ra)
}

/// A raw ICMPv6 socket in C (not bound to a device, so it may exist before `tap0`) that
/// reports each message's destination and kernel receive time.
fn icmp6_raw_socket(t: &Topology) -> UdpSocket {
    use nix::sys::socket::{
        setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType,
    };
    let fd = t.in_container(|| {
        socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::IcmpV6,
        )
        .expect("raw ICMPv6 socket in C")
    });
    setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true).expect("IPV6_RECVPKTINFO");
    setsockopt(&fd, sockopt::ReceiveTimestampns, &true).expect("SO_TIMESTAMPNS");
    // std's timeouts work on any datagram-like socket.
    let s = UdpSocket::from(fd);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s
}

/// Receives ICMPv6 on `sock` until a router advertisement arrives or `within` passes.
fn next_ra(sock: &UdpSocket, within: Duration) -> Option<RouterAdvert> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn6};
    let end = Instant::now() + within;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut cmsgs = nix::cmsg_space!(nix::sys::time::TimeSpec, libc::in6_pktinfo);
        let Ok(msg) = recvmsg::<SockaddrIn6>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsgs),
            MsgFlags::empty(),
        ) else {
            continue;
        };
        let (n, from) = (msg.bytes, msg.address.map(|a| a.ip()));
        let (mut to, mut received) = (None, None);
        for c in msg.cmsgs().into_iter().flatten() {
            match c {
                ControlMessageOwned::Ipv6PacketInfo(info) => {
                    to = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                }
                ControlMessageOwned::ScmTimestampns(ts) => received = Some(Duration::from(ts)),
                _ => {}
            }
        }
        if let Some(mut ra) = parse_ra(&buf[..n]) {
            (ra.from, ra.to, ra.received) = (from, to, received);
            return Some(ra);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp6_container_to_world_64mib_hash_matches() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &[]);
    t.in_container(|| upload_to_sink6(sink.addr, 0x6C2E, BULK));
    // Outbound NAT: the world sees usernet's host address, never the guest's.
    assert_eq!(sink.stats.peer_ips6(), vec![HOST_ADDR6]);
}

#[test]
fn tcp6_world_to_container_64mib_hash_matches() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let source = TcpServer6::source(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &[]);
    t.in_container(|| download_from_source6(source.addr, 0x6E2C, BULK));
    assert_eq!(source.stats.peer_ips6(), vec![HOST_ADDR6]);
}

/// TSO towards the guest works for IPv6 as for IPv4: a download leaves usernet as TCP
/// super-frames (the vnet header's GSO_TCPV6), counted in `tx_gso_frames`.
#[test]
fn tcp6_download_uses_segmentation_offload() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let source = TcpServer6::source(&t.world_ns(), any6(WORLD6));
    let api = t.tmp.join("gso.sock");
    let api_s = api.to_string_lossy().into_owned();
    let _u = start6(&t, &["-a", &api_s]);
    t.in_container(|| download_from_source6(source.addr, 0x750, 16 << 20));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_usernet"))
        .args(["stats", "-a", &api_s, "--json"])
        .output()
        .expect("usernet stats");
    let json = String::from_utf8_lossy(&out.stdout);
    let gso: u64 = json
        .split("\"tx_gso_frames\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tx_gso_frames in {json}"));
    // 16 MiB in 64 KiB super-frames is about 256 of them; plain segments would give 0.
    assert!(gso >= 100, "only {gso} super-frames for 16 MiB: {json}");
}

#[test]
fn tcp6_half_close_both_directions() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let half = TcpServer6::half_close(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &[]);
    // Client first: the sink reads to EOF, then replies on the half-open connection.
    t.in_container(|| upload_to_sink6(sink.addr, 0x6F1, 4 << 20));
    // Server first: the client reads up to the server's FIN, then sends 4 MiB.
    let sent = t.in_container(|| {
        let mut s = connect6(half.addr).unwrap_or_else(|e| panic!("connect {}: {e}", half.addr));
        let mut greeting = Vec::new();
        s.read_to_end(&mut greeting)
            .expect("reading up to the server's FIN");
        assert_eq!(greeting, HALF_CLOSE_GREETING);
        let sent = send_pattern(&mut s, 0x6F2, 4 << 20).expect("writing after the server's FIN");
        s.shutdown(Shutdown::Write).expect("shutdown(Write)");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("waiting for the final close");
        assert!(rest.is_empty(), "no data expected after the server's FIN");
        sent
    });
    let got = half.stats.wait_digests(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "the server never saw the client's EOF");
    assert_eq!(got[0].2, 4 << 20, "bytes received after the server's FIN");
    assert_eq!(hex(&got[0].1), hex(&sent));
}

#[test]
fn tcp6_mtu_65520_both_ways() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let source = TcpServer6::source(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &["--mtu", "65520"]);
    assert!(
        t.container_link("tap0").contains("mtu 65520"),
        "{}",
        t.container_link("tap0")
    );
    t.in_container(|| {
        upload_to_sink6(sink.addr, 0x6501, 16 << 20);
        download_from_source6(source.addr, 0x6502, 16 << 20);
    });
}

#[test]
fn tcp6_gateway_reaches_host_loopback_both_ways() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.host_ns(), any6(Ipv6Addr::LOCALHOST));
    let source = TcpServer6::source(&t.host_ns(), any6(Ipv6Addr::LOCALHOST));
    let _u = start6(&t, &[]);
    t.in_container(|| {
        upload_to_sink6(at6(GATEWAY6, sink.addr.port()), 0x6010, 16 << 20);
        download_from_source6(at6(GATEWAY6, source.addr.port()), 0x6011, 16 << 20);
    });
    assert_eq!(sink.stats.peer_ips6(), vec![Ipv6Addr::LOCALHOST]);
}

#[test]
fn disable_host_loopback6_gateway_fails_fast_world_still_works() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let local = TcpServer6::echo(&t.host_ns(), any6(Ipv6Addr::LOCALHOST));
    let world = TcpServer6::echo(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &["--disable-host-loopback"]);
    t.in_container(|| {
        let dst = at6(GATEWAY6, local.addr.port());
        let r = TcpStream::connect_timeout(&dst.into(), CONNECT_TIMEOUT);
        // Fails fast: usernet's "network unreachable" came back, not a timeout.
        assert_eq!(
            r.as_ref().err().and_then(io::Error::raw_os_error),
            Some(libc::ENETUNREACH),
            "connect to {dst} despite --disable-host-loopback: {r:?}"
        );
        echo_once6(world.addr, b"the IPv6 world is still reachable");
    });
    assert_eq!(local.stats.accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn tcp6_refused_destination_gives_econnrefused() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let _u = start6(&t, &[]);
    t.in_container(|| {
        // Nothing listens on port 9 in W nor on H's ::1.
        assert_refused6(at6(WORLD6, 9));
        assert_refused6(at6(GATEWAY6, 9));
    });
}

#[test]
fn tcp6_unreachable_destination_fails_fast() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let echo = TcpServer6::echo(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &[]);
    // C routes everything via the gateway, so the failure must come from usernet.
    let route = ip(&["-n", &t.container, "-6", "route", "get", "2001:db8:ff::55"]).stdout;
    assert!(
        route.contains("via fd00::2"),
        "C's route to {UNREACHABLE6}: {route}"
    );
    t.in_container(|| {
        echo_once6(echo.addr, b"the IPv6 world is reachable");
        assert_unreachable6(at6(UNREACHABLE6, 80));
    });
}

// ---------------------------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------------------------

/// Up to the largest datagram that fits a 1500-byte MTU unfragmented (1500 - 40 - 8).
const SIZES6: [usize; 6] = [1, 64, 512, 1000, 1280, 1452];

#[test]
fn udp6_world_echo_round_trips_of_several_sizes() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let echo = UdpEcho6::start(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &[]);
    t.in_container(|| {
        let sock = udp_socket6(any6(Ipv6Addr::UNSPECIFIED));
        for size in SIZES6 {
            udp_roundtrip6(&sock, echo.addr, &pattern(size as u64 + 600, size), 3)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // A second flow (source port) at once.
        let sock2 = udp_socket6(any6(Ipv6Addr::UNSPECIFIED));
        udp_roundtrip6(&sock2, echo.addr, b"second flow", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(echo.stats.peer_ips6(), vec![HOST_ADDR6]);
}

#[test]
fn udp6_gateway_reaches_host_loopback_echo() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let echo = UdpEcho6::start(&t.host_ns(), any6(Ipv6Addr::LOCALHOST));
    let _u = start6(&t, &[]);
    t.in_container(|| {
        let sock = udp_socket6(any6(Ipv6Addr::UNSPECIFIED));
        let dst = at6(GATEWAY6, echo.addr.port());
        for size in SIZES6 {
            udp_roundtrip6(&sock, dst, &pattern(size as u64 + 700, size), 3)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    assert_eq!(echo.stats.peer_ips6(), vec![Ipv6Addr::LOCALHOST]);
}

// ---------------------------------------------------------------------------------------------
// ICMPv6 echo
// ---------------------------------------------------------------------------------------------

#[test]
fn ping6_gateway_answers() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("ping") {
        return;
    }
    // Default ping_group_range ("1 0"): the gateway still answers.
    let _u = start6(&t, &[]);
    let f = ping6(&t, "fd00::2", "3");
    f.assert_success();
    assert!(f.stdout.contains("bytes from fd00::2"), "{f}");
}

#[test]
fn ping6_world_when_ping_group_range_allows() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("ping") {
        return;
    }
    // net.ipv4.ping_group_range also governs ICMPv6 ping sockets.
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let _u = start6(&t, &[]);
    let f = ping6(&t, "2001:db8:2::1", "3");
    f.assert_success();
    assert!(f.stdout.contains("bytes from 2001:db8:2::1"), "{f}");
}

#[test]
fn ping6_world_without_ping_group_range_gets_no_reply() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("ping") {
        return;
    }
    t.host_sysctl("net.ipv4.ping_group_range", "1 0");
    let _u = start6(&t, &[]);
    let f = ping6(&t, "2001:db8:2::1", "2");
    assert!(f.status.is_some(), "ping hung:\n{f}");
    assert!(
        !f.success(),
        "ping6 of the world succeeded although usernet cannot ping:\n{f}"
    );
    assert!(!f.stdout.contains("bytes from"), "a reply was faked:\n{f}");
    let text = format!("{}{}", f.stdout, f.stderr).to_lowercase();
    assert!(
        text.contains("prohibited"),
        "expected an ICMPv6 \"administratively prohibited\" error:\n{f}"
    );
    // The gateway keeps answering.
    ping6(&t, "fd00::2", "1").assert_success();
}

// ---------------------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_world_answer(how: &str, id: u16, reply: &[u8]) {
    let r = parse_dns(reply).unwrap_or_else(|| panic!("{how}: malformed DNS answer"));
    assert_eq!(r.id, id, "{how}");
    assert!(r.is_response, "{how}");
    assert_eq!(r.rcode, 0, "{how}");
    assert_eq!(r.qname, DNS_NAME, "{how}");
    assert_eq!(r.a, vec![WORLD], "{how}");
}

#[test]
fn dns6_udp_and_tcp_via_fd00_3() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let dns = DnsServer::start(&t);
    let _u = start6(&t, &[]);
    let fwd = at6(DNS6, 53);
    let (udp, tcp) = t.in_container(|| {
        (
            dns_udp_exchange6(fwd, &dns_query(0x6161, DNS_NAME, QTYPE_A)),
            dns_tcp_exchange6(fwd, &dns_query(0x6262, DNS_NAME, QTYPE_A)),
        )
    });
    assert_world_answer(
        "UDP",
        0x6161,
        &udp.expect("no DNS answer from fd00::3 over UDP"),
    );
    assert_world_answer(
        "TCP",
        0x6262,
        &tcp.unwrap_or_else(|e| panic!("DNS over TCP to [fd00::3]:53: {e}")),
    );
    let seen = dns.udp_queries.load(Ordering::SeqCst) + dns.tcp_queries.load(Ordering::SeqCst);
    assert!(
        seen >= 2,
        "the test DNS server saw {seen} queries, expected 2"
    );
}

#[test]
fn dns6_forwarder_relays_to_an_ipv6_nameserver() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    // usernet's resolv.conf names only an IPv6 nameserver.
    t.set_host_resolv_conf("nameserver ::1\n");
    let dns = DnsServer::start_at6(&t.host_ns(), at6(Ipv6Addr::LOCALHOST, 53));
    let _u = start6(&t, &[]);
    let (v6, v4) = t.in_container(|| {
        (
            dns_udp_exchange6(at6(DNS6, 53), &dns_query(0x6363, DNS_NAME, QTYPE_A)),
            dns_tcp_exchange(
                SocketAddrV4::new(DNS, 53),
                &dns_query(0x6464, DNS_NAME, QTYPE_A),
            ),
        )
    });
    assert_world_answer(
        "UDP via fd00::3",
        0x6363,
        &v6.expect("no answer from fd00::3 with an IPv6 upstream"),
    );
    assert_world_answer(
        "TCP via 10.0.2.3",
        0x6464,
        &v4.unwrap_or_else(|e| panic!("TCP via 10.0.2.3 with an IPv6 upstream: {e}")),
    );
    let seen = dns.udp_queries.load(Ordering::SeqCst) + dns.tcp_queries.load(Ordering::SeqCst);
    assert!(seen >= 2, "the [::1]:53 server saw {seen} queries");
}

// ---------------------------------------------------------------------------------------------
// Autoconfiguration
// ---------------------------------------------------------------------------------------------

#[test]
fn configure_sets_fd00_100_nodad_and_default_route() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let _u = start6(&t, &[]);
    // Right at readiness: no duplicate address detection delay.
    let addrs = t.container_addrs6("tap0");
    let line = addrs
        .lines()
        .find(|l| l.contains("inet6 fd00::100/64"))
        .unwrap_or_else(|| panic!("no fd00::100/64 on C's tap0:\n{addrs}"));
    assert!(
        !line.contains("tentative"),
        "fd00::100 is tentative:\n{addrs}"
    );
    // Added without duplicate address detection: usable at once, nothing to wait for.
    assert!(line.contains("nodad"), "fd00::100 is not nodad:\n{addrs}");
    let route = ip(&["-n", &t.container, "-6", "route", "show", "default"]).stdout;
    assert!(
        route.contains("via fd00::2") && route.contains("tap0"),
        "C's IPv6 default route: {route:?}"
    );
    // The IPv4 side is unchanged.
    assert!(
        t.container_addrs("tap0").contains("10.0.2.100/24"),
        "{}",
        t.container_addrs("tap0")
    );
}

#[test]
fn slaac_gives_an_address_and_a_default_route_that_work() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    precreate_tap_up(&t);
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let _u = started(&t, UsernetCmd::new(&t).args(["-6"]));
    let t0 = Instant::now();
    let got = wait_for(Duration::from_secs(20), || slaac_address(&t));
    let (addr, _) = got.unwrap_or_else(|| {
        panic!(
            "no SLAAC address in fd00::/64 on C's tap0 within 20 s of ready:\n{}\nroutes:\n{}",
            t.container_addrs6("tap0"),
            ip(&["-n", &t.container, "-6", "route", "show"]).stdout
        )
    });
    eprintln!("SLAAC address {addr} after {:.2?}", t0.elapsed());
    assert_ne!(addr, GUEST6);
    // The advertisement also gave the default route (via the router's link-local).
    let route = wait_for(Duration::from_secs(20), || {
        let r = ip(&["-n", &t.container, "-6", "route", "show", "default"]).stdout;
        r.contains("via fe80::2").then_some(r)
    });
    assert!(
        route.is_some(),
        "no default route via fe80::2 in C:\n{}",
        ip(&["-n", &t.container, "-6", "route", "show"]).stdout
    );
    // Once duplicate address detection is done, the address works end to end.
    let usable = wait_slaac_usable(&t, Duration::from_secs(20));
    assert_eq!(usable, addr);
    t.in_container(|| upload_to_sink6(sink.addr, 0x65AC, 1 << 20));
    assert_eq!(sink.stats.peer_ips6(), vec![HOST_ADDR6]);
}

#[test]
fn router_advertisement_carries_prefix_mtu_and_rdnss() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    // Opened before usernet starts, so the first advertisements are seen.
    let raw = icmp6_raw_socket(&t);
    let _u = start6(&t, &["--mtu", "9000"]);
    // The start-up ones go to all nodes, 1 s apart by usernet's timer; an answer to the
    // kernel's router solicitation goes to the soliciting address and is left out here.
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut burst = Vec::new();
    while burst.len() < 3 {
        let left = end.saturating_duration_since(Instant::now());
        let Some(ra) = next_ra(&raw, left) else { break };
        if ra.to == Some(all_nodes) {
            burst.push(ra);
        }
    }
    assert_eq!(
        burst.len(),
        3,
        "unsolicited router advertisements within 20 s: {burst:?}"
    );
    // Receive times: a delay anywhere only widens the gaps, so 1 s apart is at least 0.9 s.
    for pair in burst.windows(2) {
        let (a, b) = (pair[0].received.unwrap(), pair[1].received.unwrap());
        assert!(
            b.saturating_sub(a) >= Duration::from_millis(900),
            "start-up advertisements {:.3?} apart, not 1 s: {burst:?}",
            b.saturating_sub(a)
        );
    }
    let ra = &burst[0];
    eprintln!("{ra:?}");
    assert_eq!(ra.from, Some(ROUTER_LL6), "advertisement's source");
    assert!(
        ra.router_lifetime > 0,
        "router lifetime 0: not a default router"
    );
    assert!(
        ra.prefixes.iter().any(|&(p, len, onlink, auto, valid)| {
            p == Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)
                && len == 64
                && onlink
                && auto
                && valid > 0
        }),
        "no on-link autonomous fd00::/64 prefix: {:?}",
        ra.prefixes
    );
    assert_eq!(ra.mtu, Some(9000), "MTU option");
    assert!(
        ra.rdnss
            .iter()
            .any(|(life, servers)| *life > 0 && servers.contains(&DNS6)),
        "no RDNSS option naming fd00::3: {:?}",
        ra.rdnss
    );
    assert!(
        ra.source_mac.is_some(),
        "no source link-layer address option"
    );
}

#[test]
fn router_advertisement_without_dns_has_no_rdnss() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let raw = icmp6_raw_socket(&t);
    let _u = start6(&t, &["--disable-dns"]);
    let ra = next_ra(&raw, Duration::from_secs(20)).expect("no router advertisement within 20 s");
    assert!(ra.rdnss.is_empty(), "RDNSS with --disable-dns: {ra:?}");
    assert!(!ra.prefixes.is_empty(), "{ra:?}");
}

#[test]
fn router_solicitation_is_answered_after_the_initial_adverts() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let raw = icmp6_raw_socket(&t);
    // usernet creates tap0 down (no -c): the advertisements of the first seconds are lost.
    let _u = started(&t, UsernetCmd::new(&t).args(["-6"]));
    thread::sleep(Duration::from_millis(3500));
    assert!(slaac_address(&t).is_none());
    ip(&["-n", &t.container, "link", "set", "lo", "up"]);
    ip(&["-n", &t.container, "link", "set", "tap0", "up"]);
    // The kernel solicits from its link-local address once that passed duplicate address
    // detection, and the answer goes there; unsolicited advertisements (a start-up one that
    // came late, or the next, a minute away) go to all nodes. So an advertisement to a
    // unicast address is the answer, whatever the timing.
    let end = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let left = end.saturating_duration_since(Instant::now());
        let Some(ra) = next_ra(&raw, left) else {
            break None;
        };
        if ra.to.is_some_and(|to| !to.is_multicast()) {
            break Some(ra);
        }
    };
    let answer = answer.unwrap_or_else(|| {
        panic!(
            "no answer to the router solicitation within 20 s of link-up:\n{}",
            t.container_addrs6("tap0")
        )
    });
    assert_eq!(answer.from, Some(ROUTER_LL6), "{answer:?}");
    assert!(
        answer.to.is_some_and(|to| to.is_unicast_link_local()),
        "{answer:?}"
    );
    // And C configures itself from it.
    let got = wait_for(Duration::from_secs(20), || slaac_address(&t));
    assert!(
        got.is_some(),
        "no SLAAC address 20 s after link-up:\n{}",
        t.container_addrs6("tap0")
    );
}

// ---------------------------------------------------------------------------------------------
// --outbound-addr6
// ---------------------------------------------------------------------------------------------

#[test]
fn outbound_addr6_address_is_the_source_the_world_sees() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let udp = UdpEcho6::start(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &["--outbound-addr6", "2001:db8:1::3"]);
    t.in_container(|| {
        upload_to_sink6(sink.addr, 0x60A, 1 << 20);
        let s = udp_socket6(any6(Ipv6Addr::UNSPECIFIED));
        udp_roundtrip6(&s, udp.addr, b"udp via outbound addr6", 3)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(
        sink.stats.peer_ips6(),
        vec![HOST_ADDR6_2],
        "TCP source seen by the world"
    );
    assert_eq!(
        udp.stats.peer_ips6(),
        vec![HOST_ADDR6_2],
        "UDP source seen by the world"
    );
}

#[test]
fn outbound_addr6_interface_name_uses_its_global_address() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let sink = TcpServer6::sink(&t.world_ns(), any6(WORLD6));
    let _u = start6(&t, &["--outbound-addr6", HOST_OB_IFNAME]);
    t.in_container(|| upload_to_sink6(sink.addr, 0x60B, 1 << 20));
    // ob0 also has a link-local address, which must not be chosen.
    assert_eq!(sink.stats.peer_ips6(), vec![HOST_OB_ADDR6]);
}

#[test]
fn outbound_addr6_rejects_an_ipv4_address() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let f = UsernetCmd::new(&t)
        .args(["-6", "-c", "--outbound-addr6", "198.51.100.1"])
        .output(Duration::from_secs(20));
    assert!(f.status.is_some(), "usernet kept running:\n{f}");
    assert!(
        !f.success(),
        "usernet accepted an IPv4 --outbound-addr6:\n{f}"
    );
    assert!(f.stderr.contains("outbound-addr6"), "error message:\n{f}");
}

// ---------------------------------------------------------------------------------------------
// Published ports
// ---------------------------------------------------------------------------------------------

#[test]
fn publish6_world_client_tcp_address_is_observed() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let rep = peer_reporter6(&t);
    let sink = TcpServer6::sink(&t.container_ns(), any6(Ipv6Addr::UNSPECIFIED));
    let p1 = format!("[::]:8080:{}", rep.addr.port());
    let p2 = format!("[::]:8081:{}", sink.addr.port());
    let _u = start6(&t, &["-p", &p1, "-p", &p2]);
    t.in_world(|| {
        // From W's server address, so the source is unambiguous.
        let mut s = tcp_connect6_from(WORLD6, at6(HOST_ADDR6, 8080))
            .unwrap_or_else(|e| panic!("connect [{HOST_ADDR6}]:8080 from {WORLD6}: {e}"));
        let me = s.local_addr().expect("local_addr");
        let (peer, local) = reported(&mut s);
        assert_eq!(peer.ip(), IpAddr::V6(WORLD6), "container saw {peer}");
        assert_eq!(
            peer.port(),
            me.port(),
            "container saw {peer}, client is {me}"
        );
        assert_eq!(
            local.ip(),
            IpAddr::V6(GUEST6),
            "forwarded to {local}, expected the guest's IPv6 address"
        );

        // 16 MiB over the published port, hash checked.
        let dst = at6(HOST_ADDR6, 8081);
        let mut s = connect6(dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        let sent = send_pattern(&mut s, 0x6B0B, 16 << 20).expect("send over IPv6");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("sink reply");
        assert_eq!(reply.len(), 40, "sink reply");
        assert_eq!(hex(&reply[..32]), hex(&sent), "bytes differ over IPv6");
    });
    assert_eq!(
        sink.stats.peer_ips6(),
        vec![WORLD_LINK6],
        "the sink's client (W's default source)"
    );
}

#[test]
fn publish6_world_client_udp_address_is_observed() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    // One server bound to fd00::100 (replies from it), one bound to [::] (replies from the
    // kernel's choice of source: with -c, C also has a SLAAC address in fd00::/64).
    let wild = UdpReporter6::start(&t, any6(Ipv6Addr::UNSPECIFIED));
    let p2 = format!("[::]:5301:{}/udp", wild.addr.port());
    let _u = start6(&t, &["-p", "[::]:5300:7000/udp", "-p", &p2]);
    // fd00::100 exists once usernet has configured C.
    let _fixed = UdpReporter6::start(&t, at6(GUEST6, 7000));
    t.in_world(|| {
        let u = UdpSocket::bind(any6(WORLD6)).expect("bind udp in W");
        let me = u.local_addr().expect("local_addr");
        for port in [5300, 5301] {
            let peer = udp_ask(&u, at6(HOST_ADDR6, port).into(), b"udp over ipv6");
            assert_eq!(
                peer.ip(),
                IpAddr::V6(WORLD6),
                ":{port}: container saw {peer}"
            );
            assert_eq!(
                peer.port(),
                me.port(),
                ":{port}: container saw {peer}, client is {me}"
            );
        }
    });
}

#[test]
fn publish6_loopback_client_tcp_is_seen_as_the_gateway() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let rep = peer_reporter6(&t);
    let p = format!("[::1]:8080:{}", rep.addr.port());
    let _u = start6(&t, &["-p", &p]);
    t.in_host(|| {
        let dst = at6(Ipv6Addr::LOCALHOST, 8080);
        let mut s = connect6(dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        let (peer, local) = reported(&mut s);
        assert_eq!(peer.ip(), IpAddr::V6(GATEWAY6), "::1 client seen as {peer}");
        assert_eq!(local.ip(), IpAddr::V6(GUEST6), "forwarded to {local}");
        // [::1] is not published on IPv4.
        assert_refused(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
    });
    // Nor reachable from the world.
    t.in_world(|| assert_refused6(at6(HOST_ADDR6, 8080)));
}

#[test]
fn publish6_loopback_client_udp_is_seen_as_the_gateway() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let wild = UdpReporter6::start(&t, any6(Ipv6Addr::UNSPECIFIED));
    let p2 = format!("[::1]:5301:{}/udp", wild.addr.port());
    let _u = start6(&t, &["-p", "[::1]:5300:7000/udp", "-p", &p2]);
    let _fixed = UdpReporter6::start(&t, at6(GUEST6, 7000));
    t.in_host(|| {
        let u = UdpSocket::bind(any6(Ipv6Addr::LOCALHOST)).expect("bind udp ::1");
        for port in [5300, 5301] {
            let peer = udp_ask(&u, at6(Ipv6Addr::LOCALHOST, port).into(), b"udp from ::1");
            assert_eq!(
                peer.ip(),
                IpAddr::V6(GATEWAY6),
                ":{port}: ::1 client seen as {peer}"
            );
        }
    });
}

#[test]
fn publish6_api_unspecified_host_addr() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let rep = peer_reporter6(&t);
    let sock = t.tmp.join("api.sock");
    let _u = start6(&t, &["-a", sock.to_str().expect("utf-8 path")]);
    let req = format!(
        r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"::","host_port":8082,"guest_addr":"","guest_port":{}}}}}"#,
        rep.addr.port()
    );
    let r = api_raw(&sock, &req);
    assert!(r.contains("\"id\""), "{req}: unexpected reply {r:?}");
    t.in_world(|| {
        let mut s = tcp_connect6_from(WORLD6, at6(HOST_ADDR6, 8082))
            .unwrap_or_else(|e| panic!("connect [{HOST_ADDR6}]:8082 from {WORLD6}: {e}"));
        let (peer, local) = reported(&mut s);
        assert_eq!(peer.ip(), IpAddr::V6(WORLD6), "container saw {peer}");
        assert_eq!(local.ip(), IpAddr::V6(GUEST6), "forwarded to {local}");
    });
}

#[test]
fn publish6_to_a_slaac_only_guest() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    precreate_tap_up(&t);
    let rep = peer_reporter6(&t);
    let urep = UdpReporter6::start(&t, any6(Ipv6Addr::UNSPECIFIED));
    let echo = UdpEcho6::start(&t.world_ns(), any6(WORLD6));
    let p1 = format!("[::]:8080:{}", rep.addr.port());
    let p2 = format!("[::]:5300:{}/udp", urep.addr.port());
    let _u = started(&t, UsernetCmd::new(&t).args(["-6", "-p", &p1, "-p", &p2]));
    let slaac = wait_slaac_usable(&t, Duration::from_secs(20));
    // The guest talks first, so usernet learns its address from its traffic.
    t.in_container(|| {
        let s = udp_socket6(any6(Ipv6Addr::UNSPECIFIED));
        udp_roundtrip6(&s, echo.addr, b"hello from a SLAAC guest", 3)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    t.in_world(|| {
        let mut s = tcp_connect6_from(WORLD6, at6(HOST_ADDR6, 8080))
            .unwrap_or_else(|e| panic!("connect [{HOST_ADDR6}]:8080 from {WORLD6}: {e}"));
        let (peer, local) = reported(&mut s);
        assert_eq!(peer.ip(), IpAddr::V6(WORLD6), "container saw {peer}");
        assert_eq!(
            local.ip(),
            IpAddr::V6(slaac),
            "forwarded to {local}, expected the SLAAC address"
        );
        // UDP too (the guest has a single global address here).
        let u = UdpSocket::bind(any6(WORLD6)).expect("bind udp in W");
        let peer = udp_ask(&u, at6(HOST_ADDR6, 5300).into(), b"udp to a SLAAC guest");
        assert_eq!(peer.ip(), IpAddr::V6(WORLD6), "UDP: container saw {peer}");
    });
}

// ---------------------------------------------------------------------------------------------
// Without -6, and run mode
// ---------------------------------------------------------------------------------------------

#[test]
fn without_enable_ipv6_the_guest_gets_no_ipv6_service() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("ping") {
        return;
    }
    let raw = icmp6_raw_socket(&t);
    let _u = started(&t, UsernetCmd::new(&t).args(["-c"]));
    // Advertisements would come at once and 1 s and 2 s later.
    let ra = next_ra(&raw, Duration::from_millis(3500));
    assert!(ra.is_none(), "router advertisement without -6: {ra:?}");
    let addrs = t.container_addrs6("tap0");
    assert!(
        !addrs.contains("fd00:"),
        "fd00:: address without -6:\n{addrs}"
    );
    // Even with an address and a route set by hand, nobody answers for fd00::2.
    let c = &t.container;
    ip(&[
        "-n",
        c,
        "-6",
        "addr",
        "add",
        "fd00::100/64",
        "dev",
        "tap0",
        "nodad",
    ]);
    ip(&["-n", c, "-6", "route", "add", "default", "via", "fd00::2"]);
    let f = ping6_briefly(&t, "fd00::2", "2");
    assert!(f.status.is_some(), "ping hung:\n{f}");
    assert!(!f.success(), "fd00::2 answered without -6:\n{f}");
    assert!(!f.stdout.contains("bytes from"), "{f}");
    // IPv4 is untouched.
    t.run_in_container(
        "ping",
        &["-n", "-c", "1", "-W", "10", "10.0.2.2"],
        Duration::from_secs(30),
    )
    .assert_success();
}

fn run_mode(t: &Topology, extra: &[&str], script: &str) -> Finished {
    let mut target = vec!["run"];
    target.extend_from_slice(extra);
    target.extend_from_slice(&["--", "sh", "-c", script]);
    UsernetCmd::new(t)
        .target(target)
        .output(Duration::from_secs(60))
}

#[test]
fn run_mode_has_ipv6_by_default() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("curl") {
        return;
    }
    let http = TcpServer6::start(&t.world_ns(), any6(WORLD6), |s, _, _| {
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b)?;
            if n == 0 {
                break;
            }
            req.extend_from_slice(&b[..n]);
        }
        let body = "hello over IPv6\n";
        let resp = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes())
    });
    let script = format!(
        "ip -o -6 addr show dev tap0; ip -6 route show default; cat /etc/resolv.conf; \
         curl -g -sS --max-time 10 'http://[{WORLD6}]:{}/'",
        http.addr.port()
    );
    let f = run_mode(&t, &[], &script);
    assert_eq!(f.code(), Some(0), "{f}");
    let line = f
        .stdout
        .lines()
        .find(|l| l.contains("inet6 fd00::100/64"))
        .unwrap_or_else(|| panic!("no fd00::100/64 in run mode:\n{f}"));
    assert!(!line.contains("tentative"), "fd00::100 is tentative:\n{f}");
    assert!(f.stdout.contains("via fd00::2"), "default route:\n{f}");
    assert!(f.stdout.contains("nameserver fd00::3"), "resolv.conf:\n{f}");
    assert!(f.stdout.contains("hello over IPv6"), "{f}");
    assert_eq!(http.stats.peer_ips6(), vec![HOST_ADDR6]);
}

#[test]
fn run_mode_disable_ipv6_removes_it() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("curl") {
        return;
    }
    let echo = TcpServer6::echo(&t.world_ns(), any6(WORLD6));
    let script = format!(
        "ip -o -6 addr show; cat /etc/resolv.conf; \
         curl -g -sS --max-time 5 'http://[{WORLD6}]:{}/' && echo CURL_OK; exit 0",
        echo.addr.port()
    );
    let f = run_mode(&t, &["--disable-ipv6"], &script);
    assert_eq!(f.code(), Some(0), "{f}");
    assert!(
        !f.stdout.contains("fd00:"),
        "IPv6 despite --disable-ipv6:\n{f}"
    );
    assert!(
        !f.stdout.contains("CURL_OK"),
        "reached the IPv6 world:\n{f}"
    );
    assert!(
        f.stdout.contains("nameserver 10.0.2.3"),
        "resolv.conf:\n{f}"
    );
    assert_eq!(echo.stats.accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn udp6_bursts_keep_datagram_boundaries_and_order() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    // MTU 65520: the container does not fragment (IPv6 fragments are not handled).
    let api = t.tmp.join("api.sock");
    let s = start6(
        &t,
        &["--mtu", "65520", "-a", api.to_str().expect("utf-8 path")],
    );
    // Host loopback through the gateway: the route segments.
    let rx = t.in_host(|| UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind"));
    let dst = SocketAddr::from((GATEWAY6, rx.local_addr().expect("addr").port()));
    let tx = t.in_container(|| udp_socket6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)));
    let s0 = get_stats(&api);
    for round in 0..2 {
        let seed = 7000 + 1000 * round;
        let got = udp_stopped_burst(&s._u, &tx, &rx, dst, seed);
        assert_udp_burst(&got, seed, &format!("gateway, burst {round}"));
    }
    let runs = get_stats(&api).delta(&s0, "counters.udp_gso_sends");
    assert!(runs >= 2, "two bursts sent in {runs} segmented runs");
    // The world through H's 1500-byte veth: runs above the path MTU go one by one.
    let rx = t.in_world(|| UdpSocket::bind((WORLD6, 0)).expect("bind"));
    let dst = SocketAddr::from((WORLD6, rx.local_addr().expect("addr").port()));
    for round in 0..2 {
        let seed = 90_000 + 1000 * round;
        let got = udp_stopped_burst(&s._u, &tx, &rx, dst, seed);
        assert_udp_burst(&got, seed, &format!("world, burst {round}"));
    }
}
