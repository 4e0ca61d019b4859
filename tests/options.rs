//! Data-plane options: `--disable-host-loopback`, `--outbound-addr` (address and interface
//! name), `--cidr`, `--mtu 65520`, `--macaddress`, `--disable-dns`.

mod util;

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
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
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(&dst.into(), CONNECT_TIMEOUT);
        assert!(
            r.is_err(),
            "connected to the host's loopback despite --disable-host-loopback"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "connect to {dst} took {:.2?} to fail ({:?}): must fail fast",
            t0.elapsed(),
            r.err()
        );
        echo_once(world.addr, b"the world is still reachable");
    });
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
        // ...but nothing answers DNS at 10.0.2.3.
        dns_udp_exchange(SocketAddrV4::new(DNS, 53), &dns_query(3, DNS_NAME, QTYPE_A))
    });
    assert!(
        r.is_none(),
        "10.0.2.3 answered despite --disable-dns: {:?}",
        r.as_deref().map(parse_dns)
    );
    assert_eq!(dns.udp_queries.load(Ordering::SeqCst), 0);
}
