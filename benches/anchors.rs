//! `cargo bench --bench anchors`: usernet side by side with slirp4netns, pasta and kernel veth.
//!
//! # Theory of operation
//!
//! The same work is done by every engine, one engine after the other, in one run, repeated
//! `RUNS` times; the median of the runs is kept. For each run, MTU and engine, a fresh
//! "container" network namespace is made and the engine attached to it ([`engine`]), the
//! figures are measured ([`figures`]) and everything is torn down again ([`sys`]). The
//! figures mean what they mean in `../shared/bench/anchors.sh`:
//!
//! | figure | what | unit |
//! |---|---|---|
//! | tcp_out | iperf3, container -> host loopback | Gbit/s |
//! | tcp_out_p4 | the same with 4 parallel streams (`iperf3 -P 4`), aggregate | Gbit/s |
//! | tcp_in | iperf3 -R, host loopback -> container | Gbit/s |
//! | tcp_pub | iperf3, host -> published 127.0.0.1 port -> container | Gbit/s |
//! | rr | 1-byte TCP ping-pong container <-> host, one-way (RTT/2, as sockperf) | µs |
//! | rr_cpu | the engine's CPU use during rr (what busy polling costs) | % of one CPU |
//! | crr | connect + 1 B + 1 B + close per connection, sequential | conn/s |
//! | crr_connect | crr's `connect()`, median (the handshake through the engine, as the client waits for it) | µs |
//! | crr_sleeps | crr's client: voluntary context switches per connection (`getrusage`), the times it slept waiting | per conn |
//! | crr_1k_rules | crr with 1,000 egress rules in force (usernet: four prefix lengths, none matching) | conn/s |
//! | crr6 | crr over IPv6 (`fd00::2` -> host `::1`; kernel: `fd00:253:3::1`) | conn/s |
//! | udp_1400, udp_8000 | iperf3 -u at a fixed offered rate, -l 1400 / 8000 | Gbit/s received, loss % |
//! | udp_1400_max, udp_8000_max | the highest offered rate carried with under 1 % loss (RFC 2544 throughput: doubling, then 3 bisections, 2 s probes) | Gbit/s received, loss % |
//! | udp_rr | 1-byte UDP ping-pong, one-way (RTT/2) | µs |
//! | udp_rr_cpu | the engine's CPU use during udp_rr | % of one CPU |
//! | cpu_per_gib | engine CPU time (its threads' schedstat, else utime + stime) per GiB received in tcp_out | s/GiB |
//! | startup_ms | exec to the ready-fd byte (`-r FD`), usernet and slirp4netns; median of 5 starts per run | ms |
//! | pasta_ready_ms | exec of pasta's command line to the first process's exit, pasta and usernet-pasta (usernet as `pasta`); median of 5 starts per run | ms |
//! | scale | usernet with 10,000 idle connections: tcp_out as % of without, RSS growth per connection | %, KiB |
//! | c2c_tcp, c2c_rr, tcp_out_8, tcp_out_4x | 8 namespaces on one switch (usernet network, kernel bridge + veth, VDE): iperf3 member -> member, 1-byte ping-pong member <-> member (one way), iperf3 member -> host with seven others attached, 4 members streaming to the host at once (aggregate); `FIGURES=c2c` for these alone | Gbit/s, µs |
//! | pod_tcp | two usernetes-style nodes, each served by the engine on its own host namespace, joined by flannel's VXLAN (offloads on): iperf3 pod -> pod; `FIGURES=pod_tcp` (or `vxlan`) alone, engines usernet, usernet-pasta, slirp4netns, pasta | Gbit/s |
//! | member_rss_kib | usernet network: VmRSS growth of its serving process per idle member, 1 to 8 members (`FIGURES=member_rss_kib ENGINES=usernet` alone) | KiB |
//!
//! Run it with `cargo bench --bench anchors` (as root); `cargo bench --bench anchors -- --help`
//! prints this text. Environment: `RUNS` (3), `SECS` per figure (5), `MTUS` ("1500 65520"),
//! `ENGINES` ("usernet usernet-pasta slirp4netns pasta pasta2025 kernel"), `FIGURES` (all;
//! `scale`, `udp` and `udp_max` name both of theirs, `rr` and `udp_rr` name their `_cpu` rows too, `crr` its `crr_connect` and `crr_sleeps`), `UDP_RATE` (iperf3 -b, "1G"),
//! `SCALE_CONNS` (10000), `USERNET_BIN` (default target/release/usernet, rebuilt with
//! `cargo build --release` when missing or older than the sources), `SLIRP4NETNS`, `PASTA`
//! (other builds), `PASTA2025` (default `/var/lib/usernet-bench/passt-2025/bin/pasta`).
//! Every table has a `usernet ÷ kernel` column (or, for c2c, `usernet ÷ kernel`): the
//! ratio to kernel veth that the targets are stated in.
//!
//! The engine `pasta2025` is the 2025 passt release (Debian 13's source package), built with
//! `bash benches/anchors/passt-2025.sh` (idempotent; Debian's archive only, plain `make`,
//! installed under `/var/lib/usernet-bench/passt-2025/`, nothing in the repository); without
//! it the column says "not built". `BENCH_SMOKE=1` is the CI guard: usernet
//! and slirp4netns, tcp_out at MTU 65520, RUNS=3 and SECS=3 (unless set); exit status 1 only
//! if usernet's median is below slirp4netns's (or usernet fails), 0 with a note if slirp4netns
//! cannot run. The table goes to stdout and to `target/bench/anchors-<date>-<HHMM>.md`
//! (`...-smoke.md` for the smoke run); progress and failures go to stderr.
//!
//! The container side of the scale figure is this same binary, `--idle-client ADDR N`, run in
//! the container: each side's 10,000 sockets need an `RLIMIT_NOFILE` of their own.
//!
//! Must run as root (namespaces, veth, iptables). Only loopback and our own namespaces carry
//! traffic; every process, namespace and iptables rule is removed at the end, on panic and on
//! Ctrl-C.

#[path = "anchors/c2c.rs"]
mod c2c;
#[path = "anchors/engine.rs"]
mod engine;
#[path = "anchors/figures.rs"]
mod figures;
#[path = "anchors/sys.rs"]
mod sys;
#[path = "anchors/vxlan.rs"]
mod vxlan;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::{Kind, Session, Tools};
use figures::{Ctx, HostServers};

/// A table row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fig {
    TcpOut,
    TcpOutP4,
    TcpIn,
    TcpPub,
    Rr,
    RrCpu,
    Crr,
    CrrConnect,
    CrrSleeps,
    CrrRules,
    Crr6,
    Udp1400,
    Udp8000,
    Udp1400Max,
    Udp8000Max,
    UdpRr,
    UdpRrCpu,
    CpuPerGib,
    StartupMs,
    PastaReadyMs,
    ScaleTcpOut,
    ScaleRss,
}

impl Fig {
    const ALL: [Fig; 22] = [
        Fig::TcpOut,
        Fig::TcpOutP4,
        Fig::TcpIn,
        Fig::TcpPub,
        Fig::Rr,
        Fig::RrCpu,
        Fig::Crr,
        Fig::CrrConnect,
        Fig::CrrSleeps,
        Fig::CrrRules,
        Fig::Crr6,
        Fig::Udp1400,
        Fig::Udp8000,
        Fig::Udp1400Max,
        Fig::Udp8000Max,
        Fig::UdpRr,
        Fig::UdpRrCpu,
        Fig::CpuPerGib,
        Fig::StartupMs,
        Fig::PastaReadyMs,
        Fig::ScaleTcpOut,
        Fig::ScaleRss,
    ];

    fn name(self) -> &'static str {
        match self {
            Fig::TcpOut => "tcp_out",
            Fig::TcpOutP4 => "tcp_out_p4",
            Fig::TcpIn => "tcp_in",
            Fig::TcpPub => "tcp_pub",
            Fig::Rr => "rr",
            Fig::RrCpu => "rr_cpu",
            Fig::Crr => "crr",
            Fig::CrrConnect => "crr_connect",
            Fig::CrrSleeps => "crr_sleeps",
            Fig::CrrRules => "crr_1k_rules",
            Fig::Crr6 => "crr6",
            Fig::Udp1400 => "udp_1400",
            Fig::Udp8000 => "udp_8000",
            Fig::Udp1400Max => "udp_1400_max",
            Fig::Udp8000Max => "udp_8000_max",
            Fig::UdpRr => "udp_rr",
            Fig::UdpRrCpu => "udp_rr_cpu",
            Fig::CpuPerGib => "cpu_per_gib",
            Fig::StartupMs => "startup_ms",
            Fig::PastaReadyMs => "pasta_ready_ms",
            Fig::ScaleTcpOut => "scale_tcp_out",
            Fig::ScaleRss => "scale_rss",
        }
    }

    /// Unit, and whether higher is better.
    fn unit(self) -> (&'static str, bool) {
        match self {
            Fig::TcpOut | Fig::TcpOutP4 | Fig::TcpIn | Fig::TcpPub => ("Gbit/s", true),
            Fig::Udp1400 | Fig::Udp8000 => ("Gbit/s rx (loss)", true),
            Fig::Udp1400Max | Fig::Udp8000Max => ("Gbit/s at <1% loss", true),
            Fig::Rr | Fig::UdpRr | Fig::CrrConnect => ("µs", false),
            Fig::Crr | Fig::CrrRules | Fig::Crr6 => ("conn/s", true),
            Fig::RrCpu | Fig::UdpRrCpu => ("% of a CPU", false),
            Fig::CrrSleeps => ("per conn", false),
            Fig::CpuPerGib => ("CPU s/GiB", false),
            Fig::StartupMs | Fig::PastaReadyMs => ("ms", false),
            Fig::ScaleTcpOut => ("% of tcp_out", true),
            Fig::ScaleRss => ("KiB/conn", false),
        }
    }

    fn decimals(self) -> usize {
        match self {
            Fig::Crr
            | Fig::CrrRules
            | Fig::Crr6
            | Fig::ScaleTcpOut
            | Fig::RrCpu
            | Fig::UdpRrCpu => 0,
            Fig::Rr
            | Fig::UdpRr
            | Fig::CrrConnect
            | Fig::StartupMs
            | Fig::PastaReadyMs
            | Fig::ScaleRss => 1,
            _ => 2,
        }
    }

    /// Whether the figure drives engines past their limits, so that it is measured after
    /// every other figure of a session: slirp4netns 1.2.0 dies of SIGBUS under 2 Gbit/s of
    /// 8000-byte datagrams at MTU 1500 (udp_8000_max), which would fail the figures after it.
    fn overloads(self) -> bool {
        matches!(self, Fig::Udp1400Max | Fig::Udp8000Max)
    }

    fn applies(self, k: Kind) -> bool {
        match self {
            Fig::CpuPerGib | Fig::RrCpu | Fig::UdpRrCpu => k.has_process(),
            Fig::StartupMs => k.has_ready_fd(),
            Fig::PastaReadyMs => k.is_pasta_like(),
            Fig::ScaleTcpOut | Fig::ScaleRss | Fig::CrrRules => k == Kind::Usernet,
            _ => true,
        }
    }

    /// Parses a `FIGURES` word (some name two rows).
    fn parse(s: &str) -> Option<Vec<Fig>> {
        match s {
            "scale" => Some(vec![Fig::ScaleTcpOut, Fig::ScaleRss]),
            // Latency with what it costs.
            "rr" => Some(vec![Fig::Rr, Fig::RrCpu]),
            // Where a connection's time goes.
            "crr" => Some(vec![Fig::Crr, Fig::CrrConnect, Fig::CrrSleeps]),
            "udp_rr" => Some(vec![Fig::UdpRr, Fig::UdpRrCpu]),
            "udp" => Some(vec![Fig::Udp1400, Fig::Udp8000]),
            "udp_max" => Some(vec![Fig::Udp1400Max, Fig::Udp8000Max]),
            _ => Fig::ALL
                .into_iter()
                .find(|f| f.name() == s)
                .map(|f| vec![f]),
        }
    }
}

/// One measurement: the value and, for UDP streams, the loss in %.
type Sample = Result<(f64, Option<f64>), String>;

#[derive(Debug)]
struct Config {
    runs: usize,
    secs: u64,
    mtus: Vec<u32>,
    engines: Vec<Kind>,
    figs: Vec<Fig>,
    smoke: bool,
    udp_rate: String,
    scale_conns: usize,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split([' ', ',', '\t']).filter(|w| !w.is_empty())
}

fn config() -> Result<Config, String> {
    let smoke = env("BENCH_SMOKE").is_some_and(|v| v != "0");
    let num = |name: &str, default: u64| -> Result<u64, String> {
        match env(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{name}={v}: want a positive integer")),
        }
    };
    let (runs, secs) = if smoke {
        (num("RUNS", 3)?, num("SECS", 3)?)
    } else {
        (num("RUNS", 3)?, num("SECS", 5)?)
    };
    let mtus = match (smoke, env("MTUS")) {
        (true, _) => vec![65520],
        (false, None) => vec![1500, 65520],
        (false, Some(v)) => words(&v)
            .map(|w| w.parse().ok().filter(|m| (68..=65520).contains(m)))
            .collect::<Option<Vec<u32>>>()
            .ok_or(format!("MTUS={v}: want MTUs in 68..=65520"))?,
    };
    let engines = match (smoke, env("ENGINES")) {
        (true, _) => vec![Kind::Usernet, Kind::Slirp4netns],
        (false, None) => Kind::ALL.to_vec(),
        (false, Some(v)) => words(&v)
            // vde is the c2c table's alone.
            .filter(|w| *w != "vde")
            .map(|w| Kind::parse(w).ok_or(format!("ENGINES: unknown engine {w:?}")))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let figs = match (smoke, env("FIGURES")) {
        (true, _) => vec![Fig::TcpOut],
        (false, None) => Fig::ALL.to_vec(),
        (false, Some(v)) => {
            let mut f = Vec::new();
            let other = |w: &&str| {
                *w == "c2c" || c2c::FIGS.contains(w) || *w == "vxlan" || vxlan::FIGS.contains(w)
            };
            for w in words(&v).filter(|w| !other(w)) {
                f.extend(Fig::parse(w).ok_or(format!(
                    "FIGURES: unknown figure {w:?} (known: {}, scale, udp)",
                    Fig::ALL.map(Fig::name).join(" ")
                ))?);
            }
            f.sort();
            f.dedup();
            f
        }
    };
    Ok(Config {
        runs: runs as usize,
        secs,
        mtus,
        engines,
        figs,
        smoke,
        udp_rate: env("UDP_RATE").unwrap_or_else(|| "1G".into()),
        scale_conns: num("SCALE_CONNS", 10_000)? as usize,
    })
}

/// Newest modification time of the sources usernet is built from.
fn newest_source(dir: &Path, newest: &mut SystemTime) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            newest_source(&p, newest);
        } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") || name == "Cargo.lock" {
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(t);
            }
        }
    }
}

/// usernet's binary: `USERNET_BIN`, else `target/release/usernet`, (re)built if missing or
/// older than any source of the workspace.
fn usernet_bin() -> Result<PathBuf, String> {
    if let Some(p) = env("USERNET_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // This bench runs as <target>/release/deps/anchors-HASH.
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("usernet")))
        .filter(|b| b.parent().is_some_and(|d| d.ends_with("release")))
        .unwrap_or_else(|| root.join("target/release/usernet"));
    let mut newest = UNIX_EPOCH;
    for d in ["src", "stack", "forwarder"] {
        newest_source(&root.join(d), &mut newest);
    }
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(t) = fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(t);
        }
    }
    let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_none_or(|b| b < newest) {
        eprintln!(
            "anchors: {} is {}: cargo build --release",
            bin.display(),
            if built.is_some() { "stale" } else { "missing" }
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "--bin", "usernet"])
            .current_dir(&root)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !st.success() {
            return Err(format!("cargo build --release failed: {st}"));
        }
    }
    Ok(bin)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// First line a command prints on success, else "?".
fn first_line(prog: &str, args: &[&str]) -> String {
    sys::run(Command::new(prog).args(args), Duration::from_secs(5))
        .ok()
        .filter(|o| o.ok())
        .map(|o| {
            let s = if o.stdout.trim().is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// UTC date and time of `t`: ("YYYY-MM-DD", "HH:MM").
fn utc(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}", rem / 3600, rem % 3600 / 60),
    )
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {n} CPUs, Linux {}", kernel.trim())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Engine starts behind each start-up figure of a run (see the run loop).
const STARTS: usize = 5;

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A table cell and the median behind it.
fn cell(fig: Fig, samples: &[Sample]) -> (String, Option<f64>) {
    let ok: Vec<(f64, Option<f64>)> = samples
        .iter()
        .filter_map(|s| s.as_ref().ok().copied())
        .collect();
    let fails = samples.len() - ok.len();
    let Some(m) = median(ok.iter().map(|s| s.0).collect()) else {
        return (
            if samples.is_empty() {
                "-".into()
            } else {
                "fail".into()
            },
            None,
        );
    };
    let mut s = format!("{m:.*}", fig.decimals());
    if let Some(loss) = median(ok.iter().filter_map(|s| s.1).collect()) {
        let _ = write!(s, " ({loss:.1}%)");
    }
    if fails > 0 {
        let _ = write!(s, " ({fails}/{} fail)", samples.len());
    }
    (s, Some(m))
}

struct Report {
    results: BTreeMap<(Kind, u32, Fig), Vec<Sample>>,
    missing: BTreeMap<Kind, String>,
    failures: Vec<String>,
}

impl Report {
    fn add(&mut self, k: Kind, mtu: u32, f: Fig, s: Sample, run: usize) {
        if let Err(e) = &s {
            self.failures.push(format!(
                "run {run}, {} MTU {mtu}, {}: {e}",
                k.name(),
                f.name()
            ));
        }
        self.results.entry((k, mtu, f)).or_default().push(s);
    }

    fn median(&self, k: Kind, mtu: u32, f: Fig) -> Option<f64> {
        self.results.get(&(k, mtu, f)).and_then(|s| cell(f, s).1)
    }

    fn table(&self, cfg: &Config) -> String {
        let mut t = String::new();
        let others: Vec<Kind> = if cfg.engines.contains(&Kind::Usernet) {
            cfg.engines
                .iter()
                .copied()
                .filter(|k| *k != Kind::Usernet)
                .collect()
        } else {
            Vec::new()
        };
        for &mtu in &cfg.mtus {
            let _ = writeln!(t, "\n### MTU {mtu}\n");
            let mut head = String::from("| figure | unit |");
            let mut rule = String::from("|---|---|");
            for k in &cfg.engines {
                let _ = write!(head, " {} |", k.name());
                rule.push_str("---:|");
            }
            for k in &others {
                let _ = write!(head, " usernet ÷ {} |", k.name());
                rule.push_str("---:|");
            }
            let _ = writeln!(t, "{head}\n{rule}");
            for &f in &cfg.figs {
                let (unit, up) = f.unit();
                let _ = write!(
                    t,
                    "| {} | {unit} {} |",
                    f.name(),
                    if up { "↑" } else { "↓" }
                );
                for &k in &cfg.engines {
                    let c = if let Some(why) = self.missing.get(&k) {
                        why.clone()
                    } else if !f.applies(k) {
                        "n/a".into()
                    } else {
                        cell(f, self.results.get(&(k, mtu, f)).map_or(&[][..], |v| v)).0
                    };
                    let _ = write!(t, " {c} |");
                }
                for &k in &others {
                    let r = match (self.median(Kind::Usernet, mtu, f), self.median(k, mtu, f)) {
                        (Some(u), Some(o)) if o > 0.0 && f.applies(k) => format!("{:.2}x", u / o),
                        _ => "-".into(),
                    };
                    let _ = write!(t, " {r} |");
                }
                t.push('\n');
            }
        }
        t
    }
}

/// Measures one figure on a running session.
fn measure(
    f: Fig,
    s: &Session,
    ctx: &Ctx,
    srv: &HostServers,
    cache: &mut BTreeMap<Fig, Sample>,
) -> Sample {
    if let Some(v) = cache.remove(&f) {
        return v;
    }
    let gbps = |r: Result<figures::Iperf, String>| r.map(|r| (r.gbps, r.lost_pct));
    let udp = |l: &str| {
        gbps(figures::iperf_to_host(
            s,
            ctx,
            &["-u", "-b", &ctx.udp_rate, "-l", l, "-w", "4M"],
        ))
    };
    match f {
        Fig::TcpOut | Fig::CpuPerGib => {
            let r = figures::iperf_to_host(s, ctx, &[]);
            let cpu = match &r {
                Ok(r) => match r.cpu_s {
                    Some(c) if r.bytes > 0.0 => Ok((c / (r.bytes / f64::from(1u32 << 30)), None)),
                    _ => Err("no engine CPU time".into()),
                },
                Err(e) => Err(e.clone()),
            };
            let out = r.map(|r| (r.gbps, None));
            one_of(f, [(Fig::TcpOut, out), (Fig::CpuPerGib, cpu)], cache)
        }
        Fig::TcpOutP4 => gbps(figures::iperf_to_host(s, ctx, &["-P", "4"])),
        Fig::TcpIn => gbps(figures::iperf_to_host(s, ctx, &["-R"])),
        Fig::TcpPub => gbps(figures::tcp_pub(s, ctx)),
        Fig::Rr | Fig::RrCpu | Fig::UdpRr | Fig::UdpRrCpu => {
            let (r, us_fig, cpu_fig) = if matches!(f, Fig::Rr | Fig::RrCpu) {
                (figures::rr(s, ctx, srv), Fig::Rr, Fig::RrCpu)
            } else {
                (figures::udp_rr(s, ctx, srv), Fig::UdpRr, Fig::UdpRrCpu)
            };
            let cpu = match &r {
                Ok((_, Some(c))) => Ok((*c, None)),
                Ok((_, None)) => Err("no engine CPU time".into()),
                Err(e) => Err(e.clone()),
            };
            let us = r.map(|(v, _)| (v, None));
            one_of(f, [(us_fig, us), (cpu_fig, cpu)], cache)
        }
        Fig::Crr | Fig::CrrConnect | Fig::CrrSleeps => {
            let r = figures::crr(s, ctx, srv);
            let row = |v: fn(&figures::Crr) -> f64| match &r {
                Ok(c) => Ok((v(c), None)),
                Err(e) => Err(e.clone()),
            };
            let rows = [
                (Fig::Crr, row(|c| c.rate)),
                (Fig::CrrConnect, row(|c| c.connect_us)),
                (Fig::CrrSleeps, row(|c| c.sleeps)),
            ];
            one_of(f, rows, cache)
        }
        Fig::CrrRules => figures::crr_rules(s, ctx, srv).map(|c| (c.rate, None)),
        Fig::Crr6 => figures::crr6(s, ctx, srv).map(|c| (c.rate, None)),
        Fig::Udp1400 => udp("1400"),
        Fig::Udp8000 => udp("8000"),
        Fig::Udp1400Max => figures::udp_lossless(s, ctx, "1400").map(|(v, l)| (v, Some(l))),
        Fig::Udp8000Max => figures::udp_lossless(s, ctx, "8000").map(|(v, l)| (v, Some(l))),
        Fig::StartupMs | Fig::PastaReadyMs => s
            .startup_ms
            .map(|v| (v, None))
            .ok_or("no start-up time".into()),
        Fig::ScaleTcpOut | Fig::ScaleRss => {
            let r = figures::scale(s, ctx, srv);
            let (pct, rss) = match r {
                Ok((p, k)) => (Ok((p, None)), Ok((k, None))),
                Err(e) => (Err(e.clone()), Err(e)),
            };
            one_of(f, [(Fig::ScaleTcpOut, pct), (Fig::ScaleRss, rss)], cache)
        }
    }
}

/// Rows measured at once, in `Fig::ALL`'s order: `f`'s sample; the rows after `f` are kept
/// in `cache` for when they are asked (a row before `f` was asked before it, or not at all).
fn one_of<const N: usize>(
    f: Fig,
    rows: [(Fig, Sample); N],
    cache: &mut BTreeMap<Fig, Sample>,
) -> Sample {
    let mut mine = Err(format!("{} is not measured with these rows", f.name()));
    let mut after = false;
    for (g, sample) in rows {
        if g == f {
            mine = sample;
            after = true;
        } else if after {
            cache.insert(g, sample);
        }
    }
    mine
}

fn brief(f: Fig, s: &Sample) -> String {
    match s {
        Ok((v, Some(l))) => format!("{v:.*} Gbit/s ({l:.1}% loss)", f.decimals()),
        Ok((v, None)) => format!("{v:.*} {}", f.decimals(), f.unit().0),
        Err(e) => format!("fail: {e}"),
    }
}

fn real_main() -> Result<ExitCode, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, addr, n] = &args[..] {
        if flag == "--idle-client" {
            return Ok(figures::idle_client(addr, n));
        }
    }
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "{}",
            include_str!("anchors.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| l.trim_start_matches("//!").trim_start())
                .collect::<Vec<_>>()
                .join("\n")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs this without --bench: do not start a benchmark then.
        println!("anchors: benchmark not run in test mode (use `cargo bench --bench anchors`)");
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = config()?;
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "must run as root: it creates network namespaces, veth pairs and iptables rules".into(),
        );
    }
    for t in ["iperf3", "ip", "unshare", "nsenter"] {
        if sys::which(t).is_none() {
            return Err(format!(
                "`{t}` is not installed (apt-get install iperf3 iproute2 util-linux)"
            ));
        }
    }
    let scale = cfg.figs.contains(&Fig::ScaleTcpOut) || cfg.figs.contains(&Fig::ScaleRss);
    let nofile = sys::raise_nofile();
    if scale && nofile < cfg.scale_conns as u64 + 1024 {
        eprintln!(
            "anchors: RLIMIT_NOFILE is {nofile}: too low for SCALE_CONNS={}",
            cfg.scale_conns
        );
    }
    let usernet = usernet_bin()?;
    let dir = std::env::temp_dir().join(format!("usernet-anchors.{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _dir_guard = sys::Guard::new(sys::Item::Dir(dir.clone()));
    let tools = Tools {
        usernet: usernet.clone(),
        slirp4netns: sys::which(&env("SLIRP4NETNS").unwrap_or_else(|| "slirp4netns".into())),
        pasta: sys::which(&env("PASTA").unwrap_or_else(|| "pasta".into())),
        pasta2025: sys::which(
            &env("PASTA2025").unwrap_or_else(|| engine::PASTA2025_DEFAULT.into()),
        ),
        dir,
        pub_port: free_port()?,
    };
    let ctx = Ctx {
        secs: cfg.secs,
        udp_rate: cfg.udp_rate.clone(),
        iperf_port: free_port()?,
        scale_conns: cfg.scale_conns,
    };
    let started = SystemTime::now();
    let load0 = loadavg();
    let mut rep = Report {
        results: BTreeMap::new(),
        missing: BTreeMap::new(),
        failures: Vec::new(),
    };
    for &k in &cfg.engines {
        if let Some(why) = tools.missing(k) {
            eprintln!("anchors: {}: {why}", k.name());
            rep.missing.insert(k, why);
        }
    }
    eprintln!(
        "anchors: {} run(s) x MTU {:?} x {:?}, {} s per figure, usernet = {}",
        cfg.runs,
        cfg.mtus,
        cfg.engines.iter().map(|k| k.name()).collect::<Vec<_>>(),
        cfg.secs,
        usernet.display()
    );
    for run in 1..=cfg.runs {
        for &mtu in &cfg.mtus {
            for &k in &cfg.engines {
                // FIGURES named c2c figures only: no session for nothing.
                if rep.missing.contains_key(&k) || cfg.figs.is_empty() {
                    continue;
                }
                eprintln!("[run {run}/{}] {} MTU {mtu}", cfg.runs, k.name());
                let mut figs: Vec<Fig> =
                    cfg.figs.iter().copied().filter(|f| f.applies(k)).collect();
                figs.sort_by_key(|f| f.overloads());
                // One start says little: it takes a few ms and varies by as much from one
                // start to the next. The start-up figures are the median of STARTS starts,
                // the extra ones made and undone before the session (they share its port,
                // API socket and pid file).
                let mut starts = Vec::new();
                if figs
                    .iter()
                    .any(|f| matches!(f, Fig::StartupMs | Fig::PastaReadyMs))
                {
                    for _ in 1..STARTS {
                        // A failed extra start leaves the figure to the session's own.
                        if let Ok(extra) = Session::start(k, mtu, &tools) {
                            starts.extend(extra.startup_ms);
                        }
                    }
                }
                let mut session = Session::start(k, mtu, &tools);
                if let Ok(s) = &mut session {
                    starts.extend(s.startup_ms);
                    s.startup_ms = median(starts);
                }
                let servers = session
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|s| HostServers::start(s.bind, s.bind6));
                match (&session, &servers) {
                    (Ok(s), Ok(srv)) => {
                        let mut cache = BTreeMap::new();
                        for &f in &figs {
                            let v = measure(f, s, &ctx, srv, &mut cache);
                            eprintln!("    {:<13} {}", f.name(), brief(f, &v));
                            rep.add(k, mtu, f, v, run);
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        eprintln!("    engine failed: {e}");
                        rep.failures
                            .push(format!("run {run}, {} MTU {mtu}: engine: {e}", k.name()));
                        for &f in &figs {
                            rep.results
                                .entry((k, mtu, f))
                                .or_default()
                                .push(Err(e.clone()));
                        }
                    }
                }
                drop(servers);
                drop(session);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    let (date, time) = utc(started);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## usernet anchors, {date} {time} UTC{}",
        if cfg.smoke { " (smoke)" } else { "" }
    );
    let _ = writeln!(
        out,
        "\n- machine: {}; load average at start {load0}, at end {}",
        machine(),
        loadavg()
    );
    let git = first_line(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    let _ = writeln!(
        out,
        "- usernet {git} ({}); {}; {}; pasta2025: {}; {}",
        usernet.display(),
        tools
            .slirp4netns
            .as_ref()
            .map_or("slirp4netns not installed".into(), |p| first_line(
                &p.to_string_lossy(),
                &["--version"]
            )),
        tools
            .pasta
            .as_ref()
            .map_or("pasta not installed".into(), |p| first_line(
                &p.to_string_lossy(),
                &["--version"]
            )),
        tools.pasta2025.as_ref().map_or("not built".into(), |p| {
            // Its --version prints nothing to a pipe: passt-2025.sh notes the version.
            p.parent()
                .and_then(Path::parent)
                .and_then(|d| fs::read_to_string(d.join("VERSION")).ok())
                .map_or_else(|| p.display().to_string(), |v| v.trim().to_string())
        }),
        first_line("iperf3", &["--version"]),
    );
    let _ = writeln!(
        out,
        "- RUNS={} (median kept), SECS={} per figure, UDP offered {}bit/s, scale: {} idle connections",
        cfg.runs, cfg.secs, cfg.udp_rate, cfg.scale_conns
    );
    // FIGURES named only c2c or vxlan figures: no main table, not even its headers.
    if !cfg.figs.is_empty() {
        out.push_str(&rep.table(&cfg));
        out.push_str(&legend(&cfg));
    }
    // Members of one network: their own table (FIGURES=c2c, or every figure).
    // FIGURES=c2c for the whole table, or single figures of it.
    let c2c_figs: Vec<&str> = match env("FIGURES") {
        None => c2c::FIGS.to_vec(),
        Some(v) if words(&v).any(|w| w == "c2c") => c2c::FIGS.to_vec(),
        Some(v) => c2c::FIGS
            .into_iter()
            .filter(|f| words(&v).any(|w| w == *f))
            .collect(),
    };
    // ENGINES names the c2c engines too (usernet, kernel, vde); none of them: all.
    let c2c_engines: Vec<&str> = env("ENGINES")
        .map(|v| {
            c2c::ENGINES
                .into_iter()
                .filter(|e| words(&v).any(|w| w == *e))
                .collect::<Vec<_>>()
        })
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| c2c::ENGINES.to_vec());
    if !cfg.smoke && !c2c_figs.is_empty() {
        out.push_str(&c2c::table(
            &usernet,
            cfg.runs,
            cfg.secs,
            &cfg.mtus,
            &c2c_engines,
            &c2c_figs,
        ));
    }
    // Pods of two nodes over flannel's VXLAN: their own table (FIGURES=pod_tcp or vxlan,
    // or every figure); ENGINES names its engines too.
    let vx_wanted =
        env("FIGURES").is_none_or(|v| words(&v).any(|w| w == "vxlan" || vxlan::FIGS.contains(&w)));
    let vx_engines: Vec<&str> = env("ENGINES")
        .map(|v| {
            vxlan::ENGINES
                .into_iter()
                .filter(|e| words(&v).any(|w| w == *e))
                .collect::<Vec<_>>()
        })
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| vxlan::ENGINES.to_vec());
    if !cfg.smoke && vx_wanted {
        let bins = vxlan::Bins {
            usernet: &usernet,
            slirp4netns: tools.slirp4netns.as_deref(),
            pasta: tools.pasta.as_deref(),
        };
        out.push_str(&vxlan::table(
            &bins,
            cfg.runs,
            cfg.secs,
            &cfg.mtus,
            &vx_engines,
        ));
    }
    if !rep.failures.is_empty() {
        let _ = writeln!(out, "\nFailures:\n");
        for f in &rep.failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    let mut code = ExitCode::SUCCESS;
    if cfg.smoke {
        let u = rep.median(Kind::Usernet, 65520, Fig::TcpOut);
        let s = rep.median(Kind::Slirp4netns, 65520, Fig::TcpOut);
        let f = |v: Option<f64>| v.map_or("fail".into(), |v| format!("{v:.2} Gbit/s"));
        let verdict = match (u, s) {
            (None, _) => {
                code = ExitCode::from(1);
                "FAIL: usernet's tcp_out failed"
            }
            (Some(u), Some(s)) if u < s => {
                code = ExitCode::from(1);
                "FAIL: usernet is below slirp4netns"
            }
            (Some(_), None) => "no verdict: slirp4netns did not run (not counted as a failure)",
            _ => "ok",
        };
        let _ = writeln!(
            out,
            "\nsmoke (tcp_out, MTU 65520, median of {}): usernet {} vs slirp4netns {}: {verdict}",
            cfg.runs,
            f(u),
            f(s)
        );
    }
    println!("{out}");
    let root = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let file = root.join("bench").join(format!(
        "anchors-{date}-{}{}.md",
        time.replace(':', ""),
        if cfg.smoke { "-smoke" } else { "" }
    ));
    match fs::create_dir_all(root.join("bench")).and_then(|()| fs::write(&file, &out)) {
        Ok(()) => eprintln!("anchors: written to {}", file.display()),
        Err(e) => eprintln!("anchors: cannot write {}: {e}", file.display()),
    }
    Ok(code)
}

fn main() -> ExitCode {
    sys::install_signal_cleanup();
    let r = std::panic::catch_unwind(real_main);
    sys::cleanup_all();
    match r {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("anchors: {e}");
            ExitCode::from(2)
        }
        Err(_) => ExitCode::from(101),
    }
}

/// The main table's legend: a sentence for each figure measured.
fn legend(cfg: &Config) -> String {
    let has = |fs: &[Fig]| fs.iter().any(|f| cfg.figs.contains(f));
    let mut legend = vec![
        "↑ higher is better, ↓ lower is better; ratios are usernet ÷ engine (for ↓ figures, \
         below 1 favours usernet); \"(k/n fail)\": median of the runs that worked."
            .to_string(),
    ];
    if has(&[Fig::Rr, Fig::UdpRr]) {
        legend.push(
            "rr, udp_rr: mean one-way latency of a 1-byte ping-pong, container -> host \
             (round trip / 2, as sockperf reports it)."
                .into(),
        );
    }
    if has(&[Fig::Crr]) {
        legend.push(
            "crr: sequential connect + 1 byte + 1 byte + close (RST), like crr.c; crr_connect: \
             the median time of its `connect()`; crr_sleeps: its client's voluntary context \
             switches per connection (`getrusage`), the times it slept waiting."
                .into(),
        );
    }
    if has(&[Fig::Udp1400, Fig::Udp8000]) {
        legend.push(format!(
            "udp_1400, udp_8000: iperf3 -u -b {} -w 4M container -> host, received rate (loss % \
             from bytes sent and received).",
            cfg.udp_rate
        ));
    }
    if has(&[Fig::Udp1400Max, Fig::Udp8000Max]) {
        legend.push(
            "udp_*_max: the highest offered rate carried with under 1% loss (RFC 2544 \
             throughput): offered rates double from 1 Gbit/s until one passes and one fails, \
             then 3 bisections, 2 s per probe; shown is the received rate (loss) of the best \
             passing probe."
                .into(),
        );
    }
    if has(&[Fig::CpuPerGib]) {
        legend.push(
            "cpu_per_gib: CPU time of the engine process (all threads, /proc schedstat) \
             during tcp_out per GiB received."
                .into(),
        );
    }
    if has(&[Fig::StartupMs]) {
        legend.push(format!(
            "startup_ms: exec to the ready-fd byte (`-r FD`, with --configure), the median of \
             {STARTS} starts per run."
        ));
    }
    if has(&[Fig::PastaReadyMs]) {
        legend.push(format!(
            "pasta_ready_ms: exec of pasta's command line to the first process's exit with \
             the namespace configured and the `-t` port bound (what podman waits for); \
             usernet-pasta is usernet run as `pasta` with the real pasta's command line; the \
             median of {STARTS} starts per run."
        ));
    }
    if has(&[Fig::ScaleTcpOut, Fig::ScaleRss]) {
        legend.push(format!(
            "scale_*: with {} idle TCP connections open from the container through usernet: \
             tcp_out as % of tcp_out without them, and usernet's VmRSS growth per connection.",
            cfg.scale_conns
        ));
    }
    format!("\n{}\n", legend.join(" "))
}
