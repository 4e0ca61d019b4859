//! Lifecycle and attach modes: the ready and exit fds, SIGTERM, the namespace going away,
//! attaching to a pre-created persistent TAP, `--netns-type=path|pid|tapfd`, and `usernet run`
//! (exit code, reaching the world and the DNS server, as an unprivileged user).

mod util;

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

fn any(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

#[test]
fn ready_fd_gets_1_then_eof_once_configured() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t).args(["-c"]).start(); // asserts the first byte is "1"
                                                          // Ready means configured: the address and the default route are already in place.
    let a = t.container_addrs("tap0");
    assert!(
        a.contains("10.0.2.100/24"),
        "tap0 not configured when ready was signalled: {a}"
    );
    let rest = u.read_ready_rest(Duration::from_secs(5));
    assert_eq!(
        rest,
        Ok(Vec::new()),
        "after \"1\" the ready fd must be closed (EOF), nothing more"
    );
    u.assert_running();
}

/// The helper that opened the TAP in the container's namespaces is reaped once ready is
/// reported (after it, not before: ready does not wait for the helper's exit): usernet
/// keeps no zombie child.
#[test]
fn tap_helper_is_reaped_after_ready() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t).args(["-c"]).start();
    let children = format!("/proc/{0}/task/{0}/children", u.pid);
    let read = || fs::read_to_string(&children).expect("usernet's children");
    let gone = wait_for(Duration::from_secs(10), || {
        read().trim().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "usernet still has children 10 s after ready: {}",
        read()
    );
    u.assert_running();
}

#[test]
fn exit_fd_closed_exits_0() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info"])
        .exit_fd()
        .start();
    u.assert_running();
    u.close_exit_fd();
    u.assert_exited_0("its exit fd closed", "exit fd closed: exiting");
}

#[test]
fn exit_fd_data_is_ignored() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info", "-e", "5"])
        .pass_fd(r, 5)
        .start();
    let mut w = fs::File::from(w);
    w.write_all(b"some bytes that mean nothing\n")
        .expect("write exit fd");
    std::thread::sleep(Duration::from_millis(300));
    u.assert_running();
    t.in_container(|| echo_once(echo.addr, b"still forwarding"));
    drop(w);
    u.assert_exited_0("its exit fd closed", "exit fd closed: exiting");
}

#[test]
fn sigterm_and_sigint_exit_0() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let Some(t) = Topology::new() else { return };
        let mut u = UsernetCmd::new(&t)
            .args(["-c", "--log-level", "info"])
            .start();
        u.signal(sig);
        u.assert_exited_0(sig.as_str(), &format!("{sig}: exiting"));
    }
}

/// `ip netns del` of the target: usernet's watch on `/run/netns` sees the unlink and says
/// so (no timer is involved: the log line proves the watch ended it).
#[test]
fn namespace_deleted_exits_0() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info"])
        .start();
    ip(&["netns", "del", &t.container]);
    u.assert_exited_0("`ip netns del`", "the namespace went away: exiting");
}

#[test]
fn attach_to_precreated_persistent_tap_without_configure() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    // As RootlessKit does: the TAP exists first, usernet attaches to it by name, and the
    // caller configures the addresses itself.
    ip(&["-n", &t.container, "tuntap", "add", "tap0", "mode", "tap"]);
    let _u = UsernetCmd::new(&t).start();
    t.configure_container_tap("tap0");
    t.in_container(|| {
        echo_once(echo.addr, &pattern(1, 200_000));
        echo_once(SocketAddrV4::new(WORLD, echo.addr.port()), b"second flow");
    });
}

#[test]
fn netns_type_path_with_custom_tapname() {
    let Some(t) = Topology::new() else { return };
    let source = TcpServer::source(&t.world_ns(), any(WORLD));
    let c = t.container_ns();
    let _u = UsernetCmd::new(&t)
        .args(["-c"])
        .target(["--netns-type", "path", c.as_str(), "eth7"])
        .start();
    let a = t.container_addrs("eth7");
    assert!(a.contains("10.0.2.100/24"), "eth7 in C: {a}");
    t.in_container(|| download_from_source(source.addr, 7, 4 << 20));
}

/// Starts `unshare --user --map-root-user --net --fork sleep 60` inside H and returns it with
/// the PID of the `sleep`, which lives in a new user and network namespace.
fn userns_sleeper(t: &Topology) -> (ChildGuard, u32) {
    let g = ChildGuard::spawn(t.exec_in(
        &t.host,
        "unshare",
        &[
            "--user",
            "--map-root-user",
            "--net",
            "--fork",
            "--kill-child",
            "sleep",
            "60",
        ],
    ));
    // `comm` becomes "sleep" only after unshare wrote the id maps and exec'd.
    let pid = wait_for(Duration::from_secs(10), || {
        descendants(g.pid()).into_iter().find(|c| {
            fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|s| s.trim() == "sleep")
        })
    });
    let pid = pid.expect("unshare --user --net did not start its child");
    (g, pid)
}

#[test]
fn netns_type_pid_joins_the_user_namespace() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let (_sleeper, pid) = userns_sleeper(&t);
    let pid_s = pid.to_string();
    let _u = UsernetCmd::new(&t)
        .args(["-c"])
        .target(["--netns-type=pid", pid_s.as_str(), "tap0"])
        .start();
    let ns = format!("/proc/{pid}/ns/net");
    in_netns(&ns, || upload_to_sink(sink.addr, 0x91D, 8 << 20));
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn rootlesskit_style_pid_default_type_precreated_tap_mtu_65520() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("nsenter") {
        return;
    }
    let echo = TcpServer::echo(&t.world_ns(), any(WORLD));
    let (_sleeper, pid) = userns_sleeper(&t);
    let pid_s = pid.to_string();
    let nsenter = |args: &[&str]| {
        let mut a = vec!["-t", pid_s.as_str(), "-n", "ip"];
        a.extend_from_slice(args);
        sh("nsenter", &a);
    };
    // RootlessKit's child creates tap0 itself; its parent then runs
    // `slirp4netns --mtu 65520 -r 3 CHILDPID tap0` (no --netns-type, no -c).
    nsenter(&["tuntap", "add", "tap0", "mode", "tap"]);
    let _u = UsernetCmd::new(&t)
        .args(["--mtu", "65520"])
        .target([pid_s.as_str(), "tap0"])
        .start();
    nsenter(&["link", "set", "lo", "up"]);
    nsenter(&["link", "set", "tap0", "mtu", "65520"]);
    nsenter(&["addr", "add", "10.0.2.100/24", "dev", "tap0"]);
    nsenter(&["link", "set", "tap0", "up"]);
    nsenter(&["route", "add", "default", "via", "10.0.2.2"]);
    in_netns(&format!("/proc/{pid}/ns/net"), || {
        echo_once(echo.addr, &pattern(9, 1 << 20))
    });
}

#[test]
fn netns_type_tapfd_uses_the_passed_fd() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let tap = open_tap_in(&t.container_ns(), "tap0");
    t.configure_container_tap("tap0");
    let _u = UsernetCmd::new(&t)
        .pass_fd(tap, 5)
        .target(["--netns-type=tapfd", "5"])
        .start();
    t.in_container(|| upload_to_sink(sink.addr, 0x7AF, 8 << 20));
}

// ---------------------------------------------------------------------------------------------
// Run mode
// ---------------------------------------------------------------------------------------------

fn run_mode(t: &Topology, script: &str) -> Finished {
    UsernetCmd::new(t)
        .target(["run", "--", "sh", "-c", script])
        .output(Duration::from_secs(60))
}

#[test]
fn run_returns_the_command_exit_code() {
    let Some(t) = Topology::new() else { return };
    let f = run_mode(&t, "exit 7");
    assert_eq!(f.code(), Some(7), "{f}");
    let f = run_mode(&t, "exit 0");
    assert_eq!(f.code(), Some(0), "{f}");
}

#[test]
fn run_reaches_world_and_dns() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("curl") {
        return;
    }
    let dns = DnsServer::start(&t);
    let http = TcpServer::http(&t.world_ns(), any(WORLD), "hello from the world\n");
    let script = format!(
        "cat /etc/resolv.conf; ip -o -4 addr show; getent hosts {DNS_NAME}; \
         curl -sS --max-time 10 http://{DNS_NAME}:{}/",
        http.addr.port()
    );
    let f = run_mode(&t, &script);
    assert_eq!(f.code(), Some(0), "{f}");
    assert!(
        f.stdout.contains("nameserver 10.0.2.3"),
        "resolv.conf for CMD:\n{f}"
    );
    assert!(f.stdout.contains("10.0.2.100/24"), "CMD's address:\n{f}");
    assert!(
        f.stdout
            .lines()
            .any(|l| l.starts_with("203.0.113.1") && l.contains(DNS_NAME)),
        "getent hosts {DNS_NAME}:\n{f}"
    );
    assert!(f.stdout.contains("hello from the world"), "{f}");
    let seen = dns.udp_queries.load(Ordering::SeqCst) + dns.tcp_queries.load(Ordering::SeqCst);
    assert!(seen >= 1, "the test DNS server saw no query");
    assert_eq!(http.stats.peer_ips(), vec![HOST_ADDR]);
}

#[test]
fn run_as_unprivileged_user() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("setpriv") || !require_tool("curl") {
        return;
    }
    let mode = fs::metadata("/dev/net/tun").map(|m| m.permissions().mode() & 0o777);
    if !require(
        matches!(mode, Ok(m) if m & 0o666 == 0o666),
        &format!(
            "/dev/net/tun must be mode 0666 for unprivileged users (is {}; \
             `chmod 0666 /dev/net/tun`, as .ci/run does)",
            match mode {
                Ok(m) => format!("{m:04o}"),
                Err(e) => e.to_string(),
            }
        ),
    ) {
        return;
    }
    let nobody = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
    ];
    // Unprivileged user namespaces must work here at all.
    let mut probe = t.exec_in(&t.host, "setpriv", &nobody[1..]);
    probe.args(["unshare", "--user", "--net", "true"]);
    let p = run_with_timeout(probe, Duration::from_secs(10));
    if !require(
        p.success(),
        &format!("unprivileged user namespaces do not work here:\n{p}"),
    ) {
        return;
    }

    let http = TcpServer::http(&t.world_ns(), any(WORLD), "hello, nobody\n");
    let script = format!("curl -sS --max-time 10 http://{}/ && exit 3", http.addr);
    let f = UsernetCmd::new(&t)
        .wrap(nobody)
        .target(["run", "--", "sh", "-c", script.as_str()])
        .output(Duration::from_secs(60));
    assert_eq!(f.code(), Some(3), "{f}");
    assert!(f.stdout.contains("hello, nobody"), "{f}");
}

/// slirp4netns's callers hand it `-e`, `-r` and maybe a TAP descriptor; anything else it
/// inherits (a caller's pipe to its own child, a log file) must not be held open: a pipe
/// whose only writer is usernet's copy would never reach end of file.
#[test]
fn inherited_descriptors_closed_at_start_but_exit_fd_kept() {
    let Some(t) = Topology::new() else { return };
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    let (r2, w2) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    let mut u = UsernetCmd::new(&t)
        .args(["-c"])
        .exit_fd()
        .pass_fd(w, 7)
        .pass_fd(w2, 12)
        .start();
    // usernet's own sockets reuse the numbers: compare what they point to.
    let pipes: Vec<_> = [&r, &r2]
        .iter()
        .map(|fd| fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap())
        .collect();
    let held: Vec<_> = fs::read_dir(format!("/proc/{}/fd", u.pid))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect();
    for p in &pipes {
        assert!(!held.contains(p), "usernet still holds {p:?}: {held:?}");
    }
    assert!(
        fs::read_link(format!("/proc/{}/fd/{EXIT_FD}", u.pid))
            .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:")),
        "usernet closed its exit fd"
    );
    // The pipes reach end of file: no writer left anywhere.
    for r in [r, r2] {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut f = fs::File::from(r);
            let mut buf = [0u8; 16];
            let _ = tx.send(std::io::Read::read(&mut f, &mut buf).map_err(|e| e.to_string()));
        });
        assert_eq!(
            rx.recv_timeout(IO_TIMEOUT),
            Ok(Ok(0)),
            "the caller's pipe did not reach end of file"
        );
    }
    u.assert_running();
}
