//! UDP through usernet: round trips of several sizes to a world echo server and to an echo
//! server on the host's loopback via the gateway, many distinct flows at once, and bursts
//! that usernet sends on in segmented runs (UDP GSO) arriving datagram for datagram.

mod util;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::Pid;

use util::*;

const SIZES: [usize; 6] = [1, 64, 512, 1000, 1400, 1472];

#[test]
fn udp_world_echo_round_trips_of_several_sizes() {
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| {
        let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        for size in SIZES {
            udp_roundtrip(&sock, echo.addr, &pattern(size as u64, size), 3)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    // Outbound NAT: the world sees usernet's host address.
    assert_eq!(echo.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn udp_gateway_reaches_host_loopback_echo() {
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| {
        let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let dst = SocketAddrV4::new(GATEWAY, echo.addr.port());
        for size in SIZES {
            udp_roundtrip(&sock, dst, &pattern(size as u64 + 100, size), 3)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    assert_eq!(echo.stats.peer_ips(), vec![Ipv4Addr::LOCALHOST]);
}

#[test]
fn udp_many_distinct_flows() {
    const FLOWS: usize = 200;
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| {
        // All sockets (source ports) open at once: each is its own flow in usernet.
        let socks: Vec<_> = (0..FLOWS)
            .map(|_| udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
            .collect();
        for (i, s) in socks.iter().enumerate() {
            let payload = pattern(i as u64, 100 + i);
            udp_roundtrip(s, echo.addr, &payload, 3)
                .unwrap_or_else(|e| panic!("flow {i} of {FLOWS}: {e}"));
        }
        // And again on the same flows, now that they all exist.
        for (i, s) in socks.iter().enumerate() {
            let payload = pattern(i as u64 + 7, 50);
            udp_roundtrip(s, echo.addr, &payload, 3)
                .unwrap_or_else(|e| panic!("flow {i} of {FLOWS}, second datagram: {e}"));
        }
    });
    let mut ports: Vec<_> = echo
        .stats
        .peers
        .lock()
        .unwrap()
        .iter()
        .map(SocketAddr::port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert!(
        ports.len() >= FLOWS,
        "the world saw {} distinct source ports for {FLOWS} flows",
        ports.len()
    );
    assert_eq!(echo.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn udp_bursts_keep_datagram_boundaries_and_order() {
    let Some(t) = Topology::new() else { return };
    let api = t.tmp.join("api.sock");
    let u = UsernetCmd::new(&t)
        .args(["-c", "-a", api.to_str().expect("utf-8 path")])
        .start();
    // Host loopback through the gateway: the route segments.
    let rx = t.in_host(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"));
    let port = rx.local_addr().expect("addr").port();
    let tx = t.in_container(|| udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    let s0 = get_stats(&api);
    for round in 0..3 {
        let seed = 1000 * round;
        let got = udp_stopped_burst(&u, &tx, &rx, SocketAddrV4::new(GATEWAY, port).into(), seed);
        assert_udp_burst(&got, seed, &format!("gateway, burst {round}"));
    }
    let s1 = get_stats(&api);
    let runs = s1.delta(&s0, "counters.udp_gso_sends");
    let batched = s1.delta(&s0, "counters.udp_gso_datagrams");
    assert!(
        runs >= 3 && batched >= 3 * 100,
        "bursts sent by usernet in {runs} segmented runs of {batched} datagrams in all"
    );
    assert_eq!(s1.delta(&s0, "counters.udp_send_dropped"), 0);

    // The world through H's 1500-byte veth: runs of datagrams above the path MTU cannot
    // be segmented; they must still arrive, one by one, as IP fragments.
    let rx = t.in_world(|| UdpSocket::bind((WORLD, 0)).expect("bind"));
    let dst = SocketAddrV4::new(WORLD, rx.local_addr().expect("addr").port());
    for round in 0..2 {
        let seed = 50_000 + 1000 * round;
        let got = udp_stopped_burst(&u, &tx, &rx, dst.into(), seed);
        assert_udp_burst(&got, seed, &format!("world, burst {round}"));
    }
}

#[test]
fn udp_burst_towards_the_container_waits_in_usernets_socket() {
    const LEN: usize = 1400;
    let Some(t) = Topology::new() else { return };
    let u = UsernetCmd::new(&t).args(["-c"]).start();
    let server = t.in_host(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"));
    let port = server.local_addr().expect("addr").port();
    server.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let client = t.in_container(|| udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    setsockopt(&client, sockopt::RcvBuf, &(4 << 20)).expect("SO_RCVBUF");
    client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // The flow: the container speaks first, the host answers its source.
    client
        .send_to(b"hello", SocketAddrV4::new(GATEWAY, port))
        .expect("send");
    let mut buf = vec![0u8; 65536];
    let (_, peer) = server
        .recv_from(&mut buf)
        .expect("the container's datagram");
    // Bytes of buffer that usernet's socket of the flow (`peer`, in H) holds now.
    let queued = || -> Option<u64> {
        let out = in_netns(&t.host_ns(), || {
            Command::new("ss")
                .args(["-uanH", "src", &peer.to_string()])
                .output()
        })
        .expect("ss");
        // State, Recv-Q, Send-Q, local and peer address.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().nth(1)?.parse().ok()
    };

    // As many datagrams as half of what usernet's socket may queue (1400-byte datagrams
    // take about 2.3 KiB of buffer each; the kernel caps the buffer at rmem_max and
    // doubles it), at most 1500: far more than the default buffer's 90.
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .expect("rmem_max")
        .trim()
        .parse()
        .expect("rmem_max");
    let n = (2 * rmem_max.min(4 << 20) / 2 / 2400).clamp(50, 1500);
    // Sent while usernet is stopped: all of them wait in its host socket. In rounds of at
    // most 50, each once the datagrams before it are in that socket (every one takes the
    // buffer the first took): the kernel's backlog queue on the way (netdev_max_backlog,
    // 1000 packets) never holds many, however late its softirq runs on a busy machine.
    let pid = Pid::from_raw(i32::try_from(u.pid).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP usernet");
    let send = |i: usize| {
        server
            .send_to(&pattern(i as u64, LEN), peer)
            .unwrap_or_else(|e| panic!("send datagram {i}: {e}"));
    };
    send(0);
    let each = wait_for(IO_TIMEOUT, || queued().filter(|&q| q > 0));
    let each = each.expect("the first datagram never reached usernet's socket");
    let mut sent = 1;
    while sent < n {
        let round = (n - sent).min(50);
        (sent..sent + round).for_each(send);
        sent += round;
        let want = each * sent as u64;
        let held = wait_for(IO_TIMEOUT, || queued().filter(|&q| q >= want));
        assert!(
            held.is_some(),
            "usernet's socket holds {:?} bytes, not the {want} of {sent} datagrams",
            queued()
        );
    }
    eprintln!("{n} datagrams in usernet's socket, {each} bytes of buffer each");
    kill(pid, Signal::SIGCONT).expect("SIGCONT usernet");
    let mut got = 0;
    while got < n {
        match client.recv(&mut buf) {
            Ok(len) => {
                assert!(
                    buf[..len] == pattern(got as u64, LEN),
                    "datagram {got} of {n} differs (or one before it was lost)"
                );
                got += 1;
            }
            Err(e) => panic!("{got} of {n} datagrams arrived (rmem_max {rmem_max}): {e}"),
        }
    }
}

/// Host-side errors of a UDP flow reach the container as ICMP/ICMPv6 errors about its
/// datagram, as a router's would: a closed port on the host's loopback (the host socket's
/// `ECONNREFUSED`) is port unreachable, a destination the host has no route to
/// (`ENETUNREACH` at once) network unreachable, one it may not send to (`EACCES`)
/// administratively prohibited; both families. The sockets ask for every
/// ICMP error (`IP_RECVERR`), as glibc's resolver, ping and traceroute do.
#[test]
fn udp_host_errors_reach_the_container_as_icmp_errors() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    // A port nothing listens on in H: bound and closed again.
    let closed = in_netns(&t.host_ns(), || {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let _u = UsernetCmd::new(&t).args(["-c", "-6"]).start();
    // H's own subnet broadcast: the host socket may not send there (EACCES without
    // SO_BROADCAST), which the container hears as "administratively prohibited".
    let broadcast = Ipv4Addr::new(198, 51, 100, 255);
    let cases: [(SocketAddr, i32); 5] = [
        ((GATEWAY, closed).into(), libc::ECONNREFUSED),
        ((GATEWAY6, closed).into(), libc::ECONNREFUSED),
        ((UNREACHABLE, 9).into(), libc::ENETUNREACH),
        ((UNREACHABLE6, 9).into(), libc::ENETUNREACH),
        ((broadcast, 9).into(), libc::EHOSTUNREACH),
    ];
    // Each case is an ICMP error, which the socket reports when it comes: the error itself,
    // not its time, tells it from silence.
    for (dst, want) in cases {
        t.in_container(|| {
            let t0 = std::time::Instant::now();
            let got = udp_error_after_send(dst, b"is anyone there?", IO_TIMEOUT);
            assert_eq!(
                got,
                Some(want),
                "UDP to {dst}: want {}, got {:?} after {:.2?}",
                std::io::Error::from_raw_os_error(want),
                got.map(std::io::Error::from_raw_os_error),
                t0.elapsed()
            );
        });
    }
}

/// The measured case: the host's only nameserver has no route. `getent hosts` of the
/// guest's own address (a reverse lookup, as `python3 -m http.server` does before it
/// listens) fails at once, where glibc would otherwise wait 2 x 5 s. Here glibc waits 30 s
/// (its most) for an answer: failing within 20 s means usernet told it the nameserver is
/// unreachable, however slow the machine.
#[test]
fn udp_unreachable_resolver_makes_reverse_lookup_fail_fast() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("getent") {
        return;
    }
    t.set_host_resolv_conf(&format!("nameserver {}\n", Ipv4Addr::new(192, 0, 2, 53)));
    t.set_container_resolv_conf(&format!(
        "nameserver {DNS}\noptions timeout:30 attempts:1\n"
    ));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let f = t.run_in_container(
        "getent",
        &["hosts", &GUEST.to_string()],
        Duration::from_secs(20),
    );
    assert!(
        f.status.is_some(),
        "getent still waited after 20 s: usernet did not tell it\n{f}"
    );
    assert!(!f.success(), "nothing can answer, yet:\n{f}");
    eprintln!("getent failed after {:.2?}", f.elapsed);
}
