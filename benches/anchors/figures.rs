//! The measurements, and the host-side servers they talk to.
//!
//! Bulk figures use iperf3 (a one-shot `iperf3 -s -1` per figure, so a failed figure never
//! leaves a server behind in a bad state). The ping-pong, connect-rate and idle-connection
//! figures are our own: host-side servers are threads of this process bound to the session's
//! host address, and the container-side clients are threads that `setns` into the container's
//! network namespace, so every socket they open lives there and goes through the engine.
//! Every socket has a timeout and every child process a deadline.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
use std::os::fd::AsRawFd;

use crate::engine::{Session, CONTAINER_PORT};
use crate::sys::{self, ChildProc};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings shared by all figures.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Seconds per figure.
    pub secs: u64,
    /// iperf3 `-b` for the UDP streams.
    pub udp_rate: String,
    /// Port of the host-side iperf3 server.
    pub iperf_port: u16,
    /// Idle connections for the scale figure.
    pub scale_conns: usize,
}

/// The host side of the ping-pong, connect-rate and idle-connection figures.
#[derive(Debug)]
pub struct HostServers {
    /// TCP echo (rr).
    pub rr: u16,
    /// Accept, 1 byte in, 1 byte out, close (crr).
    pub crr: u16,
    /// The same on the host's IPv6 address (crr6), if it has IPv6.
    pub crr6: Option<u16>,
    /// UDP echo (udp_rr).
    pub udp: u16,
    /// Accepts and holds connections (scale).
    pub idle: u16,
    listeners: Vec<TcpListener>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

fn tcp_server(
    bind: IpAddr,
    stop: &Arc<AtomicBool>,
    listeners: &mut Vec<TcpListener>,
    mut serve: impl FnMut(TcpStream) + Send + 'static,
) -> Result<(u16, JoinHandle<()>), String> {
    let l = TcpListener::bind((bind, 0)).map_err(|e| format!("bind {bind}: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    listeners.push(l.try_clone().map_err(|e| e.to_string())?);
    let stop = stop.clone();
    let h = thread::spawn(move || {
        for c in l.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match c {
                Ok(c) => serve(c),
                // EMFILE and the like: do not spin.
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok((port, h))
}

fn crr_serve(mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 1];
    if c.read(&mut b).unwrap_or(0) == 1 {
        let _ = c.write_all(&b);
    }
}

impl HostServers {
    /// Starts them on `bind` (ports chosen by the kernel), the crr6 server on `bind6` (none
    /// on a host without IPv6).
    pub fn start(bind: Ipv4Addr, bind6: Ipv6Addr) -> Result<HostServers, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut ls = Vec::new();
        let (rr, h) = tcp_server(bind.into(), &stop, &mut ls, |c| {
            thread::spawn(move || echo(c));
        })?;
        threads.push(h);
        let (crr, h) = tcp_server(bind.into(), &stop, &mut ls, crr_serve)?;
        threads.push(h);
        let crr6 = match tcp_server(bind6.into(), &stop, &mut ls, crr_serve) {
            Ok((port, h)) => {
                threads.push(h);
                Some(port)
            }
            Err(_) => None,
        };
        let keep = held.clone();
        let (idle, h) = tcp_server(bind.into(), &stop, &mut ls, move |c| {
            keep.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        })?;
        threads.push(h);
        let u = UdpSocket::bind((bind, 0)).map_err(|e| format!("bind udp {bind}: {e}"))?;
        let udp = u.local_addr().map_err(|e| e.to_string())?.port();
        let _ = u.set_read_timeout(Some(Duration::from_millis(200)));
        let st = stop.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            }
        }));
        Ok(HostServers {
            rr,
            crr,
            crr6,
            udp,
            idle,
            listeners: ls,
            stop,
            held,
            threads,
        })
    }

    /// How many idle connections are held.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes the held idle connections.
    pub fn release_held(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for HostServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket wakes its accept() (EINVAL).
        for l in &self.listeners {
            let _ = shutdown(l.as_raw_fd(), Shutdown::Both);
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        self.release_held();
    }
}

fn echo(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 64];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 || c.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// An iperf3 result.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    /// Received Gbit/s.
    pub gbps: f64,
    /// Received bytes.
    pub bytes: f64,
    /// UDP: lost datagrams, %.
    pub lost_pct: Option<f64>,
    /// CPU seconds the engine used meanwhile.
    pub cpu_s: Option<f64>,
}

fn parse_iperf(out: &sys::Output) -> Result<Iperf, String> {
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).map_err(|_| format!("iperf3: {}", out.why()))?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {}", e.as_str().unwrap_or("error")));
    }
    let r = &v["end"]["sum_received"];
    let gbps = r["bits_per_second"]
        .as_f64()
        .ok_or("iperf3: no end.sum_received")?
        / 1e9;
    let bytes = r["bytes"].as_f64().unwrap_or(0.0);
    // UDP loss from the bytes sent and received: iperf3's own lost_percent says 0 when nothing
    // arrived at all, and does not count datagrams lost after the last one received.
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let lost_pct = r
        .get("lost_percent")
        .filter(|_| sent > 0.0)
        .map(|_| (100.0 * (1.0 - bytes / sent)).max(0.0));
    Ok(Iperf {
        gbps,
        bytes,
        lost_pct,
        cpu_s: None,
    })
}

/// `cmd` (iperf3, in the namespace it runs in) as a one-test server on `port`, once it
/// listens (seen in its namespace's socket table, not by connecting).
pub fn iperf_server(mut cmd: Command, port: u16) -> Result<ChildProc, String> {
    cmd.args(["-s", "-1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = ChildProc::spawn(&mut cmd, "iperf3 -s")?;
    sys::wait_listen(&mut server, port, Duration::from_secs(5))?;
    Ok(server)
}

/// iperf3 from the container to the host's server: `extra` picks the direction (`-R`) or UDP.
pub fn iperf_to_host(s: &Session, ctx: &Ctx, extra: &[&str]) -> Result<Iperf, String> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-B", &s.bind.to_string()]);
    let _server = iperf_server(cmd, ctx.iperf_port)?;
    let cpu0 = s.engine_pid.and_then(sys::cpu_seconds);
    let mut client = s.cmd("iperf3");
    client
        .args([
            "-J",
            "-c",
            &s.host.to_string(),
            "-p",
            &ctx.iperf_port.to_string(),
        ])
        .args(["-t", &ctx.secs.to_string()])
        .args(extra);
    let out = sys::run(&mut client, Duration::from_secs(ctx.secs + 20))?;
    let cpu1 = s.engine_pid.and_then(sys::cpu_seconds);
    let mut r = parse_iperf(&out)?;
    r.cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    Ok(r)
}

/// Loss below which a UDP rate counts as carried (the issue's "under 1 %").
const LOSSLESS_PCT: f64 = 1.0;

/// Seconds per probe of [`udp_lossless`].
const PROBE_SECS: &str = "2";

/// Throughput of a UDP stream of `len`-byte datagrams in the sense of RFC 2544: the highest
/// offered rate carried with under 1 % loss. The offered rate doubles from 1 Gbit/s (or
/// halves) until one probe passes and one fails, then 3 bisections narrow the gap to an
/// eighth. Returns the received rate and loss of the best passing probe.
pub fn udp_lossless(s: &Session, ctx: &Ctx, len: &str) -> Result<(f64, f64), String> {
    let probe = |gbps: f64| -> Result<(f64, f64), String> {
        let rate = format!("{:.0}M", gbps * 1000.0);
        let r = iperf_to_host(
            s,
            ctx,
            &["-u", "-b", &rate, "-l", len, "-w", "4M", "-t", PROBE_SECS],
        )?;
        Ok((r.gbps, r.lost_pct.ok_or("iperf3: no loss figure")?))
    };
    let passes = |r: &(f64, f64)| r.1 < LOSSLESS_PCT;
    // (offered, result) of the best pass and the lowest failure so far.
    let mut pass: Option<(f64, (f64, f64))> = None;
    let mut fail: Option<f64> = None;
    let mut rate = 1.0;
    while pass.is_none() || fail.is_none() {
        let r = probe(rate)?;
        if passes(&r) {
            pass = Some((rate, r));
            rate *= 2.0;
            if rate > 64.0 {
                break;
            }
        } else {
            fail = Some(rate);
            if rate < 0.1 {
                return Err(format!(
                    "loses {:.1}% even at {rate:.2} Gbit/s offered",
                    r.1
                ));
            }
            rate /= 2.0;
        }
    }
    if let (Some((mut lo, _)), Some(mut hi)) = (pass, fail) {
        for _ in 0..3 {
            let mid = (lo + hi) / 2.0;
            let r = probe(mid)?;
            if passes(&r) {
                lo = mid;
                pass = Some((mid, r));
            } else {
                hi = mid;
            }
        }
    }
    pass.map(|(_, r)| r).ok_or_else(|| "no passing rate".into())
}

/// iperf3 from the host to the published 127.0.0.1 port, to a server in the container.
pub fn tcp_pub(s: &Session, ctx: &Ctx) -> Result<Iperf, String> {
    let _server = iperf_server(s.cmd("iperf3"), CONTAINER_PORT)?;
    let mut client = Command::new("iperf3");
    client
        .args(["-J", "-c", "127.0.0.1", "-p", &s.pub_port.to_string()])
        .args(["-t", &ctx.secs.to_string()]);
    let out = sys::run(&mut client, Duration::from_secs(ctx.secs + 20))?;
    parse_iperf(&out)
}

fn io<T>(r: std::io::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// The engine's CPU use over the measured part of a ping-pong: [`CpuMeter::start`] at the
/// end of the warm-up, [`CpuMeter::percent`] at the end.
struct CpuMeter {
    pid: Option<i32>,
    /// When the reading started and the engine's CPU seconds then.
    start: Option<(Instant, f64)>,
}

impl CpuMeter {
    /// A meter for the engine process `pid` (none: nothing to read), not started yet.
    fn new(pid: Option<i32>) -> CpuMeter {
        CpuMeter { pid, start: None }
    }

    /// Starts the reading: call it when the warm-up ends.
    fn start(&mut self) {
        self.start = self
            .pid
            .and_then(sys::cpu_seconds)
            .map(|cpu| (Instant::now(), cpu));
    }

    /// The engine's CPU use since [`CpuMeter::start`] in % of one CPU; `None` without an
    /// engine process, or if the reading never started.
    fn percent(&self) -> Option<f64> {
        let (t0, cpu0) = self.start?;
        let cpu1 = sys::cpu_seconds(self.pid?)?;
        Some((cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0)
    }
}

/// TCP ping-pong of 1 byte from the container, 100 round trips of warm-up and then
/// `ctx.secs` measured: the mean one-way latency (round trip / 2, as sockperf reports it),
/// µs, and the engine's CPU use meanwhile in % of one CPU (what busy polling costs; `None`
/// without an engine process).
pub fn rr(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<(f64, Option<f64>), String> {
    let addr = SocketAddr::from((s.host, srv.rr));
    let secs = Duration::from_secs(ctx.secs);
    let pid = s.engine_pid;
    sys::in_netns(&s.netns, secs + Duration::from_secs(15), move || {
        let mut cpu = CpuMeter::new(pid);
        let mut c = io(
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT),
            "connect",
        )?;
        io(c.set_nodelay(true), "nodelay")?;
        io(c.set_read_timeout(Some(IO_TIMEOUT)), "timeout")?;
        io(c.set_write_timeout(Some(IO_TIMEOUT)), "timeout")?;
        let mut b = [b'x'; 1];
        let mut once = |c: &mut TcpStream| -> Result<(), String> {
            io(c.write_all(&b), "write")?;
            io(c.read_exact(&mut b), "read")
        };
        for _ in 0..100 {
            once(&mut c)?; // warm-up
        }
        cpu.start();
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < secs {
            once(&mut c)?;
            n += 1;
        }
        let t = t0.elapsed().as_secs_f64();
        Ok((t / n as f64 / 2.0 * 1e6, cpu.percent()))
    })
}

/// Connect, 1 byte each way, close (RST, like crr.c, so the client has no TIME_WAIT pile-up),
/// sequentially from the container: connections per second.
pub fn crr(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<Crr, String> {
    crr_to(s, ctx, SocketAddr::from((s.host, srv.crr)))
}

/// [`crr`] over IPv6, to the host as the container sees it over IPv6.
pub fn crr6(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<Crr, String> {
    match (srv.crr6, s.host6()) {
        (Some(port), Some(host)) => crr_to(s, ctx, SocketAddr::from((host, port))),
        (None, _) => Err("no IPv6 on the host".into()),
        (_, None) => Err("no IPv6 in the container".into()),
    }
}

/// A crr result.
pub struct Crr {
    /// Connections per second.
    pub rate: f64,
    /// The median time of a connection's `connect()`, µs: through a relay the client
    /// sleeps until the relay has read its SYN and answered, where over veth the whole
    /// handshake runs inside the call.
    pub connect_us: f64,
    /// The client's voluntary context switches per connection: the times it slept waiting,
    /// for the reply byte (over veth, the only one) and for the `connect()` through a relay.
    pub sleeps: f64,
}

fn crr_to(s: &Session, ctx: &Ctx, addr: SocketAddr) -> Result<Crr, String> {
    let secs = Duration::from_secs(ctx.secs);
    sys::in_netns(&s.netns, secs + Duration::from_secs(30), move || {
        // One entry per connection: a few MB for the fastest engine's 5 s.
        let mut connects: Vec<Duration> = Vec::new();
        let mut one = |addr: &SocketAddr| -> std::io::Result<()> {
            let t = Instant::now();
            let mut c = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
            connects.push(t.elapsed());
            c.set_nodelay(true)?;
            setsockopt(
                &c,
                sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)
        };
        let t0 = Instant::now();
        let slept0 = voluntary_switches()?;
        let (mut n, mut fails) = (0u64, 0u64);
        let mut last_err = String::new();
        while t0.elapsed() < secs {
            match one(&addr) {
                Ok(()) => n += 1,
                Err(e) => {
                    fails += 1;
                    last_err = e.to_string();
                    if fails > 100 {
                        break;
                    }
                }
            }
        }
        if n == 0 || fails > 100 {
            return Err(format!("{n} ok, {fails} failed: {last_err}"));
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        let sleeps = (voluntary_switches()? - slept0) as f64 / n as f64;
        connects.sort_unstable();
        let connect_us = connects[connects.len() / 2].as_secs_f64() * 1e6;
        Ok(Crr {
            rate,
            connect_us,
            sleeps,
        })
    })
}

/// This thread's voluntary context switches so far: each a sleep in a blocking call.
fn voluntary_switches() -> Result<i64, String> {
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| u.voluntary_context_switches())
        .map_err(|e| format!("getrusage: {e}"))
}

/// [`crr`] with 1,000 egress rules in force (usernet only): 250 deny rules each of /32,
/// /24, /20 and /16 blocks that the flows never match, so that every connection looks up
/// four prefix lengths for both its addresses (the gateway and the host's loopback) and
/// falls through to the default. The rules go in through the API and are removed after.
pub fn crr_rules(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<Crr, String> {
    let sock = s.api_socket.as_ref().ok_or("no API socket")?;
    let mut ids = Vec::new();
    // Every rule added is removed again, whatever fails: left behind, rules would weigh
    // on every figure measured after this one.
    let out = add_rules(sock, &mut ids).and_then(|()| crr(s, ctx, srv));
    let mut removed = Ok(());
    for id in ids {
        let req = format!(r#"{{"execute":"remove_egress_rule","arguments":{{"id":{id}}}}}"#);
        if let Err(e) = crate::engine::api(sock, &req) {
            removed = Err(format!("remove_egress_rule {id}: {e}"));
        }
    }
    removed.and(out)
}

/// [`crr_rules`]'s 1,000 rules: four prefix lengths, none matching the benchmark's flows.
fn add_rules(sock: &std::path::Path, ids: &mut Vec<u32>) -> Result<(), String> {
    for k in 0..250u32 {
        for block in [
            format!("198.18.{k}.1"),
            format!("198.19.{k}.0/24"),
            format!("100.{}.{}.0/20", 64 + k / 16, (k % 16) * 16),
            format!("11.{k}.0.0/16"),
        ] {
            let req = format!(
                r#"{{"execute":"add_egress_rule","arguments":{{"rule":"deny {block} tcp"}}}}"#
            );
            let reply = crate::engine::api(sock, &req)?;
            let id = reply
                .split("\"id\":")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| format!("add_egress_rule: {}", reply.trim()))?;
            ids.push(id);
        }
    }
    Ok(())
}

/// UDP ping-pong of 1 byte from the container for `ctx.secs`, the first 100 datagrams a
/// warm-up: the mean one-way latency (round trip / 2), µs, and the engine's CPU use after
/// the warm-up in % of one CPU (`None` without an engine process). A datagram without an
/// answer within 200 ms counts as lost; more than 1 % lost fails.
pub fn udp_rr(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<(f64, Option<f64>), String> {
    let addr = SocketAddr::from((s.host, srv.udp));
    let secs = Duration::from_secs(ctx.secs);
    let pid = s.engine_pid;
    sys::in_netns(&s.netns, secs + Duration::from_secs(15), move || {
        let mut cpu = CpuMeter::new(pid);
        let u = io(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)), "bind")?;
        io(u.connect(addr), "connect")?;
        io(
            u.set_read_timeout(Some(Duration::from_millis(200))),
            "timeout",
        )?;
        let mut b = [0u8; 16];
        let (mut n, mut lost, mut sum) = (0u64, 0u64, 0f64);
        let t0 = Instant::now();
        let mut i = 0u64;
        while t0.elapsed() < secs {
            i += 1;
            if i == 101 {
                cpu.start(); // warm-up over
            }
            let t = Instant::now();
            io(u.send(b"x"), "send")?;
            match u.recv(&mut b) {
                Ok(_) if i > 100 => {
                    n += 1;
                    sum += t.elapsed().as_secs_f64();
                }
                Ok(_) => {} // warm-up
                Err(_) => {
                    lost += 1;
                    if lost > 100 {
                        break;
                    }
                }
            }
        }
        if n == 0 || lost * 100 > n + lost {
            return Err(format!("{n} answered, {lost} lost"));
        }
        Ok((sum / n as f64 / 2.0 * 1e6, cpu.percent()))
    })
}

/// The container side of the scale figure, run as `anchors --idle-client ADDR N` inside the
/// container (a process of its own: the 10,000 sockets of each side would not fit under one
/// RLIMIT_NOFILE of 20,000 without CAP_SYS_RESOURCE): opens `N` TCP connections to `ADDR`,
/// prints `ready N`, then holds them until its stdin closes.
pub fn idle_client(addr: &str, n: &str) -> std::process::ExitCode {
    let (Ok(addr), Ok(n)) = (addr.parse::<SocketAddr>(), n.parse::<usize>()) else {
        println!("error: bad arguments");
        return std::process::ExitCode::from(2);
    };
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(c) => v.push(c),
            Err(e) => {
                println!("error: idle connection {i} of {n}: {e}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    println!("ready {n}");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(v);
    std::process::ExitCode::SUCCESS
}

/// The scale figure (engines with a process): tcp_out with `ctx.scale_conns` idle TCP
/// connections open through the engine as % of tcp_out without, and the engine's RSS growth
/// per idle connection in KiB.
pub fn scale(s: &Session, ctx: &Ctx, srv: &HostServers) -> Result<(f64, f64), String> {
    let pid = s.engine_pid.ok_or("no engine process")?;
    let base = iperf_to_host(s, ctx, &[]).map_err(|e| format!("baseline tcp_out: {e}"))?;
    thread::sleep(Duration::from_millis(300));
    let rss0 = sys::rss_kib(pid).ok_or("engine exited")?;
    let n = ctx.scale_conns;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = s.cmd(&exe.to_string_lossy());
    cmd.args([
        "--idle-client",
        &format!("{}:{}", s.host, srv.idle),
        &n.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut client = ChildProc::spawn(&mut cmd, "idle client")?;
    // A shared machine: stop if the engine eats more than half of the memory available.
    let budget = sys::mem_available_kib().map_or(u64::MAX, |a| rss0 + a / 2);
    let lines = client.lines();
    let deadline = Instant::now() + Duration::from_secs(600);
    let line = loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => break l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break "error: exited".into(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let rss = sys::rss_kib(pid).unwrap_or(0);
        if rss > budget {
            break format!("stopped: the engine's RSS reached {rss} KiB");
        }
        if Instant::now() > deadline {
            break "error: no answer after 600 s".into();
        }
    };
    if line.trim() != format!("ready {n}") {
        return Err(format!("idle client: {}", line.trim()));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.held() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let held = srv.held();
    thread::sleep(Duration::from_millis(500));
    let rss1 = sys::rss_kib(pid).ok_or("engine exited")?;
    let loaded = iperf_to_host(s, ctx, &[]);
    client.close_stdin();
    let _ = client.wait_timeout(Duration::from_secs(10));
    drop(client);
    srv.release_held();
    if held < n {
        return Err(format!(
            "only {held} of {n} idle connections reached the host"
        ));
    }
    let loaded = loaded.map_err(|e| format!("tcp_out with {n} idle connections: {e}"))?;
    Ok((
        loaded.gbps / base.gbps * 100.0,
        rss1.saturating_sub(rss0) as f64 / n as f64,
    ))
}
