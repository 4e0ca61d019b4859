//! The engines: how each one is given a fresh "container" network namespace.
//!
//! - usernet, slirp4netns, pasta: the container is `unshare --user --map-root-user --net
//!   --fork --kill-child sleep`, the engine attaches to the `sleep` by PID with the same
//!   slirp4netns command line for usernet and slirp4netns (`--configure --mtu=M --api-socket S
//!   -r FD PID tap0`, the port published with `add_hostfwd` on the API socket) and pasta's
//!   podman-like one (`--config-net -t PUB:5201`). The host is `10.0.2.2` from inside.
//!   usernet and slirp4netns also get `--enable-ipv6`: the host's `::1` is `fd00::2` from
//!   inside (crr6). pasta copies the host's IPv6 set-up, so it has IPv6 only where the host
//!   has a routable IPv6 interface.
//! - pasta2025: the 2025 passt release built by `passt-2025.sh` (default
//!   `/var/lib/usernet-bench/passt-2025/bin/pasta`, else `PASTA2025`), run like pasta.
//! - kernel: `ip netns add` plus a veth pair at the same MTU, `10.253.3.1` (host) and
//!   `10.253.3.2` (container), `fd00:253:3::1` and `::2` for IPv6; the published port is an
//!   iptables DNAT from 127.0.0.1:PUB to the container, with MASQUERADE and `route_localnet`
//!   on the host end of the veth only.
//!
//! Commands run inside the container with `nsenter -t PID -U -n --preserve-credentials` (or
//! `ip netns exec`), both of which exec in place, so the PID we hold is the command's own.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::sys::{self, ChildProc, Guard, Item};

/// The port the container's own servers listen on (tcp_pub).
pub const CONTAINER_PORT: u16 = 5201;
const KERNEL_HOST: Ipv4Addr = Ipv4Addr::new(10, 253, 3, 1);
const KERNEL_GUEST: Ipv4Addr = Ipv4Addr::new(10, 253, 3, 2);
const SLIRP_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const KERNEL_HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x253, 3, 0, 0, 0, 0, 1);
const KERNEL_GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x253, 3, 0, 0, 0, 0, 2);
const SLIRP_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// Where `passt-2025.sh` installs the 2025 passt release by default.
pub const PASTA2025_DEFAULT: &str = "/var/lib/usernet-bench/passt-2025/bin/pasta";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the compared network engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The project's binary.
    Usernet,
    /// The project's binary run as `pasta`, with the real pasta's command line.
    UsernetPasta,
    /// slirp4netns (libslirp).
    Slirp4netns,
    /// pasta (passt), the installed one (Debian 12: 2023).
    Pasta,
    /// pasta of the 2025 passt release, built by `passt-2025.sh`.
    Pasta2025,
    /// Kernel veth (the ceiling).
    Kernel,
}

impl Kind {
    /// All, in table order.
    pub const ALL: [Kind; 6] = [
        Kind::Usernet,
        Kind::UsernetPasta,
        Kind::Slirp4netns,
        Kind::Pasta,
        Kind::Pasta2025,
        Kind::Kernel,
    ];

    /// Its name in tables and in `ENGINES`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Usernet => "usernet",
            Kind::UsernetPasta => "usernet-pasta",
            Kind::Slirp4netns => "slirp4netns",
            Kind::Pasta => "pasta",
            Kind::Pasta2025 => "pasta2025",
            Kind::Kernel => "kernel",
        }
    }

    /// Parses an `ENGINES` word.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s || (s == "veth" && *k == Kind::Kernel))
    }

    /// Whether it has an engine process of its own (CPU and RSS figures).
    pub fn has_process(self) -> bool {
        self != Kind::Kernel
    }

    /// Whether start-up to ready-fd is measured for it.
    pub fn has_ready_fd(self) -> bool {
        matches!(self, Kind::Usernet | Kind::Slirp4netns)
    }

    /// Whether it is started with pasta's command line (start-up: exec to the first
    /// process's exit, what podman waits for).
    pub fn is_pasta_like(self) -> bool {
        matches!(self, Kind::UsernetPasta | Kind::Pasta | Kind::Pasta2025)
    }
}

/// Programs the harness runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// usernet's binary.
    pub usernet: PathBuf,
    /// slirp4netns (`SLIRP4NETNS` overrides).
    pub slirp4netns: Option<PathBuf>,
    /// pasta (`PASTA` overrides).
    pub pasta: Option<PathBuf>,
    /// The 2025 pasta (`PASTA2025` overrides [`PASTA2025_DEFAULT`]).
    pub pasta2025: Option<PathBuf>,
    /// Work directory (API sockets, logs, pid files).
    pub dir: PathBuf,
    /// The host port published to the container's port 5201.
    pub pub_port: u16,
}

impl Tools {
    /// Why `kind` cannot run here, if it cannot.
    pub fn missing(&self, kind: Kind) -> Option<String> {
        let need: &[&str] = match kind {
            Kind::Usernet
            | Kind::UsernetPasta
            | Kind::Slirp4netns
            | Kind::Pasta
            | Kind::Pasta2025 => &["unshare", "nsenter"],
            Kind::Kernel => &["ip", "iptables"],
        };
        for t in need {
            if sys::which(t).is_none() {
                return Some(format!("`{t}` not installed"));
            }
        }
        match kind {
            Kind::Usernet | Kind::UsernetPasta if !self.usernet.is_file() => {
                Some(format!("{} missing", self.usernet.display()))
            }
            Kind::Slirp4netns if self.slirp4netns.is_none() => Some("not installed".into()),
            Kind::Pasta if self.pasta.is_none() => Some("not installed".into()),
            Kind::Pasta2025 if self.pasta2025.is_none() => {
                Some("not built (bash benches/anchors/passt-2025.sh)".into())
            }
            _ => None,
        }
    }
}

/// Something a session must undo, in reverse order of creation.
#[derive(Debug)]
#[expect(dead_code, reason = "held only for its Drop")]
enum Undo {
    Child(ChildProc),
    Guard(Guard),
}

/// A running engine with its container namespace.
#[derive(Debug)]
pub struct Session {
    /// Which engine.
    pub kind: Kind,
    /// Link MTU.
    pub mtu: u32,
    /// The container's network namespace file (for `setns`).
    pub netns: PathBuf,
    /// The host as the container sees it (where the host-side servers are reached).
    pub host: Ipv4Addr,
    /// Where the host-side servers listen.
    pub bind: Ipv4Addr,
    /// Where the host-side IPv6 servers listen (the engines with a process relay to the
    /// host's `::1`).
    pub bind6: Ipv6Addr,
    /// Kernel: the host as the container sees it over IPv6 ([`Session::host6`] finds it
    /// for the others, when a figure needs it).
    kernel_host6: Option<Ipv6Addr>,
    /// The published port on the host's 127.0.0.1 (to the container's port 5201).
    pub pub_port: u16,
    /// The engine's process (CPU and RSS), if it has one.
    pub engine_pid: Option<i32>,
    /// Exec to ready-fd byte, ms (for pasta: to the first process's exit); the run loop
    /// replaces it with the median over several starts.
    pub startup_ms: Option<f64>,
    /// The engine's slirp4netns-style API socket, if it has one.
    pub api_socket: Option<PathBuf>,
    enter: Vec<String>,
    undo: Vec<Undo>,
}

impl Drop for Session {
    fn drop(&mut self) {
        while let Some(u) = self.undo.pop() {
            drop(u);
        }
    }
}

impl Session {
    /// A command that runs `prog` inside the container.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(&self.enter[0]);
        c.args(&self.enter[1..]).arg(prog);
        c
    }

    /// Starts `kind` at `mtu` in fresh namespaces; everything is undone when the session drops
    /// (also when this fails half-way).
    pub fn start(kind: Kind, mtu: u32, tools: &Tools) -> Result<Session, String> {
        let mut s = Session {
            kind,
            mtu,
            netns: PathBuf::new(),
            host: SLIRP_GATEWAY,
            bind: Ipv4Addr::LOCALHOST,
            bind6: Ipv6Addr::LOCALHOST,
            kernel_host6: None,
            pub_port: tools.pub_port,
            engine_pid: None,
            startup_ms: None,
            api_socket: None,
            enter: Vec::new(),
            undo: Vec::new(),
        };
        match kind {
            Kind::Kernel => s.start_kernel()?,
            Kind::Usernet
            | Kind::UsernetPasta
            | Kind::Slirp4netns
            | Kind::Pasta
            | Kind::Pasta2025 => {
                let target = s.start_target()?;
                s.netns = PathBuf::from(format!("/proc/{target}/ns/net"));
                s.enter = [
                    "nsenter",
                    "-t",
                    &target.to_string(),
                    "-U",
                    "-n",
                    "--preserve-credentials",
                ]
                .map(String::from)
                .to_vec();
                match kind {
                    Kind::Pasta | Kind::Pasta2025 | Kind::UsernetPasta => {
                        s.start_pasta(tools, target)?
                    }
                    _ => s.start_slirp_like(tools, target)?,
                }
            }
        }
        Ok(s)
    }

    fn guard(&mut self, item: Item) {
        self.undo.push(Undo::Guard(Guard::new(item)));
    }

    /// `unshare ... sleep`: returns the PID of the `sleep` (the container).
    fn start_target(&mut self) -> Result<i32, String> {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--user",
            "--map-root-user",
            "--net",
            "--fork",
            "--kill-child",
        ])
        .args(["sleep", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut u = ChildProc::spawn(&mut cmd, "unshare")?;
        let upid = u.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        let child = loop {
            if let Some(&c) = sys::children_of(upid).first() {
                break c;
            }
            if let Some(st) = u.exited() {
                return Err(format!("unshare exited: {st}"));
            }
            if Instant::now() > deadline {
                return Err("unshare did not fork its child".into());
            }
            thread::sleep(Duration::from_millis(2));
        };
        self.undo.push(Undo::Child(u));
        // Killed before unshare (which ignores SIGTERM while it waits for it).
        let start = sys::proc_start_time(child).ok_or("unshare's child vanished")?;
        self.guard(Item::Proc { pid: child, start });
        // Wait until the child runs in its new namespaces.
        let mine = fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{child}/ns/net")).ok().as_ref() == Some(&mine) {
            if Instant::now() > deadline {
                return Err("unshare's child never left our netns".into());
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(child)
    }

    /// usernet or slirp4netns, same command line; waits for the ready-fd byte and publishes
    /// 127.0.0.1:PUB -> 5201 through the API socket.
    fn start_slirp_like(&mut self, tools: &Tools, target: i32) -> Result<(), String> {
        let (bin, name) = match self.kind {
            Kind::Usernet => (tools.usernet.clone(), "usernet"),
            _ => (
                tools.slirp4netns.clone().ok_or("not installed")?,
                "slirp4netns",
            ),
        };
        let sock = tools.dir.join(format!("{name}.sock"));
        let _ = fs::remove_file(&sock);
        let log_path = tools.dir.join(format!("{name}-{}.log", self.mtu));
        let log = File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        // Not close-on-exec: the engine inherits the write end as its ready fd.
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--configure")
            .arg("--enable-ipv6")
            .arg(format!("--mtu={}", self.mtu))
            .arg("--api-socket")
            .arg(&sock)
            .args(["-r", &ready_w.as_raw_fd().to_string()])
            .args([&target.to_string(), "tap0"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let t0 = Instant::now();
        let mut child = ChildProc::spawn(&mut cmd, name)?;
        drop(ready_w);
        let pid = child.pid();
        let log_tail = |p: &Path| sys::last_lines(&fs::read_to_string(p).unwrap_or_default(), 3);
        // The ready byte.
        let mut pfd = [PollFd::new(ready_r.as_fd(), PollFlags::POLLIN)];
        let n = poll(
            &mut pfd,
            PollTimeout::try_from(READY_TIMEOUT).unwrap_or(PollTimeout::MAX),
        )
        .map_err(|e| format!("poll: {e}"))?;
        let mut byte = [0u8; 1];
        let got = if n == 1 {
            File::from(ready_r).read(&mut byte).unwrap_or(0)
        } else {
            0
        };
        let elapsed = t0.elapsed();
        if got != 1 || byte[0] != b'1' {
            let st = child.wait_timeout(Duration::from_millis(200));
            self.undo.push(Undo::Child(child));
            return Err(format!(
                "{name}: no ready byte after {elapsed:?} ({}): {}",
                st.map_or("still running".into(), |s| s.to_string()),
                log_tail(&log_path)
            ));
        }
        self.startup_ms = Some(elapsed.as_secs_f64() * 1e3);
        self.engine_pid = Some(pid);
        self.undo.push(Undo::Child(child));
        let req = format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"127.0.0.1","host_port":{},"guest_port":{CONTAINER_PORT}}}}}"#,
            self.pub_port
        );
        let reply = api(&sock, &req).map_err(|e| format!("{name} API: {e}"))?;
        if !reply.contains("\"return\"") {
            return Err(format!("{name}: add_hostfwd failed: {}", reply.trim()));
        }
        self.api_socket = Some(sock);
        Ok(())
    }

    /// pasta, or usernet as `pasta` (argv[0]), with the same command line; the start-up
    /// time is exec to the first process's exit.
    fn start_pasta(&mut self, tools: &Tools, target: i32) -> Result<(), String> {
        let name = self.kind.name();
        let pidfile = tools.dir.join(format!("{name}.pid"));
        let _ = fs::remove_file(&pidfile);
        let log_path = tools.dir.join(format!("{name}-{}.log", self.mtu));
        let log = File::create(&log_path).map_err(|e| e.to_string())?;
        let mut cmd = if self.kind == Kind::UsernetPasta {
            let mut c = Command::new(&tools.usernet);
            std::os::unix::process::CommandExt::arg0(&mut c, "pasta");
            c
        } else if self.kind == Kind::Pasta2025 {
            Command::new(tools.pasta2025.clone().ok_or("not built")?)
        } else {
            Command::new(tools.pasta.clone().ok_or("not installed")?)
        };
        cmd.args([
            "--runas",
            "0",
            "--config-net",
            "-a",
            "10.0.2.100",
            "-n",
            "24",
        ])
        .args(["-g", "10.0.2.2", "-m", &self.mtu.to_string()])
        .args(["-t", &format!("{}:{CONTAINER_PORT}", self.pub_port)])
        .args(["-T", "none", "-U", "none", "-u", "none", "-q", "-P"])
        .arg(&pidfile)
        .arg(target.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        // pasta forks its daemon once the namespace is configured, then the parent exits.
        let t0 = Instant::now();
        let mut parent = ChildProc::spawn(&mut cmd, "pasta")?;
        let st = parent.wait_timeout(READY_TIMEOUT);
        self.startup_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        let pid = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            if let Some(start) = sys::proc_start_time(pid) {
                self.guard(Item::Proc { pid, start });
                self.engine_pid = Some(pid);
            }
        }
        drop(parent);
        match st {
            Some(s) if s.success() && self.engine_pid.is_some() => Ok(()),
            _ => Err(format!(
                "{name} did not start ({}): {}",
                st.map_or("timed out".into(), |s| s.to_string()),
                sys::last_lines(&fs::read_to_string(&log_path).unwrap_or_default(), 3)
            )),
        }
    }

    fn start_kernel(&mut self) -> Result<(), String> {
        let me = std::process::id();
        let ns = format!("unbench{me}");
        let vh = format!("ubh{me}");
        let vc = format!("ubc{me}");
        let mtu = self.mtu.to_string();
        let host_cidr = format!("{KERNEL_HOST}/24");
        let guest_cidr = format!("{KERNEL_GUEST}/24");
        sys::sh("ip", &["netns", "add", &ns])?;
        self.guard(Item::Netns(ns.clone()));
        sys::sh(
            "ip",
            &[
                "link", "add", &vh, "mtu", &mtu, "type", "veth", "peer", "name", &vc, "mtu", &mtu,
            ],
        )?;
        self.guard(Item::Link(vh.clone()));
        sys::sh("ip", &["link", "set", &vc, "netns", &ns])?;
        sys::sh("ip", &["addr", "add", &host_cidr, "dev", &vh])?;
        sys::sh("ip", &["link", "set", &vh, "up"])?;
        sys::sh("ip", &["-n", &ns, "addr", "add", &guest_cidr, "dev", &vc])?;
        sys::sh("ip", &["-n", &ns, "link", "set", &vc, "up"])?;
        sys::sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sys::sh(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &KERNEL_HOST.to_string(),
            ],
        )?;
        // 127.0.0.1 -> container (DNAT) needs route_localnet, on our veth only (gone with it).
        fs::write(format!("/proc/sys/net/ipv4/conf/{vh}/route_localnet"), "1")
            .map_err(|e| format!("route_localnet on {vh}: {e}"))?;
        let tag = format!("usernet-anchors-{me}");
        let rules: [(&str, Vec<String>); 2] = [
            (
                "OUTPUT",
                vec![
                    "-d".into(),
                    "127.0.0.1/32".into(),
                    "-p".into(),
                    "tcp".into(),
                    "--dport".into(),
                    self.pub_port.to_string(),
                    "-m".into(),
                    "comment".into(),
                    "--comment".into(),
                    tag.clone(),
                    "-j".into(),
                    "DNAT".into(),
                    "--to-destination".into(),
                    format!("{KERNEL_GUEST}:{CONTAINER_PORT}"),
                ],
            ),
            (
                "POSTROUTING",
                vec![
                    "-s".into(),
                    "127.0.0.1/32".into(),
                    "-d".into(),
                    format!("{KERNEL_GUEST}/32"),
                    "-m".into(),
                    "comment".into(),
                    "--comment".into(),
                    tag.clone(),
                    "-j".into(),
                    "MASQUERADE".into(),
                ],
            ),
        ];
        for (chain, rule) in rules {
            sys::run_status(
                Command::new("iptables")
                    .args(["-w", "5", "-t", "nat", "-A", chain])
                    .args(&rule),
            )?;
            self.guard(Item::Iptables {
                table: "nat".into(),
                chain: chain.into(),
                rule,
            });
        }
        self.netns = PathBuf::from(format!("/run/netns/{ns}"));
        self.enter = ["ip", "netns", "exec", &ns].map(String::from).to_vec();
        let (h6, g6) = (format!("{KERNEL_HOST6}/64"), format!("{KERNEL_GUEST6}/64"));
        sys::sh("ip", &["addr", "add", &h6, "dev", &vh, "nodad"])?;
        sys::sh("ip", &["-n", &ns, "addr", "add", &g6, "dev", &vc, "nodad"])?;
        self.host = KERNEL_HOST;
        self.bind = KERNEL_HOST;
        self.bind6 = KERNEL_HOST6;
        self.kernel_host6 = Some(KERNEL_HOST6);
        Ok(())
    }

    /// The host as the container sees it over IPv6, if the container has IPv6. For the
    /// engines with a process: once the container has a usable (non-tentative) global
    /// address and a default route, waited for up to 6 s (SLAAC; slirp4netns's router
    /// advertisement sometimes takes over 3 s), only by the figures that use IPv6.
    pub fn host6(&self) -> Option<Ipv6Addr> {
        if self.kind == Kind::Kernel {
            return self.kernel_host6;
        }
        let deadline = Instant::now() + Duration::from_secs(6);
        loop {
            let addr = self
                .cmd("ip")
                .args(["-6", "addr", "show", "scope", "global"])
                .output();
            let route = self
                .cmd("ip")
                .args(["-6", "route", "show", "default"])
                .output();
            let ok = |o: &std::io::Result<std::process::Output>| {
                o.as_ref()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            };
            if let (Some(a), Some(r)) = (ok(&addr), ok(&route)) {
                if a.contains("inet6") && !a.contains("tentative") && r.contains("default") {
                    // usernet, slirp4netns: fd00::2 is the host's loopback (their router
                    // advertises a link-local address). pasta maps the gateway address it
                    // copied from the host to the host's loopback.
                    let via = r
                        .split_whitespace()
                        .skip_while(|w| *w != "via")
                        .nth(1)
                        .and_then(|g| g.parse::<Ipv6Addr>().ok())
                        .filter(|g| !g.is_unicast_link_local());
                    return match self.kind {
                        Kind::Usernet | Kind::Slirp4netns => Some(SLIRP_GATEWAY6),
                        _ => via,
                    };
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One request on a slirp4netns-style API socket: write, half-close, read the reply.
pub fn api(sock: &Path, req: &str) -> Result<String, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(5))))
        .and_then(|()| s.write_all(req.as_bytes()))
        .and_then(|()| s.shutdown(Shutdown::Write))
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply)
}
