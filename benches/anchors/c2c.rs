//! Member-to-member figures: several namespaces on one switch, for usernet's networks, a
//! kernel bridge with veth pairs, and VDE.
//!
//! # Theory of operation
//!
//! For each run, MTU and engine, [`MEMBERS`] fresh namespaces are attached to one switch:
//! - usernet: `usernet network create` (private `XDG_*` directories) and `usernet network
//!   connect` per namespace; the host is reached through the gateway (`net+2`);
//! - kernel: a bridge in a namespace of its own, a veth pair per member, the host side's
//!   address on the bridge;
//! - vde: `vde_switch` and, in every member and the host namespace, `vde_plug tap://`.
//!
//! Figures: `c2c_tcp` (iperf3 member 0 -> member 1), `c2c_rr` (1-byte TCP ping-pong
//! between them, one way = RTT/2), `tcp_out_8` (iperf3 member 0 -> the host while the
//! other seven are attached), `tcp_out_4x` (members 0 to 3 each run iperf3 to a server of
//! its own on the host side, all four released together after every server listens: the sum
//! of their rates over the common window, what one event loop serving several members can
//! carry) and, for usernet only, `member_rss_kib` (the memory an idle member costs: the
//! VmRSS of the network's serving process with all members attached minus with the first
//! one, divided by the members added, before any traffic).
//! `FIGURES` may name single figures of this table (`FIGURES=member_rss_kib`: nothing
//! else is measured) and `ENGINES` its engines (`usernet`, `kernel`, `vde`).
//! Everything is torn down after each engine, also on error.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::sys;

/// Namespaces on the switch.
pub const MEMBERS: usize = 8;

/// The engines compared.
pub const ENGINES: [&str; 3] = ["usernet", "kernel", "vde"];

/// The rows.
pub const FIGS: [&str; 5] = [
    "c2c_tcp",
    "c2c_rr",
    "tcp_out_8",
    "tcp_out_4x",
    "member_rss_kib",
];

/// Members streaming to the host at once in `tcp_out_4x`.
const STREAMS: usize = 4;

/// One engine's members, torn down on drop.
struct Net {
    /// Namespace names; member `i` is `ns[i]`, the host side `host`.
    ns: Vec<String>,
    host: String,
    /// Member addresses.
    addr: Vec<Ipv4Addr>,
    /// Where members reach the host side.
    host_addr: Ipv4Addr,
    /// Processes to end (by PID) and files to remove.
    pids: Vec<i32>,
    dir: PathBuf,
    /// usernet: the serving process's VmRSS growth per member added to the first, KiB.
    member_rss_kib: Option<Result<f64, String>>,
}

impl Drop for Net {
    fn drop(&mut self) {
        // The daemons we started (their pid files name the process before it forked): the
        // ones whose command line names our private directory.
        let mark = self.dir.to_string_lossy().into_owned();
        let ours = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                String::from_utf8_lossy(&cmd).contains(&mark).then_some(pid)
            });
        for pid in self.pids.iter().copied().chain(ours) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for ns in self.ns.iter().chain(std::iter::once(&self.host)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    sys::sh("ip", args)
}

fn new_net(tag: &str) -> Result<Net, String> {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("anchors-c2c-{id}-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut net = Net {
        ns: Vec::new(),
        host: format!("c2c{id}{tag}h"),
        addr: Vec::new(),
        host_addr: Ipv4Addr::UNSPECIFIED,
        pids: Vec::new(),
        dir,
        member_rss_kib: None,
    };
    ip(&["netns", "add", &net.host])?;
    ip(&["-n", &net.host, "link", "set", "lo", "up"])?;
    for i in 0..MEMBERS {
        let ns = format!("c2c{id}{tag}m{i}");
        ip(&["netns", "add", &ns])?;
        net.ns.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    Ok(net)
}

fn usernet(bin: &Path, mtu: u32) -> Result<Net, String> {
    let mut net = new_net("u")?;
    let env = [
        ("XDG_CONFIG_HOME", net.dir.join("cfg")),
        ("XDG_RUNTIME_DIR", net.dir.join("run")),
    ];
    let run = |args: &[&str]| -> Result<(), String> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &net.host]).arg(bin).args(args);
        for (k, v) in &env {
            c.env(k, v);
        }
        sys::run_status(&mut c)
    };
    let run_dir = net.dir.join("run");
    let mtu_s = mtu.max(1280).to_string();
    run(&[
        "network",
        "create",
        "bench",
        "--subnet",
        "10.248.0.0/24",
        "--mtu",
        &mtu_s,
    ])?;
    let mut first = None;
    for i in 0..MEMBERS {
        let path = format!("/run/netns/{}", net.ns[i]);
        run(&[
            "network",
            "connect",
            "bench",
            &path,
            "--name",
            &format!("m{i}"),
        ])?;
        net.addr.push(Ipv4Addr::new(10, 248, 0, 100 + i as u8));
        if i == 0 {
            first = Some(server_rss_kib(&run_dir));
        }
    }
    let all = server_rss_kib(&run_dir);
    net.member_rss_kib = Some(match (first, all) {
        (Some(Ok(first)), Ok(all)) => {
            eprintln!(
                "    serving process VmRSS: {first} KiB with 1 member, {all} KiB with {MEMBERS}"
            );
            Ok((all - first) / (MEMBERS - 1) as f64)
        }
        (Some(Err(e)), _) | (_, Err(e)) => Err(e),
        (None, _) => Err("no member".into()),
    });
    net.host_addr = Ipv4Addr::new(10, 248, 0, 2);
    Ok(net)
}

/// The VmRSS, in KiB, of the serving process of network `bench` whose runtime directory
/// (`XDG_RUNTIME_DIR`) is `run_dir`, once its last request has settled.
fn server_rss_kib(run_dir: &Path) -> Result<f64, String> {
    std::thread::sleep(Duration::from_millis(300));
    let env_mark = format!("XDG_RUNTIME_DIR={}\0", run_dir.display());
    let pid = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| {
            let (Ok(cmd), Ok(env)) = (
                std::fs::read(e.path().join("cmdline")),
                std::fs::read(e.path().join("environ")),
            ) else {
                return false;
            };
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            has(&cmd, b"\0network\0serve\0bench\0") && has(&env, env_mark.as_bytes())
        })
        .ok_or("no serving process found")?
        .path();
    let status = std::fs::read_to_string(pid.join("status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {}/status", pid.display()))
}

fn kernel(mtu: u32) -> Result<Net, String> {
    let mut net = new_net("k")?;
    let h = net.host.clone();
    let m = mtu.to_string();
    ip(&["-n", &h, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &h, "link", "set", "br0", "mtu", &m, "up"])?;
    ip(&["-n", &h, "addr", "add", "10.249.0.1/24", "dev", "br0"])?;
    for i in 0..MEMBERS {
        let (ns, v) = (net.ns[i].clone(), format!("v{i}"));
        ip(&[
            "-n", &h, "link", "add", &v, "mtu", &m, "type", "veth", "peer", "name", "eth0", "mtu",
            &m, "netns", &ns,
        ])?;
        ip(&["-n", &h, "link", "set", &v, "master", "br0", "up"])?;
        let a = Ipv4Addr::new(10, 249, 0, 10 + i as u8);
        ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        net.addr.push(a);
    }
    net.host_addr = Ipv4Addr::new(10, 249, 0, 1);
    Ok(net)
}

fn vde(mtu: u32) -> Result<Net, String> {
    let mut net = new_net("v")?;
    let sock = net.dir.join("sw");
    let pidfile = net.dir.join("sw.pid");
    sys::run_status(
        Command::new("vde_switch")
            .args(["-d", "-s"])
            .arg(&sock)
            .arg("-p")
            .arg(&pidfile),
    )?;
    let pid = |f: &Path| -> Result<i32, String> {
        for _ in 0..100 {
            if let Some(p) = std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Ok(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("no pid in {}", f.display()))
    };
    net.pids.push(pid(&pidfile)?);
    let url = format!("vde://{}", sock.display());
    let m = mtu.min(1500).to_string();
    let mut plug = |ns: &str, a: Ipv4Addr, n: usize| -> Result<(), String> {
        let pf = net.dir.join(format!("plug{n}.pid"));
        sys::run_status(
            Command::new("ip")
                .args(["netns", "exec", ns, "vde_plug", "-d", "-p"])
                .arg(&pf)
                .args([&url, "tap://vde0"]),
        )?;
        net.pids.push(pid(&pf)?);
        for _ in 0..100 {
            if sys::sh("ip", &["-n", ns, "link", "show", "vde0"]).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&["-n", ns, "link", "set", "vde0", "mtu", &m, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", "vde0"])
    };
    let host = net.host.clone();
    plug(&host, Ipv4Addr::new(10, 247, 0, 1), MEMBERS)?;
    let names = net.ns.clone();
    for (i, ns) in names.iter().enumerate() {
        let a = Ipv4Addr::new(10, 247, 0, 10 + i as u8);
        plug(ns, a, i)?;
        net.addr.push(a);
    }
    net.host_addr = Ipv4Addr::new(10, 247, 0, 1);
    Ok(net)
}

/// iperf3 from `from` to a server in `to` at `addr`: Gbit/s received.
pub fn iperf(from: &str, to: &str, addr: Ipv4Addr, secs: u64) -> Result<f64, String> {
    let _server = iperf_server(to, 5299)?;
    iperf_client(from, addr, 5299, secs)
}

/// `tcp_out_4x`: [`STREAMS`] members stream to the host side at once, each with an iperf3
/// client of its own to a server of its own there, over the same `secs`: the sum of the
/// Gbit/s received, the aggregate the switch carries from several members at a time. All
/// servers listen before any client starts, and the clients are released together, so
/// their windows coincide up to the time it takes to start a process.
fn iperf_parallel(net: &Net, secs: u64) -> Result<f64, String> {
    let ports: Vec<u16> = (0..STREAMS as u16).map(|i| 5300 + i).collect();
    let _servers = ports
        .iter()
        .map(|&port| iperf_server(&net.host, port))
        .collect::<Result<Vec<_>, _>>()?;
    let go = Arc::new(Barrier::new(STREAMS));
    let runs: Vec<_> = ports
        .iter()
        .zip(&net.ns)
        .map(|(&port, from)| {
            let (from, addr, go) = (from.clone(), net.host_addr, go.clone());
            std::thread::spawn(move || {
                go.wait();
                iperf_client(&from, addr, port, secs)
            })
        })
        .collect();
    // Every client ends before its server is stopped.
    let results: Vec<_> = runs.into_iter().map(|r| r.join()).collect();
    let mut sum = 0.0;
    for (i, r) in results.into_iter().enumerate() {
        sum += r
            .map_err(|_| "iperf thread panicked".to_string())?
            .map_err(|e| format!("member {i}: {e}"))?;
    }
    Ok(sum)
}

/// A one-test iperf3 server in namespace `ns` on `port`, listening
/// ([`crate::figures::iperf_server`]: no connection to find out, which would use up its
/// one test).
fn iperf_server(ns: &str, port: u16) -> Result<sys::ChildProc, String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "iperf3"]);
    crate::figures::iperf_server(cmd, port)
}

/// iperf3 from namespace `from` to the server at `addr`, `port` for `secs`: Gbit/s received.
fn iperf_client(from: &str, addr: Ipv4Addr, port: u16, secs: u64) -> Result<f64, String> {
    let out = sys::run(
        Command::new("ip").args([
            "netns",
            "exec",
            from,
            "iperf3",
            "-c",
            &addr.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ]),
        Duration::from_secs(secs + 20),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("iperf3: {}", sys::last_lines(&out.stdout, 5)))
}

/// 1-byte TCP ping-pong from `from` to a server in `to`: mean one-way µs.
fn rr(from: &str, to: &str, addr: Ipv4Addr, secs: u64) -> Result<f64, String> {
    let listener = sys::in_netns(
        Path::new(&format!("/run/netns/{to}")),
        Duration::from_secs(5),
        || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
                .map_err(|e| e.to_string())
        },
    )?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let server = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
        }
    });
    let dst = SocketAddrV4::new(addr, port);
    let res = sys::in_netns(
        Path::new(&format!("/run/netns/{from}")),
        Duration::from_secs(secs + 10),
        move || -> Result<f64, String> {
            let mut c = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
                .map_err(|e| format!("connect {dst}: {e}"))?;
            let _ = c.set_nodelay(true);
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let (start, mut n) = (Instant::now(), 0u64);
            let mut b = [1u8; 1];
            while start.elapsed() < Duration::from_secs(secs.min(3)) {
                c.write_all(&b).map_err(|e| e.to_string())?;
                c.read_exact(&mut b).map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok(start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64 / 2.0)
        },
    )?;
    let _ = server.join();
    Ok(res)
}

/// One figure of one engine: `None` when it was not asked for or does not apply.
type Cell = Option<Result<f64, String>>;

/// One engine at one MTU: the figures of [`FIGS`] that `want` names.
fn measure(
    engine: &str,
    bin: &Path,
    mtu: u32,
    secs: u64,
    want: &[&str],
) -> Result<[Cell; 5], String> {
    let mut net = match engine {
        "usernet" => usernet(bin, mtu)?,
        "kernel" => kernel(mtu)?,
        _ => vde(mtu)?,
    };
    let wants = |f: &str| want.contains(&f);
    let tcp = wants("c2c_tcp").then(|| iperf(&net.ns[0], &net.ns[1], net.addr[1], secs));
    let lat = wants("c2c_rr").then(|| rr(&net.ns[0], &net.ns[1], net.addr[1], secs));
    // tcp_out with the other members attached: to an iperf3 server on the host side
    // (usernet: the gateway reaches the host namespace's loopback).
    let out = wants("tcp_out_8").then(|| iperf(&net.ns[0], &net.host, net.host_addr, secs));
    let out4 = wants("tcp_out_4x").then(|| iperf_parallel(&net, secs));
    let rss = net
        .member_rss_kib
        .take()
        .filter(|_| wants("member_rss_kib"));
    Ok([tcp, lat, out, out4, rss])
}

/// The member-to-member table in Markdown, medians of `runs`, for `engines` (of
/// [`ENGINES`]) and the figures `figs` (of [`FIGS`]).
pub fn table(
    bin: &Path,
    runs: usize,
    secs: u64,
    mtus: &[u32],
    engines: &[&str],
    figs: &[&str],
) -> String {
    let mut out = String::from("\n### Members of one network (c2c)\n");
    for &mtu in mtus {
        let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); engines.len()]; FIGS.len()];
        let mut applies = vec![vec![false; engines.len()]; FIGS.len()];
        let mut errors = Vec::new();
        for run in 0..runs {
            for (e, engine) in engines.iter().enumerate() {
                eprintln!("[c2c run {}/{runs}] {engine} MTU {mtu}", run + 1);
                match measure(engine, bin, mtu, secs, figs) {
                    Ok(cells) => {
                        for (f, r) in cells.into_iter().enumerate() {
                            let Some(r) = r else { continue };
                            applies[f][e] = true;
                            match r {
                                Ok(v) => {
                                    eprintln!("    {:<10} {v:.2}", FIGS[f]);
                                    samples[f][e].push(v);
                                }
                                Err(err) => {
                                    errors.push(format!("{engine} {} MTU {mtu}: {err}", FIGS[f]))
                                }
                            }
                        }
                    }
                    Err(err) => {
                        for a in applies.iter_mut() {
                            a[e] = true;
                        }
                        errors.push(format!("{engine} MTU {mtu}: {err}"));
                    }
                }
            }
        }
        let ratio = engines.contains(&"usernet") && engines.contains(&"kernel");
        out.push_str(&format!(
            "\n#### MTU {mtu}{}\n\n| figure | unit | {} |{}\n|---|---|{}{}\n",
            if mtu > 1500 && engines.contains(&"vde") {
                " (VDE at 1500: its frames stop near 1518 bytes)"
            } else {
                ""
            },
            engines.join(" | "),
            if ratio { " usernet ÷ kernel |" } else { "" },
            "---:|".repeat(engines.len()),
            if ratio { "---:|" } else { "" },
        ));
        for (f, name) in FIGS.iter().enumerate() {
            if !figs.contains(name) {
                continue;
            }
            let unit = match *name {
                "c2c_rr" => "µs ↓",
                "member_rss_kib" => "KiB ↓",
                _ => "Gbit/s ↑",
            };
            let median = |v: &Vec<f64>| crate::median(v.clone());
            let mut cells: Vec<String> = samples[f]
                .iter()
                .zip(&applies[f])
                .map(|(v, &applies)| match median(v) {
                    Some(m) => format!("{m:.2}"),
                    None if applies => "fail".into(),
                    None => "-".into(),
                })
                .collect();
            if ratio {
                let of = |e: &str| {
                    let i = engines.iter().position(|x| *x == e)?;
                    median(&samples[f][i])
                };
                cells.push(match (of("usernet"), of("kernel")) {
                    (Some(u), Some(k)) if k > 0.0 => format!("{:.2}x", u / k),
                    _ => "-".into(),
                });
            }
            out.push_str(&format!("| {name} | {unit} | {} |\n", cells.join(" | ")));
        }
        for e in errors {
            out.push_str(&format!("\n- {e}"));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\nc2c: {MEMBERS} namespaces on one switch; c2c_tcp: iperf3 member -> member; c2c_rr: \
         1-byte TCP ping-pong member <-> member, one way; tcp_out_8: iperf3 member -> host side \
         with the other seven attached (usernet: its gateway to the host namespace); \
         tcp_out_4x: {STREAMS} members streaming to the host side at once, aggregate; \
         member_rss_kib: the VmRSS growth of usernet's serving process per idle member, \
         from one member to {MEMBERS}.\n"
    ));
    out
}
