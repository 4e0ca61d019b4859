//! System interfaces of the binary: the only module of the `usernet` crate with `unsafe`
//! code.
//!
//! # Theory of operation
//!
//! Each function wraps one operation that needs `unsafe` (`fork`, adopting a raw
//! descriptor, a raw syscall, signal dispositions) behind a safe signature, and every
//! `unsafe` block names the invariants it relies on in a `// SAFETY:` comment. Raw
//! descriptors go into an [`OwnedFd`] at once.

#![allow(unsafe_code)]

pub mod alloc;
pub mod caps;
pub mod fd;
pub mod link;
pub mod msg;
pub mod seccomp;
pub mod tap;

use std::ffi::c_long;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::{ForkResult, Pid};

/// Forks, and both processes continue with the caller's code: `Some(child)` in the
/// parent, `None` in the child (pasta's detach, where the child lives on).
///
/// Call only while the process is single-threaded (usernet forks before it starts any
/// thread), so that the child inherits no lock held by another thread.
///
/// # Errors
///
/// Errors of `fork(2)` (`EAGAIN`, `ENOMEM`).
pub fn fork_continue() -> nix::Result<Option<Pid>> {
    // SAFETY: the caller is single-threaded (documented above), so the child's copy of
    // the address space is consistent and both processes may run any code, destructors
    // included: each owns its copies of descriptors and memory.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}

/// Forks; the child closes `parent_only`, runs `child` and exits with its return value
/// (101 if it panics). Returns the child's pid in the parent, where `child` is dropped
/// without running: descriptors it captured by value are thereby closed in the parent.
///
/// # Fork safety
///
/// Only the calling thread exists in the child. usernet forks before it starts any other
/// thread, so nothing can be left locked. Where other threads do exist (the test harness),
/// `child` must limit itself to work that needs no lock another thread could hold:
/// syscalls and heap allocation (glibc and musl make `malloc` usable after `fork`); no
/// stdio handles, no `log` macros, no `std::env`. The closures in `netns` keep to that. At
/// worst a violation deadlocks the child; it cannot corrupt the parent.
///
/// # Errors
///
/// Errors of `fork(2)` (`EAGAIN`, `ENOMEM`).
pub fn fork_child<F>(parent_only: &[BorrowedFd<'_>], child: F) -> nix::Result<Pid>
where
    F: FnOnce() -> i32,
{
    // SAFETY: in the child, only the code below runs and it never returns into the
    // caller's frames: it ends in `_exit`, so no destructor of the parent's objects runs
    // twice. usernet is single-threaded when it forks (it forks before starting threads);
    // see "Fork safety" above for what `child` may do when threads exist.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child: pid } => {
            drop(child);
            Ok(pid)
        }
        ForkResult::Child => {
            for fd in parent_only {
                // SAFETY: these descriptors belong to `OwnedFd`s of the parent's frames,
                // whose destructors never run in this process (it ends in `_exit` below),
                // so nothing uses or closes them after this.
                unsafe { libc::close(fd.as_raw_fd()) };
            }
            let code = panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(101);
            // SAFETY: `_exit` ends the process without running atexit handlers or
            // destructors (which belong to the parent's state); it takes no pointers.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Sends `data` (at least one byte) with descriptor `fd` attached (`SCM_RIGHTS`) on a
/// connected `AF_UNIX` socket.
///
/// # Errors
///
/// Errors of `sendmsg(2)` (`EPIPE` if the peer is gone).
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> nix::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(data)];
    loop {
        match socket::sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            other => return other.map(drop),
        }
    }
}

/// Receives one message on an `AF_UNIX` socket into `buf`, with at most one descriptor
/// attached (received close-on-exec; any extra descriptors are closed). Returns the number
/// of bytes (0 at end of stream) and the descriptor.
///
/// # Errors
///
/// Errors of `recvmsg(2)`.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in our table for this message;
                // nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                if received.is_none() {
                    received = Some(fd);
                }
            }
        }
    }
    Ok((msg.bytes, received))
}

/// `pidfd_open(pid, 0)`: a close-on-exec descriptor that becomes readable when process
/// `pid` exits.
///
/// # Errors
///
/// `ESRCH` if there is no such process, `EINVAL` for `pid <= 0`, `ENOSYS` before Linux 5.3.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, c_long::from(pid), 0 as c_long) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = RawFd::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Prepares the signal state for `execve` in a forked child: every signal unblocked and at
/// its default disposition. The Rust runtime ignores `SIGPIPE`, and an ignored signal stays
/// ignored across `execve`; the command must get the usual defaults.
///
/// # Errors
///
/// Errors of `sigprocmask(2)`; dispositions that cannot be changed are skipped.
pub fn reset_signals_for_exec() -> nix::Result<()> {
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run on a signal.
        let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
    }
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}
