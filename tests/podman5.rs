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
    let out = Command::new("bash")
        .arg(&script)
        .arg(&root)
        .arg(usernet_bin())
        .arg(&prefix)
        .output()
        .expect("run tests/podman5/pasta.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("podman5 pasta: ok"),
        "podman 5 with usernet as pasta failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
