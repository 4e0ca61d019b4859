//! The slirp4netns-compatible command line: `--help`, `--version`, usage errors and exit
//! codes, `--mtu` and `--cidr` validation, and the flags that later issues implement.
//!
//! Even these runs happen inside a throw-away host namespace (`ip netns exec H`), so that a
//! parser bug that starts the data plane cannot touch the machine's network.

mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

/// Runs `usernet ARGS` in H to completion (10 s deadline).
fn usernet(t: &Topology, args: &[&str]) -> Finished {
    UsernetCmd::new(t)
        .target(args)
        .output(Duration::from_secs(10))
}

/// Asserts a start-up failure: exits (does not run on), non-zero, with a message on stderr.
#[track_caller]
fn assert_rejected(f: &Finished) {
    assert!(
        f.status.is_some(),
        "usernet accepted the command line and kept running:\n{f}"
    );
    assert!(!f.success(), "usernet exited 0 on a bad command line:\n{f}");
    assert!(
        !f.stderr.trim().is_empty(),
        "no error message on stderr:\n{f}"
    );
}

#[test]
fn cli_help_on_stdout_exit_0_names_every_flag_callers_grep() {
    let Some(t) = Topology::new() else { return };
    for flag in ["--help", "-h", "help"] {
        let f = usernet(&t, &[flag]);
        assert!(f.success(), "{f}");
        for needle in [
            "--netns-type",
            "--mtu",
            "--cidr",
            "--disable-host-loopback",
            "--api-socket",
            "--enable-ipv6",
            "--enable-sandbox",
            "--enable-seccomp",
            "--outbound-addr",
            "--configure",
            "--exit-fd",
            "--ready-fd",
            "--userns-path",
            "--disable-dns",
            "--macaddress",
        ] {
            assert!(
                f.stdout.contains(needle),
                "`usernet {flag}` does not mention {needle}:\n{f}"
            );
        }
    }
}

/// The value of `KEY: VALUE` in version output, as slirp4netns's test scripts read it
/// (`grep "SLIRP_CONFIG_VERSION_MAX: " | sed ...`).
fn version_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
}

#[test]
fn cli_version_has_slirp4netns_five_lines_with_usernet_values() {
    let Some(t) = Topology::new() else { return };
    for flag in ["--version", "-v"] {
        let f = usernet(&t, &[flag]);
        assert!(f.success(), "{f}");
        let lines: Vec<&str> = f.stdout.lines().collect();
        assert_eq!(lines.len(), 5, "want slirp4netns's five lines:\n{f}");
        // podman-style parsers take the word after "slirp4netns version".
        let first = lines[0]
            .strip_prefix("slirp4netns version ")
            .unwrap_or_else(|| {
                panic!(
                    "first line of `usernet {flag}` is {:?}, want `slirp4netns version X`",
                    lines[0]
                )
            });
        let word = first.split_whitespace().next().unwrap_or("");
        let core = word.split('+').next().unwrap_or("");
        assert!(
            core.split('.').count() == 3 && core.split('.').all(|n| n.parse::<u32>().is_ok()),
            "{word:?} is not a semantic version:\n{f}"
        );
        assert!(
            first.contains("usernet"),
            "the first line must say this is usernet:\n{f}"
        );
        for key in ["commit", "libslirp", "libseccomp"] {
            let v = version_value(&f.stdout, key).unwrap_or("");
            assert!(!v.trim().is_empty(), "no {key} value:\n{f}");
        }
        // Scripts enable --outbound-addr at >= 2 and --disable-dns at >= 3; an empty or
        // non-numeric value makes them treat both as missing.
        let max: u32 = version_value(&f.stdout, "SLIRP_CONFIG_VERSION_MAX")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("SLIRP_CONFIG_VERSION_MAX is not a number:\n{f}"));
        assert!(
            max >= 3,
            "SLIRP_CONFIG_VERSION_MAX {max} hides --disable-dns:\n{f}"
        );
    }
    // The same keys, in the same order, as the real slirp4netns prints.
    if let Some(real) = which("slirp4netns") {
        let mut cmd = Command::new(real);
        cmd.arg("-v");
        let r = run_with_timeout(cmd, Duration::from_secs(10));
        let keys = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| {
                    l.split([':'])
                        .next()
                        .unwrap_or("")
                        .split(" version")
                        .next()
                        .unwrap_or("")
                        .to_owned()
                })
                .collect()
        };
        let ours = usernet(&t, &["-v"]);
        assert_eq!(
            keys(&ours.stdout),
            keys(&r.stdout),
            "ours:\n{ours}\nslirp4netns:\n{r}"
        );
    }
}

#[test]
fn cli_subcommand_version_is_usernet_version() {
    let Some(t) = Topology::new() else { return };
    for args in [
        &["run", "--version"][..],
        &["run", "-v"],
        &["ports", "--version"],
        &["stats", "-v"],
    ] {
        let f = usernet(&t, args);
        assert!(f.success(), "{f}");
        let first = f.stdout.lines().next().unwrap_or("");
        let v = first.strip_prefix("usernet version ").unwrap_or_else(|| {
            panic!(
                "first line of `usernet {}` is {first:?}, want `usernet version X`",
                args.join(" ")
            )
        });
        assert!(!v.trim().is_empty(), "empty version in {first:?}");
    }
}

#[test]
fn cli_unknown_flag_is_usage_error() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    let f = usernet(&t, &["--no-such-flag", "--netns-type=path", &c, "tap0"]);
    assert_rejected(&f);
    assert!(
        f.stderr.to_lowercase().contains("usage"),
        "no usage message on stderr:\n{f}"
    );
}

#[test]
fn cli_missing_target_is_usage_error() {
    let Some(t) = Topology::new() else { return };
    assert_rejected(&usernet(&t, &[]));
    assert_rejected(&usernet(&t, &["-c"]));
}

/// `-c` (and pasta mode's `--config-net`) on usernet's own network namespace (here H, where
/// it runs) is refused before anything is made: its default route would lead into the TAP,
/// usernet's own traffic included. Without `-c` a TAP there is fine (a VM's): usernet starts
/// and makes it.
#[test]
fn cli_configure_of_own_netns_is_refused() {
    let Some(t) = Topology::new() else { return };
    let own = t.host_ns();
    let routes = || ip(&["-n", &t.host, "route"]).stdout;
    let has_tap = || {
        ip(&["-n", &t.host, "-o", "link"])
            .stdout
            .contains(": tap0:")
    };
    let before = routes();
    let slirp4netns = ["-c", "--netns-type=path", &own, "tap0"];
    let pasta = ["pasta", "--config-net", "--netns", &own];
    for args in [&slirp4netns[..], &pasta[..]] {
        let f = usernet(&t, args);
        assert_rejected(&f);
        assert!(
            f.stderr.contains("usernet's own network namespace"),
            "the error should say why:\n{f}"
        );
        assert_eq!(routes(), before, "H's routes changed");
        assert!(!has_tap(), "a TAP was left in H");
    }
    let _u = UsernetCmd::new(&t)
        .target(["--netns-type=path", &own, "tap0"])
        .start();
    assert!(has_tap(), "without -c the TAP is made in H");
}

#[test]
fn cli_bad_netns_type_rejected() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    assert_rejected(&usernet(&t, &["--netns-type=bogus", &c, "tap0"]));
}

#[test]
fn cli_mtu_out_of_range_rejected() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    for bad in ["0", "65522", "70000", "-1", "abc", ""] {
        for flag in ["--mtu", "-m"] {
            let f = usernet(&t, &["-c", flag, bad, "--netns-type=path", &c, "tap0"]);
            assert_rejected(&f);
        }
    }
    // slirp4netns's wording: "MTU must be a positive integer (< 65522)".
    let f = usernet(&t, &["--mtu=0", "--netns-type=path", &c, "tap0"]);
    assert_rejected(&f);
    assert!(
        f.stderr.to_lowercase().contains("mtu"),
        "the error should name the MTU:\n{f}"
    );
}

#[test]
fn cli_mtu_65521_accepted_and_applied() {
    let Some(t) = Topology::new() else { return };
    // 65521 is the TAP maximum (65535 - Ethernet header): configured as is.
    let _u = UsernetCmd::new(&t).args(["-c", "--mtu", "65521"]).start();
    let link = t.container_link("tap0");
    assert!(link.contains("mtu 65521"), "tap0 in C: {link}");
}

#[test]
fn cli_cidr_invalid_rejected() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    for bad in [
        "10.0.2.1/24",  // not a network address
        "10.0.2.0/26",  // prefix longer than 25
        "10.0.2.0/0",   // prefix shorter than 1
        "10.0.2.0/33",  // not a prefix
        "10.0.2.0",     // no prefix
        "abc/24",       // not an address
        "300.0.2.0/24", // not an address
        "",
    ] {
        let f = usernet(&t, &["-c", "--cidr", bad, "--netns-type=path", &c, "tap0"]);
        assert_rejected(&f);
        assert_eq!(f.code(), Some(1), "slirp4netns exits 1:\n{f}");
    }
}

#[test]
fn cli_cidr_errors_keep_slirp4netns_wording() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    for (bad, want) in [
        ("24", "invalid CIDR: 24"),
        ("10.0.2.0", "invalid CIDR: 10.0.2.0"),
        ("abc/24", "invalid CIDR: abc/24"),
        ("300.0.2.0/24", "invalid network address: 300.0.2.0"),
        ("10.0.2.0/26", "prefix length needs to be 1-25"),
        (
            "10.0.2.1/24",
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24",
        ),
    ] {
        for args in [
            vec!["--cidr", bad, "--netns-type=path", &c, "tap0"],
            vec!["run", "--cidr", bad, "--", "true"],
        ] {
            let f = usernet(&t, &args);
            assert_eq!(f.code(), Some(1), "slirp4netns exits 1:\n{f}");
            assert_eq!(f.stderr.lines().next(), Some(want), "{f}");
        }
    }
    let f = usernet(&t, &["--mtu", "70000", "--netns-type=path", &c, "tap0"]);
    assert_eq!(f.code(), Some(1), "{f}");
    assert_eq!(
        f.stderr.lines().next(),
        Some("MTU must be a positive integer (< 65522)"),
        "{f}"
    );
}

#[test]
fn cli_cidr_prefix_25_accepted() {
    let Some(t) = Topology::new() else { return };
    let _u = UsernetCmd::new(&t)
        .args(["-c", "--cidr=10.0.2.0/25"])
        .start();
    let a = t.container_addrs("tap0");
    assert!(a.contains("10.0.2.100/25"), "tap0 in C: {a}");
}

#[test]
fn cli_macaddress_without_configure_rejected() {
    let Some(t) = Topology::new() else { return };
    let c = t.container_ns();
    let f = usernet(
        &t,
        &[
            "--macaddress",
            "02:00:00:00:00:01",
            "--netns-type=path",
            &c,
            "tap0",
        ],
    );
    assert_rejected(&f);
    let f = usernet(
        &t,
        &[
            "-c",
            "--macaddress",
            "not-a-mac",
            "--netns-type=path",
            &c,
            "tap0",
        ],
    );
    assert_rejected(&f);
}

/// The commit `git` says this checkout is at, if the tests run from a git checkout of the
/// repository itself (as opposed to a tarball).
fn checkout_commit() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let top = std::fs::canonicalize(git(&["rev-parse", "--show-toplevel"])?).ok()?;
    (top == std::fs::canonicalize(dir).ok()?).then_some(())?;
    git(&["rev-parse", "HEAD"])
}

#[test]
fn cli_version_names_the_commit_of_a_git_checkout() {
    let Some(t) = Topology::new() else { return };
    let want = checkout_commit().unwrap_or_else(|| "unknown".to_owned());
    for args in [&["--version"][..], &["run", "--version"]] {
        let f = usernet(&t, args);
        assert!(f.success(), "{f}");
        assert_eq!(
            version_value(&f.stdout, "commit"),
            Some(want.as_str()),
            "`usernet {}`:\n{f}",
            args.join(" ")
        );
    }
}

/// An OS error is printed once, after what failed (it used to follow twice).
#[test]
fn cli_os_error_is_printed_once() {
    let Some(t) = Topology::new() else { return };
    let f = usernet(&t, &["stats", "-a", "/nonexistent/usernet.sock"]);
    assert_rejected(&f);
    assert_eq!(
        f.stderr.matches("os error 2").count(),
        1,
        "the OS error once:\n{f}"
    );
}

/// `--log-level info` says what was set up, in two lines: addresses and services, then
/// ports, API socket and isolation.
#[test]
fn cli_log_level_info_summarises_the_set_up() {
    let Some(t) = Topology::new() else { return };
    let api = t.tmp.join("api.sock");
    let f = UsernetCmd::new(&t)
        .target([
            "run",
            "--log-level",
            "info",
            "-a",
            api.to_str().expect("utf-8"),
            "-p",
            "127.0.0.1:18080:80",
            "--",
            "true",
        ])
        .output(Duration::from_secs(20));
    f.assert_success();
    for want in [
        "guest 10.0.2.100/24 via 10.0.2.2, DNS 10.0.2.3, MTU 1500, IPv6 fd00::100/64 via fd00::2",
        "ports: 127.0.0.1:18080->80/tcp; API socket: ",
        "sandbox on, seccomp on",
    ] {
        assert!(f.stderr.contains(want), "{want:?} is not said:\n{f}");
    }
}
