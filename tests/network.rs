//! usernet networks in real namespaces: several `usernet run --network` members (and
//! `network connect`ed namespaces) on one user-space switch, served by the network's own
//! process inside the test's host namespace H.
//!
//! Each test keeps its network definitions and runtime files in its own directories
//! (`XDG_CONFIG_HOME`, `XDG_RUNTIME_DIR` under the topology's scratch directory). Members
//! run `sleep MARKER`; the test finds that process and opens sockets in its network
//! namespace (`/proc/PID/ns/net`).

mod util;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::*;

/// One member: its `usernet run` (killed on drop) and its command's namespace.
struct Member {
    /// Killed (with the command) on drop.
    _u: Usernet,
    pid: u32,
}

impl Member {
    fn ns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }
}

impl Nets<'_> {
    /// [`Nets::member`], kept as a [`Member`].
    fn run_member(&self, net: &str, name: &str, opts: &[&str]) -> Member {
        let (_u, pid) = self.member(net, name, opts);
        Member { _u, pid }
    }

    /// `usernet network create ARGS...`, which must work.
    fn create(&self, args: &[&str]) {
        let mut a = vec!["network", "create"];
        a.extend_from_slice(args);
        self.cli(&a).assert_success();
    }

    /// `usernet network inspect NET` as JSON.
    fn inspect(&self, net: &str) -> serde_json::Value {
        let f = self.cli(&["network", "inspect", net]);
        f.assert_success();
        serde_json::from_str(&f.stdout).unwrap_or_else(|e| panic!("inspect: {e}: {f}"))
    }

    /// The inspect entry of member `name`.
    fn member_json(&self, net: &str, name: &str) -> serde_json::Value {
        self.inspect(net)["members"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no member {name} in {}", self.inspect(net)))
    }

    /// Waits up to 20 s for `member`'s port counter `counter` in `net` to reach `at_least`;
    /// its value then (the switch counts a frame once it has read it from the TAP).
    #[track_caller]
    fn wait_port_counter(&self, net: &str, member: &str, counter: &str, at_least: u64) -> u64 {
        let value = || {
            self.member_json(net, member)["port_counters"][counter]
                .as_u64()
                .unwrap_or_else(|| panic!("no port counter {counter}"))
        };
        wait_for(Duration::from_secs(20), || {
            Some(value()).filter(|&v| v >= at_least)
        })
        .unwrap_or_else(|| panic!("{member}'s {counter} is {}, not {at_least}", value()))
    }

    /// The serving process's log of `net`.
    fn log(&self, net: &str) -> String {
        std::fs::read_to_string(self.run.join("usernet").join(format!("{net}.log")))
            .unwrap_or_default()
    }

    /// Waits up to `t` for member `who` (named `left` in the log, e.g. `doomed
    /// (10.95.0.101)`) to have left `net`, which then has `count` members.
    #[track_caller]
    fn assert_left(&self, net: &str, who: &str, count: usize, t: Duration) {
        let left = wait_for(t, || {
            self.inspect(net)["members"]
                .as_array()
                .is_some_and(|m| m.len() == count)
                .then_some(())
        });
        assert!(left.is_some(), "{}", self.inspect(net));
        let log = self.log(net);
        assert!(log.contains(&format!("member {who} left")), "{log}");
    }
}

fn ip4(v: &serde_json::Value) -> Ipv4Addr {
    v["ipv4"].as_str().unwrap().parse().unwrap()
}

fn ip6(v: &serde_json::Value) -> Ipv6Addr {
    v["ipv6"].as_str().unwrap().parse().unwrap()
}

/// `ping` from inside `ns` of an address that answers: true if it did. The reply may take
/// up to 10 s (it comes at once unless the machine is loaded).
fn ping(ns: &str, dst: &str) -> bool {
    ping_within(ns, dst, "10")
}

/// `ping` from inside `ns` of an address that must not answer: true if it did within 2 s.
/// A wrong reply comes as fast as a right one: on a loaded machine the test may miss it,
/// it cannot fail because of the load.
fn ping_briefly(ns: &str, dst: &str) -> bool {
    ping_within(ns, dst, "2")
}

fn ping_within(ns: &str, dst: &str, wait: &str) -> bool {
    let mut cmd = Command::new("nsenter");
    cmd.args([&format!("--net={ns}"), "ping", "-c", "1", "-W", wait, dst]);
    run_with_timeout(cmd, Duration::from_secs(20)).success()
}

/// The A (or AAAA) addresses the network's DNS gives for `name`, asked from `ns`.
fn resolve(ns: &str, dns: Ipv4Addr, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let q = dns_query(0x4242, name, qtype);
    in_netns(ns, || dns_udp_exchange(SocketAddrV4::new(dns, 53), &q))
}

fn has_record(reply: &[u8], addr: &[u8]) -> bool {
    reply.windows(addr.len()).any(|w| w == addr)
}

#[test]
fn three_members_talk_both_families_by_name() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n1", "--ipv6"]);
    let a = n.run_member("n1", "alpha", &["--alias", "first"]);
    let b = n.run_member("n1", "beta", &[]);
    let c = n.run_member("n1", "gamma", &["--ip", "10.89.0.50"]);
    let (ja, jb, jc) = (
        n.member_json("n1", "alpha"),
        n.member_json("n1", "beta"),
        n.member_json("n1", "gamma"),
    );
    assert_eq!(ip4(&jc), Ipv4Addr::new(10, 89, 0, 50), "static --ip");
    // The command's host name is its member name.
    let mut cmd = Command::new("nsenter");
    cmd.args([&format!("--uts=/proc/{}/ns/uts", c.pid), "hostname"]);
    let f = run_with_timeout(cmd, Duration::from_secs(5));
    assert_eq!(f.stdout.trim(), "gamma", "{f}");
    let dns = Ipv4Addr::new(10, 89, 0, 3);

    // ARP and ND between members: ping each way, both families.
    for (from, to) in [(&a, &jb), (&b, &jc), (&c, &ja)] {
        assert!(
            ping(&from.ns(), &ip4(to).to_string()),
            "ping {}",
            to["name"]
        );
        assert!(
            ping(&from.ns(), &ip6(to).to_string()),
            "ping6 {}",
            to["name"]
        );
    }
    // The gateway answers too.
    assert!(ping(&a.ns(), "10.89.0.2"));

    // Names and aliases (A, AAAA, PTR) from the network's DNS.
    let r = resolve(&a.ns(), dns, "beta", QTYPE_A).expect("A beta");
    assert!(has_record(&r, &ip4(&jb).octets()), "{r:?}");
    let r = resolve(&b.ns(), dns, "FIRST", QTYPE_AAAA).expect("AAAA first");
    assert!(has_record(&r, &ip6(&ja).octets()), "{r:?}");
    let r = resolve(&a.ns(), dns, "50.0.89.10.in-addr.arpa", 12).expect("PTR");
    assert!(has_record(&r, b"\x05gamma\x00"), "{r:?}");
    // The short TTL.
    assert!(has_record(&r, &5u32.to_be_bytes()));

    // TCP both ways with SHA-256, IPv4: alpha -> beta upload, beta -> alpha download.
    let sink = TcpServer::sink(&b.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to_b = SocketAddrV4::new(ip4(&jb), sink.addr.port());
    in_netns(&a.ns(), || upload_to_sink(to_b, 1, 16 << 20));
    let source = TcpServer::source(&a.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to_a = SocketAddrV4::new(ip4(&ja), source.addr.port());
    in_netns(&b.ns(), || download_from_source(to_a, 2, 16 << 20));
    // The sink saw alpha's own address: no NAT between members.
    assert_eq!(sink.stats.peer_ips(), vec![ip4(&ja)]);

    // IPv6 TCP, gamma -> beta.
    let sink6 = TcpServer6::sink(&b.ns(), SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    let to_b6 = SocketAddrV6::new(ip6(&jb), sink6.addr.port(), 0, 0);
    in_netns(&c.ns(), || upload_to_sink6(to_b6, 3, 8 << 20));

    // UDP both ways (an echo), IPv4 and IPv6.
    let echo = UdpEcho::start(&c.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to_c = SocketAddrV4::new(ip4(&jc), echo.addr.port());
    in_netns(&a.ns(), || {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        udp_roundtrip(&s, to_c, &pattern(4, 1200), 3).expect("udp echo");
    });
    let echo6 = UdpEcho6::start(&c.ns(), SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    let to_c6 = SocketAddrV6::new(ip6(&jc), echo6.addr.port(), 0, 0);
    in_netns(&b.ns(), || {
        let s = udp_socket6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
        udp_roundtrip6(&s, to_c6, &pattern(5, 1200), 3).expect("udp6 echo");
    });

    // Per-port counters: beta's port moved the upload; `usernet stats` on the network's
    // socket shows them per member.
    let jb = n.member_json("n1", "beta");
    assert!(
        jb["port_counters"]["tx_bytes"].as_u64().unwrap() > 16 << 20,
        "{jb}"
    );
    let sock = n.run.join("usernet").join("n1.sock");
    let stats = n.cli(&["stats", "-a", sock.to_str().unwrap()]);
    stats.assert_success();
    let line = stats
        .stdout
        .lines()
        .find(|l| l.starts_with("members.beta.tx_bytes "))
        .unwrap_or_else(|| panic!("no per-member counters: {stats}"));
    let bytes: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(bytes > 16 << 20, "{line}");
    // `--network NAME` finds the same socket by the network's name.
    let by_name = n.cli(&["stats", "--network", "n1"]);
    by_name.assert_success();
    assert!(
        by_name.stdout.contains("members.beta.tx_bytes "),
        "stats --network: {by_name}"
    );
    assert!(
        stats.stdout.contains("counters.switched_frames "),
        "{stats}"
    );
    drop((a, b, c));
}

#[test]
fn networks_are_isolated_and_internal_ones_have_no_way_out() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["outer", "--subnet", "10.90.1.0/24"]);
    n.create(&["inner", "--subnet", "10.90.2.0/24", "--internal"]);
    let o = n.run_member("outer", "o1", &[]);
    let i1 = n.run_member("inner", "i1", &[]);
    let i2 = n.run_member("inner", "i2", &[]);
    let world = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let host = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

    // outer reaches the world and the host's loopback through its gateway.
    in_netns(&o.ns(), || echo_once(world.addr, b"out"));
    in_netns(&o.ns(), || {
        echo_once(
            SocketAddrV4::new(Ipv4Addr::new(10, 90, 1, 2), host.addr.port()),
            b"lo",
        )
    });
    // But not the other network's members (separate processes: no route between them).
    assert!(!ping_briefly(&o.ns(), "10.90.2.100"));
    let sink = TcpServer::sink(&i1.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    in_netns(&o.ns(), || {
        assert!(connect(SocketAddrV4::new(
            Ipv4Addr::new(10, 90, 2, 100),
            sink.addr.port()
        ))
        .is_err())
    });

    // inner: no world, no host loopback; members and names only.
    in_netns(&i1.ns(), || {
        assert!(
            connect(world.addr).is_err(),
            "internal network reached the world"
        );
        let gw = SocketAddrV4::new(Ipv4Addr::new(10, 90, 2, 2), host.addr.port());
        assert!(connect(gw).is_err(), "internal network reached the host");
    });
    let to_i1 = SocketAddrV4::new(Ipv4Addr::new(10, 90, 2, 100), sink.addr.port());
    in_netns(&i2.ns(), || upload_to_sink(to_i1, 6, 1 << 20));
    let r = resolve(&i2.ns(), Ipv4Addr::new(10, 90, 2, 3), "i1", QTYPE_A).expect("name");
    assert!(has_record(&r, &[10, 90, 2, 100]));
    assert_eq!(
        world
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn connect_and_disconnect_a_running_namespace() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n3", "--subnet", "10.91.0.0/24"]);
    let a = n.run_member("n3", "a", &[]);
    let c = t.container_ns();
    let f = n.cli(&[
        "network", "connect", "n3", &c, "--name", "joined", "--alias", "j",
    ]);
    f.assert_success();
    assert!(
        t.container_addrs("eth0").contains("10.91.0.101"),
        "{}",
        t.container_addrs("eth0")
    );
    assert!(ping(&a.ns(), "10.91.0.101"));
    assert!(ping(&c, "10.91.0.100"));
    let r = resolve(&a.ns(), Ipv4Addr::new(10, 91, 0, 3), "j", QTYPE_A).expect("name j");
    assert!(has_record(&r, &[10, 91, 0, 101]));
    assert_eq!(n.member_json("n3", "joined")["namespace"], c.as_str());

    n.cli(&["network", "disconnect", "n3", "joined"])
        .assert_success();
    // Gone: the interface, the name, the address.
    let gone = || {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &t.container, "link", "show", "eth0"]);
        (!run_with_timeout(cmd, Duration::from_secs(5)).success()).then_some(())
    };
    assert!(
        wait_for(Duration::from_secs(20), gone).is_some(),
        "eth0 still in the namespace"
    );
    let r = resolve(&a.ns(), Ipv4Addr::new(10, 91, 0, 3), "joined", QTYPE_A);
    assert!(
        r.as_ref().is_none_or(|r| !has_record(r, &[10, 91, 0, 101])),
        "{r:?}"
    );
    assert!(!ping_briefly(&a.ns(), "10.91.0.101"));
    // Another member takes the freed address.
    let b = n.run_member("n3", "b", &[]);
    assert_eq!(
        ip4(&n.member_json("n3", "b")),
        Ipv4Addr::new(10, 91, 0, 101)
    );
    drop((a, b));
}

#[test]
fn published_port_reaches_the_second_member_with_the_client_address_and_hairpins() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n4", "--subnet", "10.92.0.0/24"]);
    let a = n.run_member("n4", "a", &[]);
    let server_port = 8080;
    let host_port = 18080 + (std::process::id() % 1000) as u16;
    let spec = format!("{host_port}:{server_port}");
    let b = n.run_member("n4", "b", &["-p", &spec]);
    let sink = TcpServer::sink(
        &b.ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, server_port),
    );
    // From the world to H's address: b sees the world's address.
    in_netns(&t.world_ns(), || {
        upload_to_sink(SocketAddrV4::new(HOST_ADDR, host_port), 7, 4 << 20)
    });
    assert_eq!(sink.stats.peer_ips(), vec![WORLD_LINK]);
    // Hairpin: a reaches the published port through its gateway and lands on b.
    let gw = SocketAddrV4::new(Ipv4Addr::new(10, 92, 0, 2), host_port);
    in_netns(&a.ns(), || upload_to_sink(gw, 8, 1 << 20));
    assert_eq!(sink.stats.wait_digests(2, Duration::from_secs(20)).len(), 2);
    let jb = n.member_json("n4", "b");
    assert_eq!(jb["published_ports"][0]["host_port"], host_port, "{jb}");
    drop((a, b));
}

#[test]
fn spoofed_addresses_and_macs_are_dropped_and_counted() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n5", "--subnet", "10.93.0.0/24"]);
    let a = n.run_member("n5", "a", &[]);
    let b = n.run_member("n5", "b", &[]);
    let echo = UdpEcho::start(&b.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to_b = SocketAddrV4::new(Ipv4Addr::new(10, 93, 0, 101), echo.addr.port());
    // a takes a third address and sends from it: dropped at its port.
    let sh = |ns: &str, cmd: &str| {
        let mut c = Command::new("nsenter");
        c.args([&format!("--net={ns}"), "sh", "-c", cmd]);
        run_with_timeout(c, Duration::from_secs(10))
    };
    sh(&a.ns(), "ip addr add 10.93.0.77/24 dev eth0").assert_success();
    in_netns(&a.ns(), || {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::new(10, 93, 0, 77), 0));
        assert!(
            udp_roundtrip(&s, to_b, b"spoofed", 2).is_err(),
            "a spoofed source got through"
        );
    });
    assert_eq!(
        echo.stats
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let before = n.wait_port_counter("n5", "a", "drop_spoofed", 2);
    // a takes b's MAC address: its frames are dropped too.
    sh(&a.ns(), "ip link set eth0 address 02:89:0a:5d:00:65").assert_success();
    assert!(!ping_briefly(&a.ns(), "10.93.0.2"));
    n.wait_port_counter("n5", "a", "drop_spoofed", before + 1);
    // b is unaffected.
    assert!(ping(&b.ns(), "10.93.0.2"));
    drop((a, b));
}

#[test]
fn definitions_persist_and_rm_is_refused_while_in_use() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["keep", "--subnet", "10.94.0.0/24", "--ipv6"]);
    let f = n.cli(&["network", "create", "keep"]);
    assert!(!f.success() && f.stderr.contains("exists"), "{f}");
    let a = n.run_member("keep", "a", &[]);
    let f = n.cli(&["network", "rm", "keep"]);
    assert!(!f.success() && f.stderr.contains("in use"), "{f}");
    // The member goes: so does the serving process, the definition stays.
    drop(a);
    assert!(
        wait_for(Duration::from_secs(10), || n
            .log("keep")
            .contains("exiting")
            .then_some(()))
        .is_some(),
        "{}",
        n.log("keep")
    );
    let ls = n.cli(&["network", "ls"]);
    assert!(ls.stdout.contains("keep 10.94.0.0/24 fd89::/64"), "{ls}");
    // A new serving process takes it up again.
    let b = n.run_member("keep", "b", &[]);
    assert_eq!(
        ip4(&n.member_json("keep", "b")),
        Ipv4Addr::new(10, 94, 0, 100)
    );
    n.cli(&["network", "rm", "--force", "keep"])
        .assert_success();
    assert!(!n.cli(&["network", "inspect", "keep"]).success());
    drop(b);
}

#[test]
fn a_member_killed_mid_transfer_leaves_the_others_going() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n6", "--subnet", "10.95.0.0/24"]);
    let server = n.run_member("n6", "server", &[]);
    let doomed = n.run_member("n6", "doomed", &[]);
    let steady = n.run_member("n6", "steady", &[]);
    let sink = TcpServer::sink(&server.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 95, 0, 100), sink.addr.port());
    // doomed streams without end; it is killed while steady's transfer runs.
    let doomed_ns = doomed.ns();
    let _stream = std::thread::spawn(move || {
        in_netns(&doomed_ns, || {
            if let Ok(mut s) = connect(to) {
                let _ = send_pattern(&mut s, 9, 1 << 40);
            }
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let steady_ns = steady.ns();
    let upload =
        std::thread::spawn(move || in_netns(&steady_ns, || upload_to_sink(to, 10, 64 << 20)));
    std::thread::sleep(Duration::from_millis(100));
    drop(doomed);
    upload.join().expect("steady's upload");
    // The doomed member is gone: its address, name and port.
    n.assert_left("n6", "doomed (10.95.0.101)", 2, Duration::from_secs(20));
    drop((server, steady));
}

#[test]
fn run_modes_none_host_and_container() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    // none: only lo.
    let f = n.cli(&["run", "--network", "none", "--", "ip", "-o", "link"]);
    f.assert_success();
    assert_eq!(f.stdout.lines().count(), 1, "{f}");
    assert!(f.stdout.contains(": lo:"), "{f}");
    // host: usernet's own network namespace (H here).
    let f = n.cli(&["run", "--network", "host", "--", "ip", "-o", "addr"]);
    f.assert_success();
    assert!(f.stdout.contains(&HOST_ADDR.to_string()), "{f}");
    // container:PID: a member's namespace, with its address, reaching another member.
    n.create(&["n7", "--subnet", "10.96.0.0/24"]);
    let a = n.run_member("n7", "a", &[]);
    let b = n.run_member("n7", "b", &[]);
    let spec = format!("container:{}", a.pid);
    let f = n.cli(&[
        "run",
        "--network",
        &spec,
        "--",
        "sh",
        "-c",
        "ip -o addr; ping -c 1 -W 10 10.96.0.101",
    ]);
    f.assert_success();
    assert!(f.stdout.contains("10.96.0.100/24"), "{f}");
    // Member options make no sense there.
    let f = n.cli(&["run", "--network", "none", "--name", "x", "--", "true"]);
    assert!(
        !f.success() && f.stderr.contains("need a usernet network"),
        "{f}"
    );
    let f = n.cli(&[
        "run",
        "--network",
        "host",
        "--mac",
        "02:00:00:00:00:07",
        "--",
        "true",
    ]);
    assert!(
        !f.success() && f.stderr.contains("--mac and -p need a usernet network"),
        "{f}"
    );
    let f = n.cli(&["network", "create", "host"]);
    assert!(!f.success(), "{f}");
    drop((a, b));
}

#[test]
fn one_member_cannot_take_more_flows_than_its_share() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n8", "--subnet", "10.97.0.0/24", "--max-member-flows", "4"]);
    let greedy = n.run_member("n8", "greedy", &[]);
    let modest = n.run_member("n8", "modest", &[]);
    let echo = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    // greedy holds its four flows open; the fifth is refused.
    let held: Vec<_> = in_netns(&greedy.ns(), || {
        (0..4)
            .map(|i| connect(echo.addr).unwrap_or_else(|e| panic!("flow {i}: {e}")))
            .collect()
    });
    in_netns(&greedy.ns(), || {
        assert!(connect(echo.addr).is_err(), "a fifth flow was let through")
    });
    // The other member is not affected.
    in_netns(&modest.ns(), || echo_once(echo.addr, b"fair"));
    let sock = n.run.join("usernet").join("n8.sock");
    let stats = n.cli(&["stats", "-a", sock.to_str().unwrap()]);
    assert!(
        stats.stdout.contains("counters.member_flow_limit 1"),
        "{stats}"
    );
    drop(held);
    drop((greedy, modest));
}

#[test]
fn ports_published_to_a_named_member_through_the_network() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n9", "--subnet", "10.98.0.0/24"]);
    let a = n.run_member("n9", "a", &[]);
    let b = n.run_member("n9", "b", &["--alias", "web"]);
    let server_port = 8080;
    let host_port = 19080 + (std::process::id() % 1000) as u16;
    let spec = format!("{host_port}:{server_port}");
    let sink = TcpServer::sink(
        &b.ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, server_port),
    );
    // The member by alias: the port goes to b's address.
    let f = n.cli(&["ports", "--network", "n9", "add", &spec, "--member", "web"]);
    f.assert_success();
    assert!(f.stdout.contains("10.98.0.101"), "{f}");
    in_netns(&t.world_ns(), || {
        upload_to_sink(SocketAddrV4::new(HOST_ADDR, host_port), 7, 1 << 20)
    });
    assert_eq!(sink.stats.wait_digests(1, Duration::from_secs(20)).len(), 1);
    let jb = n.member_json("n9", "b");
    let id = jb["published_ports"][0]["id"].clone();
    assert_eq!(jb["published_ports"][0]["host_port"], host_port, "{jb}");
    // No such member, and --member without --network: refused.
    let f = n.cli(&[
        "ports",
        "--network",
        "n9",
        "add",
        "1:1",
        "--member",
        "nobody",
    ]);
    assert!(
        !f.status.is_some_and(|s| s.success()) && f.stderr.contains("nobody"),
        "{f}"
    );
    let f = n.cli(&["ports", "add", "1:1", "--member", "b"]);
    assert!(!f.status.is_some_and(|s| s.success()), "{f}");
    // Removed through the network: b publishes nothing any more.
    n.cli(&["ports", "--network", "n9", "remove", &id.to_string()])
        .assert_success();
    let jb = n.member_json("n9", "b");
    assert_eq!(jb["published_ports"], serde_json::json!([]), "{jb}");
    drop((a, b));
}

#[test]
fn a_chosen_gateway_address_is_the_route_out_and_names_still_resolve() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    // Not a host address of the subnet, or the DNS forwarder's: refused.
    for bad in ["10.99.1.1", "10.99.0.0", "10.99.0.255", "10.99.0.3"] {
        let f = n.cli(&[
            "network",
            "create",
            "bad",
            "--subnet",
            "10.99.0.0/24",
            "--gateway",
            bad,
        ]);
        assert!(!f.status.is_some_and(|s| s.success()), "{f}");
    }
    n.create(&["n10", "--subnet", "10.99.0.0/24", "--gateway", "10.99.0.1"]);
    assert_eq!(n.inspect("n10")["gateway"], "10.99.0.1");
    let a = n.run_member("n10", "a", &[]);
    let b = n.run_member("n10", "b", &[]);
    // The member's default route is the chosen address, which answers; net+2 does not.
    let route = std::fs::read_to_string(format!("/proc/{}/net/route", a.pid)).unwrap();
    // Gateway 10.99.0.1 as /proc/net/route prints it (little-endian hex).
    assert!(route.contains("0100630A"), "{route}");
    assert!(ping(&a.ns(), "10.99.0.1"));
    assert!(!ping_briefly(&a.ns(), "10.99.0.2"));
    // Through it: the world, the host's loopback, and names from the network's DNS.
    let world = TcpServer::echo(&t.world_ns(), SocketAddrV4::new(WORLD, 0));
    let host = TcpServer::echo(&t.host_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    in_netns(&a.ns(), || echo_once(world.addr, b"out"));
    in_netns(&a.ns(), || {
        echo_once(
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), host.addr.port()),
            b"lo",
        )
    });
    let r = resolve(&a.ns(), Ipv4Addr::new(10, 99, 0, 3), "b", QTYPE_A).expect("name b");
    assert!(has_record(&r, &[10, 99, 0, 101]));
    drop((a, b));
}

/// `sh -c CMD` in the network namespace `ns`, to completion.
fn sh_in(ns: &str, cmd: &str) -> Finished {
    let mut c = Command::new("nsenter");
    c.args([&format!("--net={ns}"), "sh", "-c", cmd]);
    run_with_timeout(c, Duration::from_secs(10))
}

#[test]
fn chosen_ipv6_and_mac_addresses_are_the_members_own() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&[
        "n11",
        "--subnet",
        "10.100.0.0/24",
        "--subnet6",
        "fd42:11::/64",
    ]);
    let mac = "02:42:ac:11:00:99";
    let a = n.run_member("n11", "a", &["--ip6", "fd42:11::beef", "--mac", mac]);
    let b = n.run_member("n11", "b", &[]);
    let ja = n.member_json("n11", "a");
    assert_eq!(
        ip6(&ja),
        "fd42:11::beef".parse::<Ipv6Addr>().unwrap(),
        "{ja}"
    );
    assert_eq!(ja["mac"], mac, "{ja}");
    // a's eth0 has both.
    let link = sh_in(&a.ns(), "ip -o link show eth0");
    assert!(
        link.stdout.contains(&format!("link/ether {mac} ")),
        "{link}"
    );
    let addrs = sh_in(&a.ns(), "ip -o -6 addr show dev eth0");
    assert!(addrs.stdout.contains("fd42:11::beef/64"), "{addrs}");
    // b reaches a at that address (ND and the switch both know it), ping and TCP.
    assert!(ping(&b.ns(), "fd42:11::beef"));
    let sink6 = TcpServer6::sink(&a.ns(), SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    let to_a6 = SocketAddrV6::new(ip6(&ja), sink6.addr.port(), 0, 0);
    in_netns(&b.ns(), || upload_to_sink6(to_a6, 11, 1 << 20));
    assert_eq!(
        sink6.stats.peer_ips6(),
        vec![ip6(&n.member_json("n11", "b"))]
    );
    // b's neighbour table has a's chosen MAC for both of a's addresses.
    assert!(ping(&b.ns(), &ip4(&ja).to_string()));
    let neigh = sh_in(&b.ns(), "ip neigh show dev eth0");
    for addr in [ip4(&ja).to_string(), "fd42:11::beef".into()] {
        assert!(
            neigh
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("{addr} ")) && l.contains(mac)),
            "{addr}: {neigh}"
        );
    }
    // Another member cannot have them.
    for opt in [["--mac", mac], ["--ip6", "fd42:11::beef"]] {
        let f = n.cli(&["run", "--network", "n11", opt[0], opt[1], "--", "true"]);
        assert!(!f.success() && f.stderr.contains("in use"), "{f}");
    }
    drop((a, b));
}

#[test]
fn connect_by_pid_joins_its_namespace_and_leaves_with_the_process() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n12", "--subnet", "10.101.0.0/24"]);
    let a = n.run_member("n12", "a", &[]);
    // A process in C that usernet did not start.
    let m = sleep_marker();
    let holder = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &[&m]));
    let pid = wait_for(Duration::from_secs(10), || sleepers(&m).first().copied())
        .expect("the sleeper in C never started");
    let f = n.cli(&[
        "network",
        "connect",
        "n12",
        &pid.to_string(),
        "--name",
        "bypid",
    ]);
    f.assert_success();
    assert!(
        t.container_addrs("eth0").contains("10.101.0.101"),
        "{}",
        t.container_addrs("eth0")
    );
    assert!(ping(&a.ns(), "10.101.0.101"));
    assert!(ping(&t.container_ns(), "10.101.0.100"));
    assert_eq!(
        n.member_json("n12", "bypid")["namespace"],
        pid.to_string().as_str()
    );
    // The process ends: the member leaves (the namespace, a named one, stays).
    drop(holder);
    n.assert_left("n12", "bypid (10.101.0.101)", 1, Duration::from_secs(20));
    let gone = || {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &t.container, "link", "show", "eth0"]);
        (!run_with_timeout(cmd, Duration::from_secs(5)).success()).then_some(())
    };
    assert!(
        wait_for(Duration::from_secs(20), gone).is_some(),
        "eth0 still in the namespace"
    );
    drop(a);
}

/// Runs busybox udhcpc on eth0 in `ns` once; the lease it got as `ip=... router=...`.
fn udhcpc_lease(t: &Topology, ns: &str, tag: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let out = t.tmp.join(format!("{tag}.lease"));
    let script = t.tmp.join(format!("{tag}.script"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n  \
             echo \"ip=$ip router=$router dns=$dns subnet=$subnet\" > {}\n;;\nesac\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = script.to_string_lossy().into_owned();
    let udhcpc = [
        "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-A", "1", "-s", &script,
    ];
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={ns}"));
    if which("udhcpc").is_some() {
        c.args(udhcpc);
    } else {
        c.arg("busybox").args(udhcpc);
    }
    let f = run_with_timeout(c, Duration::from_secs(30));
    f.assert_success();
    std::fs::read_to_string(&out).unwrap_or_else(|_| panic!("udhcpc got no lease:\n{f}"))
}

#[test]
fn a_members_dhcp_client_gets_its_own_address_never_a_static_one() {
    if !require(
        which("udhcpc").is_some() || which("busybox").is_some(),
        "neither `udhcpc` nor `busybox` is installed",
    ) {
        return;
    }
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n14", "--subnet", "10.103.0.0/24"]);
    // s holds the first address of the DHCP pool (net+15) as its static --ip.
    let s = n.run_member("n14", "s", &["--ip", "10.103.0.15"]);
    let a = n.run_member("n14", "a", &[]);
    for (m, tag, want) in [(&a, "a", "10.103.0.100"), (&s, "s", "10.103.0.15")] {
        let lease = udhcpc_lease(&t, &m.ns(), tag);
        assert!(lease.contains(&format!("ip={want} ")), "{tag}: {lease}");
        assert!(lease.contains("router=10.103.0.2 "), "{tag}: {lease}");
        assert!(lease.contains("dns=10.103.0.3 "), "{tag}: {lease}");
        assert!(lease.contains("subnet=255.255.255.0"), "{tag}: {lease}");
    }
    // Both still reach each other at their assigned addresses.
    assert!(ping(&a.ns(), "10.103.0.15"));
    drop((a, s));
}

/// Sends an ICMPv6 message to all nodes on eth0 from `ns`, hop limit 255, from eth0's
/// link-local address (the kernel fills in the checksum).
fn send_icmp6_to_all_nodes(ns: &str, msg: &[u8]) {
    use nix::sys::socket::{
        sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType, SockaddrIn6,
    };
    use std::os::fd::AsRawFd;
    in_netns(ns, || {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::IcmpV6,
        )
        .expect("raw ICMPv6 socket");
        setsockopt(&fd, sockopt::Ipv6MulticastHops, &255).expect("hop limit");
        let index = nix::net::if_::if_nametoindex("eth0").expect("eth0");
        let to = SocketAddrV6::new("ff02::1".parse().unwrap(), 0, 0, index);
        sendto(
            fd.as_raw_fd(),
            msg,
            &SockaddrIn6::from(to),
            MsgFlags::empty(),
        )
        .expect("send the ICMPv6 message");
    });
}

#[test]
fn a_member_cannot_be_the_others_router_or_dhcp_server() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n13", "--subnet", "10.102.0.0/24", "--ipv6"]);
    let rogue = n.run_member("n13", "rogue", &[]);
    let b = n.run_member("n13", "b", &[]);
    assert!(ping(&b.ns(), "10.102.0.100"));
    let routes = |ns: &str| sh_in(ns, "ip -6 route show; ip -6 addr show").stdout;
    let before = routes(&b.ns());
    // b listens where a DHCP client does.
    let dhcp_client = in_netns(&b.ns(), || {
        udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))
    });
    dhcp_client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    // The rogue advertises itself as the default router with a prefix for SLAAC...
    let mut ra = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    ra.extend_from_slice(&[
        3, 4, 64, 0xc0, 0, 0, 0x0e, 0x10, 0, 0, 0x0e, 0x10, 0, 0, 0, 0,
    ]);
    ra.extend_from_slice(&"2001:db8:99::".parse::<Ipv6Addr>().unwrap().octets());
    for _ in 0..3 {
        send_icmp6_to_all_nodes(&rogue.ns(), &ra);
    }
    // ...and offers an address to everyone, as a DHCP server does (port 67 -> 68).
    in_netns(&rogue.ns(), || {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67));
        s.set_broadcast(true).unwrap();
        let mut offer = vec![2u8, 1, 6, 0];
        offer.resize(300, 0);
        s.send_to(&offer, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68))
            .expect("send the offer");
    });
    let mut buf = [0u8; 512];
    let got = dhcp_client.recv_from(&mut buf);
    assert!(got.is_err(), "b received the rogue's DHCP offer: {got:?}");
    // Dropped at the rogue's port and counted: all four, once the switch has seen them.
    let dropped = n.wait_port_counter("n13", "rogue", "drop_rogue_router", 4);
    // b's routes and addresses are unchanged: no default route or prefix from the rogue.
    let after = routes(&b.ns());
    assert!(
        !after.contains("proto ra") && !after.contains("2001:db8:99"),
        "before:\n{before}\nafter:\n{after}"
    );
    let stats = n.cli(&["stats", "--network", "n13"]);
    assert!(
        stats
            .stdout
            .contains(&format!("counters.drop_rogue_router {dropped}")),
        "{stats}"
    );
    // The rogue's ordinary traffic still flows.
    assert!(ping(&rogue.ns(), "10.102.0.101"));
    drop((rogue, b));
}

/// How long the network socket gives a client to send its request (`REQUEST_TIMEOUT` in
/// src/network.rs): usernet closes a silent client no earlier than that after its connect.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches `clients`, control clients that never send a request, until `stop` is set: for
/// each, when it ended (end of file, an error, or bytes from the server) and how many bytes
/// it got. The instant is taken when poll returns, so it is never before the real end.
fn watch_silent_clients(
    clients: Vec<UnixStream>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Option<(Instant, usize)>>> {
    std::thread::spawn(move || {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::io::Read;
        use std::os::fd::AsFd;
        let mut ended: Vec<Option<(Instant, usize)>> = vec![None; clients.len()];
        while !stop.load(Ordering::SeqCst) {
            let open: Vec<usize> = (0..clients.len()).filter(|&i| ended[i].is_none()).collect();
            if open.is_empty() {
                break;
            }
            let mut fds: Vec<PollFd> = open
                .iter()
                .map(|&i| PollFd::new(clients[i].as_fd(), PollFlags::POLLIN))
                .collect();
            let _ = poll(&mut fds, PollTimeout::from(20u16));
            let woke = Instant::now();
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            for (&i, ready) in open.iter().zip(ready) {
                if !ready {
                    continue;
                }
                let mut buf = [0u8; 64];
                match (&clients[i]).read(&mut buf) {
                    Ok(n) => ended[i] = Some((woke, n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => ended[i] = Some((woke, 0)),
                }
            }
        }
        ended
    })
}

/// Control clients that connect and send nothing stall no member: the network's socket is
/// read without blocking the loop that switches the members' frames. Member traffic flows
/// and another client's request is answered while three silent clients hold the socket,
/// and none of them is answered or closed before the socket's request timeout, counted
/// from its connect: nothing waited for their requests. (Before, the loop read each
/// request blocking, for up to 2 s per client.)
#[test]
fn a_silent_control_client_does_not_stall_the_members() {
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["n9", "--subnet", "10.96.0.0/24"]);
    let a = n.run_member("n9", "a", &[]);
    let b = n.run_member("n9", "b", &[]);
    let echo = UdpEcho::start(&b.ns(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 101), echo.addr.port());
    // Warm-up: the members know each other's MAC addresses.
    in_netns(&a.ns(), || {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        udp_roundtrip(&s, to, b"warm-up", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    let path = n.run.join("usernet").join("n9.sock");
    // Before the connects: usernet's timer for each starts later still.
    let t0 = Instant::now();
    let silent: Vec<UnixStream> = (0..3)
        .map(|_| {
            let s = UnixStream::connect(&path)
                .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = watch_silent_clients(silent, stop.clone());
    in_netns(&a.ns(), || {
        let s = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        for i in 0..50u32 {
            let msg = format!("while silent clients wait {i}");
            udp_roundtrip(&s, to, msg.as_bytes(), 3).unwrap_or_else(|e| panic!("{e}"));
        }
    });
    let reply = api_request(&path, r#"{"execute":"members"}"#, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("members on {}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert_eq!(v["return"].as_array().map(Vec::len), Some(2), "{reply}");
    stop.store(true, Ordering::SeqCst);
    let ended = watch.join().expect("the watching thread");
    for (i, end) in ended.into_iter().enumerate() {
        match end {
            // Still waiting for its request: nothing read it, nothing closed it.
            None => {}
            Some((at, 0)) => assert!(
                at.duration_since(t0) >= REQUEST_TIMEOUT,
                "silent client {i} was closed {:.2?} after its connect, before the \
                 {REQUEST_TIMEOUT:?} request timeout",
                at.duration_since(t0)
            ),
            Some((_, got)) => panic!("silent client {i} was answered ({got} bytes)"),
        }
    }
}

/// A member joining just as the network's serving process ends (its last member gone)
/// gets a new serving process. The ending server is played by the test: it holds the
/// network's lock, accepts and closes connections without answering (as a server does
/// between deciding to exit and exiting), then unlinks its socket and, a moment later,
/// lets the lock go.
#[test]
fn a_member_joining_as_the_server_ends_gets_a_new_server() {
    use std::os::unix::net::UnixListener;
    let Some(t) = Topology::new() else { return };
    let n = Nets::new(&t);
    n.create(&["late", "--subnet", "10.98.0.0/24"]);
    let dir = n.run.join("usernet");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("late.lock"))
        .unwrap();
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .unwrap_or_else(|(_, e)| panic!("lock: {e}"));
    let sock = dir.join("late.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let ending = std::thread::spawn(move || {
        // The joining member's probe and its `reserve` each find a server that closes
        // without a word.
        for _ in 0..2 {
            let (c, _) = listener.accept().expect("accept");
            drop(c);
        }
        std::fs::remove_file(&sock).unwrap();
        drop(listener);
        std::thread::sleep(Duration::from_millis(300));
        drop(lock);
    });
    let m = n.run_member("late", "m", &[]);
    ending.join().expect("the ending server");
    assert_eq!(
        ip4(&n.member_json("late", "m")),
        Ipv4Addr::new(10, 98, 0, 100)
    );
    assert!(ping(&m.ns(), "10.98.0.2"), "the new server routes");
    drop(m);
}
