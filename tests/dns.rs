//! The DNS forwarder at 10.0.2.3: queries over UDP and TCP relayed to the nameserver of
//! usernet's /etc/resolv.conf (the test DNS server on H's 127.0.0.1:53), NXDOMAIN passed
//! through, and `dig` as a real client.

mod util;

use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::time::Duration;

use util::*;

fn forwarder() -> SocketAddrV4 {
    SocketAddrV4::new(DNS, 53)
}

#[test]
fn dns_udp_query_answered_by_host_resolver() {
    let Some(t) = Topology::new() else { return };
    let dns = DnsServer::start(&t);
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let reply =
        t.in_container(|| dns_udp_exchange(forwarder(), &dns_query(0x4242, DNS_NAME, QTYPE_A)));
    let reply = reply.expect("no DNS answer from 10.0.2.3 over UDP");
    let r = parse_dns(&reply).expect("malformed DNS answer");
    assert_eq!(r.id, 0x4242);
    assert!(r.is_response);
    assert_eq!(r.rcode, 0);
    assert_eq!(r.qname, DNS_NAME);
    assert_eq!(r.a, vec![WORLD]);
    assert!(
        dns.udp_queries.load(Ordering::SeqCst) >= 1,
        "the test DNS server saw no query"
    );
}

#[test]
fn dns_tcp_query_answered_by_host_resolver() {
    let Some(t) = Topology::new() else { return };
    let dns = DnsServer::start(&t);
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let reply =
        t.in_container(|| dns_tcp_exchange(forwarder(), &dns_query(0x5151, DNS_NAME, QTYPE_A)));
    let reply = reply.unwrap_or_else(|e| panic!("DNS over TCP to 10.0.2.3: {e}"));
    let r = parse_dns(&reply).expect("malformed DNS answer");
    assert_eq!((r.id, r.rcode), (0x5151, 0));
    assert_eq!(r.a, vec![WORLD]);
    let seen = dns.udp_queries.load(Ordering::SeqCst) + dns.tcp_queries.load(Ordering::SeqCst);
    assert!(seen >= 1, "the test DNS server saw no query");
}

#[test]
fn dns_nxdomain_passes_through() {
    let Some(t) = Topology::new() else { return };
    let dns = DnsServer::start(&t);
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let (udp, tcp) = t.in_container(|| {
        let q = dns_query(0x0bad, "nosuch.test", QTYPE_A);
        (
            dns_udp_exchange(forwarder(), &q),
            dns_tcp_exchange(forwarder(), &q),
        )
    });
    for (how, reply) in [
        ("UDP", udp.expect("no answer over UDP")),
        ("TCP", tcp.expect("TCP")),
    ] {
        let r = parse_dns(&reply).expect("malformed DNS answer");
        assert_eq!(r.id, 0x0bad, "{how}");
        assert_eq!(r.rcode, RCODE_NXDOMAIN, "{how}: expected NXDOMAIN");
        assert!(r.a.is_empty(), "{how}");
    }
    assert!(dns.names.lock().unwrap().iter().any(|n| n == "nosuch.test"));
}

#[test]
fn dns_dig_through_forwarder_udp_and_tcp() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("dig") {
        return;
    }
    let dns = DnsServer::start(&t);
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    for extra in ["+notcp", "+tcp"] {
        let f = t.run_in_container(
            "dig",
            &[
                "@10.0.2.3",
                DNS_NAME,
                "A",
                "+short",
                "+time=2",
                "+tries=2",
                extra,
            ],
            Duration::from_secs(15),
        );
        f.assert_success();
        assert_eq!(f.stdout.trim(), "203.0.113.1", "dig {extra}:\n{f}");
    }
    let f = t.run_in_container(
        "dig",
        &["@10.0.2.3", "nosuch.test", "A", "+time=2", "+tries=2"],
        Duration::from_secs(15),
    );
    assert!(
        f.assert_success().stdout.contains("status: NXDOMAIN"),
        "{f}"
    );
    let seen = dns.udp_queries.load(Ordering::SeqCst) + dns.tcp_queries.load(Ordering::SeqCst);
    assert!(
        seen >= 3,
        "the test DNS server saw {seen} queries, expected at least 3"
    );
}
