//! Where run mode's API sockets live, and how `usernet ports`, `stats` and `ps` find them.
//!
//! # Theory of operation
//!
//! Every `usernet run` serves the control API without being asked: its socket is
//! `DIR/NAME.sock`, where NAME is `--name` (default: usernet's PID) and DIR is
//! [`runtime_dir`]: `$XDG_RUNTIME_DIR/usernet` if that variable is set, else
//! `/run/usernet` for root, else `/tmp/usernet-UID`. DIR is created mode 0700 and must
//! belong to us and be closed to others (a shared `/tmp` could otherwise hand us someone
//! else's directory). `-a PATH` still chooses the socket path instead.
//!
//! A socket file is *live* if connecting to it works, *stale* if the connection is
//! refused (its usernet died without removing it, e.g. by `SIGKILL`): stale files are
//! removed whenever DIR is listed ([`live_runs`]) and when a new run takes their name. A
//! run whose name is live already is refused before anything starts.
//!
//! The clients pick a socket ([`find_socket`]): `-a PATH`; else `--name NAME`; else the
//! only live run in DIR (none or several is an error that names what there is).

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::unistd::geteuid;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    /// DIR cannot be created or read.
    #[error("cannot use {dir}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// DIR belongs to someone else or is open to others.
    #[error("{dir} must be a directory of uid {uid} with mode 0700 (it is uid {owner}, mode {mode:04o}); remove it or set XDG_RUNTIME_DIR")]
    Unsafe {
        /// The directory.
        dir: PathBuf,
        /// Our uid.
        uid: u32,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A live run already has this name.
    #[error(
        "a usernet named {name} is running already (API socket {path}): choose another --name"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// Its socket.
        path: PathBuf,
    },
    /// `--name` names no live run.
    #[error(
        "no usernet named {name} is running (no API socket {path}); `usernet ps` lists what runs"
    )]
    NoSuchRun {
        /// The name.
        name: String,
        /// The socket looked for.
        path: PathBuf,
    },
    /// No live run, no `-a`, no `--name`.
    #[error("no usernet run is running (none has an API socket in {dir}); give -a PATH for another usernet")]
    NoRuns {
        /// The directory looked in.
        dir: PathBuf,
    },
    /// Several live runs, no `-a`, no `--name`.
    #[error("several usernet runs are running ({names}): pick one with --name NAME")]
    SeveralRuns {
        /// Their names, comma-separated.
        names: String,
    },
}

/// One live run: its name and API socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// `--name`.
    pub name: String,
    /// `DIR/NAME.sock`.
    pub socket: PathBuf,
}

/// The directory of run mode's API sockets (see the module documentation); not created.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("usernet"),
        _ if geteuid().is_root() => PathBuf::from("/run/usernet"),
        _ => std::env::temp_dir().join(format!("usernet-{}", geteuid())),
    }
}

/// Creates [`runtime_dir`] (mode 0700) if needed and checks that it is ours and closed to
/// others.
///
/// # Errors
/// [`RunsError::Dir`] if it cannot be created or read, [`RunsError::Unsafe`] if it is
/// someone else's or open to others.
pub fn prepare_dir() -> Result<PathBuf, RunsError> {
    let dir = runtime_dir();
    let fail = |source| RunsError::Dir {
        dir: dir.clone(),
        source,
    };
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e)),
    }
    let meta = fs::symlink_metadata(&dir).map_err(fail)?;
    let uid = geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != uid || mode & 0o077 != 0 {
        return Err(RunsError::Unsafe {
            dir,
            uid,
            owner: meta.uid(),
            mode,
        });
    }
    Ok(dir)
}

/// The socket of run `name` in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// `--name`: 1-64 of `A-Z a-z 0-9 _ . -`, not starting with `.` or `-`.
///
/// # Errors
/// A message saying what a name may contain.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !s.starts_with(['.', '-']);
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "bad name {s:?}: 1-64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        ))
    }
}

/// Whether a usernet answers on `path`; a stale socket file (connection refused) is
/// removed.
fn is_live(path: &Path) -> bool {
    match UnixStream::connect(path) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing {}: its usernet is gone", path.display());
            let _ = fs::remove_file(path);
            false
        }
        Err(_) => false,
    }
}

/// Before run `name` starts in `dir`: refuses a name that a live run has; a stale socket
/// of that name is removed.
///
/// # Errors
/// [`RunsError::NameTaken`].
pub fn claim(dir: &Path, name: &str) -> Result<PathBuf, RunsError> {
    let path = socket_path(dir, name);
    if is_live(&path) {
        return Err(RunsError::NameTaken {
            name: name.to_owned(),
            path,
        });
    }
    Ok(path)
}

/// The live runs in [`runtime_dir`], sorted by name; stale sockets are removed on the way.
/// A missing directory means no runs.
///
/// # Errors
/// [`RunsError::Dir`] if the directory exists but cannot be read.
pub fn live_runs() -> Result<(PathBuf, Vec<Run>), RunsError> {
    let dir = runtime_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((dir, Vec::new())),
        Err(source) => return Err(RunsError::Dir { dir, source }),
    };
    let mut runs: Vec<Run> = entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name();
            let name = file.to_str()?.strip_suffix(".sock")?.to_owned();
            let socket = entry.path();
            is_live(&socket).then_some(Run { name, socket })
        })
        .collect();
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((dir, runs))
}

/// The API socket a client subcommand talks to: `api` (`-a`), else run `name`'s, else the
/// only live run's.
///
/// # Errors
/// [`RunsError::NoSuchRun`], [`RunsError::NoRuns`], [`RunsError::SeveralRuns`].
pub fn find_socket(api: Option<&Path>, name: Option<&str>) -> Result<PathBuf, RunsError> {
    if let Some(path) = api {
        return Ok(path.to_owned());
    }
    if let Some(name) = name {
        let path = socket_path(&runtime_dir(), name);
        if !is_live(&path) {
            return Err(RunsError::NoSuchRun {
                name: name.to_owned(),
                path,
            });
        }
        return Ok(path);
    }
    let (dir, mut runs) = live_runs()?;
    match runs.len() {
        0 => Err(RunsError::NoRuns { dir }),
        1 => Ok(runs.remove(0).socket),
        _ => Err(RunsError::SeveralRuns {
            names: runs
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["1234", "web", "my-app_2.test"] {
            assert_eq!(parse_name(good).as_deref(), Ok(good));
        }
        let long = "x".repeat(65);
        for bad in ["", ".hidden", "-x", "a/b", "a b", "..", long.as_str()] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stale_sockets_are_removed_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("usernet-runs-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let live = std::os::unix::net::UnixListener::bind(dir.join("live.sock")).unwrap();
        // A dead run's socket: bound, never listening. (A listener dropped here could live
        // on in a child another test forks meanwhile, and then accept connections.)
        let dead =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        dead.bind(&socket2::SockAddr::unix(dir.join("dead.sock")).unwrap())
            .unwrap();
        drop(dead);
        assert!(dir.join("dead.sock").exists());
        assert!(is_live(&dir.join("live.sock")));
        assert!(!is_live(&dir.join("dead.sock")));
        assert!(!dir.join("dead.sock").exists());
        assert!(matches!(
            claim(&dir, "live"),
            Err(RunsError::NameTaken { .. })
        ));
        assert_eq!(claim(&dir, "other").unwrap(), dir.join("other.sock"));
        drop(live);
        let _ = fs::remove_dir_all(&dir);
    }
}
