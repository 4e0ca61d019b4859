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
