//! Errors that say what to do: `/dev/net/tun` at mode 0600 names the fix.
//!
//! This test changes the mode of `/dev/net/tun` for a moment, so it lives alone in its test
//! binary (cargo runs test binaries one after another); the mode is put back however the
//! test ends.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use util::*;

const TUN: &str = "/dev/net/tun";

/// Puts the device's mode back when dropped.
struct RestoreMode(u32);

impl Drop for RestoreMode {
    fn drop(&mut self) {
        let _ = fs::set_permissions(TUN, fs::Permissions::from_mode(self.0));
    }
}

#[test]
fn tun_at_mode_0600_names_the_fix() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("setpriv") {
        return;
    }
    let mode = fs::metadata(TUN)
        .expect("stat /dev/net/tun")
        .permissions()
        .mode()
        & 0o777;
    let _restore = RestoreMode(mode);
    fs::set_permissions(TUN, fs::Permissions::from_mode(0o600)).expect("chmod /dev/net/tun");
    let f = UsernetCmd::new(&t)
        .wrap([
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .target(["run", "--", "true"])
        .output(Duration::from_secs(20));
    assert!(f.status.is_some() && !f.success(), "usernet ran:\n{f}");
    assert!(
        f.stderr.contains("/dev/net/tun is mode 0600")
            && f.stderr.contains("chmod 0666 /dev/net/tun"),
        "the error does not name the fix:\n{f}"
    );
}
