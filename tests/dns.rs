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
        let f = dig(
            &t,
            &[
                "@10.0.2.3",
                DNS_NAME,
                "A",
                "+short",
                "+time=2",
                "+tries=2",
                extra,
            ],
        );
        f.assert_success();
        assert_eq!(f.stdout.trim(), "203.0.113.1", "dig {extra}:\n{f}");
    }
    let f = dig(
        &t,
        &["@10.0.2.3", "nosuch.test", "A", "+time=2", "+tries=2"],
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

/// A UDP socket on H's `addr:53` that takes queries and never answers: a nameserver that
/// is down without saying so. Returns the socket, to count what reached it.
fn silent_nameserver(t: &Topology, addr: std::net::Ipv4Addr) -> std::net::UdpSocket {
    in_netns(&t.host_ns(), || std::net::UdpSocket::bind((addr, 53)))
        .unwrap_or_else(|e| panic!("bind the silent nameserver {addr}:53: {e}"))
}

/// Datagrams waiting on `sink`.
fn queued(sink: &std::net::UdpSocket) -> usize {
    sink.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1500];
    std::iter::from_fn(|| sink.recv(&mut buf).ok()).count()
}

/// [`dig`] A `example.test` at usernet's resolver, one try of 5 s, and `extra`.
fn dig_example(t: &Topology, extra: &[&str]) -> Finished {
    let mut args = vec!["@10.0.2.3", DNS_NAME, "A", "+time=5", "+tries=1"];
    args.extend_from_slice(extra);
    dig(t, &args)
}

/// The host's first nameserver takes queries and never answers: usernet asks the next
/// one after 1 s (as glibc would, had the container seen the list), so `dig` gets its
/// answer within its one try, and later flows start with the server that works.
#[test]
fn dns_fails_over_from_a_silent_first_nameserver() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("dig") || !require_tool("getent") {
        return;
    }
    let sink = silent_nameserver(&t, std::net::Ipv4Addr::new(127, 0, 0, 9));
    let dns = DnsServer::start(&t);
    t.set_host_resolv_conf("nameserver 127.0.0.9\nnameserver 127.0.0.1\n");
    t.set_container_resolv_conf(&format!("nameserver {DNS}\noptions timeout:15\n"));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // An answer within dig's single try proves usernet failed over: only the second
    // server answers.
    let f = dig_example(&t, &["+short", "+time=15"]);
    assert_eq!(f.assert_success().stdout.trim(), "203.0.113.1", "{f}");
    assert!(
        queued(&sink) >= 1,
        "the silent nameserver was not asked first"
    );
    assert!(dns.udp_queries.load(Ordering::SeqCst) >= 1);
    // The silent server went to the end of the list: the next lookups (new flows) start
    // with the one that works, which answers, so the silent one is not asked again.
    let f = t.run_in_container("getent", &["hosts", DNS_NAME], Duration::from_secs(20));
    assert!(f.assert_success().stdout.contains("203.0.113.1"), "{f}");
    let f = dig_example(&t, &["+short", "+time=15"]);
    assert_eq!(f.assert_success().stdout.trim(), "203.0.113.1", "{f}");
    assert_eq!(
        queued(&sink),
        0,
        "the silent nameserver was asked again after the failover"
    );
}

/// No nameserver answers: the container gets SERVFAIL after 4 s, before dig's and glibc's
/// own 5 s timeout, instead of silence (dig waited 20 s, getent 40 s). The clients here
/// wait longer than that, so that only an answer from usernet can end their wait.
#[test]
fn dns_servfail_when_no_nameserver_answers() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("dig") || !require_tool("getent") {
        return;
    }
    let _a = silent_nameserver(&t, std::net::Ipv4Addr::new(127, 0, 0, 9));
    let _b = silent_nameserver(&t, std::net::Ipv4Addr::new(127, 0, 0, 10));
    t.set_host_resolv_conf("nameserver 127.0.0.9\nnameserver 127.0.0.10\n");
    // glibc waits 30 s for an answer (its most) and asks once.
    t.set_container_resolv_conf(&format!(
        "nameserver {DNS}\noptions timeout:30 attempts:1\n"
    ));
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // One try of 8 s: a status line means an answer (a try that runs out prints none).
    let f = dig_example(&t, &["+time=8"]);
    assert!(f.stdout.contains("status: SERVFAIL"), "{f}");
    // Ended within 20 s, where a silent forwarder would have made it wait 30 s.
    let f = t.run_in_container("getent", &["hosts", DNS_NAME], Duration::from_secs(20));
    assert!(
        f.status.is_some(),
        "getent still waited after 20 s: usernet did not answer\n{f}"
    );
    assert!(!f.success(), "{f}");
    eprintln!("getent failed after {:.2?}", f.elapsed);
}

/// Asks the forwarder for `name` (A) with `id` from `sock` and waits up to `wait` for the
/// reply with that ID; replies to earlier queries, which may come late, are skipped.
fn ask(sock: &std::net::UdpSocket, id: u16, name: &str, wait: Duration) -> Option<DnsReply> {
    sock.send_to(&dns_query(id, name, QTYPE_A), forwarder())
        .expect("send");
    let end = std::time::Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        let n = sock.recv(&mut buf).ok()?;
        if let Some(r) = parse_dns(&buf[..n]).filter(|r| r.id == id) {
            return Some(r);
        }
    }
}

/// Asks with new IDs (from `*id + 1`) until the forwarder has asked `server` a query of
/// `name` (`None` for a name of each query's own, `q<ID>.test`); a query in flight when
/// the forwarder switched may get no answer, so each waits 1 s before the next is sent.
/// `None` if that did not happen within 20 s.
fn ask_until_asked(
    sock: &std::net::UdpSocket,
    id: &mut u16,
    name: Option<&str>,
    server: &DnsServer,
) -> Option<()> {
    wait_for(Duration::from_secs(20), || {
        *id += 1;
        let own = format!("q{id}.test");
        let name = name.unwrap_or(&own);
        ask(sock, *id, name, Duration::from_secs(1))?;
        (server.asked(name) > 0).then_some(())
    })
}

/// The host's resolv.conf changes while usernet runs, sandboxed and under seccomp (a VPN
/// comes up): the forwarder follows, also for a guest socket that keeps asking, and
/// without a restart.
#[test]
fn dns_follows_resolv_conf_changes_with_sandbox_and_seccomp() {
    let Some(t) = Topology::new() else { return };
    let first = DnsServer::start(&t);
    let second = DnsServer::start_at(
        &t.host_ns(),
        SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 2), 53),
    );
    t.set_host_resolv_conf("nameserver 127.0.0.1\n");
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--enable-sandbox", "--enable-seccomp"])
        .start();
    let sock = t.in_container(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let r = ask(&sock, 1, DNS_NAME, IO_TIMEOUT).expect("no answer before the change");
    assert_eq!(r.a, vec![WORLD]);
    assert_eq!(first.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(second.udp_queries.load(Ordering::SeqCst), 0);

    // Rewritten in place, as the bind-mounted file of `ip netns exec` must be.
    t.set_host_resolv_conf("# a VPN came up\nnameserver 127.0.0.2\n");
    let mut id = 1;
    let switched = ask_until_asked(&sock, &mut id, Some(DNS_NAME), &second);
    assert!(
        switched.is_some(),
        "the forwarder never asked the new nameserver"
    );
    // A name asked only now: a late answer of the old server to an earlier query
    // cannot be taken for it.
    let r = ask(&sock, 1000, "after.test", IO_TIMEOUT).expect("no answer after the change");
    assert_eq!(r.rcode, RCODE_NXDOMAIN, "{r:?}");
    assert_eq!(second.asked("after.test"), 1);
    assert_eq!(first.asked("after.test"), 0, "the old one is still asked");

    // And back, by replacing the file's content once more.
    t.set_host_resolv_conf("nameserver 127.0.0.1\n");
    let back = ask_until_asked(&sock, &mut id, None, &first);
    assert!(
        back.is_some(),
        "the forwarder never went back to the first nameserver"
    );
    u.assert_running();
}

/// systemd-resolved's and NetworkManager's way: `/etc/resolv.conf` is a symbolic link to a
/// file under `/run` that is replaced by rename. The sandbox keeps `/run` live, and the
/// watch on that directory notices the new file: the forwarder switches to it.
#[test]
fn dns_follows_a_resolv_conf_symlink_into_run_replaced_by_rename() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("unshare") {
        return;
    }
    let first = DnsServer::start(&t);
    let second = DnsServer::start_at(
        &t.host_ns(),
        SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 2), 53),
    );
    let dir = std::path::PathBuf::from(format!("/run/usernet-test-{}", t.host));
    std::fs::create_dir_all(&dir).expect("mkdir under /run");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let real = dir.join("resolv.conf");
    std::fs::write(&real, "nameserver 127.0.0.1\n").expect("write");
    // usernet's own mount namespace: /etc a tmpfs whose resolv.conf links into /run.
    let cache = t.tmp.join("ld.so.cache");
    let _ = std::fs::copy("/etc/ld.so.cache", &cache);
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /etc; \
         if [ -e {cache} ]; then cp {cache} /etc/ld.so.cache; fi; \
         ln -s {real} /etc/resolv.conf; exec \"$@\"",
        cache = cache.display(),
        real = real.display()
    );
    let mut u = UsernetCmd::new(&t)
        .wrap([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script.as_str(),
            "sh",
        ])
        .args(["-c", "--enable-sandbox", "--enable-seccomp"])
        .start();
    let sock = t.in_container(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let r = ask(&sock, 1, DNS_NAME, IO_TIMEOUT).expect("no answer before the change");
    assert_eq!(r.a, vec![WORLD]);
    assert_eq!(first.udp_queries.load(Ordering::SeqCst), 1);

    let new = dir.join(".resolv.conf.new");
    std::fs::write(&new, "nameserver 127.0.0.2\n").expect("write");
    std::fs::rename(&new, &real).expect("rename");
    let mut id = 1;
    let switched = ask_until_asked(&sock, &mut id, Some(DNS_NAME), &second);
    assert!(
        switched.is_some(),
        "the forwarder never asked the new nameserver"
    );
    u.assert_running();
}
