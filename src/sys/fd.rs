//! Adopting file descriptors passed on the command line (`-r`, `-e`, `tapfd`).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Takes ownership of an inherited descriptor, after checking that it is open, and marks
/// it close-on-exec. Call at most once per descriptor number.
///
/// # Errors
/// `EBADF` when `fd` is not an open descriptor of this process; standard descriptors are
/// refused with `EINVAL`.
pub fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: F_GETFD only reads the descriptor table entry; it fails with EBADF on a
    // number that is not an open descriptor and touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (F_GETFD succeeded), above the standard descriptors, and the
    // caller passes each command-line descriptor once, so nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
    fcntl(&owned, FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(owned)
}

/// Closes every descriptor above 2 except those in `keep`, so that a caller's pipes and
/// sockets are never held open by usernet (slirp4netns's callers hand it only `-e`, `-r`
/// and a TAP descriptor). Uses `close_range(2)`, or, on kernels before 5.9, closes the
/// numbers listed in `/proc/self/fd`.
///
/// Call at start-up, before anything of this process opens a descriptor: every
/// descriptor not in `keep` is closed, whoever owns it.
///
/// # Errors
/// Only when neither `close_range` nor `/proc/self/fd` is available.
pub fn close_inherited(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    for &fd in &keep {
        if fd > first {
            ranges.push((first, fd - 1));
        }
        first = fd.saturating_add(1);
    }
    ranges.push((first, u32::MAX));
    for &(lo, hi) in &ranges {
        // SAFETY: close_range only closes descriptors of this process; the caller runs
        // this before any object of ours owns a descriptor in these ranges (the kept ones
        // are outside them), so no `OwnedFd` or `File` is left pointing at a closed number.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0u32) };
        if rc != 0 {
            return close_listed(&keep);
        }
    }
    Ok(())
}

/// The fallback of [`close_inherited`]: closes what `/proc/self/fd` lists.
fn close_listed(keep: &[u32]) -> io::Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory's own descriptor is closed by now; closing it again fails harmlessly.
    for fd in open {
        if fd > 2 && !u32::try_from(fd).is_ok_and(|f| keep.contains(&f)) {
            // SAFETY: as in `close_inherited`: nothing of ours owns these numbers yet.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Points descriptors 0, 1 and 2 at `/dev/null` (a detached daemon keeps none of its
/// caller's terminals or pipes).
///
/// # Errors
/// Opening `/dev/null` or `dup2(2)` failing.
pub fn stdio_to_dev_null() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}
