//! pasta mode: usernet run as `pasta` with the verbatim command lines of podman 5.0,
//! 5.1-5.2, 5.3+ (per container and rootless-netns) and RootlessKit v2, in H, against C.
//! H has default routes via W (`vh`, 198.51.100.1/24 and 2001:db8:1::1/64), so
//! `--config-net` copies those into C. Checked: the first process exits 0 with the
//! namespace configured and its pipes closed (podman's `CombinedOutput()`), addresses and
//! routes, traffic to the world and on-link, published ports (`-t/-u`: single, range,
//! translated, address-bound, interface-bound `%IF`, exclusions alone; IPv4 and IPv6;
//! `all` refused with pasta's text), `--dns-forward`, `--map-guest-addr`,
//! `--no-map-gw`, a burst to a `-U` port and a reply burst to a `-u` port's loopback
//! client held while pasta is stopped, the PID file, the exit on namespace deletion and
//! SIGTERM, getopt's text for unknown options, `--version`.

mod util;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

const DNS_FWD: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const MAP_GUEST: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 2);

fn topology(ipv6: bool) -> Option<Topology> {
    let t = if ipv6 {
        Topology::new_ipv6()?
    } else {
        Topology::new()?
    };
    t.host_default_routes();
    Some(t)
}

#[test]
fn pasta_podman53_default_line_configures_copy_of_host_and_reaches_world() {
    let Some(t) = topology(true) else { return };
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let sink6 = TcpServer6::sink(&t.world_ns(), SocketAddrV6::new(WORLD6, 0, 0, 0));
    let args = podman53(&t.container_ns(), &[]);
    let p = Pasta::start(&t, &strs(&args));
    assert!(
        p.first.stdout.is_empty() && p.first.stderr.is_empty(),
        "pasta printed something:\n{}",
        p.first
    );
    // (A first process that hangs is caught by Pasta::start: no status within 20 s.)
    // The namespace was configured before the first process exited.
    let addrs = t.container_addrs("vh");
    assert!(addrs.contains("198.51.100.1/24"), "{addrs}");
    assert!(t.container_link("vh").contains("mtu 65520"));
    let addrs6 = t.container_addrs6("vh");
    assert!(addrs6.contains("2001:db8:1::1/64"), "{addrs6}");
    let routes = ip(&["-n", &t.container, "route", "show", "default"]).stdout;
    assert!(routes.contains("via 198.51.100.2 dev vh"), "{routes}");
    let routes6 = ip(&["-n", &t.container, "-6", "route", "show", "default"]).stdout;
    assert!(routes6.contains("via 2001:db8:1::2 dev vh"), "{routes6}");
    // The host's other routes on that interface are copied too.
    let all = ip(&["-n", &t.container, "route", "show"]).stdout;
    assert!(
        all.contains("203.0.113.0/24 via 198.51.100.2 dev vh"),
        "{all}"
    );
    let all6 = ip(&["-n", &t.container, "-6", "route", "show"]).stdout;
    assert!(
        all6.contains("2001:db8:2::/64 via 2001:db8:1::2 dev vh"),
        "{all6}"
    );
    t.in_container(|| {
        upload_to_sink(sink.addr, 0x5a, 4 << 20);
        upload_to_sink6(sink6.addr, 0x5b, 4 << 20);
    });
    // The world sees the host's address (the same one the container holds).
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
    assert_eq!(sink6.stats.peer_ips6(), vec![HOST_ADDR6]);
    // An on-link neighbour of the host (W's own veth address) is reached as itself.
    let echo = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(WORLD_LINK, 0));
    t.in_container(|| tcp_echo_roundtrip(echo.addr.into(), b"on-link"));
    // podman removes the namespace file when the container ends: pasta goes away.
    assert_eq!(p.pids().len(), 1, "one long-lived pasta");
    ip(&["netns", "del", &t.container]);
    assert!(
        p.wait_gone(Duration::from_secs(20)),
        "pasta outlived its namespace"
    );
}

#[test]
fn pasta_podman53_published_ports_tcp_udp_ipv4_ipv6() {
    let Some(t) = topology(true) else { return };
    let args = podman53(
        &t.container_ns(),
        &[
            "-t",
            "8080-8080:80-80",
            "-t",
            "9000-9001:9000-9001",
            "-t",
            "127.0.0.1/5432-5432:5433-5433",
            "-t",
            "::1/7000-7000:70-70",
            "-u",
            "127.0.0.1/5353-5353:53-53",
            "-u",
            "6000-6000:60-60",
        ],
    );
    let echo80 = TcpServer6::echo(
        &t.container_ns(),
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 80, 0, 0),
    );
    let echo9001 = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9001),
    );
    let echo5433 = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5433),
    );
    let echo70 = TcpServer6::echo(
        &t.container_ns(),
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 70, 0, 0),
    );
    let udp53 = UdpEcho::start(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 53),
    );
    let udp60 = UdpEcho6::start(
        &t.container_ns(),
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 60, 0, 0),
    );
    let _p = Pasta::start(&t, &strs(&args));
    let _ = (&echo80, &echo9001, &echo5433, &echo70, &udp53, &udp60);
    // From the world: single and translated, a range, both families.
    t.in_world(|| {
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 8080)), b"single v4");
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR6, 8080)), b"single v6");
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 9001)), b"range");
        let s = UdpSocket::bind("[::]:0").expect("bind");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        for to in [
            SocketAddr::from((HOST_ADDR, 6000)),
            SocketAddr::from((HOST_ADDR6, 6000)),
        ] {
            s.send_to(b"udp range", to).expect("send");
            let mut buf = [0u8; 64];
            let (n, _) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no UDP echo via {to}: {e}"));
            assert_eq!(&buf[..n], b"udp range");
        }
        // Address-bound rules listen on the host's loopback only.
        assert_refused(SocketAddrV4::new(HOST_ADDR, 5432));
    });
    // From the host's loopback: address-bound TCP and UDP, IPv4 and IPv6.
    t.in_host(|| {
        tcp_echo_roundtrip(SocketAddr::from((Ipv4Addr::LOCALHOST, 5432)), b"bound v4");
        tcp_echo_roundtrip(SocketAddr::from((Ipv6Addr::LOCALHOST, 7000)), b"bound v6");
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        udp_roundtrip(
            &s,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5353),
            b"dns-ish",
            3,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    });
}

/// One request/answer over TCP through an echo server.
#[track_caller]
fn tcp_echo_roundtrip(to: SocketAddr, msg: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(msg).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("read from {to}: {e}"));
    assert_eq!(got, msg, "echo through {to}");
}

#[test]
fn pasta_dns_forward_and_map_guest_addr_reach_host() {
    let Some(t) = topology(false) else { return };
    let dns = DnsServer::start(&t);
    let own = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(HOST_ADDR, 0));
    let args = podman53(&t.container_ns(), &[]);
    let _p = Pasta::start(&t, &strs(&args));
    t.in_container(|| {
        let q = dns_query(0x1234, DNS_NAME, QTYPE_A);
        let udp =
            dns_udp_exchange(SocketAddrV4::new(DNS_FWD, 53), &q).expect("no DNS answer over UDP");
        assert_eq!(parse_dns(&udp).expect("malformed").a, vec![WORLD]);
        let tcp = dns_tcp_exchange(SocketAddrV4::new(DNS_FWD, 53), &q).expect("DNS over TCP");
        assert_eq!(parse_dns(&tcp).expect("malformed").a, vec![WORLD]);
        // host.containers.internal: the host's own address.
        tcp_echo_roundtrip(SocketAddr::from((MAP_GUEST, own.addr.port())), b"host");
    });
    assert!(dns.udp_queries.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

#[test]
fn pasta_no_map_gw_keeps_host_loopback_out_of_reach_map_gw_reaches_it() {
    let Some(t) = topology(false) else { return };
    let lo = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let port = lo.addr.port();
    let args = podman53(&t.container_ns(), &[]);
    let p = Pasta::start(&t, &strs(&args));
    // The gateway is W here: nothing listens there on that port.
    t.in_container(|| assert_refused(SocketAddrV4::new(WORLD_LINK, port)));
    drop(p);
    ip(&["netns", "del", &t.container]);
    ip(&["netns", "add", &t.container]);
    // podman's `--network pasta:--map-gw` leaves --no-map-gw out.
    let args: Vec<String> = podman53(&t.container_ns(), &[])
        .into_iter()
        .filter(|a| a != "--no-map-gw")
        .collect();
    let _p = Pasta::start(&t, &strs(&args));
    t.in_container(|| tcp_echo_roundtrip(SocketAddr::from((WORLD_LINK, port)), b"loopback"));
}

#[test]
fn pasta_rootless_netns_line_writes_pid_file_and_ends_on_sigterm() {
    let Some(t) = topology(false) else { return };
    let pid_file = t.tmp.join("rootless-netns-conn.pid");
    let p = Pasta::start(
        &t,
        &[
            "--config-net",
            "--pid",
            pid_file.to_str().expect("utf-8"),
            "--dns-forward",
            "169.254.1.1",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            &t.container_ns(),
            "--map-guest-addr",
            "169.254.1.2",
        ],
    );
    let text = std::fs::read_to_string(&pid_file)
        .expect("PID file written before the first process exits");
    assert!(text.ends_with('\n') && !text.starts_with(' '), "{text:?}");
    let pid: u32 = text.trim().parse().expect("a PID");
    assert_eq!(
        p.pids(),
        vec![pid],
        "the PID file names the long-lived process"
    );
    // Detached: a session of its own, stdio on /dev/null.
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = sid
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        fields.get(3).copied(),
        Some(pid.to_string().as_str()),
        "not a session leader"
    );
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd");
        assert_eq!(target.to_str(), Some("/dev/null"), "fd {fd}");
    }
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
    assert!(
        p.wait_gone(Duration::from_secs(20)),
        "pasta ignored SIGTERM"
    );
}

#[test]
fn pasta_podman50_and_51_lines() {
    let Some(t) = topology(false) else { return };
    let first_echo = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    );
    let ns = t.container_ns();
    // 5.0: ports first, `--dns none`, ends with --quiet --netns P.
    let p = Pasta::start(
        &t,
        &[
            "-t",
            "8080-8080:80-80",
            "--config-net",
            "--dns",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            &ns,
        ],
    );
    t.in_world(|| tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 8080)), b"5.0"));
    drop((p, first_echo));
    ip(&["netns", "del", &t.container]);
    ip(&["netns", "add", &t.container]);
    let echo = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    );
    // 5.1-5.2: --dns-forward 169.254.0.1, no --map-guest-addr.
    let dns = DnsServer::start(&t);
    let _p = Pasta::start(
        &t,
        &[
            "--config-net",
            "-t",
            "8080-8080:80-80",
            "--dns-forward",
            "169.254.0.1",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            &ns,
        ],
    );
    t.in_world(|| tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 8080)), b"5.1"));
    t.in_container(|| {
        let q = dns_query(7, DNS_NAME, QTYPE_A);
        let r = dns_udp_exchange(SocketAddrV4::new(Ipv4Addr::new(169, 254, 0, 1), 53), &q)
            .expect("DNS");
        assert_eq!(parse_dns(&r).expect("malformed").a, vec![WORLD]);
    });
    drop((echo, dns));
}

#[test]
fn pasta_rootlesskit_line_with_pid_target() {
    let Some(t) = topology(false) else { return };
    // RootlessKit's child: a process in C (here only its network namespace is new).
    let mut holder = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &["60"]));
    let pid = holder.pid().to_string();
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let p = Pasta::start(
        &t,
        &[
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--no-map-gw",
            "--ipv4-only",
            "--tcp-ports=none",
            "--udp-ports=none",
            &pid,
        ],
    );
    let addrs = t.container_addrs("tap0");
    assert!(addrs.contains("10.0.2.100/24"), "{addrs}");
    t.in_container(|| upload_to_sink(sink.addr, 0x77, 1 << 20));
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
    // The target process ends: so does pasta.
    kill_tree(&mut holder.0);
    assert!(
        p.wait_gone(Duration::from_secs(20)),
        "pasta outlived its target PID"
    );
}

#[test]
fn pasta_unknown_option_text_version_and_errors_before_detaching() {
    let Some(t) = topology(false) else { return };
    // podman's retry without --map-guest-addr keys on this text.
    let p = Pasta::run(
        &t,
        &[
            "--config-net",
            "--map-guest-addrX",
            "1.2.3.4",
            "--netns",
            "x",
        ],
    );
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    assert!(
        p.first
            .stderr
            .contains("unrecognized option '--map-guest-addrX'"),
        "{}",
        p.first
    );
    for args in [&["--version"][..], &["--host-lo-to-ns-lo", "--version"]] {
        let p = Pasta::run(&t, args);
        assert_eq!(p.first.code(), Some(0), "{}", p.first);
        assert!(p.first.stdout.starts_with("pasta"), "{}", p.first);
    }
    // A namespace that does not exist: an error on stderr, status 1, nothing left behind.
    let p = Pasta::run(
        &t,
        &[
            "--config-net",
            "--quiet",
            "--netns",
            "/run/netns/no-such-ns",
        ],
    );
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    assert!(p.first.stderr.contains("no-such-ns"), "{}", p.first);
    assert!(p.wait_gone(Duration::from_secs(20)));
    // A port that cannot be bound is an error too (a rule the host already uses).
    let _busy = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8088));
    let p = Pasta::run(
        &t,
        &strs(&podman53(&t.container_ns(), &["-t", "8088-8088:80-80"])),
    );
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    // In pasta's words, which podman's "port on localhost" test matches (the port, then the
    // system's text).
    assert!(
        p.first.stderr.contains(
            "Failed to bind port 8088 (Address already in use) for option '-t 8088-8088:80-80', \
             exiting"
        ),
        "{}",
        p.first
    );
    assert!(p.wait_gone(Duration::from_secs(20)));
}

#[test]
fn pasta_rootlesskit_auto_ports_follow_listeners_that_appear_and_go() {
    let Some(t) = topology(false) else { return };
    let mut holder = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &["60"]));
    let pid = holder.pid().to_string();
    let _p = Pasta::start(
        &t,
        &[
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--tcp-ports=auto",
            "--udp-ports=auto",
            "--host-lo-to-ns-lo",
            &pid,
        ],
    );
    // Nothing listens in C yet.
    t.in_world(|| assert_refused(SocketAddrV4::new(HOST_ADDR, 8123)));
    let echo = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8123),
    );
    let udp = UdpEcho::start(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8124),
    );
    let to = SocketAddr::from((HOST_ADDR, 8123));
    let seen = wait_for(Duration::from_secs(20), || {
        t.in_world(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok())
            .map(|_| ())
    });
    assert!(seen.is_some(), "auto did not pick up the new TCP listener");
    t.in_world(|| {
        tcp_echo_roundtrip(to, b"auto tcp");
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        udp_roundtrip(&s, SocketAddrV4::new(HOST_ADDR, 8124), b"auto udp", 3)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    drop((echo, udp));
    let gone = wait_for(Duration::from_secs(20), || {
        t.in_world(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_err())
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "auto kept forwarding a port nobody listens on"
    );
    kill_tree(&mut holder.0);
}

#[test]
fn pasta_tcp_ns_udp_ns_reach_host_loopback_explicit_and_auto() {
    let Some(t) = topology(true) else { return };
    let tcp = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5432));
    let tcp6 = TcpServer6::echo(
        &t.host_ns(),
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, 5432, 0, 0),
    );
    let udp = UdpEcho::start(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5354));
    // podman's `--network pasta:-T,5432,-U,5353:5354`.
    let args = podman53(&t.container_ns(), &["-T", "5432", "-U", "5353:5354"]);
    let p = Pasta::start(&t, &strs(&args));
    t.in_container(|| {
        tcp_echo_roundtrip(SocketAddr::from((Ipv4Addr::LOCALHOST, 5432)), b"-T v4");
        tcp_echo_roundtrip(SocketAddr::from((Ipv6Addr::LOCALHOST, 5432)), b"-T v6");
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let sent = udp_roundtrip(&s, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5353), b"-U", 3);
        sent.unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(tcp.stats.peer_ips(), vec![Ipv4Addr::LOCALHOST]);
    drop((p, tcp6, udp));
    ip(&["netns", "del", &t.container]);
    ip(&["netns", "add", &t.container]);
    // pasta's default for -T is auto: the host's loopback listeners appear in C, also one
    // that starts later.
    let _p = Pasta::start(
        &t,
        &[
            "--config-net",
            "-t",
            "none",
            "-u",
            "none",
            "--quiet",
            "--netns",
            &t.container_ns(),
        ],
    );
    t.in_container(|| {
        tcp_echo_roundtrip(SocketAddr::from((Ipv4Addr::LOCALHOST, 5432)), b"auto -T")
    });
    let late = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, late.addr.port()));
    let seen = wait_for(Duration::from_secs(20), || {
        t.in_container(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok())
            .map(|_| ())
    });
    assert!(seen.is_some(), "-T auto did not follow a new host listener");
    t.in_container(|| tcp_echo_roundtrip(to, b"late"));
}

#[test]
fn pasta_rootlesskit_detach_netns_line_userns_and_netns_paths() {
    let Some(t) = topology(false) else { return };
    let mut holder = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &["60"]));
    let pid = holder.pid();
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let userns = format!("--userns=/proc/{pid}/ns/user");
    // RootlessKit's --detach-netns: the namespace file under the child's root.
    let netns = format!("--netns=/proc/{pid}/root{}", t.container_ns());
    let p = Pasta::start(
        &t,
        &[
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--tcp-ports=none",
            "--udp-ports=none",
            &userns,
            &netns,
        ],
    );
    t.in_container(|| upload_to_sink(sink.addr, 0x78, 1 << 20));
    kill_tree(&mut holder.0);
    assert!(
        p.wait_gone(Duration::from_secs(20)),
        "pasta outlived the process its --netns path runs through"
    );
}

#[test]
fn pasta_command_mode_runs_cmd_in_new_namespaces_and_exits_with_its_status() {
    let Some(t) = topology(false) else { return };
    if !require_tool("busybox") {
        return;
    }
    let web = TcpServer::http(&t.world_ns(), SocketAddrV4::new(WORLD, 0), "from the world");
    let url = format!("http://{}/", web.addr);
    let script = format!(
        "ip -br addr show dev vh; ip route show default; busybox wget -q -O - {url} && echo; \
         echo pid $$; exit 7"
    );
    let bin = t.pasta_bin();
    let out = run_with_timeout(
        t.exec_in(
            &t.host,
            &bin,
            &["--config-net", "-q", "--", "sh", "-c", &script],
        ),
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(7), "{out}");
    assert!(out.stdout.contains("198.51.100.1/24"), "{out}");
    assert!(
        out.stdout.contains("default via 198.51.100.2 dev vh"),
        "{out}"
    );
    assert!(out.stdout.contains("from the world"), "{out}");
    // Its own PID namespace: the shell is not one of H's processes' PIDs.
    assert!(out.stdout.contains("pid 2"), "{out}");
    // A command killed by a signal: 128 + N, as a shell reports it.
    let out = run_with_timeout(
        t.exec_in(&t.host, &bin, &["-q", "sh", "-c", "kill -TERM $$"]),
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(128 + 15), "{out}");
}

#[test]
fn pasta_pcap_short_option_captures_the_namespace_link() {
    let Some(t) = topology(false) else { return };
    if !require_tool("tcpdump") {
        return;
    }
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let path = t.tmp.join("pasta.pcap");
    let args = podman53(&t.container_ns(), &["-p", path.to_str().expect("utf-8")]);
    let p = Pasta::start(&t, &strs(&args));
    t.in_container(|| upload_to_sink(sink.addr, 0x9d, 64 << 10));
    ip(&["netns", "del", &t.container]);
    assert!(p.wait_gone(Duration::from_secs(20)));
    let out = run_with_timeout(
        {
            let mut c = std::process::Command::new("tcpdump");
            c.args(["-n", "-r"]).arg(&path);
            c
        },
        Duration::from_secs(20),
    );
    assert!(out.success(), "{out}");
    let world = format!("{WORLD}.{}", sink.addr.port());
    assert!(
        out.stdout.contains("198.51.100.1.") && out.stdout.contains(&world),
        "{out}"
    );
}

#[test]
fn pasta_ipv6_only_leaves_ipv4_out_and_forwards_ipv6() {
    let Some(t) = topology(true) else { return };
    let sink6 = TcpServer6::sink(&t.world_ns(), SocketAddrV6::new(WORLD6, 0, 0, 0));
    let echo = TcpServer6::echo(
        &t.container_ns(),
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 80, 0, 0),
    );
    let args = podman53(&t.container_ns(), &["-6", "-t", "8080:80"]);
    let _p = Pasta::start(&t, &strs(&args));
    let addrs = t.container_addrs("vh");
    assert!(!addrs.contains("inet "), "IPv4 address with -6: {addrs}");
    assert!(t.container_addrs6("vh").contains("2001:db8:1::1/64"));
    t.in_container(|| upload_to_sink6(sink6.addr, 0x66, 1 << 20));
    t.in_world(|| {
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR6, 8080)), b"v6 only");
        // No IPv4 listener for the port.
        assert_refused(SocketAddrV4::new(HOST_ADDR, 8080));
    });
    drop(echo);
}

#[test]
fn pasta_without_config_net_offers_the_host_address_by_dhcp() {
    let Some(t) = topology(false) else { return };
    if !require_tool("busybox") {
        return;
    }
    let _p = Pasta::start(
        &t,
        &[
            "--dns-forward",
            "169.254.1.1",
            // pasta announces the resolver by DHCP only when asked to.
            "--dhcp-dns",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "-q",
            "--netns",
            &t.container_ns(),
        ],
    );
    // Not configured: the link is down and has no address.
    assert!(!t.container_addrs("vh").contains("inet "));
    ip(&["-n", &t.container, "link", "set", "vh", "up"]);
    let lease = udhcpc_lease(&t, "5").unwrap_or_else(|f| panic!("no lease:\n{f}"));
    assert!(
        lease.contains("ip=198.51.100.1 router=198.51.100.2 dns=169.254.1.1 subnet=255.255.255.0"),
        "{lease}"
    );
}

#[test]
fn pasta_foreground_stays_in_front_until_the_namespace_goes() {
    let Some(t) = topology(false) else { return };
    let mut args = podman53(&t.container_ns(), &[]);
    args.insert(0, "-f".into());
    let mut child = ChildGuard::spawn(t.exec_in(&t.host, t.pasta_bin(), &strs(&args)));
    let configured = wait_for(Duration::from_secs(20), || {
        // The link appears only once pasta has created it: ask without failing meanwhile.
        let out = std::process::Command::new("ip")
            .args(["-n", &t.container, "-o", "-4", "addr", "show", "dev", "vh"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("198.51.100.1/24")
            .then_some(())
    });
    assert!(configured.is_some(), "-f never configured the namespace");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "-f went away"
    );
    ip(&["netns", "del", &t.container]);
    let status = wait_for(Duration::from_secs(20), || {
        child.0.try_wait().expect("try_wait")
    });
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "-f did not end with its namespace"
    );
}

#[test]
fn pasta_interface_bound_ports_accept_only_through_that_interface() {
    let Some(t) = topology(false) else { return };
    let echo = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
    );
    let udp = UdpEcho::start(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 60),
    );
    // pasta's `%IF/PORTS` and `ADDR%IF/PORTS` (SO_BINDTODEVICE on the host listeners).
    let args = podman53(
        &t.container_ns(),
        &[
            "-t",
            "%vh/8080:80",
            "-t",
            "198.51.100.3%vh/8081:80",
            "-t",
            "%lo/8082:80",
            "-u",
            "%vh/6000:60",
        ],
    );
    let p = Pasta::start(&t, &strs(&args));
    // W's connections arrive through vh.
    t.in_world(|| {
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 8080)), b"via vh");
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR2, 8081)), b"address on vh");
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        udp_roundtrip(&s, SocketAddrV4::new(HOST_ADDR, 6000), b"udp via vh", 3)
            .unwrap_or_else(|e| panic!("{e}"));
        // Bound to lo: nothing from vh.
        assert_refused(SocketAddrV4::new(HOST_ADDR, 8082));
        // Bound to the other address of vh.
        assert_refused(SocketAddrV4::new(HOST_ADDR, 8081));
    });
    // H's own connections to 127.0.0.1 arrive through lo (the kernel counts those to
    // vh's addresses as vh's).
    t.in_host(|| {
        tcp_echo_roundtrip(SocketAddr::from((Ipv4Addr::LOCALHOST, 8082)), b"via lo");
        assert_refused(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let r = udp_roundtrip(&s, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 6000), b"lo", 1);
        assert!(
            r.is_err(),
            "a UDP datagram through lo reached a vh-bound rule"
        );
    });
    drop((p, echo, udp));
    // An interface the host does not have: refused before detaching, nothing left.
    let p = Pasta::run(
        &t,
        &strs(&podman53(&t.container_ns(), &["-t", "%nosuch0/8084:80"])),
    );
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    assert!(p.first.stderr.contains("'nosuch0'"), "{}", p.first);
    assert!(p.wait_gone(Duration::from_secs(20)));
}

/// The ports listening in H (TCP or UDP, any address), from `ss`.
fn host_ports(t: &Topology, flag: &str) -> std::collections::BTreeSet<u16> {
    let out = ip(&["netns", "exec", &t.host, "ss", "-Hn", flag]).stdout;
    out.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn pasta_exclusions_alone_forward_every_other_port_but_ephemeral_ones() {
    let Some(t) = topology(false) else { return };
    // Ephemeral (left out): 1024-65000; so 1-1023 and 65001-65535 are forwarded.
    t.host_sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    // A port H already uses is skipped, not fatal.
    let busy = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(HOST_ADDR, 65010));
    let servers: Vec<_> = [80, 65020, 65100, 40000]
        .into_iter()
        .map(|port| {
            TcpServer::echo(
                &t.container_ns(),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            )
        })
        .collect();
    let udp = UdpEcho::start(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 65020),
    );
    let args = podman53(
        &t.container_ns(),
        &["-t", "~65100-65199", "-u", "~65100-65199,~65300"],
    );
    let _p = Pasta::start(&t, &strs(&args));
    for (flag, skipped) in [("-ltn", 65100..=65199), ("-lun", 65100..=65199)] {
        let ports = host_ports(&t, flag);
        for p in (1..=1023).chain(65001..=65099).chain(65200..=65299) {
            assert!(ports.contains(&p), "{flag}: port {p} not forwarded");
        }
        for p in skipped.chain([1024, 40000, 65000]) {
            assert!(!ports.contains(&p), "{flag}: port {p} forwarded");
        }
    }
    assert!(!host_ports(&t, "-lun").contains(&65300));
    assert!(host_ports(&t, "-ltn").contains(&65300));
    t.in_world(|| {
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 65020)), b"every other port");
        tcp_echo_roundtrip(SocketAddr::from((HOST_ADDR, 80)), b"a low one");
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        udp_roundtrip(&s, SocketAddrV4::new(HOST_ADDR, 65020), b"udp too", 3)
            .unwrap_or_else(|e| panic!("{e}"));
        // Excluded, ephemeral.
        assert_refused(SocketAddrV4::new(HOST_ADDR, 65100));
        assert_refused(SocketAddrV4::new(HOST_ADDR, 40000));
    });
    drop((busy, servers, udp));
}

#[test]
fn pasta_exclusions_alone_fail_as_pasta_when_nothing_or_too_little_binds() {
    let Some(t) = topology(false) else { return };
    t.host_sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    // An address H does not have: no port binds.
    let p = Pasta::run(
        &t,
        &strs(&podman53(&t.container_ns(), &["-t", "192.0.2.77/~1-1000"])),
    );
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    assert_eq!(
        p.first.stderr, "Failed to bind any port for '-t 192.0.2.77/~1-1000', exiting\n",
        "{}",
        p.first
    );
    assert!(p.wait_gone(Duration::from_secs(20)));
    // Too few descriptors (a hard limit of 256) for the ~1000 listeners.
    let mut args = vec![
        "--nofile=256:256".to_owned(),
        t.pasta_bin().display().to_string(),
    ];
    args.extend(podman53(&t.container_ns(), &["-u", "~65100-65199"]));
    let out = run_with_timeout(t.exec_in(&t.host, "prlimit", &strs(&args)), READY_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stderr, "Can't open enough sockets for port specifier: ~65100-65199\n",
        "{out}"
    );
}

#[test]
fn pasta_all_is_refused_with_pastas_text_and_status() {
    let Some(t) = topology(false) else { return };
    for opt in ["-t", "-u"] {
        let p = Pasta::run(&t, &strs(&podman53(&t.container_ns(), &[opt, "all"])));
        assert_eq!(p.first.code(), Some(1), "{}", p.first);
        assert_eq!(
            p.first.stderr, "'all' port forwarding is only allowed for passt\n",
            "{}",
            p.first
        );
        assert!(p.first.stdout.is_empty(), "{}", p.first);
    }
}

/// A client that writes `msg`, half-closes and reads to the end: what came back
/// (`None`: the connection failed).
fn send_and_read(to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.write_all(msg).ok()?;
    s.shutdown(std::net::Shutdown::Write).ok()?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).ok()?;
    Some(got)
}

#[test]
fn pasta_loopback_clients_of_t_ports_reach_the_namespace_address_from_inside() {
    let Some(t) = topology(true) else { return };
    let args = podman53(
        &t.container_ns(),
        &[
            "-t", "8081:81", "-t", "8082:82", "-t", "8083:83", "-t", "8084:84", "-u", "5301:53",
            "-u", "5302:54",
        ],
    );
    let ns = t.container_ns();
    let udp = UdpEcho::start(&ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 53));
    let udp_lo = UdpEcho::start(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 54));
    let sink = TcpServer::sink(&ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 81));
    let lo_only = TcpServer::echo(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 82));
    let sink6 = TcpServer6::sink(&ns, SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 83, 0, 0));
    let source = TcpServer::source(&ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 84));
    let _p = Pasta::start(&t, &strs(&args));
    t.in_host(|| {
        // Both directions, 8 MiB each, compared by SHA-256; half-close both ways.
        upload_to_sink(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081), 0x11, 8 << 20);
        upload_to_sink6(
            SocketAddrV6::new(Ipv6Addr::LOCALHOST, 8083, 0, 0),
            0x12,
            8 << 20,
        );
        download_from_source(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8084), 0x13, 8 << 20);
        // As in pasta, a server on the namespace's loopback only is not exposed.
        let got = send_and_read(SocketAddr::from((Ipv4Addr::LOCALHOST, 8082)), b"hello");
        assert!(
            got.as_deref().is_none_or(<[u8]>::is_empty),
            "a loopback-only server was reached: {got:?}"
        );
        // UDP: the reply comes back from the port asked; the client's port is kept.
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let mut sent = 0;
        for i in 0..3u8 {
            let msg = [b'u', i, 0x55, 0xaa];
            sent += udp_roundtrip(&s, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5301), &msg, 3)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let port = s.local_addr().expect("local").port();
        let lo = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        assert!(
            udp_roundtrip(&lo, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5302), b"lo", 1).is_err(),
            "a loopback-only UDP server was reached"
        );
        // Every datagram from the same source; a slow echo is sent again (up to `sent` in all).
        let peers = udp.stats.peers.lock().unwrap().clone();
        assert!(
            (3..=sent as usize).contains(&peers.len())
                && peers
                    .iter()
                    .all(|&p| p == SocketAddr::from((HOST_ADDR, port))),
            "{sent} datagrams sent from port {port}, the server saw {peers:?}"
        );
    });
    assert_eq!(
        udp_lo
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // A client from outside keeps the TAP path and its own address.
    t.in_world(|| upload_to_sink(SocketAddrV4::new(HOST_ADDR, 8081), 0x14, 1 << 20));
    // The loopback client appears as the namespace's own address (a local client).
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR, WORLD_LINK]);
    assert_eq!(sink6.stats.peer_ips6(), vec![HOST_ADDR6]);
    assert_eq!(
        lo_only
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    drop(source);
}

/// A loopback client of a port published on the wildcard address, sending to another of
/// the host's loopback addresses (127.0.0.2: 127.0.0.0/8 is all loopback), gets its replies
/// from the address it sent to: a `connect()`ed client only takes datagrams from its peer.
/// The spliced association remembers the local address its client's datagrams arrived on.
#[test]
fn pasta_loopback_udp_client_of_wildcard_port_gets_replies_from_the_address_it_sent_to() {
    let Some(t) = topology(true) else { return };
    let ns = t.container_ns();
    let udp = UdpEcho::start(&ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 55));
    let args = podman53(&ns, &["-u", "5311:55"]);
    let _p = Pasta::start(&t, &strs(&args));
    let to = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 5311);
    t.in_host(|| connected_udp_echoes(to));
    assert!(udp.stats.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

/// The same inside the namespace, through a `-U` listener on the wildcard address.
#[test]
fn pasta_udp_client_of_wildcard_u_ns_port_gets_replies_from_the_address_it_sent_to() {
    let Some(t) = topology(true) else { return };
    let udp = UdpEcho::start(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5356));
    let args = podman53(&t.container_ns(), &["-U", "0.0.0.0/5355:5356"]);
    let _p = Pasta::start(&t, &strs(&args));
    let to = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 5355);
    t.in_container(|| connected_udp_echoes(to));
    assert!(udp.stats.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

/// One unconnected client socket inside the namespace that sends to two loopback
/// addresses of a wildcard `-U` listener has a spliced association for each (the host's
/// server sees two sources), and each reply comes from the address its request went to,
/// in either order, as through a kernel NAT.
#[test]
fn pasta_udp_client_sending_to_two_addresses_of_a_u_ns_port_gets_each_reply_from_its_own() {
    let Some(t) = topology(true) else { return };
    let udp = UdpEcho::start(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5358));
    let args = podman53(&t.container_ns(), &["-U", "0.0.0.0/5357:5358"]);
    let _p = Pasta::start(&t, &strs(&args));
    let one = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5357);
    let two = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 5357);
    t.in_container(|| {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        for (i, to) in [one, two, one, two].into_iter().enumerate() {
            let msg = [i as u8; 100];
            udp_roundtrip(&s, to, &msg, 5).unwrap_or_else(|e| panic!("datagram {i} to {to}: {e}"));
        }
    });
    let peers: std::collections::HashSet<_> =
        udp.stats.peers.lock().unwrap().iter().copied().collect();
    assert_eq!(peers.len(), 2, "one association per address: {peers:?}");
}

/// A burst of datagrams to a `-U` port waits in the listener's socket while pasta is busy
/// elsewhere (here: stopped), as on a published port: the listener has the same widened
/// receive buffer, and every datagram reaches the host's loopback server, in order.
#[test]
fn pasta_u_ns_listener_holds_a_burst_sent_while_pasta_is_stopped() {
    let Some(t) = topology(false) else { return };
    let server = t.in_host(|| udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::RcvBuf, &(4 << 20))
        .expect("SO_RCVBUF");
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let host_port = server.local_addr().expect("addr").port();
    let spec = format!("5357:{host_port}");
    let args = podman53(&t.container_ns(), &["-U", &spec]);
    let p = Pasta::start(&t, &strs(&args));
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5357);
    let client = t.in_container(|| udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    // The association first, so that the burst waits in the listener only.
    client.send_to(b"warm-up", to).expect("send");
    let mut buf = vec![0u8; 65536];
    let n = server.recv(&mut buf).expect("the warm-up datagram");
    assert_eq!(&buf[..n], b"warm-up");

    let (n, rmem_max) = burst_len(&t);
    while_stopped(&p, || {
        for i in 0..n {
            client
                .send_to(&pattern(i as u64, BURST_LEN), to)
                .unwrap_or_else(|e| panic!("send datagram {i}: {e}"));
        }
    });
    assert_burst(&server, n, rmem_max, "datagram");
}

/// A burst of replies from the container's server to a loopback client of a `-u` port waits
/// in the client's association, a socket inside the namespace, while pasta is busy
/// elsewhere (here: stopped): that socket has the widened receive buffer too, and every
/// reply reaches the client, in order.
#[test]
fn pasta_u_port_association_holds_a_reply_burst_sent_while_pasta_is_stopped() {
    let Some(t) = topology(false) else { return };
    let server = t.in_container(|| udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let spec = format!("5358:{}", server.local_addr().expect("addr").port());
    let args = podman53(&t.container_ns(), &["-u", &spec]);
    let p = Pasta::start(&t, &strs(&args));
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5358);
    let client = t.in_host(|| udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::RcvBuf, &(4 << 20))
        .expect("SO_RCVBUF");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The association first: the server answers where the client's datagram came from.
    client.send_to(b"warm-up", to).expect("send");
    let mut buf = vec![0u8; 65536];
    let (n, assoc) = server.recv_from(&mut buf).expect("the warm-up datagram");
    assert_eq!(&buf[..n], b"warm-up");

    let (n, rmem_max) = burst_len(&t);
    while_stopped(&p, || {
        for i in 0..n {
            server
                .send_to(&pattern(i as u64, BURST_LEN), assoc)
                .unwrap_or_else(|e| panic!("send reply {i}: {e}"));
        }
    });
    assert_burst(&client, n, rmem_max, "reply");
}

/// The datagrams of the burst tests above.
const BURST_LEN: usize = 1400;

/// How many datagrams a burst test sends, and the namespace's `rmem_max`: half of what a
/// socket with the widened buffer may queue (1400-byte datagrams take about 2.3 KiB of
/// buffer each; the kernel caps the buffer at `rmem_max` and doubles it), at most 1500: far
/// more than the default buffer's 90.
fn burst_len(t: &Topology) -> (usize, usize) {
    let rmem_max: usize = t.in_container(|| {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("rmem_max")
            .trim()
            .parse()
            .expect("rmem_max")
    });
    (
        (2 * rmem_max.min(4 << 20) / 2 / 2400).clamp(50, 1500),
        rmem_max,
    )
}

/// Runs `f` with every pasta process stopped (SIGSTOP, then SIGCONT).
fn while_stopped(p: &Pasta, f: impl FnOnce()) {
    p.signal(Signal::SIGSTOP);
    f();
    p.signal(Signal::SIGCONT);
}

/// Receives the `n` datagrams of a burst on `s`, each compared with what was sent.
#[track_caller]
fn assert_burst(s: &UdpSocket, n: usize, rmem_max: usize, what: &str) {
    let mut buf = vec![0u8; 65536];
    for got in 0..n {
        match s.recv(&mut buf) {
            Ok(len) => assert!(
                buf[..len] == pattern(got as u64, BURST_LEN),
                "{what} {got} of {n} differs (or one before it was lost)"
            ),
            Err(e) => panic!("{got} of {n} {what}s arrived (rmem_max {rmem_max}): {e}"),
        }
    }
}

/// Three datagrams of 1000 bytes from a UDP socket on 127.0.0.1 `connect()`ed to `to`,
/// each echoed back to it (a reply from another address is not delivered), bytes compared;
/// each sent again if its echo is slow to come (a loaded machine), as `udp_roundtrip` does.
fn connected_udp_echoes(to: SocketAddrV4) {
    let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    s.connect(to).expect("connect");
    for i in 0..3u8 {
        let msg: Vec<u8> = (0..1000u32).map(|j| (j as u8) ^ i).collect();
        udp_roundtrip(&s, to, &msg, 5).unwrap_or_else(|e| panic!("datagram {i} through {to}: {e}"));
    }
}

#[test]
fn pasta_host_lo_to_ns_lo_brings_loopback_clients_to_the_namespace_loopback() {
    let Some(t) = topology(true) else { return };
    let mut args = podman53(
        &t.container_ns(),
        &["-t", "8082:82", "-t", "8083:83", "-u", "5302:54"],
    );
    args.insert(0, "--host-lo-to-ns-lo".into());
    let ns = t.container_ns();
    let udp_lo = UdpEcho::start(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 54));
    let lo_only = TcpServer::echo(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 82));
    let sink6 = TcpServer6::sink(&ns, SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 83, 0, 0));
    let _p = Pasta::start(&t, &strs(&args));
    t.in_host(|| {
        let msg: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let got = send_and_read(SocketAddr::from((Ipv4Addr::LOCALHOST, 8082)), &msg)
            .expect("echo through the namespace's loopback");
        assert!(
            got == msg,
            "echo differs: {} of {} bytes",
            got.len(),
            msg.len()
        );
        upload_to_sink6(
            SocketAddrV6::new(Ipv6Addr::LOCALHOST, 8083, 0, 0),
            0x21,
            4 << 20,
        );
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        udp_roundtrip(
            &s,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5302),
            b"to ns lo",
            3,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(udp_lo.stats.peer_ips(), vec![Ipv4Addr::LOCALHOST]);
    assert_eq!(lo_only.stats.peer_ips(), vec![Ipv4Addr::LOCALHOST]);
    assert_eq!(sink6.stats.peer_ips6(), vec![Ipv6Addr::LOCALHOST]);
}

#[test]
fn pasta_dns_forward_follows_resolv_conf_changes() {
    let Some(t) = topology(false) else { return };
    let first = DnsServer::start(&t);
    let second = DnsServer::start_at(
        &t.host_ns(),
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 53),
    );
    t.set_host_resolv_conf("nameserver 127.0.0.1\n");
    let args = podman53(&t.container_ns(), &[]);
    let _p = Pasta::start(&t, &strs(&args));
    let ask = |id: u16| {
        let q = dns_query(id, DNS_NAME, QTYPE_A);
        dns_udp_exchange(SocketAddrV4::new(DNS_FWD, 53), &q)
            .and_then(|r| parse_dns(&r))
            .is_some_and(|r| r.a == vec![WORLD])
    };
    t.in_container(|| assert!(ask(1), "no answer before the change"));
    let asked_first = first.udp_queries.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked_first >= 1);
    t.set_host_resolv_conf("nameserver 127.0.0.2\n");
    // The reload follows inotify: ask until the new server is asked (20 s guard).
    let mut id = 1u16;
    let switched = t.in_container(|| {
        wait_for(Duration::from_secs(20), || {
            id += 1;
            (ask(id) && second.udp_queries.load(std::sync::atomic::Ordering::SeqCst) > 0)
                .then_some(())
        })
    });
    assert!(
        switched.is_some(),
        "the forwarder never asked the new nameserver"
    );
}

#[test]
fn pasta_dns_option_names_the_resolvers_dns_forward_uses() {
    let Some(t) = topology(false) else { return };
    let from_resolv_conf = DnsServer::start(&t);
    let named = DnsServer::start_at(
        &t.host_ns(),
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 53),
    );
    t.set_host_resolv_conf("nameserver 127.0.0.1\n");
    let mut args = podman53(&t.container_ns(), &[]);
    args.splice(0..0, ["-D".to_owned(), "127.0.0.3".to_owned()]);
    let _p = Pasta::start(&t, &strs(&args));
    t.in_container(|| {
        let q = dns_query(0x4444, DNS_NAME, QTYPE_A);
        let r = dns_udp_exchange(SocketAddrV4::new(DNS_FWD, 53), &q).expect("no DNS answer");
        assert_eq!(parse_dns(&r).expect("malformed").a, vec![WORLD]);
    });
    let ord = std::sync::atomic::Ordering::SeqCst;
    assert!(named.udp_queries.load(ord) >= 1);
    assert_eq!(from_resolv_conf.udp_queries.load(ord), 0);
    // An address that is not one is refused before anything starts.
    let f = Pasta::run(
        &t,
        &[
            "--config-net",
            "-D",
            "0.0.0.0",
            "--netns",
            &t.container_ns(),
        ],
    );
    assert_eq!(f.first.code(), Some(1), "{}", f.first);
}

/// A client socket is one association (issue 17), in pasta mode too: datagrams of one client
/// that the container cannot be shown as it is (the host's own address, which the container
/// holds too, so usernet shows it as the gateway with a port of its own) and of loopback
/// clients (the splice path) all reach a server that `connect()`s to its first peer, with gaps
/// longer than a loop turn, both families. podman's "UDP port range forwarding, IPv6, tap"
/// timed out on this.
#[test]
fn pasta_udp_client_socket_is_one_association_tap_and_splice_paths() {
    let Some(t) = topology(true) else { return };
    let ns = t.container_ns();
    let args = podman53(
        &ns,
        &[
            "-u", "5401:61", "-u", "5402:62", "-u", "5403:63", "-u", "5404:64",
        ],
    );
    let _p = Pasta::start(&t, &strs(&args));
    // (server port in C, client address in H, destination): TAP and splice paths, IPv4
    // and IPv6. Each server starts right before its client sends, so its wait for the first
    // datagram does not include pasta's start or the associations before it.
    for (port, from, to) in [
        (
            61,
            SocketAddr::from((HOST_ADDR, 0)),
            SocketAddr::from((HOST_ADDR, 5401)),
        ),
        (
            62,
            (Ipv4Addr::LOCALHOST, 0).into(),
            (Ipv4Addr::LOCALHOST, 5402).into(),
        ),
        (63, (HOST_ADDR6, 0).into(), (HOST_ADDR6, 5403).into()),
        (
            64,
            (Ipv6Addr::LOCALHOST, 0).into(),
            (Ipv6Addr::LOCALHOST, 5404).into(),
        ),
    ] {
        let bind = match to {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        };
        let server = ConnectedUdpServer::start(&ns, bind, 4);
        t.in_host(|| assert_one_udp_association(server, from, to));
    }
}

/// podman 5.4's "IPv4 address assignment" and "IPv6 address assignment": `-a` alone, no
/// `-n` and no `-g`, so the gateway stays the host's, outside the new prefix. As pasta, the
/// address gets its default prefix (classful, /64), the host interface's on-link prefix is
/// copied before the default route, and the world is reached through it.
#[test]
fn pasta_address_alone_keeps_the_host_gateway_on_link() {
    let Some(t) = topology(true) else { return };
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let sink6 = TcpServer6::sink(&t.world_ns(), SocketAddrV6::new(WORLD6, 0, 0, 0));
    let args = podman53(&t.container_ns(), &["-a", "192.0.2.1", "-a", "2001:db8::1"]);
    let _p = Pasta::start(&t, &strs(&args));
    let addrs = t.container_addrs("vh");
    assert!(addrs.contains("192.0.2.1/24"), "{addrs}");
    let addrs6 = t.container_addrs6("vh");
    assert!(addrs6.contains("2001:db8::1/64"), "{addrs6}");
    let all = ip(&["-n", &t.container, "route", "show"]).stdout;
    for want in [
        "default via 198.51.100.2 dev vh",
        "198.51.100.0/24 dev vh scope link",
        "192.0.2.0/24 dev vh proto kernel scope link src 192.0.2.1",
    ] {
        assert!(all.contains(want), "no '{want}' in:\n{all}");
    }
    let all6 = ip(&["-n", &t.container, "-6", "route", "show"]).stdout;
    for want in ["default via 2001:db8:1::2 dev vh", "2001:db8:1::/64 dev vh"] {
        assert!(all6.contains(want), "no '{want}' in:\n{all6}");
    }
    t.in_container(|| {
        upload_to_sink(sink.addr, 0x5c, 1 << 20);
        upload_to_sink6(sink6.addr, 0x5d, 1 << 20);
    });
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
    assert_eq!(sink6.stats.peer_ips6(), vec![HOST_ADDR6]);
}

/// ICMPv6 types of the frames in pcap file `path` (Ethernet, IPv6 without extension
/// headers), in order.
fn pcap_icmp6_types(path: &std::path::Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let len = u32::from_le_bytes(data[off + 8..off + 12].try_into().unwrap()) as usize;
        let frame = &data[off + 16..(off + 16 + len).min(data.len())];
        if frame.len() > 54 && frame[12..14] == [0x86, 0xdd] && frame[20] == 58 {
            out.push(frame[54]);
        }
        off += 16 + len;
    }
    out
}

/// udhcpc on C's `vh` (link up first): `Ok(lease line)` or `Err(output)` when it got none.
fn udhcpc_lease(t: &Topology, tries: &str) -> Result<String, String> {
    let out = t.tmp.join("lease");
    let _ = std::fs::remove_file(&out);
    let script = t.tmp.join("udhcpc.script");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in bound) echo \"ip=$ip router=$router dns=$dns subnet=$subnet\" > {};; esac\nexit 0\n",
            out.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let s = script.to_string_lossy().into_owned();
    let f = t.run_in_container(
        "busybox",
        &[
            "udhcpc", "-i", "vh", "-n", "-q", "-f", "-t", tries, "-T", "1", "-A", "1", "-s", &s,
        ],
        Duration::from_secs(30),
    );
    std::fs::read_to_string(&out).map_err(|_| f.to_string())
}

#[test]
fn pasta_no_dhcp_and_no_ra_turn_those_services_off() {
    let Some(t) = topology(true) else { return };
    if !require_tool("busybox") {
        return;
    }
    let pcap = t.tmp.join("link.pcap");
    let pcap_s = pcap.to_string_lossy().into_owned();
    let ns = t.container_ns();
    let base = [
        "--dns-forward",
        "169.254.1.1",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "-q",
        "-p",
        &pcap_s,
        "--netns",
        &ns,
    ];
    let ra_route = || {
        let out = std::process::Command::new("ip")
            .args(["-n", &t.container, "-6", "route", "show", "default"])
            .output()
            .expect("ip route");
        String::from_utf8_lossy(&out.stdout).contains("proto ra")
    };
    // Without --config-net, as pasta: DHCP answers (no resolver named without
    // --dhcp-dns) and router solicitations get advertisements (a default route).
    let p = Pasta::start(&t, &base);
    ip(&["-n", &t.container, "link", "set", "vh", "up"]);
    let lease = udhcpc_lease(&t, "5").expect("a DHCP lease without --no-dhcp");
    assert_eq!(
        lease.trim_end(),
        "ip=198.51.100.1 router=198.51.100.2 dns= subnet=255.255.255.0"
    );
    assert!(
        wait_for(Duration::from_secs(20), || ra_route().then_some(())).is_some(),
        "no router advertisement without --no-ra: ICMPv6 types {:?}",
        pcap_icmp6_types(&pcap)
    );
    for pid in p.pids() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    assert!(p.wait_gone(Duration::from_secs(20)), "SIGTERM");
    drop(p);
    ip(&["-n", &t.container, "-6", "route", "flush", "proto", "ra"]);
    // --no-dhcp --no-ra: udhcpc gets nothing; the kernel's router solicitations are
    // seen on the link and get no advertisement.
    let mut args = base.to_vec();
    args.splice(0..0, ["--no-dhcp", "--no-ra"]);
    let _p = Pasta::start(&t, &args);
    ip(&["-n", &t.container, "link", "set", "vh", "up"]);
    let got = udhcpc_lease(&t, "2");
    assert!(got.is_err(), "a lease with --no-dhcp: {got:?}");
    let solicited = wait_for(Duration::from_secs(20), || {
        pcap_icmp6_types(&pcap).contains(&133).then_some(())
    });
    assert!(
        solicited.is_some(),
        "the kernel sent no router solicitation"
    );
    // An advertisement answers a solicitation at once (the first run above): give it a
    // second, then none must be on the link.
    std::thread::sleep(Duration::from_secs(1));
    let types = pcap_icmp6_types(&pcap);
    assert!(
        !types.contains(&134),
        "router advertisement with --no-ra: {types:?}"
    );
    assert!(
        !ra_route(),
        "a default route from an advertisement with --no-ra"
    );
}

#[test]
fn pasta_no_tcp_and_no_udp_drop_that_protocol_only() {
    let Some(t) = topology(false) else { return };
    let echo = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let uecho = UdpEcho::start(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let tcp_to = SocketAddr::from(echo.addr);
    for (flag, tcp_on) in [("--no-udp", true), ("--no-tcp", false)] {
        let mut args = podman53(&t.container_ns(), &[]);
        args.insert(0, flag.to_owned());
        let p = Pasta::start(&t, &strs(&args));
        let accepted = || {
            echo.stats
                .accepted
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        let before = accepted();
        t.in_container(|| {
            let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            let udp = udp_roundtrip(&sock, uecho.addr, b"datagram", if tcp_on { 1 } else { 3 });
            if tcp_on {
                tcp_echo_roundtrip(tcp_to, b"segment");
                assert!(udp.is_err(), "UDP forwarded with --no-udp");
            } else {
                udp.unwrap_or_else(|e| panic!("UDP with --no-tcp: {e}"));
                let c = std::net::TcpStream::connect_timeout(&tcp_to, Duration::from_secs(3));
                assert!(c.is_err(), "TCP connected with --no-tcp");
            }
        });
        // The world's server saw the TCP client only when TCP was on.
        let seen = accepted() - before;
        assert_eq!(seen, usize::from(tcp_on), "{flag}");
        for pid in p.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        assert!(p.wait_gone(Duration::from_secs(20)), "SIGTERM");
    }
    // A port of a protocol turned off is refused, before anything is set up.
    let mut args = podman53(&t.container_ns(), &["-t", "8080"]);
    args.insert(0, "--no-tcp".to_owned());
    let p = Pasta::run(&t, &strs(&args));
    assert_eq!(p.first.code(), Some(1), "{}", p.first);
    assert!(p.first.stderr.contains("--no-tcp"), "{}", p.first);
}

#[test]
fn pasta_rootlesskit_20_line_with_precreated_tap0_reaches_the_world() {
    let Some(t) = topology(false) else { return };
    // RootlessKit 2.0's child: a process in C. RootlessKit creates tap0 there before
    // pasta starts, and sets its MTU, address and route while pasta starts.
    let mut holder = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &["120"]));
    let pid = holder.pid().to_string();
    ip(&[
        "-n",
        &t.container,
        "tuntap",
        "add",
        "name",
        "tap0",
        "mode",
        "tap",
    ]);
    ip(&["-n", &t.container, "link", "set", "tap0", "mtu", "1500"]);
    let sink = TcpServer::sink(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    // The exact argv of RootlessKit 2.0.2 (Debian 13) for rootless Docker with
    // DOCKERD_ROOTLESS_ROOTLESSKIT_NET=pasta, DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=implicit.
    let args = [
        "--foreground",
        "--stderr",
        "--ns-ifname=tap0",
        "--mtu=1500",
        "--no-dhcp",
        "--no-ra",
        "--address=10.0.2.100",
        "--netmask=24",
        "--gateway=10.0.2.2",
        "--dns-forward=10.0.2.3",
        "--no-map-gw",
        "--ipv4-only",
        "--tcp-ports=auto",
        "--udp-ports=auto",
        &pid,
    ];
    // Nobody waits for it: it stays in front, as RootlessKit runs it.
    let mut pasta = ChildGuard::spawn(t.exec_in(&t.host, t.pasta_bin(), &args));
    t.configure_container_tap("tap0");
    let connected = wait_for(Duration::from_secs(20), || {
        if let Some(s) = pasta.0.try_wait().expect("try_wait") {
            panic!("usernet exited ({s}) with RootlessKit 2.0's command line");
        }
        t.in_container(|| {
            std::net::TcpStream::connect_timeout(&sink.addr.into(), Duration::from_secs(1)).ok()
        })
    });
    assert!(connected.is_some(), "no outbound TCP through usernet");
    drop(connected);
    t.in_container(|| upload_to_sink(sink.addr, 0x20, 4 << 20));
    assert!(sink.stats.peer_ips().iter().all(|ip| *ip == HOST_ADDR));
    assert!(
        pasta.0.try_wait().expect("try_wait").is_none(),
        "usernet went away"
    );
    // RootlessKit ends its child; usernet follows its target process.
    kill_tree(&mut holder.0);
    let status = wait_for(Duration::from_secs(20), || {
        pasta.0.try_wait().expect("try_wait")
    });
    assert!(status.is_some(), "usernet outlived RootlessKit's child");
}

#[test]
fn pasta_no_splice_sends_loopback_clients_across_the_link() {
    let Some(t) = topology(false) else { return };
    let ns = t.container_ns();
    let sink = TcpServer::sink(&ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 81));
    let mut args = podman53(&ns, &["-t", "8081:81"]);
    args.insert(0, "--no-splice".to_owned());
    let _p = Pasta::start(&t, &strs(&args));
    t.in_host(|| upload_to_sink(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081), 0x31, 1 << 20));
    // Without --no-splice the server sees a local client, its own address (the test
    // above); across the link it sees the gateway, which stands for the host's loopback.
    assert_eq!(sink.stats.peer_ips(), vec![WORLD_LINK]);
}

#[test]
fn pasta_no_netns_quit_outlives_its_namespace_until_sigterm() {
    let Some(t) = topology(false) else { return };
    let mut args = podman53(&t.container_ns(), &[]);
    args.insert(0, "--no-netns-quit".to_owned());
    let p = Pasta::start(&t, &strs(&args));
    ip(&["netns", "del", &t.container]);
    // Without the option usernet is gone at once (inotify; see the foreground test).
    std::thread::sleep(Duration::from_secs(2));
    let pids = p.pids();
    assert!(
        !pids.is_empty(),
        "--no-netns-quit: usernet went with its namespace"
    );
    for pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    assert!(p.wait_gone(Duration::from_secs(20)), "SIGTERM");
}

/// A `-u auto` port that a loopback client used (the splice path) is given back with its
/// rule: when the container's server goes, the rule goes and the host port is free at once
/// (the client's association ends with the rule), and when the server comes back the port
/// is published again and answers the same client. An association that outlived its rule
/// kept the host port bound for its idle time (180 s): publishing it again failed with
/// `EADDRINUSE` meanwhile.
#[test]
fn pasta_auto_udp_port_of_a_loopback_client_is_free_once_its_rule_goes() {
    use std::sync::atomic::Ordering;
    const PORT: u16 = 8127;
    let Some(t) = topology(false) else { return };
    let ns = t.container_ns();
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    let payload = |tag: u8| -> Vec<u8> { (0..1200u32).map(|i| (i as u8) ^ tag).collect() };
    let echo = UdpEcho::start(&ns, any);
    let _p = Pasta::start(&t, &strs(&podman53(&ns, &["-u", "auto"])));
    let client = t.in_host(|| udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    udp_roundtrip(&client, to, &payload(1), 3).unwrap_or_else(|e| panic!("{e}"));
    assert!(echo.stats.accepted.load(Ordering::SeqCst) >= 1);
    assert!(host_ports(&t, "-lun").contains(&PORT));
    // The server goes: so do its rule and the host port.
    drop(echo);
    let freed = wait_for(Duration::from_secs(20), || {
        (!host_ports(&t, "-lun").contains(&PORT)).then_some(())
    });
    assert!(
        freed.is_some(),
        "host port {PORT} stayed bound after its rule was removed"
    );
    // It comes back: published again, the same client reaches it.
    let echo = UdpEcho::start(&ns, any);
    let back = wait_for(Duration::from_secs(20), || {
        udp_roundtrip(&client, to, &payload(2), 1).ok()
    });
    assert!(back.is_some(), "port {PORT} was not published again");
    assert!(echo.stats.accepted.load(Ordering::SeqCst) >= 1);
    udp_roundtrip(&client, to, &payload(3), 3).unwrap_or_else(|e| panic!("{e}"));
}

/// A spliced pair relays urgent data (`MSG_OOB`) inline, with every byte around it, from
/// either of its sockets: splice(2) stops at the urgent mark, which must neither end the
/// stream (with the sender's FIN queued behind it) nor stall it (without). Here the pair of
/// a `-t` port's loopback client on H and the server in C; the bytes are queued on both of
/// pasta's sockets while it is stopped ([`assert_urgent_stream_relayed_by`]).
#[test]
fn pasta_loopback_client_of_t_port_relays_urgent_data_inline_both_ways() {
    let Some(t) = topology(false) else { return };
    let listener = t
        .in_container(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("bind in C");
    let port = listener.local_addr().expect("local_addr").port();
    let p = Pasta::start(
        &t,
        &strs(&podman53(
            &t.container_ns(),
            &["-t", &format!("8095:{port}")],
        )),
    );
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8095);
    let client = || t.in_host(|| connect(to)).expect("connect");
    assert_pair_relays_urgent_both_ways(
        &p,
        (&t.host_ns(), &client),
        (&t.container_ns(), &listener),
    );
}

/// As above for a `-T` port: a client in C of a server on H's loopback.
#[test]
fn pasta_t_ns_port_relays_urgent_data_inline_both_ways() {
    let Some(t) = topology(false) else { return };
    let listener = t
        .in_host(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind in H");
    let port = listener.local_addr().expect("local_addr").port();
    let p = Pasta::start(
        &t,
        &strs(&podman53(&t.container_ns(), &["-T", &port.to_string()])),
    );
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let client = || t.in_container(|| connect(to)).expect("connect");
    assert_pair_relays_urgent_both_ways(
        &p,
        (&t.container_ns(), &client),
        (&t.host_ns(), &listener),
    );
}

/// With and without the FIN, the urgent byte from the client, then from the server, each
/// on a connection of its own: `client` connects from the namespace at the first path to
/// `listener`, in the namespace at the second, through one of `p`'s spliced pairs.
#[track_caller]
fn assert_pair_relays_urgent_both_ways(
    p: &Pasta,
    (client_ns, client): (&str, &dyn Fn() -> std::net::TcpStream),
    (server_ns, listener): (&str, &std::net::TcpListener),
) {
    let signal = |sig| p.signal(sig);
    for fin in [true, false] {
        for from_client in [true, false] {
            let mut c = client();
            let (mut s, _) = listener.accept().expect("accept");
            let (ns, sender, receiver) = if from_client {
                (client_ns, &mut c, &mut s)
            } else {
                (server_ns, &mut s, &mut c)
            };
            assert_urgent_stream_relayed_by(&signal, ns, sender, receiver, fin);
        }
    }
}
