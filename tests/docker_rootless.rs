//! Rootless Docker runs usernet as RootlessKit's network driver, as slirp4netns and as pasta.
//!
//! Rootless Docker is dockerd started by `dockerd-rootless.sh` under RootlessKit, whose
//! network driver is slirp4netns (the default) or pasta (`DOCKERD_ROOTLESS_ROOTLESSKIT_NET`).
//! Debian 12's RootlessKit 1.1 has no pasta driver, so this test uses Debian 13's docker.io
//! 26.1 and rootlesskit 2.0.2 in a root file system of its own (`tests/docker/make-root.sh`,
//! which `.ci/run` calls; `USERNET_DOCKER_ROOT` names it, default `/var/lib/usernet-docker`).
//! The scenario is `tests/docker/rootless.sh`, once per driver: usernet is on `PATH` as
//! `slirp4netns` and as `pasta`, behind wrappers that log the argv RootlessKit passes.
//!
//! The argv RootlessKit 2.0.2 passes (logged by the wrappers in a real run):
//!
//! ```text
//! slirp4netns --help            (twice: feature probes)
//! slirp4netns --mtu 1500 -r 3 --disable-host-loopback
//!     --api-socket /run/user/1600/dockerd-rootless/.s4nn.sock --enable-sandbox
//!     --enable-seccomp CHILD_PID tap0
//! slirp4netns --version         (twice, after start)
//! (with the default port driver `builtin`: the same without `--api-socket ...`)
//!
//! pasta --foreground --stderr --ns-ifname=tap0 --mtu=1500 --no-dhcp --no-ra
//!     --address=10.0.2.100 --netmask=24 --gateway=10.0.2.2 --dns-forward=10.0.2.3
//!     --no-map-gw --ipv4-only --tcp-ports=auto --udp-ports=auto CHILD_PID
//! ```
//!
//! (`DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=slirp4netns` with slirp4netns: published ports
//! through usernet's API socket; `builtin`, dockerd-rootless.sh's default: RootlessKit's own;
//! `implicit` with pasta: pasta's `-t/-u auto`.)
//!
//! Checked per driver: a container's outbound TCP (a file, SHA-256 compared) and UDP (a
//! payload echoed) to a "world" namespace, DNS through RootlessKit's 10.0.2.3 to the test
//! server named by the host's resolv.conf, `-p` TCP and UDP ports reached from the host's
//! loopback and from the world (IPv4 only: dockerd-rootless.sh enables IPv6 in neither
//! driver), two containers on a user-defined network reaching each other by name, and no
//! usernet process left once RootlessKit has been stopped.

mod util;

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use util::*;

#[test]
fn rootless_docker_runs_usernet_as_slirp4netns_and_as_pasta() {
    if !require_root_netns()
        || !require_tool("curl")
        || !require_tool("busybox")
        || !require_tool("gcc")
        || !require_tool("python3")
    {
        return;
    }
    let root = std::env::var_os("USERNET_DOCKER_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/usernet-docker"));
    if !require(
        root.join(".usernet-ready").exists() && root.join("usr/bin/docker").exists(),
        &format!(
            "no rootless Docker root file system at {} (build it with `tests/docker/make-root.sh {}`; .ci/run does)",
            root.display(),
            root.display()
        ),
    ) {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/docker/rootless.sh");
    // One after the other: the runs install usernet into the same root file system.
    // slirp4netns with its port driver (published ports through usernet's API) and with
    // dockerd-rootless.sh's default `builtin` (RootlessKit forwards them itself); pasta with
    // `implicit` (usernet's -t/-u auto).
    let runs = [
        ("slirp4netns", "slirp4netns"),
        ("slirp4netns", "builtin"),
        ("pasta", "implicit"),
    ];
    for (i, (mode, port_driver)) in runs.into_iter().enumerate() {
        let prefix = format!("un{}d{i}", std::process::id());
        // The script's output goes to files, not pipes: a process left behind with a pipe
        // open cannot keep the test waiting, and a failure's output stays where it says.
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("docker-rootless-{prefix}-{mode}-{port_driver}"));
        fs::create_dir_all(&logs).expect("create the log directory");
        let file = |name: &str| {
            File::create(logs.join(name))
                .unwrap_or_else(|e| panic!("create {}: {e}", logs.join(name).display()))
        };
        // A hang (a container that never ends, a stuck dockerd) fails the test with its
        // logs instead of holding CI: a run takes 20-40 s, `timeout` ends it at 15 min
        // (SIGTERM: the script's EXIT trap cleans up; SIGKILL 30 s later).
        let status = Command::new("timeout")
            .args(["--kill-after=30", "900", "bash"])
            .arg(&script)
            .arg(&root)
            .arg(usernet_bin())
            .arg(&prefix)
            .arg(mode)
            .arg(port_driver)
            .env("USERNET_DOCKER_LOGS", &logs)
            .stdin(Stdio::null())
            .stdout(file("stdout.txt"))
            .stderr(file("stderr.txt"))
            .status()
            .expect("run tests/docker/rootless.sh");
        let read = |name: &str| {
            fs::read_to_string(logs.join(name)).unwrap_or_else(|e| format!("({name}: {e})"))
        };
        let stdout = read("stdout.txt");
        println!("{stdout}");
        if status.success()
            && stdout.contains(&format!("docker rootless {mode} ({port_driver}): ok"))
        {
            let _ = fs::remove_dir_all(&logs);
            continue;
        }
        let (dir, stderr) = (logs.display(), read("stderr.txt"));
        let (dockerd, dns) = (read("dockerd.log"), read("dns.log"));
        let timed_out = if status.code() == Some(124) {
            " (timed out after 15 min)"
        } else {
            ""
        };
        panic!(
            "rootless Docker with usernet as {mode} (port driver {port_driver}) failed ({status}){timed_out}; \
             the script's output and the logs are kept in {dir}\n\
             --- the script's stdout\n{stdout}\n--- its stderr\n{stderr}\n\
             --- dockerd-rootless.sh's output (dockerd.log)\n{dockerd}\n\
             --- the test DNS server's log (dns.log)\n{dns}\n--- (all kept in {dir})"
        );
    }
}
