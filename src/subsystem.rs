//! The parts of the event loop besides the TAPs and the flows: one way to plug in.
//!
//! # Theory of operation
//!
//! The loop ([`crate::event_loop`]) owns the members' TAPs, the forwarder and the mio
//! `Poll`. Everything else it serves is a [`Subsystem`]: the signals (and run mode's
//! command), the `-e` exit pipe, the attach target's watch, the resolv.conf watch, the API
//! socket, a network's control socket, pasta's port scans and relays. Each one
//!
//! - is given its own range of tokens at start-up ([`Subsystem::start`], from `base` up,
//!   [`TOKENS`] of them) and registers its own sources under them;
//! - gets the readiness events of those sources as local numbers (its token minus its
//!   base, [`Subsystem::handle`]), and a call at the end of every loop turn
//!   ([`Subsystem::turn`]) for its timers and its share of the forwarder's output;
//! - says when it next needs a turn without an event ([`Subsystem::poll_timeout`]) and
//!   whether the loop should end ([`Next::Exit`]).
//!
//! So a token says who owns it by arithmetic alone ([`crate::event_loop`]'s `Source`), and
//! adding a part touches no dispatch code. A subsystem reaches the forwarder and the TAPs
//! only through the [`Cx`] of the call.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use forwarder::{Forwarder, FrameSink, PortId};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

use crate::busy_poll::WaitStats;
use crate::host::Sockets;
use crate::netns::TargetWatch;
use crate::pidns::Supervisor;
use crate::resolv_watch::ResolvWatch;
use crate::sys::tap::Tap;

/// Tokens each subsystem may use, from its base up.
pub const TOKENS: usize = 1 << 32;

/// Why a subsystem could not start: its own error, shown as it is.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// What the loop does after a subsystem's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on.
    Continue,
    /// End the loop with this exit status.
    Exit(i32),
}

/// The members' TAPs, as the event loop keeps them.
pub trait Taps {
    /// Starts watching `tap` as `port`'s.
    ///
    /// # Errors
    /// The registration's.
    fn add(&mut self, port: PortId, tap: Tap, registry: &Registry) -> io::Result<()>;
    /// Stops watching and closes `port`'s TAP (the device goes away with it).
    fn remove(&mut self, port: PortId, registry: &Registry);
    /// Where frames for the members go.
    fn sink(&mut self) -> &mut dyn FrameSink;
}

/// What a subsystem may touch during one call.
pub struct Cx<'a> {
    /// The forwarder.
    pub fwd: &'a mut Forwarder,
    /// Where sources are registered.
    pub registry: &'a Registry,
    /// The forwarder's host sockets.
    pub sockets: &'a mut Sockets,
    /// The members' TAPs.
    pub taps: &'a mut dyn Taps,
    /// What `get_info` answers: mode, pid, and in run mode the name and command.
    pub info: &'a serde_json::Value,
    /// The loop's waits so far (`get_stats` section `loop`).
    pub waits: WaitStats,
}

/// A part of the event loop; see the module's header.
pub trait Subsystem {
    /// Registers its sources with tokens from `base` up ([`TOKENS`] of them).
    ///
    /// # Errors
    /// What stops start-up.
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError>;

    /// Once the forwarder's ports are published, before ready is reported.
    ///
    /// # Errors
    /// What stops start-up.
    fn before_ready(&mut self, cx: &mut Cx<'_>) -> Result<(), StartError> {
        let _ = cx;
        Ok(())
    }

    /// A readiness event of its source `local` (its token minus its base).
    fn handle(&mut self, local: usize, cx: &mut Cx<'_>) -> Next;

    /// When it next needs a [`turn`](Self::turn) without an event (`None`: not before
    /// one). Called before every wait; may do its own housekeeping.
    fn poll_timeout(&mut self, cx: &mut Cx<'_>) -> Option<Instant> {
        let _ = cx;
        None
    }

    /// The end of every loop turn, after the forwarder ran.
    fn turn(&mut self, cx: &mut Cx<'_>) -> Next {
        let _ = cx;
        Next::Continue
    }

    /// `port`'s TAP went away (its namespace ended); false: the loop ends.
    fn tap_gone(&mut self, port: PortId, cx: &mut Cx<'_>) -> bool {
        let _ = (port, cx);
        false
    }
}

fn register(registry: &Registry, fd: i32, token: usize) -> Result<(), StartError> {
    registry.register(&mut SourceFd(&fd), Token(token), Interest::READABLE)?;
    Ok(())
}

/// SIGTERM, SIGINT, SIGHUP (the loop ends), and in run mode every signal for the command,
/// which the loop ends with.
pub struct Signals {
    signals: SignalFd,
    child: Option<Supervisor>,
}

impl Signals {
    /// The signals on `signals` ([`crate::event_loop::signal_fd`]); `child`: run mode's
    /// command.
    pub fn new(signals: SignalFd, child: Option<Supervisor>) -> Signals {
        Signals { signals, child }
    }
}

impl Subsystem for Signals {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        register(cx.registry, self.signals.as_raw_fd(), base)
    }

    fn handle(&mut self, _local: usize, _cx: &mut Cx<'_>) -> Next {
        match handle_signals(&self.signals, self.child.as_mut()) {
            Some(code) => Next::Exit(code),
            None => Next::Continue,
        }
    }

    fn poll_timeout(&mut self, _cx: &mut Cx<'_>) -> Option<Instant> {
        self.child.as_ref().and_then(Supervisor::poll_timeout)
    }

    fn turn(&mut self, _cx: &mut Cx<'_>) -> Next {
        if let Some(child) = self.child.as_mut() {
            child.handle_timeout(Instant::now());
        }
        Next::Continue
    }
}

/// Handles pending signals; `Some(status)` when the loop should end: a signal to end
/// (no `child`), or `child`'s exit (the others are passed on to it).
pub fn handle_signals(signals: &SignalFd, mut child: Option<&mut Supervisor>) -> Option<i32> {
    while let Ok(Some(info)) = signals.read_signal() {
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        match (sig, child.as_deref_mut()) {
            (Signal::SIGCHLD, Some(child)) => {
                if let Some(code) = child.try_reap() {
                    return Some(code);
                }
            }
            (Signal::SIGCHLD, None) => {}
            (sig, Some(child)) => {
                // Run mode: the command decides; pass the signal on.
                child.handle_signal(sig, info.ssi_code, Instant::now());
            }
            (sig, None) => {
                log::info!("{sig}: exiting");
                return Some(0);
            }
        }
    }
    None
}

/// `-e`: the loop ends when this pipe reaches end of file (data written to it is ignored).
pub struct ExitFd(pub OwnedFd);

impl Subsystem for ExitFd {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        set_nonblocking(&self.0)?;
        register(cx.registry, self.0.as_raw_fd(), base)
    }

    fn handle(&mut self, _local: usize, _cx: &mut Cx<'_>) -> Next {
        let Ok(dup) = self.0.try_clone() else {
            return Next::Continue;
        };
        let mut f = File::from(dup);
        let mut buf = [0u8; 64];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Continue,
                Err(_) => break,
            }
        }
        log::info!("exit fd closed: exiting");
        Next::Exit(0)
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// The attach target: the loop ends when it goes away.
pub struct Target(pub TargetWatch);

impl Subsystem for Target {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        register(cx.registry, self.0.as_raw_fd(), base)
    }

    fn handle(&mut self, _local: usize, _cx: &mut Cx<'_>) -> Next {
        if self.0.target_gone() {
            log::info!("the namespace went away: exiting");
            return Next::Exit(0);
        }
        Next::Continue
    }
}

/// The host's resolv.conf, followed for the DNS forwarder.
pub struct Resolv(pub ResolvWatch);

impl Subsystem for Resolv {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        register(cx.registry, self.0.as_raw_fd(), base)
    }

    fn handle(&mut self, _local: usize, _cx: &mut Cx<'_>) -> Next {
        self.0.handle_ready(Instant::now());
        Next::Continue
    }

    fn poll_timeout(&mut self, _cx: &mut Cx<'_>) -> Option<Instant> {
        self.0.poll_timeout()
    }

    fn turn(&mut self, cx: &mut Cx<'_>) -> Next {
        if let Some(list) = self.0.poll(Instant::now()) {
            let mut io = cx.sockets.io(cx.taps.sink());
            cx.fwd.set_nameservers(list, &mut io);
        }
        Next::Continue
    }
}
