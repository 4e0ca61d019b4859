//! UDP through usernet: round trips of several sizes to a world echo server and to an echo
//! server on the host's loopback via the gateway, and many distinct flows at once.

mod util;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

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
