//! Namespaces: open the TAP inside the target's network namespace, run a command in new
//! namespaces, and notice when the target goes away.
//!
//! # Theory of operation
//!
//! **Attaching** ([`open_tap`], slirp4netns `PID` / `--netns-type=path`): the TAP must be
//! created inside the target's network namespace, but usernet itself stays in the host's
//! namespaces, where its host sockets live. So a forked helper does the namespace work,
//! as slirp4netns does: it joins the user namespace (which needs a single-threaded
//! process; a freshly forked child is one), then the network namespace, creates or
//! attaches the TAP, optionally configures it (`-c`), and sends the descriptor back over a
//! `socketpair` with `SCM_RIGHTS`. A TAP descriptor keeps working from any namespace. On
//! failure the helper sends one line of error text plus the `errno` instead, which
//! becomes [`NetnsError::Helper`].
//!
//! **Running** ([`spawn_run`], `usernet run -- CMD`): the child creates new user, network,
//! mount and PID namespaces, maps root to our user, creates and configures the TAP, puts a
//! generated `resolv.conf` in place with a bind mount, hands the TAP to the parent, and
//! waits on a pipe until the parent [releases](Hold::release) it, so nothing runs
//! before usernet serves the network (ports published, API socket bound, sandbox applied).
//! Then it starts the command in the new PID namespace ([`crate::pidns`]).
//!
//! **Watching** ([`TargetWatch`]): a TAP descriptor holds a reference to its namespace,
//! so the TAP never goes away by itself. A pid target is watched with a pidfd (readable
//! when the process exits); a path target with inotify on its directory, for the unlink
//! that `ip netns del` does after unmounting (pasta's `--netns` quit works the same way).
//!
//! Security: the helper runs with our credentials in the target's namespaces and only
//! ever sends back a TAP descriptor or text. The command of `usernet run` gets no
//! descriptor of ours: everything we open is close-on-exec.
//!
//! Accepted risks: the parent trusts the helper's answer (it is our own child). The
//! resolv.conf copy lives in a private temporary directory until the child has mounted
//! it; another process of the same user could replace it in that window.

use std::ffi::{CString, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{getegid, geteuid, getpid, getppid, pipe2, Pid};

use crate::sys;
use crate::sys::link::{configure, LinkConfig, LinkError};
use crate::sys::tap::{Tap, TapError};

/// The namespace to attach to (slirp4netns's positional argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A process: its network namespace `/proc/PID/ns/net`, its user namespace
    /// `/proc/PID/ns/user` (`--netns-type=pid`, the default).
    Pid(i32),
    /// A network namespace file, e.g. `/run/netns/NAME` (`--netns-type=path`).
    Path(PathBuf),
}

impl Target {
    /// The network namespace file.
    pub(crate) fn netns_path(&self) -> PathBuf {
        match self {
            Target::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            Target::Path(path) => path.clone(),
        }
    }

    /// The user namespace file to join: `userns` if given, else the process's for a pid.
    pub(crate) fn userns_path(&self, userns: Option<&Path>) -> Option<PathBuf> {
        match (userns, self) {
            (Some(path), _) => Some(path.to_owned()),
            (None, Target::Pid(pid)) => Some(PathBuf::from(format!("/proc/{pid}/ns/user"))),
            (None, Target::Path(_)) => None,
        }
    }
}

/// What [`open_tap`] does.
#[derive(Debug, Clone)]
pub struct AttachSpec {
    /// Whose network namespace.
    pub target: Target,
    /// User namespace to join (`--userns-path`); see [`open_tap`] for the default.
    pub userns: Option<PathBuf>,
    /// TAP device to create or attach, e.g. `tap0`.
    pub tap_name: String,
    /// Open the TAP with `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
    /// Configure the link (`-c`). Its `name` is ignored: the TAP's name is used.
    pub configure: Option<LinkConfig>,
}

/// What [`spawn_run`] does.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The command and its arguments; `cmd[0]` is looked up in `PATH`.
    pub cmd: Vec<OsString>,
    /// TAP device to create in the new network namespace.
    pub tap_name: String,
    /// Open the TAP with `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
    /// Link configuration. Its `name` is ignored: the TAP's name is used.
    pub link: LinkConfig,
    /// Content of the command's `/etc/resolv.conf`, e.g. `"nameserver 10.0.2.3\n"`.
    pub resolv_conf: String,
    /// The command's host name, in a UTS namespace of its own (a network member's name).
    pub hostname: Option<String>,
}

/// A child of [`spawn_run`], held back before the command starts until [`Hold::release`].
///
/// Dropping it without releasing makes the child exit (status 1) without running the
/// command; reap it with `waitpid` either way.
#[derive(Debug)]
pub struct RunChild {
    /// The child's pid (in our pid namespace); reap it with `waitpid`.
    pub pid: Pid,
    /// The TAP inside the child's network namespace.
    pub tap: Tap,
    /// What holds the command back.
    pub hold: Hold,
}

/// Holds the command of a [`RunChild`] back until [`Hold::release`]; dropped unreleased,
/// the child exits (status 1) without running the command.
#[derive(Debug)]
pub struct Hold {
    /// Write end of the pipe the child waits on; `None` once released.
    sync: Option<OwnedFd>,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The command of [`RunSpec`] is empty.
    #[error("no command to run")]
    EmptyCommand,
    /// An argument of the command contains a NUL byte.
    #[error("command argument {arg:?} contains a NUL byte")]
    NulInArgument {
        /// The argument.
        arg: OsString,
    },
    /// The private temporary directory for `resolv.conf` cannot be created.
    #[error("cannot create a temporary directory in {dir}")]
    TempDir {
        /// The parent directory (`$TMPDIR` or `/tmp`).
        dir: PathBuf,
        /// The error of `mkdir(2)`.
        #[source]
        source: io::Error,
    },
    /// The `resolv.conf` copy cannot be written.
    #[error("cannot write {path}")]
    WriteResolvConf {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `socketpair(2)` failed.
    #[error("cannot create a socket pair for the namespace helper")]
    Socketpair(#[source] nix::Error),
    /// `pipe2(2)` failed.
    #[error("cannot create the pipe that holds the command back")]
    Pipe(#[source] nix::Error),
    /// `fork(2)` failed.
    #[error("cannot fork the namespace helper")]
    Fork(#[source] nix::Error),
    /// Reading the helper's answer failed.
    #[error("cannot receive the answer of the namespace helper")]
    Receive(#[source] nix::Error),
    /// The helper's answer is not in our format.
    #[error("garbled answer from the namespace helper")]
    Garbled,
    /// The helper exited (or was killed) without answering.
    #[error("the namespace helper exited without an answer ({status})")]
    NoAnswer {
        /// How it ended, e.g. `killed by signal SIGKILL`.
        status: String,
    },
    /// The helper failed; `message` is its error text (e.g. `cannot join network
    /// namespace /proc/123/ns/net`) and `source` its `errno`, if there was one.
    #[error("{message}")]
    Helper {
        /// The helper's error text, without the `errno` text.
        message: String,
        /// The `errno` of the failing call.
        #[source]
        source: Option<io::Error>,
    },
    /// The descriptor received from the helper is not a usable TAP.
    #[error("cannot use the TAP descriptor received from the namespace helper")]
    ReceivedTap(#[source] TapError),
    /// Writing to the release pipe failed (`EPIPE`: the child is gone).
    #[error("cannot release the command")]
    Release(#[source] nix::Error),
    /// `pidfd_open(2)` failed (`ESRCH`: no such process).
    #[error("cannot watch process {pid}")]
    WatchProcess {
        /// The process.
        pid: i32,
        /// The error of `pidfd_open(2)`.
        #[source]
        source: io::Error,
    },
    /// `inotify_init1(2)` failed.
    #[error("cannot create an inotify instance")]
    Inotify(#[source] nix::Error),
    /// `inotify_add_watch(2)` failed on the directory of the namespace file.
    #[error("cannot watch directory {dir}")]
    WatchDir {
        /// The directory.
        dir: PathBuf,
        /// The error of `inotify_add_watch(2)`.
        #[source]
        source: nix::Error,
    },
    /// The namespace path has no file name (`/`, `..`).
    #[error("namespace path {path} does not name a file")]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// The namespace file was already gone when the watch started.
    #[error("namespace file {path} is already gone")]
    AlreadyGone {
        /// The path.
        path: PathBuf,
    },
}

/// Opens the TAP device `spec.tap_name` inside the target's network namespace, through a
/// forked helper.
///
/// The helper joins the user namespace first: `spec.userns`, else `/proc/PID/ns/user` for
/// a [`Target::Pid`], else none. The join is skipped when that is already our user
/// namespace (`setns` into one's own user namespace fails with `EINVAL`). Then it joins
/// the network namespace (`/proc/PID/ns/net` or the path), creates or attaches the TAP
/// (see [`Tap::create`]), configures it when `spec.configure` is `Some`, and sends the
/// descriptor back. It exits right after; the [`Helper`] returned with the TAP reaps it
/// (a failed helper is reaped before this returns, for its exit status).
///
/// Call it before starting threads (see [`sys::fork_child`]).
///
/// # Errors
///
/// [`NetnsError::Helper`] with the helper's error text (e.g. `cannot join network
/// namespace /proc/123/ns/net`, source `No such file or directory`); the other variants
/// for local failures (`socketpair`, `fork`, receiving, a helper that died).
pub fn open_tap(spec: &AttachSpec) -> Result<(Tap, Helper), NetnsError> {
    let netns = spec.target.netns_path();
    let userns = spec.target.userns_path(spec.userns.as_deref());
    let (parent_sock, child_sock) = seqpacket_pair()?;

    let pid = sys::fork_child(&[parent_sock.as_fd()], move || {
        let result = refuse_own_netns(&netns, spec.configure.is_some())
            .and_then(|()| join_namespaces(&netns, userns.as_deref()))
            .and_then(|()| create_tap(&spec.tap_name, spec.vnet_hdr, spec.configure.as_ref()));
        report(child_sock.as_fd(), result)
    })
    .map_err(NetnsError::Fork)?;

    let answer = receive(parent_sock.as_fd());
    // The helper exits right after answering (or failing to).
    let helper = Helper(Some(pid));
    match answer {
        Answer::Tap(fd) => Ok((Tap::from_fd(fd).map_err(NetnsError::ReceivedTap)?, helper)),
        other => Err(answer_error(other, helper.reap())),
    }
}

/// The helper of [`open_tap`], which exits once it has handed the TAP over: reaped when
/// dropped. Its exit takes a while (0.1-0.2 ms, its copy of our memory is torn down), so
/// attach mode keeps it until ready has been reported.
#[derive(Debug)]
pub struct Helper(Option<Pid>);

impl Helper {
    /// Waits for the helper's exit; its status as text.
    fn reap(mut self) -> String {
        self.0.take().map_or_else(String::new, reap)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            reap(pid);
        }
    }
}

/// Forks the child of `usernet run -- CMD` in new user, network, mount and PID namespaces,
/// and returns once its TAP is ready, with the child held back before the command starts.
///
/// The child: dies with the calling thread (`PR_SET_PDEATHSIG` `SIGKILL`: the command's
/// network would be gone anyway); `unshare`s user, network, mount and PID namespaces; writes `deny` to `/proc/self/setgroups`, `0 EUID 1` to `uid_map`,
/// `0 EGID 1` to `gid_map` (unprivileged or root alike); creates the TAP and configures
/// it as `slirp4netns -c` does; makes all mounts private and bind-mounts a file holding
/// `spec.resolv_conf` over `/etc/resolv.conf` (over its target if it is a symlink);
/// sends the TAP to us; waits for [`Hold::release`] (and exits with status 1 if we
/// go away first); then starts the command as PID 2 of the new PID namespace under an init
/// of ours ([`crate::pidns::run_command`]) and exits with the command's status once it has
/// ended, taking every other process of the namespace with it. If `execvp` fails, the
/// command prints `usernet: cannot execute CMD: ERROR` on stderr and exits with 127.
///
/// The `resolv.conf` copy lives in a private directory under `$TMPDIR` (or `/tmp`),
/// removed as soon as the child has mounted it (the mount keeps the file alive).
///
/// Call it from the main thread before starting other threads: the death signal follows
/// the forking *thread*.
///
/// # Errors
///
/// [`NetnsError::EmptyCommand`], [`NetnsError::NulInArgument`] for bad commands;
/// [`NetnsError::Helper`] with the child's error text for a failure before the release
/// (the child is reaped then); the other variants for local failures.
pub fn spawn_run(spec: &RunSpec) -> Result<RunChild, NetnsError> {
    if spec.cmd.is_empty() {
        return Err(NetnsError::EmptyCommand);
    }
    let argv = spec
        .cmd
        .iter()
        .map(|arg| {
            CString::new(arg.as_bytes()).map_err(|_| NetnsError::NulInArgument { arg: arg.clone() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let resolv = TempResolvConf::create(&spec.resolv_conf)?;
    let (parent_sock, child_sock) = seqpacket_pair()?;
    let (sync_read, sync_write) = pipe2(OFlag::O_CLOEXEC).map_err(NetnsError::Pipe)?;
    let ids = IdMaps {
        uid: geteuid().as_raw(),
        gid: getegid().as_raw(),
    };
    let parent = getpid();
    let resolv_path = resolv.file.clone();

    let pid = sys::fork_child(&[parent_sock.as_fd(), sync_write.as_fd()], move || {
        // Die with the forking thread. If it is gone already, we have a new parent.
        if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
            return 1;
        }
        let tap = match setup_run(spec, ids, &resolv_path) {
            Ok(tap) => tap,
            Err(err) => return report(child_sock.as_fd(), Err(err)),
        };
        if report(child_sock.as_fd(), Ok(tap)) != 0 {
            return 1;
        }
        drop(child_sock);
        if !wait_release(sync_read.as_fd()) {
            return 1;
        }
        drop(sync_read);
        crate::pidns::run_command(&argv, &spec.cmd[0])
    })
    .map_err(NetnsError::Fork)?;

    let answer = receive(parent_sock.as_fd());
    // Once the child answered, its mount holds the resolv.conf copy: remove the file.
    drop(resolv);
    let failure = match answer {
        Answer::Tap(fd) => match Tap::from_fd(fd) {
            Ok(tap) => {
                return Ok(RunChild {
                    pid,
                    tap,
                    hold: Hold {
                        sync: Some(sync_write),
                    },
                })
            }
            Err(err) => Err(NetnsError::ReceivedTap(err)),
        },
        other => Ok(other),
    };
    // Closing the pipe makes a child that got this far exit; then reap it.
    drop(sync_write);
    drop(parent_sock);
    let status = reap(pid);
    Err(match failure {
        Ok(answer) => answer_error(answer, status),
        Err(err) => err,
    })
}

impl Hold {
    /// Lets the child start the command. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`NetnsError::Release`] if the child is gone (`EPIPE`).
    pub fn release(&mut self) -> Result<(), NetnsError> {
        let Some(fd) = self.sync.take() else {
            return Ok(());
        };
        loop {
            match nix::unistd::write(&fd, b"1") {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(err) => return Err(NetnsError::Release(err)),
            }
        }
    }
}

/// Notices when the attach target goes away, so usernet can exit by itself.
///
/// A [`Target::Pid`] (or a `/proc/PID/ns/...` or `/proc/PID/root/...` path) is watched with a pidfd, readable
/// once the process exits. Any other path is watched with inotify on its directory for
/// `IN_DELETE` / `IN_MOVED_FROM` of its name (`ip netns del` unmounts, then unlinks
/// `/run/netns/NAME`), and for the directory itself going away.
///
/// Register [`AsRawFd::as_raw_fd`] for readability with mio (edge-triggered is fine) and
/// call [`TargetWatch::target_gone`] on each readiness event.
#[derive(Debug)]
pub struct TargetWatch {
    kind: WatchKind,
    gone: bool,
}

#[derive(Debug)]
enum WatchKind {
    Process { pidfd: OwnedFd },
    File { inotify: Inotify, name: OsString },
}

impl TargetWatch {
    /// Starts watching `target`.
    ///
    /// # Errors
    ///
    /// [`NetnsError::WatchProcess`] if the process does not exist (`ESRCH`);
    /// [`NetnsError::BadPath`] for a path without file name; [`NetnsError::Inotify`],
    /// [`NetnsError::WatchDir`] if inotify fails; [`NetnsError::AlreadyGone`] if the file
    /// disappeared before the watch started.
    pub fn new(target: &Target) -> Result<TargetWatch, NetnsError> {
        let kind = match target {
            Target::Pid(pid) => watch_process(*pid)?,
            Target::Path(path) => match proc_pid(path) {
                Some(pid) => watch_process(pid)?,
                None => watch_file(path)?,
            },
        };
        Ok(TargetWatch { kind, gone: false })
    }

    /// After a readiness event: drains the pending notifications and tells whether the
    /// target is gone. Once true, stays true.
    pub fn target_gone(&mut self) -> bool {
        if self.gone {
            return true;
        }
        self.gone = match &self.kind {
            WatchKind::Process { pidfd } => {
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                // An error (only EINTR/ENOMEM are possible) means "don't know yet": the
                // descriptor stays readable and is reported again.
                matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            }
            WatchKind::File { inotify, name } => drain_inotify(inotify, name),
        };
        self.gone
    }
}

impl AsFd for TargetWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.kind {
            WatchKind::Process { pidfd } => pidfd.as_fd(),
            WatchKind::File { inotify, .. } => inotify.as_fd(),
        }
    }
}

impl AsRawFd for TargetWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

fn watch_process(pid: i32) -> Result<WatchKind, NetnsError> {
    let pidfd = sys::pidfd_open(pid).map_err(|source| NetnsError::WatchProcess { pid, source })?;
    Ok(WatchKind::Process { pidfd })
}

fn watch_file(path: &Path) -> Result<WatchKind, NetnsError> {
    let name = path
        .file_name()
        .ok_or_else(|| NetnsError::BadPath {
            path: path.to_owned(),
        })?
        .to_owned();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(NetnsError::Inotify)?;
    let mask = AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR;
    inotify
        .add_watch(dir, mask)
        .map_err(|source| NetnsError::WatchDir {
            dir: dir.to_owned(),
            source,
        })?;
    // An unlink before the watch existed sends no event: look once now.
    if let Err(err) = fs::symlink_metadata(path) {
        if err.kind() == io::ErrorKind::NotFound {
            return Err(NetnsError::AlreadyGone {
                path: path.to_owned(),
            });
        }
    }
    Ok(WatchKind::File { inotify, name })
}

/// Reads every queued inotify event; true if one says the file or its directory is gone.
fn drain_inotify(inotify: &Inotify, name: &OsStr) -> bool {
    let mut gone = false;
    let dir_gone = AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_UNMOUNT
        | AddWatchFlags::IN_IGNORED;
    let file_gone = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM;
    loop {
        match inotify.read_events() {
            Ok(events) if events.is_empty() => break,
            Ok(events) => {
                for event in events {
                    if event.mask.intersects(dir_gone)
                        || (event.mask.intersects(file_gone) && event.name.as_deref() == Some(name))
                    {
                        gone = true;
                    }
                }
            }
            Err(nix::Error::EINTR) => continue,
            // EAGAIN: drained. Anything else: nothing more to read now.
            Err(_) => break,
        }
    }
    gone
}

/// The pid of a `/proc/PID/ns/*` path: procfs sends no inotify events, watch the process.
fn proc_pid(path: &Path) -> Option<i32> {
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir)
        || parts.next() != Some(Component::Normal(OsStr::new("proc")))
    {
        return None;
    }
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    match parts.next() {
        Some(Component::Normal(n)) if n == "ns" => {
            parts.next()?;
            parts.next().is_none().then_some(pid)
        }
        // RootlessKit's `--detach-netns` path, /proc/PID/root/STATEDIR/netns: reachable
        // only while PID lives (inotify does not see that through procfs).
        Some(Component::Normal(n)) if n == "root" => parts.next().map(|_| pid),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Helper side (runs in the forked child; see sys::fork_child for what it may do)
// ---------------------------------------------------------------------------------------

/// Why the helper failed; flattened to text + errno for the parent.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cannot join user namespace {path}")]
    JoinUserns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot join network namespace {path}")]
    JoinNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to configure {path}: it is usernet's own network namespace (its default \
         route would lead into the TAP, usernet's own traffic with it); name the container's \
         process or namespace"
    )]
    OwnNetns { path: PathBuf },
    #[error("cannot create user, network, mount and PID namespaces")]
    Unshare(#[source] nix::Error),
    #[error("cannot set the host name")]
    Hostname(#[source] nix::Error),
    #[error("cannot write {path}")]
    IdMap {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot make the mounts private")]
    MountPrivate(#[source] nix::Error),
    #[error("cannot resolve /etc/resolv.conf")]
    ResolvConfTarget(#[source] io::Error),
    #[error("cannot bind-mount {source_path} over {target}")]
    BindResolvConf {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Our effective ids, mapped to root in the new user namespace.
#[derive(Debug, Clone, Copy)]
struct IdMaps {
    uid: u32,
    gid: u32,
}

/// Joins `userns` (unless it is ours) and then `netns`.
/// Joins `userns` (unless it is ours already), then `netns`, in the calling process: for
/// forked helpers only (joining a user namespace needs a single-threaded process).
///
/// # Errors
/// [`NetnsError::Helper`] naming the namespace that could not be joined.
pub(crate) fn join_paths(netns: &Path, userns: Option<&Path>) -> Result<(), NetnsError> {
    join_namespaces(netns, userns).map_err(|e| {
        let (message, errno) = flatten(&e);
        NetnsError::Helper {
            message,
            source: errno.map(io::Error::from_raw_os_error),
        }
    })
}

fn join_namespaces(netns: &Path, userns: Option<&Path>) -> Result<(), StepError> {
    // Open both first: once in the user namespace we may no longer be allowed to.
    let user = userns
        .map(|path| {
            File::open(path)
                .map(|file| (file, path))
                .map_err(|source| StepError::JoinUserns {
                    path: path.to_owned(),
                    source,
                })
        })
        .transpose()?;
    let net = File::open(netns).map_err(|source| StepError::JoinNetns {
        path: netns.to_owned(),
        source,
    })?;
    if let Some((file, path)) = user {
        if !is_own_userns(&file) {
            setns(&file, CloneFlags::CLONE_NEWUSER).map_err(|err| StepError::JoinUserns {
                path: path.to_owned(),
                source: err.into(),
            })?;
        }
    }
    setns(&net, CloneFlags::CLONE_NEWNET).map_err(|err| StepError::JoinNetns {
        path: netns.to_owned(),
        source: err.into(),
    })
}

/// Whether `file` is our own user namespace. If ours cannot be read, assume not and let
/// `setns` decide.
fn is_own_userns(file: &File) -> bool {
    is_ours(file.metadata(), "/proc/self/ns/user")
}

/// Whether the namespace `theirs` is the one of ours at `own` (same device and inode);
/// false when either cannot be read.
fn is_ours(theirs: io::Result<fs::Metadata>, own: &str) -> bool {
    match (theirs, fs::metadata(own)) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    }
}

/// With `configure`, refuses our own network namespace: its default route would lead
/// into the TAP we serve, and our host sockets' traffic with it, a loop (slirp4netns
/// does it; a PID mistyped as one's shell's is enough). Without, a TAP there is fine: a
/// VM's, say, whose routes are the VM's own.
fn refuse_own_netns(netns: &Path, configure: bool) -> Result<(), StepError> {
    if configure && is_ours(fs::metadata(netns), "/proc/self/ns/net") {
        return Err(StepError::OwnNetns {
            path: netns.to_owned(),
        });
    }
    Ok(())
}

/// Creates the TAP in the current network namespace and configures it if asked.
fn create_tap(name: &str, vnet_hdr: bool, link: Option<&LinkConfig>) -> Result<Tap, StepError> {
    let tap = Tap::create(name, vnet_hdr)?;
    if let Some(link) = link {
        configure(&LinkConfig {
            name: tap.name().to_owned(),
            ..link.clone()
        })?;
    }
    Ok(tap)
}

/// The child of `spawn_run`, up to the point where it hands over the TAP.
fn setup_run(spec: &RunSpec, ids: IdMaps, resolv_conf: &Path) -> Result<Tap, StepError> {
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(StepError::Unshare)?;
    let write = |path: &'static str, content: String| {
        fs::write(path, content).map_err(|source| StepError::IdMap { path, source })
    };
    write("/proc/self/setgroups", "deny".to_owned())?;
    write("/proc/self/uid_map", format!("0 {} 1\n", ids.uid))?;
    write("/proc/self/gid_map", format!("0 {} 1\n", ids.gid))?;

    let tap = create_tap(&spec.tap_name, spec.vnet_hdr, Some(&spec.link))?;
    if let Some(name) = &spec.hostname {
        unshare(CloneFlags::CLONE_NEWUTS).map_err(StepError::Unshare)?;
        nix::unistd::sethostname(name).map_err(StepError::Hostname)?;
    }

    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(StepError::MountPrivate)?;
    let target = fs::canonicalize("/etc/resolv.conf").map_err(StepError::ResolvConfTarget)?;
    mount(
        Some(resolv_conf),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| StepError::BindResolvConf {
        source_path: resolv_conf.to_owned(),
        target: target.clone(),
        source,
    })?;
    Ok(tap)
}

/// Joins `target`'s network namespace (and its user namespace first, for a process that
/// is not in ours), in this process: for `usernet run --network container:PID`, before
/// the command is executed in place. usernet must still be single-threaded.
///
/// # Errors
/// [`NetnsError::Helper`] naming the namespace that could not be joined.
pub fn join(target: &Target) -> Result<(), NetnsError> {
    join_paths(&target.netns_path(), target.userns_path(None).as_deref())
}

/// Blocks until the parent writes a byte (true) or closes the pipe (false).
fn wait_release(fd: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut byte) {
            Ok(n) => return n == 1,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helper protocol: one SOCK_SEQPACKET message.
//   b'T' with the TAP descriptor attached (SCM_RIGHTS), or
//   b'E', errno (i32, native endian, 0 = none), UTF-8 error text.
// ---------------------------------------------------------------------------------------

const ANSWER_TAP: u8 = b'T';
const ANSWER_ERROR: u8 = b'E';
/// Receive buffer; the error text is cut to fit.
const ANSWER_MAX: usize = 4096;

/// What the parent received.
#[derive(Debug)]
enum Answer {
    Tap(OwnedFd),
    Error { message: String, errno: Option<i32> },
    Eof,
    Garbled,
    Failed(nix::Error),
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), NetnsError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(NetnsError::Socketpair)
}

/// Helper side: sends the outcome; returns the helper's exit code.
fn report(sock: BorrowedFd<'_>, result: Result<Tap, StepError>) -> i32 {
    match result {
        Ok(tap) => match sys::send_with_fd(sock, &[ANSWER_TAP], tap.as_fd()) {
            Ok(()) => 0,
            Err(_) => 1,
        },
        Err(err) => {
            let (message, errno) = flatten(&err);
            let mut msg = Vec::with_capacity(ANSWER_MAX);
            msg.push(ANSWER_ERROR);
            msg.extend_from_slice(&errno.unwrap_or(0).to_ne_bytes());
            let mut end = message.len().min(ANSWER_MAX - msg.len());
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            msg.extend_from_slice(&message.as_bytes()[..end]);
            // Nobody to tell if this fails: the parent then sees end of stream.
            let _ = nix::sys::socket::send(sock.as_raw_fd(), &msg, MsgFlags::MSG_NOSIGNAL);
            1
        }
    }
}

/// An error chain as one line of text plus the `errno` at its root, if any: the messages
/// joined with ": ", except a final OS error, which becomes the errno.
fn flatten(err: &(dyn std::error::Error + 'static)) -> (String, Option<i32>) {
    let mut message = String::new();
    let mut errno = None;
    let mut current = Some(err);
    while let Some(e) = current {
        current = e.source();
        if current.is_none() {
            let os = e
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error)
                .or_else(|| e.downcast_ref::<nix::Error>().map(|&n| n as i32));
            if os.is_some() {
                errno = os;
                break;
            }
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        let _ = write!(message, "{e}");
    }
    (message, errno)
}

/// Parent side: one message from the helper.
fn receive(sock: BorrowedFd<'_>) -> Answer {
    let mut buf = [0u8; ANSWER_MAX];
    match sys::recv_with_fd(sock, &mut buf) {
        Err(err) => Answer::Failed(err),
        Ok((0, _)) => Answer::Eof,
        Ok((n, Some(fd))) if n == 1 && buf[0] == ANSWER_TAP => Answer::Tap(fd),
        Ok((n, None)) if n >= 5 && buf[0] == ANSWER_ERROR => {
            let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
            Answer::Error {
                message: String::from_utf8_lossy(&buf[5..n]).into_owned(),
                errno: (errno != 0).then_some(errno),
            }
        }
        Ok(_) => Answer::Garbled,
    }
}

/// The error an answer other than a TAP stands for; `status` tells how the helper ended.
fn answer_error(answer: Answer, status: String) -> NetnsError {
    match answer {
        Answer::Error { message, errno } => NetnsError::Helper {
            message,
            source: errno.map(io::Error::from_raw_os_error),
        },
        Answer::Eof => NetnsError::NoAnswer { status },
        // A TAP is not an error; it only gets here if a caller mixed things up.
        Answer::Garbled | Answer::Tap(_) => NetnsError::Garbled,
        Answer::Failed(err) => NetnsError::Receive(err),
    }
}

/// Waits for `pid` and describes how it ended.
fn reap(pid: Pid) -> String {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return format!("exit status {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => return format!("killed by signal {sig}"),
            Ok(other) => return format!("{other:?}"),
            Err(nix::Error::EINTR) => continue,
            Err(err) => return format!("status unknown: {err}"),
        }
    }
}

/// The private copy of `resolv.conf` for `spawn_run`; removed on drop.
struct TempResolvConf {
    dir: PathBuf,
    file: PathBuf,
}

impl TempResolvConf {
    fn create(content: &str) -> Result<TempResolvConf, NetnsError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        let mut attempts = 0;
        let dir = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("usernet-{}-{n}", std::process::id()));
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(source) => return Err(NetnsError::TempDir { dir: base, source }),
            }
        };
        let tmp = TempResolvConf {
            file: dir.join("resolv.conf"),
            dir,
        };
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp.file)
            .and_then(|mut f| f.write_all(content.as_bytes()))
            .map_err(|source| NetnsError::WriteResolvConf {
                path: tmp.file.clone(),
                source,
            })?;
        Ok(tmp)
    }
}

impl Drop for TempResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use nix::sys::signal::kill;

    use super::*;

    /// A network namespace made with `ip netns add`, deleted on drop.
    struct NetnsGuard {
        name: String,
        deleted: bool,
    }

    impl NetnsGuard {
        fn new(suffix: &str) -> NetnsGuard {
            let name = format!("untest{}{suffix}", std::process::id());
            run("ip", &["netns", "add", &name]);
            NetnsGuard {
                name,
                deleted: false,
            }
        }

        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.name))
        }

        fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        }

        fn delete(&mut self) {
            run("ip", &["netns", "del", &self.name]);
            self.deleted = true;
        }
    }

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            if !self.deleted {
                let _ = Command::new("ip")
                    .args(["netns", "del", &self.name])
                    .status();
            }
        }
    }

    /// A process in its own user + network namespace, killed on drop.
    struct UnshareGuard(Child);

    impl UnshareGuard {
        /// `unshare --user --map-root-user --net ...` with `userns`, else `--net` only.
        fn new(userns: bool) -> UnshareGuard {
            let mut args = vec!["--net", "--kill-child", "sleep", "30"];
            if userns {
                args.splice(0..0, ["--user", "--map-root-user"]);
            }
            let child = Command::new("unshare")
                .args(&args)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn unshare");
            let guard = UnshareGuard(child);
            // Wait until it has left our network namespace.
            let ours = fs::read_link("/proc/self/ns/net").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::read_link(format!("/proc/{}/ns/net", guard.pid())).ok() == Some(ours.clone())
            {
                assert!(Instant::now() < deadline, "unshare did not unshare");
                std::thread::sleep(Duration::from_millis(10));
            }
            guard
        }

        fn pid(&self) -> i32 {
            i32::try_from(self.0.id()).unwrap()
        }

        fn kill(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    impl Drop for UnshareGuard {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd).args(args).output().expect("spawn");
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn slirp_link() -> LinkConfig {
        LinkConfig {
            name: "ignored".into(),
            mtu: 65520,
            addr: Ipv4Addr::new(10, 0, 2, 100),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            mac: Some([0x02, 0x50, 0x00, 0x00, 0x00, 0x01]),
            ipv6: None,
            routes: Vec::new(),
        }
    }

    fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap();
        poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0
    }

    /// The full error chain, as the binary would print it.
    fn chain(err: &NetnsError) -> String {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(e) = source {
            text = format!("{text}: {e}");
            source = e.source();
        }
        text
    }

    #[test]
    fn open_tap_path_configures_link() {
        let ns = NetnsGuard::new("a");
        let (tap, _helper) = open_tap(&AttachSpec {
            target: Target::Path(ns.path()),
            userns: None,
            tap_name: "tap0".into(),
            vnet_hdr: true,
            configure: Some(slirp_link()),
        })
        .unwrap();
        assert_eq!(tap.name(), "tap0");
        assert_eq!(tap.vnet_hdr_len(), 10);
        tap.set_offload(
            crate::sys::tap::TUN_F_CSUM | crate::sys::tap::TUN_F_TSO4 | crate::sys::tap::TUN_F_TSO6,
        )
        .unwrap();

        let addr = ns.ip(&["-o", "-4", "addr"]);
        assert!(addr.contains("tap0    inet 10.0.2.100/24"), "{addr}");
        let link = ns.ip(&["-o", "link", "show", "tap0"]);
        assert!(link.contains("mtu 65520"), "{link}");
        assert!(link.contains("link/ether 02:50:00:00:00:01"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let lo = ns.ip(&["-o", "link", "show", "lo"]);
        assert!(lo.contains(",UP"), "{lo}");
        let route = ns.ip(&["-4", "route"]);
        assert!(route.contains("default via 10.0.2.2 dev tap0"), "{route}");
        // The TAP lives in the namespace, not in ours.
        assert!(!run("ip", &["-o", "link"]).contains(": tap0:"));
    }

    #[test]
    fn open_tap_path_attaches_persistent_tap() {
        let ns = NetnsGuard::new("b");
        ns.ip(&["tuntap", "add", "tap0", "mode", "tap"]);
        let spec = AttachSpec {
            target: Target::Path(ns.path()),
            userns: None,
            tap_name: "tap0".into(),
            vnet_hdr: false,
            configure: None,
        };
        let (tap, _helper) = open_tap(&spec).unwrap();
        assert_eq!(tap.name(), "tap0");
        assert_eq!(tap.vnet_hdr_len(), 0);
        // Not configured: no address.
        assert!(!ns.ip(&["-o", "-4", "addr"]).contains("tap0"));
        // Busy while we hold it: the helper's error comes back as text + errno.
        let err = open_tap(&spec).unwrap_err();
        assert!(
            matches!(&err, NetnsError::Helper { message, source: Some(_) }
                if message == "cannot create or attach TAP device tap0"),
            "{err:?}"
        );
        drop(tap);
        assert!(ns.ip(&["-o", "link", "show", "tap0"]).contains("tap0"));
    }

    #[test]
    fn open_tap_missing_netns_reports_text() {
        let err = open_tap(&AttachSpec {
            target: Target::Path("/run/netns/untest-does-not-exist".into()),
            userns: None,
            tap_name: "tap0".into(),
            vnet_hdr: true,
            configure: None,
        })
        .unwrap_err();
        assert_eq!(
            chain(&err),
            "cannot join network namespace /run/netns/untest-does-not-exist: No such file or directory (os error 2)"
        );
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .unwrap();
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn open_tap_pid_joins_userns() {
        let mut target = UnshareGuard::new(true);
        let pid = target.pid();
        let (tap, _helper) = open_tap(&AttachSpec {
            target: Target::Pid(pid),
            userns: None,
            tap_name: "tap0".into(),
            vnet_hdr: true,
            configure: Some(slirp_link()),
        })
        .unwrap();
        assert_eq!(tap.name(), "tap0");
        // Offloads are set from outside the namespace, also unprivileged.
        tap.set_offload(
            crate::sys::tap::TUN_F_CSUM | crate::sys::tap::TUN_F_TSO4 | crate::sys::tap::TUN_F_TSO6,
        )
        .unwrap();
        // Joining the user namespace too also works unprivileged.
        let pid_s = pid.to_string();
        let nsenter = |cmd: &[&str]| {
            let mut args = vec!["-t", &pid_s, "-U", "--preserve-credentials", "-n"];
            args.extend_from_slice(cmd);
            run("nsenter", &args)
        };
        let addr = nsenter(&["ip", "-o", "-4", "addr"]);
        assert!(addr.contains("tap0    inet 10.0.2.100/24"), "{addr}");
        let route = nsenter(&["ip", "-4", "route"]);
        assert!(route.contains("default via 10.0.2.2 dev tap0"), "{route}");

        let mut watch = TargetWatch::new(&Target::Pid(pid)).unwrap();
        assert!(!watch.target_gone());
        target.kill();
        assert!(readable_within(watch.as_fd(), Duration::from_secs(5)));
        assert!(watch.target_gone());
        assert!(watch.target_gone());
    }

    #[test]
    fn open_tap_pid_in_our_userns_skips_join() {
        // As root: the target shares our user namespace, and setns into it would fail
        // with EINVAL. (Unprivileged, `unshare --net` fails: nothing to test.)
        if !geteuid().is_root() {
            return;
        }
        let target = UnshareGuard::new(false);
        let (tap, _helper) = open_tap(&AttachSpec {
            target: Target::Pid(target.pid()),
            userns: None,
            tap_name: "tap0".into(),
            vnet_hdr: true,
            configure: None,
        })
        .unwrap();
        assert_eq!(tap.name(), "tap0");
    }

    #[test]
    fn open_tap_explicit_userns_path() {
        let target = UnshareGuard::new(true);
        let pid = target.pid();
        let (tap, _helper) = open_tap(&AttachSpec {
            target: Target::Path(format!("/proc/{pid}/ns/net").into()),
            userns: Some(format!("/proc/{pid}/ns/user").into()),
            tap_name: "tap7".into(),
            vnet_hdr: false,
            configure: None,
        })
        .unwrap();
        assert_eq!(tap.name(), "tap7");
    }

    #[test]
    fn target_watch_netns_deleted() {
        let mut ns = NetnsGuard::new("c");
        let mut watch = TargetWatch::new(&Target::Path(ns.path())).unwrap();
        assert!(!watch.target_gone());
        // Unrelated activity in the directory (also by tests running in parallel) is not
        // a removal.
        let other = NetnsGuard::new("d");
        drop(other);
        assert!(!watch.target_gone());
        ns.delete();
        assert!(readable_within(watch.as_fd(), Duration::from_secs(5)));
        assert!(watch.target_gone());
    }

    #[test]
    fn target_watch_bad_targets() {
        assert!(matches!(
            TargetWatch::new(&Target::Path("/run/netns/untest-does-not-exist".into())),
            Err(NetnsError::AlreadyGone { .. })
        ));
        assert!(matches!(
            TargetWatch::new(&Target::Path("/".into())),
            Err(NetnsError::BadPath { .. })
        ));
        assert!(matches!(
            TargetWatch::new(&Target::Pid(i32::MAX)),
            Err(NetnsError::WatchProcess { .. })
        ));
    }

    #[test]
    fn proc_paths_watch_the_process() {
        assert_eq!(proc_pid(Path::new("/proc/123/ns/net")), Some(123));
        assert_eq!(proc_pid(Path::new("/proc/self/ns/net")), None);
        assert_eq!(proc_pid(Path::new("/run/netns/x")), None);
        assert_eq!(proc_pid(Path::new("/proc/123/ns/net/x")), None);
        assert_eq!(proc_pid(Path::new("/proc/123/root/run/x/netns")), Some(123));
        assert_eq!(proc_pid(Path::new("/proc/123/root")), None);
    }

    /// Serialises the `spawn_run` tests: one checks the temporary directories they make.
    static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
        SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run_spec(cmd: &[&str]) -> RunSpec {
        RunSpec {
            cmd: cmd.iter().map(OsString::from).collect(),
            tap_name: "tap0".into(),
            vnet_hdr: true,
            link: slirp_link(),
            resolv_conf: "nameserver 10.0.2.3\n".into(),
            hostname: None,
        }
    }

    fn exit_code(pid: Pid) -> i32 {
        match waitpid(pid, None).unwrap() {
            WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spawn_run_runs_command_in_namespaces() {
        let _lock = spawn_lock();
        let out = std::env::temp_dir().join(format!("untest-run-{}", std::process::id()));
        let out_s = out.to_str().unwrap();
        let before = usernet_temp_dirs();
        let mut child = spawn_run(&run_spec(&[
            "sh",
            "-c",
            "exec >\"$0\" 2>&1; id -u; ip -o -4 addr; ip -4 route; cat /etc/resolv.conf; exit 3",
            out_s,
        ]))
        .unwrap();
        assert_eq!(child.tap.name(), "tap0");
        assert_eq!(child.tap.vnet_hdr_len(), 10);
        // The copy is gone already; the mount keeps it alive.
        assert_eq!(usernet_temp_dirs(), before);
        child.hold.release().unwrap();
        child.hold.release().unwrap();
        assert_eq!(exit_code(child.pid), 3);
        let text = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_file(&out);
        assert!(text.starts_with("0\n"), "{text}");
        assert!(text.contains("tap0    inet 10.0.2.100/24"), "{text}");
        assert!(text.contains("default via 10.0.2.2 dev tap0"), "{text}");
        assert!(text.ends_with("nameserver 10.0.2.3\n"), "{text}");
        // The host's resolv.conf is untouched.
        assert_ne!(
            fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            "nameserver 10.0.2.3\n"
        );
    }

    #[test]
    fn spawn_run_exec_failure_exits_127() {
        let _lock = spawn_lock();
        let mut child = spawn_run(&run_spec(&["/nonexistent/usernet-test-cmd"])).unwrap();
        child.hold.release().unwrap();
        assert_eq!(exit_code(child.pid), 127);
    }

    #[test]
    fn spawn_run_dropped_child_exits_without_running() {
        let _lock = spawn_lock();
        let marker = std::env::temp_dir().join(format!("untest-drop-{}", std::process::id()));
        let child = spawn_run(&run_spec(&["touch", marker.to_str().unwrap()])).unwrap();
        let pid = child.pid;
        drop(child);
        assert_eq!(exit_code(pid), 1);
        assert!(!marker.exists());
    }

    #[test]
    fn spawn_run_setup_failure_reported() {
        let _lock = spawn_lock();
        let mut spec = run_spec(&["true"]);
        spec.tap_name = "0123456789abcdef".into();
        let err = spawn_run(&spec).unwrap_err();
        assert!(
            matches!(&err, NetnsError::Helper { message, source: None }
                if message.starts_with("invalid TAP device name")),
            "{err:?}"
        );
        assert!(matches!(
            spawn_run(&run_spec(&[])),
            Err(NetnsError::EmptyCommand)
        ));
    }

    #[test]
    fn spawn_run_kill_before_release() {
        let _lock = spawn_lock();
        let child = spawn_run(&run_spec(&["true"])).unwrap();
        kill(child.pid, Signal::SIGKILL).unwrap();
        let status = waitpid(child.pid, None).unwrap();
        assert!(matches!(
            status,
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
        let mut child = child;
        assert!(matches!(child.hold.release(), Err(NetnsError::Release(_))));
    }

    fn usernet_temp_dirs() -> Vec<PathBuf> {
        let prefix = format!("usernet-{}-", std::process::id());
        let mut dirs: Vec<PathBuf> = fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    }
}
