//! Shared harness for the real-network integration tests (style rule 11).
//!
//! # Theory of operation
//!
//! Every test builds its own throw-away [`Topology`] of three network namespaces, so no test
//! touches the machine's own interfaces, routes or resolv.conf, and nothing leaves the machine:
//!
//! ```text
//!  C "container"              H "host": usernet runs here            W "world"
//!  (empty until usernet       lo  127.0.0.1 (test DNS server :53)    lo  203.0.113.0/24 (all local)
//!   or a test adds tap0)      vh  198.51.100.1/24 + .3/24  <--veth--> vw  198.51.100.2/24
//!                             ob0 198.51.100.9/32          <--veth--> ob1 (no address)
//!                             route 203.0.113.0/24 via 198.51.100.2
//!                             /etc/resolv.conf: nameserver 127.0.0.1
//! ```
//!
//! [`Topology::new_ipv6`] adds IPv6 to H and W (C is left to usernet and the kernel's
//! defaults; H and W skip duplicate address detection; H's ::3 is deprecated, so never a
//! default source):
//!
//! ```text
//!                             vh  2001:db8:1::1/64 + ::3/64 <--> vw  2001:db8:1::2/64
//!                             ob0 2001:db8:1::9/128              lo  2001:db8:2::1 (WORLD6)
//!                             route 2001:db8:2::/64 via 2001:db8:1::2
//!                                                                route 2001:db8:1::9 dev ob1
//! ```
//!
//! 2001:db8:ff::/48 has no route in H: it is the IPv6 "unreachable" network.
//!
//! usernet is always started as `ip netns exec H usernet ...`: `ip netns exec` execs in place
//! (the PID we get is usernet's) and bind-mounts `/etc/netns/H/resolv.conf` over
//! `/etc/resolv.conf` for it. 192.0.2.0/24 has no route in H: it is the "unreachable" network.
//!
//! Test code opens real sockets inside C, H or W from a thread that did
//! `setns(CLONE_NEWNET)` ([`in_netns`]): the network namespace is per thread, and a socket stays
//! in the namespace it was created in, so servers are bound inside a namespace and then served
//! from ordinary threads.
//!
//! Payloads are a deterministic pseudo-random stream ([`fill_pattern`]) compared end to end by
//! SHA-256. Every socket has a timeout and every child process a deadline, so no test can hang.
//! Every namespace, `/etc/netns/H` directory and child process is removed by a `Drop` guard,
//! also when a test panics.
//!
//! Where namespaces cannot be created (not root, no `ip`), [`require_root_netns`] prints a loud
//! `SKIPPED` line, except under `CI=true`, where it fails the test instead.
//!
//! Set `USERNET_TEST_BIN=/usr/bin/slirp4netns` to run the attach-mode tests against the real
//! slirp4netns for comparison (run mode and the usernet-only checks then fail, as expected).

#![allow(
    dead_code,
    reason = "each integration test crate uses a different part of the shared harness"
)]

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Addresses and limits
// ---------------------------------------------------------------------------------------------

/// Guest address with the default `--cidr 10.0.2.0/24` (`net+100`).
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// Gateway (`net+2`): the host namespace's 127.0.0.1 unless `--disable-host-loopback`.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// DNS forwarder (`net+3`).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// H's primary address on the veth to W: what the world sees by default.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A second address of H on the same veth, for `--outbound-addr ADDR`.
pub const HOST_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// The only address of H's interface `ob0`, for `--outbound-addr IFNAME`.
pub const HOST_OB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
/// Name of that interface inside H.
pub const HOST_OB_IFNAME: &str = "ob0";
/// W's address on the veth to H.
pub const WORLD_LINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The "world" server address (all of 203.0.113.0/24 is local to W).
pub const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A destination with no route in H.
pub const UNREACHABLE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 55);
/// The name the test DNS server resolves (to [`WORLD`]).
pub const DNS_NAME: &str = "example.test";

// IPv6 (only with [`Topology::new_ipv6`]; usernet's side with `-6`).

/// Guest address with `-6 -c` (`fd00::100`).
pub const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// IPv6 gateway (`fd00::2`): the host namespace's `::1` unless `--disable-host-loopback`.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// IPv6 DNS forwarder (`fd00::3`).
pub const DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
/// usernet's router link-local address (`fe80::2`), the source of its advertisements.
pub const ROUTER_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
/// H's primary IPv6 address on the veth to W: what the world sees by default.
pub const HOST_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// A second IPv6 address of H on the same veth, for `--outbound-addr6 ADDR`.
pub const HOST_ADDR6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
/// The only global IPv6 address of H's interface `ob0`, for `--outbound-addr6 IFNAME`.
pub const HOST_OB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 9);
/// W's IPv6 address on the veth to H.
pub const WORLD_LINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The IPv6 "world" server address (on W's `lo`; H routes 2001:db8:2::/64 via W).
pub const WORLD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// An IPv6 destination with no route in H.
pub const UNREACHABLE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x55);

/// Read/write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout of every test TCP client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long usernet may take to report readiness on `-r`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// 64 MiB: the bulk transfer size required in each direction.
pub const BULK: u64 = 64 << 20;

/// Path of the binary under test (`USERNET_TEST_BIN` overrides it, e.g. with slirp4netns).
pub fn usernet_bin() -> PathBuf {
    match std::env::var_os("USERNET_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_usernet")),
    }
}

/// True when running under CI (`CI=true`): missing prerequisites are failures, not skips.
pub fn ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Skips (loudly) or, under `CI=true`, fails the current test when `ok` is false.
///
/// Returns `ok`, so tests write `if !require(cond, "why") { return; }`.
///
/// # Panics
///
/// Under `CI=true` when `ok` is false.
pub fn require(ok: bool, why: &str) -> bool {
    if !ok {
        if ci() {
            panic!("{}: prerequisite missing under CI=true: {why}", test_name());
        }
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and a skip must be seen.
        let _ = writeln!(
            io::stderr(),
            "\n************************************************************\n\
             SKIPPED {}: {why}\n\
             (set CI=true to turn this into a failure)\n\
             ************************************************************",
            test_name()
        );
    }
    ok
}

/// Checks that this process can create network namespaces (root and `ip` available).
///
/// Prints a loud `SKIPPED` line and returns false if not; panics instead under `CI=true`.
pub fn require_root_netns() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root to create network namespaces (run `sudo -E cargo test` or `bash .ci/run`)".into());
        }
        let name = format!("un{}probe", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        match out {
            Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
            Ok(o) if !o.status.success() => Err(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(_) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                raise_nofile_limit();
                Ok(())
            }
        }
    });
    match probe {
        Ok(()) => true,
        Err(why) => require(false, why),
    }
}

/// Like [`require`] for an external program (`dig`, `dhclient`, ...).
pub fn require_tool(tool: &str) -> bool {
    require(which(tool).is_some(), &format!("`{tool}` is not installed"))
}

/// Finds `tool` in `PATH` (plus the sbin directories).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// The 1,000-connection test holds ~2,000 fds in this process (both ends) and usernet
/// inherits the limit: raise the soft `RLIMIT_NOFILE` to the hard limit (capped at 65536).
#[expect(
    unsafe_code,
    reason = "getrlimit/setrlimit are not wrapped by the enabled nix features"
)]
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = lim.rlim_max.min(65536);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: `lim` is a valid rlimit; the call only reads it.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Output of a command that ran to completion or was killed at its deadline.
#[derive(Debug)]
pub struct Finished {
    /// `None` when the deadline expired and the process tree was killed.
    pub status: Option<ExitStatus>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
    /// Wall time until exit (or until the kill).
    pub elapsed: Duration,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Finished {
    /// Exit code, `None` if killed by a signal or timed out.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// True if it exited with code 0.
    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }

    /// Panics with the full output unless it exited with code 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            None => "TIMED OUT (killed)".to_string(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("{s:?}"),
            },
        };
        write!(
            f,
            "$ {}\n-> {status} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes read from a child's pipe by a background thread.
#[derive(Clone, Default)]
pub struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
    /// The pipe's inode, to find the processes that still hold it.
    inode: u64,
}

/// How long [`Captured::text_at_eof`] waits for the end of a pipe that no other process
/// holds: only the capture thread has yet to run, which a busy machine may delay.
pub const EOF_GUARD: Duration = Duration::from_secs(30);

impl Captured {
    fn start(mut r: impl Read + AsRawFd + Send + 'static) -> Self {
        let inode = fs::metadata(format!("/proc/self/fd/{}", r.as_raw_fd()))
            .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        let c = Captured {
            inode,
            ..Captured::default()
        };
        let c2 = c.clone();
        thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                let mut chunk = [0u8; 4096];
                loop {
                    match r.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => c2.buf.lock().unwrap().extend_from_slice(&chunk[..n]),
                    }
                }
                c2.done.store(true, Ordering::SeqCst);
            })
            .expect("spawn capture thread");
        c
    }

    /// Waits up to `t` for EOF (a grandchild may hold the pipe open), then returns the text.
    fn text_after(&self, t: Duration) -> String {
        let end = Instant::now() + t;
        while !self.done.load(Ordering::SeqCst) && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        self.text()
    }

    /// The whole text once the writer has gone: waits for EOF up to [`EOF_GUARD`] while no
    /// other process holds the pipe's write end (the writer exited; the capture thread has
    /// yet to read the rest), but only up to `held` while one does (a daemon the writer
    /// left behind may keep it open for good).
    pub fn text_at_eof(&self, held: Duration) -> String {
        let start = Instant::now();
        // Once no process holds the write end, none can again: no more looking then.
        let mut alone = false;
        let mut next_look = start;
        let mut held_since = None::<Instant>;
        while !self.done.load(Ordering::SeqCst) && start.elapsed() < EOF_GUARD {
            if !alone && Instant::now() >= next_look {
                if self.writer_elsewhere() {
                    let since = *held_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= held {
                        break;
                    }
                    next_look = Instant::now() + Duration::from_millis(100);
                } else {
                    alone = true;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.text()
    }

    /// True if some process holds the pipe's write end (`/proc/PID/fd`, `fdinfo`).
    fn writer_elsewhere(&self) -> bool {
        let want = format!("pipe:[{}]", self.inode);
        let Ok(procs) = fs::read_dir("/proc") else {
            return false;
        };
        let write_only = |fdinfo: PathBuf| {
            let text = fs::read_to_string(fdinfo).unwrap_or_default();
            let flags = text.lines().find_map(|l| l.strip_prefix("flags:"));
            flags
                .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & libc::O_ACCMODE == libc::O_WRONLY)
        };
        procs.flatten().any(|p| {
            let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
                return false;
            };
            fds.flatten().any(|fd| {
                fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str())
                    && write_only(p.path().join("fdinfo").join(fd.file_name()))
            })
        })
    }

    /// What has been captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// PIDs of `pid`'s descendants (children first is not guaranteed; all are returned).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(s) = fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// SIGKILLs `child` and every descendant of it (by PID, collected first), then reaps `child`.
pub fn kill_tree(child: &mut Child) {
    let pid = child.id();
    let mut pids = descendants(pid);
    pids.reverse();
    pids.push(pid);
    for p in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// A background child process; it and its descendants are SIGKILLed (by PID) on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` with all standard streams closed.
    pub fn spawn(mut cmd: Command) -> Self {
        let line = cmdline(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn `{line}`: {e}")),
        )
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill_tree(&mut self.0);
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills its process tree at `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Finished {
    let line = cmdline(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));
    let out = Captured::start(child.stdout.take().expect("piped stdout"));
    let err = Captured::start(child.stderr.take().expect("piped stderr"));
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            kill_tree(&mut child);
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    // All of the output, unless a process it left behind holds a pipe: then what came
    // within a second.
    Finished {
        status,
        stdout: out.text_at_eof(Duration::from_secs(1)),
        stderr: err.text_at_eof(Duration::from_secs(1)),
        elapsed,
        cmdline: line,
    }
}

/// Runs a short helper command (`ip`, `sysctl`, ...) and panics with its output on failure.
#[track_caller]
pub fn sh(prog: &str, args: &[&str]) -> Finished {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let f = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(f.success(), "helper command failed:\n{f}");
    f
}

/// `ip ARGS...`, panicking on failure.
#[track_caller]
pub fn ip(args: &[&str]) -> Finished {
    sh("ip", args)
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

/// Path of a named network namespace created by `ip netns add`.
pub fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns({path}, CLONE_NEWNET): {e}"));
}

/// Runs `f` on a fresh thread that has joined the network namespace at `ns_path`
/// (`/run/netns/NAME` or `/proc/PID/ns/net`) and returns its result; panics propagate.
pub fn in_netns<R: Send>(ns_path: &str, f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        let h = thread::Builder::new()
            .name(format!("{} in {ns_path}", test_name()))
            .spawn_scoped(s, || {
                enter_netns(ns_path);
                f()
            })
            .expect("spawn netns thread");
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Spawns a long-running thread inside the network namespace at `ns_path`.
pub fn spawn_in_netns<R: Send + 'static>(
    ns_path: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> JoinHandle<R> {
    let p = ns_path.to_string();
    thread::Builder::new()
        .name(format!("{} in {ns_path}", test_name()))
        .spawn(move || {
            enter_netns(&p);
            f()
        })
        .expect("spawn netns thread")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Three throw-away namespaces (see the module docs); all removed on drop.
pub struct Topology {
    /// Name of the host namespace (usernet runs here).
    pub host: String,
    /// Name of the world namespace.
    pub world: String,
    /// Name of the container namespace.
    pub container: String,
    /// A private scratch directory (scripts, lease files), removed on drop.
    pub tmp: PathBuf,
    created: Vec<String>,
    etc_dir: Option<PathBuf>,
}

impl Topology {
    /// Builds the topology, or returns `None` after a loud SKIPPED line (panics under CI).
    ///
    /// # Panics
    ///
    /// If a setup command fails (the partial topology is still removed).
    pub fn new() -> Option<Self> {
        Self::build(false)
    }

    /// [`new`](Self::new) plus IPv6 on H and W (see the module docs): H `vh`
    /// 2001:db8:1::1/64 and ::3/64 (deprecated: only used when bound explicitly), `ob0`
    /// 2001:db8:1::9/128; W `vw` 2001:db8:1::2/64, `lo` 2001:db8:2::1 ([`WORLD6`]); H routes
    /// 2001:db8:2::/64 via W; no duplicate address detection in H and W (C keeps the kernel
    /// defaults). `None` after a loud SKIPPED line when IPv6 is missing (panics under CI).
    ///
    /// # Panics
    ///
    /// If a setup command fails (the partial topology is still removed).
    pub fn new_ipv6() -> Option<Self> {
        if !require_root_netns() {
            return None;
        }
        let v6 = Path::new("/proc/sys/net/ipv6/conf/default/disable_ipv6").exists();
        if !require(v6, "the kernel has no IPv6 (/proc/sys/net/ipv6 missing)") {
            return None;
        }
        Self::build(true)
    }

    fn build(ipv6: bool) -> Option<Self> {
        if !require_root_netns() {
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("un{}n{}", std::process::id(), n);
        let mut t = Topology {
            host: format!("{base}h"),
            world: format!("{base}w"),
            container: format!("{base}c"),
            tmp: std::env::temp_dir().join(format!("usernet-test-{base}")),
            created: Vec::new(),
            etc_dir: None,
        };
        t.setup(ipv6);
        Some(t)
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.created.push(name.to_string());
    }

    fn setup(&mut self, ipv6: bool) {
        let _ = fs::remove_dir_all(&self.tmp);
        fs::create_dir_all(&self.tmp).expect("create scratch dir");
        fs::set_permissions(&self.tmp, fs::Permissions::from_mode(0o755)).expect("chmod tmp");

        let (h, w, c) = (
            self.host.clone(),
            self.world.clone(),
            self.container.clone(),
        );
        self.add_netns(&h);
        self.add_netns(&w);
        self.add_netns(&c);
        if ipv6 {
            // Before any interface exists: no duplicate address detection on H's and W's
            // addresses (link-local ones included), so they are usable at once.
            for ns in [&h, &w] {
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv6.conf.all.disable_ipv6=0",
                        "net.ipv6.conf.default.disable_ipv6=0",
                        "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0",
                    ],
                );
            }
        }

        // resolv.conf that `ip netns exec H` bind-mounts over /etc/resolv.conf.
        let etc = PathBuf::from(format!("/etc/netns/{h}"));
        fs::create_dir_all(&etc).expect("create /etc/netns/H");
        self.etc_dir = Some(etc.clone());
        fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("write resolv.conf");
        fs::set_permissions(etc.join("resolv.conf"), fs::Permissions::from_mode(0o644))
            .expect("chmod resolv.conf");

        // H <-> W.
        ip(&["-n", &h, "link", "set", "lo", "up"]);
        ip(&["-n", &w, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &h, "link", "add", "vh", "type", "veth", "peer", "name", "vw", "netns", &w,
        ]);
        ip(&["-n", &h, "addr", "add", "198.51.100.1/24", "dev", "vh"]);
        ip(&["-n", &h, "addr", "add", "198.51.100.3/24", "dev", "vh"]);
        ip(&["-n", &h, "link", "set", "vh", "up"]);
        ip(&["-n", &w, "addr", "add", "198.51.100.2/24", "dev", "vw"]);
        ip(&["-n", &w, "link", "set", "vw", "up"]);
        // All of 203.0.113.0/24 is local to W.
        ip(&["-n", &w, "addr", "add", "203.0.113.1/24", "dev", "lo"]);
        ip(&[
            "-n",
            &h,
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "198.51.100.2",
        ]);
        // ob0: an interface of H whose only address differs from the default source, for
        // `--outbound-addr IFNAME`. W answers ARP for it over vh/vw (arp_ignore=0).
        ip(&[
            "-n", &h, "link", "add", "ob0", "type", "veth", "peer", "name", "ob1", "netns", &w,
        ]);
        ip(&["-n", &h, "addr", "add", "198.51.100.9/32", "dev", "ob0"]);
        ip(&["-n", &h, "link", "set", "ob0", "up"]);
        ip(&["-n", &w, "link", "set", "ob1", "up"]);
        if ipv6 {
            self.setup_ipv6();
        }
    }

    fn setup_ipv6(&self) {
        let (h, w) = (&self.host, &self.world);
        for (ns, addr, dev) in [
            (h, "2001:db8:1::1/64", "vh"),
            (h, "2001:db8:1::9/128", "ob0"),
            (w, "2001:db8:1::2/64", "vw"),
            (w, "2001:db8:2::1/128", "lo"),
        ] {
            ip(&["-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        // Deprecated (preferred lifetime 0): usable when bound explicitly, never chosen as a
        // default source, so ::1 stays what the world sees.
        ip(&[
            "-n",
            h,
            "-6",
            "addr",
            "add",
            "2001:db8:1::3/64",
            "dev",
            "vh",
            "nodad",
            "preferred_lft",
            "0",
        ]);
        ip(&[
            "-n",
            h,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:1::2",
        ]);
        // W reaches ob0's address over ob1: IPv6 answers neighbor solicitations only for
        // addresses of the receiving interface (no weak-host NDP as with ARP).
        ip(&[
            "-n",
            w,
            "-6",
            "route",
            "add",
            "2001:db8:1::9/128",
            "dev",
            "ob1",
        ]);
    }

    /// `/run/netns/H`.
    pub fn host_ns(&self) -> String {
        netns_path(&self.host)
    }

    /// `/run/netns/W`.
    pub fn world_ns(&self) -> String {
        netns_path(&self.world)
    }

    /// `/run/netns/C`.
    pub fn container_ns(&self) -> String {
        netns_path(&self.container)
    }

    /// Runs `f` inside C.
    pub fn in_container<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.container_ns(), f)
    }

    /// Runs `f` inside H.
    pub fn in_host<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.host_ns(), f)
    }

    /// Runs `f` inside W.
    pub fn in_world<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.world_ns(), f)
    }

    /// A command that runs `prog args` inside netns `ns` via `ip netns exec`.
    pub fn exec_in(&self, ns: &str, prog: impl AsRef<OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(prog).args(args);
        cmd
    }

    /// Runs `prog args` inside C with a deadline.
    pub fn run_in_container(&self, prog: &str, args: &[&str], timeout: Duration) -> Finished {
        run_with_timeout(self.exec_in(&self.container, prog, args), timeout)
    }

    /// `sysctl -w key=value` inside H (e.g. `net.ipv4.ping_group_range`, which is per netns).
    pub fn host_sysctl(&self, key: &str, value: &str) {
        let kv = format!("{key}={value}");
        sh(
            "ip",
            &["netns", "exec", &self.host, "sysctl", "-q", "-w", &kv],
        );
    }

    /// Configures C's `tap0` as `usernet -c` would (for a pre-created TAP or a tap fd).
    pub fn configure_container_tap(&self, tap: &str) {
        let c = self.container.clone();
        ip(&["-n", &c, "link", "set", "lo", "up"]);
        ip(&["-n", &c, "addr", "add", "10.0.2.100/24", "dev", tap]);
        ip(&["-n", &c, "link", "set", tap, "up"]);
        ip(&["-n", &c, "route", "add", "default", "via", "10.0.2.2"]);
    }

    /// Harness self-test only: wires C to H with a plain kernel veth (C `tap0` 10.0.2.100/24,
    /// H `vc` 10.0.2.2/24, H forwarding, W routing 10.0.2.0/24 back): a stand-in for usernet
    /// without NAT and without the virtual services.
    pub fn wire_kernel_veth(&self) {
        let (h, w, c) = (&self.host, &self.world, &self.container);
        ip(&[
            "-n", h, "link", "add", "vc", "type", "veth", "peer", "name", "tap0", "netns", c,
        ]);
        ip(&["-n", h, "addr", "add", "10.0.2.2/24", "dev", "vc"]);
        ip(&["-n", h, "link", "set", "vc", "up"]);
        self.configure_container_tap("tap0");
        self.host_sysctl("net.ipv4.ip_forward", "1");
        ip(&[
            "-n",
            w,
            "route",
            "add",
            "10.0.2.0/24",
            "via",
            "198.51.100.1",
        ]);
    }

    /// Replaces the `/etc/resolv.conf` that usernet (started after this) sees in H.
    pub fn set_host_resolv_conf(&self, text: &str) {
        let path = PathBuf::from(format!("/etc/netns/{}/resolv.conf", self.host));
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Gives commands run with `ip netns exec C` (`run_in_container`) this
    /// `/etc/resolv.conf`, e.g. `nameserver 10.0.2.3`, so that their resolver asks
    /// usernet and never the machine's own nameservers. Removed on drop.
    pub fn set_container_resolv_conf(&self, text: &str) {
        let dir = PathBuf::from(format!("/etc/netns/{}", self.container));
        fs::create_dir_all(&dir).expect("create /etc/netns/C");
        let path = dir.join("resolv.conf");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The IPv6 addresses of `dev` in C (`ip -o -6 addr show`), flags included.
    pub fn container_addrs6(&self, dev: &str) -> String {
        ip(&[
            "-n",
            &self.container,
            "-o",
            "-6",
            "addr",
            "show",
            "dev",
            dev,
        ])
        .stdout
    }

    /// `ip -n C -o link show DEV`, for MTU and MAC checks.
    pub fn container_link(&self, dev: &str) -> String {
        ip(&["-n", &self.container, "-o", "link", "show", dev]).stdout
    }

    /// The IPv4 addresses of `dev` in C (`ip -o -4 addr show`).
    pub fn container_addrs(&self, dev: &str) -> String {
        ip(&[
            "-n",
            &self.container,
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            dev,
        ])
        .stdout
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            // A test may already have deleted C on purpose.
            if let Ok(o) = out {
                if !o.status.success() && Path::new(&netns_path(ns)).exists() {
                    eprintln!(
                        "warning: ip netns del {ns}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
            }
        }
        if let Some(etc) = &self.etc_dir {
            let _ = fs::remove_dir_all(etc);
        }
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.container));
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `offset..offset+buf.len()` of the deterministic stream `seed`
/// (independent of how the stream is chunked).
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let key = splitmix64(seed);
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let block = splitmix64(key ^ (pos / 8)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&block[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// The first `len` bytes of stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_pattern(seed, 0, &mut v);
    v
}

/// SHA-256 of the first `len` bytes of stream `seed`.
pub fn pattern_digest(seed: u64, len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().into()
}

/// SHA-256 of a byte slice.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex, for messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `len` bytes of stream `seed` to `w`; returns their SHA-256.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_pattern(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

/// Reads `r` to EOF; returns the SHA-256 and the byte count.
pub fn read_digest(r: &mut impl Read) -> io::Result<([u8; 32], u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((h.finalize().into(), total))
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn set_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set_read_timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set_write_timeout");
}

/// TCP connect with [`CONNECT_TIMEOUT`] and [`IO_TIMEOUT`] on the stream.
pub fn connect(addr: SocketAddrV4) -> io::Result<TcpStream> {
    connect_at(addr.into())
}

/// [`connect`] over IPv6.
pub fn connect6(addr: SocketAddrV6) -> io::Result<TcpStream> {
    connect_at(addr.into())
}

fn connect_at(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    set_timeouts(&s);
    Ok(s)
}

/// Sends `len` bytes of stream `seed` to a [`TcpServer::sink`], half-closes, and checks the
/// digest the sink sends back. Call it from inside the client's namespace.
///
/// # Panics
///
/// On any I/O error or digest mismatch.
#[track_caller]
pub fn upload_to_sink(addr: SocketAddrV4, seed: u64, len: u64) -> [u8; 32] {
    upload_to_sink_at(addr.into(), seed, len)
}

/// [`upload_to_sink`] over IPv6.
#[track_caller]
pub fn upload_to_sink6(addr: SocketAddrV6, seed: u64, len: u64) -> [u8; 32] {
    upload_to_sink_at(addr.into(), seed, len)
}

#[track_caller]
fn upload_to_sink_at(addr: SocketAddr, seed: u64, len: u64) -> [u8; 32] {
    let t0 = Instant::now();
    let mut s = connect_at(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let sent = send_pattern(&mut s, seed, len).unwrap_or_else(|e| {
        panic!(
            "upload to {addr}: write failed after {:.2?}: {e}",
            t0.elapsed()
        )
    });
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .unwrap_or_else(|e| panic!("upload to {addr}: reading the sink's reply: {e}"));
    assert_eq!(
        reply.len(),
        40,
        "sink reply must be digest + length, got {} bytes",
        reply.len()
    );
    let got_len = u64::from_le_bytes(reply[32..40].try_into().expect("8 bytes"));
    assert_eq!(
        got_len, len,
        "sink at {addr} received {got_len} bytes, {len} were sent"
    );
    assert_eq!(
        hex(&reply[..32]),
        hex(&sent),
        "sink at {addr} received different bytes than were sent"
    );
    eprintln!(
        "upload {len} bytes to {addr}: {:.2?} ({:.0} Mbit/s)",
        t0.elapsed(),
        len as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6
    );
    sent
}

/// Asks a [`TcpServer::source`] for `len` bytes of stream `seed`, reads to EOF and checks the
/// digest. Call it from inside the client's namespace.
///
/// # Panics
///
/// On any I/O error or digest mismatch.
#[track_caller]
pub fn download_from_source(addr: SocketAddrV4, seed: u64, len: u64) {
    download_from_source_at(addr.into(), seed, len);
}

/// [`download_from_source`] over IPv6.
#[track_caller]
pub fn download_from_source6(addr: SocketAddrV6, seed: u64, len: u64) {
    download_from_source_at(addr.into(), seed, len);
}

#[track_caller]
fn download_from_source_at(addr: SocketAddr, seed: u64, len: u64) {
    let t0 = Instant::now();
    let mut s = connect_at(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&seed.to_le_bytes());
    req[8..].copy_from_slice(&len.to_le_bytes());
    s.write_all(&req).expect("send download request");
    let (digest, n) = read_digest(&mut s).unwrap_or_else(|e| {
        panic!(
            "download from {addr}: read failed after {:.2?}: {e}",
            t0.elapsed()
        )
    });
    assert_eq!(
        n, len,
        "download from {addr}: got {n} bytes, expected {len}"
    );
    assert_eq!(
        hex(&digest),
        hex(&pattern_digest(seed, len)),
        "download from {addr}: bytes differ from what the source sent"
    );
    eprintln!(
        "download {len} bytes from {addr}: {:.2?} ({:.0} Mbit/s)",
        t0.elapsed(),
        len as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6
    );
}

/// One request/reply through a [`TcpServer::echo`]: sends `data`, half-closes, reads to EOF.
#[track_caller]
pub fn echo_once(addr: SocketAddrV4, data: &[u8]) {
    echo_once_at(addr.into(), data);
}

/// [`echo_once`] over IPv6.
#[track_caller]
pub fn echo_once6(addr: SocketAddrV6, data: &[u8]) {
    echo_once_at(addr.into(), data);
}

#[track_caller]
fn echo_once_at(addr: SocketAddr, data: &[u8]) {
    let mut s = connect_at(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(data).expect("echo write");
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("echo read");
    assert_eq!(back.len(), data.len(), "echo from {addr}: length differs");
    assert_eq!(
        sha256(&back),
        sha256(data),
        "echo from {addr}: bytes differ"
    );
}

/// Client side of a server-first half-close against [`TcpServer::half_close`]: reads the
/// greeting up to the server's FIN, then (on the still-open write side) sends `len` bytes of
/// stream `seed`, half-closes and waits for the server's close. Returns the digest sent; the
/// caller checks it against the server's record.
#[track_caller]
pub fn half_close_server_first(addr: SocketAddrV4, seed: u64, len: u64) -> [u8; 32] {
    let mut s = connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting)
        .unwrap_or_else(|e| panic!("reading up to the server's FIN from {addr}: {e}"));
    assert_eq!(
        greeting, HALF_CLOSE_GREETING,
        "greeting before the server's FIN"
    );
    let sent = send_pattern(&mut s, seed, len)
        .unwrap_or_else(|e| panic!("writing after the server's FIN to {addr}: {e}"));
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("waiting for the final close: {e}"));
    assert!(rest.is_empty(), "no data expected after the server's FIN");
    sent
}

/// Bytes on either side of the urgent byte of [`urgent_stream`].
pub const URGENT_AT: usize = 1000;

/// What [`send_with_urgent`] sends: 2,001 bytes, byte [`URGENT_AT`] the urgent one.
pub fn urgent_stream() -> Vec<u8> {
    pattern(0x0B, 2 * URGENT_AT + 1)
}

/// Sends [`urgent_stream`] on `s`: 1,000 bytes, one byte with `MSG_OOB` (the urgent
/// byte), 1,000 bytes.
#[track_caller]
pub fn send_with_urgent(s: &mut TcpStream) {
    use nix::sys::socket::{send, MsgFlags};
    let data = urgent_stream();
    s.write_all(&data[..URGENT_AT])
        .expect("the bytes before the urgent one");
    let n = send(
        s.as_raw_fd(),
        &data[URGENT_AT..=URGENT_AT],
        MsgFlags::MSG_OOB,
    )
    .expect("send(MSG_OOB)");
    assert_eq!(n, 1, "the urgent byte");
    s.write_all(&data[URGENT_AT + 1..])
        .expect("the bytes after the urgent one");
}

/// Relays [`urgent_stream`] from `sender` (a socket of the namespace at `sender_ns`) to
/// `receiver` through usernet `u`, with all its bytes, and with `fin` its FIN
/// (`shutdown(Write)`), queued on usernet's host socket before usernet reads any: usernet
/// is stopped while `sender` sends, until `ss` shows every byte acknowledged (and with
/// `fin` the sender in FIN-WAIT-2). Then asserts that `receiver` gets every byte, the
/// urgent one inline, and, once the sender shut down, the end of the stream.
#[track_caller]
pub fn assert_urgent_stream_relayed(
    u: &Usernet,
    sender_ns: &str,
    sender: &mut TcpStream,
    receiver: &mut TcpStream,
    fin: bool,
) {
    assert_urgent_stream_relayed_by(&|sig| u.signal(sig), sender_ns, sender, receiver, fin);
}

/// [`assert_urgent_stream_relayed`] through a relay that `signal` stops (`SIGSTOP`) and
/// resumes (`SIGCONT`): usernet, or all the processes of a [`Pasta`].
#[track_caller]
pub fn assert_urgent_stream_relayed_by(
    signal: &dyn Fn(Signal),
    sender_ns: &str,
    sender: &mut TcpStream,
    receiver: &mut TcpStream,
    fin: bool,
) {
    let port = sender.local_addr().expect("local_addr").port();
    let peer = sender.peer_addr().expect("peer_addr").port();
    let state = if fin { "fin-wait-2" } else { "established" };
    signal(Signal::SIGSTOP);
    send_with_urgent(sender);
    if fin {
        sender.shutdown(Shutdown::Write).expect("shutdown(Write)");
    }
    // `ss -H` with one state: Recv-Q, Send-Q, local and peer address.
    let acked = wait_for(IO_TIMEOUT, || {
        let out = in_netns(sender_ns, || {
            // Both ports: a server's other connections share its local port.
            Command::new("ss")
                .args(["-tnH", "state", state, "sport", "=", &format!(":{port}")])
                .args(["and", "dport", "=", &format!(":{peer}")])
                .output()
        })
        .expect("ss");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.split_whitespace().nth(1) == Some("0")).then_some(())
    });
    signal(Signal::SIGCONT);
    assert!(
        acked.is_some(),
        "the sender's bytes were never all acknowledged ({state})"
    );
    receiver
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("timeout");
    let want = urgent_stream();
    let mut got = vec![0u8; want.len()];
    let mut n = 0;
    while n < got.len() {
        match receiver.read(&mut got[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => panic!("reading after {n} bytes (the urgent byte at {URGENT_AT}): {e}"),
        }
    }
    assert_eq!(
        n,
        want.len(),
        "bytes received before the end of the stream (the urgent byte at {URGENT_AT})"
    );
    assert!(got == want, "the bytes received differ from the bytes sent");
    if !fin {
        sender.shutdown(Shutdown::Write).expect("shutdown(Write)");
    }
    let mut rest = Vec::new();
    receiver
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("waiting for the end of the stream: {e}"));
    assert!(
        rest.is_empty(),
        "{} bytes after the stream's end",
        rest.len()
    );
}

/// Opens `n` connections to a [`TcpServer::echo`] (all open at once), sends `each` distinct
/// bytes on every one, checks every echo, then closes them all.
#[track_caller]
pub fn concurrent_echo(addr: SocketAddrV4, n: usize, each: usize) {
    concurrent_echo_with(addr, n, each, || {});
}

/// [`concurrent_echo`], calling `while_open` after every echo was checked and before any
/// connection is closed.
#[track_caller]
pub fn concurrent_echo_with(addr: SocketAddrV4, n: usize, each: usize, while_open: impl FnOnce()) {
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = connect(addr).unwrap_or_else(|e| {
            panic!(
                "connection {i} of {n} to {addr} failed after {:.2?}: {e}",
                t0.elapsed()
            )
        });
        conns.push(s);
    }
    eprintln!("{n} connections to {addr} open after {:.2?}", t0.elapsed());
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&pattern(i as u64, each))
            .unwrap_or_else(|e| panic!("write on connection {i}: {e}"));
    }
    let mut buf = vec![0u8; each];
    for (i, s) in conns.iter_mut().enumerate() {
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("read echo on connection {i}: {e}"));
        assert!(
            buf == pattern(i as u64, each),
            "echo on connection {i} differs"
        );
    }
    while_open();
    for (i, s) in conns.iter_mut().enumerate() {
        s.shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("shutdown connection {i}: {e}"));
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut rest = [0u8; 16];
        let r = s.read(&mut rest);
        assert!(
            matches!(r, Ok(0)),
            "connection {i}: expected EOF after the echo, got {r:?}"
        );
    }
    drop(conns);
    eprintln!(
        "{n} connections exchanged data and closed after {:.2?}",
        t0.elapsed()
    );
}

/// Asserts that a TCP connect to `addr` fails with ECONNREFUSED.
#[track_caller]
pub fn assert_refused(addr: SocketAddrV4) {
    assert_refused_at(addr.into());
}

/// [`assert_refused`] over IPv6.
#[track_caller]
pub fn assert_refused6(addr: SocketAddrV6) {
    assert_refused_at(addr.into());
}

#[track_caller]
fn assert_refused_at(addr: SocketAddr) {
    assert_connect_fails(addr, &[libc::ECONNREFUSED], "ECONNREFUSED");
}

/// Asserts that a TCP connect to `addr` fails with one of `errnos`: an answer, not a timeout
/// (a connect that timed out carries no such errno), however long a busy machine took.
#[track_caller]
fn assert_connect_fails(addr: SocketAddr, errnos: &[i32], expected: &str) {
    let t0 = Instant::now();
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => panic!("connect to {addr} succeeded, expected {expected}"),
        Err(e) => assert!(
            e.raw_os_error().is_some_and(|n| errnos.contains(&n)),
            "connect to {addr}: expected {expected}, got {e} after {:.2?}",
            t0.elapsed()
        ),
    }
}

/// Asserts that a TCP connect to `addr` fails with EHOSTUNREACH or ENETUNREACH (an answer,
/// not a timeout).
#[track_caller]
pub fn assert_unreachable(addr: SocketAddrV4) {
    assert_unreachable_at(addr.into());
}

/// [`assert_unreachable`] over IPv6.
#[track_caller]
pub fn assert_unreachable6(addr: SocketAddrV6) {
    assert_unreachable_at(addr.into());
}

#[track_caller]
fn assert_unreachable_at(addr: SocketAddr) {
    assert_connect_fails(
        addr,
        &[libc::EHOSTUNREACH, libc::ENETUNREACH],
        "EHOSTUNREACH or ENETUNREACH",
    );
}

/// Asserts that a TCP connect to `addr` fails with ENETUNREACH ("Network is unreachable":
/// an ICMP/ICMPv6 network unreachable came back, not a timeout).
#[track_caller]
pub fn assert_net_unreachable(addr: SocketAddr) {
    assert_connect_fails(addr, &[libc::ENETUNREACH], "ENETUNREACH");
}

/// Sends one datagram to `addr` from a connected UDP socket and returns the error the
/// socket then reports (the errno of an ICMP error that came back), `None` if a reply or
/// nothing arrived within `wait`. The socket asks for every ICMP error (`IP_RECVERR`,
/// `IPV6_RECVERR`, as ping and traceroute do): without it Linux reports only port
/// unreachable and prohibited to a UDP socket. Call inside a namespace.
pub fn udp_error_after_send(addr: SocketAddr, payload: &[u8], wait: Duration) -> Option<i32> {
    use nix::sys::socket::{setsockopt, sockopt};
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind).expect("bind UDP");
    match addr {
        SocketAddr::V4(_) => setsockopt(&s, sockopt::Ipv4RecvErr, &true),
        SocketAddr::V6(_) => setsockopt(&s, sockopt::Ipv6RecvErr, &true),
    }
    .expect("RECVERR");
    s.connect(addr).expect("connect UDP");
    if let Err(e) = s.send(payload) {
        return e.raw_os_error();
    }
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 2048];
    match s.recv(&mut buf) {
        Ok(_) => None,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => e.raw_os_error(),
    }
}

/// A UDP socket with [`IO_TIMEOUT`]-free short timeouts, for request/reply tests.
pub fn udp_socket(bind: SocketAddrV4) -> UdpSocket {
    udp_socket_at(bind.into())
}

/// [`udp_socket`] on an IPv6 address.
pub fn udp_socket6(bind: SocketAddrV6) -> UdpSocket {
    udp_socket_at(bind.into())
}

fn udp_socket_at(bind: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp {bind}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("udp timeout");
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("udp timeout");
    s
}

/// A UDP server in a namespace that behaves like `socat UDP-LISTEN`: it `connect()`s to the
/// sender of its first datagram, so a later datagram of that client that arrives from another
/// address or port is not delivered (the kernel answers "port unreachable"). It keeps what it
/// gets until it has `want` datagrams, or none came for [`IO_TIMEOUT`] (the first: twice
/// that from `start`, which may come well before the client's set-up).
pub struct ConnectedUdpServer {
    pub addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<FirstPeerAndDatagrams>>,
}

/// What a [`ConnectedUdpServer`] got: its first peer, and every datagram.
pub type FirstPeerAndDatagrams = (Option<SocketAddr>, Vec<Vec<u8>>);

impl ConnectedUdpServer {
    pub fn start(ns: &str, bind: SocketAddr, want: usize) -> Self {
        let sock = in_netns(ns, || UdpSocket::bind(bind))
            .unwrap_or_else(|e| panic!("bind udp {bind} in {ns}: {e}"));
        let addr = sock.local_addr().expect("local_addr");
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            sock.set_read_timeout(Some(2 * IO_TIMEOUT)).unwrap();
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return (None, got);
            };
            got.push(buf[..n].to_vec());
            sock.connect(peer).expect("connect to the first peer");
            sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            while got.len() < want {
                match sock.recv(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(_) => break,
                }
            }
            (Some(peer), got)
        });
        ConnectedUdpServer {
            addr,
            thread: Some(thread),
        }
    }

    /// The first peer and every datagram received, once the server is done.
    pub fn finish(mut self) -> FirstPeerAndDatagrams {
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("server thread")
    }
}

/// Sends `datagrams` to `dst` from one socket bound to `bind`, with `gap` between them, and
/// checks that a [`ConnectedUdpServer`] got every one of them from one association.
pub fn assert_one_udp_association(server: ConnectedUdpServer, bind: SocketAddr, dst: SocketAddr) {
    let sock = udp_socket_at(bind);
    let datagrams: [&[u8]; 4] = [b"x", b"", b"second after a gap", b"z"];
    for (i, d) in datagrams.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        sock.send_to(d, dst)
            .unwrap_or_else(|e| panic!("send datagram {i} to {dst}: {e}"));
    }
    let (peer, got) = server.finish();
    let want: Vec<Vec<u8>> = datagrams.iter().map(|d| d.to_vec()).collect();
    assert_eq!(
        got,
        want,
        "a client socket at {:?} sending to {dst}: the container (connected to its first peer {peer:?}) got these datagrams",
        sock.local_addr()
    );
}

/// Sends `payload` to `dst` and waits for an identical datagram back from `dst`, retrying
/// `tries` times (2 s each). Returns the number of attempts used.
pub fn udp_roundtrip(
    sock: &UdpSocket,
    dst: SocketAddrV4,
    payload: &[u8],
    tries: u32,
) -> Result<u32, String> {
    udp_roundtrip_at(sock, dst.into(), payload, tries)
}

/// [`udp_roundtrip`] over IPv6.
pub fn udp_roundtrip6(
    sock: &UdpSocket,
    dst: SocketAddrV6,
    payload: &[u8],
    tries: u32,
) -> Result<u32, String> {
    udp_roundtrip_at(sock, dst.into(), payload, tries)
}

fn udp_roundtrip_at(
    sock: &UdpSocket,
    dst: SocketAddr,
    payload: &[u8],
    tries: u32,
) -> Result<u32, String> {
    let mut buf = vec![0u8; 65536];
    let mut last = String::new();
    for attempt in 1..=tries {
        if let Err(e) = sock.send_to(payload, dst) {
            last = format!("send_to {dst}: {e}");
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if (from.ip(), from.port()) != (dst.ip(), dst.port()) {
                        last = format!("datagram from unexpected source {from}");
                        continue;
                    }
                    if buf[..n] == *payload {
                        return Ok(attempt);
                    }
                    last = format!("reply of {n} bytes differs from the {} sent", payload.len());
                }
                Err(e) => {
                    last = format!("recv: {e}");
                    break;
                }
            }
        }
    }
    Err(format!(
        "no UDP echo of {} bytes from {dst} after {tries} tries: {last}",
        payload.len()
    ))
}

/// Sizes of one burst, chosen to start and end segmented runs in every way: equal sizes, a
/// shorter one (ends its run), a larger one (starts a new run), more than 64 datagrams
/// (the most in one run), more than 64 KiB in one run, an empty datagram, and sizes above
/// a 1500-byte path MTU (which a route of that MTU cannot segment).
pub fn udp_burst_sizes() -> Vec<usize> {
    let mut v = vec![
        1400, 1400, 1400, 700, 1400, 1400, 1472, 1472, 1, 1, 0, 1000, 1000,
    ];
    v.extend([100; 70]);
    v.extend([1400; 50]);
    v.extend([8000, 8000, 8000, 3000, 5, 9000, 1200, 1200]);
    v
}

/// Sends [`udp_burst_sizes`] on `sock` (a container socket) to `dst` while usernet is
/// stopped, so that one TAP read batch holds the whole burst, then resumes it and returns
/// what `rx` received, in order.
pub fn udp_stopped_burst(
    u: &Usernet,
    sock: &UdpSocket,
    rx: &UdpSocket,
    dst: SocketAddr,
    seed: u64,
) -> Vec<Vec<u8>> {
    let sizes = udp_burst_sizes();
    // Room for the whole burst, which arrives faster than this thread reads.
    nix::sys::socket::setsockopt(rx, nix::sys::socket::sockopt::RcvBuf, &(4 << 20))
        .expect("SO_RCVBUF");
    let mut buf = vec![0u8; 65536];
    // One datagram through first: the container has resolved the gateway (ARP, NDP) and
    // usernet has the flow, so the burst waits in the TAP queue, not in a neighbour queue.
    // Sent once (a copy sent again could arrive amid the burst): the neighbour queue keeps it
    // while the address is resolved, however slowly.
    rx.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    sock.send_to(b"warm-up", dst)
        .expect("send the warm-up datagram");
    let n = rx.recv(&mut buf).expect("the warm-up datagram");
    assert_eq!(&buf[..n], b"warm-up");
    let pid = Pid::from_raw(i32::try_from(u.pid).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP usernet");
    for (i, &n) in sizes.iter().enumerate() {
        sock.send_to(&pattern(seed + i as u64, n), dst)
            .unwrap_or_else(|e| panic!("send datagram {i} ({n} bytes): {e}"));
    }
    nix::sys::signal::kill(pid, Signal::SIGCONT).expect("SIGCONT usernet");
    let mut got = Vec::new();
    let end = Instant::now() + IO_TIMEOUT;
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    while got.len() < sizes.len() && Instant::now() < end {
        if let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

/// Compares what arrived with what a burst of `seed` sent, datagram for datagram.
pub fn assert_udp_burst(got: &[Vec<u8>], seed: u64, what: &str) {
    let sizes = udp_burst_sizes();
    let got_sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        got_sizes, sizes,
        "{what}: datagram sizes received, in order"
    );
    for (i, (d, &n)) in got.iter().zip(&sizes).enumerate() {
        assert!(
            *d == pattern(seed + i as u64, n),
            "{what}: datagram {i} ({n} bytes) differs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// What a test server saw.
#[derive(Default)]
pub struct Stats {
    /// Connections accepted (TCP) or datagrams received (UDP).
    pub accepted: AtomicUsize,
    /// Connections currently open.
    pub open: AtomicUsize,
    /// Highest value `open` reached.
    pub max_open: AtomicUsize,
    /// Peer address of every connection or datagram.
    pub peers: Mutex<Vec<SocketAddr>>,
    /// (peer, SHA-256, length) of what a sink or half-close server received.
    pub digests: Mutex<Vec<(SocketAddr, [u8; 32], u64)>>,
    /// Errors in connection handlers.
    pub errors: Mutex<Vec<String>>,
}

impl Stats {
    /// Distinct peer IP addresses seen.
    pub fn peer_ips(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| match p {
                SocketAddr::V4(a) => Some(*a.ip()),
                SocketAddr::V6(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Distinct peer IPv6 addresses seen (IPv4-mapped ones included as such).
    pub fn peer_ips6(&self) -> Vec<Ipv6Addr> {
        let mut v: Vec<Ipv6Addr> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| match p {
                SocketAddr::V6(a) => Some(*a.ip()),
                SocketAddr::V4(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Waits up to `t` for `n` recorded digests.
    pub fn wait_digests(&self, n: usize, t: Duration) -> Vec<(SocketAddr, [u8; 32], u64)> {
        let end = Instant::now() + t;
        loop {
            let d = self.digests.lock().unwrap().clone();
            if d.len() >= n || Instant::now() > end {
                return d;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

type Handler = Arc<dyn Fn(&mut TcpStream, SocketAddr, &Stats) -> io::Result<()> + Send + Sync>;

/// A TCP server bound inside a namespace, served by an accept thread plus one small thread per
/// connection. Stops accepting on drop. [`TcpServer`] on IPv4, [`TcpServer6`] on IPv6.
pub struct TcpServerOn<A> {
    /// The bound address.
    pub addr: A,
    /// What it saw.
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// [`TcpServerOn`] an IPv4 address.
pub type TcpServer = TcpServerOn<SocketAddrV4>;

/// [`TcpServerOn`] an IPv6 address (`[::]` also accepts IPv4).
pub type TcpServer6 = TcpServerOn<SocketAddrV6>;

/// The address family of a test server: how it listens and what it bound.
pub trait ServerAddr: Copy + Send + Sync + std::fmt::Display + Into<SocketAddr> {
    /// A listening TCP socket on the address ([`tcp_listen`], [`tcp_listen6`]).
    fn tcp_listen(self) -> io::Result<TcpListener>;
    /// The bound address a socket of this family reports.
    fn bound(local: SocketAddr) -> Self;
}

impl ServerAddr for SocketAddrV4 {
    fn tcp_listen(self) -> io::Result<TcpListener> {
        tcp_listen(self)
    }

    fn bound(local: SocketAddr) -> Self {
        match local {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound an IPv4 address"),
        }
    }
}

impl ServerAddr for SocketAddrV6 {
    fn tcp_listen(self) -> io::Result<TcpListener> {
        tcp_listen6(self)
    }

    fn bound(local: SocketAddr) -> Self {
        match local {
            SocketAddr::V6(a) => a,
            SocketAddr::V4(_) => unreachable!("bound an IPv6 address"),
        }
    }
}

/// A listening socket with a large backlog (the 1,000-connection test opens them back to back).
pub fn tcp_listen(addr: SocketAddrV4) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    listen(&fd, Backlog::new(4096).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

/// Serves `listener` (already bound) from an accept thread.
fn serve(
    listener: TcpListener,
    name: String,
    handler: Handler,
) -> (Arc<Stats>, Arc<AtomicBool>, JoinHandle<()>) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (st, sp) = (stats.clone(), stop.clone());
    let accept = thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(listener, handler, st, sp))
        .expect("spawn accept thread");
    (stats, stop, accept)
}

fn sink_handler(s: &mut TcpStream, peer: SocketAddr, st: &Stats) -> io::Result<()> {
    let (d, n) = read_digest(s)?;
    st.digests.lock().unwrap().push((peer, d, n));
    let mut reply = [0u8; 40];
    reply[..32].copy_from_slice(&d);
    reply[32..].copy_from_slice(&n.to_le_bytes());
    s.write_all(&reply)?;
    Ok(())
}

fn source_handler(s: &mut TcpStream, _: SocketAddr, _: &Stats) -> io::Result<()> {
    let mut req = [0u8; 16];
    s.read_exact(&mut req)?;
    let seed = u64::from_le_bytes(req[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(req[8..].try_into().expect("8 bytes"));
    send_pattern(s, seed, len)?;
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

fn echo_handler(s: &mut TcpStream, _: SocketAddr, _: &Stats) -> io::Result<()> {
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

fn half_close_handler(s: &mut TcpStream, peer: SocketAddr, st: &Stats) -> io::Result<()> {
    s.write_all(HALF_CLOSE_GREETING)?;
    s.shutdown(Shutdown::Write)?;
    let (d, n) = read_digest(s)?;
    st.digests.lock().unwrap().push((peer, d, n));
    Ok(())
}

impl<A: ServerAddr> TcpServerOn<A> {
    /// Binds `addr` (port 0: any) inside `ns_path` and serves each connection with
    /// `handler(stream, peer, stats)`.
    pub fn start(
        ns_path: &str,
        addr: A,
        handler: impl Fn(&mut TcpStream, SocketAddr, &Stats) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        let listener = in_netns(ns_path, || addr.tcp_listen())
            .unwrap_or_else(|e| panic!("listen on {addr} in {ns_path}: {e}"));
        let addr = A::bound(listener.local_addr().expect("local_addr"));
        let (stats, stop, accept) =
            serve(listener, format!("tcp server {addr}"), Arc::new(handler));
        TcpServerOn {
            addr,
            stats,
            stop,
            accept: Some(accept),
        }
    }

    /// Reads to EOF, then replies with the SHA-256 (32 bytes) and length (u64 LE) of what it
    /// got, and records both.
    pub fn sink(ns_path: &str, addr: A) -> Self {
        Self::start(ns_path, addr, sink_handler)
    }

    /// Reads a 16-byte request (seed u64 LE, length u64 LE), sends that many bytes of the
    /// stream, then closes.
    pub fn source(ns_path: &str, addr: A) -> Self {
        Self::start(ns_path, addr, source_handler)
    }

    /// Echoes everything until the client half-closes, then closes.
    pub fn echo(ns_path: &str, addr: A) -> Self {
        Self::start(ns_path, addr, echo_handler)
    }

    /// Server-first half-close: sends [`HALF_CLOSE_GREETING`], shuts down its write side at
    /// once, then reads the client's data to EOF and records its digest.
    pub fn half_close(ns_path: &str, addr: A) -> Self {
        Self::start(ns_path, addr, half_close_handler)
    }

    /// A minimal HTTP/1.0 responder: reads the request head, answers `200` with `body`.
    pub fn http(ns_path: &str, addr: A, body: &'static str) -> Self {
        Self::start(ns_path, addr, move |s, _, _| {
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b)?;
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&b[..n]);
            }
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes())?;
            Ok(())
        })
    }
}

/// A listening IPv6 socket (dual-stack when bound to `[::]`) with a large backlog.
pub fn tcp_listen6(addr: SocketAddrV6) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn6,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    bind(fd.as_raw_fd(), &SockaddrIn6::from(addr))?;
    listen(&fd, Backlog::new(4096).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

/// What [`TcpServer::half_close`] sends before shutting down its write side.
pub const HALF_CLOSE_GREETING: &[u8] = b"greeting from the world, then FIN\n";

fn accept_loop(listener: TcpListener, handler: Handler, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
        loop {
            let (mut stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    stats.errors.lock().unwrap().push(format!("accept: {e}"));
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
            };
            stats.accepted.fetch_add(1, Ordering::SeqCst);
            stats.peers.lock().unwrap().push(peer);
            let open = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
            stats.max_open.fetch_max(open, Ordering::SeqCst);
            let (h, st) = (handler.clone(), stats.clone());
            let spawned = thread::Builder::new()
                .name(format!("conn {peer}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    let r = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
                        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
                        .and_then(|()| h(&mut stream, peer, &st));
                    if let Err(e) = r {
                        st.errors.lock().unwrap().push(format!("{peer}: {e}"));
                    }
                    drop(stream);
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                stats
                    .errors
                    .lock()
                    .unwrap()
                    .push(format!("spawn handler: {e}"));
                stats.open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl<A> Drop for TcpServerOn<A> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// A UDP echo server bound inside a namespace; stops on drop. [`UdpEcho`] on IPv4,
/// [`UdpEcho6`] on IPv6.
pub struct UdpEchoOn<A> {
    /// The bound address.
    pub addr: A,
    /// `accepted` counts datagrams; `peers` records each datagram's source.
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Serves a bound UDP socket as an echo server from a thread.
fn udp_echo_serve(sock: UdpSocket, name: String) -> (Arc<Stats>, Arc<AtomicBool>, JoinHandle<()>) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("udp timeout");
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (st, sp) = (stats.clone(), stop.clone());
    let thread = thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !sp.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                st.peers.lock().unwrap().push(peer);
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    st.errors
                        .lock()
                        .unwrap()
                        .push(format!("send_to {peer}: {e}"));
                }
            }
        })
        .expect("spawn udp echo");
    (stats, stop, thread)
}

/// [`UdpEchoOn`] an IPv4 address.
pub type UdpEcho = UdpEchoOn<SocketAddrV4>;

/// [`UdpEchoOn`] an IPv6 address.
pub type UdpEcho6 = UdpEchoOn<SocketAddrV6>;

impl<A: ServerAddr> UdpEchoOn<A> {
    /// Binds `addr` (port 0: any) inside `ns_path`.
    pub fn start(ns_path: &str, addr: A) -> Self {
        let sock = in_netns(ns_path, || UdpSocket::bind(addr.into()))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {ns_path}: {e}"));
        let addr = A::bound(sock.local_addr().expect("local_addr"));
        let (stats, stop, thread) = udp_echo_serve(sock, format!("udp echo {addr}"));
        UdpEchoOn {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }
}

impl<A> Drop for UdpEchoOn<A> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------------------

/// DNS record type A.
pub const QTYPE_A: u16 = 1;
/// DNS record type AAAA.
pub const QTYPE_AAAA: u16 = 28;
/// DNS response code NXDOMAIN.
pub const RCODE_NXDOMAIN: u8 = 3;

/// Builds a standard recursive query for `name`.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // AN, NS, AR
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes()); // IN
    m
}

/// The parts of a DNS response the tests check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    /// Transaction id.
    pub id: u16,
    /// QR bit.
    pub is_response: bool,
    /// Response code (0 NOERROR, 3 NXDOMAIN).
    pub rcode: u8,
    /// The question name, lower case.
    pub qname: String,
    /// Addresses of the A records in the answer section.
    pub a: Vec<Ipv4Addr>,
}

fn read_name(m: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = Vec::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *m.get(pos)? as usize;
        if len == 0 {
            return Some((name.join("."), end.unwrap_or(pos + 1)));
        }
        if len & 0xC0 == 0xC0 {
            let ptr = ((len & 0x3F) << 8) | *m.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        let label = m.get(pos + 1..pos + 1 + len)?;
        name.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += 1 + len;
    }
    None
}

fn be16(m: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*m.get(pos)?, *m.get(pos + 1)?]))
}

/// Parses a DNS message (question and A answers only).
pub fn parse_dns(m: &[u8]) -> Option<DnsReply> {
    let id = be16(m, 0)?;
    let flags = be16(m, 2)?;
    let qd = be16(m, 4)?;
    let an = be16(m, 6)?;
    let mut pos = 12;
    let mut qname = String::new();
    for i in 0..qd {
        let (n, p) = read_name(m, pos)?;
        if i == 0 {
            qname = n;
        }
        pos = p + 4;
    }
    let mut a = Vec::new();
    for _ in 0..an {
        let (_, p) = read_name(m, pos)?;
        let rtype = be16(m, p)?;
        let rdlen = be16(m, p + 8)? as usize;
        let rdata = m.get(p + 10..p + 10 + rdlen)?;
        if rtype == QTYPE_A && rdlen == 4 {
            a.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        pos = p + 10 + rdlen;
    }
    Some(DnsReply {
        id,
        is_response: flags & 0x8000 != 0,
        rcode: (flags & 0xF) as u8,
        qname,
        a,
    })
}

/// A name a [`DnsServer`] knows: the name, its IPv4 address, the TTL of its A record.
pub type DnsRecord = (&'static str, Ipv4Addr, u32);

/// What [`DnsServer::start`] serves: `example.test` -> [`WORLD`] for 60 s.
pub const DNS_TABLE: &[DnsRecord] = &[(DNS_NAME, WORLD, 60)];

/// The test DNS server's answer to `query` ([`DNS_TABLE`]'s, see [`dns_table_answer`]).
pub fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    dns_table_answer(DNS_TABLE, query)
}

/// The answer to `query` from `table`: A of a name in it -> its address, other types of
/// its names -> NOERROR without answers, any other name -> NXDOMAIN.
pub fn dns_table_answer(table: &[DnsRecord], query: &[u8]) -> Option<Vec<u8>> {
    let q = parse_dns(query)?;
    if q.is_response || be16(query, 4)? != 1 {
        return None;
    }
    let (_, qend) = read_name(query, 12)?;
    let qtype = be16(query, qend)?;
    let question = query.get(12..qend + 4)?;
    let known = table.iter().find(|(name, _, _)| *name == q.qname);
    let answer_a = known.filter(|_| qtype == QTYPE_A);
    let rd = be16(query, 2)? & 0x0100;
    let rcode = if known.is_some() {
        0
    } else {
        u16::from(RCODE_NXDOMAIN)
    };
    let mut r = Vec::with_capacity(query.len() + 16);
    r.extend_from_slice(&q.id.to_be_bytes());
    r.extend_from_slice(&(0x8000 | 0x0400 | rd | 0x0080 | rcode).to_be_bytes()); // QR AA RD RA
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&u16::from(answer_a.is_some()).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    if let Some((_, addr, ttl)) = answer_a {
        r.extend_from_slice(&[0xC0, 0x0C]); // pointer to the question name
        r.extend_from_slice(&QTYPE_A.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

/// The test DNS server on 127.0.0.1:53 in H, over UDP and TCP, answering from a table
/// ([`DNS_TABLE`] unless [`DnsServer::start_table`]); stops on drop.
pub struct DnsServer {
    /// Queries answered over UDP.
    pub udp_queries: Arc<AtomicUsize>,
    /// Queries answered over TCP.
    pub tcp_queries: Arc<AtomicUsize>,
    /// Every question name received, in order.
    pub names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _tcp: AnyTcpServer,
}

/// The TCP half of a [`DnsServer`], on either family (only kept alive).
enum AnyTcpServer {
    V4(TcpServer),
    V6(TcpServer6),
}

impl DnsServer {
    /// Starts the server in the topology's host namespace.
    pub fn start(t: &Topology) -> Self {
        Self::start_table(t, DNS_TABLE)
    }

    /// Starts the server in the topology's host namespace, answering from `table`.
    pub fn start_table(t: &Topology, table: &'static [DnsRecord]) -> Self {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 53);
        Self::start_on(&t.host_ns(), addr.into(), table)
    }

    /// Starts the server on `addr` inside `ns_path`.
    pub fn start_at(ns_path: &str, addr: SocketAddrV4) -> Self {
        Self::start_on(ns_path, addr.into(), DNS_TABLE)
    }

    /// Starts the server on an IPv6 `addr` (e.g. `[::1]:53`) inside `ns_path`.
    pub fn start_at6(ns_path: &str, addr: SocketAddrV6) -> Self {
        Self::start_on(ns_path, addr.into(), DNS_TABLE)
    }

    /// How many questions for `name` it received.
    pub fn asked(&self, name: &str) -> usize {
        let names = self.names.lock().unwrap();
        names.iter().filter(|n| *n == name).count()
    }

    fn start_on(ns_path: &str, addr: SocketAddr, table: &'static [DnsRecord]) -> Self {
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));

        let sock = in_netns(ns_path, || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind DNS udp {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (uq, nm, sp) = (udp_queries.clone(), names.clone(), stop.clone());
        let udp = thread::Builder::new()
            .name("dns udp".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while !sp.load(Ordering::SeqCst) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(q) = parse_dns(&buf[..n]) {
                        nm.lock().unwrap().push(q.qname);
                    }
                    if let Some(r) = dns_table_answer(table, &buf[..n]) {
                        uq.fetch_add(1, Ordering::SeqCst);
                        let _ = sock.send_to(&r, peer);
                    }
                }
            })
            .expect("spawn dns udp");

        let (tq, nm) = (tcp_queries.clone(), names.clone());
        let handler = move |s: &mut TcpStream, _: SocketAddr, _: &Stats| loop {
            let mut len = [0u8; 2];
            match s.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut q)?;
            if let Some(p) = parse_dns(&q) {
                nm.lock().unwrap().push(p.qname);
            }
            let Some(r) = dns_table_answer(table, &q) else {
                return Ok(());
            };
            tq.fetch_add(1, Ordering::SeqCst);
            let mut out = (r.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&r);
            s.write_all(&out)?;
        };
        let tcp = match addr {
            SocketAddr::V4(a) => AnyTcpServer::V4(TcpServer::start(ns_path, a, handler)),
            SocketAddr::V6(a) => AnyTcpServer::V6(TcpServer6::start(ns_path, a, handler)),
        };
        DnsServer {
            udp_queries,
            tcp_queries,
            names,
            stop,
            threads: vec![udp],
            _tcp: tcp,
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// `dig ARGS` in C, a real DNS client; its own `+time` and `+tries` end it well within
/// the 20 s guard.
pub fn dig(t: &Topology, args: &[&str]) -> Finished {
    t.run_in_container("dig", args, Duration::from_secs(20))
}

/// How long [`dns_udp_exchange`] waits for its answer in all.
pub const DNS_UDP_WAIT: Duration = Duration::from_secs(20);

/// One DNS query over UDP to `server`, sent again every 2 s (as a stub resolver would) with
/// the same ID; the first answer with that ID from `server` is returned, `None` if none came
/// within [`DNS_UDP_WAIT`]. Each exchange has its own socket: a late answer to an earlier
/// exchange never reaches it.
pub fn dns_udp_exchange(server: SocketAddrV4, query: &[u8]) -> Option<Vec<u8>> {
    dns_udp_exchange_at(server.into(), query)
}

/// [`dns_udp_exchange`] over IPv6.
pub fn dns_udp_exchange6(server: SocketAddrV6, query: &[u8]) -> Option<Vec<u8>> {
    dns_udp_exchange_at(server.into(), query)
}

fn dns_udp_exchange_at(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let s = match server {
        SocketAddr::V4(_) => udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => udp_socket6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)),
    };
    udp_ask_until(&s, server, query, DNS_UDP_WAIT, |from, reply| {
        ((from.ip(), from.port()) == (server.ip(), server.port())
            && reply.get(..2) == query.get(..2))
        .then(|| reply.to_vec())
    })
}

/// Sends `payload` from `sock` to `dst`, and again every 2 s (as a stub resolver or any
/// UDP client that wants an answer would), for up to `total`; the first reply `accept`
/// takes (from its source and bytes), skipping the others (late answers to an earlier
/// request); `None` if none came. A receive error other than a timeout ends the wait for
/// that send.
pub fn udp_ask_until<T>(
    sock: &UdpSocket,
    dst: SocketAddr,
    payload: &[u8],
    total: Duration,
    mut accept: impl FnMut(SocketAddr, &[u8]) -> Option<T>,
) -> Option<T> {
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + total;
    while Instant::now() < end {
        sock.send_to(payload, dst).ok()?;
        let resend = (Instant::now() + Duration::from_secs(2)).min(end);
        loop {
            let left = resend.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).expect("timeout");
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            if let Some(v) = accept(from, &buf[..n]) {
                return Some(v);
            }
        }
    }
    None
}

/// One DNS query over TCP (length-prefixed) to `server`.
pub fn dns_tcp_exchange(server: SocketAddrV4, query: &[u8]) -> io::Result<Vec<u8>> {
    dns_tcp_exchange_at(server.into(), query)
}

/// [`dns_tcp_exchange`] over IPv6.
pub fn dns_tcp_exchange6(server: SocketAddrV6, query: &[u8]) -> io::Result<Vec<u8>> {
    dns_tcp_exchange_at(server.into(), query)
}

fn dns_tcp_exchange_at(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect_at(server)?;
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut r)?;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// usernet
// ---------------------------------------------------------------------------------------------

/// Child fd number of the `-r` pipe (as podman passes it).
pub const READY_FD: RawFd = 3;
/// Child fd number of the `-e` pipe (as podman passes it).
pub const EXIT_FD: RawFd = 4;

/// podman 5.3+'s per-container pasta line, with the container's netns path; `user` stands
/// where podman puts published ports and the user's `--network pasta:...` options, right
/// after `--config-net` (as tests/podman5 logs it from the real podman).
pub fn podman53(netns: &str, user: &[&str]) -> Vec<String> {
    let mut v = vec!["--config-net".to_owned()];
    v.extend(user.iter().map(|s| (*s).to_owned()));
    let has = |o: &str| user.contains(&o);
    v.extend(["--dns-forward", "169.254.1.1"].map(String::from));
    for o in ["-t", "-u", "-T", "-U"] {
        if !has(o) {
            v.extend([o.to_owned(), "none".to_owned()]);
        }
    }
    v.extend(
        [
            "--no-map-gw",
            "--quiet",
            "--netns",
            netns,
            "--map-guest-addr",
            "169.254.1.2",
        ]
        .map(String::from),
    );
    v
}

/// The networks of one test: `usernet network` with its own configuration and runtime
/// directories (`XDG_CONFIG_HOME`, `XDG_RUNTIME_DIR`) under the test's temporary directory.
pub struct Nets<'t> {
    pub t: &'t Topology,
    pub cfg: PathBuf,
    pub run: PathBuf,
}

impl<'t> Nets<'t> {
    pub fn new(t: &'t Topology) -> Self {
        let (cfg, run) = (t.tmp.join("config"), t.tmp.join("runtime"));
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        Nets { t, cfg, run }
    }

    /// The `env` wrapper that points usernet at those directories.
    pub fn env(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("XDG_CONFIG_HOME={}", self.cfg.display()),
            format!("XDG_RUNTIME_DIR={}", self.run.display()),
            "RUST_LOG=info".into(),
        ]
    }

    /// A member of `net` named `name` running `sleep` with a [`sleep_marker`], with more
    /// `run` options: its `usernet run` (killed on drop) and the `sleep`'s PID.
    pub fn member(&self, net: &str, name: &str, opts: &[&str]) -> (Usernet, u32) {
        let m = sleep_marker();
        let mut target = vec!["run", "--network", net, "--name", name];
        target.extend_from_slice(opts);
        target.extend_from_slice(&["--", "sleep", &m]);
        let mut u = UsernetCmd::new(self.t)
            .wrap(self.env())
            .target(target)
            .spawn();
        let pid = wait_for(Duration::from_secs(20), || sleepers(&m).first().copied());
        let Some(pid) = pid else {
            u.assert_running();
            panic!("member {name}: `sleep {m}` never started: {}", u.stderr());
        };
        (u, pid)
    }

    /// `usernet ARGS...` in H, to completion.
    pub fn cli(&self, args: &[&str]) -> Finished {
        UsernetCmd::new(self.t)
            .wrap(self.env())
            .target(args)
            .output(Duration::from_secs(20))
    }
}

/// Builder for one usernet process, run as `ip netns exec H [WRAP...] usernet OPTS... TARGET`.
///
/// The default target is `--netns-type=path /run/netns/C tap0`.
pub struct UsernetCmd<'t> {
    topo: &'t Topology,
    wrap: Vec<OsString>,
    opts: Vec<OsString>,
    target: Vec<OsString>,
    fds: Vec<(OwnedFd, RawFd)>,
    ready: bool,
    exit: bool,
}

impl<'t> UsernetCmd<'t> {
    /// Attach mode on C's path with `tap0`, no options yet.
    pub fn new(topo: &'t Topology) -> Self {
        UsernetCmd {
            topo,
            wrap: Vec::new(),
            opts: Vec::new(),
            target: vec![
                "--netns-type=path".into(),
                topo.container_ns().into(),
                "tap0".into(),
            ],
            fds: Vec::new(),
            ready: false,
            exit: false,
        }
    }

    /// Adds options before the target.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, a: I) -> Self {
        self.opts
            .extend(a.into_iter().map(|s| s.as_ref().to_os_string()));
        self
    }

    /// Replaces the positional part (and `--netns-type`), e.g. `["--netns-type=pid", "1234", "tap0"]`.
    pub fn target<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, t: I) -> Self {
        self.target = t.into_iter().map(|s| s.as_ref().to_os_string()).collect();
        self
    }

    /// Runs usernet through a wrapper inside H (e.g. `setpriv --reuid 65534 ...`).
    pub fn wrap<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, w: I) -> Self {
        self.wrap = w.into_iter().map(|s| s.as_ref().to_os_string()).collect();
        self
    }

    /// Passes `fd` to the child as fd number `child_fd`.
    pub fn pass_fd(mut self, fd: OwnedFd, child_fd: RawFd) -> Self {
        self.fds.push((fd, child_fd));
        self
    }

    /// Adds `-e 4` with a pipe whose write end the test keeps ([`Usernet::close_exit_fd`]).
    pub fn exit_fd(mut self) -> Self {
        self.exit = true;
        self
    }

    /// Spawns with `-r 3` and waits until usernet writes `1` on it.
    ///
    /// # Panics
    ///
    /// If usernet exits or is not ready within [`READY_TIMEOUT`] (its output is printed).
    pub fn start(mut self) -> Usernet {
        self.ready = true;
        let mut u = self.spawn();
        let got = u.wait_ready_byte(READY_TIMEOUT);
        if got.as_deref() != Some(b"1".as_slice()) {
            let state = u.wait_exit(Duration::from_millis(200));
            panic!(
                "usernet did not become ready within {READY_TIMEOUT:?} (ready fd gave {:?}; \
                 process {}); its output follows",
                got.map(|b| String::from_utf8_lossy(&b).into_owned()),
                match state {
                    Some(s) => format!("exited: {s}"),
                    None => "still running".to_string(),
                },
            );
        }
        u
    }

    /// Like [`start`](Self::start) but also returns whether usernet became ready, without
    /// panicking, plus the process (still running or exited).
    pub fn try_start(mut self) -> (bool, Usernet) {
        self.ready = true;
        let mut u = self.spawn();
        let ok = u.wait_ready_byte(READY_TIMEOUT).as_deref() == Some(b"1".as_slice());
        (ok, u)
    }

    /// Spawns usernet (with `-r 3` if requested by [`start`](Self::start)) without waiting.
    pub fn spawn(mut self) -> Usernet {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.host]);
        cmd.args(&self.wrap);
        cmd.arg(usernet_bin());
        cmd.args(&self.opts);

        let mut ready_r = None;
        if self.ready {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
            ready_r = Some(File::from(r));
            self.fds.push((w, READY_FD));
            cmd.args(["-r", &READY_FD.to_string()]);
        }
        let mut exit_w = None;
        if self.exit {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
            exit_w = Some(w);
            self.fds.push((r, EXIT_FD));
            cmd.args(["-e", &EXIT_FD.to_string()]);
        }
        cmd.args(&self.target);
        let line = cmdline(&cmd);
        let map: Vec<(RawFd, RawFd)> = self
            .fds
            .iter()
            .map(|(fd, n)| (fd.as_raw_fd(), *n))
            .collect();
        map_fds(&mut cmd, map);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{line}`: {e}"));
        // The child has its copies now; close ours (except the ends we keep).
        self.fds.clear();
        let out = Captured::start(child.stdout.take().expect("piped"));
        let err = Captured::start(child.stderr.take().expect("piped"));
        eprintln!("started usernet pid {}: {line}", child.id());
        Usernet {
            pid: child.id(),
            child,
            out,
            err,
            ready_r,
            exit_w,
            status: None,
            cmdline: line,
        }
    }

    /// Runs usernet to completion (no `-r`), killing it at `timeout`.
    pub fn output(self, timeout: Duration) -> Finished {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.host]);
        cmd.args(&self.wrap);
        cmd.arg(usernet_bin());
        cmd.args(&self.opts);
        cmd.args(&self.target);
        run_with_timeout(cmd, timeout)
    }
}

/// Installs a `pre_exec` hook that places each `(parent_fd, child_fd)` at `child_fd` without
/// `O_CLOEXEC`. Sources are first duplicated above 100 so that a source number equal to another
/// pair's target cannot be clobbered.
#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to place an fd at a fixed number in the child"
)]
fn map_fds(cmd: &mut Command, map: Vec<(RawFd, RawFd)>) {
    if map.is_empty() {
        return;
    }
    // SAFETY: the hook runs in the forked child before exec and calls only the
    // async-signal-safe fcntl(2) and dup2(2) on fds the parent keeps open until spawn returns;
    // it does not allocate (`map` was built before fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            let mut tmp = [0 as RawFd; 16];
            assert!(map.len() <= tmp.len());
            for (i, (src, _)) in map.iter().enumerate() {
                let t = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 100);
                if t < 0 {
                    return Err(io::Error::last_os_error());
                }
                tmp[i] = t;
            }
            for (i, (_, dst)) in map.iter().enumerate() {
                if libc::dup2(tmp[i], *dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// How long an exit may take: it includes the kernel's removal of usernet's TAP, under a
/// lock that the namespace work of tests running beside it contends for.
pub const EXIT_GUARD: Duration = Duration::from_secs(20);

/// A running usernet; SIGKILLed (by PID, with any descendants) on drop, and its output printed
/// if the test is failing.
pub struct Usernet {
    /// PID of usernet itself (`ip netns exec` execs in place).
    pub pid: u32,
    child: Child,
    out: Captured,
    err: Captured,
    ready_r: Option<File>,
    exit_w: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Usernet {
    /// Reads the `-r` pipe until the first byte, EOF, or `t`; `None` on timeout.
    pub fn wait_ready_byte(&mut self, t: Duration) -> Option<Vec<u8>> {
        let r = self.ready_r.as_mut().expect("spawned without -r");
        let end = Instant::now() + t;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            let ms = left.as_millis().min(100) as u16;
            if nix::poll::poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0 {
                let mut b = [0u8; 1];
                return match r.read(&mut b) {
                    Ok(0) => Some(Vec::new()),
                    Ok(_) => Some(b.to_vec()),
                    Err(_) => Some(Vec::new()),
                };
            }
        }
    }

    /// Reads the rest of the `-r` pipe until EOF (or `t`): `Ok(bytes)` on EOF, `Err(bytes)`
    /// if still open at the deadline.
    pub fn read_ready_rest(&mut self, t: Duration) -> Result<Vec<u8>, Vec<u8>> {
        let r = self.ready_r.as_mut().expect("spawned without -r");
        let end = Instant::now() + t;
        let mut got = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(got);
            }
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            let ms = left.as_millis().min(100) as u16;
            if nix::poll::poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0 {
                let mut b = [0u8; 64];
                match r.read(&mut b) {
                    Ok(0) | Err(_) => return Ok(got),
                    Ok(n) => got.extend_from_slice(&b[..n]),
                }
            }
        }
    }

    /// Closes the test's write end of the `-e` pipe.
    pub fn close_exit_fd(&mut self) {
        self.exit_w.take().expect("spawned without exit_fd()");
    }

    /// Sends `sig` to usernet.
    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), sig).expect("kill");
    }

    /// Asserts that usernet exits with status 0 within [`EXIT_GUARD`], having logged `why`
    /// (at `--log-level info`): the cause of the exit, whatever time a busy machine took.
    #[track_caller]
    pub fn assert_exited_0(&mut self, after: &str, why: &str) {
        let t0 = Instant::now();
        let st = self
            .wait_exit(EXIT_GUARD)
            .unwrap_or_else(|| panic!("usernet still running {EXIT_GUARD:?} after {after}"));
        let log = self.stderr_at_exit();
        assert_eq!(st.code(), Some(0), "exit status after {after}: {st}\n{log}");
        assert!(
            log.contains(why),
            "no {why:?} in the log after {after}:\n{log}"
        );
        eprintln!("exited {:.2?} after {after}", t0.elapsed());
    }

    /// Waits up to `t` for usernet to exit.
    pub fn wait_exit(&mut self, t: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + t;
        loop {
            if let Some(s) = self.status {
                return Some(s);
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Number of open fds of usernet (`/proc/PID/fd`).
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("read /proc/{}/fd: {e}", self.pid))
    }

    /// The fd table (`/proc/PID/fd` targets), for messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let t = fs::read_link(e.path()).unwrap_or_default();
                        format!("{} -> {}", e.file_name().to_string_lossy(), t.display())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// usernet's stderr so far.
    pub fn stderr(&self) -> String {
        self.err.text()
    }

    /// usernet's whole stderr, once it has exited ([`wait_exit`](Self::wait_exit)): waits
    /// for the capture to reach the end of the pipe (see [`Captured::text_at_eof`]; what
    /// came within a second if a process usernet left behind still holds it).
    pub fn stderr_at_exit(&self) -> String {
        self.err.text_at_eof(Duration::from_secs(1))
    }

    /// [`stderr_at_exit`](Self::stderr_at_exit) for stdout.
    pub fn stdout_at_exit(&self) -> String {
        self.out.text_at_eof(Duration::from_secs(1))
    }

    /// usernet's stdout so far.
    pub fn stdout(&self) -> String {
        self.out.text()
    }

    /// Panics (with usernet's output) if it has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(s) = self.wait_exit(Duration::ZERO) {
            panic!(
                "usernet exited unexpectedly ({s}):\n--- stderr ---\n{}",
                self.stderr()
            );
        }
    }
}

impl Drop for Usernet {
    fn drop(&mut self) {
        if self.status.is_none() {
            kill_tree(&mut self.child);
        }
        if thread::panicking() {
            eprintln!(
                "--- usernet pid {} ({}) ---\n--- stderr ---\n{}\n--- stdout ---\n{}\n--- end ---",
                self.pid,
                self.cmdline,
                self.err.text_after(Duration::from_millis(200)).trim_end(),
                self.out.text_after(Duration::from_millis(50)).trim_end()
            );
        }
    }
}

/// Creates a persistent-less TAP `name` inside the netns at `ns_path` (from a setns'd thread)
/// with `IFF_TAP | IFF_NO_PI`, and returns its fd (for `--netns-type=tapfd`).
#[expect(
    unsafe_code,
    reason = "TUNSETIFF has no safe wrapper in the enabled nix features"
)]
pub fn open_tap_in(ns_path: &str, name: &str) -> OwnedFd {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    assert!(name.len() < 16);
    in_netns(ns_path, || {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: `f` is an open /dev/net/tun fd and `req` is a valid, writable struct ifreq
        // (40 bytes, C layout) that outlives the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        assert!(rc == 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
        OwnedFd::from(f)
    })
}

/// A `sleep` argument no other process uses (this test process's id and a count), for
/// [`sleepers`] to find the process by.
pub fn sleep_marker() -> String {
    static MARKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MARKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("41.{}{n:03}", std::process::id())
}

/// PIDs of the processes whose command line is `sleep MARKER`.
pub fn sleepers(marker: &str) -> Vec<u32> {
    let want = format!("sleep\0{marker}\0");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if cmdline == want.as_bytes() {
                found.push(pid);
            }
        }
    }
    found
}

/// Polls `f` every 20 ms until it returns `Some` or `t` passes.
pub fn wait_for<R>(t: Duration, mut f: impl FnMut() -> Option<R>) -> Option<R> {
    let end = Instant::now() + t;
    loop {
        if let Some(r) = f() {
            return Some(r);
        }
        if Instant::now() > end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Resource use and `get_stats` (tests/limits.rs, tests/faults.rs)
// ---------------------------------------------------------------------------------------------

/// Resident set size of process `pid` in KiB (`VmRSS` in `/proc/PID/status`).
///
/// # Panics
///
/// If the process is gone or the line is missing.
pub fn vm_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Virtual memory size of process `pid` in KiB (`VmSize`), what `RLIMIT_AS` limits.
///
/// # Panics
///
/// As [`vm_rss_kib`].
pub fn vm_size_kib(pid: u32) -> u64 {
    status_kib(pid, "VmSize")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Sets `SO_LINGER` to 0: closing the socket then sends a RST instead of a FIN.
pub fn set_linger_zero(s: &impl AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &l).expect("setsockopt(SO_LINGER, 0)");
}

/// A parsed JSON value; objects are key-sorted, so they compare regardless of key order.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any number.
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<JsonValue>),
    /// An object (duplicate keys are a parse error).
    Obj(std::collections::BTreeMap<String, JsonValue>),
}

impl JsonValue {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        match self {
            JsonValue::Obj(m) => m.get(key),
            _ => None,
        }
    }

    /// The members of an object.
    pub fn as_obj(&self) -> Option<&std::collections::BTreeMap<String, JsonValue>> {
        match self {
            JsonValue::Obj(m) => Some(m),
            _ => None,
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            JsonValue::Num(n) if *n >= 0.0 && n.fract() == 0.0 && *n < 2f64.powi(53) => {
                Some(*n as u64)
            }
            _ => None,
        }
    }
}

/// Parses one JSON document (surrounding whitespace allowed, nothing else after it).
pub fn parse_json_value(text: &str) -> Result<JsonValue, String> {
    struct P<'a> {
        b: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }
        fn err<T>(&self, what: &str) -> Result<T, String> {
            Err(format!("{what} at byte {}", self.i))
        }
        fn lit(&mut self, word: &str, v: JsonValue) -> Result<JsonValue, String> {
            if self.b[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                self.err("bad literal")
            }
        }
        fn string(&mut self) -> Result<String, String> {
            // At the opening quote.
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let Some(&c) = self.b.get(self.i) else {
                    return self.err("unterminated string");
                };
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let Some(&e) = self.b.get(self.i) else {
                            return self.err("unterminated escape");
                        };
                        self.i += 1;
                        match e {
                            b'"' | b'\\' | b'/' => out.push(e),
                            b'b' => out.push(8),
                            b'f' => out.push(12),
                            b'n' => out.push(b'\n'),
                            b'r' => out.push(b'\r'),
                            b't' => out.push(b'\t'),
                            b'u' => {
                                let hex = self
                                    .b
                                    .get(self.i..self.i + 4)
                                    .and_then(|h| std::str::from_utf8(h).ok())
                                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                                let Some(cp) = hex else {
                                    return self.err("bad \\u escape");
                                };
                                self.i += 4;
                                let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                                let mut tmp = [0u8; 4];
                                out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                            }
                            _ => return self.err("bad escape"),
                        }
                    }
                    c if c < 0x20 => return self.err("control character in string"),
                    c => out.push(c),
                }
            }
            String::from_utf8(out).map_err(|e| e.to_string())
        }
        fn value(&mut self, depth: usize) -> Result<JsonValue, String> {
            if depth > 64 {
                return self.err("nested too deeply");
            }
            self.ws();
            let Some(&c) = self.b.get(self.i) else {
                return self.err("unexpected end");
            };
            match c {
                b'n' => self.lit("null", JsonValue::Null),
                b't' => self.lit("true", JsonValue::Bool(true)),
                b'f' => self.lit("false", JsonValue::Bool(false)),
                b'"' => Ok(JsonValue::Str(self.string()?)),
                b'[' => {
                    self.i += 1;
                    let mut v = Vec::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(JsonValue::Arr(v));
                    }
                    loop {
                        v.push(self.value(depth + 1)?);
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(JsonValue::Arr(v));
                            }
                            _ => return self.err("expected , or ]"),
                        }
                    }
                }
                b'{' => {
                    self.i += 1;
                    let mut m = std::collections::BTreeMap::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(JsonValue::Obj(m));
                    }
                    loop {
                        self.ws();
                        if self.b.get(self.i) != Some(&b'"') {
                            return self.err("expected a key");
                        }
                        let k = self.string()?;
                        self.ws();
                        if self.b.get(self.i) != Some(&b':') {
                            return self.err("expected :");
                        }
                        self.i += 1;
                        let v = self.value(depth + 1)?;
                        if m.insert(k.clone(), v).is_some() {
                            return self.err(&format!("duplicate key {k:?}"));
                        }
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(JsonValue::Obj(m));
                            }
                            _ => return self.err("expected , or }"),
                        }
                    }
                }
                b'-' | b'0'..=b'9' => {
                    let start = self.i;
                    while self.i < self.b.len()
                        && matches!(
                            self.b[self.i],
                            b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                        )
                    {
                        self.i += 1;
                    }
                    let s =
                        std::str::from_utf8(&self.b[start..self.i]).map_err(|e| e.to_string())?;
                    s.parse::<f64>()
                        .map(JsonValue::Num)
                        .map_err(|e| format!("bad number {s:?}: {e}"))
                }
                _ => self.err("unexpected character"),
            }
        }
    }
    let mut p = P {
        b: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.b.len() {
        return p.err("trailing data");
    }
    Ok(v)
}

/// One request on a slirp4netns-style API socket, as podman sends it (the request, `\n`,
/// half-close); returns the reply read to EOF. Never blocks longer than `t` in all.
pub fn api_request(path: &Path, req: &str, t: Duration) -> io::Result<String> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::unix::net::UnixStream;
    let end = Instant::now() + t;
    let mut s = loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
            Ok(()) => break UnixStream::from(fd),
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < end => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    };
    s.set_nonblocking(false)?;
    let left = end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if Instant::now() > end {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "API reply not complete in time",
            ));
        }
    }
    String::from_utf8(got).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One `get_stats` reply: the JSON document and its numbers flattened as `section.name`
/// (`flows.tcp`, `limits.udp_flows`, `counters.tcp_table_full`, ...).
#[derive(Debug, Clone)]
pub struct UsernetStats {
    /// The whole reply (`{"return": {...}}`).
    pub json: JsonValue,
    /// Every numeric `return.SECTION.NAME`, keyed `SECTION.NAME`.
    pub values: std::collections::BTreeMap<String, u64>,
}

impl UsernetStats {
    /// The value `section.name`.
    ///
    /// # Panics
    ///
    /// If it is missing (the available keys are printed).
    #[track_caller]
    pub fn get(&self, key: &str) -> u64 {
        match self.values.get(key) {
            Some(v) => *v,
            None => panic!(
                "get_stats has no {key}; it has: {:?}",
                self.values.keys().collect::<Vec<_>>()
            ),
        }
    }

    /// How much `key` grew since `earlier`.
    #[track_caller]
    pub fn delta(&self, earlier: &UsernetStats, key: &str) -> u64 {
        self.get(key).saturating_sub(earlier.get(key))
    }
}

/// Flattens a `{"return": {SECTION: {NAME: number}}}` reply into [`UsernetStats`].
pub fn usernet_stats_from(reply: &str) -> Result<UsernetStats, String> {
    let json = parse_json_value(reply).map_err(|e| format!("{e} in {reply:?}"))?;
    let ret = json
        .get("return")
        .and_then(JsonValue::as_obj)
        .ok_or_else(|| format!("get_stats reply has no \"return\" object: {reply}"))?;
    let mut values = std::collections::BTreeMap::new();
    for (section, body) in ret {
        let Some(body) = body.as_obj() else { continue };
        for (name, v) in body {
            if let Some(n) = v.as_u64() {
                values.insert(format!("{section}.{name}"), n);
            }
        }
    }
    Ok(UsernetStats { json, values })
}

/// `{"execute":"get_stats"}` on the API socket at `path` (5 s deadline).
pub fn try_get_stats(path: &Path) -> Result<UsernetStats, String> {
    let reply = api_request(path, r#"{"execute":"get_stats"}"#, Duration::from_secs(5))
        .map_err(|e| format!("get_stats on {}: {e}", path.display()))?;
    usernet_stats_from(&reply)
}

/// [`try_get_stats`], panicking on failure.
#[track_caller]
pub fn get_stats(path: &Path) -> UsernetStats {
    try_get_stats(path).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// pasta mode
// ---------------------------------------------------------------------------------------------

impl Topology {
    /// Default routes in H via W ([`WORLD_LINK`], and [`WORLD_LINK6`] after
    /// [`new_ipv6`](Self::new_ipv6)): pasta's `--config-net` copies the interface that
    /// holds them (`vh`, whose first addresses are [`HOST_ADDR`] and [`HOST_ADDR6`]).
    pub fn host_default_routes(&self) {
        ip(&[
            "-n",
            &self.host,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.2",
        ]);
        let has6 = !ip(&[
            "-n", &self.host, "-6", "addr", "show", "dev", "vh", "scope", "global",
        ])
        .stdout
        .is_empty();
        if has6 {
            ip(&[
                "-n",
                &self.host,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:1::2",
            ]);
        }
    }

    /// A directory holding the binary under test as `pasta` (a symbolic link, as a user
    /// would install it for podman's `helper_binaries_dir`).
    pub fn pasta_dir(&self) -> PathBuf {
        let dir = self.tmp.join("helpers");
        if !dir.join("pasta").exists() {
            fs::create_dir_all(&dir).expect("create the helper directory");
            std::os::unix::fs::symlink(usernet_bin(), dir.join("pasta")).expect("link pasta");
        }
        dir
    }

    /// `usernet` as `pasta`.
    pub fn pasta_bin(&self) -> PathBuf {
        self.pasta_dir().join("pasta")
    }
}

/// A pasta started in H the way podman starts it: the first process has exited; the
/// detached one (found by its `argv[0]`, unique to the test's directory) is SIGKILLed on
/// drop if it is still alive.
pub struct Pasta {
    /// The first process's output and status.
    pub first: Finished,
    bin: PathBuf,
}

impl Pasta {
    /// Runs `pasta ARGS` in H as podman and RootlessKit do (Go's `CombinedOutput()`): waits
    /// until the first process has exited *and* both its output pipes reached end of file,
    /// which needs the detached process to hold no copy of them. At most 20 s; then the
    /// status is `None` (as for [`run_with_timeout`]).
    pub fn run(t: &Topology, args: &[&str]) -> Pasta {
        let bin = t.pasta_bin();
        let mut cmd = t.exec_in(&t.host, &bin, args);
        let line = cmdline(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));
        let (tx, rx) = std::sync::mpsc::channel();
        let readers: Vec<_> = [
            Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped stderr")),
        ]
        .into_iter()
        .map(|mut r| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                let _ = tx.send(());
                String::from_utf8_lossy(&buf).into_owned()
            })
        })
        .collect();
        let timeout = Duration::from_secs(20);
        let mut eofs = 0;
        let mut status = None;
        while start.elapsed() < timeout && (eofs < 2 || status.is_none()) {
            if rx.recv_timeout(Duration::from_millis(5)).is_ok() {
                eofs += 1;
            }
            if status.is_none() {
                status = child.try_wait().expect("try_wait");
            }
        }
        let elapsed = start.elapsed();
        let complete = eofs == 2 && status.is_some();
        if !complete {
            kill_tree(&mut child);
        }
        // Reaped already (try_wait, or kill_tree); this returns the kept status.
        let _ = child.wait();
        let mut texts = readers.into_iter().map(|h| {
            if complete {
                h.join().unwrap_or_default()
            } else {
                String::from("(pipe still open)")
            }
        });
        let first = Finished {
            status: status.filter(|_| complete),
            stdout: texts.next().unwrap_or_default(),
            stderr: texts.next().unwrap_or_default(),
            elapsed,
            cmdline: line,
        };
        Pasta { first, bin }
    }

    /// [`run`](Self::run), asserting that the first process exited 0 with no output.
    #[track_caller]
    pub fn start(t: &Topology, args: &[&str]) -> Pasta {
        let p = Pasta::run(t, args);
        p.first.assert_success();
        p
    }

    /// PIDs of live processes whose `argv[0]` is this test's `pasta`.
    pub fn pids(&self) -> Vec<u32> {
        use std::os::unix::ffi::OsStrExt as _;
        let want = self.bin.as_os_str().as_bytes();
        let mut out = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(false);
            if alive && cmdline.split(|b| *b == 0).next() == Some(want) {
                out.push(pid);
            }
        }
        out
    }

    /// Sends `sig` to every process of this pasta (the relay and its namespace agent).
    pub fn signal(&self, sig: Signal) {
        for pid in self.pids() {
            nix::sys::signal::kill(Pid::from_raw(pid as i32), sig).expect("kill");
        }
    }

    /// Waits up to `t` until no process of this pasta is left.
    pub fn wait_gone(&self, t: Duration) -> bool {
        wait_for(t, || self.pids().is_empty().then_some(())).is_some()
    }
}

impl Drop for Pasta {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
