//! TAP device: create or attach one by name, or wrap an inherited file descriptor.
//!
//! We open `/dev/net/tun` ourselves with a handful of ioctls instead of using the `tun-tap`
//! crate: that crate has no `IFF_VNET_HDR` / `TUNSETOFFLOAD` support (our biggest
//! performance lever, see `docs/design.md`) and pulls in an old tokio.
//!
//! # Theory of operation
//!
//! - [`Tap::create`] opens `/dev/net/tun` (`O_RDWR | O_CLOEXEC | O_NONBLOCK`) and issues
//!   `TUNSETIFF` with `IFF_TAP | IFF_NO_PI` (plus `IFF_VNET_HDR`). The kernel creates the
//!   device in the calling *thread's* network namespace, or attaches to an existing
//!   persistent device of that name (RootlessKit pre-creates `tap0` with
//!   `ip tuntap add`); attaching also updates the device's flags to ours.
//! - [`Tap::from_fd`] wraps a descriptor someone else opened (`--netns-type=tapfd`) and asks
//!   the kernel (`TUNGETIFF`) for its name and flags instead of trusting the caller.
//! - Both leave the device in a known state: the vnet header size is set to
//!   `sizeof(struct virtio_net_hdr)` (10; it is per device and sticky, so a previous user
//!   could have changed it) and the offload mask (`TUNSETOFFLOAD`, also sticky per device)
//!   is cleared, also without a vnet header, where no offload is usable. Call
//!   [`Tap::set_offload`] to enable offloads.
//! - [`Tap::read`] and [`Tap::write`] move exactly one frame per call (prefixed by the
//!   vnet header when [`Tap::vnet_hdr_len`] is not 0). The descriptor is non-blocking:
//!   `read` returns [`std::io::ErrorKind::WouldBlock`] when the queue is empty.
//!
//! Limits: single queue only (no `IFF_MULTI_QUEUE`); the vnet header is native endian
//! (no `TUNSETVNETLE`/`TUNSETVNETBE`).
//!
//! Security: the name comes from the command line and is checked (length, no NUL) before
//! it is copied into a `struct ifreq`; everything else the kernel validates.

use std::ffi::c_int;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// `TUN_F_CSUM`: we accept frames with partial checksums (`NEEDS_CSUM`).
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// `TUN_F_TSO4`: we accept TCP/IPv4 super-frames (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// `TUN_F_TSO6`: we accept TCP/IPv6 super-frames (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;

/// Length of `struct virtio_net_hdr`, as [`stack::vnet`] parses it.
const VNET_HDR_LEN: usize = stack::vnet::HEADER_LEN;

/// The TUN/TAP clone device.
const TUN_PATH: &str = "/dev/net/tun";

/// Errors of [`Tap`] operations.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in `struct ifreq` or contains a NUL byte.
    #[error("invalid TAP device name {name:?}: at most 15 bytes, no NUL")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// `open("/dev/net/tun")` failed.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    /// `TUNSETIFF` failed (no permission, busy, or `name` is not a TAP device).
    #[error("cannot create or attach TAP device {name}")]
    Attach {
        /// The requested name.
        name: String,
        /// The error of `ioctl(TUNSETIFF)`.
        #[source]
        source: io::Error,
    },
    /// `TUNGETIFF` failed: the descriptor is not an attached TUN/TAP descriptor.
    #[error("cannot query the TUN/TAP device behind file descriptor {fd}")]
    Query {
        /// The descriptor.
        fd: RawFd,
        /// The error of `ioctl(TUNGETIFF)`.
        #[source]
        source: io::Error,
    },
    /// The descriptor belongs to a TUN (IP) device, not a TAP (Ethernet) device.
    #[error("{name} is a TUN device, not a TAP device")]
    NotTap {
        /// The device name.
        name: String,
    },
    /// The descriptor prepends `struct tun_pi` to every frame (`IFF_NO_PI` is unset).
    #[error("TAP device {name} prepends packet information to frames (IFF_NO_PI is unset)")]
    PacketInfo {
        /// The device name.
        name: String,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the vnet header size of TAP device {name}")]
    VnetHdrSize {
        /// The device name.
        name: String,
        /// The error of `ioctl(TUNSETVNETHDRSZ)`.
        #[source]
        source: io::Error,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot set offloads {flags:#x} on TAP device {name}")]
    Offload {
        /// The device name.
        name: String,
        /// The requested `TUN_F_*` mask.
        flags: u32,
        /// The error of `ioctl(TUNSETOFFLOAD)`.
        #[source]
        source: io::Error,
    },
    /// `fcntl` failed while making the descriptor non-blocking and close-on-exec.
    #[error("cannot make the TAP file descriptor non-blocking")]
    Fcntl(#[source] io::Error),
}

/// An open TAP device: one queue, one frame per `read`/`write`.
///
/// Dropping it closes the descriptor; a non-persistent device disappears with its last
/// descriptor.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    vnet_hdr_len: usize,
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("fd", &self.fd.as_raw_fd())
            .field("name", &self.name)
            .field("vnet_hdr_len", &self.vnet_hdr_len)
            .finish()
    }
}

impl Tap {
    /// Creates TAP device `name` in the calling thread's network namespace, or attaches to
    /// an existing persistent TAP device of that name.
    ///
    /// Flags are `IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` when `vnet_hdr` is true. The
    /// descriptor is `O_CLOEXEC` and `O_NONBLOCK`. The vnet header size is set to 10 (with
    /// `vnet_hdr`) and the sticky offload mask is cleared. A name containing `%d` lets the
    /// kernel pick a free number, and [`Tap::name`] tells the result.
    ///
    /// # Errors
    ///
    /// [`TapError::InvalidName`] if `name` is longer than 15 bytes or contains NUL;
    /// [`TapError::Open`] if `/dev/net/tun` cannot be opened; [`TapError::Attach`] if the
    /// kernel refuses `TUNSETIFF` (`EPERM` without `CAP_NET_ADMIN` in the namespace,
    /// `EBUSY` if another process holds the device, `EINVAL` if `name` is an existing
    /// non-TAP link); [`TapError::VnetHdrSize`] / [`TapError::Offload`] if resetting the
    /// device state fails.
    pub fn create(name: &str, vnet_hdr: bool) -> Result<Tap, TapError> {
        let mut ifr = ifreq_with_name(name).ok_or_else(|| TapError::InvalidName {
            name: name.to_owned(),
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK) // std adds O_CLOEXEC itself
            .open(TUN_PATH)
            .map_err(TapError::Open)?;
        let fd = OwnedFd::from(file);

        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        // The flags all fit in 16 bits (highest: IFF_VNET_HDR = 0x4000).
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is one, fully
        // initialised, and lives across the call.
        unsafe { ioctl_ptr(fd.as_fd(), libc::TUNSETIFF, &mut ifr) }.map_err(|source| {
            TapError::Attach {
                name: name.to_owned(),
                source,
            }
        })?;

        let tap = Tap {
            fd,
            name: name_of(&ifr),
            vnet_hdr_len: if vnet_hdr { VNET_HDR_LEN } else { 0 },
        };
        tap.reset_state()?;
        Ok(tap)
    }

    /// Wraps an already open TAP descriptor (slirp4netns `--netns-type=tapfd`).
    ///
    /// `TUNGETIFF` tells the device name and whether `IFF_VNET_HDR` is set. The descriptor
    /// is made `O_NONBLOCK` and close-on-exec, its vnet header size set to 10 (if it has
    /// one) and its offload mask cleared, as with [`Tap::create`]. On error the
    /// descriptor is closed.
    ///
    /// # Errors
    ///
    /// [`TapError::Query`] if the descriptor is not an attached TUN/TAP descriptor;
    /// [`TapError::NotTap`] for a TUN device; [`TapError::PacketInfo`] if it was opened
    /// without `IFF_NO_PI`; [`TapError::Fcntl`], [`TapError::VnetHdrSize`] or
    /// [`TapError::Offload`] if adjusting it fails.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        // SAFETY: an all-zero `struct ifreq` is valid: integers, byte arrays and a null
        // pointer in the union.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes a `struct ifreq`; `ifr` is one and lives across the
        // call.
        unsafe { ioctl_ptr(fd.as_fd(), libc::TUNGETIFF, &mut ifr) }.map_err(|source| {
            TapError::Query {
                fd: fd.as_raw_fd(),
                source,
            }
        })?;
        // SAFETY: TUNGETIFF filled `ifru_flags` (and the field is a plain integer, so any
        // bit pattern is valid anyway).
        let flags = c_int::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let name = name_of(&ifr);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTap { name });
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::PacketInfo { name });
        }

        let fl = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| TapError::Fcntl(e.into()))?;
        let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(fl)).map_err(|e| TapError::Fcntl(e.into()))?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| TapError::Fcntl(e.into()))?;

        let vnet_hdr = flags & libc::IFF_VNET_HDR != 0;
        let tap = Tap {
            fd,
            name,
            vnet_hdr_len: if vnet_hdr { VNET_HDR_LEN } else { 0 },
        };
        tap.reset_state()?;
        Ok(tap)
    }

    /// The device name, as the kernel reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of vnet header before each frame: 0 without `IFF_VNET_HDR`, else the size of
    /// `struct virtio_net_hdr` (10).
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    /// Sets the offload mask (`TUNSETOFFLOAD`): a combination of the `TUN_F_*` constants,
    /// or 0 for none. The kernel then sends (and we must accept) the frames it announces.
    ///
    /// # Errors
    ///
    /// [`TapError::Offload`] if the kernel rejects the mask (`EINVAL` for unknown bits or
    /// TSO without [`TUN_F_CSUM`]).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory
        // is passed.
        unsafe {
            ioctl_val(
                self.fd.as_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        }
        .map(drop)
        .map_err(|source| TapError::Offload {
            name: self.name.clone(),
            flags,
            source,
        })
    }

    /// Reads one frame (with its vnet header, if any) into `buf`.
    ///
    /// A frame longer than `buf` is truncated; size `buf` for the largest frame (MTU +
    /// Ethernet header + vnet header, or 64 KiB + headers with TSO).
    ///
    /// # Errors
    ///
    /// [`std::io::ErrorKind::WouldBlock`] when no frame is queued; other errors of
    /// `read(2)`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(&self.fd, buf).map_err(io::Error::from)
    }

    /// Writes one frame (with its vnet header, if any).
    ///
    /// # Errors
    ///
    /// Errors of `write(2)`, e.g. `EINVAL` for a malformed vnet header, `EIO` when the
    /// device is down.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        nix::unistd::write(&self.fd, buf).map_err(io::Error::from)
    }

    /// Puts the sticky per-device state in a known shape: vnet header size 10 (if any), no
    /// offloads.
    fn reset_state(&self) -> Result<(), TapError> {
        if self.vnet_hdr_len != 0 {
            // Invariant: VNET_HDR_LEN is 10.
            let mut size = self.vnet_hdr_len as c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int; `size` is one and lives across the
            // call.
            unsafe { ioctl_ptr(self.fd.as_fd(), libc::TUNSETVNETHDRSZ, &mut size) }.map_err(
                |source| TapError::VnetHdrSize {
                    name: self.name.clone(),
                    source,
                },
            )?;
        }
        self.set_offload(0)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Tap {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.fd
    }
}

/// A zeroed `struct ifreq` with `ifr_name` set, or `None` if `name` has 16 bytes or more
/// (no room for the NUL) or contains NUL.
pub(super) fn ifreq_with_name(name: &str) -> Option<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: an all-zero `struct ifreq` is valid: integers, byte arrays and a null
    // pointer in the union.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Some(ifr)
}

/// The NUL-terminated `ifr_name` as a string (lossy: Linux names are bytes, in practice
/// ASCII).
fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, req, arg)` with a pointer argument; negative returns become `io::Error`.
///
/// # Safety
///
/// `arg` must point to a live value of the type that `req` reads and/or writes.
pub(super) unsafe fn ioctl_ptr<T>(
    fd: BorrowedFd<'_>,
    req: libc::Ioctl,
    arg: *mut T,
) -> io::Result<c_int> {
    // SAFETY: `fd` is open for the borrow's lifetime; the caller vouches for `arg`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, req, arg)` with an integer argument passed by value.
///
/// # Safety
///
/// `req` must take its argument by value (not as a pointer).
unsafe fn ioctl_val(fd: BorrowedFd<'_>, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<c_int> {
    // SAFETY: `fd` is open for the borrow's lifetime; the caller vouches that `req` does
    // not dereference `arg`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sched::{unshare, CloneFlags};

    use super::*;
    use crate::sys::link::{configure, LinkConfig};

    /// Runs `f` on a fresh thread in a new, empty network namespace (an unshare of the
    /// network namespace only affects the calling thread, so the test process stays in
    /// the host's).
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
            f()
        })
        .join()
        .expect("test thread panicked")
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn vnet_hdr_len_is_ten() {
        assert_eq!(VNET_HDR_LEN, 10);
    }

    #[test]
    fn create_invalid_name_rejected() {
        assert!(matches!(
            Tap::create("sixteen-bytes-xx", false),
            Err(TapError::InvalidName { .. })
        ));
        assert!(matches!(
            Tap::create("a\0b", false),
            Err(TapError::InvalidName { .. })
        ));
    }

    #[test]
    fn create_vnet_hdr_sets_name_and_len() {
        in_new_netns(|| {
            let tap = Tap::create("tap0", true).unwrap();
            assert_eq!(tap.name(), "tap0");
            assert_eq!(tap.vnet_hdr_len(), 10);
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | libc::TUN_F_TSO_ECN)
                .unwrap();
            tap.set_offload(0).unwrap();
            assert!(matches!(
                tap.set_offload(TUN_F_TSO4 | 0x8000_0000),
                Err(TapError::Offload { .. })
            ));
            let fl = fcntl(&tap, FcntlArg::F_GETFL).unwrap();
            assert_ne!(fl & libc::O_NONBLOCK, 0);
            let fd = fcntl(&tap, FcntlArg::F_GETFD).unwrap();
            assert_ne!(fd & libc::FD_CLOEXEC, 0);
            assert!(ip(&["-o", "link", "show", "tap0"]).contains("tap0"));
        });
    }

    #[test]
    fn create_without_vnet_hdr_has_no_header() {
        in_new_netns(|| {
            let tap = Tap::create("plain0", false).unwrap();
            assert_eq!(tap.vnet_hdr_len(), 0);
        });
    }

    #[test]
    fn create_pattern_name_kernel_picks() {
        in_new_netns(|| {
            let tap = Tap::create("utap%d", false).unwrap();
            assert_eq!(tap.name(), "utap0");
        });
    }

    #[test]
    fn create_persistent_tap_attaches() {
        in_new_netns(|| {
            ip(&["tuntap", "add", "tap0", "mode", "tap"]);
            let tap = Tap::create("tap0", true).unwrap();
            assert_eq!(tap.name(), "tap0");
            // A second open of a single-queue device is refused while the first lives.
            assert!(matches!(
                Tap::create("tap0", true),
                Err(TapError::Attach { .. })
            ));
            drop(tap);
            // Persistent: still there, and attachable again, without vnet header too.
            // Retry on EBUSY: a child that another test thread is forking for `ip` may
            // hold a copy of our descriptor until its exec closes it.
            let deadline = Instant::now() + Duration::from_secs(5);
            let tap = loop {
                match Tap::create("tap0", false) {
                    Err(TapError::Attach { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY)
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => break other.unwrap(),
                }
            };
            assert_eq!(tap.vnet_hdr_len(), 0);
            // The kernel agrees: attaching replaced the device's flags with ours.
            let dup = Tap::from_fd(tap.as_fd().try_clone_to_owned().unwrap()).unwrap();
            assert_eq!(dup.vnet_hdr_len(), 0);
        });
    }

    #[test]
    fn create_non_tap_link_rejected() {
        in_new_netns(|| {
            let err = Tap::create("lo", false).unwrap_err();
            assert!(matches!(err, TapError::Attach { .. }), "{err:?}");
            assert_eq!(err.to_string(), "cannot create or attach TAP device lo");
        });
    }

    #[test]
    fn from_fd_reports_name_and_vnet_hdr() {
        in_new_netns(|| {
            let tap = Tap::create("tap0", true).unwrap();
            let dup = tap.as_fd().try_clone_to_owned().unwrap();
            // Clear O_NONBLOCK on the shared open file description: from_fd sets it back.
            fcntl(&dup, FcntlArg::F_SETFL(OFlag::O_RDWR)).unwrap();
            let other = Tap::from_fd(dup).unwrap();
            assert_eq!(other.name(), "tap0");
            assert_eq!(other.vnet_hdr_len(), 10);
            let fl = fcntl(&other, FcntlArg::F_GETFL).unwrap();
            assert_ne!(fl & libc::O_NONBLOCK, 0);

            let plain = Tap::create("tap1", false).unwrap();
            let other = Tap::from_fd(OwnedFd::from(plain)).unwrap();
            assert_eq!(other.name(), "tap1");
            assert_eq!(other.vnet_hdr_len(), 0);
        });
    }

    #[test]
    fn from_fd_not_tun_rejected() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let err = Tap::from_fd(null.into()).unwrap_err();
        assert!(matches!(err, TapError::Query { .. }), "{err:?}");
    }

    #[test]
    fn from_fd_tun_device_rejected() {
        in_new_netns(|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(TUN_PATH)
                .unwrap();
            let mut ifr = ifreq_with_name("tun0").unwrap();
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF takes a `struct ifreq`.
            unsafe { ioctl_ptr(file.as_fd(), libc::TUNSETIFF, &mut ifr) }.unwrap();
            let err = Tap::from_fd(file.into()).unwrap_err();
            assert!(matches!(err, TapError::NotTap { ref name } if name == "tun0"));
        });
    }

    #[test]
    fn read_write_frames() {
        in_new_netns(|| {
            let tap = Tap::create("tap0", true).unwrap();
            configure(&LinkConfig {
                name: "tap0".into(),
                mtu: 1500,
                addr: "10.0.2.100".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.2.2".parse().unwrap(),
                mac: None,
                ipv6: None,
                routes: Vec::new(),
            })
            .unwrap();
            let mut buf = [0u8; 2048];
            assert_eq!(
                tap.read(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );

            // A datagram to the gateway makes the kernel ask for its MAC address.
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.send_to(b"x", "10.0.2.2:9").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let frame = loop {
                let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(200u16)).unwrap();
                match tap.read(&mut buf) {
                    Ok(n) => {
                        let f = &buf[10..n];
                        // Skip IPv6 router solicitations and the like.
                        if f[12..14] == [0x08, 0x06] {
                            break f.to_vec();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                assert!(Instant::now() < deadline, "no ARP request on the TAP");
            };
            assert_eq!(&frame[0..6], &[0xff; 6]);
            // ARP target protocol address.
            assert_eq!(&frame[38..42], &[10, 0, 2, 2]);

            // One frame per write, behind a zero vnet header (no offload).
            let mut out = [0u8; 10 + 60];
            out[10..16].copy_from_slice(&[0xff; 6]);
            out[16..22].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            out[22..24].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
            assert_eq!(tap.write(&out).unwrap(), out.len());
        });
    }
}
