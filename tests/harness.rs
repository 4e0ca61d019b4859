//! Self-test of the integration-test harness, without usernet.
//!
//! C is wired to H by a plain kernel veth (C `tap0` 10.0.2.100/24, H 10.0.2.2/24, H forwards
//! to W): the same client and server code the usernet tests use must pass here, which proves
//! the topology, the setns threads, the servers, the DNS server, the hashing and the cleanup
//! independently of the binary under test.

mod util;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use util::*;

#[test]
fn harness_pattern_is_independent_of_chunking() {
    let whole = pattern(7, 100_003);
    let mut pieces = vec![0u8; 100_003];
    let mut off = 0;
    for (i, step) in [1usize, 3, 8, 13, 4096, 65536].iter().cycle().enumerate() {
        if off >= pieces.len() || i > 10_000 {
            break;
        }
        let n = (*step).min(pieces.len() - off);
        fill_pattern(7, off as u64, &mut pieces[off..off + n]);
        off += n;
    }
    assert_eq!(whole, pieces);
    assert_eq!(pattern_digest(7, 100_003), sha256(&whole));
    assert_ne!(pattern(7, 64), pattern(8, 64));
}

#[test]
fn harness_dns_codec_answers_and_nxdomain() {
    let q = dns_query(0x1234, "Example.TEST", QTYPE_A);
    let r = parse_dns(&dns_answer(&q).expect("answer")).expect("parse");
    assert_eq!((r.id, r.is_response, r.rcode), (0x1234, true, 0));
    assert_eq!(r.qname, DNS_NAME);
    assert_eq!(r.a, vec![WORLD]);

    let q = dns_query(7, "example.test", QTYPE_AAAA);
    let r = parse_dns(&dns_answer(&q).expect("answer")).expect("parse");
    assert_eq!((r.rcode, r.a.len()), (0, 0));

    let q = dns_query(9, "nosuch.test", QTYPE_A);
    let r = parse_dns(&dns_answer(&q).expect("answer")).expect("parse");
    assert_eq!((r.rcode, r.a.len()), (RCODE_NXDOMAIN, 0));
}

#[test]
fn harness_kernel_veth_stand_in_carries_every_test_flow() {
    let names;
    {
        let Some(t) = Topology::new() else { return };
        names = [t.host.clone(), t.world.clone(), t.container.clone()];
        t.wire_kernel_veth();

        let any = |ip| SocketAddrV4::new(ip, 0);
        let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
        let source = TcpServer::source(&t.world_ns(), any(WORLD));
        let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
        let half = TcpServer::half_close(&t.world_ns(), any(WORLD));
        let udp = UdpEcho::start(&t.world_ns(), any(WORLD));
        let http = TcpServer::http(&t.world_ns(), any(WORLD), "hello\n");
        let dns = DnsServer::start(&t);

        t.in_container(|| {
            upload_to_sink(sink.addr, 1, 8 << 20);
            download_from_source(source.addr, 2, 8 << 20);
            echo_once(echo.addr, &pattern(3, 100_000));
            let sent = half_close_server_first(half.addr, 4, 1 << 20);
            let rec = half.stats.wait_digests(1, IO_TIMEOUT);
            assert_eq!(rec.len(), 1);
            assert_eq!(hex(&rec[0].1), hex(&sent));
            let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            for size in [1, 100, 512, 1000, 1400] {
                udp_roundtrip(&sock, udp.addr, &pattern(size as u64, size), 3).unwrap();
            }
            assert_refused(SocketAddrV4::new(WORLD, 9));
            assert_unreachable(SocketAddrV4::new(UNREACHABLE, 80));
            concurrent_echo(echo.addr, 300, 1024);
        });
        assert!(echo.stats.max_open.load(Ordering::SeqCst) >= 300);
        // No NAT in the stand-in: the world sees the container's own address.
        assert_eq!(sink.stats.peer_ips(), vec![GUEST]);
        assert_eq!(udp.stats.peer_ips(), vec![GUEST]);

        t.in_host(|| {
            let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 53);
            let r = dns_udp_exchange(server, &dns_query(1, DNS_NAME, QTYPE_A)).expect("udp");
            assert_eq!(parse_dns(&r).unwrap().a, vec![WORLD]);
            let r = dns_tcp_exchange(server, &dns_query(2, DNS_NAME, QTYPE_A)).expect("tcp");
            assert_eq!(parse_dns(&r).unwrap().a, vec![WORLD]);
            let r = dns_udp_exchange(server, &dns_query(3, "nosuch.test", QTYPE_A)).unwrap();
            assert_eq!(parse_dns(&r).unwrap().rcode, RCODE_NXDOMAIN);
        });
        // Two exchanges over UDP (either may have been sent again: more than two queries
        // then), one over TCP.
        let udp_queries = dns.udp_queries.load(Ordering::SeqCst);
        assert!(
            udp_queries >= 2,
            "{udp_queries} UDP queries for two exchanges"
        );
        assert_eq!(dns.tcp_queries.load(Ordering::SeqCst), 1);

        // External tools in C, and resolv.conf as usernet will see it in H.
        t.run_in_container(
            "ping",
            &["-c", "1", "-W", "10", "10.0.2.2"],
            Duration::from_secs(20),
        )
        .assert_success();
        let url = format!("http://{}/", http.addr);
        let f = t.run_in_container(
            "curl",
            &["-sS", "--max-time", "10", &url],
            Duration::from_secs(15),
        );
        assert_eq!(f.assert_success().stdout, "hello\n");
        let f = run_with_timeout(
            t.exec_in(&t.host, "cat", &["/etc/resolv.conf"]),
            Duration::from_secs(5),
        );
        assert_eq!(f.assert_success().stdout, "nameserver 127.0.0.1\n");

        // A deadline is enforced and the whole process tree is killed.
        let f = run_with_timeout(
            t.exec_in(&t.host, "sh", &["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(300),
        );
        assert!(f.status.is_none());
    }
    // Cleanup: no namespace or /etc/netns entry is left behind.
    let list = ip(&["netns", "list"]).stdout;
    for n in &names {
        assert!(!list.contains(n.as_str()), "netns {n} left behind:\n{list}");
    }
    assert!(!Path::new(&format!("/etc/netns/{}", names[0])).exists());
}
