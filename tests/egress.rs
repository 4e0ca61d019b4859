//! The egress policy end to end: attach mode (`-c`) for `--deny-private` against each of
//! its ranges, the metadata address, the host's own address and the gateway's mapping;
//! address rules in first-match order for TCP, UDP and ICMP echo in both families; names
//! through the DNS forwarder (allowed name reachable, others NXDOMAIN and never asked
//! upstream, literal IPs, rebinding, TTL expiry, DNS to another resolver and over TCP);
//! rules changed through the API with and without resetting open flows; what `curl`,
//! `ping` and a plain `connect` print. Then one case each for `usernet run`, a network
//! (its policy and a member's own) and pasta mode with podman's command line; a policy
//! file at the rule limit in `usernet run`, and one rule more refused as a usage error.
//!
//! "Nothing leaves": every denied address has a counting listener (TCP accepts, UDP
//! datagrams), and in the first test W's `Ip: InReceives` (its own namespace's
//! `/proc/net/snmp`) does not move while only denied flows are tried; that test then
//! removes the rule and shows the same listeners counting, so that a zero means something.

mod util;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// Stand-ins in W for the LAN, CGNAT and the metadata service, routed from H via W.
const LAN: [Ipv4Addr; 5] = [
    Ipv4Addr::new(10, 99, 0, 1),
    Ipv4Addr::new(192, 168, 77, 1),
    Ipv4Addr::new(172, 16, 5, 1),
    Ipv4Addr::new(100, 64, 0, 1),
    Ipv4Addr::new(169, 254, 169, 254),
];

fn any(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

/// Puts `addrs` on W's loopback and routes them from H via W.
fn add_world_addrs(t: &Topology, addrs: &[Ipv4Addr]) {
    for a in addrs {
        let a = format!("{a}/32");
        ip(&["-n", &t.world, "addr", "add", &a, "dev", "lo"]);
        ip(&["-n", &t.host, "route", "add", &a, "via", "198.51.100.2"]);
    }
}

/// W's `Ip: InReceives`: every IPv4 packet that reached W.
fn world_ip_in(t: &Topology) -> u64 {
    let f = sh("ip", &["netns", "exec", &t.world, "cat", "/proc/net/snmp"]);
    let mut lines = f.stdout.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Whether W has a TCP connection on local port `port` that is not done yet: anything but
/// listening or TIME_WAIT (after which no more packets are owed to W). From W's own
/// `/proc/net/tcp`.
fn world_tcp_open(t: &Topology, port: u16) -> bool {
    let f = sh("ip", &["netns", "exec", &t.world, "cat", "/proc/net/tcp"]);
    let port = format!(":{port:04X}");
    f.stdout.lines().skip(1).any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        // st: 0A listening, 06 TIME_WAIT.
        w.len() > 3 && w[1].ends_with(&port) && !matches!(w[3], "0A" | "06")
    })
}

/// A TCP connect from C's current namespace that must fail at once with `errno`; the
/// error's text.
#[track_caller]
fn connect_fails(addr: SocketAddr, errno: i32) -> String {
    let t0 = Instant::now();
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => panic!("connect to {addr} succeeded; the policy should deny it"),
        Err(e) => {
            assert_eq!(
                e.raw_os_error(),
                Some(errno),
                "connect to {addr}: {e} after {:.2?}",
                t0.elapsed()
            );
            e.to_string()
        }
    }
}

/// An API request and its reply.
fn api(sock: &std::path::Path, req: &str) -> String {
    api_request(sock, req, IO_TIMEOUT).expect("API request")
}

#[test]
fn egress_deny_private_closes_lan_metadata_host_and_gateway_nothing_leaves() {
    let Some(t) = Topology::new() else { return };
    add_world_addrs(&t, &LAN);
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let tcp: Vec<TcpServer> = LAN
        .iter()
        .map(|&a| TcpServer::echo(&t.world_ns(), any(a)))
        .collect();
    let udp: Vec<UdpEcho> = LAN
        .iter()
        .map(|&a| UdpEcho::start(&t.world_ns(), any(a)))
        .collect();
    let host_own = TcpServer::echo(&t.host_ns(), any(HOST_ADDR));
    let loopback = TcpServer::echo(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let opened = TcpServer::echo(&t.host_ns(), any(Ipv4Addr::LOCALHOST));
    let world = TcpServer::echo(&t.world_ns(), any(WORLD));
    let sock = t.tmp.join("api.sock");
    let allow = format!("10.0.2.2,tcp:{}", opened.addr.port());
    let u = UsernetCmd::new(&t)
        .args([
            "-c",
            "--log-level",
            "info",
            "--deny-private",
            "--allow",
            &allow,
        ])
        .args(["-a", sock.to_str().unwrap()])
        .start();
    // The world is open, and so is the one port of the host's loopback an --allow names,
    // though it comes after --deny-private on the command line.
    t.in_container(|| {
        echo_once(world.addr, b"world");
        echo_once(SocketAddrV4::new(GATEWAY, opened.addr.port()), b"allowed");
    });
    // The world flow's last packet (H's ACK of W's FIN) may still be on its way when the
    // client is done: the count starts once W's end of it is closed.
    let settled = wait_for(Duration::from_secs(20), || {
        (!world_tcp_open(&t, world.addr.port())).then_some(())
    });
    assert!(settled.is_some(), "W's end of the world flow never closed");
    let before = world_ip_in(&t);
    let texts = t.in_container(|| {
        let mut texts = Vec::new();
        for (s, u) in tcp.iter().zip(&udp) {
            texts.push(connect_fails(s.addr.into(), libc::EHOSTUNREACH));
            let e = udp_error_after_send(u.addr.into(), b"x", IO_TIMEOUT);
            assert_eq!(e, Some(libc::EHOSTUNREACH), "UDP to {}", u.addr);
        }
        // The gateway's mapping to the host's loopback, and the host's own address.
        let gw = SocketAddrV4::new(GATEWAY, loopback.addr.port());
        connect_fails(gw.into(), libc::EHOSTUNREACH);
        connect_fails(host_own.addr.into(), libc::EHOSTUNREACH);
        texts
    });
    assert!(texts[0].contains("No route to host"), "{texts:?}");
    for lan in ["10.99.0.1", "169.254.169.254"] {
        let f = t.run_in_container(
            "ping",
            &["-n", "-c", "1", "-W", "10", lan],
            Duration::from_secs(30),
        );
        assert!(!f.success() && f.stdout.contains("Packet filtered"), "{f}");
        let f = t.run_in_container(
            "curl",
            &["-sS", "--max-time", "30", &format!("http://{lan}:80/")],
            Duration::from_secs(40),
        );
        assert_eq!(f.code(), Some(7), "{f}");
        assert!(f.stderr.contains("Failed to connect"), "{f}");
    }
    // Nothing of the denied flows reached W, nor the host's listeners.
    assert_eq!(world_ip_in(&t), before, "packets reached W");
    for s in tcp.iter().chain([&host_own, &loopback]) {
        assert_eq!(s.stats.accepted.load(Ordering::SeqCst), 0, "{}", s.addr);
    }
    for s in &udp {
        assert_eq!(s.stats.accepted.load(Ordering::SeqCst), 0, "{}", s.addr);
    }
    // Denied flows are logged, and counted on the rule.
    let log = wait_for(Duration::from_secs(20), || {
        let e = u.stderr();
        e.contains("egress: denied tcp to 10.99.0.1 port")
            .then_some(e)
    });
    assert!(log.is_some(), "no log line:\n{}", u.stderr());
    let list = api(&sock, r#"{"execute":"list_egress"}"#);
    let v = parse_json_value(&list).unwrap();
    let rules = v.get("return").unwrap().get("rules").unwrap();
    let JsonValue::Arr(rules) = rules else {
        panic!("{list}")
    };
    let private = rules
        .iter()
        .find(|r| r.get("rule").and_then(JsonValue::as_str) == Some("deny-private"))
        .unwrap_or_else(|| panic!("{list}"));
    // 5 TCP, 5 UDP, 2 more TCP, 2 pings, 2 curls (a SYN the guest sent again would be
    // checked again): every denial, and only those, counted on the rule.
    let hits = private.get("hits").and_then(JsonValue::as_u64).unwrap();
    assert!(hits >= 16, "{list}");
    assert_eq!(get_stats(&sock).get("counters.egress_denied"), hits);
    // The same listeners count once the rule is gone: the zeros above mean something.
    let id = private.get("id").and_then(JsonValue::as_u64).unwrap();
    let r = api(
        &sock,
        &format!(r#"{{"execute":"remove_egress_rule","arguments":{{"id":{id}}}}}"#),
    );
    assert!(r.contains("return"), "{r}");
    t.in_container(|| {
        echo_once(tcp[4].addr, b"metadata");
        udp_roundtrip(
            &udp_socket(any(Ipv4Addr::UNSPECIFIED)),
            udp[0].addr,
            b"lan",
            3,
        )
        .unwrap();
    });
    assert_eq!(tcp[4].stats.accepted.load(Ordering::SeqCst), 1);
    assert!(world_ip_in(&t) > before);
}

#[test]
fn egress_address_rules_first_match_protocols_and_ports() {
    let Some(t) = Topology::new() else { return };
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let a = Ipv4Addr::new(203, 0, 113, 7);
    let b = Ipv4Addr::new(203, 0, 113, 8);
    let http_a = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(a, 8080));
    let other_a = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(a, 8081));
    let http_b = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(b, 8080));
    let udp_a = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(a, 8080));
    let udp_b = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(b, 5005));
    let beyond = TcpServer::echo(&t.world_ns(), any(Ipv4Addr::new(203, 0, 113, 200)));
    let _u = UsernetCmd::new(&t)
        .args([
            "-c",
            "--allow",
            "203.0.113.7,tcp:8080",
            "--allow",
            "203.0.113.8,udp",
        ])
        .args(["--deny", "203.0.113.0/28", "--deny", "any,icmp"])
        .args(["--allow", "203.0.113.0/24"])
        .start();
    t.in_container(|| {
        echo_once(http_a.addr, b"first rule");
        connect_fails(other_a.addr.into(), libc::EHOSTUNREACH);
        connect_fails(http_b.addr.into(), libc::EHOSTUNREACH);
        let e = udp_error_after_send(udp_a.addr.into(), b"x", IO_TIMEOUT);
        assert_eq!(e, Some(libc::EHOSTUNREACH));
        udp_roundtrip(
            &udp_socket(any(Ipv4Addr::UNSPECIFIED)),
            udp_b.addr,
            b"udp",
            3,
        )
        .unwrap();
        // Outside 203.0.113.0/28: the last --allow, which the default would have done too.
        echo_once(beyond.addr, b"later rule");
    });
    let f = t.run_in_container(
        "ping",
        &["-n", "-c", "1", "-W", "10", "203.0.113.1"],
        Duration::from_secs(30),
    );
    assert!(!f.success() && f.stdout.contains("Packet filtered"), "{f}");
    assert_eq!(other_a.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(http_b.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(udp_a.stats.accepted.load(Ordering::SeqCst), 0);
    assert!(udp_b.stats.accepted.load(Ordering::SeqCst) >= 1);
}

#[test]
fn egress_ipv6_rules_and_deny_private() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let any6 = |ip| SocketAddrV6::new(ip, 0, 0, 0);
    let tcp = TcpServer6::echo(&t.world_ns(), any6(WORLD6));
    let udp = UdpEcho6::start(&t.world_ns(), any6(WORLD6));
    let udp_denied = UdpEcho6::start(&t.world_ns(), any6(WORLD6));
    let deny_udp = format!("2001:db8:2::1,udp:{}", udp_denied.addr.port());
    let loopback = TcpServer6::echo(&t.host_ns(), any6(Ipv6Addr::LOCALHOST));
    let world4 = TcpServer::echo(&t.world_ns(), any(WORLD));
    // A ULA neighbour of the host's, in W.
    ip(&[
        "-n",
        &t.world,
        "-6",
        "addr",
        "add",
        "fd99::1/128",
        "dev",
        "lo",
        "nodad",
    ]);
    ip(&[
        "-n",
        &t.host,
        "-6",
        "route",
        "add",
        "fd99::1/128",
        "via",
        "2001:db8:1::2",
    ]);
    let ula = TcpServer6::echo(&t.world_ns(), any6("fd99::1".parse().unwrap()));
    let _u = UsernetCmd::new(&t)
        .args([
            "-c",
            "-6",
            "--deny-private",
            "--deny",
            "2001:db8:2::/64,tcp",
        ])
        .args(["--deny", "2001:db8:2::1,icmp", "--deny", &deny_udp])
        .start();
    let texts = t.in_container(|| {
        let text = connect_fails(tcp.addr.into(), libc::EACCES);
        // UDP to the same address is not denied.
        udp_roundtrip6(
            &udp_socket6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)),
            udp.addr,
            b"v6",
            3,
        )
        .unwrap();
        // Another port of the same address is, by its own rule.
        let e = udp_error_after_send(udp_denied.addr.into(), b"x", IO_TIMEOUT);
        assert_eq!(e, Some(libc::EACCES));
        // The gateway fd00::2 is the host's ::1, and fd99::1 is ULA: deny-private.
        let gw = SocketAddrV6::new(GATEWAY6, loopback.addr.port(), 0, 0);
        connect_fails(gw.into(), libc::EACCES);
        let e = udp_error_after_send(gw.into(), b"x", IO_TIMEOUT);
        assert_eq!(e, Some(libc::EACCES));
        connect_fails(ula.addr.into(), libc::EACCES);
        echo_once(world4.addr, b"IPv4 untouched");
        text
    });
    // ICMPv6 "administratively prohibited" is EACCES to Linux.
    assert!(texts.contains("Permission denied"), "{texts}");
    for s in [&tcp, &loopback, &ula] {
        assert_eq!(s.stats.accepted.load(Ordering::SeqCst), 0, "{}", s.addr);
    }
    assert!(udp.stats.accepted.load(Ordering::SeqCst) >= 1);
    assert_eq!(udp_denied.stats.accepted.load(Ordering::SeqCst), 0);
    let f = t.run_in_container(
        "ping",
        &["-6", "-n", "-c", "1", "-W", "10", "2001:db8:2::1"],
        Duration::from_secs(30),
    );
    assert!(
        !f.success() && f.stdout.to_lowercase().contains("prohibited"),
        "{f}"
    );
    // The gateway answers its own pings: never a flow, never egress.
    let f = t.run_in_container(
        "ping",
        &["-6", "-n", "-c", "1", "-W", "10", "fd00::2"],
        Duration::from_secs(30),
    );
    f.assert_success();
}

/// The names used by the name tests (W holds all of 203.0.113.0/24).
const NAMES: &[DnsRecord] = &[
    ("allowed.test", Ipv4Addr::new(203, 0, 113, 20), 300),
    ("www.allowed.test", Ipv4Addr::new(203, 0, 113, 21), 300),
    ("short.allowed.test", Ipv4Addr::new(203, 0, 113, 22), 1),
    ("rebind.allowed.test", Ipv4Addr::new(10, 99, 0, 1), 300),
    ("other.test", Ipv4Addr::new(203, 0, 113, 23), 300),
];

fn http_on(t: &Topology, ip: Ipv4Addr) -> TcpServer {
    TcpServer::http(
        &t.world_ns(),
        SocketAddrV4::new(ip, 80),
        "hello from the world\n",
    )
}

#[test]
fn egress_allow_domain_only_those_names_reachable() {
    let Some(t) = Topology::new() else { return };
    add_world_addrs(&t, &LAN[..1]);
    let dns = DnsServer::start_table(&t, NAMES);
    t.set_container_resolv_conf("nameserver 10.0.2.3\n");
    let servers: Vec<TcpServer> = NAMES.iter().map(|(_, a, _)| http_on(&t, *a)).collect();
    // A resolver of the container's own choosing, in W.
    let rogue = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(WORLD, 53));
    let policy = t.tmp.join("policy");
    std::fs::write(
        &policy,
        "# only these names\ndefault deny\ndeny-private\nallow-domain allowed.test\n\
         allow-domain *.allowed.test\nname-ttl 1 3600\n",
    )
    .unwrap();
    let sock = t.tmp.join("api.sock");
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--egress-policy", policy.to_str().unwrap()])
        .args(["-a", sock.to_str().unwrap()])
        .start();
    let curl = |url: &str| {
        t.run_in_container(
            "curl",
            &["-sS", "--max-time", "30", url],
            Duration::from_secs(40),
        )
    };
    for url in ["http://allowed.test/", "http://www.allowed.test/"] {
        let f = curl(url);
        f.assert_success();
        assert_eq!(f.stdout, "hello from the world\n", "{f}");
    }
    // Not allowed: NXDOMAIN from usernet, never asked upstream.
    let f = curl("http://other.test/");
    assert_eq!(f.code(), Some(6), "{f}");
    assert!(f.stderr.contains("Could not resolve host"), "{f}");
    assert_eq!(dns.asked("other.test"), 0);
    let f = dig(
        &t,
        &[
            "+short",
            "+tries=1",
            "+time=10",
            "@10.0.2.3",
            "other.test",
            "TXT",
        ],
    );
    assert_eq!(f.code(), Some(0), "{f}");
    assert_eq!(f.stdout, "", "{f}");
    // A literal IP of a name not allowed.
    let f = curl("http://203.0.113.23/");
    assert_eq!(f.code(), Some(7), "{f}");
    // Allowed name, private address (rebinding): deny-private decides.
    let f = curl("http://rebind.allowed.test/");
    assert_eq!(f.code(), Some(7), "{f}");
    assert!(dns.asked("rebind.allowed.test") >= 1);
    // DNS to another resolver, and over TCP to usernet's (not filtered: denied).
    let f = dig(&t, &["+tries=1", "+time=2", "@203.0.113.1", "allowed.test"]);
    assert_ne!(f.code(), Some(0), "{f}");
    assert_eq!(rogue.stats.accepted.load(Ordering::SeqCst), 0);
    let f = dig(
        &t,
        &["+tcp", "+tries=1", "+time=2", "@10.0.2.3", "allowed.test"],
    );
    assert_ne!(f.code(), Some(0), "{f}");
    // TTL expiry: short.allowed.test lives 1 s (name-ttl 1 ...).
    let f = dig(
        &t,
        &[
            "+short",
            "+tries=1",
            "+time=10",
            "@10.0.2.3",
            "short.allowed.test",
        ],
    );
    assert_eq!(f.stdout.trim(), "203.0.113.22", "{f}");
    thread::sleep(Duration::from_millis(2500));
    let f = curl("http://203.0.113.22/");
    assert_eq!(f.code(), Some(7), "{f}");
    // Only the allowed flows reached their servers.
    let accepted: Vec<usize> = servers
        .iter()
        .map(|s| s.stats.accepted.load(Ordering::SeqCst))
        .collect();
    assert_eq!(accepted, [1, 1, 0, 0, 0]);
    let stats = get_stats(&sock);
    assert!(stats.get("counters.egress_names_refused") >= 2);
    assert!(stats.get("counters.egress_denied") >= 4);
}

#[test]
fn egress_rules_change_through_the_api_and_reset_open_flows() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let sock = t.tmp.join("api.sock");
    let _u = UsernetCmd::new(&t)
        .args(["-c", "-a", sock.to_str().unwrap()])
        .start();
    let ok = |s: &mut TcpStream, what: &[u8]| {
        s.write_all(what).unwrap();
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, what);
    };
    t.in_container(|| {
        let mut open = connect(echo.addr).unwrap();
        open.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        ok(&mut open, b"before");
        let r = api(
            &sock,
            r#"{"execute":"add_egress_rule","arguments":{"rule":"deny 203.0.113.0/24 tcp"}}"#,
        );
        assert!(r.contains(r#""id":1"#) && r.contains(r#""reset":0"#), "{r}");
        // New flows follow at once; the open one goes on.
        connect_fails(echo.addr.into(), libc::EHOSTUNREACH);
        ok(&mut open, b"still open");
        let r = api(
            &sock,
            r#"{"execute":"add_egress_rule","arguments":{"rule":"allow 203.0.113.1 tcp","position":0}}"#,
        );
        assert!(r.contains(r#""id":2"#), "{r}");
        ok(&mut connect(echo.addr).unwrap(), b"x");
        let r = api(
            &sock,
            r#"{"execute":"remove_egress_rule","arguments":{"id":2,"reset":true}}"#,
        );
        assert!(r.contains(r#""reset":"#) && !r.contains(r#""reset":0"#), "{r}");
        // The open flow was reset (a RST reached the guest).
        let mut buf = [0u8; 16];
        let e = open.read(&mut buf);
        assert!(
            matches!(&e, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
        let r = api(
            &sock,
            r#"{"execute":"set_egress_default","arguments":{"default":"deny"}}"#,
        );
        assert!(r.contains("return"), "{r}");
        let r = api(&sock, r#"{"execute":"list_egress"}"#);
        assert!(
            r.contains(r#""default":"deny""#) && r.contains(r#""rule":"deny 203.0.113.0/24 tcp""#),
            "{r}"
        );
        for bad in [
            r#"{"execute":"add_egress_rule","arguments":{"rule":"deny 10.0.0.1/8"}}"#,
            r#"{"execute":"remove_egress_rule","arguments":{"id":99}}"#,
            r#"{"execute":"set_egress_default","arguments":{"default":"maybe"}}"#,
        ] {
            let r = api(&sock, bad);
            assert!(r.contains("error"), "{bad}: {r}");
        }
    });
    // `usernet stats` and `usernet egress` show the rules and their hits.
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(usernet_bin());
        c.arg(args[0])
            .args(["-a", sock.to_str().unwrap()])
            .args(&args[1..]);
        run_with_timeout(c, Duration::from_secs(20))
    };
    // Rule 1 denied one connect (once more for each SYN the guest sent again).
    let hits = get_stats(&sock).json.clone();
    let hits = hits
        .get("return")
        .and_then(|r| r.get("egress"))
        .and_then(|e| e.get("rules"))
        .and_then(|r| match r {
            JsonValue::Arr(a) => a
                .first()
                .and_then(|r| r.get("hits"))
                .and_then(JsonValue::as_u64),
            _ => None,
        })
        .unwrap();
    assert!(hits >= 1);
    let f = cli(&["stats"]);
    f.assert_success();
    assert!(
        f.stdout
            .contains(&format!("egress.rule.1 {hits} deny 203.0.113.0/24 tcp")),
        "{}",
        f.stdout
    );
    let f = cli(&["egress", "add", "allow", "203.0.113.1", "--position", "0"]);
    f.assert_success();
    assert_eq!(f.stdout, "3\n", "{f}");
    let f = cli(&["egress", "list"]);
    f.assert_success();
    assert_eq!(
        f.stdout,
        format!(
            "ID HITS RULE\n3 0 allow 203.0.113.1\n1 {hits} deny 203.0.113.0/24 tcp\n- 0 default deny\n"
        ),
        "{f}"
    );
    t.in_container(|| {
        let mut open = connect(echo.addr).unwrap();
        open.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        ok(&mut open, b"allowed again");
        let f = cli(&["egress", "remove", "3", "--reset"]);
        f.assert_success();
        assert_eq!(f.stdout, "reset 1 open flows\n", "{f}");
    });
    let f = cli(&["egress", "remove", "3"]);
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(f.stderr.contains("bad arguments.id"), "{f}");
}

#[test]
fn egress_network_policy_and_members_own_member_traffic_untouched() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    let policy = t.tmp.join("net.policy");
    std::fs::write(&policy, "deny 203.0.113.5\n").unwrap();
    n.cli(&[
        "network",
        "create",
        "egnet",
        "--subnet",
        "10.96.0.0/24",
        "--egress-policy",
        policy.to_str().unwrap(),
    ])
    .assert_success();
    let server = |last| {
        TcpServer::echo(
            &t.world_ns(),
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, last), 7000),
        )
    };
    let (s5, s6, s7) = (server(5), server(6), server(7));
    // a: only 203.0.113.7 (and the network's own members); b: the network's policy only.
    let (_ua, a) = n.member("egnet", "a", &["--default-deny", "--allow", "203.0.113.7"]);
    let (_ub, b) = n.member("egnet", "b", &[]);
    let (a_ns, b_ns) = (format!("/proc/{a}/ns/net"), format!("/proc/{b}/ns/net"));
    let b_echo = TcpServer::echo(&b_ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7001));
    in_netns(&a_ns, || {
        connect_fails(s5.addr.into(), libc::EHOSTUNREACH);
        connect_fails(s6.addr.into(), libc::EHOSTUNREACH);
        echo_once(s7.addr, b"a out");
        // Member to member: the switch, not egress.
        echo_once(
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 101), 7001),
            b"a to b",
        );
    });
    in_netns(&b_ns, || {
        connect_fails(s5.addr.into(), libc::EHOSTUNREACH);
        echo_once(s6.addr, b"b out");
        echo_once(s7.addr, b"b out");
    });
    assert_eq!(s5.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(s6.stats.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(s7.stats.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(b_echo.stats.accepted.load(Ordering::SeqCst), 1);
    let f = n.cli(&["network", "inspect", "egnet"]);
    f.assert_success();
    let v: serde_json::Value = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(
        v["egress_policy"],
        "default allow\nname-ttl 30 3600\ndeny 203.0.113.5\n"
    );
    // One denied connect per member (a SYN sent again would be checked again).
    assert!(v["egress"]["rules"][0]["hits"].as_u64() >= Some(2), "{v:#}");
    let members = v["members"].as_array().unwrap();
    let ma = members.iter().find(|m| m["name"] == "a").unwrap();
    assert_eq!(ma["egress"]["default"], "deny", "{v:#}");
    assert!(ma["egress"]["default_hits"].as_u64() >= Some(1), "{v:#}");
    let mb = members.iter().find(|m| m["name"] == "b").unwrap();
    assert!(mb["egress"].is_null(), "{v:#}");
    // A rule for b alone, by its name, through the network's API socket.
    let sock = n.run.join("usernet").join("egnet.sock");
    let r = api(
        &sock,
        r#"{"execute":"add_egress_rule","arguments":{"member":"b","rule":"deny 203.0.113.7 tcp"}}"#,
    );
    assert!(r.contains(r#""id":1"#), "{r}");
    in_netns(&b_ns, || connect_fails(s7.addr.into(), libc::EHOSTUNREACH));
    in_netns(&a_ns, || echo_once(s7.addr, b"a still out"));
    assert_eq!(s7.stats.accepted.load(Ordering::SeqCst), 3);
}

#[test]
fn egress_pasta_mode_options_from_podman_network_pasta_args() {
    let Some(t) = Topology::new() else { return };
    t.host_default_routes();
    add_world_addrs(&t, &LAN[..1]);
    let dns = DnsServer::start(&t);
    let lan = TcpServer::echo(&t.world_ns(), any(LAN[0]));
    let world = TcpServer::echo(&t.world_ns(), any(WORLD));
    let own = TcpServer::echo(&t.host_ns(), any(HOST_ADDR));
    // podman 5.3's line for `--network pasta:--egress-deny-private`.
    let netns = t.container_ns();
    let args = podman53(&netns, &["--egress-deny-private"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _p = Pasta::start(&t, &args);
    t.in_container(|| {
        echo_once(world.addr, b"world");
        connect_fails(lan.addr.into(), libc::EHOSTUNREACH);
        // host.containers.internal is the host's own address: denied too.
        let host = SocketAddrV4::new(Ipv4Addr::new(169, 254, 1, 2), own.addr.port());
        connect_fails(host.into(), libc::EHOSTUNREACH);
        // The DNS forwarder is usernet's own service.
        let q = dns_query(0x77, DNS_NAME, QTYPE_A);
        let r = dns_udp_exchange(SocketAddrV4::new(Ipv4Addr::new(169, 254, 1, 1), 53), &q);
        assert_eq!(parse_dns(&r.expect("DNS answer")).unwrap().a, vec![WORLD]);
    });
    assert_eq!(lan.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(own.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(world.stats.accepted.load(Ordering::SeqCst), 1);
    assert!(dns.udp_queries.load(Ordering::SeqCst) >= 1);
    let f = Pasta::run(&t, &["--egress-deny", "10.0.0.1/8", "--netns", &netns]);
    assert_eq!(f.first.code(), Some(1), "{}", f.first);
    assert!(f.first.stderr.contains("--egress-deny: "), "{}", f.first);
}

#[test]
fn egress_run_mode_only_allowed_names_reachable() {
    let Some(t) = Topology::new() else { return };
    let _dns = DnsServer::start(&t);
    let named = http_on(&t, WORLD);
    let other = http_on(&t, Ipv4Addr::new(203, 0, 113, 7));
    let script = "curl -sS --max-time 30 http://example.test/; echo \"rc=$?\"; \
                  curl -sS --max-time 30 http://203.0.113.7/; echo \"rc=$?\"; \
                  curl -sS --max-time 30 http://nosuch.test/; echo \"rc=$?\"";
    let f = UsernetCmd::new(&t)
        .target([
            "run",
            "--default-deny",
            "--allow-domain",
            "example.test",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output(Duration::from_secs(120));
    f.assert_success();
    assert_eq!(f.stdout, "hello from the world\nrc=0\nrc=7\nrc=6\n", "{f}");
    assert!(
        f.stderr.contains("Could not resolve host: nosuch.test"),
        "{f}"
    );
    assert_eq!(named.stats.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(other.stats.accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn egress_run_mode_rules_added_at_run_time_under_the_sandbox() {
    let Some(t) = Topology::new() else { return };
    let a = http_on(&t, Ipv4Addr::new(203, 0, 113, 7));
    let b = http_on(&t, Ipv4Addr::new(203, 0, 113, 8));
    let sock = t.tmp.join("run.sock");
    let bin = usernet_bin();
    // No policy at start; the command adds one rule through the API (sandbox and seccomp
    // on, as run mode's default), then tries both addresses.
    let script = format!(
        "{bin} egress -a {sock} add deny 203.0.113.7 >/dev/null || exit 9; \
         curl -sS --max-time 30 http://203.0.113.7/; echo \"rc=$?\"; \
         curl -sS --max-time 30 http://203.0.113.8/; echo \"rc=$?\"",
        bin = bin.display(),
        sock = sock.display()
    );
    let f = UsernetCmd::new(&t)
        .target([
            "run",
            "-a",
            sock.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output(Duration::from_secs(120));
    f.assert_success();
    assert_eq!(f.stdout, "rc=7\nhello from the world\nrc=0\n", "{f}");
    assert_eq!(a.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(b.stats.accepted.load(Ordering::SeqCst), 1);
}

/// A policy file of `forwarder::egress::MAX_RULES` rules, the last denying 203.0.113.7
/// (the others deny addresses of 198.18.0.0/15 no test uses).
fn full_policy(t: &Topology) -> std::path::PathBuf {
    let path = short_policy(t);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("deny 203.0.113.7\n");
    let path = t.tmp.join("full.policy");
    std::fs::write(&path, text).unwrap();
    path
}

/// A policy file of `forwarder::egress::MAX_RULES - 1` rules denying addresses of
/// 198.18.0.0/15 no test uses: room for one rule more.
fn short_policy(t: &Topology) -> std::path::PathBuf {
    let n = forwarder::egress::MAX_RULES;
    let text: String = (0..n - 1)
        .map(|i| format!("deny 198.18.{}.{}\n", i / 256 % 256, i % 256))
        .collect();
    let path = t.tmp.join("short.policy");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn egress_run_mode_policy_file_at_the_limit_works() {
    let Some(t) = Topology::new() else { return };
    let denied = http_on(&t, Ipv4Addr::new(203, 0, 113, 7));
    let open = http_on(&t, Ipv4Addr::new(203, 0, 113, 8));
    let policy = full_policy(&t);
    let f = UsernetCmd::new(&t)
        .target([
            "run",
            "--egress-policy",
            policy.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "curl -sS --max-time 30 http://203.0.113.7/; echo \"rc=$?\"; \
             curl -sS --max-time 30 http://203.0.113.8/; echo \"rc=$?\"",
        ])
        .output(Duration::from_secs(120));
    f.assert_success();
    assert_eq!(f.stdout, "rc=7\nhello from the world\nrc=0\n", "{f}");
    assert_eq!(denied.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(open.stats.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn egress_run_mode_policy_over_the_limit_with_an_option_is_a_usage_error() {
    let Some(t) = Topology::new() else { return };
    let policy = full_policy(&t);
    let marker = t.tmp.join("ran");
    // The file alone is at the limit; one --deny more is one rule too many, as in pasta
    // mode, whichever comes first.
    let policy = policy.to_str().unwrap();
    for opts in [
        ["--egress-policy", policy, "--deny", "203.0.113.8"],
        ["--deny", "203.0.113.8", "--egress-policy", policy],
    ] {
        let f = UsernetCmd::new(&t)
            .target(["run"].into_iter().chain(opts).chain([
                "--",
                "touch",
                marker.to_str().unwrap(),
            ]))
            .output(Duration::from_secs(60));
        assert_eq!(f.code(), Some(2), "{f}");
        let culprit = if opts[0] == "--deny" {
            "--egress-policy"
        } else {
            "--deny"
        };
        let want = format!(
            "error: {culprit}: more than {} rules",
            forwarder::egress::MAX_RULES
        );
        assert!(f.stderr.contains(&want), "{f}");
        assert!(!marker.exists(), "the command ran: {f}");
    }
}

#[test]
fn egress_policy_over_the_limit_shows_the_usage_of_the_command_given() {
    let Some(t) = Topology::new() else { return };
    let policy = full_policy(&t);
    let over = [
        "--egress-policy",
        policy.to_str().unwrap(),
        "--deny",
        "203.0.113.8",
    ];
    let ns = t.container_ns();
    let attach = ["--netns-type=path", ns.as_str(), "tap0"];
    let run = ["run", "--", "true"];
    let connect = ["network", "connect", "n", ns.as_str()];
    let want = format!(
        "error: --deny: more than {} rules\n\nUsage: ",
        forwarder::egress::MAX_RULES
    );
    for (line, usage) in [
        (
            over.iter().chain(&attach).collect::<Vec<_>>(),
            "Usage: usernet [OPTIONS] PID|PATH|FD [TAPNAME]\n",
        ),
        (
            run[..1].iter().chain(&over).chain(&run[1..]).collect(),
            "Usage: usernet run [OPTIONS] [COMMAND]...\n",
        ),
        (
            connect.iter().chain(&over).collect(),
            "Usage: usernet network connect [OPTIONS] <NAME> <TARGET>\n",
        ),
    ] {
        let f = UsernetCmd::new(&t)
            .target(line)
            .output(Duration::from_secs(60));
        assert_eq!(f.code(), Some(2), "{f}");
        assert!(f.stderr.starts_with(&want), "{f}");
        assert!(f.stderr.contains(usage), "not {usage:?}: {f}");
    }
}

#[test]
fn egress_deny_private_option_counts_toward_the_limit_as_a_rule() {
    let Some(t) = Topology::new() else { return };
    add_world_addrs(&t, &LAN[..1]);
    let lan = http_on(&t, LAN[0]);
    let world = http_on(&t, WORLD);
    let marker = t.tmp.join("ran");
    let (full, short) = (full_policy(&t), short_policy(&t));
    let (full, short) = (full.to_str().unwrap(), short.to_str().unwrap());
    // A full file and --deny-private: the usage error of a full file and one --deny.
    let over = |opts: &[&str]| {
        let f = UsernetCmd::new(&t)
            .target(["run", "--egress-policy", full].iter().chain(opts).chain(&[
                "--",
                "touch",
                marker.to_str().unwrap(),
            ]))
            .output(Duration::from_secs(60));
        assert_eq!(f.code(), Some(2), "{f}");
        assert!(!marker.exists(), "the command ran: {f}");
        f.stderr
    };
    let deny = over(&["--deny", "203.0.113.8"]);
    let private = over(&["--deny-private"]);
    assert!(deny.starts_with("error: --deny: more than "), "{deny}");
    assert_eq!(private, deny.replacen("--deny:", "--deny-private:", 1));
    // One rule short of the limit, --deny-private is the last rule, and in force.
    let f = UsernetCmd::new(&t)
        .target([
            "run",
            "--egress-policy",
            short,
            "--deny-private",
            "--",
            "sh",
            "-c",
            &format!(
                "curl -sS --max-time 30 http://{}/; echo \"rc=$?\"; \
                 curl -sS --max-time 30 http://{WORLD}/; echo \"rc=$?\"",
                LAN[0]
            ),
        ])
        .output(Duration::from_secs(120));
    f.assert_success();
    assert_eq!(f.stdout, "rc=7\nhello from the world\nrc=0\n", "{f}");
    assert_eq!(lan.stats.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(world.stats.accepted.load(Ordering::SeqCst), 1);
    // Pasta mode's --egress-deny-private too (its errors: one line, exit status 1).
    let netns = t.container_ns();
    for (opt, culprit) in [
        (&["--egress-deny", "203.0.113.8"][..], "--egress-deny"),
        (&["--egress-deny-private"], "--egress-deny-private"),
    ] {
        let args: Vec<&str> = ["--egress-policy", full]
            .iter()
            .chain(opt)
            .chain(&["--netns", netns.as_str()])
            .copied()
            .collect();
        let f = Pasta::run(&t, &args);
        assert_eq!(f.first.code(), Some(1), "{}", f.first);
        let want = format!(
            "{culprit}: more than {} rules",
            forwarder::egress::MAX_RULES
        );
        assert!(f.first.stderr.contains(&want), "{}", f.first);
    }
}
