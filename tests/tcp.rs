//! TCP through usernet (attach mode, `-c`, `--netns-type=path`): bulk transfers compared by
//! SHA-256 in both directions, to the world and to the host's loopback via the gateway,
//! refused and unreachable destinations, half-close in both directions, urgent data, and 1,000 concurrent
//! connections whose resources are all freed afterwards.

mod util;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use util::*;

fn any(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

#[test]
fn tcp_container_to_world_64mib_hash_matches() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| upload_to_sink(sink.addr, 0xC2E, BULK));
    // Outbound NAT: the world sees usernet's host address, never the guest's.
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn tcp_world_to_container_64mib_hash_matches() {
    let Some(t) = Topology::new() else { return };
    let source = TcpServer::source(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| download_from_source(source.addr, 0xE2C, BULK));
    assert_eq!(source.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn tcp_container_to_host_loopback_via_gateway_both_ways() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let source = TcpServer::source(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| {
        upload_to_sink(SocketAddrV4::new(GATEWAY, sink.addr.port()), 0x10, BULK);
        download_from_source(SocketAddrV4::new(GATEWAY, source.addr.port()), 0x11, BULK);
    });
    assert_eq!(sink.stats.peer_ips(), vec![Ipv4Addr::LOCALHOST]);
}

/// A host peer's urgent byte (`MSG_OOB`) reaches the guest inline, and so do the bytes after
/// it: Linux ends a read at the urgent mark, a short read that must not be taken for the
/// end of the stream when the peer's FIN is in, nor for a drained socket when it is not.
#[test]
fn tcp_urgent_byte_from_the_host_arrives_inline_with_the_rest() {
    let Some(t) = Topology::new() else { return };
    let listener = t
        .in_host(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind in H");
    let port = listener.local_addr().expect("local_addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let u = UsernetCmd::new(&t).args(["-c"]).start();
    for fin in [true, false] {
        let mut client = t
            .in_container(|| connect(SocketAddrV4::new(GATEWAY, port)))
            .expect("connect to the gateway");
        let (mut server, _) =
            wait_for(IO_TIMEOUT, || listener.accept().ok()).expect("no connection to accept");
        server.set_nonblocking(false).expect("blocking");
        server.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        assert_urgent_stream_relayed(&u, &t.host_ns(), &mut server, &mut client, fin);
    }
}

#[test]
fn tcp_refused_destination_gives_econnrefused() {
    let Some(t) = Topology::new() else { return };
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    t.in_container(|| {
        // Nothing listens on port 9 in W nor on H's loopback.
        assert_refused(SocketAddrV4::new(WORLD, 9));
        assert_refused(SocketAddrV4::new(GATEWAY, 9));
    });
}

#[test]
fn tcp_unreachable_destination_fails_fast() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // C routes everything via the gateway, so the failure must come from usernet, not from
    // C's own routing table.
    let route = ip(&["-n", &t.container, "route", "get", "192.0.2.55"]).stdout;
    assert!(
        route.contains("via 10.0.2.2"),
        "C's route to 192.0.2.55: {route}"
    );
    t.in_container(|| {
        echo_once(echo.addr, b"the world is reachable");
        // H has no route to 192.0.2.0/24: the guest must learn it at once, not time out.
        assert_unreachable(SocketAddrV4::new(UNREACHABLE, 80));
    });
}

#[test]
fn tcp_half_close_client_first() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // The client shuts down its write side; the server reads to EOF, then replies on the
    // half-open connection.
    t.in_container(|| upload_to_sink(sink.addr, 0xF1, 4 << 20));
}

#[test]
fn tcp_half_close_server_first() {
    let Some(t) = Topology::new() else { return };
    let half = TcpServer::half_close(&t.world_ns(), any(WORLD));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // The server shuts down its write side first; the client reads to EOF, then sends 4 MiB
    // on its still-open side.
    let sent = t.in_container(|| half_close_server_first(half.addr, 0xF2, 4 << 20));
    let got = half.stats.wait_digests(1, IO_TIMEOUT);
    assert_eq!(got.len(), 1, "the server never saw the client's EOF");
    assert_eq!(
        got[0].2,
        4 << 20,
        "bytes the server received after its own FIN"
    );
    assert_eq!(hex(&got[0].1), hex(&sent));
}

#[test]
fn tcp_1000_concurrent_connections_all_freed() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let u = UsernetCmd::new(&t).args(["-c"]).start();
    let baseline = u.fd_count();
    let before = u.fd_targets();
    let mut peak = 0;
    t.in_container(|| {
        concurrent_echo_with(echo.addr, 1000, 1024, || peak = u.fd_count());
    });
    // One host socket per flow: proves we watch the right process.
    assert!(
        peak >= 1000,
        "usernet held only {peak} fds with 1,000 flows open (baseline {baseline})"
    );
    let max_open = echo.stats.max_open.load(Ordering::SeqCst);
    assert!(
        max_open >= 1000,
        "the world server saw at most {max_open} connections at once"
    );
    assert!(
        echo.stats.errors.lock().unwrap().is_empty(),
        "{:?}",
        echo.stats.errors.lock().unwrap()
    );

    // Every flow must be freed: usernet's fd count returns to its baseline.
    let t0 = Instant::now();
    let mut last = 0;
    let back = wait_for(Duration::from_secs(20), || {
        last = u.fd_count();
        (last <= baseline).then_some(())
    });
    assert!(
        back.is_some(),
        "usernet holds {last} fds {:.1?} after all 1,000 connections closed (baseline {baseline})\n\
         before: {before:?}\nafter: {:?}",
        t0.elapsed(),
        u.fd_targets()
    );
    eprintln!(
        "fds: baseline {baseline}, peak {peak}, back to {last} after {:.2?}",
        t0.elapsed()
    );
    // The server's handler threads end after the last close; each may still be on its way.
    let open = || echo.stats.open.load(Ordering::SeqCst);
    assert!(
        wait_for(Duration::from_secs(20), || (open() == 0).then_some(())).is_some(),
        "{} world connections still open",
        open()
    );
}
