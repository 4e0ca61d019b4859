//! The command of run mode in its own PID namespace: nothing it starts outlives it.
//!
//! # Theory of operation
//!
//! `usernet run -- CMD` (and any other mode that runs a command, such as pasta's `-- CMD`)
//! behaves like `unshare --pid --fork` or a container engine: when the command ends, or
//! usernet is told to stop, every process the command started ends too, and signals usernet
//! receives reach the command first.
//!
//! Processes, from the top:
//!
//! 1. **usernet** (the event loop) holds a [`Supervisor`] for its direct child.
//! 2. **the namespace holder**: the child of [`crate::netns::spawn_run`]. It unshared the
//!    user, network, mount and PID namespaces, so it owns the new PID namespace without
//!    being in it. Once released it forks the next process (PID 1 of the new namespace)
//!    and [relays](relay) for it: signals it receives go to PID 1, and it exits with PID
//!    1's status. It dies with usernet (`PR_SET_PDEATHSIG`).
//! 3. **init**, PID 1 of the new namespace ([`run_command`]): dies with the holder
//!    (`PR_SET_PDEATHSIG`, and it checks that the holder is still there after setting it),
//!    mounts a fresh `/proc` for the namespace (best effort: where the kernel refuses, the
//!    command sees the host's `/proc`, and says so on stderr), forks the command, relays
//!    signals to it, reaps every orphan of the namespace, and exits with the command's
//!    status as soon as the command ends. Its exit makes the kernel kill every process
//!    left in the namespace (`SIGKILL`): background jobs, daemons, anything.
//! 4. **the command**, PID 2, with default signal dispositions and an empty signal mask:
//!    unlike a PID 1, it dies of a `SIGTERM` it does not handle, as it would outside.
//!
//! Signals: `SIGTERM`, `SIGINT`, `SIGHUP`, `SIGQUIT`, `SIGUSR1`, `SIGUSR2` ([`FORWARDED`])
//! go down the chain. A signal the kernel sent itself (`SI_KERNEL`: Ctrl-C, Ctrl-\ at a
//! terminal) is not passed on, because it went to the whole foreground process group, the
//! command included, already. The stop signals (`SIGTERM`, `SIGINT`, `SIGHUP`, `SIGQUIT`)
//! sent by a process (`kill`, a service manager) also start a grace period
//! (`--stop-timeout`, default 10 s): if the command is still running at its end, usernet
//! kills the namespace holder, whose death kills init, whose death kills the rest.
//!
//! Exit status: the command's (`128 + N` if signal `N` killed it), passed up unchanged by
//! init and the holder; `137` when the grace period ran out.
//!
//! If usernet itself dies (even by `SIGKILL`), the holder and then init die by their death
//! signals, and the namespace with them.
//!
//! The holder and init run forked copies of usernet (no `exec`): they keep to what
//! [`crate::sys::fork_child`] allows, and their loops allocate nothing.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, pipe2, Pid};

use crate::sys;

/// Signals passed on to the command.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// `si_code` of a signal the kernel sent itself (a terminal's Ctrl-C, for instance).
const SI_KERNEL: i32 = 0x80;

/// Whether `sig` asks the command to stop (and starts the grace period).
fn is_stop(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP | Signal::SIGQUIT
    )
}

/// Whether a signal with this `si_code` should be passed on: not if the kernel sent it to
/// the whole process group already.
pub fn should_forward(si_code: i32) -> bool {
    si_code != SI_KERNEL
}

/// usernet's side: the namespace holder it forked, the signals passed to it, the grace
/// period. Sans-IO apart from `kill(2)` and `waitpid(2)` on that one child.
///
/// Order of calls: [`handle_signal`](Self::handle_signal) for each forwarded signal read
/// from the signalfd; [`poll_timeout`](Self::poll_timeout) before sleeping;
/// [`handle_timeout`](Self::handle_timeout) after each wake-up; [`try_reap`](Self::try_reap)
/// on `SIGCHLD`.
#[derive(Debug)]
pub struct Supervisor {
    pid: Pid,
    stop_timeout: Duration,
    deadline: Option<Instant>,
    killed: bool,
}

impl Supervisor {
    /// Supervises child `pid` (the namespace holder of [`crate::netns::spawn_run`]).
    pub fn new(pid: Pid, stop_timeout: Duration) -> Supervisor {
        Supervisor {
            pid,
            stop_timeout,
            deadline: None,
            killed: false,
        }
    }

    /// A signal usernet received: passed on unless the kernel sent it to the whole process
    /// group; a stop signal starts the grace period (once).
    pub fn handle_signal(&mut self, sig: Signal, si_code: i32, now: Instant) {
        if !should_forward(si_code) {
            return;
        }
        log::debug!("passing {sig} on to the command");
        let _ = kill(self.pid, sig);
        if is_stop(sig) && self.deadline.is_none() {
            self.deadline = Some(now + self.stop_timeout);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.killed)
    }

    /// Kills the command's namespace once the grace period is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.deadline {
            if !self.killed && now >= at {
                log::warn!(
                    "the command did not stop within {:?}: killing it and its PID namespace",
                    self.stop_timeout
                );
                let _ = kill(self.pid, Signal::SIGKILL);
                self.killed = true;
            }
        }
    }

    /// After `SIGCHLD`: the child's exit status as a shell reports it, once it has ended.
    pub fn try_reap(&self) -> Option<i32> {
        loop {
            return match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => exit_code(status),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ECHILD) => Some(1),
                Err(_) => None,
            };
        }
    }
}

/// A shell's view of a wait status: the exit code, or 128 + the signal.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The signals the relays wait for: [`FORWARDED`] and `SIGCHLD`.
fn relay_mask() -> SigSet {
    let mut mask = SigSet::empty();
    for sig in FORWARDED {
        mask.add(sig);
    }
    mask.add(Signal::SIGCHLD);
    mask
}

/// Blocks the relays' signals in the calling thread, so that none is lost (or kills us)
/// between a fork and the relay loop. Call before forking the process to relay for.
///
/// # Errors
///
/// Errors of `sigprocmask(2)`.
pub fn block_relay_signals() -> nix::Result<()> {
    relay_mask().thread_block()
}

/// Forked-child side: passes [`FORWARDED`] signals on to `child`, reaps every child that
/// ends (init reaps the namespace's orphans this way), and returns `child`'s exit status
/// (128 + N for signal N) once it has ended. Expects the signals to be blocked already
/// ([`block_relay_signals`] before forking `child`).
///
/// Returns 1 if the signals cannot be read.
pub fn relay(child: Pid) -> i32 {
    let Ok(signals) = SignalFd::with_flags(&relay_mask(), SfdFlags::SFD_CLOEXEC) else {
        let _ = kill(child, Signal::SIGKILL);
        return 1;
    };
    loop {
        // Reap first: the child may have ended before the signalfd existed.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) if status.pid() == Some(child) => {
                    if let Some(code) = exit_code(status) {
                        return code;
                    }
                }
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(nix::Error::ECHILD) => return 1,
                Err(_) => break,
            }
        }
        match signals.read_signal() {
            Ok(Some(info)) => {
                let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                    continue;
                };
                if sig != Signal::SIGCHLD && should_forward(info.ssi_code) {
                    let _ = kill(child, sig);
                }
            }
            Ok(None) | Err(nix::Error::EINTR) => {}
            Err(_) => {
                let _ = kill(child, Signal::SIGKILL);
                return 1;
            }
        }
    }
}

/// The namespace holder's work once released: forks init (PID 1 of the PID namespace the
/// holder unshared), which runs `argv` (looked up in `PATH`; `name` is its name for error
/// messages) as PID 2; relays signals to init and returns the command's exit status.
/// Runs in a forked child (see [`sys::fork_child`]).
pub fn run_command(argv: &[CString], name: &OsStr) -> i32 {
    if argv.is_empty() || block_relay_signals().is_err() {
        return 1;
    }
    // Init watches this pipe to notice a holder that died before init's death signal was
    // set; the holder keeps the write end open until it exits.
    let Ok((alive_r, alive_w)) = pipe2(OFlag::O_CLOEXEC) else {
        return 1;
    };
    let init = sys::fork_child(&[alive_w.as_fd()], move || init(alive_r, argv, name));
    match init {
        Ok(pid) => {
            let code = relay(pid);
            drop(alive_w);
            code
        }
        Err(_) => 1,
    }
}

/// PID 1 of the command's namespace; see the module documentation.
fn init(holder_alive: OwnedFd, argv: &[CString], name: &OsStr) -> i32 {
    if prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        return 1;
    }
    // The holder's end of the pipe is open while it lives: a hang-up means it is gone.
    let mut fds = [PollFd::new(holder_alive.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO) != Ok(0) {
        return 1;
    }
    drop(holder_alive);
    if let Err(err) = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        raw_stderr(&format!(
            "usernet: cannot mount /proc for the command's PID namespace ({}): it sees the host's processes there\n",
            io::Error::from(err)
        ));
    }
    let command = sys::fork_child(&[], move || {
        // Best effort: a failure leaves a signal blocked or ignored, not worth aborting.
        let _ = sys::reset_signals_for_exec();
        // Invariant: `argv` is not empty (checked by run_command).
        let Err(err) = execvp(&argv[0], argv);
        raw_stderr(&format!(
            "usernet: cannot execute {}: {}\n",
            name.to_string_lossy(),
            io::Error::from(err)
        ));
        127
    });
    match command {
        Ok(pid) => relay(pid),
        Err(_) => 1,
    }
}

/// A line on stderr with a raw `write(2)`: std's stderr handle takes a lock another thread
/// may have held at fork time.
fn raw_stderr(line: &str) {
    let _ = nix::unistd::write(io::stderr(), line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_signals_are_not_forwarded() {
        assert!(!should_forward(SI_KERNEL));
        // SI_USER (kill), SI_QUEUE (sigqueue), SI_TKILL.
        for code in [0, -1, -6] {
            assert!(should_forward(code));
        }
    }

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    fn grace_period_starts_on_a_stop_signal_only() {
        // A pid that cannot exist: kill(2) fails harmlessly.
        let mut s = Supervisor::new(Pid::from_raw(i32::MAX), Duration::from_secs(10));
        let t0 = Instant::now();
        s.handle_signal(Signal::SIGUSR1, 0, t0);
        assert_eq!(s.poll_timeout(), None);
        s.handle_signal(Signal::SIGINT, SI_KERNEL, t0);
        assert_eq!(s.poll_timeout(), None);
        s.handle_signal(Signal::SIGTERM, 0, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        // A second one does not push the deadline out.
        s.handle_signal(Signal::SIGTERM, 0, t0 + Duration::from_secs(5));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        s.handle_timeout(t0 + Duration::from_secs(9));
        assert!(s.poll_timeout().is_some());
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(s.poll_timeout(), None);
    }
}
