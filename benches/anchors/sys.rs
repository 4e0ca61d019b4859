//! Processes, namespaces and clean-up for the anchors harness.
//!
//! Everything the harness creates outside itself (child processes, the `sleep` target that
//! `unshare` forks, pasta's daemon, the kernel engine's netns, veth and iptables rules, the
//! work directory) is recorded in one registry as soon as it exists. A [`Guard`] undoes its
//! item when dropped (end of an engine's session, or unwinding from a panic), and
//! [`cleanup_all`] undoes whatever is left: at the end of `main` and from the signal thread on
//! Ctrl-C / SIGTERM / SIGHUP. Processes are only ever killed by PID, and only when their start
//! time still matches the one recorded, so a recycled PID is never hit.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Something to undo at the end.
#[derive(Debug)]
pub enum Item {
    /// A process we started, directly or not: SIGKILLed if `start` (its start time in clock
    /// ticks since boot) still matches.
    Proc { pid: i32, start: u64 },
    /// A named network namespace (`ip netns del`).
    Netns(String),
    /// A link in the host namespace (`ip link del`).
    Link(String),
    /// An iptables rule: `iptables -t TABLE -D CHAIN RULE...`.
    Iptables {
        table: String,
        chain: String,
        rule: Vec<String>,
    },
    /// A directory of ours (`rm -r`).
    Dir(PathBuf),
}

static REGISTRY: Mutex<BTreeMap<u64, Item>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static STOPPING: AtomicBool = AtomicBool::new(false);

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u64, Item>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Undoes its item when dropped.
#[derive(Debug)]
pub struct Guard(u64);

impl Guard {
    /// Records `item` for clean-up.
    pub fn new(item: Item) -> Guard {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut reg = registry();
        if STOPPING.load(Ordering::SeqCst) {
            // Created while the signal thread cleans up: undone at once.
            drop(reg);
            undo(item);
            return Guard(0);
        }
        reg.insert(id, item);
        Guard(id)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let item = registry().remove(&self.0);
        if let Some(item) = item {
            undo(item);
        }
    }
}

/// Undoes everything still registered, newest first.
pub fn cleanup_all() {
    let items: Vec<Item> = {
        let mut reg = registry();
        let items = std::mem::take(&mut *reg);
        items.into_values().rev().collect()
    };
    for item in items {
        undo(item);
    }
}

fn undo(item: Item) {
    match item {
        Item::Proc { pid, start } => {
            if proc_start_time(pid) == Some(start) {
                let pid = Pid::from_raw(pid);
                let _ = kill(pid, Signal::SIGKILL);
                // Reap it if it is our child; else (pasta's daemon) wait until it has
                // exited, so that its ports are free for the next session.
                let deadline = Instant::now() + Duration::from_secs(1);
                loop {
                    let gone = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) => false,
                        Err(nix::errno::Errno::ECHILD) => !alive(pid.as_raw(), start),
                        _ => true,
                    };
                    if gone || Instant::now() > deadline {
                        break;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            }
        }
        Item::Netns(name) => {
            run_plain(Command::new("ip").args(["netns", "del", &name]));
        }
        Item::Link(name) => {
            if Path::new("/sys/class/net").join(&name).exists() {
                run_plain(Command::new("ip").args(["link", "del", &name]));
            }
        }
        Item::Iptables { table, chain, rule } => {
            run_plain(
                Command::new("iptables")
                    .args(["-w", "5", "-t", &table, "-D", &chain])
                    .args(&rule),
            );
        }
        Item::Dir(path) => {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Runs a clean-up command outside the registry (it must survive a clean-up in progress),
/// killing it after 20 s.
fn run_plain(cmd: &mut Command) {
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Ok(None) = child.try_wait() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (call it first in `main`, so every
/// later thread inherits the mask) and starts the thread that cleans up and exits on them.
/// Children get a clean signal mask from `std::process::Command`.
pub fn install_signal_cleanup() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_err() {
        eprintln!("anchors: cannot block signals; Ctrl-C will not clean up");
        return;
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!(
                    "\nanchors: {sig:?}: cleaning up (processes, namespaces, iptables rules)"
                );
                STOPPING.store(true, Ordering::SeqCst);
                drop(registry()); // Guard::new sees STOPPING from here on
                cleanup_all();
                std::process::exit(130);
            }
        })
        .expect("spawn signal thread");
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether the process `pid` that started at `start` is still running (a zombie has
/// exited: its files are closed).
fn alive(pid: i32, start: u64) -> bool {
    stat_fields(pid).is_some_and(|f| {
        f.first().is_some_and(|state| state != "Z")
            && f.get(19).and_then(|t| t.parse().ok()) == Some(start)
    })
}

/// Start time of a process (field 22 of `/proc/PID/stat`).
pub fn proc_start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        run(
            Command::new("getconf").arg("CLK_TCK"),
            Duration::from_secs(5),
        )
        .ok()
        .and_then(|o| o.stdout.trim().parse().ok())
        .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) a process has used so far: the sum of its
/// threads' `schedstat` run time (ns) where the kernel has it, else `stat`'s utime + stime
/// (clock ticks, too coarse for an engine that hardly runs).
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let sched: Option<u64> = fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .and_then(|tasks| {
            tasks
                .flatten()
                .map(|t| {
                    let s = fs::read_to_string(t.path().join("schedstat")).ok()?;
                    s.split_whitespace().next()?.parse::<u64>().ok()
                })
                .sum()
        });
    if let Some(ns) = sched {
        return Some(ns as f64 / 1e9);
    }
    let f = stat_fields(pid)?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `MemAvailable` of the machine, KiB.
pub fn mem_available_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The PIDs of a process's children.
pub fn children_of(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 1 s) and reaped when dropped.
#[derive(Debug)]
pub struct ChildProc {
    child: Child,
    name: String,
    _guard: Guard,
}

impl ChildProc {
    /// Spawns `cmd` (its stdio as configured by the caller).
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<ChildProc, String> {
        let child = cmd.spawn().map_err(|e| format!("cannot run {name}: {e}"))?;
        let pid = child.id() as i32;
        let start = proc_start_time(pid).unwrap_or(0);
        Ok(ChildProc {
            child,
            name: name.to_string(),
            _guard: Guard::new(Item::Proc { pid, start }),
        })
    }

    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lines of its piped stdout, read by a thread of their own.
    pub fn lines(&mut self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        if let Some(out) = self.child.stdout.take() {
            thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        rx
    }

    /// Closes its piped stdin.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.pid());
        let _ = kill(pid, Signal::SIGTERM);
        if self.wait_timeout(Duration::from_secs(1)).is_none() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Its exit status (`None`: killed at the deadline).
    pub status: Option<ExitStatus>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// A one-line reason for a failure.
    pub fn why(&self) -> String {
        let err = last_lines(&self.stderr, 2);
        match self.status {
            None => format!(
                "timed out{}",
                if err.is_empty() {
                    String::new()
                } else {
                    format!(": {err}")
                }
            ),
            Some(s) if err.is_empty() => format!("{s}: {}", last_lines(&self.stdout, 2)),
            Some(s) => format!("{s}: {err}"),
        }
    }
}

/// The last `n` non-empty lines of `s`, joined by " | ".
pub fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Runs `cmd` to completion with its output captured, killing it at `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildProc::spawn(cmd, &prog)?;
    let out = reader(child.child.stdout.take().expect("piped stdout"));
    let err = reader(child.child.stderr.take().expect("piped stderr"));
    let status = child.wait_timeout(timeout);
    drop(child); // kills it if still running
                 // A grandchild may keep the pipes open: do not wait for it for long.
    let grace = Duration::from_secs(2);
    Ok(Output {
        status,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: err.recv_timeout(grace).unwrap_or_default(),
    })
}

/// Runs a short administrative command (`ip`, `iptables`): Ok if it exits 0 within 20 s.
pub fn run_status(cmd: &mut Command) -> Result<(), String> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = run(cmd, Duration::from_secs(20))?;
    if out.ok() {
        Ok(())
    } else {
        Err(format!("`{line}` failed: {}", out.why()))
    }
}

/// `prog args...`, checked.
pub fn sh(prog: &str, args: &[&str]) -> Result<(), String> {
    run_status(Command::new(prog).args(args))
}

/// Whether a process has a TCP socket listening on `port` in its network namespace.
fn listening(pid: i32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == "0A"
                    && local
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

/// Waits until `child` listens on TCP `port` (in its own namespace) without connecting to it.
pub fn wait_listen(child: &mut ChildProc, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if listening(child.pid(), port) {
            return Ok(());
        }
        if let Some(st) = child.exited() {
            return Err(format!(
                "{} exited ({st}) before listening on {port}",
                child.name()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} not listening on {port} after {timeout:?}",
                child.name()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a new thread inside the network namespace at `ns` and waits up to `timeout`
/// for its result (a thread that overruns is abandoned: its sockets have timeouts of their own).
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    timeout: Duration,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let ns = ns.to_path_buf();
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("in-netns".into())
        .spawn(move || {
            let r = File::open(&ns)
                .map_err(|e| format!("open {}: {e}", ns.display()))
                .and_then(|fd| {
                    nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("setns {}: {e}", ns.display()))
                })
                .and_then(|()| f());
            let _ = tx.send(r);
        })
        .map_err(|e| format!("spawn thread: {e}"))?;
    rx.recv_timeout(timeout)
        .map_err(|_| format!("no result after {timeout:?}"))?
}

/// Finds `tool` in `PATH` and the sbin directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Path::new(tool).is_file().then(|| PathBuf::from(tool));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (engines started afterwards
/// inherit it) and returns that limit.
pub fn raise_nofile() -> u64 {
    let lim = |field: usize| -> u64 {
        fs::read_to_string("/proc/self/limits")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(field).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    let (soft, hard) = (lim(3), lim(4));
    if soft < hard {
        let pid = std::process::id().to_string();
        if let Err(e) = sh(
            "prlimit",
            &["--pid", &pid, &format!("--nofile={hard}:{hard}")],
        ) {
            eprintln!("anchors: {e}");
        }
    }
    lim(3)
}
