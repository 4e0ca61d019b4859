//! Pod-to-pod figures across two usernetes-style nodes joined by flannel's VXLAN.
//!
//! # Theory of operation
//!
//! For each run, MTU and engine, six fresh namespaces: two hosts joined by a veth
//! (172.31.0.1 and .2, MTU 65520, a default route to an address nobody holds, so nothing
//! leaves them), a node on each served by the engine running in its host, and a pod in
//! each node. The engines:
//! - usernet, slirp4netns: slirp4netns's command line (`-c --mtu M -a API --netns-type=path
//!   NODE tap0`), 8472/udp published with `add_hostfwd` on the API socket; the node is
//!   10.0.2.100;
//! - usernet-pasta (usernet named `pasta`), pasta: `--config-net -m M -u 8472 -t none -T
//!   none -U none -P PIDFILE --netns NODE`; the node holds a copy of its host's address.
//!
//! Each node then gets flannel's setup, as `tests/vxlan.rs` builds it: `flannel.1` (VXLAN
//! id 1, local = the node's address, dstport 8472, nolearning, its checksum offload left
//! on as the kernel makes it), a static FDB entry and neighbour for the other node's
//! device pointing at the other *host*, a route to the other pod network, the bridge
//! `cni0` and a pod on a veth, all at the MTU less VXLAN's 50 bytes.
//!
//! Figure: `pod_tcp`, iperf3 from pod A to pod B (Gbit/s received): every byte crosses
//! node A's VXLAN device, engine A's host socket, the hosts' veth, engine B's published
//! port and node B's VXLAN device. An engine that cannot carry it (a pod's kernel drops
//! segments whose inner checksum was never finished) shows `fail`. `FIGURES=pod_tcp` (or
//! `vxlan`) measures this table alone; `ENGINES` picks its engines. Everything is torn
//! down after each engine, also on error.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{c2c, sys};

/// The engines compared.
pub const ENGINES: [&str; 4] = ["usernet", "usernet-pasta", "slirp4netns", "pasta"];

/// The rows.
pub const FIGS: [&str; 1] = ["pod_tcp"];

/// The hosts' addresses on their link.
const HOSTS: [&str; 2] = ["172.31.0.1", "172.31.0.2"];

/// Programs for the engines.
pub struct Bins<'a> {
    /// usernet.
    pub usernet: &'a Path,
    /// slirp4netns, if installed.
    pub slirp4netns: Option<&'a Path>,
    /// pasta, if installed.
    pub pasta: Option<&'a Path>,
}

/// One engine's two hosts, nodes and pods, torn down on drop (and by the harness's
/// clean-up on a signal: everything is registered with [`sys::Guard`]).
struct Cluster {
    /// Namespaces: host, node, pod of side 0, then of side 1.
    ns: Vec<String>,
    /// Engines attached by slirp4netns's command line.
    procs: Vec<sys::ChildProc>,
    /// Directories, namespaces and detached (pasta-like) engines, undone newest first.
    guards: Vec<sys::Guard>,
    /// Work directory (API sockets, pid files, the `pasta` link).
    dir: PathBuf,
}

impl Cluster {
    fn host(&self, i: usize) -> &str {
        &self.ns[3 * i]
    }
    fn node(&self, i: usize) -> &str {
        &self.ns[3 * i + 1]
    }
    fn pod(&self, i: usize) -> &str {
        &self.ns[3 * i + 2]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.clear();
        while let Some(g) = self.guards.pop() {
            drop(g);
        }
    }
}

/// `ip netns exec NS` + the words of `line`, checked.
fn in_ns(ns: &str, line: &str) -> Result<(), String> {
    sys::run_status(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(line.split_whitespace()),
    )
}

/// Waits up to 15 s for `ok`.
fn wait(what: &str, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(15);
    while !ok() {
        if Instant::now() > end {
            return Err(format!("{what}: not ready after 15 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `add_hostfwd` of UDP 8472 to the guest on slirp4netns's API socket `api`.
fn publish_vxlan(api: &Path) -> Result<(), String> {
    let req = r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"0.0.0.0","host_port":8472,"guest_port":8472}}"#;
    let mut s = UnixStream::connect(api).map_err(|e| format!("{}: {e}", api.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    if reply.contains("\"return\"") {
        Ok(())
    } else {
        Err(format!("add_hostfwd: {reply}"))
    }
}

/// Starts `engine` for node `i`; returns the node's address and interface for flannel.
fn start_engine(
    c: &mut Cluster,
    engine: &str,
    bins: &Bins<'_>,
    mtu: u32,
    i: usize,
) -> Result<(String, &'static str), String> {
    let (host, node) = (c.host(i).to_owned(), c.node(i).to_owned());
    let node_path = format!("/run/netns/{node}");
    let m = mtu.to_string();
    match engine {
        "usernet" | "slirp4netns" => {
            let bin = if engine == "usernet" {
                bins.usernet
            } else {
                bins.slirp4netns.ok_or("slirp4netns not installed")?
            };
            let api = c.dir.join(format!("api{i}.sock"));
            let child = sys::ChildProc::spawn(
                Command::new("ip")
                    .args(["netns", "exec", &host])
                    .arg(bin)
                    .args(["-c", "--mtu", &m, "-a"])
                    .arg(&api)
                    .args(["--netns-type=path", &node_path, "tap0"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
                engine,
            )?;
            c.procs.push(child);
            let link = || {
                Command::new("ip")
                    .args(["-n", &node, "-4", "-o", "addr", "show", "dev", "tap0"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("10.0.2.100"))
            };
            wait(engine, || api.exists() && link())?;
            publish_vxlan(&api)?;
            Ok(("10.0.2.100".into(), "tap0"))
        }
        _ => {
            let bin = if engine == "pasta" {
                bins.pasta.ok_or("pasta not installed")?.to_path_buf()
            } else {
                let link = c.dir.join("pasta");
                if !link.exists() {
                    std::os::unix::fs::symlink(bins.usernet, &link).map_err(|e| e.to_string())?;
                }
                link
            };
            let pidfile = c.dir.join(format!("pasta{i}.pid"));
            let out = sys::run(
                Command::new("ip")
                    .args(["netns", "exec", &host])
                    .arg(&bin)
                    .args(["--runas", "0", "--config-net", "-m", &m])
                    .args(["-u", "8472", "-t", "none"])
                    .args(["-T", "none", "-U", "none", "--quiet", "-P"])
                    .arg(&pidfile)
                    .args(["--netns", &node_path]),
                Duration::from_secs(20),
            )?;
            let pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                if let Some(start) = sys::proc_start_time(pid) {
                    c.guards
                        .push(sys::Guard::new(sys::Item::Proc { pid, start }));
                }
            }
            if !out.ok() {
                return Err(format!("{engine}: {}", out.why()));
            }
            Ok((HOSTS[i].into(), "hx"))
        }
    }
}

/// Builds the cluster for `engine` at node MTU `mtu`.
fn cluster(engine: &str, bins: &Bins<'_>, mtu: u32) -> Result<Cluster, String> {
    let id = std::process::id();
    let tag = match engine {
        "usernet" => "u",
        "usernet-pasta" => "up",
        "slirp4netns" => "s",
        _ => "p",
    };
    let dir = std::env::temp_dir().join(format!("anchors-vxlan-{id}-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut c = Cluster {
        ns: Vec::new(),
        procs: Vec::new(),
        guards: vec![sys::Guard::new(sys::Item::Dir(dir.clone()))],
        dir,
    };
    for side in 0..2 {
        for role in ["h", "n", "p"] {
            let ns = format!("vx{id}{tag}{role}{side}");
            sys::sh("ip", &["netns", "add", &ns])?;
            c.guards.push(sys::Guard::new(sys::Item::Netns(ns.clone())));
            c.ns.push(ns.clone());
            sys::sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // The engine's resolv.conf (`ip netns exec` mounts it): nothing off the machine.
        let etc = PathBuf::from(format!("/etc/netns/{}", c.host(side)));
        std::fs::create_dir_all(&etc).map_err(|e| e.to_string())?;
        c.guards.push(sys::Guard::new(sys::Item::Dir(etc.clone())));
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")
            .map_err(|e| e.to_string())?;
    }
    let (h0, h1) = (c.host(0).to_owned(), c.host(1).to_owned());
    sys::sh(
        "ip",
        &[
            "-n", &h0, "link", "add", "hx", "mtu", "65520", "type", "veth", "peer", "name", "hx",
            "mtu", "65520", "netns", &h1,
        ],
    )?;
    for (h, addr) in [(&h0, HOSTS[0]), (&h1, HOSTS[1])] {
        let a = format!("{addr}/24");
        sys::sh("ip", &["-n", h, "addr", "add", &a, "dev", "hx"])?;
        sys::sh("ip", &["-n", h, "link", "set", "hx", "up"])?;
        sys::sh(
            "ip",
            &[
                "-n",
                h,
                "route",
                "add",
                "default",
                "via",
                "172.31.0.254",
                "dev",
                "hx",
            ],
        )?;
    }
    let mut links = Vec::new();
    for i in 0..2 {
        links.push(start_engine(&mut c, engine, bins, mtu, i)?);
    }
    let fmtu = mtu - 50;
    for (i, (ip, dev)) in links.iter().enumerate() {
        let (node, pod) = (c.node(i).to_owned(), c.pod(i).to_owned());
        let (n, pn) = (i, 1 - i);
        let (mac, peer_mac) = (
            format!("0e:00:00:00:00:{:02x}", 0xa + n),
            format!("0e:00:00:00:00:{:02x}", 0xa + pn),
        );
        for line in [
            "sysctl -q -w net.ipv4.ip_forward=1".to_owned(),
            format!(
                "ip link add flannel.1 address {mac} type vxlan id 1 local {ip} dev {dev} \
                 dstport 8472 nolearning"
            ),
            format!("ip link set flannel.1 mtu {fmtu} up"),
            format!("ip addr add 10.244.{n}.0/32 dev flannel.1"),
            format!("ip route add 10.244.{pn}.0/24 via 10.244.{pn}.0 dev flannel.1 onlink"),
            format!("ip neigh replace 10.244.{pn}.0 lladdr {peer_mac} dev flannel.1 nud permanent"),
            format!(
                "bridge fdb append {peer_mac} dev flannel.1 dst {}",
                HOSTS[pn]
            ),
            "ip link add cni0 type bridge".to_owned(),
            format!("ip addr add 10.244.{n}.1/24 dev cni0"),
            "ip link set cni0 up".to_owned(),
            format!("ip link add veth0 mtu {fmtu} type veth peer name eth0 mtu {fmtu} netns {pod}"),
            "ip link set veth0 master cni0 up".to_owned(),
        ] {
            in_ns(&node, &line)?;
        }
        for line in [
            format!("ip addr add 10.244.{n}.2/24 dev eth0"),
            "ip link set eth0 up".to_owned(),
            format!("ip route add default via 10.244.{n}.1"),
        ] {
            in_ns(&pod, &line)?;
        }
    }
    Ok(c)
}

/// One engine at one MTU: pod A -> pod B, Gbit/s.
fn measure(engine: &str, bins: &Bins<'_>, mtu: u32, secs: u64) -> Result<f64, String> {
    let c = cluster(engine, bins, mtu)?;
    c2c::iperf(
        c.pod(0),
        c.pod(1),
        std::net::Ipv4Addr::new(10, 244, 1, 2),
        secs,
    )
}

/// The pod-to-pod table in Markdown, medians of `runs`, for `engines` (of [`ENGINES`]).
pub fn table(bins: &Bins<'_>, runs: usize, secs: u64, mtus: &[u32], engines: &[&str]) -> String {
    let mut out = String::from("\n### Pods of two nodes joined by flannel VXLAN (pod_tcp)\n");
    for &mtu in mtus {
        let mut samples = vec![Vec::new(); engines.len()];
        let mut errors = Vec::new();
        for run in 0..runs {
            for (e, engine) in engines.iter().enumerate() {
                eprintln!("[vxlan run {}/{runs}] {engine} MTU {mtu}", run + 1);
                match measure(engine, bins, mtu, secs) {
                    Ok(v) => {
                        eprintln!("    pod_tcp    {v:.2}");
                        samples[e].push(v);
                    }
                    Err(err) => errors.push(format!("{engine} MTU {mtu}: {err}")),
                }
            }
        }
        let cells: Vec<String> = samples
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                let fails = runs - v.len();
                match (v.get(v.len() / 2), fails) {
                    (Some(m), 0) => format!("{m:.2}"),
                    (Some(m), f) => format!("{m:.2} ({f}/{runs} fail)"),
                    (None, _) => "fail".into(),
                }
            })
            .collect();
        out.push_str(&format!(
            "\n#### node MTU {mtu}, flannel MTU {}\n\n| figure | unit | {} |\n|---|---|{}\n\
             | pod_tcp | Gbit/s ↑ | {} |\n",
            mtu - 50,
            engines.join(" | "),
            "---:|".repeat(engines.len()),
            cells.join(" | ")
        ));
        errors.dedup();
        for e in errors {
            out.push_str(&format!("\n- {e}"));
        }
        out.push('\n');
    }
    out.push_str(
        "\npod_tcp: iperf3 pod -> pod across two nodes, each node's network served by the \
         engine on its own host, flannel's VXLAN (offloads as the kernel sets them) between \
         them: node A's flannel.1 -> engine A -> hosts' veth -> engine B's published \
         8472/udp -> node B's flannel.1.\n",
    );
    out
}
