//! usernet as the node network of a rootless Kubernetes (usernetes): two nodes joined by
//! flannel's VXLAN, each node a namespace served by usernet on its own "host".
//!
//! ```text
//!  host A (Topology a's H)          veth hx 172.31.0.1/24 <--> 172.31.0.2/24 hx   host B
//!   usernet: node A on tap0 (slirp4netns mode, ports by the API) or hx (pasta mode, -t/-u)
//!   node A (a's C)                                              node B (b's C)
//!    flannel.1 vxlan id 1 dstport 8472 nolearning                flannel.1 ...
//!      fdb: B's MAC -> 172.31.0.2, neigh 10.244.1.0/fd44:1::ffff  fdb: A's MAC -> 172.31.0.1
//!    cni0 bridge 10.244.0.1/24 fd44:0::1/64                      cni0 10.244.1.1/24 fd44:1::1/64
//!    pod A (namespace, veth) 10.244.0.2 fd44:0::2                 pod B 10.244.1.2 fd44:1::2
//! ```
//!
//! As flannel sets it up: the VXLAN device's local address is the node's, its peers are
//! the other *hosts'* addresses, where usernet publishes UDP 8472 into the node. A pod's
//! packet to the other pod is encapsulated by node A's kernel and leaves through usernet
//! A's host socket to host B's port 8472, which usernet B delivers into node B.
//!
//! With the kernel's default offloads on `flannel.1`, the inner TCP/UDP checksum reaches
//! usernet still partial; usernet must finish it (see `stack::csum`), or pod B's kernel
//! drops every segment. Each case checks ping, TCP both ways (payloads compared by
//! SHA-256), IPv6 TCP, and UDP echo, with `flannel.1`'s checksum offload on (default) and
//! off (`ethtool -K flannel.1 tx-checksum-ip-generic off`), at flannel MTU 65470 (node
//! MTU 65520 less VXLAN's 50) and 1450. The `vxlan_over_ipv6_` cases add flannel's
//! dual-stack device: the hosts also get 2001:db8:31::1 and ::2, usernet publishes 8472
//! over IPv6 too, and inner IPv6 crosses `flannel-v6.1`, a VXLAN over IPv6 between the
//! nodes' IPv6 addresses and the hosts' (MTUs 65450 and 1430). The NodePort-style case
//! publishes a TCP port on host A into node A, where a user-space proxy (socat, as
//! kube-proxy's userspace mode) reaches pod B over VXLAN; the DNAT case sends pod B to
//! node A's API server through a service address (iptables in node B, as kube-proxy and
//! flannel). The `node_containers` cases use usernetes' own layout: usernet serves the
//! container engine's namespace, where a bridge, Docker's masquerade and its DNAT of
//! 8472/udp stand between usernet's TAP and the node container (10.100.N.2) that runs
//! flannel. Nothing leaves the test's namespaces: the hosts' only other routes lead to
//! each other.
//!
//! `USERNET_TEST_BIN=/usr/bin/slirp4netns` runs the slirp4netns-mode cases against the
//! real slirp4netns (usernet's counters are then not read): it passes the direct layout
//! and fails the container layout with the offload on, as usernetes' udev rule says
//! (the engine's NAT spoils the outer checksum of offloaded VXLAN, flannel-io/flannel#1279).

mod util;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use util::*;

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
/// The hosts' default gateway: an address nobody holds (pasta mode copies the route).
const LINK_GW: &str = "172.31.0.254";
const VXLAN_PORT: u16 = 8472;
const NODE_MTU: u32 = 65520;
const BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Slirp,
    Pasta,
}

/// A named namespace deleted on drop (the pods').
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// One side: its host/node topology and its pod.
struct Side {
    /// The node's pod network index: 10.244.N.0/24, fd44:N::/64.
    n: u8,
    host_addr: Ipv4Addr,
    /// The node's namespace: the one usernet serves, or a container behind it.
    node: String,
    pod: String,
}

impl Side {
    fn node_ns(&self) -> String {
        netns_path(&self.node)
    }
    fn pod_ns(&self) -> String {
        netns_path(&self.pod)
    }
    fn pod4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.n, 2)
    }
    fn pod6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd44, u16::from(self.n), 0, 0, 0, 0, 0, 2)
    }
    fn mac(&self) -> String {
        format!("0e:00:00:00:00:{:02x}", 0xa + self.n)
    }
    /// `flannel-v6.1`'s MAC address (VXLAN over IPv6).
    fn mac6(&self) -> String {
        format!("0e:00:00:00:06:{:02x}", 0xa + self.n)
    }
    /// The host's IPv6 address on the hosts' link.
    fn host_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 1 + u16::from(self.n))
    }
}

/// Two hosts, their nodes served by usernet, flannel between them, one pod each.
/// Field order is drop order: processes first, then pods, then the topologies.
struct Cluster {
    usernets: Vec<Usernet>,
    pastas: Vec<Pasta>,
    relays: Vec<ChildGuard>,
    _pods: Vec<Netns>,
    sides: [Side; 2],
    apis: Vec<std::path::PathBuf>,
    topos: [Topology; 2],
    mode: Mode,
    /// flannel's dual-stack setup: inner IPv6 crosses `flannel-v6.1`, a VXLAN over IPv6
    /// between the hosts' IPv6 addresses (inner IPv4 keeps `flannel.1` over IPv4).
    underlay6: bool,
    /// usernetes' own layout: the namespace usernet serves is the container engine's
    /// (RootlessKit's), and the node is a container behind it, on a bridge, reached
    /// through the engine's DNAT of 8472/udp and leaving through its masquerade.
    in_container: bool,
}

/// `ip netns exec NS ARGS`, panicking with the output on failure.
#[track_caller]
fn ns_sh(ns: &str, args: &[&str]) -> Finished {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    let f = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(f.success(), "in {ns}: {f}");
    f
}

/// [`ns_sh`] with the words of `line`.
#[track_caller]
fn ns_line(ns: &str, line: &str) -> Finished {
    ns_sh(ns, &line.split_whitespace().collect::<Vec<_>>())
}

/// `add_hostfwd` of `port` on `host_addr` to the same port of the guest (`0.0.0.0`: its
/// 10.0.2.100; `::`: its IPv6 address, over IPv6).
fn add_hostfwd(api: &Path, proto: &str, host_addr: &str, port: u16) {
    let guest = if host_addr.contains(':') {
        String::new()
    } else {
        r#","guest_addr":"10.0.2.100""#.to_owned()
    };
    let req = format!(
        r#"{{"execute":"add_hostfwd","arguments":{{"proto":"{proto}","host_addr":"{host_addr}","host_port":{port}{guest},"guest_port":{port}}}}}"#
    );
    let reply =
        api_request(api, &req, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{req}: {e}"));
    assert!(reply.contains("\"return\""), "{req}: {reply}");
}

impl Cluster {
    fn new(mode: Mode, underlay6: bool, in_container: bool) -> Option<Cluster> {
        if !require_tool("ethtool") || !require_tool("ping") || !require_tool("bridge") {
            return None;
        }
        let vxlan = Path::new("/sys/module/vxlan").exists()
            || Command::new("modprobe")
                .arg("vxlan")
                .status()
                .is_ok_and(|s| s.success());
        if !require(vxlan, "the kernel has no vxlan module") {
            return None;
        }
        let a = Topology::new()?;
        let b = Topology::new()?;
        // The hosts' link: their only route besides their own subnets, so nothing leaves.
        ip(&[
            "-n", &a.host, "link", "add", "hx", "mtu", "65520", "type", "veth", "peer", "name",
            "hx", "mtu", "65520", "netns", &b.host,
        ]);
        for (t, addr) in [(&a, HOST_A), (&b, HOST_B)] {
            ip(&[
                "-n",
                &t.host,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "hx",
            ]);
            ip(&["-n", &t.host, "link", "set", "hx", "up"]);
            ip(&[
                "-n", &t.host, "route", "add", "default", "via", LINK_GW, "dev", "hx",
            ]);
        }
        let hosts6 = [(&a, "2001:db8:31::1/64"), (&b, "2001:db8:31::2/64")];
        for (t, addr) in hosts6.into_iter().filter(|_| underlay6) {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &t.host,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.hx.disable_ipv6=0",
                ],
            );
            ip(&[
                "-n", &t.host, "-6", "addr", "add", addr, "dev", "hx", "nodad",
            ]);
            ip(&[
                "-n",
                &t.host,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:31::fe",
                "dev",
                "hx",
            ]);
        }
        let sides = [
            Side {
                n: 0,
                host_addr: HOST_A,
                node: if in_container {
                    a.host.replace('h', "k")
                } else {
                    a.container.clone()
                },
                pod: a.host.replace('h', "p"),
            },
            Side {
                n: 1,
                host_addr: HOST_B,
                node: if in_container {
                    b.host.replace('h', "k")
                } else {
                    b.container.clone()
                },
                pod: b.host.replace('h', "p"),
            },
        ];
        let mut c = Cluster {
            usernets: Vec::new(),
            pastas: Vec::new(),
            relays: Vec::new(),
            _pods: Vec::new(),
            sides,
            apis: Vec::new(),
            topos: [a, b],
            mode,
            underlay6,
            in_container,
        };
        for i in 0..2 {
            c.start_node_network(i);
        }
        for i in 0..2 {
            if in_container {
                c.setup_engine_nat(i);
            }
            c.setup_node(i);
        }
        Some(c)
    }

    /// usernet for node `i`, with UDP 8472 and TCP 6443 published from its host.
    fn start_node_network(&mut self, i: usize) {
        let t = &self.topos[i];
        match self.mode {
            Mode::Slirp => {
                let api = t.tmp.join("api.sock");
                let api_s = api.to_str().expect("utf-8 path").to_owned();
                let mtu = NODE_MTU.to_string();
                let mut args = vec!["-c", "--mtu", &mtu, "-a", &api_s];
                if self.underlay6 {
                    args.push("-6");
                }
                let u = UsernetCmd::new(t).args(args).start();
                for (proto, port) in [("udp", VXLAN_PORT), ("tcp", 6443), ("tcp", 30080)] {
                    add_hostfwd(&api, proto, "0.0.0.0", port);
                }
                if self.underlay6 {
                    add_hostfwd(&api, "udp", "::", VXLAN_PORT);
                }
                self.usernets.push(u);
                self.apis.push(api);
            }
            Mode::Pasta => {
                let ns = t.container_ns();
                let p = Pasta::start(
                    t,
                    &[
                        "--config-net",
                        "-t",
                        "6443,30080",
                        "-u",
                        "8472",
                        "-T",
                        "none",
                        "-U",
                        "none",
                        "--quiet",
                        "--netns",
                        &ns,
                    ],
                );
                self.pastas.push(p);
            }
        }
    }

    /// The node's IPv6 address, for `flannel-v6.1`.
    fn node_addr6(&self, i: usize) -> String {
        match self.mode {
            Mode::Slirp => "fd00::100".into(),
            Mode::Pasta => self.sides[i].host_addr6().to_string(),
        }
    }

    /// The VXLAN devices of each node.
    fn vxlan_devs(&self) -> &'static [&'static str] {
        if self.underlay6 {
            &["flannel.1", "flannel-v6.1"]
        } else {
            &["flannel.1"]
        }
    }

    /// The node's address and interface, as flannel would find them.
    fn node_link(&self, i: usize) -> (String, &'static str) {
        match (self.in_container, self.mode) {
            (true, _) => (format!("10.100.{}.2", self.sides[i].n), "eth0"),
            (false, Mode::Slirp) => ("10.0.2.100".into(), "tap0"),
            (false, Mode::Pasta) => (self.sides[i].host_addr.to_string(), "hx"),
        }
    }

    /// usernetes' layout for side `i`: in the engine's namespace (the one usernet serves)
    /// a bridge with the node container on a veth (10.100.N.2, MTU 65520, as a compose
    /// network with that MTU), forwarding, Docker's masquerade of the containers' traffic
    /// and its DNAT of the published 8472/udp to the node.
    fn setup_engine_nat(&mut self, i: usize) {
        let engine = self.topos[i].container.clone();
        let (node, n) = (self.sides[i].node.clone(), self.sides[i].n);
        ip(&["netns", "add", &node]);
        self._pods.push(Netns(node.clone()));
        for line in [
            "sysctl -q -w net.ipv4.ip_forward=1".to_owned(),
            "ip link add br-u7s mtu 65520 type bridge".to_owned(),
            format!("ip addr add 10.100.{n}.1/24 dev br-u7s"),
            "ip link set br-u7s up".to_owned(),
            format!(
                "ip link add veth-u7s mtu 65520 type veth peer name eth0 mtu 65520 netns {node}"
            ),
            "ip link set veth-u7s master br-u7s up".to_owned(),
            format!("iptables -t nat -A POSTROUTING -s 10.100.{n}.0/24 ! -o br-u7s -j MASQUERADE"),
            format!(
                "iptables -t nat -A PREROUTING ! -i br-u7s -p udp --dport 8472 -j DNAT \
                 --to-destination 10.100.{n}.2:8472"
            ),
        ] {
            ns_line(&engine, &line);
        }
        for line in [
            "ip link set lo up".to_owned(),
            format!("ip addr add 10.100.{n}.2/24 dev eth0"),
            "ip link set eth0 up".to_owned(),
            format!("ip route add default via 10.100.{n}.1"),
        ] {
            ns_line(&node, &line);
        }
    }

    /// flannel's VXLAN device(s), the bridge and the pod in node `i`.
    fn setup_node(&mut self, i: usize) {
        let (me, peer) = (&self.sides[i], &self.sides[1 - i]);
        let node = me.node.as_str();
        let (node_ip, dev) = self.node_link(i);
        let (n, pn) = (me.n, peer.n);
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            ns_sh(node, &["sysctl", "-q", "-w", kv]);
        }
        let run = |line: String| ns_line(node, &line);
        // flannel.1: VXLAN over IPv4 between the hosts; inner IPv4, and inner IPv6 too
        // unless flannel-v6.1 carries it.
        let (v6dev, mac6, peer_mac6) = if self.underlay6 {
            ("flannel-v6.1", me.mac6(), peer.mac6())
        } else {
            ("flannel.1", me.mac(), peer.mac())
        };
        run(format!(
            "ip link add flannel.1 address {} type vxlan id 1 local {node_ip} dev {dev} \
             dstport 8472 nolearning",
            me.mac()
        ));
        if self.underlay6 {
            run(format!(
                "ip link add flannel-v6.1 address {mac6} type vxlan id 1 local {} dev {dev} \
                 dstport 8472 nolearning",
                self.node_addr6(i)
            ));
            run(format!(
                "bridge fdb append {peer_mac6} dev flannel-v6.1 dst {}",
                peer.host_addr6()
            ));
            run("ip link set flannel-v6.1 up".into());
        }
        run(format!("ip addr add 10.244.{n}.0/32 dev flannel.1"));
        run(format!("ip addr add fd44:{n}::ffff/128 dev {v6dev} nodad"));
        run("ip link set flannel.1 up".into());
        run(format!(
            "ip route add 10.244.{pn}.0/24 via 10.244.{pn}.0 dev flannel.1 onlink"
        ));
        run(format!(
            "ip neigh replace 10.244.{pn}.0 lladdr {} dev flannel.1 nud permanent",
            peer.mac()
        ));
        run(format!(
            "ip -6 route add fd44:{pn}::/64 via fd44:{pn}::ffff dev {v6dev} onlink"
        ));
        run(format!(
            "ip -6 neigh replace fd44:{pn}::ffff lladdr {peer_mac6} dev {v6dev} nud permanent"
        ));
        run(format!(
            "bridge fdb append {} dev flannel.1 dst {}",
            peer.mac(),
            peer.host_addr
        ));
        // The bridge and the pod.
        run("ip link add cni0 type bridge".into());
        run(format!("ip addr add 10.244.{n}.1/24 dev cni0"));
        run(format!("ip addr add fd44:{n}::1/64 dev cni0 nodad"));
        run("ip link set cni0 up".into());
        let pod = me.pod.clone();
        ip(&["netns", "add", &pod]);
        self._pods.push(Netns(pod.clone()));
        for kv in [
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            sh("ip", &["netns", "exec", &pod, "sysctl", "-q", "-w", kv]);
        }
        run(format!(
            "ip link add veth0 type veth peer name eth0 netns {pod}"
        ));
        run("ip link set veth0 master cni0 up".into());
        let pod_ip = |line: String| ip(&line.split_whitespace().collect::<Vec<_>>());
        pod_ip(format!("-n {pod} link set lo up"));
        pod_ip(format!("-n {pod} addr add 10.244.{n}.2/24 dev eth0"));
        pod_ip(format!("-n {pod} addr add fd44:{n}::2/64 dev eth0 nodad"));
        pod_ip(format!("-n {pod} link set eth0 up"));
        pod_ip(format!("-n {pod} route add default via 10.244.{n}.1"));
        pod_ip(format!("-n {pod} -6 route add default via fd44:{n}::1"));
    }

    /// flannel's MTU on its VXLAN devices and the pod links.
    fn set_flannel_mtu(&self, mtu: u32) {
        let m = mtu.to_string();
        for s in &self.sides {
            for dev in self.vxlan_devs().iter().chain(&["veth0", "cni0"]) {
                ns_sh(&s.node, &["ip", "link", "set", dev, "mtu", &m]);
            }
            ip(&["-n", &s.pod, "link", "set", "eth0", "mtu", &m]);
        }
    }

    /// The VXLAN devices' checksum offload on (the kernel's default) or off, in both nodes.
    fn set_offload(&self, on: bool) {
        let v = if on { "on" } else { "off" };
        for s in &self.sides {
            for dev in self.vxlan_devs() {
                ns_sh(
                    &s.node,
                    &["ethtool", "-K", dev, "tx-checksum-ip-generic", v],
                );
            }
        }
    }

    /// Packets node A's VXLAN devices have sent.
    fn tx_packets(&self) -> Vec<u64> {
        let node = &self.sides[0].node;
        self.vxlan_devs()
            .iter()
            .map(|dev| {
                let path = format!("/sys/class/net/{dev}/statistics/tx_packets");
                let f = ns_sh(node, &["cat", &path]);
                f.stdout.trim().parse().expect("a packet count")
            })
            .collect()
    }

    /// `usernet` A's counters (slirp4netns mode only: pasta mode has no API socket).
    /// None either when another binary stands in (`USERNET_TEST_BIN`, for comparison).
    fn stats(&self, i: usize) -> Option<UsernetStats> {
        if std::env::var_os("USERNET_TEST_BIN").is_some() {
            return None;
        }
        self.apis.get(i).map(|a| get_stats(a))
    }
}

fn ping(from: &Side, to: &str) -> Finished {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns", "exec", &from.pod, "ping", "-c", "1", "-w", "10", to,
    ]);
    run_with_timeout(cmd, Duration::from_secs(20))
}

/// Ping, TCP both ways (IPv4) and A to B (IPv6), UDP echo of sizes up to the pod MTU.
fn exercise(c: &Cluster, mtu: u32, what: &str) {
    let [a, b] = &c.sides;
    for (from, to) in [
        (a, b.pod4().to_string()),
        (b, a.pod4().to_string()),
        (a, b.pod6().to_string()),
    ] {
        let f = ping(from, &to);
        assert!(f.success(), "{what}: ping {to} from pod {}: {f}", from.n);
    }
    let mut seed = u64::from(mtu) * 10;
    for (from, to) in [(a, b), (b, a)] {
        seed += 1;
        let sink = TcpServer::sink(&to.pod_ns(), SocketAddrV4::new(to.pod4(), 0));
        let addr = sink.addr;
        eprintln!("{what}: TCP pod {} -> pod {} ({addr})", from.n, to.n);
        in_netns(&from.pod_ns(), || upload_to_sink(addr, seed, BYTES));
    }
    let sink6 = TcpServer6::sink(&b.pod_ns(), SocketAddrV6::new(b.pod6(), 0, 0, 0));
    let addr6 = sink6.addr;
    eprintln!("{what}: TCP/IPv6 pod 0 -> pod 1 ({addr6})");
    in_netns(&a.pod_ns(), || upload_to_sink6(addr6, seed + 1, BYTES));
    let echo = UdpEcho::start(&b.pod_ns(), SocketAddrV4::new(b.pod4(), 0));
    let dst = echo.addr;
    let biggest = mtu as usize - 28;
    in_netns(&a.pod_ns(), || {
        let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        for size in [1, 1000, biggest] {
            udp_roundtrip(&sock, dst, &pattern(seed + size as u64, size), 3)
                .unwrap_or_else(|e| panic!("{what}: UDP {size} bytes pod 0 -> {dst}: {e}"));
        }
    });
    let echo6 = UdpEcho6::start(&b.pod_ns(), SocketAddrV6::new(b.pod6(), 0, 0, 0));
    let dst6 = echo6.addr;
    in_netns(&a.pod_ns(), || {
        let sock = UdpSocket::bind("[::]:0").expect("bind udp6");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        udp_roundtrip6(&sock, dst6, &pattern(seed + 7, 1200), 3)
            .unwrap_or_else(|e| panic!("{what}: UDP/IPv6 pod 0 -> {dst6}: {e}"));
    });
}

/// Every combination of the VXLAN devices' checksum offload and MTU, in `mode`; with
/// `underlay6`, inner IPv6 crosses a VXLAN over IPv6 (flannel's dual stack), whose 20
/// more bytes of header the MTUs leave room for.
fn pods_talk_across_nodes(mode: Mode, underlay6: bool, in_container: bool) {
    if in_container && !require_tool("iptables") {
        return;
    }
    let Some(c) = Cluster::new(mode, underlay6, in_container) else {
        return;
    };
    let mtus = if underlay6 {
        [NODE_MTU - 70, 1430]
    } else {
        [NODE_MTU - 50, 1450]
    };
    for mtu in mtus {
        c.set_flannel_mtu(mtu);
        for offload in [true, false] {
            c.set_offload(offload);
            let what = format!(
                "{mode:?} mode, IPv6 underlay {underlay6}, node in a container \
                 {in_container}, flannel MTU {mtu}, checksum offload {offload}"
            );
            let before = c.stats(0);
            let sent = c.tx_packets();
            exercise(&c, mtu, &what);
            // Every VXLAN device carried its share (flannel-v6.1: the inner IPv6).
            for ((dev, was), now) in c.vxlan_devs().iter().zip(sent).zip(c.tx_packets()) {
                assert!(now > was + 100, "{what}: {dev} sent {} packets", now - was);
            }
            if let (Some(s0), Some(s1)) = (before, c.stats(0)) {
                let finished = s1.delta(&s0, "counters.csum_finished");
                // With the offload on, node A's kernel left the inner checksums to usernet;
                // with it off, it finished them itself.
                assert_eq!(
                    finished > 0,
                    offload,
                    "{what}: {finished} checksums finished"
                );
                assert_eq!(s1.delta(&s0, "counters.drop_csum_offsets"), 0, "{what}");
            }
        }
    }
    let mut c = c;
    for u in &mut c.usernets {
        u.assert_running();
    }
}

#[test]
fn vxlan_pods_talk_across_nodes_slirp4netns_mode() {
    pods_talk_across_nodes(Mode::Slirp, false, false);
}

#[test]
fn vxlan_pods_talk_across_nodes_pasta_mode() {
    pods_talk_across_nodes(Mode::Pasta, false, false);
}

#[test]
fn vxlan_over_ipv6_pods_talk_across_nodes_slirp4netns_mode() {
    pods_talk_across_nodes(Mode::Slirp, true, false);
}

#[test]
fn vxlan_over_ipv6_pods_talk_across_nodes_pasta_mode() {
    pods_talk_across_nodes(Mode::Pasta, true, false);
}

/// usernetes' own layout: the node is a container behind the engine's bridge, DNAT and
/// masquerade, in the namespace usernet serves (the offloaded VXLAN datagrams cross the
/// engine's NAT before they reach usernet's TAP).
#[test]
fn vxlan_node_containers_talk_across_hosts_slirp4netns_mode() {
    pods_talk_across_nodes(Mode::Slirp, false, true);
}

#[test]
fn vxlan_node_containers_talk_across_hosts_pasta_mode() {
    pods_talk_across_nodes(Mode::Pasta, false, true);
}

/// A NodePort-style published port: a client on host B reaches, through host A's
/// published TCP port 30080 and a user-space proxy in node A (kube-proxy's userspace mode),
/// a server in pod B over VXLAN, checksum offload on; the node's own TCP crosses the
/// tunnel too. 6443 likewise reaches an API-server stand-in in node A.
fn node_port_reaches_pod_on_other_node(mode: Mode) {
    if !require_tool("socat") {
        return;
    }
    let Some(mut c) = Cluster::new(mode, false, false) else {
        return;
    };
    c.set_flannel_mtu(1450);
    let b = &c.sides[1];
    let sink = TcpServer::sink(&b.pod_ns(), SocketAddrV4::new(b.pod4(), 0));
    let target = format!("TCP:{}", sink.addr);
    let node_a = c.sides[0].node.clone();
    let listen = |port: u16| format!("TCP-LISTEN:{port},reuseaddr,fork");
    let mut proxy = Command::new("ip");
    proxy.args(["netns", "exec", &node_a, "socat", &listen(30080), &target]);
    c.relays.push(ChildGuard::spawn(proxy));
    let api_server = TcpServer::sink(
        &netns_path(&node_a),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6443),
    );
    let ready = wait_for(Duration::from_secs(10), || {
        in_netns(&netns_path(&node_a), || {
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, 30080)).ok()
        })
    });
    assert!(ready.is_some(), "the node's proxy did not listen");
    // The probe connection reached the sink too: it sends nothing, the sink counts it.
    drop(ready);
    for (port, what) in [
        (30080u16, "NodePort 30080 -> pod B"),
        (6443, "6443 -> node A"),
    ] {
        // A remote client: host B.
        let to = SocketAddrV4::new(HOST_A, port);
        eprintln!("{mode:?} mode: {what} via {to}");
        in_netns(&c.topos[1].host_ns(), || {
            upload_to_sink(to, 4242 + u64::from(port), BYTES)
        });
    }
    drop(api_server);
}

#[test]
fn vxlan_node_port_reaches_pod_on_other_node_slirp4netns_mode() {
    node_port_reaches_pod_on_other_node(Mode::Slirp);
}

#[test]
fn vxlan_node_port_reaches_pod_on_other_node_pasta_mode() {
    node_port_reaches_pod_on_other_node(Mode::Pasta);
}

/// A pod reaching the API server of another node through a service address, as
/// kube-proxy and flannel set it up: in node B, a DNAT of the `kubernetes` service
/// (10.96.0.1:443) to host A's published 6443 and flannel's masquerade of pod traffic
/// leaving the pod network; pod B's connection leaves through usernet B and reaches a
/// stand-in API server in node A through host A's published port.
fn pod_reaches_api_server_through_dnat(mode: Mode) {
    if !require_tool("iptables") {
        return;
    }
    let Some(c) = Cluster::new(mode, false, false) else {
        return;
    };
    c.set_flannel_mtu(1450);
    let api_server = TcpServer::sink(
        &c.sides[0].node_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6443),
    );
    let dnat = format!("{HOST_A}:6443");
    for rule in [
        format!(
            "iptables -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT \
             --to-destination {dnat}"
        ),
        "iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE"
            .to_owned(),
    ] {
        ns_line(&c.sides[1].node, &rule);
    }
    let service = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
    eprintln!("{mode:?} mode: pod B -> {service} -> DNAT {dnat}");
    in_netns(&c.sides[1].pod_ns(), || {
        upload_to_sink(service, 0x6443, BYTES)
    });
    // The API server saw host B: the connection left node B through usernet B.
    assert_eq!(api_server.stats.peer_ips(), vec![HOST_B]);
}

#[test]
fn vxlan_pod_reaches_api_server_through_dnat_slirp4netns_mode() {
    pod_reaches_api_server_through_dnat(Mode::Slirp);
}

#[test]
fn vxlan_pod_reaches_api_server_through_dnat_pasta_mode() {
    pod_reaches_api_server_through_dnat(Mode::Pasta);
}
