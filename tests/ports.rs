//! Published ports (issue 3): the rootless DNAT of `docker run -p`. Rules come from the API
//! socket or from `-p/--publish`; clients are real sockets in the world namespace W or on H's
//! loopback (plus curl, socat and iperf3), servers run in the container namespace C.
//!
//! Covered: TCP both ways with 16 MiB payloads compared by SHA-256, urgent data, UDP, the real client
//! address seen by the container (W clients keep address and port, loopback clients appear as
//! the gateway 10.0.2.2), several UDP clients sharing one published port, IPv6 listen
//! addresses, host IP restrictions, port ranges, `usernet run -p`, and teardown when either
//! side closes, resets, half-closes, refuses or exits — with usernet's fds back to baseline.

mod util;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use util::*;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// 16 MiB: the payload of each direction.
const PAYLOAD: u64 = 16 << 20;

/// How long teardown may take to propagate (polled, or a read timeout: a pass is not slower).
const TEARDOWN: Duration = Duration::from_secs(30);

fn any0() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

fn on(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

fn host(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(HOST_ADDR, port)
}

fn lo(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

/// usernet `-c -a PATH EXTRA...`, ready.
fn start_with_api(t: &Topology, extra: &[&str]) -> (Usernet, PathBuf) {
    let sock = t.tmp.join("api.sock");
    let u = UsernetCmd::new(t)
        .args(["-c", "-a", sock.to_str().expect("utf-8 path")])
        .args(extra)
        .start();
    (u, sock)
}

/// usernet `-c EXTRA...`, ready.
fn start(t: &Topology, extra: &[&str]) -> Usernet {
    UsernetCmd::new(t).args(["-c"]).args(extra).start()
}

/// One API exchange (request, `\n`, half-close, reply to EOF), bounded by [`IO_TIMEOUT`].
fn api_raw(path: &Path, req: &str) -> String {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect API socket {}: {e}", path.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(format!("{req}\n").as_bytes())
        .expect("write request");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reply to {req}: {e} (got {out:?})"));
    out
}

/// `add_hostfwd` through the API; returns the id of `{"return":{"id":N}}`.
#[track_caller]
fn api_add(path: &Path, proto: &str, host_addr: &str, host_port: u16, guest_port: u16) -> u64 {
    let req = format!(
        r#"{{"execute":"add_hostfwd","arguments":{{"proto":"{proto}","host_addr":"{host_addr}","host_port":{host_port},"guest_addr":"","guest_port":{guest_port}}}}}"#
    );
    let r = api_raw(path, &req);
    let compact: String = r.chars().filter(|c| !c.is_whitespace()).collect();
    compact
        .strip_prefix(r#"{"return":{"id":"#)
        .and_then(|s| s.strip_suffix("}}"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{req}: unexpected reply {r:?}"))
}

/// Waits up to `t` until usernet's fd count is at most `base`.
#[track_caller]
fn assert_fds_back(u: &Usernet, base: usize, t: Duration) {
    let t0 = Instant::now();
    if wait_for(t, || (u.fd_count() <= base).then_some(())).is_none() {
        panic!(
            "usernet still holds {} fds {t:?} later (baseline {base}):\n{}",
            u.fd_count(),
            u.fd_targets().join("\n")
        );
    }
    eprintln!("usernet fds back to <= {base} after {:.2?}", t0.elapsed());
}

/// usernet's fd count once it has settled.
fn settled_fds(u: &Usernet) -> usize {
    thread::sleep(Duration::from_millis(300));
    u.fd_count()
}

/// A TCP client socket bound to `src` (port 0) connecting to `dst` with a timeout; must be
/// called inside the client's namespace.
fn tcp_connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
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

/// SO_LINGER 0: closing the socket sends a RST.
fn set_linger0(s: &impl AsFd) {
    nix::sys::socket::setsockopt(
        s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER");
}

/// A TCP server in C that writes the peer address it sees (`IP:PORT\n`), half-closes, then
/// waits for the client's EOF.
fn peer_reporter(t: &Topology, addr: SocketAddrV4) -> TcpServer {
    TcpServer::start(&t.container_ns(), addr, |s, peer, _| {
        s.write_all(format!("{peer}\n").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut b = [0u8; 64];
        while s.read(&mut b)? > 0 {}
        Ok(())
    })
}

/// Reads what a [`peer_reporter`] sent: the peer address the container saw.
#[track_caller]
fn reported_peer(s: &mut TcpStream) -> SocketAddr {
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading the reported peer: {e} (got {text:?})"));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("container reported {text:?}, not an address"))
}

/// Connects (from `src`, or the default source if `None`) to `dst`, returns (own local
/// address, the peer address the container server saw).
#[track_caller]
fn observe_peer(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> (SocketAddr, SocketAddr) {
    let mut s = match src {
        Some(ip) => tcp_connect_from(ip, dst),
        None => connect(dst),
    }
    .unwrap_or_else(|e| panic!("connect {dst} from {src:?}: {e}"));
    let local = s.local_addr().expect("local_addr");
    let seen = reported_peer(&mut s);
    (local, seen)
}

/// A UDP server in C that answers every datagram with `PEER|` followed by the datagram.
struct UdpReporter {
    addr: SocketAddrV4,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpReporter {
    fn start(ns: &str, addr: SocketAddrV4) -> Self {
        let sock = in_netns(ns, || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {ns}: {e}"));
        let addr = match sock.local_addr().expect("local_addr") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (peers.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                p.lock().unwrap().push(peer);
                let mut reply = format!("{peer}|").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
        });
        UdpReporter {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpReporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// Sends `payload` from `sock` to `dst`, again every 2 s, until a reply carrying exactly this
/// payload arrives (for up to [`IO_TIMEOUT`]); returns the peer address the [`UdpReporter`]
/// saw. That reply must come from `dst`. Replies with another payload are skipped: late
/// answers to an earlier request that was sent twice (each client here has its own socket;
/// replies going to the wrong client are the subject of
/// `udp_clients_sharing_a_port_each_get_their_own_replies`).
#[track_caller]
fn udp_ask(sock: &UdpSocket, dst: SocketAddr, payload: &[u8]) -> SocketAddr {
    let mut skipped = Vec::new();
    let reply = udp_ask_until(sock, dst, payload, IO_TIMEOUT, |from, text| {
        let bar = text
            .iter()
            .position(|&b| b == b'|')
            .unwrap_or_else(|| panic!("malformed reply {:?}", String::from_utf8_lossy(text)));
        if &text[bar + 1..] != payload {
            skipped.push(String::from_utf8_lossy(text).into_owned());
            return None;
        }
        assert_eq!(from, dst, "reply from an unexpected source");
        Some(String::from_utf8(text[..bar].to_vec()).expect("utf-8"))
    });
    let Some(peer) = reply else {
        panic!(
            "no UDP reply to {:?} from {dst} within {IO_TIMEOUT:?}; other replies: {skipped:?}",
            String::from_utf8_lossy(payload)
        );
    };
    peer.parse()
        .unwrap_or_else(|_| panic!("bad reported peer {peer:?}"))
}

fn ipv6_loopback_works(t: &Topology) -> bool {
    let v6 = t.in_host(|| std::net::TcpListener::bind("[::1]:0").is_ok());
    require(v6, "IPv6 loopback (::1) unavailable in the host namespace")
}

/// Reads until EOF or error (bounded by the socket's timeout); returns (bytes, how it ended).
fn drain(s: &mut TcpStream) -> (u64, io::Result<()>) {
    let mut n = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (n, Ok(())),
            Ok(k) => n += k as u64,
            Err(e) => return (n, Err(e)),
        }
    }
}

/// Asserts that the connection `s` ends (EOF or reset, not a timeout) within [`TEARDOWN`].
#[track_caller]
fn assert_ends(s: &mut TcpStream, what: &str) -> u64 {
    // The read timeout bounds the wait: an end that never comes fails as a timeout below.
    s.set_read_timeout(Some(TEARDOWN)).expect("timeout");
    let t0 = Instant::now();
    let (n, how) = drain(s);
    match &how {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
        Err(e) => panic!(
            "{what}: connection did not end cleanly after {n} bytes in {:.2?}: {e}",
            t0.elapsed()
        ),
    }
    eprintln!(
        "{what}: ended after {n} bytes ({how:?}) in {:.2?}",
        t0.elapsed()
    );
    n
}

/// Connects to `dst`; `None` if the connection was reset before `connect` returned (H's
/// kernel completes the handshake, and the reset the container sends through usernet can
/// arrive before this thread gets the CPU back). Any other error fails.
#[track_caller]
fn connect_unless_reset(dst: SocketAddrV4) -> Option<TcpStream> {
    match connect(dst) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            eprintln!("connect {dst}: reset before connect returned");
            None
        }
        Err(e) => panic!("connect {dst}: {e}"),
    }
}

/// Waits until `stats.open == 0` (every handler in C finished) within [`TEARDOWN`].
#[track_caller]
fn assert_server_done(stats: &Stats, what: &str) {
    let ok = wait_for(TEARDOWN, || {
        (stats.open.load(Ordering::SeqCst) == 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: the container server still has {} connection(s) open after {TEARDOWN:?}",
        stats.open.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------------
// TCP data
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_published_with_api_16mib_both_ways() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.container_ns(), any0());
    let source = TcpServer::source(&t.container_ns(), any0());
    let (mut u, sock) = start_with_api(&t, &[]);
    assert_eq!(api_add(&sock, "tcp", "0.0.0.0", 8080, sink.addr.port()), 1);
    assert_eq!(api_add(&sock, "tcp", "", 8081, source.addr.port()), 2);
    t.in_world(|| {
        upload_to_sink(host(8080), 0x5E1, PAYLOAD);
        download_from_source(host(8081), 0x5E2, PAYLOAD);
    });
    t.in_host(|| {
        upload_to_sink(lo(8080), 0x5E3, PAYLOAD);
        download_from_source(lo(8081), 0x5E4, PAYLOAD);
    });
    assert_eq!(sink.stats.wait_digests(2, TEARDOWN).len(), 2);
    assert!(
        sink.stats.errors.lock().unwrap().is_empty(),
        "{:?}",
        sink.stats.errors
    );
    u.assert_running();
}

#[test]
fn tcp_published_with_flag_16mib_both_ways() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.container_ns(), any0());
    let source = TcpServer::source(&t.container_ns(), any0());
    let p1 = format!("8080:{}", sink.addr.port());
    let p2 = format!("0.0.0.0:8081:{}/tcp", source.addr.port());
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--publish", &p1, "-p", &p2])
        .start();
    t.in_world(|| {
        upload_to_sink(host(8080), 0xF1, PAYLOAD);
        download_from_source(host(8081), 0xF2, PAYLOAD);
        // Both of H's addresses on the veth.
        upload_to_sink(SocketAddrV4::new(HOST_ADDR2, 8080), 0xF3, 1 << 20);
    });
    t.in_host(|| {
        upload_to_sink(lo(8080), 0xF4, PAYLOAD);
        download_from_source(lo(8081), 0xF5, PAYLOAD);
    });
    u.assert_running();
}

/// A published port's client's urgent byte (`MSG_OOB`) reaches the guest inline, and so do
/// the bytes after it (see tests/tcp.rs for the other direction).
#[test]
fn tcp_published_urgent_byte_arrives_inline_with_the_rest() {
    let Some(t) = Topology::new() else { return };
    let listener = t
        .in_container(|| std::net::TcpListener::bind(any0()))
        .expect("bind in C");
    let p = format!("8080:{}", listener.local_addr().expect("local_addr").port());
    let u = start(&t, &["-p", &p]);
    for fin in [true, false] {
        let mut client = t.in_world(|| connect(host(8080))).expect("connect");
        // Accepted in C: usernet has adopted the connection.
        let (mut server, _) = listener.accept().expect("accept");
        assert_urgent_stream_relayed(&u, &t.world_ns(), &mut client, &mut server, fin);
    }
}

#[test]
fn tcp_published_http_with_curl_from_the_world() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("curl") {
        return;
    }
    let http = TcpServer::http(&t.container_ns(), any0(), "hello from the container\n");
    let p = format!("8080:{}", http.addr.port());
    let _u = start(&t, &["-p", &p]);
    for url in ["http://198.51.100.1:8080/", "http://198.51.100.3:8080/"] {
        let f = run_with_timeout(
            t.exec_in(&t.world, "curl", &["-sS", "--max-time", "30", url]),
            Duration::from_secs(60),
        );
        assert!(f.success(), "curl {url}:\n{f}");
        assert_eq!(f.stdout, "hello from the container\n", "curl {url}:\n{f}");
    }
    let f = run_with_timeout(
        t.exec_in(
            &t.host,
            "curl",
            &["-sS", "--max-time", "30", "http://127.0.0.1:8080/"],
        ),
        Duration::from_secs(60),
    );
    assert!(
        f.success() && f.stdout == "hello from the container\n",
        "{f}"
    );
}

#[test]
fn tcp_many_concurrent_connections_through_a_published_port() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let p = format!("8080:{}", echo.addr.port());
    let u = start(&t, &["-p", &p]);
    t.in_world(|| echo_once(host(8080), b"warm-up"));
    let base = settled_fds(&u);
    t.in_world(|| concurrent_echo(host(8080), 200, 1000));
    assert_server_done(&echo.stats, "200 concurrent echoes");
    assert_fds_back(&u, base, TEARDOWN);
}

// ---------------------------------------------------------------------------------------------
// UDP data
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_published_echo_with_api_and_flag() {
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.container_ns(), any0());
    let echo2 = UdpEcho::start(&t.container_ns(), any0());
    let p = format!("5301:{}/udp", echo2.addr.port());
    let (mut u, sock) = start_with_api(&t, &["-p", &p]);
    assert_eq!(api_add(&sock, "udp", "0.0.0.0", 5300, echo.addr.port()), 2);
    for port in [5300, 5301] {
        t.in_world(|| {
            let s = udp_socket(any0());
            for size in [1usize, 100, 1400, 1472] {
                let payload = pattern(port as u64 + size as u64, size);
                udp_roundtrip(&s, host(port), &payload, 3)
                    .unwrap_or_else(|e| panic!("world, port {port}, {size} bytes: {e}"));
            }
        });
        t.in_host(|| {
            let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
            udp_roundtrip(&s, lo(port), b"from the host's loopback", 3)
                .unwrap_or_else(|e| panic!("loopback, port {port}: {e}"));
        });
    }
    // A real client: socat in W. After its stdin's EOF socat waits `-t` (0.5 s by default)
    // for the reply; with readbytes= it ends as soon as the reply's 10 bytes are in.
    if which("socat").is_some() {
        let mut cmd = t.exec_in(
            &t.world,
            "sh",
            &[
                "-c",
                "echo hello-udp | socat -t 30 -T 30 - UDP:198.51.100.1:5300,readbytes=10",
            ],
        );
        cmd.env("LC_ALL", "C");
        let f = run_with_timeout(cmd, Duration::from_secs(60));
        assert!(f.success(), "socat udp:\n{f}");
        assert_eq!(f.stdout, "hello-udp\n", "socat udp:\n{f}");
    }
    u.assert_running();
}

#[test]
fn udp_published_port_reply_bursts_keep_datagram_boundaries() {
    // The container's replies to a client of a published port leave in segmented runs,
    // with IP_PKTINFO beside UDP_SEGMENT (the rule's socket is bound to 0.0.0.0).
    let Some(t) = Topology::new() else { return };
    let server = t.in_container(|| udp_socket(any0()));
    let p = format!("5302:{}/udp", server.local_addr().unwrap().port());
    let (u, api) = start_with_api(&t, &["-p", &p]);
    let s0 = get_stats(&api);
    let clients = [
        ("world", t.in_world(|| udp_socket(any0())), host(5302)),
        ("host loopback", t.in_host(|| udp_socket(lo(0))), lo(5302)),
    ];
    let mut buf = [0u8; 64];
    server.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    for (round, (who, client, dst)) in clients.iter().enumerate() {
        client.send_to(b"hello", dst).expect("send");
        let (_, peer) = server.recv_from(&mut buf).expect("the client's datagram");
        let seed = 20_000 + 1000 * round as u64;
        let got = udp_stopped_burst(&u, &server, client, peer, seed);
        assert_udp_burst(&got, seed, who);
    }
    let runs = get_stats(&api).delta(&s0, "counters.udp_gso_sends");
    assert!(runs >= 2, "two reply bursts sent in {runs} segmented runs");
}

#[test]
fn udp_reply_source_is_the_address_the_client_used() {
    let Some(t) = Topology::new() else { return };
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p = format!("5300:{}/udp", urep.addr.port());
    let _u = start(&t, &["-p", &p]);
    // H has two addresses on the veth. A reply must come from the address the client sent to
    // (a connected UDP client, e.g. a DNS resolver, drops anything else): with a wildcard-bound
    // host socket that needs IP_PKTINFO. udp_ask asserts the reply's source.
    t.in_world(|| {
        let s = udp_socket(any0());
        udp_ask(&s, host(5300).into(), b"to the 1st address");
        udp_ask(
            &s,
            SocketAddrV4::new(HOST_ADDR2, 5300).into(),
            b"to the 2nd address",
        );
    });
}

#[test]
fn udp_first_datagram_to_a_fresh_guest_is_delivered() {
    let Some(t) = Topology::new() else { return };
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p = format!("5300:{}/udp", urep.addr.port());
    let _u = start(&t, &["-p", &p]);
    // No retry: a DNS or game client's first datagram must not vanish while usernet resolves
    // the guest's MAC address (slirp4netns queues it).
    let got = t.in_world(|| {
        let s = udp_socket(any0());
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.send_to(b"the very first datagram", host(5300))
            .expect("send");
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf)
            .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    let got = got.unwrap_or_else(|e| {
        panic!(
            "no reply to the first datagram within {IO_TIMEOUT:?} ({e}); the container \
             received {:?}",
            urep.peers.lock().unwrap()
        )
    });
    assert!(got.ends_with("|the very first datagram"), "{got:?}");
}

// ---------------------------------------------------------------------------------------------
// Client addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_world_client_address_and_port_are_seen_by_the_container() {
    let Some(t) = Topology::new() else { return };
    let rep = peer_reporter(&t, any0());
    let p = format!("8080:{}", rep.addr.port());
    let _u = start(&t, &["-p", &p]);
    t.in_world(|| {
        for src in [None, Some(WORLD_LINK), Some(Ipv4Addr::new(203, 0, 113, 7))] {
            for _ in 0..3 {
                let (local, seen) = observe_peer(src, host(8080));
                assert_eq!(
                    seen, local,
                    "a world client at {local} was seen by the container as {seen}"
                );
            }
        }
    });
    let ips = rep.stats.peer_ips();
    assert_eq!(
        ips,
        vec![WORLD_LINK, Ipv4Addr::new(203, 0, 113, 7)],
        "peers the container accepted: {:?}",
        rep.stats.peers.lock().unwrap()
    );
}

#[test]
fn tcp_world_client_address_is_kept_with_api_rules_too() {
    let Some(t) = Topology::new() else { return };
    let rep = peer_reporter(&t, any0());
    let (_u, sock) = start_with_api(&t, &[]);
    api_add(&sock, "tcp", "198.51.100.1", 8080, rep.addr.port());
    let (local, seen) =
        t.in_world(|| observe_peer(Some(Ipv4Addr::new(203, 0, 113, 9)), host(8080)));
    assert_eq!(seen, local);
}

#[test]
fn loopback_clients_are_seen_as_the_gateway() {
    let Some(t) = Topology::new() else { return };
    let rep = peer_reporter(&t, any0());
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p1 = format!("8080:{}", rep.addr.port());
    let p2 = format!("5300:{}/udp", urep.addr.port());
    let _u = start(&t, &["-p", &p1, "-p", &p2]);
    t.in_host(|| {
        for _ in 0..3 {
            let (local, seen) = observe_peer(None, lo(8080));
            assert_eq!(
                seen.ip(),
                IpAddr::V4(GATEWAY),
                "loopback TCP client {local} seen as {seen}"
            );
        }
        let (local, seen) = observe_peer(Some(Ipv4Addr::new(127, 0, 0, 5)), lo(8080));
        assert_eq!(
            seen.ip(),
            IpAddr::V4(GATEWAY),
            "loopback client {local} seen as {seen}"
        );
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let seen = udp_ask(&s, lo(5300).into(), b"udp from loopback");
        assert_eq!(
            seen.ip(),
            IpAddr::V4(GATEWAY),
            "loopback UDP client seen as {seen}"
        );
    });
}

#[test]
fn udp_world_client_address_is_seen_by_the_container() {
    let Some(t) = Topology::new() else { return };
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p = format!("5300:{}/udp", urep.addr.port());
    let _u = start(&t, &["-p", &p]);
    t.in_world(|| {
        for src in [WORLD_LINK, Ipv4Addr::new(203, 0, 113, 7)] {
            let s = udp_socket(SocketAddrV4::new(src, 0));
            let local = s.local_addr().expect("local_addr");
            for i in 0..3 {
                let seen = udp_ask(&s, host(5300).into(), format!("hello {i}").as_bytes());
                assert_eq!(seen, local, "UDP client {local} seen as {seen}");
            }
        }
    });
    let mut ips: Vec<IpAddr> = urep.peers.lock().unwrap().iter().map(|p| p.ip()).collect();
    ips.dedup();
    assert_eq!(
        ips,
        [
            IpAddr::V4(WORLD_LINK),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))
        ],
        "source addresses of the datagrams the container got"
    );
}

#[test]
fn udp_clients_sharing_a_port_each_get_their_own_replies() {
    let Some(t) = Topology::new() else { return };
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p = format!("5300:{}/udp", urep.addr.port());
    let _u = start(&t, &["-p", &p]);
    let dst: SocketAddr = host(5300).into();
    // Warm-up with retries (the first datagram to a fresh guest has its own test).
    t.in_world(|| udp_ask(&udp_socket(any0()), dst, b"warm-up"));
    // Four world clients (two source addresses, two ports each) interleaving their datagrams:
    // every client sends, then every client reads, so replies are in flight together.
    t.in_world(|| {
        let srcs = [
            WORLD_LINK,
            WORLD_LINK,
            Ipv4Addr::new(203, 0, 113, 7),
            Ipv4Addr::new(203, 0, 113, 7),
        ];
        // Nothing is sent twice: each reply may take its time.
        let socks: Vec<UdpSocket> = srcs
            .iter()
            .map(|ip| udp_socket(SocketAddrV4::new(*ip, 0)))
            .collect();
        for s in &socks {
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        }
        for round in 0..20 {
            for (i, s) in socks.iter().enumerate() {
                s.send_to(format!("client {i} round {round}").as_bytes(), dst)
                    .expect("send");
            }
            for (i, s) in socks.iter().enumerate() {
                let mut buf = [0u8; 2048];
                let want = format!("client {i} round {round}");
                let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!(
                        "client {i} ({:?}) round {round}: no reply: {e}",
                        s.local_addr()
                    )
                });
                assert_eq!(from, dst);
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let local = s.local_addr().expect("local_addr");
                assert_eq!(
                    text,
                    format!("{local}|{want}"),
                    "client {i} at {local} got someone else's reply (or was seen wrongly)"
                );
            }
        }
    });
    // And two loopback clients in H, both shown as the gateway, still demultiplexed.
    t.in_host(|| {
        let a = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let b = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        for s in [&a, &b] {
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        }
        let dst: SocketAddr = lo(5300).into();
        for round in 0..10 {
            a.send_to(format!("a{round}").as_bytes(), dst)
                .expect("send a");
            b.send_to(format!("b{round}").as_bytes(), dst)
                .expect("send b");
            for (s, want) in [(&a, format!("a{round}")), (&b, format!("b{round}"))] {
                let mut buf = [0u8; 2048];
                let (n, _) = s.recv_from(&mut buf).expect("loopback reply");
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (peer, payload) = text.split_once('|').expect("reply format");
                assert_eq!(payload, want, "loopback client got another client's reply");
                let peer: SocketAddr = peer.parse().expect("peer");
                assert_eq!(peer.ip(), IpAddr::V4(GATEWAY));
            }
        }
    });
}

/// A client socket is one association (issue 17): every datagram of a loopback client (shown
/// to the container as the gateway, with a port usernet picks) comes from the same address and
/// port, also with gaps longer than a loop turn, so a server that `connect()`s to its first
/// peer (socat's UDP-LISTEN) gets them all. Before, each datagram got a new gateway port.
#[test]
fn udp_client_socket_is_one_association() {
    let Some(t) = Topology::new() else { return };
    let v6 = ipv6_loopback_works(&t);
    let servers: Vec<ConnectedUdpServer> = (0..3)
        .map(|_| ConnectedUdpServer::start(&t.container_ns(), any0().into(), 4))
        .collect();
    let mut args = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        args.push("-p".to_string());
        let host = if i == 2 { "[::1]:" } else { "" };
        args.push(format!("{host}{}:{}/udp", 5400 + i, s.addr.port()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _u = start(&t, &args);
    let mut servers = servers.into_iter();
    let (lo4, world, lo6) = (
        servers.next().unwrap(),
        servers.next().unwrap(),
        servers.next().unwrap(),
    );
    t.in_host(|| assert_one_udp_association(lo4, lo(0).into(), lo(5400).into()));
    t.in_world(|| assert_one_udp_association(world, any0().into(), host(5401).into()));
    if v6 {
        t.in_host(|| {
            assert_one_udp_association(
                lo6,
                "[::1]:0".parse().unwrap(),
                "[::1]:5402".parse().unwrap(),
            )
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Listen addresses and ranges
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_loopback_listen_address_tcp_and_udp() {
    let Some(t) = Topology::new() else { return };
    if !ipv6_loopback_works(&t) {
        return;
    }
    let rep = peer_reporter(&t, any0());
    let sink = TcpServer::sink(&t.container_ns(), any0());
    let urep = UdpReporter::start(&t.container_ns(), any0());
    let p1 = format!("[::1]:8080:{}", rep.addr.port());
    let p2 = format!("[::1]:5300:{}/udp", urep.addr.port());
    let (_u, sock) = start_with_api(&t, &["-p", &p1, "-p", &p2]);
    assert_eq!(api_add(&sock, "tcp", "::1", 8081, sink.addr.port()), 3);
    t.in_host(|| {
        let dst: SocketAddr = "[::1]:8080".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let seen = reported_peer(&mut s);
        assert_eq!(
            seen.ip(),
            IpAddr::V4(GATEWAY),
            "IPv6 loopback client seen as {seen}"
        );

        // Data over IPv6 into the guest.
        let dst: SocketAddr = "[::1]:8081".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let sent = send_pattern(&mut s, 0x6, 4 << 20).expect("send over IPv6");
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("sink reply");
        assert_eq!(reply.len(), 40);
        assert_eq!(hex(&reply[..32]), hex(&sent), "bytes differ over IPv6");

        let u = UdpSocket::bind("[::1]:0").expect("bind udp ::1");
        let seen = udp_ask(&u, "[::1]:5300".parse().unwrap(), b"udp over ipv6");
        assert_eq!(seen.ip(), IpAddr::V4(GATEWAY));
        // The IPv6 rules are not on IPv4.
        assert_refused(lo(8080));
    });
}

#[test]
fn ipv6_unspecified_listen_address() {
    let Some(t) = Topology::new() else { return };
    if !ipv6_loopback_works(&t) {
        return;
    }
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let p = format!("[::]:8080:{}", echo.addr.port());
    let _u = start(&t, &["-p", &p]);
    t.in_host(|| {
        let dst: SocketAddr = "[::1]:8080".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(b"over [::]").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"over [::]");
    });
}

#[test]
fn host_ip_in_the_flag_restricts_the_listener() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let uecho = UdpEcho::start(&t.container_ns(), any0());
    let p1 = format!("127.0.0.1:8080:{}", echo.addr.port());
    let p2 = format!("198.51.100.3:8081:{}", echo.addr.port());
    let p3 = format!("127.0.0.1:5300:{}/udp", uecho.addr.port());
    let _u = start(&t, &["-p", &p1, "-p", &p2, "-p", &p3]);
    t.in_host(|| {
        echo_once(lo(8080), b"loopback only");
        assert_refused(host(8080));
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        udp_roundtrip(&s, lo(5300), b"udp loopback only", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    t.in_world(|| {
        assert_refused(host(8080));
        echo_once(SocketAddrV4::new(HOST_ADDR2, 8081), b"second address only");
        assert_refused(host(8081));
    });
}

#[test]
fn port_ranges_publish_each_port() {
    let Some(t) = Topology::new() else { return };
    // Servers on fixed container ports 7000-7002 (TCP) and 7100-7101 (UDP) that name their
    // own port, so a wrong mapping shows.
    let tcp: Vec<TcpServer> = (7000..=7002)
        .map(|p| {
            TcpServer::start(&t.container_ns(), on(p), move |s, _, _| {
                s.write_all(format!("port {p}\n").as_bytes())?;
                s.shutdown(Shutdown::Write)?;
                let mut b = [0u8; 16];
                while s.read(&mut b)? > 0 {}
                Ok(())
            })
        })
        .collect();
    let udp: Vec<UdpEcho> = (7100..=7101)
        .map(|p| UdpEcho::start(&t.container_ns(), on(p)))
        .collect();
    let _u = start(
        &t,
        &[
            "-p",
            "9000-9002:7000-7002",
            "-p",
            "127.0.0.1:9100-9101:7100-7101/udp",
        ],
    );
    t.in_world(|| {
        for i in 0..3u16 {
            let mut s =
                connect(host(9000 + i)).unwrap_or_else(|e| panic!("connect {}: {e}", 9000 + i));
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read");
            assert_eq!(
                text,
                format!("port {}\n", 7000 + i),
                "host port {}",
                9000 + i
            );
        }
        assert_refused(host(9003));
        assert_refused(host(8999));
    });
    // One port at a time: its datagrams (one, or more if udp_roundtrip had to send again)
    // reach its server and no other, which has had none sent to it yet.
    let accepted = |i: usize| udp[i].stats.accepted.load(Ordering::SeqCst);
    let mut attempts = Vec::new();
    t.in_host(|| {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        for i in 0..2usize {
            let port = 9100 + i as u16;
            let a = udp_roundtrip(&s, lo(port), format!("to {port}").as_bytes(), 3)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                accepted(i) >= 1,
                "the echo to {port} came from another server"
            );
            for j in i + 1..udp.len() {
                let other = 7100 + j;
                assert_eq!(
                    accepted(j),
                    0,
                    "host port {port} reached the server on {other}"
                );
            }
            attempts.push(a as usize);
        }
    });
    for (i, a) in attempts.into_iter().enumerate() {
        assert!(
            (1..=a).contains(&accepted(i)),
            "UDP server on {} got {} datagrams, {a} were sent to {}",
            7100 + i,
            accepted(i),
            9100 + i
        );
    }
    for (i, s) in tcp.iter().enumerate() {
        assert_eq!(
            s.stats.accepted.load(Ordering::SeqCst),
            1,
            "TCP server on {}",
            7000 + i
        );
    }
}

#[test]
fn publish_in_run_mode() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("socat") {
        return;
    }
    let sock = t.tmp.join("run-api.sock");
    let script = "timeout 90 socat TCP-LISTEN:7000,reuseaddr \
                  'SYSTEM:echo hello-from-run $SOCAT_PEERADDR $SOCAT_PEERPORT'";
    let mut u = UsernetCmd::new(&t)
        .target([
            "run",
            "-p",
            "8080:7000",
            "--api-socket",
            sock.to_str().expect("utf-8"),
            "--",
            "sh",
            "-c",
            script,
        ])
        .spawn();
    // The socket appears, and lists the flag's rule.
    let ok = wait_for(IO_TIMEOUT, || sock.exists().then_some(()));
    assert!(ok.is_some(), "run mode: API socket never appeared");
    let list = api_raw(&sock, r#"{"execute":"list_hostfwd"}"#);
    assert!(
        list.contains("8080") && list.contains("7000"),
        "run mode list: {list}"
    );
    // Retry until socat listens inside (a connection before that is reset or closed).
    let got = t.in_world(|| {
        wait_for(IO_TIMEOUT, || {
            let mut s = connect(host(8080)).ok()?;
            let local = s.local_addr().ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            text.contains("hello-from-run").then_some((local, text))
        })
    });
    let (local, text) = got.unwrap_or_else(|| {
        panic!(
            "no answer from the run-mode command through -p; usernet: {}",
            u.stderr()
        )
    });
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        fields,
        [
            "hello-from-run".to_string(),
            local.ip().to_string(),
            local.port().to_string()
        ],
        "the command saw its client as {text:?}, the client is {local}"
    );
    let st = u.wait_exit(IO_TIMEOUT);
    assert!(
        st.map(|s| s.success()) == Some(true),
        "run mode exit: {st:?}\n{}",
        u.stderr()
    );
    assert!(!sock.exists(), "run mode left the API socket behind");
}

// ---------------------------------------------------------------------------------------------
// Teardown
// ---------------------------------------------------------------------------------------------

/// usernet with one echo rule on 8090 for warm-up, `extra` rules, and its settled fd count.
fn start_for_teardown(t: &Topology, echo: &TcpServer, extra: &[String]) -> (Usernet, usize) {
    let mut args = vec!["-p".to_string(), format!("8090:{}", echo.addr.port())];
    for e in extra {
        args.push("-p".into());
        args.push(e.clone());
    }
    let u = start(t, &args.iter().map(String::as_str).collect::<Vec<_>>());
    t.in_world(|| echo_once(host(8090), b"warm-up"));
    let base = settled_fds(&u);
    (u, base)
}

#[test]
fn teardown_host_client_half_closes_both_orders() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let hc = TcpServer::half_close(&t.container_ns(), any0());
    let (u, base) = start_for_teardown(&t, &echo, &[format!("8081:{}", hc.addr.port())]);
    t.in_world(|| {
        // Client half-closes first: the echo arrives in full after the client's FIN.
        echo_once(host(8090), &pattern(7, 300_000));
        // Server half-closes first: the client still sends 1 MiB after the server's FIN.
        let sent = half_close_server_first(host(8081), 0x4C, 1 << 20);
        let d = hc.stats.wait_digests(1, TEARDOWN);
        assert_eq!(d.len(), 1, "half-close server recorded nothing");
        assert_eq!(
            hex(&d[0].1),
            hex(&sent),
            "bytes after the server's FIN differ"
        );
        assert_eq!(d[0].2, 1 << 20);
    });
    assert_server_done(&echo.stats, "echo");
    assert_server_done(&hc.stats, "half-close server");
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn teardown_host_client_reset_reaches_the_container() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let sink = TcpServer::sink(&t.container_ns(), any0());
    let (u, base) = start_for_teardown(&t, &echo, &[format!("8081:{}", sink.addr.port())]);
    t.in_world(|| {
        let mut s = connect(host(8081)).expect("connect");
        s.write_all(&pattern(1, 100_000)).expect("write");
        let ok = wait_for(TEARDOWN, || {
            (sink.stats.accepted.load(Ordering::SeqCst) == 1).then_some(())
        });
        assert!(ok.is_some(), "the container never got the connection");
        set_linger0(&s);
        drop(s); // RST
    });
    assert_server_done(&sink.stats, "after the host client's RST");
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn teardown_host_client_closes_mid_download() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let source = TcpServer::source(&t.container_ns(), any0());
    let (u, base) = start_for_teardown(&t, &echo, &[format!("8081:{}", source.addr.port())]);
    t.in_world(|| {
        let mut s = connect(host(8081)).expect("connect");
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&9u64.to_le_bytes());
        req[8..].copy_from_slice(&(1u64 << 32).to_le_bytes()); // 4 GiB: never finishes
        s.write_all(&req).expect("request");
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).expect("first MiB");
        drop(s); // close with unread data
    });
    // The source in C must learn at once, not block on a full window until its timeout.
    assert_server_done(&source.stats, "source after the client went away");
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn teardown_container_refuses() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    // Nothing listens on 7999 in C.
    let (u, base) = start_for_teardown(&t, &echo, &["8081:7999".to_string()]);
    t.in_world(|| {
        for _ in 0..5 {
            match connect(host(8081)) {
                // Refused, or reset right after the host handshake: both are fine.
                Err(e) => assert!(
                    matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED) | Some(libc::ECONNRESET)
                    ),
                    "connect to a refused published port: {e}"
                ),
                Ok(mut s) => {
                    let _ = s.write_all(b"anyone there?");
                    let n = assert_ends(&mut s, "refused by the container");
                    assert_eq!(n, 0, "data from a refused connection");
                }
            }
        }
    });
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn teardown_container_server_resets() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    // Accepts, sends 64 KiB, then resets.
    let rst = TcpServer::start(&t.container_ns(), any0(), |s, _, _| {
        s.write_all(&pattern(3, 65536))?;
        thread::sleep(Duration::from_millis(100));
        set_linger0(s);
        Ok(())
    });
    // Accepts and resets at once.
    let rst0 = TcpServer::start(&t.container_ns(), any0(), |s, _, _| {
        set_linger0(s);
        Ok(())
    });
    let (u, base) = start_for_teardown(
        &t,
        &echo,
        &[
            format!("8081:{}", rst.addr.port()),
            format!("8082:{}", rst0.addr.port()),
        ],
    );
    t.in_world(|| {
        if let Some(mut s) = connect_unless_reset(host(8081)) {
            let n = assert_ends(&mut s, "container resets after 64 KiB");
            assert!(n <= 65536, "read {n} bytes");
        }
        if let Some(mut s) = connect_unless_reset(host(8082)) {
            let _ = s.write_all(b"hello?");
            let n = assert_ends(&mut s, "container resets at once");
            assert_eq!(n, 0);
        }
    });
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn teardown_container_server_exits_mid_transfer() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("socat") {
        return;
    }
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let (u, base) = start_for_teardown(&t, &echo, &["8081:7300".to_string()]);
    // A real server process in C streaming zeros forever.
    let server = ChildGuard::spawn(t.exec_in(
        &t.container,
        "socat",
        &["-u", "OPEN:/dev/zero", "TCP-LISTEN:7300,reuseaddr"],
    ));
    let pid = server.pid();
    t.in_world(|| {
        // Retry until socat listens.
        let mut s = wait_for(IO_TIMEOUT, || {
            let mut s = connect(host(8081)).ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).ok()?;
            Some(s)
        })
        .expect("socat in C never served through the published port");
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).expect("first MiB from socat");
        nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill socat");
        assert_ends(&mut s, "container server killed mid-transfer");
    });
    drop(server);
    assert_fds_back(&u, base, TEARDOWN);
}

#[test]
fn removing_a_rule_with_a_live_connection_is_clean() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let (u, sock) = start_with_api(&t, &[]);
    assert_eq!(api_add(&sock, "tcp", "", 8080, echo.addr.port()), 1);
    t.in_world(|| echo_once(host(8080), b"warm-up"));
    let base = settled_fds(&u);
    t.in_world(|| {
        let mut s = connect(host(8080)).expect("connect");
        s.write_all(b"before").expect("write");
        let mut b = [0u8; 6];
        s.read_exact(&mut b).expect("echo before removal");
        let r = api_raw(
            &sock,
            r#"{"execute":"remove_hostfwd","arguments":{"id":1}}"#,
        );
        assert_eq!(
            r.chars().filter(|c| !c.is_whitespace()).collect::<String>(),
            r#"{"return":{}}"#
        );
        // New connections are refused at once.
        assert_refused(host(8080));
        // The live one either keeps working or ends cleanly; it must not hang.
        let _ = s.write_all(b"after!");
        let _ = s.shutdown(Shutdown::Write);
        s.set_read_timeout(Some(TEARDOWN)).expect("timeout");
        let (n, how) = drain(&mut s);
        match how {
            Ok(()) => assert!(n == 0 || n == 6, "read {n} bytes after removal"),
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(libc::ECONNRESET),
                "after removal: {e}"
            ),
        }
    });
    assert_server_done(&echo.stats, "echo after rule removal");
    // The rule's listener is gone too: one fd fewer than with the rule.
    assert_fds_back(&u, base - 1, TEARDOWN);
}

#[test]
fn flag_with_a_port_in_use_fails_clearly_at_startup() {
    let Some(t) = Topology::new() else { return };
    let _taken = t.in_host(|| std::net::TcpListener::bind("0.0.0.0:8080").expect("bind 8080"));
    let (ready, mut u) = UsernetCmd::new(&t)
        .args(["-c", "-p", "8080:80"])
        .try_start();
    assert!(
        !ready,
        "usernet became ready although host port 8080 is taken"
    );
    let st = u.wait_exit(IO_TIMEOUT);
    assert!(
        matches!(st, Some(s) if !s.success()),
        "usernet must exit with an error status, got {st:?}"
    );
    // The message reaches us through a pipe read by another thread.
    let said = wait_for(IO_TIMEOUT, || {
        let err = u.stderr();
        (err.contains("8080") && err.contains("Address already in use")).then_some(())
    });
    assert!(
        said.is_some(),
        "stderr must name the port and keep the system's text:\n{}",
        u.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// A real benchmark client
// ---------------------------------------------------------------------------------------------

#[test]
fn iperf3_through_a_published_port() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("iperf3") {
        return;
    }
    let _server = ChildGuard::spawn(t.exec_in(&t.container, "iperf3", &["-s", "-p", "5201"]));
    let mut u = start(&t, &["-p", "15201:5201"]);
    // The server has started once its listener shows in the container.
    let listening = wait_for(IO_TIMEOUT, || {
        let ss = run_with_timeout(
            t.exec_in(&t.container, "ss", &["-ltnH", "sport = :5201"]),
            Duration::from_secs(10),
        );
        (ss.success() && !ss.stdout.trim().is_empty()).then_some(())
    });
    assert!(
        listening.is_some(),
        "iperf3 -s in the container never listened on 5201"
    );
    for reverse in [false, true] {
        let mut args = vec!["-c", "198.51.100.1", "-p", "15201", "-t", "2"];
        if reverse {
            args.push("-R");
        }
        // The server may still be finishing the previous test: it answers "busy" until then.
        let mut last = None;
        let done = wait_for(IO_TIMEOUT, || {
            let f = run_with_timeout(
                t.exec_in(&t.world, "iperf3", &args),
                Duration::from_secs(30),
            );
            if f.success() || !format!("{}{}", f.stdout, f.stderr).contains("busy") {
                return Some(f);
            }
            last = Some(f);
            thread::sleep(Duration::from_millis(300));
            None
        });
        let f = done.unwrap_or_else(|| {
            let last = last.as_ref().map(ToString::to_string).unwrap_or_default();
            panic!("iperf3 {args:?}: the server stayed busy for {IO_TIMEOUT:?}:\n{last}")
        });
        assert!(f.success(), "iperf3 {args:?} failed:\n{f}");
        eprintln!(
            "{}",
            f.stdout
                .lines()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    u.assert_running();
}
