//! The seccomp allow list of the running event loop (`--enable-seccomp`).
//!
//! # Theory of operation
//!
//! Once [`crate::isolation::apply`] has loaded this filter, every system call that is not
//! listed here, or whose listed arguments do not match, kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`, seen by the parent as death by `SIGSYS`). An allow list
//! fails closed: a syscall that a new feature starts using is refused until it is added
//! here, with a comment saying who needs it.
//!
//! How the list was found: the real binary was run under `strace -f` (attached to the
//! process right before it `exec`s usernet, so the PID and the signals stay usernet's)
//! through every integration test (TCP, UDP and ICMP flows out, DNS, DHCP, published TCP
//! and UDP ports, the JSON API socket, the `-e` pipe, the attach target going away, run
//! mode's command exiting, exits on signals), and every syscall that usernet's own process
//! made from its first `epoll_wait` on was collected with its arguments. A second pass ran
//! the whole suite again with the sandbox and this filter forced on, collecting what
//! followed the `seccomp(2)` call; nothing was killed. Entries marked *(not seen)* were
//! observed in neither pass but are on paths the tests reach rarely or not at all: a
//! fallback of the C library, another architecture, a panic. `tests/sandbox.rs` covers
//! the paths the general suite did not (run mode's signal forwarding, a pid target's exit).
//!
//! Arguments are checked where that is cheap and closes something real: sockets only of
//! the IPv4/IPv6 families and of the stream/datagram types (no raw or packet sockets, no
//! netlink, no `AF_ALG`), socket options only at the IP-family levels and never those that
//! attach BPF programs or upper-layer protocols (`TCP_ULP`), no executable memory, `kill`
//! only of a single positive PID, `fcntl` only for descriptor and status flags, `openat`
//! only read-only (re-reading resolv.conf when it changes).
//!
//! Not listed, among others: `open` and a writing `openat`, `execve`,
//! `fork`/`clone` (usernet never starts a thread or process after start-up), `ioctl`,
//! `mprotect`, `ptrace`, `mount`, `umount2`, `setns`, `unshare`, `bpf`, `keyctl`,
//! `io_uring_*`, `userfaultfd`, `perf_event_open`, `futex` (one thread: no lock is ever
//! contended, so none waits or wakes).
//!
//! x86_64 and aarch64 are supported; elsewhere [`filter`] returns
//! [`FilterError::Unsupported`]. The filter begins with an architecture check, so a
//! syscall made through another ABI (x86's `int 0x80`, x32) is killed too.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

// Socket options that attach BPF programs (asm-generic/socket.h, used by x86_64 and aarch64;
// the libc crate does not export them for glibc targets).
const SO_ATTACH_FILTER: i32 = 26;
const SO_ATTACH_BPF: i32 = 50;
const SO_ATTACH_REUSEPORT_CBPF: i32 = 51;
const SO_ATTACH_REUSEPORT_EBPF: i32 = 52;

/// Why no filter could be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// This architecture has no allow list.
    #[error("no seccomp allow list for {0}")]
    Unsupported(&'static str),
    /// seccompiler refused a rule or the program (a bug in the list).
    #[error("cannot compile the seccomp allow list")]
    Compile(#[source] BackendError),
}

impl From<BackendError> for FilterError {
    fn from(e: BackendError) -> Self {
        FilterError::Compile(e)
    }
}

/// The BPF program: the architecture check, then [`allow_list`], then kill.
///
/// # Errors
///
/// [`FilterError::Unsupported`] off x86_64 and aarch64.
pub fn filter() -> Result<BpfProgram, FilterError> {
    let arch = target_arch()?;
    let filter = SeccompFilter::new(
        allow_list()?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}

fn target_arch() -> Result<TargetArch, FilterError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(FilterError::Unsupported(std::env::consts::ARCH))
    }
}

/// One condition on a 32-bit (`int`) argument.
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// A rule that holds when all `conditions` hold.
fn all(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

/// Rules that hold when argument `index` equals one of `values`.
fn one_of(index: u8, values: &[i32]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|v| all(vec![arg(index, SeccompCmpOp::Eq, int(*v))?]))
        .collect()
}

/// An `int` constant as the 32-bit pattern the filter compares.
fn int(v: i32) -> u64 {
    u64::from(v as u32)
}

/// The syscalls the running loop may make, each with who needs it. An empty rule list
/// allows the syscall with any arguments.
///
/// # Errors
///
/// Only if a rule is malformed (a bug here).
pub fn allow_list() -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    use SeccompCmpOp::{Eq, Gt, Lt, MaskedEq, Ne};
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();

    // --- The loop itself (mio over epoll) ---
    // mio's `Poll::poll`: the one place the loop waits.
    #[cfg(target_arch = "x86_64")]
    m.insert(libc::SYS_epoll_wait, vec![]);
    // (not seen) The same where the C library or the architecture (aarch64) has no
    // epoll_wait.
    m.insert(libc::SYS_epoll_pwait, vec![]);
    // Registering and dropping flows' sockets, API clients, published ports.
    m.insert(libc::SYS_epoll_ctl, vec![]);
    // TAP frames, the signalfd, the `-e` pipe, inotify events, API requests, stream data.
    m.insert(libc::SYS_read, vec![]);
    // TAP frames, stream data, API replies, log lines on stderr, the `-r` byte.
    m.insert(libc::SYS_write, vec![]);
    // (not seen) Vectored forms: stderr logging (std may gather), TAP writes of a vnet
    // header and frame.
    m.insert(libc::SYS_readv, vec![]);
    m.insert(libc::SYS_writev, vec![]);
    // Every descriptor: flows' sockets, API clients, the `-r` pipe, the `-e` pipe's copy.
    m.insert(libc::SYS_close, vec![]);
    // `fcntl`: F_GETFD is std's check that a descriptor it closes is open (debug builds);
    // F_DUPFD_CLOEXEC copies the `-e` pipe to drain it; F_GETFL/F_SETFL/F_SETFD (not seen)
    // set O_NONBLOCK and FD_CLOEXEC on descriptors mio or socket2 adopt.
    m.insert(
        libc::SYS_fcntl,
        one_of(
            1,
            &[
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
            ],
        )?,
    );
    // The pidfd watch of a `--netns-type=pid` target (`TargetWatch::target_gone` polls it
    // once the target exits; tests/sandbox.rs); ppoll is the same where poll does not
    // exist (aarch64).
    #[cfg(target_arch = "x86_64")]
    m.insert(libc::SYS_poll, vec![]);
    m.insert(libc::SYS_ppoll, vec![]);

    // --- Flows: host sockets made on demand ---
    // TCP (SOCK_STREAM), UDP and ICMP echo ("ping", SOCK_DGRAM + IPPROTO_ICMP) sockets of
    // both IP families; never raw, packet, netlink or other families.
    let mut socket = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
            socket.push(all(vec![
                arg(0, Eq, int(family))?,
                // SOCK_TYPE_MASK: the type without SOCK_NONBLOCK / SOCK_CLOEXEC.
                arg(1, MaskedEq(0xf), int(ty))?,
            ])?);
        }
    }
    m.insert(libc::SYS_socket, socket);
    // Outbound TCP, UDP and ICMP flows; the DNS forwarder's upstream sockets.
    m.insert(libc::SYS_connect, vec![]);
    // `--outbound-addr`; published ports added through the API (`add_hostfwd`).
    m.insert(libc::SYS_bind, vec![]);
    // Published TCP ports added through the API.
    m.insert(libc::SYS_listen, vec![]);
    // Published TCP ports and the API socket.
    m.insert(libc::SYS_accept4, vec![]);
    // Published ports: the real client address of an accepted connection.
    m.insert(libc::SYS_getpeername, vec![]);
    // (not seen) The local address of a socket bound to port 0 or an outbound flow.
    m.insert(libc::SYS_getsockname, vec![]);
    // Datagrams of UDP, ICMP and DNS flows and published UDP ports.
    m.insert(libc::SYS_recvfrom, vec![]);
    m.insert(libc::SYS_sendto, vec![]);
    // Published UDP ports: datagrams with ancillary data (the local address a client
    // used, so that replies leave from it); runs of guest datagrams sent segmented
    // (UDP_SEGMENT).
    m.insert(libc::SYS_recvmsg, vec![]);
    m.insert(libc::SYS_sendmsg, vec![]);
    // (not seen) The same in batches.
    m.insert(libc::SYS_recvmmsg, vec![]);
    m.insert(libc::SYS_sendmmsg, vec![]);
    // Half-closing a TCP flow when the guest sends FIN.
    m.insert(libc::SYS_shutdown, vec![]);
    // SO_ERROR after a non-blocking connect.
    m.insert(libc::SYS_getsockopt, vec![]);
    // TCP_NODELAY on flows, SO_LINGER 0 to reset, SO_REUSEADDR and IPV6_V6ONLY on published
    // ports. Levels SOL_SOCKET, IP, IPv6, TCP, UDP only, and never the options that attach
    // BPF programs (SO_ATTACH_FILTER/_BPF/_REUSEPORT_*) or an upper-layer protocol to a TCP
    // socket (TCP_ULP: kTLS and its history of kernel bugs).
    m.insert(
        libc::SYS_setsockopt,
        vec![
            all(vec![
                arg(1, Eq, int(libc::SOL_SOCKET))?,
                arg(2, Ne, int(SO_ATTACH_FILTER))?,
                arg(2, Ne, int(SO_ATTACH_BPF))?,
                arg(2, Ne, int(SO_ATTACH_REUSEPORT_CBPF))?,
                arg(2, Ne, int(SO_ATTACH_REUSEPORT_EBPF))?,
            ])?,
            all(vec![
                arg(1, Eq, int(libc::IPPROTO_TCP))?,
                arg(2, Ne, int(libc::TCP_ULP))?,
            ])?,
            all(vec![arg(1, Eq, int(libc::IPPROTO_IP))?])?,
            all(vec![arg(1, Eq, int(libc::IPPROTO_IPV6))?])?,
            all(vec![arg(1, Eq, int(libc::IPPROTO_UDP))?])?,
        ],
    );

    // --- Following resolv.conf (src/resolv_watch.rs) ---
    // Re-reading the file: read-only opens only (no O_WRONLY/O_RDWR, O_CREAT, O_TRUNC,
    // O_APPEND, O_TMPFILE); with --enable-sandbox the root is read-only anyway.
    let write_flags =
        libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | libc::O_TMPFILE;
    m.insert(
        libc::SYS_openat,
        vec![all(vec![arg(2, MaskedEq(int(write_flags)), 0)?])?],
    );
    // (not seen) std's size hint for reading a file.
    m.insert(libc::SYS_statx, vec![]);
    m.insert(libc::SYS_fstat, vec![]);
    // The watch on a resolv.conf replaced by rename (a new inode).
    m.insert(libc::SYS_inotify_add_watch, vec![]);

    // --- Memory (the allocator; flows' buffers are allocated and freed per flow) ---
    m.insert(libc::SYS_brk, vec![]);
    // Large buffers (per-flow TCP buffers) come from mmap; never executable memory.
    m.insert(
        libc::SYS_mmap,
        vec![all(vec![arg(2, MaskedEq(int(libc::PROT_EXEC)), 0)?])?],
    );
    m.insert(libc::SYS_munmap, vec![]);
    // (not seen) Growing a large buffer in place; giving freed memory back.
    m.insert(libc::SYS_mremap, vec![]);
    m.insert(libc::SYS_madvise, vec![]);

    // --- Clock and randomness ---
    // (not seen) Instant::now / SystemTime::now when the vDSO is unavailable.
    m.insert(libc::SYS_clock_gettime, vec![]);
    // (not seen) Hash keys (std's RandomState) first drawn after start-up.
    m.insert(libc::SYS_getrandom, vec![]);

    // --- Run mode: the command ---
    // Reaping the command on SIGCHLD.
    m.insert(libc::SYS_wait4, vec![]);
    // Passing signals on to the command (tests/sandbox.rs, tests/run.rs): one positive PID
    // only, never a process group or -1 (every process we may signal).
    m.insert(
        libc::SYS_kill,
        vec![all(vec![arg(0, Gt, 0)?, arg(0, Lt, 0x8000_0000)?])?],
    );

    // --- Exit ---
    // The API socket's name, through the directory descriptor kept open for it (no
    // AT_REMOVEDIR).
    m.insert(libc::SYS_unlinkat, vec![all(vec![arg(2, Eq, 0)?])?]);
    // std tears down the main thread's alternate signal stack when main returns.
    m.insert(libc::SYS_sigaltstack, vec![]);
    m.insert(libc::SYS_exit_group, vec![]);
    // (not seen) A thread's own exit.
    m.insert(libc::SYS_exit, vec![]);

    // --- Signals and aborts (not seen) ---
    // Returning from a signal handler (std's stack-overflow handler reports and aborts).
    m.insert(libc::SYS_rt_sigreturn, vec![]);
    // The kernel restarting a syscall interrupted by a stop signal (SIGSTOP/SIGCONT).
    m.insert(libc::SYS_restart_syscall, vec![]);
    // abort() (release builds panic with abort): block signals, then SIGABRT to ourselves,
    // so that a panic shows as SIGABRT, not as a seccomp kill (checked with a release
    // build; with RUST_BACKTRACE set, printing the backtrace needs getcwd, futex and files,
    // and is killed instead).
    m.insert(libc::SYS_rt_sigprocmask, vec![]);
    m.insert(libc::SYS_getpid, vec![]);
    m.insert(libc::SYS_gettid, vec![]);
    m.insert(
        libc::SYS_tgkill,
        vec![all(vec![arg(2, Eq, int(libc::SIGABRT))?])?],
    );

    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_for_this_architecture() {
        let prog = filter().expect("x86_64 and aarch64 have a list");
        assert!(!prog.is_empty());
        // The kernel's limit (BPF_MAXINSNS).
        assert!(prog.len() < 4096, "{} instructions", prog.len());
    }

    #[test]
    fn allow_list_omits_what_an_attacker_wants() {
        let list = allow_list().expect("list");
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_mprotect,
            libc::SYS_ioctl,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
        ] {
            assert!(
                !list.contains_key(&forbidden),
                "syscall {forbidden} allowed"
            );
        }
    }

    #[test]
    fn openat_is_read_only() {
        let list = allow_list().expect("list");
        let rules = &list[&libc::SYS_openat];
        assert_eq!(rules.len(), 1, "one conditional rule, never unconditional");
    }

    #[test]
    fn int_is_the_32_bit_pattern() {
        assert_eq!(int(-1), 0xffff_ffff);
        assert_eq!(int(libc::AF_INET6), 10);
    }
}
