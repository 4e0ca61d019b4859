//! Following the host's resolver configuration while usernet runs.
//!
//! # Theory of operation
//!
//! The DNS forwarder relays to the nameservers of `/etc/resolv.conf`. On a laptop that
//! changes networks or starts a VPN, NetworkManager or systemd-resolved rewrite that file
//! (or the file its symbolic links lead to under `/run`); read once, every container's
//! DNS would break until restarted. [`ResolvWatch`] holds one inotify instance with:
//!
//! - a watch on the file itself (through its links), for rewrites in place
//!   (`IN_MODIFY`, `IN_CLOSE_WRITE`) and for its replacement (`IN_DELETE_SELF`,
//!   `IN_MOVE_SELF`, `IN_ATTRIB`);
//! - a watch on the directory of every link of the chain and of the file (`/etc`,
//!   `/run/systemd/resolve`, ...), for a file or link replaced by rename or re-created
//!   (`IN_CREATE`, `IN_MOVED_TO`, `IN_DELETE`, `IN_CLOSE_WRITE`).
//!
//! The reload comes [`SETTLE`] (100 ms) after the last event, and at most [`MAX_SETTLE`]
//! (1 s) after the first, so that a rewrite in several writes is read once, whole: a
//! writer that truncates the file and then writes it (a shell's `>`, Rust's `fs::write`)
//! may pause between the two. The reload re-adds the file watch (a replaced file is a new
//! inode) and, if the list of nameservers changed, hands it to the forwarder, which
//! closes its DNS flows so that the next queries go to the new servers. A file that cannot
//! be read, or that names no nameserver (empty mid-rewrite, or a network manager that is
//! offline), keeps the current list: the forwarder is never left with no server to ask.
//!
//! With `--enable-sandbox` the paths still resolve: the sandbox keeps `/etc` and `/run`
//! read-only, live ([`crate::isolation`]), and the seccomp allow list has
//! `inotify_add_watch` and read-only `openat`. Limit: the directory watches are set up at
//! start; a link changed later to point into another directory is followed (the file
//! watch is re-added by path at each reload), but a replacement by rename inside that new
//! directory is noticed only with the next event elsewhere.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// How long after the last event the file is read.
pub const SETTLE: Duration = Duration::from_millis(100);
/// The longest a stream of events postpones the reload, from its first event.
pub const MAX_SETTLE: Duration = Duration::from_secs(1);

/// Links followed in the chain (the kernel's limit).
const MAX_LINKS: usize = 40;

fn file_events() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

fn dir_events() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ONLYDIR
}

/// The watch on resolv.conf; register [`AsRawFd::as_raw_fd`] for readability.
#[derive(Debug)]
pub struct ResolvWatch {
    inotify: Inotify,
    path: PathBuf,
    /// The first event not yet followed by a reload, and when that reload is due.
    pending: Option<(Instant, Instant)>,
    current: Vec<SocketAddr>,
}

impl ResolvWatch {
    /// Starts watching `path` (normally `/etc/resolv.conf`), whose nameservers are
    /// `current` now. Directories or a file that cannot be watched are left out (logged).
    ///
    /// # Errors
    /// When no inotify instance can be created.
    pub fn new(path: &Path, current: Vec<SocketAddr>) -> io::Result<ResolvWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut link = path.to_path_buf();
        for _ in 0..MAX_LINKS {
            let dir = link.parent().unwrap_or(Path::new("/")).to_path_buf();
            if let Err(e) = inotify.add_watch(&dir, dir_events()) {
                log::debug!("resolv.conf: cannot watch {}: {e}", dir.display());
            }
            match std::fs::read_link(&link) {
                Ok(target) => link = dir.join(target),
                Err(_) => break,
            }
        }
        if let Err(e) = inotify.add_watch(path, file_events()) {
            log::debug!("resolv.conf: cannot watch {}: {e}", path.display());
        }
        Ok(ResolvWatch {
            inotify,
            path: path.to_path_buf(),
            pending: None,
            current,
        })
    }

    /// After a readiness event: drains the events and schedules a reload.
    pub fn handle_ready(&mut self, now: Instant) {
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
        }
        let first = self.pending.map_or(now, |(first, _)| first);
        self.pending = Some((first, (now + SETTLE).min(first + MAX_SETTLE)));
    }

    /// When [`ResolvWatch::poll`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.map(|(_, at)| at)
    }

    /// Once the reload is due: the new nameservers, if they changed.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<SocketAddr>> {
        if self.pending.is_none_or(|(_, at)| now < at) {
            return None;
        }
        self.pending = None;
        // A file replaced by rename is a new inode: watch it (the same one: no-op).
        let _ = self.inotify.add_watch(&self.path, file_events());
        let list = match forwarder::dns::read_resolv_conf(&self.path) {
            Ok(list) => list,
            Err(e) => {
                log::warn!(
                    "cannot read {} ({e}): keeping the nameservers {:?}",
                    self.path.display(),
                    self.current
                );
                return None;
            }
        };
        if list.is_empty() {
            log::warn!(
                "{} names no nameserver: keeping the nameservers {:?}",
                self.path.display(),
                self.current
            );
            return None;
        }
        if list == self.current {
            return None;
        }
        log::info!(
            "{} changed: nameservers {:?} (were {:?})",
            self.path.display(),
            list,
            self.current
        );
        self.current.clone_from(&list);
        Some(list)
    }
}

impl AsFd for ResolvWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

impl AsRawFd for ResolvWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("usernet-resolv-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch dir");
        dir.join("resolv.conf")
    }

    fn ns(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().expect("address"), 53)
    }

    #[test]
    fn reload_waits_for_the_last_event_within_a_bound() {
        let path = scratch("settle");
        fs::write(&path, "nameserver 192.0.2.1\n").expect("write");
        let mut w = ResolvWatch::new(&path, vec![ns("192.0.2.1")]).expect("inotify");
        let t0 = Instant::now();
        // A truncate, then the new contents 80 ms later: the reload waits for the second.
        w.handle_ready(t0);
        fs::write(&path, "nameserver 192.0.2.2\n").expect("write");
        w.handle_ready(t0 + Duration::from_millis(80));
        assert_eq!(
            w.poll(t0 + SETTLE),
            None,
            "read before the last event settled"
        );
        assert_eq!(
            w.poll_timeout(),
            Some(t0 + Duration::from_millis(80) + SETTLE)
        );
        assert_eq!(
            w.poll(t0 + Duration::from_millis(180)),
            Some(vec![ns("192.0.2.2")])
        );
        assert_eq!(w.poll_timeout(), None);
        // Events every 50 ms postpone the reload by at most MAX_SETTLE from the first.
        let t1 = t0 + Duration::from_secs(10);
        for i in 0..40 {
            w.handle_ready(t1 + Duration::from_millis(50 * i));
        }
        assert_eq!(w.poll_timeout(), Some(t1 + MAX_SETTLE));
        let _ = fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn a_file_without_nameservers_keeps_the_current_ones() {
        let path = scratch("empty");
        fs::write(&path, "nameserver 192.0.2.1\n").expect("write");
        let mut w = ResolvWatch::new(&path, vec![ns("192.0.2.1")]).expect("inotify");
        let t0 = Instant::now();
        fs::write(&path, "# offline\n").expect("write");
        w.handle_ready(t0);
        assert_eq!(w.poll(t0 + SETTLE), None);
        fs::write(&path, "nameserver 192.0.2.1\n").expect("write");
        w.handle_ready(t0 + Duration::from_secs(1));
        assert_eq!(
            w.poll(t0 + Duration::from_secs(2)),
            None,
            "the list never changed"
        );
        fs::write(&path, "nameserver 192.0.2.3\n").expect("write");
        w.handle_ready(t0 + Duration::from_secs(3));
        assert_eq!(
            w.poll(t0 + Duration::from_secs(4)),
            Some(vec![ns("192.0.2.3")])
        );
        let _ = fs::remove_dir_all(path.parent().expect("dir"));
    }
}
