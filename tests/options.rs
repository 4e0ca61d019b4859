//! Data-plane options: `--disable-host-loopback`, `--outbound-addr` (address and interface
//! name), `--cidr`, `--mtu 65520`, `--macaddress`, `--disable-dns`, `--busy-poll`, `--pcap`.

mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use util::*;

fn any(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

#[test]
fn disable_host_loopback_gateway_fails_fast_world_still_works() {
    let Some(t) = Topology::new() else { return };
    let local = TcpServer::echo(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let world = TcpServer::echo(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--disable-host-loopback"])
        .start();
    t.in_container(|| {
        let dst = SocketAddrV4::new(GATEWAY, local.addr.port());
        let r = TcpStream::connect_timeout(&dst.into(), CONNECT_TIMEOUT);
        let Err(e) = r else {
            panic!("connected to the host's loopback despite --disable-host-loopback")
        };
        // Fails fast: an answer carries an errno, connect_timeout's own time-out none.
        assert!(
            e.raw_os_error().is_some(),
            "connect to {dst}: {e}, expected an answer"
        );
        echo_once(world.addr, b"the world is still reachable");
    });
    assert_eq!(local.stats.accepted.load(Ordering::SeqCst), 0);
}

/// slirp4netns answers a connection to the gateway's host-loopback mapping with an ICMP
/// network unreachable when host loopback is disabled: the container's TCP and UDP fail
/// with "Network is unreachable" at once, in both families (slirp4netns 1.2.0 drops the
/// UDP silently; usernet tells). An echo request to the gateway is the gateway's own
/// business, never relayed to the host's loopback: it is answered, as slirp4netns does.
#[test]
fn disable_host_loopback_gateway_is_network_unreachable_for_tcp_and_udp() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    let local = TcpServer::echo(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let udp = UdpEcho::start(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "-6", "--disable-host-loopback"])
        .start();
    for gw in [IpAddr::V4(GATEWAY), IpAddr::V6(GATEWAY6)] {
        t.in_container(|| {
            assert_net_unreachable(SocketAddr::new(gw, local.addr.port()));
            let t0 = Instant::now();
            let err = udp_error_after_send(
                SocketAddr::new(gw, udp.addr.port()),
                b"to the host's loopback",
                IO_TIMEOUT,
            );
            assert_eq!(
                err,
                Some(libc::ENETUNREACH),
                "UDP to {gw}: want ENETUNREACH, got {:?} after {:.2?}",
                err.map(std::io::Error::from_raw_os_error),
                t0.elapsed()
            );
        });
        let p = t.run_in_container(
            "ping",
            &["-n", "-c", "1", "-W", "10", &gw.to_string()],
            Duration::from_secs(20),
        );
        assert!(p.success(), "the gateway {gw} must still answer ping:\n{p}");
    }
    assert_eq!(local.stats.accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn outbound_addr_address_is_the_source_the_world_sees() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let udp = UdpEcho::start(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--outbound-addr", "198.51.100.3"])
        .start();
    t.in_container(|| {
        upload_to_sink(sink.addr, 0x0A, 1 << 20);
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        udp_roundtrip(&s, udp.addr, b"udp via outbound addr", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(
        sink.stats.peer_ips(),
        vec![HOST_ADDR2],
        "TCP source seen by the world"
    );
    assert_eq!(
        udp.stats.peer_ips(),
        vec![HOST_ADDR2],
        "UDP source seen by the world"
    );
}

/// As slirp4netns, `--outbound-addr` binds every outbound socket, those to the gateway's
/// host-loopback mapping (10.0.2.2) included: a loopback listener sees the outbound address.
#[test]
fn outbound_addr_applies_to_the_gateways_loopback_mapping() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let udp = UdpEcho::start(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--outbound-addr", "198.51.100.3"])
        .start();
    t.in_container(|| {
        upload_to_sink(SocketAddrV4::new(GATEWAY, sink.addr.port()), 0x0C, 64 << 10);
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        let to = SocketAddrV4::new(GATEWAY, udp.addr.port());
        udp_roundtrip(&s, to, b"udp to the gateway", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(
        sink.stats.peer_ips(),
        vec![HOST_ADDR2],
        "TCP source at the loopback listener"
    );
    assert_eq!(
        udp.stats.peer_ips(),
        vec![HOST_ADDR2],
        "UDP source at the loopback listener"
    );
}

#[test]
fn outbound_addr_interface_name_uses_its_address() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let udp = UdpEcho::start(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--outbound-addr", HOST_OB_IFNAME])
        .start();
    t.in_container(|| {
        upload_to_sink(sink.addr, 0x0B, 1 << 20);
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        udp_roundtrip(&s, udp.addr, b"udp via outbound ifname", 3)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(
        sink.stats.peer_ips(),
        vec![HOST_OB_ADDR],
        "TCP source seen by the world"
    );
    assert_eq!(
        udp.stats.peer_ips(),
        vec![HOST_OB_ADDR],
        "UDP source seen by the world"
    );
}

#[test]
fn cidr_10_10_0_0_16_guest_gateway_and_dns() {
    let Some(t) = Topology::new() else { return };
    let local = TcpServer::echo(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let world = TcpServer::echo(&t.world_ns(), any(WORLD));
    let _dns = DnsServer::start(&t);
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--cidr", "10.10.0.0/16"])
        .start();
    let a = t.container_addrs("tap0");
    assert!(a.contains("10.10.0.100/16"), "tap0 in C: {a}");
    let routes = ip(&["-n", &t.container, "route", "show", "default"]).stdout;
    assert!(
        routes.contains("via 10.10.0.2"),
        "default route in C: {routes}"
    );
    t.in_container(|| {
        echo_once(
            SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 2), local.addr.port()),
            b"gw",
        );
        echo_once(world.addr, b"world");
        let dns = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 3), 53);
        let r = dns_udp_exchange(dns, &dns_query(1, DNS_NAME, QTYPE_A)).expect("no DNS answer");
        assert_eq!(parse_dns(&r).expect("parse").a, vec![WORLD]);
    });
}

#[test]
fn mtu_65520_sets_tap_mtu_and_carries_64mib() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let source = TcpServer::source(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c", "--mtu", "65520"]).start();
    let link = t.container_link("tap0");
    assert!(link.contains("mtu 65520"), "tap0 in C: {link}");
    t.in_container(|| {
        upload_to_sink(sink.addr, 0x6552, BULK);
        download_from_source(source.addr, 0x6553, 16 << 20);
    });
}

#[test]
fn macaddress_with_configure_sets_tap_mac() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--macaddress", "02:00:5e:12:34:56"])
        .start();
    let link = t.container_link("tap0");
    assert!(
        link.contains("link/ether 02:00:5e:12:34:56"),
        "tap0 in C: {link}"
    );
    t.in_container(|| echo_once(echo.addr, b"with a chosen MAC"));
}

#[test]
fn disable_dns_forwarder_does_not_answer() {
    let Some(t) = Topology::new() else { return };
    let dns = DnsServer::start(&t);
    let echo = UdpEcho::start(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c", "--disable-dns"]).start();
    let r = t.in_container(|| {
        // UDP forwarding itself works...
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        udp_roundtrip(&s, echo.addr, b"udp still works", 3).unwrap_or_else(|e| panic!("{e}"));
        // ...but nothing answers DNS at 10.0.2.3 (within 3 s: a negative check, which a busy
        // machine cannot make fail).
        let r = {
            let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&dns_query(3, DNS_NAME, QTYPE_A), SocketAddrV4::new(DNS, 53))
                .expect("send the query");
            let mut buf = [0u8; 1500];
            s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
        };
        // ...and 10.0.2.3 is nobody's: a TCP connect is neither refused nor unreachable but
        // times out, as with slirp4netns (its own test runs `ncat 10.0.2.3 53` and expects
        // "Connection timed out"). 5 s: longer than a failed ARP resolution (3 s), which
        // would say "No route to host".
        let to = SocketAddr::from((DNS, 53));
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            other => {
                panic!("TCP connect to {to} with --disable-dns: {other:?}, expected a time-out")
            }
        }
        r
    });
    assert!(
        r.is_none(),
        "10.0.2.3 answered despite --disable-dns: {:?}",
        r.as_deref().map(parse_dns)
    );
    assert_eq!(dns.udp_queries.load(Ordering::SeqCst), 0);
}

#[test]
fn busy_poll_bad_values_rejected() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    for bad in ["-1", "10001", "fast", ""] {
        let f = UsernetCmd::new(&t)
            .target([
                &format!("--busy-poll={bad}"),
                "--netns-type=path",
                &c,
                "tap0",
            ])
            .output(Duration::from_secs(10));
        assert!(f.status.is_some() && !f.success(), "accepted {bad:?}:\n{f}");
        assert!(f.stderr.contains("busy-poll"), "error names the flag:\n{f}");
    }
}

/// While the host answers within the window, usernet polls instead of sleeping; with
/// `--busy-poll=0` it never polls without blocking. Asserted on the loop's own counters
/// (`get_stats` section `loop`), which usernet controls, not on the sleeps and CPU time the
/// scheduler hands out: on a busy machine a peer may answer later than any window.
#[test]
fn busy_poll_serves_a_ping_pong_without_sleeping() {
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let dst = SocketAddrV4::new(GATEWAY, echo.addr.port());
    let rounds = 2000u64;
    let mut deltas = Vec::new();
    for window in ["10000", "0"] {
        let api = t.tmp.join(format!("api-{window}.sock"));
        let _u = UsernetCmd::new(&t)
            .args(["-c", &format!("--busy-poll={window}")])
            .args(["-a", api.to_str().expect("utf-8 path")])
            .start();
        let before = t.in_container(|| {
            let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
            udp_roundtrip(&s, dst, b"warm-up", 3).unwrap_or_else(|e| panic!("{e}"));
            let before = get_stats(&api);
            s.connect(dst).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut buf = [0u8; 16];
            for i in 0..rounds {
                s.send(&i.to_be_bytes()).unwrap();
                let n = s.recv(&mut buf).expect("echo");
                assert_eq!(&buf[..n], &i.to_be_bytes(), "echo of round {i}");
            }
            before
        });
        let after = get_stats(&api);
        deltas.push([
            after.delta(&before, "loop.spin_polls"),
            after.delta(&before, "loop.spun_wakeups"),
            after.delta(&before, "loop.sleeps"),
        ]);
    }
    let ([spins, spun, _], [spins0, spun0, sleeps0]) = (deltas[0], deltas[1]);
    eprintln!("--busy-poll=10000: {spins} spin polls, {spun} wake-ups saved in {rounds} rounds");
    assert_eq!(
        (spins0, spun0),
        (0, 0),
        "--busy-poll=0 polled without blocking"
    );
    assert!(
        sleeps0 >= rounds,
        "--busy-poll=0: {sleeps0} waits for {rounds} round trips"
    );
    assert!(
        spins > 0 && spun > 0,
        "--busy-poll=10000 never spun ({spins} polls, {spun} wake-ups saved) in {rounds} round trips"
    );
}

/// Sporadic traffic, datagrams 2 ms apart (longer than the 1 ms window), all arrive. How
/// little usernet spins on them is the unit tests' business (`src/busy_poll.rs`, on a
/// scripted timeline): here a busy machine decides the gaps usernet sees. Asserted: the
/// loop's counters are consistent with the time that passed.
#[test]
fn busy_poll_with_sporadic_traffic() {
    let Some(t) = Topology::new() else { return };
    let sink = t.in_host(|| {
        let s = std::net::UdpSocket::bind(any(Ipv4Addr::LOCALHOST)).expect("bind sink");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    });
    let dst = SocketAddrV4::new(GATEWAY, sink.local_addr().unwrap().port());
    let count = 500u32;
    let reader = std::thread::spawn(move || {
        let (mut got, mut buf) = (0u32, [0u8; 16]);
        while got < count {
            let Ok(n) = sink.recv(&mut buf) else { break };
            assert_eq!(n, 4);
            got += 1;
        }
        got
    });
    let api = t.tmp.join("api.sock");
    let _u = UsernetCmd::new(&t)
        .args([
            "-c",
            "--busy-poll=1000",
            "-a",
            api.to_str().expect("utf-8 path"),
        ])
        .start();
    let (before, after, wall) = t.in_container(|| {
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        let t0 = Instant::now();
        let before = get_stats(&api);
        for i in 0..count {
            s.send_to(&i.to_be_bytes(), dst).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        (before, get_stats(&api), t0.elapsed())
    });
    assert_eq!(reader.join().unwrap(), count, "datagrams delivered");
    assert_loop_counters_consistent(&before, &after, wall);
}

/// The `loop` counters between two `get_stats` replies taken `wall` apart: every wake-up
/// saved was a spin poll, and the spins, one after another between the two replies, took
/// no longer than `wall` in all.
#[track_caller]
fn assert_loop_counters_consistent(before: &UsernetStats, after: &UsernetStats, wall: Duration) {
    let spin_polls = after.delta(before, "loop.spin_polls");
    let spun = after.delta(before, "loop.spun_wakeups");
    let spin = Duration::from_micros(after.delta(before, "loop.spin_us"));
    eprintln!("{spin_polls} spin polls, {spun} wake-ups saved, {spin:?} spun in {wall:?}");
    assert!(
        spun <= spin_polls,
        "{spun} wake-ups saved by {spin_polls} spin polls"
    );
    assert!(spin <= wall, "usernet spun for {spin:?} in {wall:?}");
}

/// Bursts of 40 datagrams of 1400 bytes every millisecond (450 Mbit/s) towards the
/// container through a 10 ms window: they all arrive, less what a busy machine drops. That
/// a stream is not spun for is the unit tests' business (`src/busy_poll.rs`, `BulkMeter`
/// on a scripted timeline); here the counters are consistent with the time that passed.
#[test]
fn busy_poll_with_a_stream() {
    let Some(t) = Topology::new() else { return };
    let api = t.tmp.join("api.sock");
    let _u = UsernetCmd::new(&t)
        .args([
            "-c",
            "--busy-poll=10000",
            "-a",
            api.to_str().expect("utf-8 path"),
        ])
        .start();
    let source = t.in_host(|| std::net::UdpSocket::bind(any(Ipv4Addr::LOCALHOST)).expect("bind"));
    source.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let port = source.local_addr().unwrap().port();
    let sink = t.in_container(|| udp_socket(any(Ipv4Addr::UNSPECIFIED)));
    sink.send_to(b"start", SocketAddrV4::new(GATEWAY, port))
        .unwrap();
    let mut buf = [0u8; 2048];
    let (_, peer) = source
        .recv_from(&mut buf)
        .expect("the container's datagram");
    let (bursts, per_burst) = (1000u32, 40u32);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let sent = sent.clone();
        move || {
            sink.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let (mut got, mut last) = (0u32, Instant::now());
            while got < bursts * per_burst {
                if let Ok(n) = sink.recv(&mut buf) {
                    assert_eq!(n, 1400);
                    got += 1;
                    last = Instant::now();
                    continue;
                }
                // Some of the stream may be lost: a quiet second after its end ends it.
                let quiet = last.elapsed();
                if quiet > IO_TIMEOUT || (sent.load(Ordering::SeqCst) && quiet.as_secs() >= 1) {
                    break;
                }
            }
            got
        }
    });
    let data = [0x5au8; 1400];
    let t0 = Instant::now();
    let before = get_stats(&api);
    for _ in 0..bursts {
        for _ in 0..per_burst {
            source.send_to(&data, peer).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent.store(true, Ordering::SeqCst);
    let after = get_stats(&api);
    let wall = t0.elapsed();
    let got = reader.join().unwrap();
    eprintln!("{got} datagrams arrived");
    assert!(got >= per_burst, "only {got} datagrams delivered");
    assert_loop_counters_consistent(&before, &after, wall);
}

/// `tcpdump -r FILE -n` output, or a failure naming it.
pub fn tcpdump_read(path: &std::path::Path) -> String {
    let out = run_with_timeout(
        {
            let mut c = std::process::Command::new("tcpdump");
            c.args(["-n", "-r"]).arg(path);
            c
        },
        Duration::from_secs(20),
    );
    assert!(out.success(), "tcpdump cannot read the capture:\n{out}");
    out.stdout
}

#[test]
fn pcap_records_both_directions_readable_by_tcpdump() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("tcpdump") {
        return;
    }
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let path = t.tmp.join("cap.pcap");
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--pcap", path.to_str().expect("utf-8")])
        .start();
    t.in_container(|| upload_to_sink(sink.addr, 0x9c, 64 << 10));
    u.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(u.wait_exit(Duration::from_secs(20)).is_some());
    let text = tcpdump_read(&path);
    let to = "10.0.2.100.".to_owned();
    let world = format!("{WORLD}.{}", sink.addr.port());
    assert!(
        text.lines()
            .any(|l| l.contains(&to) && l.contains(&format!("> {world}"))),
        "no guest -> world segment in the capture:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("{world} >")) && l.contains(&to)),
        "no world -> guest segment in the capture:\n{text}"
    );
    assert!(text.contains("ARP"), "no ARP in the capture:\n{text}");
}
