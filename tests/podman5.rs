//! The real client of pasta mode: podman 5 runs usernet as its `pasta`.
//!
//! Debian 12's podman 4.3.1 is built without pasta support, so this test uses podman 5 from
//! Debian 13 in a root file system of its own (`tests/podman5/make-root.sh`, which `.ci/run`
//! calls; `USERNET_PODMAN5_ROOT` names it, default `/var/lib/usernet-podman5`). The scenario is
//! `tests/podman5/pasta.sh`: rootless podman inside a test "host" namespace with an uplink veth
//! to a "world" namespace, usernet found through `CONTAINERS_HELPER_BINARY_DIR`, files fetched
//! from the host's own address (`host.containers.internal`) and from the world and served
//! through `-p`, compared by SHA-256, the client's real address seen by the container's
//! server, and no usernet process left once the containers are gone.

mod util;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use util::*;

#[test]
fn podman5_runs_usernet_as_its_pasta() {
    if !require_root_netns() || !require_tool("curl") || !require_tool("busybox") {
        return;
    }
    let root = std::env::var_os("USERNET_PODMAN5_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/usernet-podman5"));
    if !require(
        root.join(".usernet-ready").exists(),
        &format!(
            "no podman 5 root file system at {} (build it with `tests/podman5/make-root.sh {}`; .ci/run does)",
            root.display(),
            root.display()
        ),
    ) {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/podman5/pasta.sh");
    let prefix = format!("un{}p", std::process::id());
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&root).arg(usernet_bin()).arg(&prefix);
    // A hang guard far above the script's run time (it waits for each step itself).
    let f = run_with_timeout(cmd, Duration::from_secs(300));
    if f.status.is_none() {
        // Killed: its exit trap did not run. Its namespaces go, after what runs in them.
        for ns in [format!("{prefix}H"), format!("{prefix}W")] {
            let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
            let pids = pids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            for pid in pids.unwrap_or_default().split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
    println!("{}", f.stdout);
    assert!(
        f.success() && f.stdout.contains("podman5 pasta: ok"),
        "podman 5 with usernet as pasta failed:\n{f}"
    );
}
