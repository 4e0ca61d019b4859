//! Self-isolation once start-up is done: `--enable-sandbox` and `--enable-seccomp`.
//!
//! # Theory of operation
//!
//! usernet sits between an untrusted container and the host, so a bug in its packet
//! handling is a way out of the container. Once start-up is over, the running loop needs
//! very little: the descriptors it already holds (the TAP, epoll, the signalfd, published
//! ports' and the API's listening sockets, the API socket's directory, the `-e` pipe, the
//! target watch), new IPv4/IPv6 sockets for flows, memory, and a few files such as
//! `/etc/resolv.conf`. [`apply`] takes everything else away, in named stages that run in
//! this order, once, in the single thread, after every start-up step (TAP received, API
//! socket bound, `-p` ports published) and before the ready fd is written:
//!
//! 1. **prepare** (both flags): everything that still needs the host's file system or
//!    could fail for ordinary reasons, before anything irreversible: each `keep` path is
//!    resolved through its symbolic links, component by component, and every link met on
//!    the way is recorded so that the new root can replay it (`/etc/resolv.conf ->
//!    ../run/systemd/resolve/stub-resolv.conf` stays readable by its usual name); the
//!    seccomp program is compiled.
//! 2. **user namespace** (sandbox, only without `CAP_SYS_ADMIN`): `unshare(CLONE_NEWUSER)`,
//!    our effective uid and gid mapped 1:1 (`setgroups` denied first, as the kernel
//!    requires of an unprivileged writer). This gives us the capabilities the next two
//!    stages need, over our own namespaces only. Consequences: the kept
//!    `CAP_NET_BIND_SERVICE` then belongs to the new user namespace, which does not own
//!    the network namespace, so ports below `net.ipv4.ip_unprivileged_port_start` added
//!    later through the API are refused (those published with `-p` are bound already);
//!    other users' and groups' ids show as the overflow id (nothing reads them after this);
//!    signals to run mode's command still work (the kernel compares the same global uid);
//!    where unprivileged user namespaces are disabled or `user.max_user_namespaces` is
//!    reached, this stage fails and usernet does not start, rather than run unsandboxed.
//! 3. **mount namespace** (sandbox): `unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)`,
//!    then every mount made a slave (`MS_REC | MS_SLAVE`), so that nothing done next
//!    propagates to the host, while the host's unmounts still reach the kept trees (a
//!    network namespace file unmounted under `/run` goes from our copy too, and the
//!    namespace is not kept alive by us). The IPC and UTS namespaces cost nothing and cut
//!    System V IPC and the host name off.
//! 4. **new root** (sandbox): a small tmpfs (`nosuid,nodev,noexec`) is mounted on
//!    [`NEW_ROOT`] and receives the kept trees (`/etc` and `/run`, as slirp4netns keeps
//!    them) bound recursively, every mount of them read-only; then, at their original
//!    paths, those recorded symbolic links and kept files that the trees do not already
//!    show (a file outside them, or one mounted over): an empty file on which the real one
//!    is bind-mounted read-only (from a descriptor opened in this mount namespace, so that
//!    the tmpfs may hide the source). A file the trees show stays live: replaced by
//!    rename on the host, the new one is what the sandbox reads;
//!    then `pivot_root(".", ".")` into it, the old root is detached (`MNT_DETACH`: our copy
//!    of every host mount goes, including any `/run/netns` entries, which would otherwise
//!    keep namespaces alive), and the tmpfs itself is remounted read-only. Open
//!    descriptors keep working: the API socket is unlinked at exit through its directory's
//!    descriptor, not by path.
//! 5. **capabilities** (sandbox): every capability but `CAP_NET_BIND_SERVICE` leaves the
//!    bounding set (needs `CAP_SETPCAP`, so first), the ambient set is emptied, then
//!    effective and permitted become `{CAP_NET_BIND_SERVICE}` (if we had it) and
//!    inheritable becomes empty.
//! 6. **privileges** (both flags): `no_new_privs` (no `execve` can grant anything again;
//!    seccomp requires it without `CAP_SYS_ADMIN`) and not dumpable (no core file with
//!    guest traffic in it, no `ptrace` by our own uid; `/proc/PID` becomes root's).
//! 7. **seccomp** (`--enable-seccomp`): the allow list of [`crate::sys::seccomp`]; any
//!    other syscall kills the process. Last, because every stage above makes syscalls that
//!    the list does not allow.
//!
//! # Limits
//!
//! No PID namespace: usernet forks nothing after start-up, and the filter forbids `fork`
//! and `clone`. The network namespace stays the host's: that is where flows' sockets must
//! be made. `/proc`, `/dev` and `/sys` are gone: nothing in the loop needs them. Resource
//! limits are a matter for the forwarder's own bounds, not for this module.
//!
//! [`test_probe`] lets the tests prove that the filter kills: with
//! `USERNET_TEST_FORBIDDEN_SYSCALL=1` it makes a syscall outside the list.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::unistd::{chdir, getegid, geteuid, pivot_root};

use crate::sys::caps::{self, CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN};
use crate::sys::seccomp;

/// Where the new root's tmpfs is mounted before `pivot_root`: a directory every system
/// has. Mounting there hides the host's `/tmp` only inside our own mount namespace.
pub const NEW_ROOT: &str = "/tmp";

/// Size options of the new root's tmpfs: it holds only empty files, directories and
/// symbolic links, and is read-only once built.
const NEW_ROOT_OPTIONS: &str = "size=64k,nr_inodes=1024,mode=0755";

/// Symbolic links followed per `keep` path before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// The environment variable that makes [`test_probe`] call a forbidden syscall.
pub const PROBE_ENV: &str = "USERNET_TEST_FORBIDDEN_SYSCALL";

/// What to isolate.
#[derive(Clone, Debug, Default)]
pub struct Isolation {
    /// `--enable-sandbox`: stages 2 to 6 (new root, capabilities, `no_new_privs`).
    pub sandbox: bool,
    /// `--enable-seccomp`: stages 6 and 7 (`no_new_privs`, the allow list).
    pub seccomp: bool,
    /// Files usernet still reads after isolation (e.g. `/etc/resolv.conf`), kept readable
    /// at their paths; symbolic links on the way are replayed. A path that does not exist
    /// is left out.
    pub keep: Vec<PathBuf>,
    /// Directories kept whole, read-only, with the mounts below them (`/etc` and `/run`,
    /// as slirp4netns keeps them): tools look at `/proc/PID/root/etc`, and resolv.conf and
    /// the files its symbolic links lead to stay current there. A directory that does not
    /// exist is left out.
    pub keep_trees: Vec<PathBuf>,
}

/// A failed isolation stage. usernet must not go on: some stages cannot be undone and the
/// process is in between.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// Stage 1: a `keep` path could not be resolved (other than not existing).
    #[error("cannot resolve {} to keep it in the sandbox", path.display())]
    Keep {
        /// The path as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 1: no seccomp program for this build.
    #[error("cannot build the seccomp filter")]
    Filter(#[source] seccomp::FilterError),
    /// Stage 2.
    #[error("cannot enter a user namespace of our own ({step})")]
    UserNamespace {
        /// The failing step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 3.
    #[error("cannot enter a mount namespace of our own ({step})")]
    MountNamespace {
        /// The failing step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 4.
    #[error("cannot build the sandbox's root: {step} {}", path.display())]
    NewRoot {
        /// The failing step.
        step: &'static str,
        /// The path it was working on.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 5.
    #[error("cannot drop capabilities ({step})")]
    Capabilities {
        /// The failing step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 6.
    #[error("cannot drop privileges ({step})")]
    Privileges {
        /// The failing step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stage 7.
    #[error("cannot load the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
}

/// Applies the stages of the module documentation in order; nothing when both flags are
/// off. Call once, single-threaded (`unshare(CLONE_NEWUSER)` requires it; seccomp filters
/// only the calling thread), after every start-up step (TAP received, API socket bound,
/// `-p` ports published, ready fd not yet written) and right before the event loop.
///
/// # Errors
///
/// [`IsolationError`] names the failing stage. After an error from stage 2 on, the
/// process is partly isolated: exit.
pub fn apply(cfg: &Isolation) -> Result<(), IsolationError> {
    if !cfg.sandbox && !cfg.seccomp {
        return Ok(());
    }
    // 1. prepare
    let plan = if cfg.sandbox {
        plan_root(&cfg.keep)?
    } else {
        Vec::new()
    };
    let filter = if cfg.seccomp {
        Some(seccomp::filter().map_err(IsolationError::Filter)?)
    } else {
        None
    };
    if cfg.sandbox {
        // 2. user namespace
        if enter_user_namespace()? {
            log::debug!("isolation: own user namespace (no CAP_SYS_ADMIN here)");
        }
        // 3. mount namespace
        enter_mount_namespace()?;
        // 4. new root
        build_root(&cfg.keep_trees, &plan)?;
        log::debug!("isolation: new root holds {plan:?}");
        // 5. capabilities
        drop_capabilities()?;
    }
    // 6. privileges
    drop_privileges()?;
    // 7. seccomp
    if let Some(filter) = filter {
        seccompiler::apply_filter(&filter).map_err(IsolationError::Seccomp)?;
    }
    log::debug!(
        "isolation: done (sandbox {}, seccomp {})",
        cfg.sandbox,
        cfg.seccomp
    );
    Ok(())
}

/// Test hook: with `USERNET_TEST_FORBIDDEN_SYSCALL=1` in the environment, makes a syscall
/// that the seccomp allow list forbids (`umount2("")`, harmless otherwise: `ENOENT`).
/// Under the filter the process dies by `SIGSYS`; without it, it logs and goes on. Call
/// right after [`apply`].
pub fn test_probe() {
    if std::env::var_os(PROBE_ENV).is_none_or(|v| v != "1") {
        return;
    }
    log::warn!("{PROBE_ENV}=1: calling umount2(2), which the seccomp filter forbids");
    let result = umount2("", MntFlags::empty());
    log::warn!("umount2 returned {result:?}: no seccomp filter is in force");
}

// ---------------------------------------------------------------------------------------------
// Stage 1: the plan of the new root
// ---------------------------------------------------------------------------------------------

/// One thing the new root holds, at its path on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    /// A symbolic link met while resolving a `keep` path, recreated as is.
    Symlink { at: PathBuf, target: PathBuf },
    /// The file (or directory) a `keep` path resolves to, bind-mounted read-only.
    Bind { at: PathBuf, dir: bool },
}

/// Resolves every `keep` path into [`Node`]s, without duplicates; paths that do not exist
/// are left out.
fn plan_root(keep: &[PathBuf]) -> Result<Vec<Node>, IsolationError> {
    let mut plan = Vec::new();
    for path in keep {
        let mut nodes = Vec::new();
        match resolve(path, &mut nodes) {
            Ok(()) => {
                for node in nodes {
                    if !plan.contains(&node) {
                        plan.push(node);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::info!(
                    "isolation: {} does not exist, the sandbox will not have it",
                    path.display()
                );
            }
            Err(source) => {
                return Err(IsolationError::Keep {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    Ok(plan)
}

/// Resolves absolute `path` as the kernel would, one component at a time, recording each
/// symbolic link met (in any component) and finally the file it names. The directory
/// resolved so far never contains a link, so `..` is simply its parent.
fn resolve(path: &Path, out: &mut Vec<Node>) -> io::Result<()> {
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path",
        ));
    }
    let mut todo: VecDeque<OsString> = names(path).collect();
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        let meta = fs::symlink_metadata(&next)?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = fs::read_link(&next)?;
            out.push(Node::Symlink {
                at: next,
                target: target.clone(),
            });
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            for n in names(&target).collect::<Vec<_>>().into_iter().rev() {
                todo.push_front(n);
            }
        } else if todo.is_empty() {
            out.push(Node::Bind {
                at: next,
                dir: meta.is_dir(),
            });
            return Ok(());
        } else if meta.is_dir() {
            cur = next;
        } else {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
    }
    // Only `/` itself (or a path that climbs back to it) gets here.
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "the root directory cannot be kept",
    ))
}

/// The names in `path`, with `..` kept and `/` and `.` dropped.
fn names(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Stages 2 and 3: namespaces
// ---------------------------------------------------------------------------------------------

/// Stage 2: enters a user namespace of our own if we lack `CAP_SYS_ADMIN`; true if it did.
fn enter_user_namespace() -> Result<bool, IsolationError> {
    let fail = |step| move |source| IsolationError::UserNamespace { step, source };
    let sets = caps::get().map_err(fail("reading our capabilities"))?;
    if sets.effective & caps::bit(CAP_SYS_ADMIN) != 0 {
        return Ok(false);
    }
    let (uid, gid) = (geteuid(), getegid());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| fail("unshare")(e.into()))?;
    write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1\n"))
        .map_err(fail("writing uid_map"))?;
    // Absent before Linux 3.19, where gid_map needs no such step.
    match write_proc("/proc/self/setgroups", "deny\n") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail("denying setgroups")(e)),
        _ => {}
    }
    write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1\n"))
        .map_err(fail("writing gid_map"))?;
    Ok(true)
}

/// Writes `text` in one `write(2)` to an existing `/proc` file (no `O_CREAT`/`O_TRUNC`).
fn write_proc(path: &str, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}

/// Stage 3: mount, IPC and UTS namespaces of our own; every mount a slave, so that
/// nothing done here reaches the host while the host's unmounts (of a network namespace
/// file under `/run`, say) still reach the kept trees.
fn enter_mount_namespace() -> Result<(), IsolationError> {
    let fail = |step| {
        move |e: nix::Error| IsolationError::MountNamespace {
            step,
            source: e.into(),
        }
    };
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(fail("unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(fail("making every mount a slave"))
}

// ---------------------------------------------------------------------------------------------
// Stage 4: the new root
// ---------------------------------------------------------------------------------------------

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Whether `inside` (a path in the new root, before `pivot_root`) is the very file open as
/// `fd`: a kept tree already shows it, live.
fn same_file(inside: &Path, fd: &OwnedFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(there) = fs::symlink_metadata(inside) else {
        return false;
    };
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        st.st_dev == there.dev() as libc::dev_t && st.st_ino == there.ino() as libc::ino_t
    })
}

/// Stage 4: builds the read-only root from `trees` and `plan` and pivots into it.
fn build_root(trees: &[PathBuf], plan: &[Node]) -> Result<(), IsolationError> {
    let root = Path::new(NEW_ROOT);
    let fail = |step: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| IsolationError::NewRoot { step, path, source }
    };
    let nix_fail = |step: &'static str, path: &Path| {
        let f = fail(step, path);
        move |e: nix::Error| f(e.into())
    };
    // The files to bind, opened now: in this mount namespace (a bind from a mount of
    // another namespace is refused) and before the tmpfs may hide them.
    let mut tree_sources: Vec<(&Path, OwnedFd)> = Vec::new();
    for tree in trees {
        match open(
            tree.as_path(),
            OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY,
            Mode::empty(),
        ) {
            Ok(fd) => tree_sources.push((tree, fd)),
            Err(nix::Error::ENOENT) => {
                log::info!(
                    "isolation: no {}, the sandbox will not have it",
                    tree.display()
                );
            }
            Err(e) => return Err(nix_fail("opening", tree)(e)),
        }
    }
    let mut sources: Vec<(&Path, bool, OwnedFd)> = Vec::new();
    for node in plan {
        if let Node::Bind { at, dir } = node {
            let fd = open(
                at.as_path(),
                OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .map_err(nix_fail("opening", at))?;
            sources.push((at, *dir, fd));
        }
    }
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(NEW_ROOT_OPTIONS),
    )
    .map_err(nix_fail("mounting a tmpfs on", root))?;
    let mut dirs = fs::DirBuilder::new();
    dirs.recursive(true).mode(0o755);
    // The trees first: what the plan adds goes on top of them, where they lack it.
    for (tree, fd) in &tree_sources {
        let inside = under(root, tree);
        dirs.create(&inside).map_err(fail("creating", tree))?;
        bind_read_only(fd, true, &inside).map_err(fail("binding read-only", tree))?;
    }
    for node in plan {
        if let Node::Symlink { at, target } = node {
            let inside = under(root, at);
            if fs::symlink_metadata(&inside).is_ok() {
                // A kept tree holds this link already.
                continue;
            }
            if let Some(parent) = inside.parent() {
                dirs.create(parent).map_err(fail("creating", parent))?;
            }
            std::os::unix::fs::symlink(target, &inside).map_err(fail("linking", at))?;
        }
    }
    for (at, dir, fd) in &sources {
        let inside = under(root, at);
        if same_file(&inside, fd) {
            // A kept tree shows it live (a file replaced by rename stays current there).
            continue;
        }
        if let Some(parent) = inside.parent() {
            dirs.create(parent).map_err(fail("creating", parent))?;
        }
        if inside.exists() {
            // Another file of a kept tree is there (a mount over it elsewhere): cover it.
        } else if *dir {
            dirs.create(&inside).map_err(fail("creating", at))?;
        } else {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&inside)
                .map_err(fail("creating", at))?;
        }
        bind_read_only(fd, *dir, &inside).map_err(fail("binding read-only", at))?;
    }
    chdir(root).map_err(nix_fail("entering", root))?;
    pivot_root(".", ".").map_err(nix_fail("pivoting into", root))?;
    // The old root is stacked on "." now: detach it with every mount under it.
    umount2(".", MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
        .map_err(nix_fail("detaching the old root from", root))?;
    chdir("/").map_err(nix_fail("entering", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(nix_fail("remounting read-only", Path::new("/")))
}

/// Bind-mounts the file (or directory) open as `src` on `target`, then makes that mount
/// read-only, `nosuid`, `nodev`, `noexec`. The source mount's access-time flags are kept:
/// in a user namespace they may be locked, and a remount that changes them fails.
fn bind_read_only(src: &OwnedFd, dir: bool, target: &Path) -> io::Result<()> {
    let source = format!("/proc/self/fd/{}", src.as_raw_fd());
    let mut flags = MsFlags::MS_BIND;
    if dir {
        flags |= MsFlags::MS_REC;
    }
    mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        flags,
        None::<&str>,
    )?;
    remount_read_only(target, fstatvfs(src)?.flags())?;
    if dir {
        // The mounts below came along (MS_REC) with their own flags: read-only too. One
        // that cannot even be looked at (another user's FUSE mount under /run/user) is
        // left as it is: usernet cannot write there either.
        for below in mounts_below(target)? {
            let done = nix::sys::statvfs::statvfs(below.as_path())
                .map_err(io::Error::from)
                .and_then(|st| remount_read_only(&below, st.flags()));
            if let Err(e) = done {
                log::debug!("isolation: {} stays as it is: {e}", below.display());
            }
        }
    }
    Ok(())
}

/// Makes the bind mount at `target` read-only, `nosuid`, `nodev`, `noexec`, keeping the
/// access-time flags `st` (those of its source; in a user namespace they may be locked,
/// and a remount that changes them fails).
fn remount_read_only(target: &Path, st: FsFlags) -> io::Result<()> {
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if st.contains(FsFlags::ST_NOATIME) {
        flags |= MsFlags::MS_NOATIME;
    } else if !st.contains(FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_STRICTATIME;
    }
    if st.contains(FsFlags::ST_NODIRATIME) {
        flags |= MsFlags::MS_NODIRATIME;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// The mount points strictly below `dir`, from `/proc/self/mountinfo` (its fifth field,
/// with the kernel's octal escapes undone).
fn mounts_below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(field.len());
        let raw = field.as_bytes();
        let mut i = 0;
        while i < raw.len() {
            let octal = raw
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok());
            match (raw[i], octal) {
                (b'\\', Some(b)) => {
                    bytes.push(b);
                    i += 4;
                }
                (b, _) => {
                    bytes.push(b);
                    i += 1;
                }
            }
        }
        let path = PathBuf::from(OsString::from_vec(bytes));
        if path != dir && path.starts_with(dir) {
            out.push(path);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Stages 5 and 6: capabilities and privileges
// ---------------------------------------------------------------------------------------------

/// Stage 5: every capability set reduced to (at most) `CAP_NET_BIND_SERVICE`.
fn drop_capabilities() -> Result<(), IsolationError> {
    let fail = |step| move |source| IsolationError::Capabilities { step, source };
    let keep = caps::bit(CAP_NET_BIND_SERVICE);
    caps::restrict_bounding(keep).map_err(fail("bounding set"))?;
    caps::clear_ambient().map_err(fail("ambient set"))?;
    let now = caps::get().map_err(fail("reading them"))?;
    let kept = now.permitted & keep;
    caps::set(caps::Sets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    })
    .map_err(fail("effective, permitted and inheritable sets"))
}

/// Stage 6: `no_new_privs`, and not dumpable.
fn drop_privileges() -> Result<(), IsolationError> {
    let fail = |step| {
        move |e: nix::Error| IsolationError::Privileges {
            step,
            source: e.into(),
        }
    };
    nix::sys::prctl::set_no_new_privs().map_err(fail("no_new_privs"))?;
    nix::sys::prctl::set_dumpable(false).map_err(fail("dumpable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory with no symbolic link in its own path.
    fn scratch(name: &str) -> PathBuf {
        let base = fs::canonicalize(std::env::temp_dir()).expect("temp dir");
        let dir = base.join(format!("usernet-isolation-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn resolve_plain_file_is_one_bind() {
        let d = scratch("plain");
        fs::write(d.join("f"), "x").unwrap();
        let mut out = Vec::new();
        resolve(&d.join("f"), &mut out).unwrap();
        assert_eq!(
            out,
            vec![Node::Bind {
                at: d.join("f"),
                dir: false
            }]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolve_relative_link_chain_records_each_link() {
        // etc/resolv.conf -> ../run/a/resolv.conf -> /…/run/b/real (absolute)
        let d = scratch("chain");
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::create_dir_all(d.join("run/a")).unwrap();
        fs::create_dir_all(d.join("run/b")).unwrap();
        fs::write(d.join("run/b/real"), "nameserver 10.0.2.3\n").unwrap();
        std::os::unix::fs::symlink(d.join("run/b/real"), d.join("run/a/resolv.conf")).unwrap();
        std::os::unix::fs::symlink("../run/a/resolv.conf", d.join("etc/resolv.conf")).unwrap();
        let mut out = Vec::new();
        resolve(&d.join("etc/resolv.conf"), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Node::Symlink {
                    at: d.join("etc/resolv.conf"),
                    target: PathBuf::from("../run/a/resolv.conf"),
                },
                Node::Symlink {
                    at: d.join("run/a/resolv.conf"),
                    target: d.join("run/b/real"),
                },
                Node::Bind {
                    at: d.join("run/b/real"),
                    dir: false
                },
            ]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolve_link_in_a_directory_component() {
        // var/run -> ../run (a directory link in the middle of the path)
        let d = scratch("dirlink");
        fs::create_dir_all(d.join("var")).unwrap();
        fs::create_dir_all(d.join("run")).unwrap();
        fs::write(d.join("run/f"), "x").unwrap();
        std::os::unix::fs::symlink("../run", d.join("var/run")).unwrap();
        let mut out = Vec::new();
        resolve(&d.join("var/run/f"), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Node::Symlink {
                    at: d.join("var/run"),
                    target: PathBuf::from("../run"),
                },
                Node::Bind {
                    at: d.join("run/f"),
                    dir: false
                },
            ]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolve_loop_fails_with_eloop() {
        let d = scratch("loop");
        std::os::unix::fs::symlink("b", d.join("a")).unwrap();
        std::os::unix::fs::symlink("a", d.join("b")).unwrap();
        let err = resolve(&d.join("a"), &mut Vec::new()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolve_refuses_relative_and_root() {
        assert!(resolve(Path::new("etc/resolv.conf"), &mut Vec::new()).is_err());
        assert!(resolve(Path::new("/"), &mut Vec::new()).is_err());
    }

    #[test]
    fn plan_root_skips_missing_and_dedups() {
        let d = scratch("plan");
        fs::write(d.join("f"), "x").unwrap();
        let plan = plan_root(&[d.join("f"), d.join("missing"), d.join("f")]).unwrap();
        assert_eq!(
            plan,
            vec![Node::Bind {
                at: d.join("f"),
                dir: false
            }]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn plan_root_file_in_the_middle_is_an_error() {
        let d = scratch("notdir");
        fs::write(d.join("f"), "x").unwrap();
        let err = plan_root(&[d.join("f/g")]).unwrap_err();
        assert!(matches!(err, IsolationError::Keep { .. }), "{err:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn under_strips_the_root() {
        assert_eq!(
            under(Path::new("/tmp"), Path::new("/etc/resolv.conf")),
            PathBuf::from("/tmp/etc/resolv.conf")
        );
    }

    #[test]
    fn apply_with_nothing_asked_does_nothing() {
        apply(&Isolation::default()).expect("no-op");
    }
}
