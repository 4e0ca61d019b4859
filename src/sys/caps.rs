//! Capability sets of the calling thread: reading them, and dropping all but a few.
//!
//! # Theory of operation
//!
//! Linux gives each thread five capability sets (capabilities(7)): the bounding set caps
//! what `execve` can ever grant, the permitted set is what the thread may make effective,
//! the effective set is what the kernel checks, the inheritable and ambient sets pass
//! capabilities across `execve`. Emptying a set is one-way: nothing can add a capability
//! back into the bounding or permitted set later (short of `execve` of a file with file
//! capabilities, which `no_new_privs` then rules out).
//!
//! The order matters: dropping from the bounding set needs `CAP_SETPCAP` in the effective
//! set, so [`restrict_bounding`] and [`clear_ambient`] come before [`set`], which
//! removes `CAP_SETPCAP` itself.
//!
//! Capabilities are numbered 0 to 63 in two 32-bit words (`_LINUX_CAPABILITY_VERSION_3`);
//! the kernel's highest is found by probing the bounding set (`PR_CAPBSET_READ` fails with
//! `EINVAL` past it), so no file such as `/proc/sys/kernel/cap_last_cap` is needed.

use std::io;

/// `CAP_NET_BIND_SERVICE`: binding ports below 1024 (`ip_unprivileged_port_start`).
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_SYS_ADMIN`: needed for `unshare(CLONE_NEWNS)`, `mount`, `pivot_root`.
pub const CAP_SYS_ADMIN: u32 = 21;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit words.
const VERSION_3: u32 = 0x2008_0522;

/// An unused `prctl` argument: the kernel reads `unsigned long`s and checks some for zero,
/// so pass full-width zeros through the variadic call, not `int`s.
const ZERO: libc::c_ulong = 0;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The effective, permitted and inheritable sets, one bit per capability number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sets {
    /// What the kernel checks.
    pub effective: u64,
    /// What may be made effective.
    pub permitted: u64,
    /// What may pass across `execve`.
    pub inheritable: u64,
}

/// The bit of capability `cap` in a set.
pub const fn bit(cap: u32) -> u64 {
    1 << cap
}

fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

fn split(set: u64) -> (u32, u32) {
    // Both values fit: the low and the high 32-bit word.
    ((set & 0xffff_ffff) as u32, (set >> 32) as u32)
}

/// The calling thread's effective, permitted and inheritable sets (`capget(2)`).
///
/// # Errors
///
/// Errors of `capget(2)` (none expected for the calling thread).
pub fn get() -> io::Result<Sets> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: `header` is a valid version-3 header and `data` has room for the two words a
    // version-3 header asks the kernel to write; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Sets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Sets the calling thread's effective, permitted and inheritable sets (`capset(2)`).
/// Only removals always succeed: a capability can be added to the effective set only from
/// the permitted set, and to the permitted set never.
///
/// # Errors
///
/// `EPERM` when `sets` adds to the permitted set or asks for an effective capability that
/// is not permitted.
pub fn set(sets: Sets) -> io::Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        Data {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        Data {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: `header` is a valid version-3 header and `data` holds the two words it
    // announces; the kernel only reads `data` (and may write `header.version`, which is
    // ours and writable). Both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the bounding set holds `cap`; `None` past the kernel's last capability.
fn bounding_has(cap: u32) -> io::Result<Option<bool>> {
    // SAFETY: PR_CAPBSET_READ takes integers only and touches no memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAPBSET_READ,
            libc::c_ulong::from(cap),
            ZERO,
            ZERO,
            ZERO,
        )
    };
    match rc {
        0 => Ok(Some(false)),
        1 => Ok(Some(true)),
        _ => {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

/// Removes from the bounding set every capability not in `keep` (a [`bit`] mask).
///
/// # Errors
///
/// `EPERM` without `CAP_SETPCAP` in the effective set (only if there is something to drop).
pub fn restrict_bounding(keep: u64) -> io::Result<()> {
    for cap in 0..64 {
        if keep & bit(cap) != 0 {
            continue;
        }
        match bounding_has(cap)? {
            None => break,
            Some(false) => {}
            Some(true) => {
                // SAFETY: PR_CAPBSET_DROP takes integers only and touches no memory of ours.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_CAPBSET_DROP,
                        libc::c_ulong::from(cap),
                        ZERO,
                        ZERO,
                        ZERO,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// The bounding set as a [`bit`] mask.
#[cfg(test)]
///
/// # Errors
///
/// Errors of `prctl(PR_CAPBSET_READ)` other than the `EINVAL` that ends the probe.
pub fn bounding() -> io::Result<u64> {
    let mut set = 0;
    for cap in 0..64 {
        match bounding_has(cap)? {
            None => break,
            Some(true) => set |= bit(cap),
            Some(false) => {}
        }
    }
    Ok(set)
}

/// Empties the ambient set. Kernels before 4.3 have none (`EINVAL`): nothing to do there.
///
/// # Errors
///
/// Errors of `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)` other than `EINVAL`.
pub fn clear_ambient() -> io::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers only and touches no memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            ZERO,
            ZERO,
            ZERO,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_join_roundtrip() {
        for v in [0, 1, bit(10), bit(40) | bit(3), u64::MAX] {
            let (lo, hi) = split(v);
            assert_eq!(join(lo, hi), v);
        }
    }

    #[test]
    fn get_reads_own_sets_consistently() {
        let sets = get().expect("capget on ourselves");
        assert_eq!(
            sets.effective & !sets.permitted,
            0,
            "effective is a subset of permitted"
        );
        bounding().expect("bounding set");
        assert_eq!(
            bounding_has(64).expect("probe"),
            None,
            "64 is past every kernel's last"
        );
    }
}
